"""Membership scores: a memorizing denoiser is caught by every attack; fixed noise; validation."""

import numpy as np
import pytest
import torch
from torch import nn

from audits.auditor import auc
from audits.scores import (
    PIA,
    LossAttack,
    diffusion_losses,
    fixed_noise,
    loss_scores,
    pia_scores,
    synthetic_distance_scores,
)


class Memorizer(nn.Module):
    """The ideal denoiser of a finite training set: the posterior mean over the stored images."""

    sigma_data = 0.5

    def __init__(self, data):
        super().__init__()
        self.register_buffer("data", data.clone())
        self.dummy = nn.Parameter(torch.zeros(()))  # so that .parameters() is not empty

    def forward(self, x, sigma, class_labels=None):
        flat = x.reshape(x.shape[0], -1)
        d = self.data.reshape(self.data.shape[0], -1)
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        logits = -torch.cdist(flat, d) ** 2 / (2 * s**2)
        return (logits.softmax(1) @ d).reshape(x.shape) + 0 * self.dummy


class Shrinker(nn.Module):
    """A model that has learnt nothing but the data scale: D(x) = c_skip(sigma) x."""

    sigma_data = 0.5

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return x * self.sigma_data**2 / (s**2 + self.sigma_data**2) + 0 * self.dummy


class LabelShift(Shrinker):
    """A conditional model whose output depends on each row's label."""

    def forward(self, x, sigma, class_labels=None):
        return super().forward(x, sigma) + 0.1 * class_labels.to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 6, 6, generator=g) * 2 - 1
    members = torch.zeros(80, dtype=torch.bool)
    members[torch.randperm(80, generator=g)[:40]] = True
    return x, members


def test_loss_attack_separates_members_of_a_memorizing_model(data):
    x, members = data
    target, reference = Memorizer(x[members]), Shrinker()
    s = loss_scores(target, x, reference=reference, attack=LossAttack(sigmas=(0.1, 0.3), draws=4))
    assert s.shape == (80,)
    assert auc(s[members.numpy()], s[~members.numpy()]) > 0.95
    # uncalibrated (minus the loss) works here too
    s0 = loss_scores(target, x, attack=LossAttack(sigmas=(0.1, 0.3), draws=4))
    assert auc(s0[members.numpy()], s0[~members.numpy()]) > 0.95


def test_loss_attack_is_deterministic_and_calibration_cancels(data):
    x, _ = data
    m = Memorizer(x[:10])
    atk = LossAttack(sigmas=(0.2, 1.0), draws=3, seed=5, batch_size=7)
    a = loss_scores(m, x, reference=Shrinker(), attack=atk)
    b = loss_scores(m, x, reference=Shrinker(), attack=atk)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loss_scores(m, x, reference=m, attack=atk), 0.0, atol=1e-12)
    per = loss_scores(m, x, reference=Shrinker(), attack=atk, per_level=True)
    assert per.shape == (80, 2)
    np.testing.assert_allclose(per.mean(1), a)


def test_diffusion_losses_batching_does_not_change_values(data):
    x, _ = data
    m = Memorizer(x[:10])
    a = diffusion_losses(m, x, attack=LossAttack(sigmas=(0.5,), draws=2, batch_size=80))
    b = diffusion_losses(m, x, attack=LossAttack(sigmas=(0.5,), draws=2, batch_size=3))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fixed_noise_rows_depend_only_on_seed_and_index():
    a = fixed_noise(3, (1, 2, 2), 4, seed=1)
    b = fixed_noise(6, (1, 2, 2), 4, seed=1)
    c = fixed_noise(3, (1, 2, 2), 4, seed=2)
    torch.testing.assert_close(a, b[:3])
    assert not torch.equal(a, c)


def test_pia_separates_members_of_a_memorizing_model(data):
    x, members = data
    s = pia_scores(Memorizer(x[members]), x, pia=PIA(sigmas=(0.3, 0.6)))
    assert s.shape == (80,) and np.all(np.isfinite(s))
    assert auc(s[members.numpy()], s[~members.numpy()]) > 0.95
    cal = pia_scores(Memorizer(x[members]), x, reference=Shrinker(), pia=PIA(sigmas=(0.3,)))
    assert auc(cal[members.numpy()], cal[~members.numpy()]) > 0.95


