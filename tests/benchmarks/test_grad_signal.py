"""benchmarks/grad_signal.py: the signal estimator and a measurement on a tiny trained run."""
import math

import pytest
import torch

import accounting
from dpdm.datasets import ImageData
from dpdm.train import CHECKPOINT_NAME, TrainConfig, train


def test_unit_signal_is_exact_for_identical_rows_and_clips(load_benchmark):
    gs = load_benchmark("grad_signal")
    rows = torch.tensor([[3.0, 4.0]]).repeat(10, 1)            # norm 5, clipped to 1
    sq, med = gs.unit_signal(rows, clip_norm=1.0)
    assert sq == pytest.approx(1.0) and med == pytest.approx(5.0)
    sq, _ = gs.unit_signal(rows, clip_norm=10.0)               # below the clip norm: unchanged
    assert sq == pytest.approx(25.0)
    sq, _ = gs.unit_signal(rows * 1e-3, clip_norm=None)        # unit directions
    assert sq == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        gs.unit_signal(rows[:1], clip_norm=1.0)


def test_unit_signal_is_unbiased_where_the_plain_norm_is_not(load_benchmark):
    gs = load_benchmark("grad_signal")
    g = torch.Generator().manual_seed(0)
    B, trials = 8, 4000
    est, plain = [], []
    for _ in range(trials):
        signs = torch.where(torch.rand(B, generator=g) < 0.75, 1.0, -1.0)   # E[row] = 0.5 e1
        rows = torch.stack([signs, torch.zeros(B)], 1)
        est.append(gs.unit_signal(rows, clip_norm=1.0)[0])
        plain.append(float(rows.mean(0).norm() ** 2))
    mean_est = sum(est) / trials
    assert abs(mean_est - 0.25) < 0.02                          # ||E u||^2 = 0.25
    assert sum(plain) / trials > 0.25 + 0.05                    # ||mean||^2 is biased up by (1 - 0.25) / B


