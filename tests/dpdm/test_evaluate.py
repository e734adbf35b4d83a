"""Evaluation: classifiers, the train-on-synthetic protocol, Frechet distances."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from dpdm.classifiers import CNN, MLP, LogReg, build_classifier
from dpdm.datasets import DataError, ImageData, class_names_problem, load_dataset
from dpdm.evaluate import (
    accuracy,
    cache_folder_problem,
    classifier_fd,
    downstream_accuracy,
    evaluate_samples,
    feature_stats,
    fit_classifier,
    frechet_distance,
    inception_fid,
    load_inception,
    precision_recall,
    random_shift,
    reference_classifier,
    samples_classes_problem,
)
from tests.dpdm.test_train import RunsCodeWhenUnpickled


@pytest.fixture(scope="module")
def digits():
    """Real 8x8 digits cut into disjoint 'train' (1200) and 'test' (597) parts for these tests."""
    d = load_dataset("digits")
    perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    return (ImageData(d.x[tr], d.y[tr], 10, "digits-train"),
            ImageData(d.x[te], d.y[te], 10, "digits-test"))


# --- classifiers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32), (3, 20, 30)])
def test_classifier_shapes(shape):
    c, h, w = shape
    x = torch.zeros(4, c, h, w)
    for kind in ("logreg", "mlp", "cnn"):
        assert build_classifier(kind, img_channels=c, img_resolution=(h, w), num_classes=7)(x).shape == (4, 7)
    assert CNN(c, (h, w), 7).features(x).shape == (4, 128)


def test_paper_architectures_on_mnist():
    """research/dpdm.md section 4: Linear(784, 10); 784-100-10; CNN with FC(1152 -> 128)."""
    assert sum(p.numel() for p in LogReg(1, 28, 10).parameters()) == 784 * 10 + 10
    assert sum(p.numel() for p in MLP(1, 28, 10).parameters()) == 784 * 100 + 100 + 100 * 10 + 10
    cnn = CNN(1, 28, 10)
    assert cnn.fc1.in_features == 1152
    dp = CNN(1, 28, 10, dropout=0.0, group_norm=True)
    kinds = {type(m).__name__ for m in dp.modules()}
    assert "GroupNorm" in kinds and "Dropout" not in kinds and not any("BatchNorm" in k for k in kinds)
    with pytest.raises(ValueError, match="classifier='svm'"):
        build_classifier("svm", img_channels=1, img_resolution=28, num_classes=10)


# --- protocol ------------------------------------------------------------------------------------

def test_fit_classifier_restores_best_epoch(digits):
    train, _ = digits
    model = LogReg(1, 8, 10)
    best_epoch, best_acc = fit_classifier(model, train.x[:1000], train.y[:1000], train.x[1000:],
                                          train.y[1000:], epochs=4, lr=1e-2)
    assert 1 <= best_epoch <= 4
    assert accuracy(model, train.x[1000:], train.y[1000:]) == best_acc


def test_downstream_accuracy_learns_from_good_samples(digits):
    """'Synthetic' = real digits: a logistic regression must then do well on the real test part."""
    train, test = digits
    r = downstream_accuracy(train, test, kind="logreg", epochs=40)
    assert r["train_size"] == 1080 and r["epochs"] == 40
    assert r["test_accuracy"] > 0.75 and r["synthetic_val_accuracy"] > 0.75


def test_downstream_accuracy_of_label_noise_is_chance(digits):
    train, test = digits
    shuffled = ImageData(train.x, train.y[torch.randperm(len(train), generator=torch.Generator().manual_seed(3))],
                         10, "shuffled")
    r = downstream_accuracy(shuffled, test, kind="logreg", epochs=3)
    assert r["test_accuracy"] < 0.3


def test_downstream_accuracy_errors(digits):
    train, test = digits
    with pytest.raises(DataError, match="1x4x4.*1x8x8"):
        downstream_accuracy(ImageData(torch.zeros(10, 1, 4, 4), torch.zeros(10, dtype=torch.int64), 10, "s"),
                            test, kind="mlp", epochs=1)
    with pytest.raises(DataError, match="no labels"):
        downstream_accuracy(ImageData(train.x, None, 0, "s"), test, kind="mlp", epochs=1)
    with pytest.raises(DataError, match="labels reach 11"):
        downstream_accuracy(ImageData(train.x[:12], torch.arange(12), 12, "s"), test, kind="mlp", epochs=1)


def test_downstream_accuracy_public_pretrain_starts_from_public_data(digits):
    """Few, briefly trained 'synthetic' digits: the public start must carry the classifier further."""
    train, test = digits
    public = ImageData(train.x[600:], train.y[600:], 10, "public-part")
    few = ImageData(train.x[:40], train.y[:40], 10, "few")
    cold = downstream_accuracy(few, test, kind="logreg", epochs=1)
    warm = downstream_accuracy(few, test, kind="logreg", epochs=1, public=public, public_epochs=30)
    assert "public_pretrain" not in cold
    pre = warm["public_pretrain"]
    assert pre["dataset"] == "public-part" and pre["epochs"] == 30
    assert pre["test_accuracy"] > 0.75 > cold["test_accuracy"], (pre, cold)
    assert warm["test_accuracy"] > 0.75 and warm["best_epoch"] == 1
    # Seeded: the same call gives the same numbers.
    again = downstream_accuracy(few, test, kind="logreg", epochs=1, public=public, public_epochs=30)
    assert again["test_accuracy"] == warm["test_accuracy"]
    with pytest.raises(DataError, match="public data 'p' must be labelled, of shape"):
        downstream_accuracy(few, test, kind="logreg", epochs=1,
                            public=ImageData(torch.zeros(5, 1, 4, 4), torch.zeros(5, dtype=torch.int64), 10, "p"))
    with pytest.raises(DataError, match="public data 'p' must be labelled"):
        downstream_accuracy(few, test, kind="logreg", epochs=1, public=ImageData(train.x[:5], None, 0, "p"))


def test_random_shift_translates_each_image_within_range():
    x = torch.randn(64, 2, 7, 9)
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 7, dx:dx + 9])]
        assert len(found) == 1, i   # every image is its own translate by at most 2 pixels
        offsets.append(found[0])
    assert len(set(offsets)) > 10   # an offset per image, not one per batch
    assert torch.equal(random_shift(x, 2, torch.Generator().manual_seed(0)), out)   # seeded
    assert not torch.equal(random_shift(x, 2, torch.Generator().manual_seed(1)), out)
    assert random_shift(x, 0, torch.Generator()) is x
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="shift"):
            random_shift(x, bad, torch.Generator())


def test_fit_classifier_shift_augments_training_images_only(digits):
    """The classifier sees translated training images (new ones each epoch) and untouched validation ones."""
    train, _ = digits
    originals = {bytes(row.numpy()) for row in train.x[:200]}
    for shift in (0, 1):
        seen = {True: [], False: []}
        model = LogReg(1, 8, 10)
        model.register_forward_pre_hook(lambda m, args: seen[m.training].extend(args[0]))
        fit_classifier(model, train.x[:200], train.y[:200], train.x[:200], train.y[:200], epochs=2, shift=shift)
        known = [bytes(row.numpy()) in originals for row in seen[True]]
        assert len(known) == 400 and all(bytes(row.numpy()) in originals for row in seen[False])
        if shift == 0:
            assert all(known)
        else:   # (1 + 2 * 1) ** 2 = 9 offsets, one of them (0, 0)
            assert sum(known) < 0.3 * len(known), sum(known)


def test_downstream_accuracy_with_shift(digits):
    train, test = digits
    a = downstream_accuracy(train, test, kind="logreg", epochs=20, shift=1)
    b = downstream_accuracy(train, test, kind="logreg", epochs=20, shift=1)
    assert a["test_accuracy"] == b["test_accuracy"] > 0.3   # seeded, and far above chance (0.1) on 8x8 digits


# --- Frechet distance ----------------------------------------------------------------------------

def test_frechet_distance_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 12))
    b = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 0.5
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m1, s1, m1 + 2.0, s1) == pytest.approx(4.0 * 12, rel=1e-9)


def test_frechet_distance_singular_covariances_and_self():
    rng = np.random.default_rng(1)
    f = np.maximum(rng.normal(size=(300, 40)), 0)
    f[:, :10] = 0  # dead ReLU units: singular covariance
    m, s = feature_stats(f)
    assert frechet_distance(m, s, m, s) == pytest.approx(0.0, abs=1e-8)


def test_reference_classifier_cached_and_fd(digits, tmp_path):
    train, test = digits
    train = ImageData(train.x[:600], train.y[:600], 10, "digits-600")
    ref, info = reference_classifier(train, cache_dir=tmp_path, epochs=4)
    assert info["cached"] is False and 0.0 <= info["real_val_accuracy"] <= 1.0
    assert ((tmp_path / "reference").stat().st_mode & 0o777) == 0o700   # a CNN trained on the private data
    ref2, info2 = reference_classifier(train, cache_dir=tmp_path, epochs=4)
    assert info2["cached"] is True and info2["cache"] == info["cache"]
    for p, q in zip(ref.parameters(), ref2.parameters()):
        torch.testing.assert_close(p, q)
    # A damaged cache entry (garbage, cut short) is trained again, not a crash.
    cache = Path(info["cache"])
    whole = cache.read_bytes()
    for damaged in (b"\x80\x04garbage", b"not a pickle", whole[: len(whole) // 2]):
        cache.write_bytes(damaged)
        ref3, info3 = reference_classifier(train, cache_dir=tmp_path, epochs=4)
        assert info3["cached"] is False and cache.read_bytes() != damaged
        for p, q in zip(ref.parameters(), ref3.parameters()):
            torch.testing.assert_close(p, q)
    # Entries that load but are not the cache's (a bare tensor, a JSON list; a TypeError was a traceback), and
    # one with a single wrong tensor, whose other tensors load_state_dict copied before refusing.
    state = torch.load(cache, weights_only=True)
    one_wrong = {**state, next(iter(state)): torch.zeros(1)}
    for weights, meta in ((torch.zeros(3), None), (None, "[1, 2]"), (one_wrong, None)):
        torch.save(ref.state_dict(), cache)
        cache.with_suffix(".json").write_text(meta or json.dumps({"real_val_accuracy": 1.0}))
        if weights is not None:
            torch.save(weights, cache)
        ref3, info3 = reference_classifier(train, cache_dir=tmp_path, epochs=4)
        assert info3["cached"] is False
        for p, q in zip(ref.parameters(), ref3.parameters()):
            torch.testing.assert_close(p, q)
    # Entries that load and fit but hold NaN weights (every later eval failed with "Eigenvalues did not converge",
    # the entry never rebuilt) or a record of other figures (copied into the report as they were).
    record = json.loads(cache.with_suffix(".json").read_text())
    nan = {k: v * float("nan") if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    for weights, meta in ((nan, record), (ref.state_dict(), {**record, "real_val_accuracy": "x"}),
                          (ref.state_dict(), {**record, "best_epoch": None}),
                          (ref.state_dict(), {**record, "epochs": 99}), (ref.state_dict(), {**record, "extra": 1})):
        torch.save(weights, cache)
        cache.with_suffix(".json").write_text(json.dumps(meta))
        ref3, info3 = reference_classifier(train, cache_dir=tmp_path, epochs=4)
        assert info3["cached"] is False and json.loads(cache.with_suffix(".json").read_text()) == record
        for p, q in zip(ref.parameters(), ref3.parameters()):
            torch.testing.assert_close(p, q)
    assert reference_classifier(train, cache_dir=tmp_path, epochs=4)[1]["cached"] is True
    assert classifier_fd(train, train, ref) == pytest.approx(0.0, abs=1e-6)
    real_fd = classifier_fd(test, train, ref)
    noise = ImageData(torch.rand(500, 1, 8, 8) * 2 - 1, None, 0, "noise")
    noise_fd = classifier_fd(noise, train, ref)
    assert math.isfinite(real_fd) and noise_fd > 5 * real_fd


def test_evaluate_samples_tiny(digits, tmp_path):
    train, test = digits
    samples = ImageData(train.x[:600], train.y[:600], 10, "samples")
    report = evaluate_samples(samples, train, test, epochs={"logreg": 2, "mlp": 2, "cnn": 1},
                              reference_epochs=2, cache_dir=tmp_path)
    assert set(report["classifiers"]) == {"logreg", "mlp", "cnn"}
    for r in report["classifiers"].values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["synthetic_val_accuracy"] <= 1.0
    fd = report["classifier_fd"]
    assert math.isfinite(fd["value"]) and math.isfinite(fd["real_test_value"])
    assert 0.0 <= fd["reference"]["real_test_accuracy"] <= 1.0
    assert report["inception_fid"] is None
    pr = report["classifier_precision_recall"]
    assert 0.0 <= pr["precision"] <= 1.0 and 0.0 <= pr["recall"] <= 1.0 and pr["n"] == 600
    assert report["public_pretrain"] is None
    with pytest.raises(DataError, match="samples are 1x4x4"):
        evaluate_samples(ImageData(torch.zeros(4, 1, 4, 4), None, 0, "s"), train, test, cache_dir=tmp_path)
    public = ImageData(train.x[600:], train.y[600:], 10, "public-part")
    # Public data holding real training images is refused, whatever it is called.
    with pytest.raises(DataError, match="holds 600 of the 1200 images of"):
        evaluate_samples(samples, train, test, classifiers=("logreg",), cache_dir=tmp_path, public=public)
    real_train = ImageData(train.x[:600], train.y[:600], 10, "digits-train-part")
    report = evaluate_samples(samples, real_train, test, classifiers=("logreg",), epochs=1, reference_epochs=2,
                              cache_dir=tmp_path, public=public, public_epochs=2)
    assert report["public_pretrain"] == {"dataset": "public-part", "epochs": 2}
    assert report["classifiers"]["logreg"]["public_pretrain"]["epochs"] == 2


def test_precision_recall_separates_fidelity_from_coverage():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 4, generator=g, dtype=torch.float64).numpy()
    same = torch.randn(600, 4, generator=g, dtype=torch.float64).numpy()
    pr = precision_recall(real, same)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9 and pr["k"] == 3 and pr["n"] == 600
    assert precision_recall(real, real)["precision"] == 1.0      # every point lies in its own ball
    # Collapsed onto one mode of the real data: faithful but covering little.
    collapsed = (0.1 * torch.randn(600, 4, generator=g, dtype=torch.float64)).numpy()
    pr = precision_recall(real, collapsed)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.2
    # Far away: neither.
    pr = precision_recall(real, same + 100.0)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0
    # Unequal sizes are subsampled to the smaller.
    assert precision_recall(real, same[:100])["n"] == 100
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(real[:4], same[:4])


def _brute_force_precision_recall(real, fake, k):
    """Kynkaenniemi et al. 2019 written out in numpy: each point's ball reaches its k-th nearest other point of
    its own set (the (k + 1)-th smallest of its row, the 0 to itself first); precision is the share of fakes in
    any real ball, recall the share of reals in any fake ball."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    return (float((dist(fake, real) <= r_real[None, :]).any(1).mean()),
            float((dist(real, fake) <= r_fake[None, :]).any(1).mean()))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equals_a_brute_force_reference(k):
    """The coarse bounds above passed with every k-NN ball 1.2x too wide, and with precision's balls of k = 5
    while recall's kept k = 3: both figures must be exactly the paper's. Sets of equal size, so that the seeded
    subsample only reorders them (neither figure depends on the order)."""
    g = np.random.default_rng(k)
    for n, d, shift, scale in ((30, 2, 1.5, 1.0), (40, 3, 1.2, 1.4), (25, 4, 1.5, 0.7)):
        real = g.normal(size=(n, d))
        fake = g.normal(size=(n, d)) * scale + shift
        expected = _brute_force_precision_recall(real, fake, k)
        assert 0 < expected[0] < 1 and 0 < expected[1] < 1, expected   # neither saturated: a wrong ball shows
        pr = precision_recall(real, fake, k=k, seed=k)
        assert (pr["precision"], pr["recall"]) == expected and pr["k"] == k and pr["n"] == n
    # Points of a lattice (distances exact in float64) lie on ball edges: the balls are closed.
    real, fake = np.arange(0, 16, 2.0)[:, None], np.array([-2.0, 16, 1, 3, 20, 30, 40, 50])[:, None]
    pr = precision_recall(real, fake, k=k, seed=k)
    assert (pr["precision"], pr["recall"]) == _brute_force_precision_recall(real, fake, k)