def test_synthetic_distance_scores_match_brute_force(data):
    x, members = data
    g = torch.Generator().manual_seed(1)
    synth = torch.cat([x[members][:20], torch.rand(30, 1, 6, 6, generator=g) * 2 - 1])
    s = synthetic_distance_scores(x, synth, batch_size=7)
    brute = -np.array([min(np.linalg.norm((a.double() - b.double()).numpy()) for b in synth) for a in x])
    np.testing.assert_allclose(s, brute, rtol=1e-9, atol=1e-12)
    copied = members.clone()
    copied[members.nonzero()[20:, 0]] = False
    assert np.all(s[copied.numpy()] == 0)
    # uint8 synthetic images are mapped to [-1, 1]
    u8 = torch.full((2, 1, 6, 6), 255, dtype=torch.uint8)
    np.testing.assert_allclose(synthetic_distance_scores(torch.ones(1, 1, 6, 6), u8), [0.0], atol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: LossAttack(sigmas=()), "sigmas"),
        (lambda: LossAttack(sigmas=(0.1, -1)), "sigmas"),
        (lambda: LossAttack(draws=0), "draws"),
        (lambda: PIA(p=0.5), "p="),
        (lambda: PIA(sigma0=0), "sigma0"),
        (lambda: loss_scores(Shrinker(), torch.zeros(0, 1, 2, 2)), "x="),
        (lambda: loss_scores(Shrinker(), torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long)), "y="),
        (lambda: synthetic_distance_scores(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 3, 3)), "match"),
        (lambda: synthetic_distance_scores(torch.zeros(2, 1, 2, 2), torch.zeros(0, 1, 2, 2)), "synthetic="),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _x(n=5):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_fixed_noise_rows_are_distinct_draws():
    """Catches every example getting the same noise draws (mut47)."""
    a = fixed_noise(4, (1, 3, 3), 2, seed=1)
    assert all(not torch.equal(a[i], a[j]) for i in range(4) for j in range(i))


def test_diffusion_loss_is_the_edm_weighted_loss():
    """Catches a wrong EDM weight (mut47): lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 times the mean squared
    denoising error, recomputed by brute force (the AUC tests separate members under either weight)."""
    x, D, atk = _x(), Shrinker(), LossAttack(sigmas=(0.05, 2.0), draws=3, seed=0)
    noise = fixed_noise(5, (1, 4, 4), 3, 0)
    got = diffusion_losses(D, x, attack=atk)
    for j, s in enumerate(atk.sigmas):
        noisy = (x.unsqueeze(1) + s * noise).reshape(15, 1, 4, 4)
        den = D(noisy, torch.full((15,), s)).reshape(5, 3, 1, 4, 4)
        w = (s**2 + 0.25) / (s * 0.5) ** 2
        want = (w * (den - x.unsqueeze(1)) ** 2).reshape(5, -1).mean(1).double().detach().numpy()
        np.testing.assert_allclose(got[:, j], want, rtol=1e-5)


def test_diffusion_loss_pairs_each_draw_with_its_own_label():
    """Catches draws scored with other examples' labels (mut47; the canary audit scores conditional runs with
    labels): example i's draws are scored with y[i] whatever the batch, as each example alone."""
    x, D, atk = _x(), LabelShift(), LossAttack(sigmas=(0.3,), draws=3, seed=0)
    y = torch.tensor([0, 1, 2, 3, 4])
    noise = fixed_noise(5, (1, 4, 4), 3, 0)
    batch = diffusion_losses(D, x, y, attack=atk, noise=noise)
    alone = np.concatenate([diffusion_losses(D, x[i:i + 1], y[i:i + 1], attack=atk, noise=noise[i:i + 1])
                            for i in range(5)])
    np.testing.assert_allclose(batch, alone, rtol=1e-6)


def test_pia_is_deterministic_and_its_calibration_cancels():
    """Catches PIA drawing random noise (its docstring says no random draws) and the sign of its calibration
    flipped (mut47): a model calibrated against itself scores 0."""
    x, D = _x(), LabelShift()
    y = torch.arange(5)
    a = pia_scores(D, x, y, pia=PIA(sigmas=(0.3, 0.6)))
    np.testing.assert_array_equal(a, pia_scores(D, x, y, pia=PIA(sigmas=(0.3, 0.6))))
    np.testing.assert_allclose(pia_scores(D, x, y, reference=D, pia=PIA(sigmas=(0.3,))), 0.0, atol=1e-12)


def test_uint8_synthetic_images_span_minus_one_to_one():
    """Catches uint8 synthetic images mapped to [0, 1] (mut47): 0 is -1 and 255 is 1 (the test above has only
    255, which both mappings send to 1)."""
    grey = torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    cand = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    np.testing.assert_allclose(synthetic_distance_scores(cand, grey), [0.0, 0.0], atol=1e-12)
