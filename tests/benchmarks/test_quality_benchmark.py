"""benchmarks/quality.py end to end at toy size (slow): one plan for the generator and the baseline."""
import json

import pytest

import accounting


@pytest.mark.slow
def test_quality_benchmark_runs_generator_and_baseline_under_one_plan(tmp_path, load_benchmark):
    q = load_benchmark("quality")
    q.N_SAMPLES = 20  # the protocol size, here the first 20 of the 40 drawn
    parts = []
    out = q.run(workdir=tmp_path, epochs=0.2, n=40, precond="v", lr=1e-3, guidance=1.0, guidance_interval=(0.5, 10),
                ema_powers=(2.0,), weights="power:2", on_part=lambda o: parts.append(set(o)))
    added = [later - earlier for later, earlier in zip(parts[1:], parts)]
    assert added == [{"sampling"}, {"dp_classifier"}, {"synthetic"}, {"synthetic_all"}]
    doc = accounting.load_plan(tmp_path / "plan.json")
    assert doc.plan.steps == 4 and doc.plan.noise_multiplicity == q.NOISE_MULTIPLICITY
    assert out["generator"]["steps_done"] == doc.plan.steps
    assert out["generator"]["precond"] == "v" and out["sampling"]["guidance"] == 1.0
    assert out["sampling"]["guidance_interval"] == [0.5, 10.0] and out["sampling"]["weights"] == "power:2"
    assert out["generator"]["ema_powers"] == [2.0]
    assert out["dp_classifier"]["plan_digest"] == doc.digest
    assert set(out["synthetic"]["classifiers"]) == {"logreg", "mlp", "cnn"}
    assert out["synthetic"]["n_samples"] == 20 and out["synthetic_all"]["n_samples"] == 40
    assert out["synthetic"]["samples_private"] is True and out["synthetic_all"]["samples_private"] is True
    assert out["synthetic_all"]["classifiers"]["cnn"]["train_size"] == 36  # 90% of all 40
    json.dumps(out)  # the --json document


@pytest.mark.slow
def test_quality_benchmark_no_dp_is_marked_and_never_reused_as_private(tmp_path, load_benchmark):
    q = load_benchmark("quality")
    out = q.run(workdir=tmp_path, epochs=0.2, n=20, precond="v", lr=1e-3, private=False)
    assert out["generator"]["private"] is False and out["synthetic"]["samples_private"] is False
    with pytest.raises(SystemExit, match="NON-PRIVATE"):
        q.run(workdir=tmp_path, epochs=0.2, n=20, precond="v", lr=1e-3)


def test_samples_private_reads_the_npz(tmp_path, load_benchmark):
    import numpy as np

    q = load_benchmark("quality")
    x, y = np.zeros((2, 1, 4, 4), np.uint8), np.zeros(2, np.int64)
    for flag in (True, False):
        np.savez(tmp_path / f"{flag}.npz", x=x, y=y, meta_private=np.asarray(flag))
        assert q.samples_private(tmp_path / f"{flag}.npz") is flag
    np.savez(tmp_path / "bare.npz", x=x, y=y)
    assert q.samples_private(tmp_path / "bare.npz") is None


def test_load_samples_takes_the_first_images_only_when_class_balanced(tmp_path, load_benchmark):
    import numpy as np

    q = load_benchmark("quality")
    x = np.arange(30, dtype=np.uint8)[:, None, None, None].repeat(4, 2).repeat(4, 3)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(30) % 10)  # dpdm sample's order: labels i % 10
    head = q.load_samples(tmp_path / "s.npz", 20)
    assert len(head) == 20 and head.y.tolist() == [i % 10 for i in range(20)]
    assert head.x[:, 0, 0, 0].tolist() == q.load_samples(tmp_path / "s.npz").x[:20, 0, 0, 0].tolist()
    assert len(q.load_samples(tmp_path / "s.npz", 50)) == 30 and len(q.load_samples(tmp_path / "s.npz")) == 30
    np.savez(tmp_path / "sorted.npz", x=x, y=np.sort(np.arange(30) % 10))  # class by class
    with pytest.raises(SystemExit, match="not class-balanced"):
        q.load_samples(tmp_path / "sorted.npz", 20)
    assert len(q.load_samples(tmp_path / "sorted.npz")) == 30  # whole files are taken as they are