# --- Inception FID (no real weights here) --------------------------------------------------------

def test_load_inception_refuses_bad_files(tmp_path):
    with pytest.raises(ValueError, match="existing file"):
        load_inception(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="weights_only"):
        load_inception(junk)
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="not a torchvision inception_v3"):
        load_inception(wrong)
    int_key = tmp_path / "int_key.pt"   # an AttributeError ('int' has no startswith) was a traceback
    torch.save({1: torch.zeros(2)}, int_key)
    with pytest.raises(ValueError, match="must hold a state dict of tensors"):
        load_inception(int_key)


def test_load_inception_refuses_code_running_pickle_naming_why(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"Conv2d_1a_3x3.conv.weight": RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(ValueError, match="weights_only=True") as refused:
        load_inception(evil)
    assert not marker.exists()
    # One line naming what torch refused (the system call), without torch's advice to load with weights_only=False.
    msg = str(refused.value)
    assert "system" in msg and "False" not in msg and "\n" not in msg


@pytest.mark.slow
def test_inception_fid_with_random_weights(tmp_path):
    """The full path with a randomly initialized inception_v3 state dict (about 100 MB)."""
    from torchvision.models import inception_v3

    path = tmp_path / "inception.pt"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), path)
    net = load_inception(path)
    a = ImageData(torch.rand(6, 1, 8, 8) * 2 - 1, None, 0, "a")
    assert inception_fid(a, a, net) == pytest.approx(0.0, abs=1e-3)


