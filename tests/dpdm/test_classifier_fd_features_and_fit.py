"""The classifier FD's features and Gaussian fit (mut48, stop 47: mutants CL2, EV5 passed every test)."""
from __future__ import annotations

import pytest
import torch

from dpdm.classifiers import CNN


def test_cnn_features_are_the_relu_of_fc1_and_feed_fc2():
    """The classifier FD's space is the CNN's penultimate activations, ReLU(fc1(...)) as in DPDM's classifier; the
    paper's FC(1152 -> 128) -> ReLU -> Drop -> FC(128 -> classes). Features without the ReLU passed every test
    (the architecture test counts parameters only)."""
    torch.manual_seed(0)
    cnn = CNN(1, 28, 10).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        h = cnn.fc1(cnn.conv(x).flatten(1))
        assert bool((h < 0).any())                      # the ReLU has something to do
        torch.testing.assert_close(cnn.features(x), torch.relu(h))
        torch.testing.assert_close(cnn(x), cnn.fc2(torch.relu(h)))


def test_feature_stats_covariance_is_the_unbiased_one_of_fid():
    """FID's Gaussian fit (Heusel et al.; pytorch-fid, TTUR: np.cov(rowvar=False)) divides by n - 1. The FD at the
    small n `dpdm eval` allows (MIN_SAMPLES = 5) differs by a factor n / (n - 1) in its trace terms; a biased fit
    passed every test."""
    import numpy as np

    from dpdm.evaluate import feature_stats, frechet_distance

    f = np.random.default_rng(0).normal(size=(5, 3))
    mu, cov = feature_stats(f)
    c = f - f.mean(0)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(cov, c.T @ c / 4, rtol=1e-12)
    # Against a zero-mean, zero-covariance fit the FD is |mu|^2 + tr(cov), with the n - 1 covariance.
    assert frechet_distance(mu, cov, np.zeros(3), np.zeros((3, 3))) == \
        pytest.approx(mu @ mu + np.trace(c.T @ c) / 4, rel=1e-9)
