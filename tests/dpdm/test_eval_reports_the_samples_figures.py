"""The precision / recall and reference-CNN figures of `evaluate_samples` are the ones its docs define
(stop 45, mut45 PR2, ACC4; precision_recall itself is pinned to a brute-force reference in test_evaluate.py).

- evaluate_samples reports precision_recall(real training features, sample features): swapping the two
  (fidelity reported as coverage) passed every existing test, whose samples were a plain subset of the real set.
- the reference CNN's "real_test_accuracy" is its accuracy on the real test split (not the training split).
"""
import pytest
import torch

from dpdm.datasets import ImageData, load_dataset
from dpdm.evaluate import accuracy, evaluate_samples, precision_recall, reference_classifier


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    return (ImageData(d.x[tr], d.y[tr], 10, "digits-train"), ImageData(d.x[te], d.y[te], 10, "digits-test"))


def test_evaluate_reports_precision_recall_of_the_samples_against_real_and_the_references_test_accuracy(
        digits, tmp_path):
    train, test = digits
    # Mode-collapsed samples: 300 training images of classes 0 and 1 only, blurred a little (faithful, not covering).
    keep = (train.y <= 1).nonzero().flatten()[:300]
    x = (0.8 * train.x[keep] + 0.2 * train.x[keep].mean(0, keepdim=True)).clamp(-1, 1)
    samples = ImageData(x, train.y[keep], 10, "collapsed")
    report = evaluate_samples(samples, train, test, classifiers=(), reference_epochs=2, cache_dir=tmp_path, seed=3)
    ref, info = reference_classifier(train, cache_dir=tmp_path, epochs=2, seed=3)
    assert info["cached"] is True
    with torch.no_grad():
        f_train = ref.features(train.x).double().numpy()
        f_samples = ref.features(samples.x).double().numpy()
    expected = precision_recall(f_train, f_samples, seed=3)
    swapped = precision_recall(f_samples, f_train, seed=3)
    pr = report["classifier_precision_recall"]
    assert abs(expected["precision"] - expected["recall"]) > 0.2, expected   # the test can tell a swap
    assert pr["precision"] == pytest.approx(expected["precision"], abs=1e-12), (pr, expected, swapped)
    assert pr["recall"] == pytest.approx(expected["recall"], abs=1e-12), (pr, expected, swapped)
    assert expected["precision"] > expected["recall"]                          # faithful, not covering
    got = report["classifier_fd"]["reference"]["real_test_accuracy"]
    assert got == accuracy(ref, test.x, test.y)
    assert got != accuracy(ref, train.x, train.y)                              # the test can tell the split