# --- review mends: no fingerprint of the private data, unlabelled data, non-private statistics ----

def _tiny_inception(monkeypatch):
    """Replaces load_inception with a 48-d pooling 'network' (no 100 MB of real weights)."""
    import dpdm.evaluate as ev

    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    monkeypatch.setattr(ev, "load_inception", lambda weights: net)


def test_evaluate_report_holds_no_fingerprint_and_names_non_private_statistics(digits, tmp_path):
    """The report held the cache path, whose name is sha256(private x, y)[:16]."""
    import json

    from dpdm.evaluate import NON_PRIVATE_KEY, _digest

    train, test = digits
    train = ImageData(train.x[:300], train.y[:300], 10, "digits-300")
    samples = ImageData(test.x[:50], test.y[:50], 10, "samples")
    seen = []
    for attempt in range(2):   # trained, then from the cache
        report = evaluate_samples(samples, train, test, classifiers=(), reference_epochs=1, cache_dir=tmp_path,
                                  progress=seen.append)
        ref = report["classifier_fd"]["reference"]
        assert "cache" not in ref and ref["cached"] is (attempt == 1)
        assert _digest(train)[:16] not in json.dumps(report)
    assert _digest(train)[:16] not in " ".join(seen)   # nor in the progress line, which names the folder only
    assert list((tmp_path / "reference").glob(f"*{_digest(train)[:16]}*.pt"))   # the local cache keeps its name
    assert report[NON_PRIVATE_KEY] == ["test_images_in_train", "samples_in_train",
                                       "classifier_fd.value", "classifier_fd.reference.real_val_accuracy",
                                       "classifier_fd.reference.best_epoch", "classifier_fd.real_test_value",
                                       "classifier_fd.reference.real_test_accuracy",
                                       "classifier_precision_recall"]
    assert report["skipped"] == {}


def test_evaluate_unlabelled_data_skips_what_needs_labels(digits, tmp_path, monkeypatch):
    """Unlabelled real data raised 'the reference classifier needs labelled training data'; now the
    reference metrics are skipped with their reason and the Inception FID is still computed."""
    from dpdm.evaluate import NON_PRIVATE_KEY

    _tiny_inception(monkeypatch)
    train, test = digits
    real = ImageData(train.x[:200], None, 0, "unlabelled-real")
    samples = ImageData(test.x[:60], None, 0, "unlabelled-samples")
    report = evaluate_samples(samples, real, None, reference_epochs=1, cache_dir=tmp_path,
                              inception_weights="unused.pt")
    assert report["classifier_fd"] is None and report["classifier_precision_recall"] is None
    assert report["classifiers"] == {} and math.isfinite(report["inception_fid"]) and report["inception_fid"] > 0
    assert "no labels" in report["skipped"]["classifier_fd"] and "no labels" in report["skipped"]["classifiers"]
    assert report[NON_PRIVATE_KEY] == ["samples_in_train", "inception_fid"]
    assert not tmp_path.exists() or not list(tmp_path.iterdir())   # no reference CNN trained
    # Labelled real data, unlabelled samples: the FD is there, the accuracies skipped with their reason.
    labelled = ImageData(train.x[:200], train.y[:200], 10, "labelled-real")
    report = evaluate_samples(samples, labelled, test, reference_epochs=1, cache_dir=tmp_path)
    assert report["classifiers"] == {} and report["skipped"] == {"classifiers": "the samples unlabelled-samples "
                                                                                "have no labels 'y'"}
    assert math.isfinite(report["classifier_fd"]["value"])