def test_write_json_replaces_the_file_whole(tmp_path, load_benchmark):
    q = load_benchmark("quality")
    q.write_json(tmp_path / "out.json", {"a": 1})
    q.write_json(tmp_path / "out.json", {"a": 1, "b": [2]})
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1, "b": [2]}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_quality_defaults_make_a_calibrated_plan(load_benchmark):
    q = load_benchmark("quality")
    doc = q.default_plan()
    assert doc.plan.steps == 1407 and doc.plan.batch_size == 256 and doc.plan.noise_multiplicity == 2
    assert doc.plan.clip_norm == 1.0
    assert doc.epsilon <= q.EPSILON
    small = q.default_plan(clip_norm=0.1)   # C does not enter the accounting: the same noise multiplier
    assert small.plan.clip_norm == 0.1 and small.plan.noise_multiplier == doc.plan.noise_multiplier
    assert small.plan.noise_std == pytest.approx(0.1 * doc.plan.noise_std)


def test_quality_sweep_registers_unet_shapes(load_benchmark):
    sweep = load_benchmark("quality_sweep")
    from dpdm import networks

    assert sweep.register_model("small") == "small"
    name = sweep.register_model("8/1,2,2/1")
    try:
        assert networks.PRESETS[name] == networks.Preset(8, (1, 2, 2), 1)
        net = networks.build_network(name, img_resolution=28, img_channels=1, num_classes=10)
        assert networks.count_parameters(net) == 80_505   # the size measured in issue 4's sweep
    finally:
        networks.PRESETS.pop(name, None)
    with pytest.raises(ValueError, match="NF/CH_MULT/BLOCKS"):
        sweep.register_model("tiny")


@pytest.mark.slow
def test_quality_benchmark_public_pretrain_warm_starts_both_sides(tmp_path, load_benchmark):
    q = load_benchmark("quality")
    out = q.run(workdir=tmp_path, epochs=0.2, n=20, precond="v", lr=1e-3, public="digits28", public_steps=3,
                physical_batch=16, precision="bf16", augment_shift=1, augment_multiplicity=2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["physical_batch"] == 16                 # the private run's chunks, as asked
    # bf16 reaches the public pretraining and the sampling; the private run stays fp32.
    assert json.loads((tmp_path / "public" / "config.json").read_text())["train"]["precision"] == "bf16"
    assert config["train"]["precision"] == "fp32" and out["sampling"]["precision"] == "bf16"
    assert out["public_generator"]["private"] is False and out["public_generator"]["steps_done"] == 3
    # The public pretraining runs at PUBLIC_K (1: nothing is clipped there); the private run at the plan's K.
    assert accounting.load_plan(tmp_path / "public" / "plan.json").plan.noise_multiplicity == q.PUBLIC_K == 1
    assert accounting.load_plan(tmp_path / "run" / "plan.json").plan.noise_multiplicity == q.NOISE_MULTIPLICITY
    init = out["generator"]
    assert init["private"] is True and init["init"]["dataset"] == "digits28"
    assert out["dp_classifier"]["public_pretrain"]["dataset"] == "digits28"
    assert out["synthetic"]["samples_private"] is True
    like = out["synthetic_public_init"]    # the synthetic CNN, first trained on the same public digits
    assert like["public_pretrain"]["dataset"] == "digits28" and like["epochs"] == q.PAPER_EPOCHS
    assert 0.0 <= like["test_accuracy"] <= 1.0 and like["train_size"] == 18
    # --augment-shift reaches both sides: the DP-SGD CNN's copies and every synthetic-data classifier.
    assert out["dp_classifier"]["augment"] == {"shift": 1, "multiplicity": 2}
    assert out["synthetic"]["augment_shift"] == 1
    with pytest.raises(SystemExit, match="private dataset"):
        q.run(workdir=tmp_path / "b", epochs=0.2, n=20, public="mnist5k")


@pytest.mark.slow
def test_quality_benchmark_splits_into_baseline_and_generator_processes(tmp_path, load_benchmark, monkeypatch):
    """gpu_run.sh's two processes: --baseline-only (reference network, then the DP-SGD CNN) and
    --skip-baseline (everything else), under one plan file."""
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "cache"))
    q = load_benchmark("quality")
    q.N_SAMPLES = 20
    parts = []
    side = q.run(workdir=tmp_path / "side", epochs=0.2, baseline_only=True, on_part=lambda o: parts.append(set(o)))
    assert [later - earlier for later, earlier in zip(parts[1:], parts)] == [{"dp_classifier", "seconds"}]
    assert "reference_classifier" in parts[0] and "generator" not in side
    parts.clear()
    main = q.run(plan_path=str(tmp_path / "side" / "plan.json"), workdir=tmp_path / "main", n=20, precond="v",
                 lr=1e-3, baseline=False, on_part=lambda o: parts.append(set(o)))
    assert all("dp_classifier" not in p for p in parts) and "synthetic" in main
    assert main["generator"]["plan_digest"] == side["dp_classifier"]["plan_digest"]
    # the reference network the generator's FD needs was trained once, by the baseline process
    assert side["reference_classifier"]["cached"] is False
    assert main["synthetic"]["classifier_fd"]["reference"]["cached"] is True