def _tiny_run(run, *, n, classes, batch, steps, K, **config):
    """A v-preconditioned `small` run of `steps` on n random 8x8 images; returns the images and labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(n) % classes
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=batch, steps=steps, noise_multiplier=1.0, clip_norm=1.0,
                                  noise_multiplicity=K, delta=1e-5, dataset_name="tiny")
    train(accounting.make_plan_document(plan), x, y, classes, run,
          TrainConfig(model="small", precond="v", seed=1, **config), progress=False)
    return x, y


@pytest.mark.slow
def test_measure_on_a_tiny_run(tmp_path, load_benchmark):
    gs = load_benchmark("grad_signal")
    classes, run = 3, tmp_path / "run"
    x, y = _tiny_run(run, n=24, classes=classes, batch=6, steps=3, K=2)
    res = gs.measure(run / CHECKPOINT_NAME, Ks=(1, 2), batch=6, reps=2, by_sigma=True,
                     data=ImageData(x, y, classes, "tiny"), clip_norms=(1e-6, 1.0, 1e6))
    assert set(res["by_K"]) == {"1", "2"}
    assert res["noise_norm"] == pytest.approx(1.0 * 1.0 * math.sqrt(res["params"]) / 6)
    for row in res["by_K"].values():
        assert -1.0 <= row["signal"] <= 1.0 + 1e-9 and row["median_grad_norm"] > 0
        assert row["snr_per_step"] == pytest.approx(row["signal"] / res["noise_norm"])
        clip = row["by_clip"]
        assert set(clip) == {"1e-06", "1", "1e+06"}
        assert clip["1"]["signal"] == pytest.approx(row["signal"])           # the plan's own clip norm
        assert clip["1"]["snr_per_step"] == pytest.approx(row["snr_per_step"])
        assert clip["1e-06"]["clipped_fraction"] == 1.0 and clip["1e+06"]["clipped_fraction"] == 0.0
        for c, entry in clip.items():                                        # noise of that clip norm
            noise = 1.0 * float(c) * math.sqrt(res["params"]) / 6
            assert entry["snr_per_step"] == pytest.approx(entry["signal"] / noise)
        assert abs(clip["1e-06"]["signal"]) <= 1e-6 * (1 + 1e-9)            # at most C
    shares = [row["training_share"] for row in res["by_sigma"]]
    assert len(shares) == len(gs.SIGMA_EDGES) - 1 and 0.9 < sum(shares) <= 1.0 + 1e-9
    assert res["non_private_statistics_of_the_private_data"] is True and "private_figures" not in res
    with pytest.raises(ValueError, match="positive"):
        gs.measure(run / CHECKPOINT_NAME, Ks=(1,), batch=6, reps=2, clip_norms=(0.0,),
                   data=ImageData(x, y, classes, "tiny"))


def test_measure_clips_and_noises_only_the_trainable_parameters_of_the_run(tmp_path, load_benchmark):
    # h88 F3: a --trainable run clips and noises its trainable subset; grad_signal.py counted (and clipped) every
    # parameter, so its noise norm was sqrt(d_all / d_trained) too large (27x for conv_in/conv_out).
    import json

    gs = load_benchmark("grad_signal")
    classes, run = 2, tmp_path / "run"
    x, y = _tiny_run(run, n=8, classes=classes, batch=4, steps=1, K=1, trainable=("net.conv_out*",))
    trained = json.loads((run / "config.json").read_text())["trained_parameters"]
    res = gs.measure(run / CHECKPOINT_NAME, Ks=(1,), batch=4, reps=1, data=ImageData(x, y, classes, "tiny"))
    assert res["params"] == trained < 1000
    assert res["noise_norm"] == pytest.approx(math.sqrt(trained) / 4)
    assert res["run_private"] is True

    # h156 F1 (stop 55): without its plan.json the script clipped at 1.0 whatever the run used, and a plan.json of
    # another run beside the checkpoint was used unchecked; both are refused, through the run's ledger.
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(run / CHECKPOINT_NAME, copy / CHECKPOINT_NAME)
    with pytest.raises(gs.RunRefused, match="no plan.json beside"):
        gs.measure(copy / CHECKPOINT_NAME, Ks=(1,), batch=4, reps=1, data=ImageData(x, y, classes, "tiny"))
    other = accounting.PrivacyPlan(dataset_size=8, batch_size=4, steps=1, noise_multiplier=1.0, clip_norm=0.1,
                                   noise_multiplicity=1, delta=1e-5, dataset_name="tiny")
    accounting.write_plan(accounting.make_plan_document(other), copy / "plan.json")
    with pytest.raises(gs.RunRefused, match="was trained under"):
        gs.measure(copy / CHECKPOINT_NAME, Ks=(1,), batch=4, reps=1, data=ImageData(x, y, classes, "tiny"))


def test_a_no_dp_run_is_marked_non_private(tmp_path, load_benchmark, monkeypatch, capsys):
    # h156 F1 (stop 55): on a --no-dp checkpoint (nothing clipped or noised) the script printed a noise norm and a
    # signal/noise ratio from its schedule plan, and nowhere said that the run was non-private.
    import json
    import sys

    gs = load_benchmark("grad_signal")
    classes, run = 2, tmp_path / "run"
    x, y = _tiny_run(run, n=8, classes=classes, batch=4, steps=1, K=1, private=False)
    measure = gs.measure
    monkeypatch.setattr(gs, "measure", lambda *a, **kw: measure(*a, **kw, data=ImageData(x, y, classes, "tiny")))
    argv = ["--checkpoint", run / CHECKPOINT_NAME, "--K", 1, "--batch", 4, "--reps", 1, "--threads", 1,
            "--json", tmp_path / "g.json"]
    monkeypatch.setattr(sys, "argv", ["grad_signal.py", *map(str, argv)])
    gs.main()
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("NON-PRIVATE run (--no-dp): it clipped and noised nothing;"), out
    assert out[2].startswith("noise norm per step:"), out
    assert json.loads((tmp_path / "g.json").read_text())["run_private"] is False


def test_a_checkpoint_without_its_plan_is_refused_in_one_line(tmp_path, load_benchmark, monkeypatch, capsys):
    # h156 F1: with no plan.json beside the checkpoint, the clip norm fell back to 1.0 silently.
    import sys

    import dpdm.checkpoint

    gs = load_benchmark("grad_signal")
    monkeypatch.setattr(dpdm.checkpoint, "load_checkpoint", lambda path: {
        "config": {"train": {}}, "model": {}, "ledger": {"plan_digest": "sha256:" + "0" * 64, "private": True}})
    monkeypatch.setattr(sys, "argv", ["grad_signal.py", "--checkpoint", str(tmp_path / "checkpoint.pt")])
    with pytest.raises(SystemExit) as e:
        gs.main()
    assert e.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "error: no plan.json beside" in line and "put the run's plan.json" in line, line


def test_a_public_subspace_run_is_refused_in_one_line(tmp_path, load_benchmark, monkeypatch, capsys):
    import sys

    import dpdm.checkpoint

    gs = load_benchmark("grad_signal")
    monkeypatch.setattr(dpdm.checkpoint, "load_checkpoint", lambda path: {
        "config": {"train": {"subspace_dim": 8}}, "model": {}})
    monkeypatch.setattr(sys, "argv", ["grad_signal.py", "--checkpoint", str(tmp_path / "checkpoint.pt")])
    with pytest.raises(SystemExit) as e:
        gs.main()
    assert e.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "error:" in line and "--public-subspace" in line and "subspace_dim 8" in line, line


@pytest.mark.parametrize("flag, value", [("--reps", "0"), ("--batch", "1"), ("--threads", "0")])
def test_grad_signal_refuses_out_of_range_options(load_benchmark, option_refused, flag, value):
    # --reps 0: ZeroDivisionError, --batch 1: unit_signal's ValueError, --threads 0: torch's RuntimeError, each a
    # traceback after loading the checkpoint and the data.
    gs = load_benchmark("grad_signal")
    gs.measure = lambda *a, **kw: pytest.fail("measured")
    option_refused(gs, "grad_signal.py", flag, value)