def test_evaluate_refuses_too_few_samples_before_training(digits, tmp_path):
    """4 samples failed only after every classifier and the reference CNN had trained."""
    train, test = digits
    with pytest.raises(DataError, match="holds 4 images; the evaluation needs at least 5"):
        evaluate_samples(ImageData(test.x[:4], test.y[:4], 10, "four"), train, test, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


# --- review mends (walk report): the test split, samples that are training images, the cache folder ----

def test_check_test_data_refuses_training_images_and_other_classes(digits):
    """`dpdm eval` took a test set made of training images, or of another class count, without a word."""
    from dpdm.evaluate import check_test_data

    train, test = digits
    assert check_test_data(train, test) == 0
    three = ImageData(torch.cat([train.x[:3], test.x[:100]]), torch.cat([train.y[:3], test.y[:100]]), 10, "three")
    assert check_test_data(train, three) == 3     # a few duplicates are counted, as the DP-SGD baseline does
    half = ImageData(torch.cat([train.x[:50], test.x[:50]]), torch.cat([train.y[:50], test.y[:50]]), 10, "half")
    with pytest.raises(DataError, match="50 of the 100 test images of 'half' are training images of 'digits-train'"):
        check_test_data(train, half)
    five = ImageData(test.x[:20], test.y[:20] % 5, 5, "five")     # a test split may lack classes
    assert check_test_data(train, five) == 0
    twelve = ImageData(test.x[:20], torch.arange(20) % 12, 12, "twelve")
    with pytest.raises(DataError, match="test data 'twelve' has labels up to 11 but training data 'digits-train' "
                                       "has 10 classes"):
        check_test_data(train, twelve)
    assert check_test_data(train, ImageData(test.x[:20], None, 0, "unlabelled")) == 0


def test_check_test_data_refuses_a_test_set_of_classes_the_training_data_lacks(digits):
    """h91 F2 (stop 47): training labels {3, 7} (8 classes, 6 without an image) and test labels {0, 1} were
    accepted without a word; every test image is of a class no classifier could learn."""
    from dpdm.evaluate import check_test_data

    train, test = digits
    gaps = ImageData(train.x[:40], torch.where(torch.arange(40) % 2 == 0, 3, 7), 8, "gaps")
    with pytest.raises(DataError, match="20 of the 20 test images of 'other' are of classes that training data "
                                        "'gaps' has no image of"):
        check_test_data(gaps, ImageData(test.x[:20], torch.arange(20) % 2, 2, "other"))
    mixed = ImageData(test.x[:20], torch.where(torch.arange(20) < 9, 0, 3), 4, "mixed")   # 9 of 20: kept
    assert check_test_data(gaps, mixed) == 0
    with pytest.raises(DataError, match="10 of the 20 test images of 'half'"):
        check_test_data(gaps, ImageData(test.x[:20], torch.where(torch.arange(20) < 10, 0, 3), 4, "half"))
    assert check_test_data(gaps, ImageData(test.x[:20], torch.where(torch.arange(20) < 10, 7, 3), 8, "same")) == 0


def test_evaluate_counts_test_images_and_samples_that_are_training_images(digits, tmp_path):
    from dpdm.evaluate import NON_PRIVATE_KEY

    train, test = digits
    train = ImageData(train.x[:300], train.y[:300], 10, "digits-300")
    copies = ImageData(train.x[:40], train.y[:40], 10, "copies")
    seen = []
    with pytest.raises(DataError, match="300 of the 300 test images"):
        evaluate_samples(copies, train, train, classifiers=("logreg",), cache_dir=tmp_path, progress=seen.append)
    assert not seen and not list(tmp_path.iterdir())   # refused before any training
    test3 = ImageData(torch.cat([train.x[:3], test.x[:60]]), torch.cat([train.y[:3], test.y[:60]]), 10, "test3")
    report = evaluate_samples(copies, train, test3, classifiers=(), reference_epochs=1, cache_dir=tmp_path)
    assert report["test_images_in_train"] == 3 and report["samples_in_train"] == 40
    assert {"test_images_in_train", "samples_in_train"} <= set(report[NON_PRIVATE_KEY])


def test_evaluate_refuses_a_cache_folder_it_cannot_create_before_training(digits, tmp_path):
    """`dpdm eval --cache-dir /proc/nope` trained every classifier, then failed with a FileNotFoundError traceback."""
    train, test = digits
    (tmp_path / "file").write_text("in the way")
    seen = []
    with pytest.raises(ValueError, match=r"cannot create the cache folder '.*file/cache/reference'"):
        evaluate_samples(ImageData(test.x[:40], test.y[:40], 10, "samples"), train, test, classifiers=("logreg",),
                         epochs=1, cache_dir=tmp_path / "file" / "cache", progress=seen.append)
    assert not seen   # nothing trained


def test_test_folder_without_a_class_is_labelled_by_class_name(tmp_path):
    """A folder dataset numbers its classes by their sorted names: a test folder that lacked `ant` labelled
    its `bee` images 0, which is `ant` for the training data and the samples."""
    from PIL import Image

    from dpdm.evaluate import match_test_classes

    def folder(name, classes):
        for k, cls in enumerate(classes):
            (tmp_path / name / cls).mkdir(parents=True)
            for i in range(2):
                image = Image.fromarray(np.full((4, 4), 40 * k + i, np.uint8), mode="L")
                image.save(tmp_path / name / cls / f"{i}.png")
        return load_dataset(f"folder:{tmp_path / name}")

    train = folder("train", ["ant", "bee", "cat"])
    test = folder("test", ["bee", "cat"])
    assert test.class_names == ("bee", "cat") and test.y.tolist() == [0, 0, 1, 1]
    matched = match_test_classes(train, test)
    assert matched.y.tolist() == [1, 1, 2, 2] and matched.num_classes == 3
    assert matched.class_names == train.class_names and matched.x is test.x
    assert match_test_classes(train, train) is train
    unnamed_train = ImageData(train.x, train.y, 3, "npz")   # no class names on either side: matched by number
    unnamed = ImageData(test.x, test.y + 1, 3, "npz")
    assert match_test_classes(unnamed_train, unnamed) is unnamed
    no_last = ImageData(test.x, test.y, 2, "npz")    # an npz split without the last class infers 2 classes
    assert match_test_classes(unnamed_train, no_last).num_classes == 3
    beyond = ImageData(test.x, test.y + 2, 4, "npz")  # left for check_test_data to refuse
    assert match_test_classes(unnamed_train, beyond) is beyond
    with pytest.raises(DataError, match="test data .* has class 'dog', which training data .* has not"):
        match_test_classes(train, folder("other", ["ant", "dog"]))


def test_numbered_class_folders_match_unnamed_labels_by_their_numbers(tmp_path):
    """Where one side had class names and the other none (a ``folder:`` test set against mnist5k or an npz, or
    the reverse), the folder's labels were its sorted-name positions: folders 0..11 labelled '10' as 2 and '2'
    as 4, and one without '3' labelled '4' as 3, silently (test accuracies of 0.26 instead of 0.59). Folders
    named by number are matched as those numbers; other names cannot be matched to numbers and are refused."""
    from PIL import Image

    from dpdm.evaluate import match_test_classes

    def folder(name, classes):   # class c's images are grey 20 * c: the true class can be read off the pixels
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((4, 4), 20 * int(c) if c.isdigit() else 0, np.uint8), mode="L").save(
                    tmp_path / name / c / f"{i}.png")
        return load_dataset(f"folder:{tmp_path / name}")

    def true_class(data):
        return torch.round((data.x[:, 0, 0, 0] + 1) * 127.5 / 20).long()

    numbers = ImageData(torch.zeros(24, 1, 4, 4), torch.arange(24) % 12, 12, "npz:train")   # labels 0..11
    twelve = folder("t12", [str(c) for c in range(12)])
    assert twelve.class_names[:4] == ("0", "1", "10", "11")   # sorted by name
    matched = match_test_classes(numbers, twelve)
    assert matched.y.tolist() == true_class(twelve).tolist() and matched.num_classes == 12
    assert matched.class_names is None and matched.x is twelve.x
    nine = folder("t9", [str(c) for c in range(10) if c != 3])   # lacks '3'
    matched = match_test_classes(ImageData(numbers.x[:20], numbers.y[:20] % 10, 10, "mnist5k"), nine)
    assert matched.y.tolist() == true_class(nine).tolist() and matched.num_classes == 10
    assert 3 not in matched.y.tolist()
    padded = folder("t07", ["00", "07", "11"])   # leading zeros: still the numbers
    assert match_test_classes(numbers, padded).y.tolist() == true_class(padded).tolist()
    with pytest.raises(DataError, match=r"test data .* has class '12', which training data 'npz:train' has not "
                                        r"\(labels 0 to 11\)"):
        match_test_classes(numbers, folder("t13", ["0", "12"]))
    with pytest.raises(DataError, match=r"test data '.*named' names its classes \(ant, bee\) but training data "
                                        r"'npz:train' numbers them, so the labels cannot be matched"):
        match_test_classes(numbers, folder("named", ["ant", "bee"]))
    # The reverse: training folders named 0..11 (labels = sorted-name positions), unnamed test labels 0..11.
    train = folder("train12", [str(c) for c in range(12)])
    test = ImageData(train.x, true_class(train), 12, "npz:test")   # the label is the folder's number
    matched = match_test_classes(train, test)
    assert matched.y.tolist() == train.y.tolist() and matched.class_names == train.class_names
    assert [train.class_names[v] for v in matched.y.tolist()] == [str(v) for v in test.y.tolist()]
    with pytest.raises(DataError, match="test data 'npz:few' has label 5, which training data .* has no class "
                                        "folder for"):
        match_test_classes(folder("train3", ["0", "1", "2"]), ImageData(test.x[:3], torch.tensor([0, 1, 5]), 6,
                                                                       "npz:few"))
    with pytest.raises(DataError, match=r"training data '.*named2' names its classes \(ant, bee\) but test data "
                                        "'npz:test' numbers them"):
        match_test_classes(folder("named2", ["ant", "bee"]), ImageData(test.x[:4], test.y[:4] % 2, 2, "npz:test"))


