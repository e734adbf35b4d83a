"""The accuracy `downstream_accuracy` and the DP-SGD baseline report is measured on the real test split, with the
learning rates their docs give (stop 45, mut45 ACC1, ACC3, BL5, BL6).

- downstream_accuracy: "The number reported is that model's accuracy on the real held-out test split"; Adam at
  lr 3e-4 (the paper's), batch 128.
- train_dp_classifier: "test_accuracy" on `test`, after training with Adam at the `lr` given.
Reporting the synthetic validation accuracy, or the baseline's training accuracy, under "test_accuracy", and
ignoring the baseline's lr, are what these pin."""
import pytest
import torch

import accounting
import dpdm.baseline as baseline
import dpdm.evaluate as evaluate
from dpdm.datasets import ImageData, load_dataset


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:600], perm[600:900]
    return ImageData(d.x[tr], d.y[tr], 10, "digits-train"), ImageData(d.x[te], d.y[te], 10, "digits-test")


class _Spies:
    def __init__(self, monkeypatch, module):
        self.acc, self.lrs = [], []
        real_acc, real_adam = module.accuracy, torch.optim.Adam
        spies = self

        def acc(model, x, y, **kw):
            out = real_acc(model, x, y, **kw)
            spies.acc.append((x, y, out))
            return out

        class Adam(real_adam):
            def __init__(self, params, lr=1e-3, **kw):
                spies.lrs.append(lr)
                super().__init__(params, lr=lr, **kw)

        monkeypatch.setattr(module, "accuracy", acc)
        monkeypatch.setattr(torch.optim, "Adam", Adam)


def test_downstream_accuracy_reports_the_real_test_split(digits, monkeypatch):
    train, test = digits
    samples = ImageData(train.x[:300], train.y[:300], 10, "samples")
    spies = _Spies(monkeypatch, evaluate)
    r = evaluate.downstream_accuracy(samples, test, kind="logreg", epochs=3, seed=1)
    x, y, value = spies.acc[-1]
    assert torch.equal(x, test.x) and torch.equal(y, test.y)
    assert r["test_accuracy"] == value
    assert spies.lrs == [3e-4]   # one Adam, at the paper's learning rate


def test_dp_baseline_reports_the_real_test_split_and_uses_its_lr(digits, monkeypatch):
    train, test = digits
    plan = accounting.PrivacyPlan(dataset_size=600, batch_size=64, steps=3, noise_multiplier=1.3, clip_norm=0.5,
                                  delta=1e-5)
    spies = _Spies(monkeypatch, baseline)
    r = baseline.train_dp_classifier(plan, train, test, seed=3, lr=7e-4)
    x, y, value = spies.acc[-1]
    assert torch.equal(x, test.x) and torch.equal(y, test.y)
    assert r["test_accuracy"] == value and r["lr"] == 7e-4
    assert spies.lrs == [7e-4]
