"""The DP-SGD baseline's result line rounds the plan's epsilon up (mut48, stop 47: mutant CB1 passed every test)."""
from __future__ import annotations

import re

import numpy as np

import accounting
from cli.main import main
from dpdm.report_utils import epsilon_text


def test_baseline_line_rounds_the_plans_epsilon_up(tmp_path, capsys):
    """The result line states the guarantee: the plan's epsilon rounded up (a certified 10.0045 reads 10.01, never
    10.00). A line rounding it down passed every test: they read only the JSON's epsilon."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 1, 8, 8), dtype=np.uint8)
    y = (np.arange(60) % 3).astype(np.int64)
    np.savez(tmp_path / "train.npz", x=x, y=y, num_classes=3)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, size=(12, 1, 8, 8), dtype=np.uint8), y=y[:12],
             num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=60, batch_size=12, steps=2, noise_multiplier=1.0, delta=1e-5,
                                  dataset_name=f"npz:{tmp_path / 'train.npz'}")
    doc = accounting.make_plan_document(plan)
    accounting.write_plan(doc, tmp_path / "plan.json")
    up, down = epsilon_text(doc.epsilon), epsilon_text(doc.epsilon, bound="lower")
    assert up != down   # this plan's epsilon tells the two roundings apart
    code = main(["baseline", "dp-classifier", "--plan", str(tmp_path / "plan.json"), "--test-dataset",
                 f"npz:{tmp_path / 'test.npz'}", "--device", "cpu", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    shown = re.search(r"at epsilon (\S+), delta", out).group(1)
    assert shown == up and float(shown) >= doc.epsilon, (out, doc.epsilon)