def test_public_class_folders_must_be_named_as_the_private_ones():
    """Public data was matched to the private classes by number only: a public folder ('dog', 'wolf') against
    private ('cat', 'dog') was accepted, and eval and the DP baseline pretrained on dogs labelled cat. Test data
    is renumbered by name (`match_test_classes`); public data with other names is refused."""
    from dpdm.evaluate import check_public_data

    def data(name, classes, seed):
        x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return ImageData(x, torch.arange(6) % 2, 2, name, class_names=classes)

    private = data("folder:private", ("cat", "dog"), 1)
    with pytest.raises(DataError, match=r"has classes dog, wolf, but 'folder:private' has cat, dog; their class "
                                        "folders must be named alike"):
        check_public_data(data("folder:public", ("dog", "wolf"), 2), private)
    check_public_data(data("folder:public", ("cat", "dog"), 3), private)
    # One side unnamed (stop 45): folder names must be the label numbers in order; matching words, or numbers sorted
    # as text (10 before 2), by position mislabelled the public images without a word.
    with pytest.raises(DataError, match=r"private data 'folder:private' has class folders cat, dog, sorted by name, "
                                        r"but 'npz:public' numbers its classes, so the labels cannot be matched"):
        check_public_data(data("npz:public", None, 4), private)
    check_public_data(data("npz:public", None, 4), data("folder:private", ("0", "1"), 5))
    check_public_data(data("folder:public", ("00", "01"), 6), data("npz:private", None, 7))
    unlabelled = ImageData(data("npz:private", None, 10).x, None, 0, "npz:private")   # h82 F1: not a naming problem
    assert class_names_problem(data("folder:public", ("cat", "dog"), 11), unlabelled) is None
    for names in (("1", "2"), ("1", "0"), ("0", "x")):
        with pytest.raises(DataError, match="public data 'folder:public' has class folders"):
            check_public_data(data("folder:public", names, 8), data("npz:private", None, 9))


# --- review mends (s41): test images among the samples, the cache tied to its weights, tiny images -------------

def test_evaluate_counts_and_refuses_samples_that_are_test_images(digits, tmp_path):
    """F1: the held-out test images given as samples scored a training-set accuracy without a word."""
    from dpdm.evaluate import NON_PRIVATE_KEY

    train, test = digits
    train = ImageData(train.x[:300], train.y[:300], 10, "digits-300")
    test = ImageData(test.x[:100], test.y[:100], 10, "test-100")
    seen = []
    with pytest.raises(DataError, match="50 of the 100 test images of 'test-100' are among the samples"):
        evaluate_samples(ImageData(test.x[:50], test.y[:50], 10, "half"), train, test, classifiers=("logreg",),
                         epochs=1, cache_dir=tmp_path, progress=seen.append)
    assert not seen and not list(tmp_path.iterdir())   # refused before any training
    # A few are counted (samples that are test images), as check_test_data counts test images in training data.
    few = ImageData(torch.cat([train.x[:40], test.x[:3]]), torch.cat([train.y[:40], test.y[:3]]), 10, "few")
    report = evaluate_samples(few, train, test, classifiers=("logreg",), epochs=1, reference_epochs=1,
                              cache_dir=tmp_path)
    assert report["samples_in_test"] == 3 and "samples_in_test" not in report[NON_PRIVATE_KEY]
    from dpdm.evaluate import check_samples_held_out

    assert check_samples_held_out(few, test) == 3
    # Without accuracies the test images are a fair "real data" point for the FD: counted, not refused.
    report = evaluate_samples(test, train, test, classifiers=(), reference_epochs=1, cache_dir=tmp_path)
    assert report["samples_in_test"] == 100
    assert evaluate_samples(few, train, None, classifiers=(), reference_epochs=1,
                            cache_dir=tmp_path)["samples_in_test"] is None


def test_reference_cache_entry_is_tied_to_its_weights_and_data(digits, tmp_path):
    """F2: zeroed weights under an intact record (or another dataset's entry copied under the key) were used:
    classifier FD 0, precision and recall 1."""
    train, test = digits
    a = ImageData(train.x[:200], train.y[:200], 10, "digits")
    b = ImageData(train.x[200:400], train.y[200:400], 10, "digits")   # same name and shape, other images
    ref, info = reference_classifier(a, cache_dir=tmp_path, epochs=1)
    cache = Path(info["cache"])
    torch.save({k: torch.zeros_like(v) for k, v in ref.state_dict().items()}, cache)
    ref2, info2 = reference_classifier(a, cache_dir=tmp_path, epochs=1)
    assert info2["cached"] is False
    for p, q in zip(ref.parameters(), ref2.parameters()):
        torch.testing.assert_close(p, q)
    assert reference_classifier(a, cache_dir=tmp_path, epochs=1)[1]["cached"] is True
    # b's entry, record and all, copied under a's key.
    info_b = reference_classifier(b, cache_dir=tmp_path, epochs=1)[1]
    for suffix in (".pt", ".json"):
        cache.with_suffix(suffix).write_bytes(Path(info_b["cache"]).with_suffix(suffix).read_bytes())
    ref3, info3 = reference_classifier(a, cache_dir=tmp_path, epochs=1)
    assert info3["cached"] is False
    for p, q in zip(ref.parameters(), ref3.parameters()):
        torch.testing.assert_close(p, q)
    assert "weights_sha256" not in info3   # a fingerprint of the data: never in a report
    assert "weights_sha256" in json.loads(cache.with_suffix(".json").read_text())
    # Figures edited within their range, weights untouched: a real_val_accuracy of 0.99 for 0.19 was reported as
    # measured ("cached": true). The record's sha256 covers its figures: the entry is trained again.
    record = json.loads(cache.with_suffix(".json").read_text())
    for meta in ({**record, "real_val_accuracy": 0.5 if record["real_val_accuracy"] == 0.99 else 0.99},
                 {**record, "best_epoch": 0}):
        assert meta != record
        cache.with_suffix(".json").write_text(json.dumps(meta))
        ref4, info4 = reference_classifier(a, cache_dir=tmp_path, epochs=1)
        assert info4["cached"] is False and json.loads(cache.with_suffix(".json").read_text()) == record
        assert {k: info4[k] for k in ("real_val_accuracy", "best_epoch")} == \
            {k: record[k] for k in ("real_val_accuracy", "best_epoch")}
    info5 = reference_classifier(a, cache_dir=tmp_path, epochs=1)[1]
    assert info5["cached"] is True and info5["real_val_accuracy"] == record["real_val_accuracy"]


def test_a_reference_cache_entry_with_a_compressed_record_is_refused_unread(digits, tmp_path, monkeypatch):
    """The cached weights were torch.load'ed before anything checked them: a 1.5 MB entry with a DEFLATE-compressed
    record of zeros inflated to 600 MB before its sha256 binding refused it (h112 F3). It goes through the
    checkpoints' `damaged_record` first, and a file larger than a reference CNN of this shape is not read: either
    is trained again without torch.load being called."""
    import zipfile

    import dpdm.evaluate as evaluate

    train, _ = digits
    data = ImageData(train.x[:100], train.y[:100], 10, "d100")
    entry = Path(reference_classifier(data, cache_dir=tmp_path, epochs=1)[1]["cache"])
    intact = entry.read_bytes()
    with zipfile.ZipFile(entry) as src:
        records = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(entry, "w", compression=zipfile.ZIP_DEFLATED) as dst:   # the same tensors, deflated
        for filename, content in records:
            dst.writestr(filename, content)
    real_load = torch.load

    def refused(*args, **kwargs):
        raise AssertionError("torch.load was called on a cache entry that should be refused unread")

    for damage in ("compressed", "too large"):
        if damage == "too large":
            entry.write_bytes(intact + b"\0" * evaluate._reference_file_limit(CNN(1, (8, 8), 10)))
        monkeypatch.setattr(torch, "load", refused)
        info = reference_classifier(data, cache_dir=tmp_path, epochs=1)[1]
        assert info["cached"] is False
        monkeypatch.setattr(torch, "load", real_load)
        assert entry.read_bytes() == intact   # written again, and read as it was
        assert reference_classifier(data, cache_dir=tmp_path, epochs=1)[1]["cached"] is True


