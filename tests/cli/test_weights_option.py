"""`--weights` of `dpdm sample` and `dpdm export`: one rule for both (`dpdm.sample._weights_of`)."""
from __future__ import annotations

import numpy as np
import pytest

import accounting
from cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step --no-dp run on 24 random 8x8 images of 3 classes: a training checkpoint with ema and raw weights,
    and no accounting after the plan's (a DP run's re-accounting would double the time)."""
    d = tmp_path_factory.mktemp("weights_run")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=1, noise_multiplier=2.0, noise_multiplicity=1,
                                  delta=1e-5, dataset_name=f"npz:{d / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), d / "plan.json")
    assert main(["train", "--plan", str(d / "plan.json"), "--out", str(d / "run"), "--device", "cpu", "--quiet",
                 "--no-dp"]) == 0
    return d / "run"


def test_empty_weights_are_refused_by_sample_as_by_export(run, tmp_path, capsys):
    """`dpdm sample --weights ''` took the EMA and recorded meta_weights='ema', where `dpdm export --weights ''`
    refused it (h97 F5, stop 48): '' was read as "not given". Both now give export's one line, exit 2, and write
    nothing."""
    lines = {}
    for command, out, extra in (("sample", tmp_path / "s.npz", ["--n", "2", "--sampler-steps", "2", "--device", "cpu"]),
                                ("export", tmp_path / "model.pt", [])):
        rc = main([command, "--run", str(run), "--weights", "", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("dpdm: error: weights=''"), err
        assert not out.exists()
        lines[command] = err
    assert lines["sample"] == lines["export"], lines
    assert "has ema, raw and no power EMAs" in lines["sample"]