def test_real_data_cnn_is_the_protocol_on_the_private_images(load_benchmark):
    q = load_benchmark("quality")
    out = q.real_data_cnn("mnist5k", epochs=1)
    assert out["train_size"] == 3600 and out["epochs"] == 1   # 90% of the 4,000 private images, 10% select
    assert 0.5 < out["test_accuracy"] <= 1.0                   # one epoch on real digits already learns
    warm = q.real_data_cnn("mnist5k", public="digits28", epochs=1, public_epochs=1)
    assert warm["public_pretrain"]["dataset"] == "digits28" and warm["public_pretrain"]["epochs"] == 1
    assert warm["train_size"] == 3600


def test_real_reference_adds_the_ceiling_only_when_asked(tmp_path, load_benchmark, monkeypatch):
    import numpy as np

    import dpdm.evaluate

    q = load_benchmark("quality")
    calls = []
    monkeypatch.setattr(q, "real_data_cnn", lambda name, public=None, **kw: calls.append((name, public))
                        or {"test_accuracy": 0.9, "train_size": 3600})
    monkeypatch.setattr(q, "dp_classifier_baseline", lambda doc, **kw: {"test_accuracy": 0.8})
    monkeypatch.setattr(dpdm.evaluate, "reference_classifier", lambda train, device: (None, {"cached": True}))
    out = q.run(workdir=tmp_path, epochs=0.2, baseline_only=True, real_reference=True, public="digits28")
    assert calls == [("mnist5k", None), ("mnist5k", "digits28")]   # cold, then public-initialised
    assert out["real_data_cnn"]["test_accuracy"] == 0.9 and "real_data_cnn_public_init" in out
    calls.clear()
    out = q.run(workdir=tmp_path, epochs=0.2, baseline_only=True)
    assert calls == [] and "real_data_cnn" not in out
    # the generator's process, on samples already drawn: the ceiling beside the synthetic figures
    monkeypatch.setattr(q, "evaluate_synthetic", lambda *a, **kw: {"classifiers": {}})
    np.savez(tmp_path / "s.npz", x=np.zeros((20, 1, 28, 28), np.uint8), y=np.arange(20) % 10)
    out = q.run(workdir=tmp_path, epochs=0.2, samples=str(tmp_path / "s.npz"), baseline=False, real_reference=True)
    assert calls == [("mnist5k", None)] and "real_data_cnn" in out and "synthetic" in out