def test_reference_cache_folder_and_entries_are_private(digits, tmp_path):
    """F5: an existing reference/ folder kept its mode (0755), and entries were written 0644."""
    import os

    train, _ = digits
    folder = tmp_path / "reference"
    folder.mkdir()
    os.chmod(folder, 0o755)
    reference_classifier(ImageData(train.x[:100], train.y[:100], 10, "d100"), cache_dir=tmp_path, epochs=1)
    assert folder.stat().st_mode & 0o777 == 0o700
    entries = list(folder.iterdir())
    assert len(entries) == 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in entries)
    # Its owner's own bits stay: a folder made read-only (0500) was made 0700 and written to (h104 F2, stop 49).
    os.chmod(folder, 0o550)
    reference_classifier(ImageData(train.x[:100], train.y[:100], 10, "d100"), cache_dir=tmp_path, epochs=1)
    assert folder.stat().st_mode & 0o777 == 0o500
    os.chmod(folder, 0o700)


def test_a_cache_folder_this_user_cannot_enter_is_refused_before_any_training(tmp_path, monkeypatch):
    """A reference/ folder that exists but that this user may not read or enter (another user's 0700 folder in a
    shared DPDM_CACHE) passed as a read-only cache: the downstream classifiers trained, then `dpdm eval` stopped with
    a permission error naming the entry, whose name is a digest of the data (h104 F1, stop 49). A readable one is
    used as it is."""
    import os

    from dpdm import evaluate

    (tmp_path / "reference").mkdir()
    assert cache_folder_problem(tmp_path, read_only_ok=True) == (tmp_path, None)
    monkeypatch.setattr(evaluate.os, "access", lambda path, mode, **kw: False)   # as another user (tests run as root)
    folder, problem = cache_folder_problem(tmp_path, read_only_ok=True)
    assert folder == tmp_path and problem is not None and "reference" in problem


def test_cnn_refuses_images_under_4x4(digits, tmp_path):
    """F4: 3x3 images crashed eval and the baseline deep inside the CNN ("Calculated output size: (64x0x0)")."""
    with pytest.raises(ValueError, match="the CNN needs images of at least 4x4 pixels, not 3x8"):
        CNN(1, (3, 8), 10)
    assert CNN(1, 4, 10, dropout=0.0, group_norm=True)(torch.zeros(2, 1, 4, 4)).shape == (2, 10)
    train, test = digits
    small = [ImageData(d.x[:60, :, :3, :3], d.y[:60], 10, n) for d, n in ((train, "tr3"), (test, "te3"))]
    seen = []
    with pytest.raises(DataError, match="tr3: the images are 3x3 pixels, and the reference CNN"):
        evaluate_samples(small[0], small[0], small[1], classifiers=("logreg",), epochs=1, cache_dir=tmp_path,
                         progress=seen.append)
    assert not seen and not list(tmp_path.iterdir())   # before any training
    from dpdm.evaluate import cnn_size_problem

    assert cnn_size_problem((1, 3, 3), {"classifier_fd": "no labels"}, ("logreg", "mlp")) is None
    assert "the downstream classifier 'cnn' needs at least 4x4" in \
        cnn_size_problem((1, 3, 3), {"classifier_fd": "no labels"}, ("cnn",))


def test_load_inception_refuses_non_finite_weights(tmp_path):
    """F3: NaN or inf Inception weights failed only at the end of eval with "Eigenvalues did not converge"."""
    nan = tmp_path / "nan.pt"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.tensor([1.0, float("nan")]),
                "Conv2d_1a_3x3.bn.bias": torch.tensor([float("inf")]), "steps": torch.tensor(3)}, nan)
    with pytest.raises(ValueError, match=r"--inception-weights='.*nan.pt' holds non-finite weights \(NaN or inf, "
                                         r"in 2 tensors\)"):
        load_inception(nan)


def test_load_inception_refuses_a_flipped_bit_in_a_weight(tmp_path):
    """torch.load checks no CRC-32: a damaged weights file loaded as other weights (as checkpoints did)."""
    from tests.dpdm.test_checkpoint_integrity import flip_weight_bit

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.ones(64)}, good)
    record = flip_weight_bit(good, bad)
    assert torch.load(bad, weights_only=True)["Conv2d_1a_3x3.conv.weight"][0] != 1   # torch alone loads it
    with pytest.raises(ValueError, match=rf"--inception-weights='.*bad.pt' is corrupt or truncated: its record "
                                         rf"{re.escape(record)} is damaged"):
        load_inception(bad)


def test_public_data_is_unused_and_unreported_without_accuracies(digits, tmp_path):
    """F8 (a): unlabelled samples reported "public_pretrain" although no classifier trained on it."""
    full, test = digits
    train = ImageData(full.x[:200], full.y[:200], 10, "digits-200")
    public = ImageData(full.x[200:300], full.y[200:300], 10, "public")
    report = evaluate_samples(ImageData(test.x[:40], None, 0, "unlabelled"), train, test, classifiers=("logreg",),
                              reference_epochs=1, cache_dir=tmp_path, public=public)
    assert report["public_pretrain"] is None and report["classifiers"] == {}


# --- guards on the protocol and the floor ------------------------------------------------------------

def test_downstream_accuracy_selects_on_the_synthetic_split_only(digits, monkeypatch):
    """The paper's protocol: the real test split never influences training or selection. Selecting on it passed
    every test; here fit_classifier must see the seeded 90/10 split of the samples, and never a real test image."""
    import dpdm.evaluate as evaluate

    train, test = digits
    samples = ImageData(train.x[:500], train.y[:500], 10, "samples")
    seen = []
    real = evaluate.fit_classifier

    def spy(model, train_x, train_y, val_x, val_y, **kw):
        seen.append((train_x, train_y, val_x, val_y))
        return real(model, train_x, train_y, val_x, val_y, **kw)

    monkeypatch.setattr(evaluate, "fit_classifier", spy)
    downstream_accuracy(samples, test, kind="logreg", epochs=1, seed=5)
    tr, val = evaluate._split(len(samples), 0.1, 5)
    assert len(seen) == 1 and len(val) == 50
    train_x, train_y, val_x, val_y = seen[0]
    assert torch.equal(val_x, samples.x[val]) and torch.equal(val_y, samples.y[val])
    assert torch.equal(train_x, samples.x[tr]) and torch.equal(train_y, samples.y[tr])
    assert not (set(map(bytes, test.x.numpy())) & set(map(bytes, torch.cat([train_x, val_x]).numpy())))


def test_fit_classifier_keeps_the_best_epoch_not_the_last():
    """A model whose validation accuracy peaks early (epoch 3 of 12) must come back with that epoch's weights:
    `test_fit_classifier_restores_best_epoch` peaked at its last epoch, so dropping the restore passed it.

    One trainable bias b against a fixed feature f: logits (f + b, 0). Every training label is 0, so Adam raises b
    by about lr each epoch (one full batch). Validation: f = -0.6 (label 0: right once b > 0.6), f = -1.6 and -2.6
    (label 1: right while b < 1.6, 2.6): accuracy 2/3, then 3/3 from b ~ 0.75, then 2/3, then 1/3 at b ~ 3."""

    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            f = x.flatten(1)[:, 0]
            return torch.stack([f + self.b, torch.zeros_like(f)], 1)

    model = Bias()
    train_x, train_y = torch.zeros(8, 1, 1, 1), torch.zeros(8, dtype=torch.int64)
    val_x, val_y = torch.tensor([-0.6, -1.6, -2.6]).view(3, 1, 1, 1), torch.tensor([0, 1, 1])
    best_epoch, best_acc = fit_classifier(model, train_x, train_y, val_x, val_y, epochs=12, lr=0.25)
    assert best_acc == 1.0 and 1 < best_epoch < 12, (best_epoch, best_acc)
    assert accuracy(model, val_x, val_y) == best_acc
    assert 0.6 < float(model.b.detach()) < 1.6


def test_fd_floor_is_the_test_split_at_the_samples_size(digits, tmp_path):
    """The floor is real test vs real train, on as many test images as there are samples (a seeded subsample of
    the split when fewer, the whole split otherwise): the FD grows as n shrinks, and 20 real held-out digits
    scored many times a floor measured on all the test split. Computed from the samples, it equalled the FD."""
    train, test = digits
    g = torch.Generator().manual_seed(1)
    for n in (100, 700):   # fewer samples than the 597 test images, and more
        noise = ImageData(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, None, 0, "noise")
        report = evaluate_samples(noise, train, test, classifiers=(), reference_epochs=2, cache_dir=tmp_path, seed=3)
        ref, info = reference_classifier(train, cache_dir=tmp_path, epochs=2, seed=3)
        assert info["cached"] is True
        floor_test = test if n >= len(test) else ImageData(
            *(t[torch.randperm(len(test), generator=torch.Generator().manual_seed(3))[:n]] for t in (test.x, test.y)),
            10, "sub")
        fd = report["classifier_fd"]
        assert fd["n"] == n and fd["real_test_n"] == min(n, len(test)), fd
        assert fd["real_test_value"] == pytest.approx(classifier_fd(floor_test, train, ref), rel=1e-9)
        assert fd["value"] > 5 * fd["real_test_value"], fd   # noise is far from real digits; the floor is not


def test_default_cache_dir_treats_an_empty_dpdm_cache_as_unset(monkeypatch, tmp_path):
    """`DPDM_CACHE=` (how a script unsets it) was Path(""), the current folder: the private reference CNN and
    a fingerprint of the data in its name landed wherever eval ran."""
    from dpdm.evaluate import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DPDM_CACHE", "")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dpdm"
    monkeypatch.delenv("DPDM_CACHE")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dpdm"
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


def test_label_counts_problem_names_a_missing_class_or_one_far_from_its_share():
    """h90 F5: a class-collapsed set scored a higher recall than a balanced one, and eval said nothing. The
    counts are compared with uniform: a missing class, or one under half / over twice its share by more than 4
    standard deviations of a uniform draw."""
    from dpdm.evaluate import label_counts_problem

    assert label_counts_problem([1000] * 10) is None
    assert label_counts_problem([5421, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]) is None   # MNIST's
    assert label_counts_problem([9, 2, 7, 5, 3, 6, 4, 8, 1, 5]) is None   # 50 samples: chance, not collapse
    assert label_counts_problem([40, 40, 40, 0, 40]) == "1 of the 5 classes has no sample (class 3)"
    assert label_counts_problem([0, 5, 0, 5]) == "2 of the 4 classes have no sample (classes 0, 2)"
    assert label_counts_problem([360] + [4] * 9) == ("the label counts are far from uniform: class 0 holds 360 of "
                                                     "the 396 samples, against a uniform share of 39.6")
    assert label_counts_problem([178] + [6] * 9) is not None      # 77% one class, n = 232
    assert label_counts_problem([5]) is None and label_counts_problem([0, 0]) is None


def test_samples_near_train_counts_disguised_copies_of_training_images(digits, tmp_path):
    """h90 F4: `dpdm eval` counted only byte-exact copies of training images; brightened, noised or shifted ones
    passed unremarked. Images under 16 pixels a side are left to the exact count (None)."""
    from dpdm.evaluate import NON_PRIVATE_KEY, samples_near_train

    d = load_dataset("mnist5k", "train")
    t = load_dataset("mnist5k", "test")
    perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))[:400]
    train = ImageData(d.x[perm], d.y[perm], 10, "mnist-400")
    ink = train.x[:10] > -1
    bright = torch.where(ink, (train.x[:10] + 2 / 255).clamp(max=1), train.x[:10])   # one grey level up
    moved = torch.roll(train.x[10:20], 1, dims=-1)
    samples = ImageData(torch.cat([t.x[:30], bright, moved, train.x[20:22]]),
                        torch.cat([t.y[:30], train.y[:22]]), 10, "samples")
    assert samples_near_train(samples, train) == 22   # 20 disguised and 2 exact copies; none of the test images
    assert samples_near_train(ImageData(t.x[:30], t.y[:30], 10, "held-out"), train) == 0
    small_train, small_test = digits
    assert samples_near_train(small_test, small_train) is None
    report = evaluate_samples(samples, train, None, classifiers=(), reference_epochs=1, cache_dir=tmp_path)
    assert report["samples_in_train"] == 2 and report["samples_near_train"] == 22
    assert "samples_near_train" in report[NON_PRIVATE_KEY]
    assert report["samples_label_counts"] == samples.y.bincount(minlength=10).tolist()


def test_label_counts_problem_judges_only_the_classes_the_training_data_has():
    """h93 F4: an npz labelled {3, 7} has 8 classes; samples kept to those two were said to lack the other 6."""
    from dpdm.evaluate import label_counts_problem

    kept = [0, 0, 0, 8, 0, 0, 0, 8]
    assert label_counts_problem(kept) == "6 of the 8 classes have no sample (classes 0, 1, 2, 4, 5, 6)"
    assert label_counts_problem(kept, [3, 7]) is None
    assert label_counts_problem([0, 0, 0, 8, 0, 0, 0, 0], [3, 7]) == ("1 of the 2 classes with training images has "
                                                                     "no sample (class 7)")
    assert label_counts_problem([4, 4, 4, 300, 4, 20, 4, 20], [3, 5, 7]) == (
        "the label counts are far from uniform: class 3 holds 300 of the 340 samples of the 3 classes with training "
        "images, against a uniform share of 113.3")
    assert label_counts_problem([8] * 8, list(range(8))) is None and label_counts_problem([0, 8], [1]) is None


def test_near_copies_above_floor_is_a_one_sided_binomial_test_against_the_test_images_rate():
    """h93 F2: 31 of 500 real held-out digits28 images were warned about as a leaking generator's near-copies,
    while 35 of 397 real test images are as near. Without a floor, or with a floor of 0, every near-copy counts."""
    from scipy.stats import binom

    from dpdm.evaluate import NEAR_COPY_ALPHA, near_copies_above_floor

    assert near_copies_above_floor(1, 1000, None, None) and near_copies_above_floor(1, 1000, 0, 1000)
    assert not near_copies_above_floor(0, 1000, 0, 1000) and not near_copies_above_floor(0, 1000, None, None)
    assert not near_copies_above_floor(31, 500, 35, 397)                 # real images against real images
    assert near_copies_above_floor(131, 500, 35, 397)                    # 100 copies more
    first = next(k for k in range(500) if near_copies_above_floor(k, 500, 35, 397))
    assert binom.sf(first - 1, 500, 35 / 397) < NEAR_COPY_ALPHA <= binom.sf(first - 2, 500, 35 / 397)


# --- stop 49 mends (h102 F2): a cache entry that cannot be written ---------------------------------

def test_a_reference_cache_entry_that_cannot_be_written_keeps_the_evaluation(digits, tmp_path):
    """A full disk or a folder in the way of the entry's record ended `dpdm eval` (exit 4, nothing printed) after
    all the training, and left the partial temporary file, which no later run removed (its name holds the pid).
    The write is best-effort: one warning line naming the folder only, "cached" false, no file of the entry left;
    and the leftovers of killed runs older than an hour go with the next write."""
    import os
    import time

    from dpdm.evaluate import _atomic_write

    train, test = digits
    train = ImageData(train.x[:300], train.y[:300], 10, "digits-300")
    _, info = reference_classifier(train, cache_dir=tmp_path, epochs=1)
    entry, folder = Path(info["cache"]), tmp_path / "reference"
    entry.unlink()
    entry.with_suffix(".json").unlink()
    entry.with_suffix(".json").mkdir()   # in the way of the record: the rename fails (IsADirectoryError)
    stale, fresh = folder / f".{entry.name}.12345.tmp", folder / ".other-v2.json.12346.tmp"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"part of a killed run's entry")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with pytest.warns(RuntimeWarning, match="could not cache the reference CNN in"):   # no `warn`: a Python warning
        assert reference_classifier(train, cache_dir=tmp_path, epochs=1)[1]["cached"] is False
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry.with_suffix(".json").name, fresh.name])
    seen = []
    samples = ImageData(test.x[:40], test.y[:40], 10, "samples")
    report = evaluate_samples(samples, train, test, classifiers=(), reference_epochs=1, cache_dir=tmp_path,
                              warn=seen.append)
    assert report["classifier_fd"]["reference"]["cached"] is False and report["classifier_fd"]["value"] >= 0
    assert seen == [f"could not cache the reference CNN in {str(folder)!r} (Is a directory); it is used for this "
                    "run only and trained again next time"]
    # A write that fails part of the way (ENOSPC) removes its temporary file.
    import errno

    def fill(f):
        f.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _atomic_write(folder / "x.pt", fill)
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry.with_suffix(".json").name, fresh.name])


# --- mut52 (stop 51): the reference cache's entries read as weights, its info without the record's hash --------

def test_a_reference_cache_entry_is_read_with_weights_only(tmp_path):
    """The reference CNN's cache entry is read with torch.load(weights_only=True) before its record is checked: a
    code-running pickle in its place (a shared or copied cache) is refused without running and the CNN is trained
    again (mut52 d20: weights_only=False ran it; the cache tests use entries dpdm wrote or altered tensors)."""
    import dpdm.evaluate as ev

    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.arange(40) % 2, 2, "tiny")
    key = f"tiny-{ev._digest(data)[:16]}-e1-s0-v{ev._REFERENCE_VERSION}"
    folder = tmp_path / "reference"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save(RunsCodeWhenUnpickled(marker), folder / f"{key}.pt")
    (folder / f"{key}.json").write_text(
        '{"real_val_accuracy": 1.0, "best_epoch": 1, "epochs": 1, "weights_sha256": "x"}')
    _, info = reference_classifier(data, cache_dir=tmp_path, epochs=1)
    assert not marker.exists() and info["cached"] is False


def test_a_cached_reference_gives_no_record_fingerprint(tmp_path):
    """The record's weights_sha256 hashes the full data digest: a cached entry's info (copied into the report as
    classifier_fd.reference) leaves it out, as a freshly trained one never has it (mut52 d39: the filter dropped)."""
    g = torch.Generator().manual_seed(1)
    data = ImageData(torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.arange(40) % 2, 2, "tiny")
    _, fresh = reference_classifier(data, cache_dir=tmp_path, epochs=1)
    _, cached = reference_classifier(data, cache_dir=tmp_path, epochs=1)
    assert (fresh["cached"], cached["cached"]) == (False, True)
    assert set(cached) == set(fresh) and "weights_sha256" not in cached


def test_a_reference_cache_entry_of_non_finite_weights_is_trained_again_whatever_its_record(digits, tmp_path):
    """NaN weights made every later eval fail with "Eigenvalues did not converge". The one test of them left the
    record's sha256 as it was, so the sha check refused them first and the finiteness check went untested (mut53
    d23): here the record binds the NaN weights, as a reference whose training diverged would have written it."""
    from dpdm.evaluate import _digest, _weights_sha256

    train = ImageData(digits[0].x[:200], digits[0].y[:200], 10, "digits-200")
    ref, info = reference_classifier(train, cache_dir=tmp_path, epochs=1)
    cache = Path(info["cache"])
    record = json.loads(cache.with_suffix(".json").read_text())
    torch.save({k: v * float("nan") if v.is_floating_point() else v for k, v in ref.state_dict().items()}, cache)
    cache.with_suffix(".json").write_text(json.dumps(
        {**record, "weights_sha256": _weights_sha256(_digest(train), record, cache.read_bytes())}))
    ref2, info2 = reference_classifier(train, cache_dir=tmp_path, epochs=1)
    assert info2["cached"] is False and json.loads(cache.with_suffix(".json").read_text()) == record
    assert all(bool(torch.isfinite(p).all()) for p in ref2.parameters())


# --- stop 53 mends (h132) ------------------------------------------------------------------------

def test_public_data_for_unlabelled_training_data_takes_the_test_splits_classes(digits):
    """h132 N2: against unlabelled training data (0 classes), labelled public data was refused as not having
    "0 classes, like" the training data; its classes are the labelled test split's."""
    from dpdm.evaluate import check_public_data

    train, test = digits
    unlabelled = ImageData(train.x[:300], None, 0, "unlabelled")
    public = ImageData(train.x[300:400], train.y[300:400], 10, "public")
    check_public_data(public, unlabelled, test)
    with pytest.raises(DataError, match=r"^public data 'five' must be labelled, of shape 1x8x8 and 10 classes, like "
                                        r"'digits-test'$"):
        check_public_data(ImageData(public.x, public.y % 5, 5, "five"), unlabelled, test)


def test_a_test_set_of_training_images_is_refused_for_what_it_would_measure(digits):
    """h132 N5: without labels the test images serve no accuracy (the floors only), yet their refusal said "the test
    accuracy must come from held-out images"."""
    from dpdm.evaluate import check_test_data

    train, _ = digits
    copy = ImageData(train.x[:100], None, 0, "copy")
    with pytest.raises(DataError, match=r"are training images of 'digits-train'; what is measured on the test images "
                                        r"must come from held-out images$"):
        check_test_data(train, copy)
    with pytest.raises(DataError, match=r"; the test accuracy must come from held-out images$"):
        check_test_data(train, ImageData(train.x[:100], train.y[:100], 10, "copy"))


def test_a_reference_cache_record_larger_than_the_references_is_not_read(digits, tmp_path, monkeypatch):
    """h132 N7: the weight file is size-bounded before it is read (h112 F3), its .json record was read whole."""
    train, _ = digits
    a = ImageData(train.x[:200], train.y[:200], 10, "digits")
    info = reference_classifier(a, cache_dir=tmp_path, epochs=1)[1]
    record = Path(info["cache"]).with_suffix(".json")
    record.write_text(record.read_text() + " " * 5000)   # still the same JSON, the size of no record
    assert reference_classifier(a, cache_dir=tmp_path, epochs=1)[1]["cached"] is False
    assert len(record.read_bytes()) < 1000   # written again
    assert reference_classifier(a, cache_dir=tmp_path, epochs=1)[1]["cached"] is True


def test_evaluate_samples_refuses_samples_of_a_model_with_another_class_count():
    """evaluate_samples measured a 3-class model's samples against 4-class data with shifted labels (h144 F3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    real = ImageData(x, torch.arange(40) % 4, 4, "folder:real", num_classes_inferred=True)
    samples = ImageData(x.flip(-1), torch.arange(40) % 3, 3, "s.npz")
    with pytest.raises(DataError, match=r"^s\.npz: their model has 3 classes but folder:real has 4, so"):
        evaluate_samples(samples, real, None, classifiers=())
    assert samples_classes_problem(ImageData(x, samples.y, 4, "s.npz"), real) is None
    # a count read off the samples' own labels (an npz without num_classes) is not their model's
    assert samples_classes_problem(ImageData(x, samples.y, 3, "s.npz", num_classes_inferred=True), real) is None
