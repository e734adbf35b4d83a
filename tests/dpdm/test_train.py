"""Training under a locked plan: ledger, resume, refusal, checkpoint safety."""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import accounting
from dpdm import checkpoint as ckpt
from dpdm.train import CHECKPOINT_NAME, PowerEMA, TrainConfig, TrainDiverged, TrainError, ema_power_key, train


def tiny_data(n=24, classes=3, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, res, res, generator=g) * 2 - 1
    y = torch.arange(n) % classes
    return x, y, classes


def tiny_plan(n=24, steps=6, batch=6, sigma=1.0, K=2):
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=batch, steps=steps, noise_multiplier=sigma,
                                  clip_norm=1.0, noise_multiplicity=K, delta=1e-5, dataset_name="tiny")
    return accounting.make_plan_document(plan)


CFG = dict(model="small", checkpoint_every=2, log_every=1, seed=3)


class Stop(Exception):
    """Raised by the callback of `stop_at(n)`: a run killed after its n-th step."""


def stop_at(n):
    def callback(steps_done):
        if steps_done == n:
            raise Stop
    return callback


def kill_as_step_begins(monkeypatch, n):
    """The next `train` is killed as its step n + 1 begins, after everything of step n (its metrics row, the bar, its
    checkpoint, the record of the steps run): its step n + 1 draws nothing. `stop_at(n)` stops it before step n shows
    anything, so the record (`.steps_done`) ends at step n - 1."""
    import dpdm.train as train_module

    real = train_module.plan_private_grad

    def grad(D, *a, step, **k):
        if step == n:
            raise Stop
        return real(D, *a, step=step, **k)

    monkeypatch.setattr(train_module, "plan_private_grad", grad)


def params_of(run: Path, key="model"):
    return ckpt.load_checkpoint(run / CHECKPOINT_NAME)[key]


def test_run_ends_at_plan_steps_with_ledger(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan()
    out = tmp_path / "run"
    summary = train(doc, x, y, c, out, TrainConfig(**CFG), progress=False)
    assert summary["steps_done"] == doc.plan.steps
    ledger = ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]
    assert ledger["steps_done"] == doc.plan.steps
    assert ledger["plan_digest"] == doc.digest
    expected = min(accounting.epsilon_spent(doc.plan, doc.plan.steps), doc.epsilon)
    assert ledger["epsilon_spent"] == pytest.approx(expected, rel=1e-9)
    assert ledger["epsilon_spent"] <= doc.epsilon * (1 + 1e-9)
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + doc.plan.steps
    # A finished run refuses to go further.
    with pytest.raises(TrainError, match="finished"):
        train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)
    # And an existing run is never overwritten without --resume, which would refuse it: the line says so (it said
    # "pass --resume", h124 F4, stop 52).
    with pytest.raises(TrainError, match=r"^'.*run' already holds a finished run \(6 of 6 steps done\), which "
                                         r"--resume refuses: choose another --out$"):
        train(doc, x, y, c, out, TrainConfig(**CFG), progress=False)


@pytest.mark.parametrize("schedule", ["constant", pytest.param("cosine", marks=pytest.mark.slow)])   # stop 47
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, schedule):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=7)
    cfg = TrainConfig(**CFG, lr_schedule=schedule)
    full = tmp_path / "full"
    train(doc, x, y, c, full, cfg, progress=False)

    part = tmp_path / "part"
    kill_as_step_begins(monkeypatch, 5)   # after step 5 (its row logged), past the checkpoint at 4
    with pytest.raises(Stop):
        train(doc, x, y, c, part, cfg, progress=False)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(part / CHECKPOINT_NAME)["ledger"]["steps_done"] == 4
    # The run's own lr replays step 5 exactly: nothing to spend, even where asked (stop 52).
    notes = []
    summary = train(doc, x, y, c, part, cfg, resume=True, progress=False, spend_unsaved_steps=True,
                    on_start=notes.extend)
    assert summary["steps_done"] == 7 and ckpt.DISCARDED_STEPS_KEY not in ckpt.load_checkpoint(part / CHECKPOINT_NAME)
    assert any(n.startswith("--spend-unsaved-steps: nothing to spend: the run trained step 5 after its checkpoint of "
                            "step 4") for n in notes), notes
    a, b = params_of(full), params_of(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    steps_logged = [int(r.split(",")[0]) for r in (part / "metrics.csv").read_text().splitlines()[1:]]
    assert steps_logged == list(range(1, 8))  # rows after the checkpoint were redone, not duplicated
    ea, eb = params_of(full, "ema"), params_of(part, "ema")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0)


@pytest.mark.parametrize("left_behind", ["as_written", "empty", "headerless_half_row"])
def test_metrics_header_survives_a_kill_before_the_first_row(tmp_path, left_behind):
    """A run killed after a checkpoint but before its first metrics row (SIGKILL: nothing flushed) had left
    metrics.csv empty, the resumed run appended rows without a header, and the audit's logged-batch check
    then failed a correct private run. The header is now written with the run, and resume repairs a file
    that is empty, headerless or ends in a half-written row."""
    from audits.mechanism import check_run

    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    cfg = TrainConfig(**{**CFG, "log_every": 4})
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, out, cfg, progress=False, on_step=stop_at(3))   # checkpoint at 2, no row yet
    metrics = out / "metrics.csv"
    header = "step,batch_size,loss,clipped_fraction,epsilon_spent,steps_per_s,private"
    assert metrics.read_text().splitlines() == [header]
    if left_behind == "empty":
        metrics.write_text("")
    elif left_behind == "headerless_half_row":
        metrics.write_text("4,7,1.0,0.5,2.0,1.0,1\n5,6,1.0")   # a row of a step after the checkpoint, cut short
    train(doc, x, y, c, out, cfg, resume=True, progress=False)
    rows = metrics.read_text().splitlines()
    assert rows[0] == header and [int(r.split(",")[0]) for r in rows[1:]] == [4, 6]   # every 4th, and the last
    assert all(r.count(",") == 6 for r in rows)
    checks = {r.name: r for r in check_run(out, doc)}
    assert checks["run_logged_batches"].passed, checks["run_logged_batches"]


def test_wrong_size_data_refused_and_nothing_written(tmp_path):
    x, y, c = tiny_data(n=25)
    doc = tiny_plan(n=24)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"dataset_size=24; a plan is valid only for data of its size: make one for "
                                         r"this data \(`dpdm plan \.\.\. --dataset-size 25`; nothing has trained "
                                         r"under it, so it costs nothing\)$"):   # the way on (h124 F4, stop 52)
        train(doc, x, y, c, out, TrainConfig(**CFG), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_refused_and_nothing_written(tmp_path, bad):
    """The engine zeroes a non-finite example's gradient and counts it, but the run trained on without a word
    (stop 42): the Python API refuses such images before anything is written."""
    x, y, c = tiny_data()
    x[[3, 7], 0, 2, 2] = bad
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="2 of the 24 images hold a NaN or infinite pixel"):
        train(tiny_plan(), x, y, c, out, TrainConfig(**CFG), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("bad, needle", [
    ("uint8", r"images must be float32 \[N, C, H, W\], got torch.uint8 \(24, 1, 8, 8\)"),
    ("0..255", r"the images' pixels span \[\d.*, 25\d.*\]; train\(\) needs them in \[-1, 1\] \(uint8 pixels p as "
               r"p / 127.5 - 1"),
    ("float64", r"images must be float32 \[N, C, H, W\], got torch.float64"),
    ("float16", r"images must be float32 \[N, C, H, W\], got torch.float16"),
    ("float labels", r"labels must be int64 \[24\], got torch.float32 \(24,\)"),
    ("label 3 of 3 classes", r"labels must lie in \[0, 3\), got \[1, 3\]"),
], ids=["uint8", "0..255", "float64", "float16", "float labels", "label 3 of 3 classes"])
def test_images_and_labels_of_another_kind_refused_and_nothing_written(tmp_path, bad, needle):
    """`ImageData`'s checks on a library caller's raw tensors: uint8 images (torchvision's `dataset.data`) spent a
    whole plan on 0..255 pixels without a word, and the others failed at step 1 with torch's errors after plan.json
    and config.json were written (stop 50, h110 F3)."""
    x, y, c = tiny_data()
    pixels = (x * 127.5 + 127.5).round()
    x, y = {"uint8": (pixels.to(torch.uint8), y), "0..255": (pixels, y), "float64": (x.double(), y),
            "float16": (x.half(), y), "float labels": (x, y.float()), "label 3 of 3 classes": (x, y + 1)}[bad]
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=f"^(the training data: )?{needle}"):
        train(tiny_plan(), x, y, c, out, TrainConfig(**CFG), progress=False)
    assert not out.exists()


def test_labels_and_num_classes_that_disagree_refused_and_nothing_written(tmp_path):
    """h134 F3 (stop 53): labels given with num_classes=0 were dropped and an unconditional model trained the whole
    plan in silence; num_classes > 0 without labels failed in step 1's gradient after the run folder was written."""
    x, y, c = tiny_data()
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"^labels y were given with num_classes=0: give num_classes"):
        train(tiny_plan(), x, y, 0, out, TrainConfig(**CFG), progress=False)
    with pytest.raises(TrainError, match=r"^num_classes=3 but no labels \(y=None\): give y .* or num_classes=0"):
        train(tiny_plan(), x, None, c, out, TrainConfig(**CFG), progress=False)
    assert not out.exists()


def test_a_bare_plan_or_numpy_data_refused_as_one_train_error(tmp_path):
    """h134 F4 (stop 53): a PrivacyPlan or a dict for the plan document, numpy images or labels failed with Python's
    AttributeError ('PrivacyPlan' object has no attribute 'plan', 'numpy.ndarray' ... 'dim')."""
    x, y, c = tiny_data()
    doc = tiny_plan()
    out = tmp_path / "run"
    for bad, args, match in ((doc.plan, (x, y), "plan_doc is a PrivacyPlan; train.. takes a verified plan document"),
                             ({"plan": {}, "epsilon": 1.0}, (x, y), "plan_doc is a dict"),
                             (doc, (x.numpy(), y), r"x is a ndarray; train.. takes torch tensors"),
                             (doc, (x, y.numpy()), r"y is a ndarray")):
        with pytest.raises(TrainError, match=f"^{match}"):
            train(bad, *args, c, out, TrainConfig(**CFG), progress=False)
    assert not out.exists()


def test_on_start_notes_a_given_seed_and_data_that_looks_mistaken(tmp_path):
    """h134 F2, F3 (stop 53): a library caller's private run with TrainConfig(seed=0) was told nothing of the seed's
    replay (the CLI alone warned), nor of images in [0, 1] (torchvision's ToTensor()), binary 0/1-of-255 pixels or
    classes without an image, which the CLI warns of. Each run stops in on_start, before its first step."""
    x, y, c = tiny_data()

    def notes_of(name, x, y, **cfg):
        said = []

        def start(notes):
            said.extend(notes)
            raise Stop

        with pytest.raises(Stop):
            train(tiny_plan(), x, y, c, tmp_path / name, TrainConfig(**{**CFG, **cfg}), progress=False,
                  on_start=start)
        return said

    said = notes_of("seeded", (x + 1) / 2, y % 2)   # pixels in [0, 1], class 2 without an image
    assert any(n.startswith("the run's seed was given (TrainConfig.seed, --seed): anyone who knows it can replay the "
                            "batches and the DP noise") for n in said), said
    assert any(n.startswith("every pixel of the images is >= 0") and "x * 2 - 1" in n for n in said), said
    assert any(n.startswith("1 of the 3 classes has no image (label 2)") for n in said), said
    assert len(said) == 3, said
    binary = -1 + (x > 0).float() * (2 / 255)
    assert notes_of("secret", x, y, seed=None) == []                       # a secret seed, ordinary data: nothing
    said = notes_of("nodp", binary, y, private=False)                       # no guarantee to void
    assert len(said) == 1 and said[0].startswith("every pixel of the images is -1 or -1 + 2/255"), said


def test_on_start_names_the_files_of_images_that_are_exact_copies_where_it_is_given_them(tmp_path):
    """h155 F3 (stop 55): the copies' note named indices ("image 11 is image 0"), which a folder's user could not
    map to files (sorted as strings, class by class); given `image_names` (`ImageData.files`), it names the two
    files (`data_notes` without them: the indices). A name list of another length is refused before anything is
    written."""
    x, y, c = tiny_data()
    x = x.clone()
    x[5] = x[2]
    names = [f"{int(label)}/{i}.png" for i, label in enumerate(y)]
    said = []

    def start(notes):
        said.extend(n for n in notes if "exact cop" in n)
        raise Stop

    with pytest.raises(Stop):
        train(tiny_plan(), x, y, c, tmp_path / "run", TrainConfig(**CFG), progress=False, on_start=start,
              image_names=names)
    assert len(said) == 1 and said[0].startswith(
        f"1 of the {len(x)} images is an exact copy of another (the first: {names[5]!r} is {names[2]!r}, paths in "
        "the data folder):"), said
    with pytest.raises(TrainError, match=rf"^{len(x) - 1} image names for {len(x)} images$"):
        train(tiny_plan(), x, y, c, tmp_path / "short", TrainConfig(**{**CFG, "private": False}), progress=False,
              image_names=names[1:])
    assert not (tmp_path / "short").exists()


def test_every_private_step_moves_the_weights_even_on_an_empty_poisson_batch(tmp_path):
    """An empty Poisson batch is still a private step: pure noise over the expected batch size, and Adam steps.
    The other runs (sample rate 0.25) almost never draw one (stop 42: skipping empty steps passed every test)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=5, batch=1)   # sample rate 1/24: about a third of the steps are empty
    out = tmp_path / "run"
    states = {}
    train(doc, x, y, c, out, TrainConfig(**{**CFG, "checkpoint_every": 1, "seed": 11}), progress=False,
          on_step=lambda s: s > 1 and states.__setitem__(s - 1, params_of(out)))   # before step s's checkpoint
    states[doc.plan.steps] = params_of(out)
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    empty = [int(r[0]) for r in rows if r[1] == "0" and int(r[0]) - 1 in states]
    assert empty, "seed 11 must draw an empty batch after step 1 for this test to mean anything"
    for s in empty:
        moved = max(float((states[s][k] - states[s - 1][k]).abs().max()) for k in states[s])
        assert moved > 0, f"step {s} (an empty batch) left the weights unchanged: no noisy step was taken"
    assert ckpt.load_checkpoint(out / CHECKPOINT_NAME)["optimizer"]["state"][0]["step"] == doc.plan.steps


def test_resume_from_an_edited_ledger_is_refused_and_the_checkpoint_kept(tmp_path):
    """Resuming re-accounts the checkpoint's ledger; deleting that check passed every train test (stop 42's mutation
    walk): a lowered epsilon or another delta in the ledger is refused, and the checkpoint left as it was."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=3)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "checkpoint_every": 1}), progress=False, on_step=stop_at(2))
    path = out / CHECKPOINT_NAME
    state = ckpt.load_checkpoint(path)
    assert state["ledger"]["steps_done"] == 1
    for edit in (dict(epsilon_spent=state["ledger"]["epsilon_spent"] / 2), dict(delta=1e-3)):
        torch.save({**state, "ledger": {**state["ledger"], **edit}}, path)
        before = path.read_bytes()
        with pytest.raises(TrainError, match="the file was edited"):
            train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)
        assert path.read_bytes() == before


def test_resume_against_another_plan_refused(tmp_path):
    x, y, c = tiny_data()
    out = tmp_path / "run"
    # Images that require grad (a library caller's) train: they failed at step 1 in the engine (stop 50, h110 F3).
    train(tiny_plan(steps=2), x.clone().requires_grad_(), y, c, out, TrainConfig(**CFG), progress=False)
    # A plan of more steps does not extend the run: the line says what does (trainwalk N1, stop 56).
    with pytest.raises(TrainError, match="trained under plan .*: a run goes on only under its own plan "
                                         r"\('.*run/plan.json'\), which no other plan extends; more training is a new "
                                         "run under a new plan in another --out"):
        train(tiny_plan(steps=4), x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)
    # Without --resume the line said "pass --resume", which refuses it as above (h124 F4, stop 52).
    with pytest.raises(TrainError, match=r"^'.*run' already holds a run trained under another plan "
                                         r"\(sha256:[0-9a-f]{12}\.\.\.\), which --resume under this one refuses: "
                                         r"choose another --out$"):
        train(tiny_plan(steps=4), x, y, c, out, TrainConfig(**CFG), progress=False)


def test_no_dp_run_is_marked(tmp_path):
    """In the summary, the ledger, config.json and every metrics.csv row (private 0, epsilon inf: stop 48, mut49
    ND1/ND2 marked a --no-dp run private in the last two and no test saw it)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    out = tmp_path / "run"
    summary = train(doc, x, y, c, out, TrainConfig(**CFG, private=False), progress=False)
    assert summary["private"] is False and summary["epsilon_spent"] is None
    assert ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]["private"] is False
    assert json.loads((out / "config.json").read_text())["private"] is False
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert {r["private"] for r in rows} == {"0"} and {r["epsilon_spent"] for r in rows} == {"inf"}


def test_bf16_is_for_no_dp_runs_and_computes_fp32s_gradient(tmp_path):
    from dpdm.loss import VLoss
    from dpdm.networks import build_network
    from dpdm.precond import VPrecond
    from dpdm.sampling import autocast_for
    from dpdm.train import _nonprivate_grad_sum

    with pytest.raises(ValueError, match="--no-dp runs only"):
        TrainConfig(**CFG, precision="bf16")
    with pytest.raises(ValueError, match="precision='fp16'"):
        TrainConfig(**CFG, private=False, precision="fp16")
    x, y, c = tiny_data()
    torch.manual_seed(0)
    D = VPrecond(build_network("small", img_resolution=8, img_channels=1, num_classes=c, init_scale=1.0))
    params = dict(D.named_parameters())
    loss = VLoss()
    sigma, noise = loss.draw(len(x), 2, (1, 8, 8), generator=torch.Generator().manual_seed(0), device="cpu")
    grads = {}
    for prec in ("fp32", "bf16"):
        with autocast_for(prec, "cpu"):
            grads[prec], _ = _nonprivate_grad_sum(D, loss, [x, y, sigma, noise], True, params)
    apart = sum(float((grads["bf16"][k] - grads["fp32"][k]).square().sum()) for k in params) ** 0.5
    size = sum(float(grads["fp32"][k].square().sum()) for k in params) ** 0.5
    assert all(grads["bf16"][k].dtype == torch.float32 for k in params)
    assert 0 < apart < 0.03 * size          # bf16 arithmetic, the same gradient (1.1% here)
    summary = train(tiny_plan(steps=2), x, y, c, tmp_path / "run",
                    TrainConfig(**CFG, private=False, precision="bf16"), progress=False)
    assert summary["steps_done"] == 2 and summary["private"] is False
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "bf16"


def test_no_dp_physical_batch_chunks_the_forward_pass(tmp_path, monkeypatch):
    """--physical-batch is the memory knob of --no-dp runs too (they ran the whole Poisson batch in one pass,
    while the out-of-memory advice named --physical-batch); chunking leaves the gradient sum unchanged."""
    import dpdm.train as train_mod
    from dpdm.loss import VLoss
    from dpdm.networks import build_network
    from dpdm.precond import VPrecond

    x, y, c = tiny_data()
    torch.manual_seed(0)
    D = VPrecond(build_network("small", img_resolution=8, img_channels=1, num_classes=c, init_scale=1.0)).double()
    params = dict(D.named_parameters())
    loss = VLoss()
    sigma, noise = loss.draw(len(x), 2, (1, 8, 8), generator=torch.Generator().manual_seed(0), device="cpu")
    batch = [x.double(), y, sigma.double(), noise.double()]
    rows = []
    D.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    whole, whole_loss = train_mod._nonprivate_grad_sum(D, loss, batch, True, params)
    assert max(rows) == 2 * len(x)                       # K = 2 draws of each of the 24 examples
    rows.clear()
    chunked, chunked_loss = train_mod._nonprivate_grad_sum(D, loss, batch, True, params, chunk_size=5)
    assert max(rows) == 2 * 5 and len(rows) == 5
    assert chunked_loss == pytest.approx(whole_loss, rel=1e-12)
    for k in params:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-10, atol=1e-12)
    empty, empty_loss = train_mod._nonprivate_grad_sum(D, loss, [t[:0] for t in batch], True, params, chunk_size=5)
    assert empty_loss == 0.0 and all(not bool(v.any()) for v in empty.values())

    seen = []
    real = train_mod._nonprivate_grad_sum
    monkeypatch.setattr(train_mod, "_nonprivate_grad_sum",
                        lambda *a, **kw: seen.append(kw.get("chunk_size")) or real(*a, **kw))
    train(tiny_plan(steps=2), x, y, c, tmp_path / "run", TrainConfig(**CFG, private=False, physical_batch=3),
          progress=False)
    assert seen == [3, 3]


class RunsCodeWhenUnpickled:
    """A pickle payload that runs `touch marker` when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": RunsCodeWhenUnpickled(marker)}, bad)
    with pytest.raises(ckpt.CheckpointError, match="weights_only") as refused:
        ckpt.load_checkpoint(bad)
    assert not marker.exists()
    # The line names what was refused and does not pass on torch's advice to load with weights_only=False.
    msg = str(refused.value)
    assert "system" in msg and "False" not in msg and "\n" not in msg
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(raw)
    assert not marker.exists()


def test_a_global_torch_does_not_allow_is_named_without_torchs_advice(tmp_path):
    """A global that is merely not allowlisted (not blocked): the line kept "(1) In PyTorch 2.6 ... Re-running
    `torch.load` with `weights_only` set to `False` will likely succeed"; now it names the global only."""
    import argparse

    bad = tmp_path / "namespace.pt"
    torch.save({"format": ckpt.FORMAT, "ledger": argparse.Namespace(steps_done=1)}, bad)
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_checkpoint(bad)
    msg = str(refused.value)
    assert msg.endswith("Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default."), msg
    assert "False" not in msg and "add_safe_globals" not in msg and "\n" not in msg


def test_an_unreadable_checkpoint_is_not_called_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot be read \(Permission denied\)$"):
        ckpt.load_checkpoint(path)


def test_truncated_checkpoint_refused(tmp_path):
    x, y, c = tiny_data()
    out = tmp_path / "run"
    train(tiny_plan(steps=2), x, y, c, out, TrainConfig(**CFG), progress=False)
    data = (out / CHECKPOINT_NAME).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(junk)
    with open(junk, "wb") as f:   # a zip, not torch's: the reason without torch's "[enforce fail at ...] ." prefix
        np.savez(f, x=np.zeros(3))
    with pytest.raises(ckpt.CheckpointError, match=r"is corrupt or truncated: file in archive is not in a subdir"):
        ckpt.load_checkpoint(junk)
    junk.write_bytes(b"junk\n")   # torch's legacy reader: KeyError 174812789, once a bare number on the line
    with pytest.raises(ckpt.CheckpointError, match=r"is corrupt or truncated: KeyError \d+$"):
        ckpt.load_checkpoint(junk)
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
    for name, what in (("folder.pt", "is a folder, not a file"), ("dangling.pt", "is a broken link"),
                       ("absent.pt", "does not exist")):
        with pytest.raises(ckpt.CheckpointError, match=what):
            ckpt.load_checkpoint(tmp_path / name)


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    """torch.save that fails before writing, or after writing part of the file (a full disk, a kill
    mid-write): the previous checkpoint stays as it was and no temporary file is left."""
    x, y, c = tiny_data()
    out = tmp_path / "run"
    train(tiny_plan(steps=2), x, y, c, out, TrainConfig(**CFG), progress=False)
    before = (out / CHECKPOINT_NAME).read_bytes()
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    def torn(obj, f, *a, **k):
        if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__"):
            f = open(f, "wb")
        f.write(b"PK\x03\x04partial")
        f.flush()
        raise OSError(28, "No space left on device")

    for failing_save in (boom, torn):
        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(OSError):
            ckpt.save_checkpoint(state, out / CHECKPOINT_NAME)
        monkeypatch.undo()
        assert (out / CHECKPOINT_NAME).read_bytes() == before
        assert sorted(p.name for p in out.iterdir()) == [".checkpointed", ".steps_done", ".train.lock", "checkpoint.pt",
                                                         "config.json", "metrics.csv", "plan.json"]


def test_a_full_disk_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """torch's writer says "unexpected pos 2043776 vs 2043668" when the disk fills: the save says the disk is full
    (an OSError), and the command ends with one line, no traceback, exit 4."""
    import shutil
    from collections import namedtuple

    from cli.main import main

    def torn(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2043776 vs 2043668")

    monkeypatch.setattr(torch, "save", torn)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10, 10, 0))
    with pytest.raises(OSError, match="no space left on device") as e:
        ckpt.atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    assert e.value.errno == 28 and not list(tmp_path.iterdir())
    with monkeypatch.context() as m:   # with room on the disk, torch's error is not called a full disk
        m.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10, 0, 1 << 30))
        with pytest.raises(RuntimeError, match="unexpected pos"):
            ckpt.atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    import accounting

    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=2.0, noise_multiplicity=1,
                                  delta=1e-5)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    np.savez(tmp_path / "d.npz", x=np.zeros((24, 1, 8, 8), np.uint8), y=np.arange(24) % 3, num_classes=3)
    code = main(["train", "--plan", str(tmp_path / "plan.json"), "--dataset", f"npz:{tmp_path / 'd.npz'}",
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 4 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("dpdm: runtime failure: no space left on the device"), err


def test_seed_is_secret_by_default_and_fixed_on_resume(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    out = tmp_path / "run"
    cfg = {**CFG, "seed": None}

    def die_at_3(steps_done):
        if steps_done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(doc, x, y, c, out, TrainConfig(**cfg), progress=False, on_step=die_at_3)
    seed = ckpt.load_checkpoint(out / CHECKPOINT_NAME)["config"]["train"]["seed"]
    assert isinstance(seed, int) and seed != 0
    assert str(seed) not in (out / "config.json").read_text()  # not in the human-readable files
    with pytest.raises(TrainError, match="another --seed"):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "seed": seed + 1}), resume=True, progress=False)
    with pytest.raises(TrainError, match="other data"):
        train(doc, x.flip(0), y, c, out, TrainConfig(**cfg), resume=True, progress=False)
    with pytest.raises(TrainError, match="the images or their labels differ"):   # it said "the images differ"
        train(doc, x, (y + 1) % c, c, out, TrainConfig(**cfg), resume=True, progress=False)
    assert train(doc, x, y, c, out, TrainConfig(**cfg), resume=True, progress=False)["steps_done"] == 4


def test_lr_schedules(tmp_path, monkeypatch):
    from dpdm.train import LR_SCHEDULES, TrainConfig, lr_at

    const = TrainConfig(lr=1e-3)
    assert [lr_at(const, s, 10) for s in (0, 5, 9)] == [1e-3] * 3
    cos = TrainConfig(lr=1e-3, lr_schedule="cosine")
    assert lr_at(cos, 0, 10) == pytest.approx(1e-3)
    assert lr_at(cos, 5, 10) == pytest.approx(5e-4)
    assert 0 < lr_at(cos, 9, 10) < 3e-5
    # It is the lr the optimizer used: step s runs Adam at lr_at(config, s, steps) (stop 48, mut49 LR3 ran it at
    # step s + 1's), and the same seeded run ends elsewhere under the two schedules.
    seen = []
    adam_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return adam_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    x, y, c = tiny_data()
    runs = {}
    for name in LR_SCHEDULES:
        seen.clear()
        cfg = TrainConfig(**CFG, lr=1e-2, lr_schedule=name)
        train(tiny_plan(steps=3), x, y, c, tmp_path / name, cfg, progress=False)
        assert seen == pytest.approx([lr_at(cfg, s, 3) for s in range(3)], rel=1e-12), name
        runs[name] = params_of(tmp_path / name)
    assert seen == pytest.approx([1e-2, 7.5e-3, 2.5e-3])   # the cosine run, the last one
    assert any(not torch.equal(runs["constant"][k], runs["cosine"][k]) for k in runs["constant"])
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_train_sigma_narrows_the_noise_levels_and_the_sampler_follows(tmp_path):
    from dpdm.loss import VLoss
    from dpdm.sample import sample_checkpoint

    v = VLoss.from_sigma_range(0.05, 20.0)
    s = v.draw_sigma((20000,), generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float64)
    assert 0.05 * (1 - 1e-9) <= float(s.min()) and float(s.max()) <= 20.0 * (1 + 1e-9)
    assert float(s.min()) < 0.06 and float(s.max()) > 15.0
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VLoss.from_sigma_range(1.0, 1.0)
    with pytest.raises(ValueError, match="precond='v' only"):
        TrainConfig(precond="edm", train_sigma=(0.05, 20.0))
    with pytest.raises(ValueError, match="0 < min < max"):
        TrainConfig(precond="v", train_sigma=(0.0, 20.0))

    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    out = tmp_path / "run"
    train(doc, x, y, c, out, TrainConfig(**{**CFG, "precond": "v", "train_sigma": (0.05, 20.0)}), progress=False)
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    assert tuple(state["config"]["train"]["train_sigma"]) == (0.05, 20.0)
    meta = sample_checkpoint(out / CHECKPOINT_NAME, n=3, sampler_steps=2, out_path=tmp_path / "s.npz")
    assert meta["sigma_min"] == 0.05 and meta["sigma_max"] == 20.0
    meta = sample_checkpoint(out / CHECKPOINT_NAME, n=3, sampler_steps=2, sigma_min=0.01, out_path=tmp_path / "s.npz")
    assert meta["sigma_min"] == 0.01   # an explicit value is honoured


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_power_ema_is_edm2s_average_and_survives_resume(tmp_path):
    from dpdm.train import PowerEMA, power_ema_sigma_rel

    # beta_t = (1 - 1/t)^(gamma + 1): after T updates the average weighs iterate t by
    # prod_{s>t} beta_s * (1 - beta_t); with gamma = 0 that is the uniform mean of the iterates.
    net = torch.nn.Linear(1, 1, bias=False)
    ema0, ema2 = PowerEMA(net, 1e-12), PowerEMA(net, 2.0)
    values = [3.0, -1.0, 4.0, 1.0, 5.0]
    for t, v in enumerate(values):
        with torch.no_grad():
            net.weight.fill_(v)
        ema0.update(net, t)
        ema2.update(net, t)
    assert float(ema0.model.weight) == pytest.approx(np.mean(values), rel=1e-6)
    w = np.zeros(len(values))
    for t in range(1, len(values) + 1):
        beta = (1 - 1 / t) ** 3
        w *= beta
        w[t - 1] = 1 - beta
    assert float(ema2.model.weight) == pytest.approx(float(np.dot(w, values)), rel=1e-6)
    assert power_ema_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-3)   # EDM2's pairing of gamma and sigma_rel

    # In a run: kept per exponent in the checkpoint, exact across a kill and resume, and sampled from.
    x, y, c = tiny_data()
    doc = tiny_plan(steps=5)
    cfg = TrainConfig(**CFG, ema_powers=(1.0, 4.0))
    full, part = tmp_path / "full", tmp_path / "part"
    train(doc, x, y, c, full, cfg, progress=False)

    class Killed(Exception):
        pass

    def die_at_3(steps_done):
        if steps_done == 3:
            raise Killed

    with pytest.raises(Killed):
        train(doc, x, y, c, part, cfg, progress=False, on_step=die_at_3)
    with pytest.raises(TrainError, match="power EMAs"):
        train(doc, x, y, c, part, TrainConfig(**CFG, ema_powers=(2.0,)), resume=True, progress=False)
    train(doc, x, y, c, part, cfg, resume=True, progress=False)
    a, b = params_of(full, "ema_power"), params_of(part, "ema_power")
    assert sorted(a) == ["1", "4"]
    for key in a:
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0)
    ema = params_of(full, "ema")
    assert any(not torch.equal(a["1"][k], ema[k]) for k in ema)   # a different average from the main EMA

    from dpdm.sample import SampleError, sample_checkpoint

    r = sample_checkpoint(full / CHECKPOINT_NAME, n=3, sampler_steps=2, weights="power:4", out_path=tmp_path / "s.npz")
    assert r["weights"] == "power:4"
    with pytest.raises(SampleError, match="power:1, power:4"):
        sample_checkpoint(full / CHECKPOINT_NAME, n=3, sampler_steps=2, weights="power:3", out_path=tmp_path / "t.npz")
    with pytest.raises(ValueError, match="ema_powers"):
        TrainConfig(ema_powers=(0.0,))


def _public_run(tmp_path, classes=3, steps=3):
    """A --no-dp run on other (public) images: the warm start of the tests below."""
    x_pub, y_pub, c = tiny_data(n=30, classes=classes, seed=7)
    out = tmp_path / "public"
    train(tiny_plan(n=30, steps=steps), x_pub, y_pub, c, out, TrainConfig(**{**CFG, "seed": 11}, private=False),
          dataset_name="public-tiny", progress=False)
    return out / CHECKPOINT_NAME


def test_warm_start_from_images_derived_from_the_private_ones_is_refused(tmp_path):
    # digits28-aug is made from digits28's images: other name, other pixels, same digits.
    x_pub, y_pub, c = tiny_data(n=30, seed=7)
    train(tiny_plan(n=30, steps=2), x_pub, y_pub, c, tmp_path / "aug", TrainConfig(**CFG, private=False),
          dataset_name="digits28-aug", progress=False)
    x, y, c = tiny_data()
    with pytest.raises(TrainError, match="same data"):
        train(tiny_plan(steps=2), x, y, c, tmp_path / "run",
              TrainConfig(**CFG, init_from=str(tmp_path / "aug" / CHECKPOINT_NAME)), dataset_name="digits28",
              progress=False)
    assert not (tmp_path / "run").exists()


def test_warm_start_begins_at_the_public_ema_and_is_recorded(tmp_path):
    init = _public_run(tmp_path)
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    out = tmp_path / "run"
    # lr 1e-12: the run cannot move, so its weights show where it started.
    cfg = TrainConfig(**CFG, lr=1e-12, init_from=str(init))
    train(doc, x, y, c, out, cfg, dataset_name="tiny", progress=False)
    start = ckpt.load_checkpoint(init)["ema"]
    got = params_of(out)
    for k, v in start.items():
        torch.testing.assert_close(got[k], v, atol=1e-9, rtol=0)
    cold = tmp_path / "cold"
    train(doc, x, y, c, cold, TrainConfig(**CFG, lr=1e-12), dataset_name="tiny", progress=False)
    cold_params = params_of(cold)
    assert any(not torch.allclose(cold_params[k], v) for k, v in start.items())
    record = ckpt.load_checkpoint(out / CHECKPOINT_NAME)["config"]["init"]
    assert record["dataset"] == "public-tiny" and record["private"] is False and record["weights"] == "ema"
    import hashlib
    assert record["sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    assert json.loads((out / "config.json").read_text())["init"]["sha256"] == record["sha256"]
    # Its samples say where it started; a cold run's say nothing.
    from dpdm.sample import sample_checkpoint
    assert sample_checkpoint(out / CHECKPOINT_NAME, n=2, sampler_steps=2, out_path=tmp_path / "w.npz")[
        "init_dataset"] == "public-tiny"
    with np.load(tmp_path / "w.npz") as z:
        assert str(z["meta_init_dataset"]) == "public-tiny"
    assert sample_checkpoint(cold / CHECKPOINT_NAME, n=2, sampler_steps=2, out_path=tmp_path / "c.npz")[
        "init_dataset"] is None


def test_the_run_records_its_path_datas_absolute_path(tmp_path, monkeypatch):
    """`train(dataset_name="npz:data.npz")` (benchmarks/quality.py passes the plan's name) recorded the relative
    path: `dpdm audit` run from another folder read another file of that name, or none."""
    x, y, c = tiny_data()
    monkeypatch.chdir(tmp_path)
    train(tiny_plan(steps=1), x, y, c, tmp_path / "run", TrainConfig(**CFG), dataset_name="npz:data.npz",
          progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == f"npz:{tmp_path / 'data.npz'}"


def test_samples_name_a_warm_starts_data_without_its_folders(tmp_path):
    """`meta_init_dataset` copied the warm start's local path ('npz:/home/.../public_faces.npz') into samples,
    which are released; it keeps the kind and the file name now (`datasets.public_init_name`)."""
    x_pub, y_pub, c = tiny_data(n=30, seed=7)
    public = tmp_path / "public"
    train(tiny_plan(n=30, steps=2), x_pub, y_pub, c, public, TrainConfig(**CFG, private=False),
          dataset_name=f"npz:{tmp_path / 'alice' / 'public_faces.npz'}", progress=False)
    x, y, c = tiny_data()
    train(tiny_plan(steps=2), x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(public / CHECKPOINT_NAME)),
          dataset_name="tiny", progress=False)
    from dpdm.sample import sample_checkpoint
    got = sample_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, n=2, sampler_steps=2, out_path=tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert str(z["meta_init_dataset"]) == got["init_dataset"] == "npz:public_faces.npz"


def test_a_warm_start_whose_class_names_differ_is_refused_and_an_unrecorded_one_warned_of(tmp_path):
    """`--init-from` compared the class count only: a checkpoint trained on folders cat, dog started a run on
    folders dog, wolf, its "dog" embedding serving "wolf", where `--subspace-data` refuses the same pair
    (stop 47, h91 F1). Runs record their class names now; a checkpoint without them is warned of."""
    from dpdm.train import _warm_start_classes_problem

    x_pub, y_pub, _ = tiny_data(n=30, classes=2, seed=7)
    public = tmp_path / "public"
    train(tiny_plan(n=30, steps=2), x_pub, y_pub, 2, public, TrainConfig(**CFG, private=False),
          dataset_name="folder:/data/pub", class_names=("cat", "dog"), progress=False)
    assert ckpt.load_checkpoint(public / CHECKPOINT_NAME)["config"]["class_names"] == ["cat", "dog"]
    x, y, _ = tiny_data(classes=2)
    cfg = TrainConfig(**CFG, init_from=str(public / CHECKPOINT_NAME))
    with pytest.raises(TrainError, match=r"has classes cat, dog, but 'folder:/data/priv' has dog, wolf; their "
                                         r"class folders must be named alike; nothing was written"):
        train(tiny_plan(steps=2), x, y, 2, tmp_path / "run", cfg, dataset_name="folder:/data/priv",
              class_names=("dog", "wolf"), progress=False)
    with pytest.raises(TrainError, match="numbers its classes, so the labels cannot be matched"):
        train(tiny_plan(steps=2), x, y, 2, tmp_path / "run", cfg, dataset_name="npz:/data/priv.npz", progress=False)
    assert not (tmp_path / "run").exists()
    # A checkpoint of a dpdm that did not record them: trained, with one warning before the first step.
    state = ckpt.load_checkpoint(public / CHECKPOINT_NAME)
    del state["config"]["class_names"]
    ckpt.save_checkpoint(state, tmp_path / "old.pt")
    said = []
    train(tiny_plan(steps=2), x, y, 2, tmp_path / "run", TrainConfig(**CFG, init_from=str(tmp_path / "old.pt")),
          dataset_name="folder:/data/priv", class_names=("cat", "dog"), progress=False, on_start=said.append)
    assert [n for n in said[0] if "class names of its data ('folder:/data/pub') were not recorded" in n], said
    # Where both sides are known: named alike, or label numbers in order beside numbered data, is a match.
    run = {"num_classes": 3, "dataset": "npz:/p.npz"}   # an npz run records None, as an older one is read
    assert _warm_start_classes_problem({"dataset": "folder:/q", "class_names": ["0", "1", "2"]}, run) is None
    assert "sorted by name" in _warm_start_classes_problem({"dataset": "folder:/q",
                                                            "class_names": ["0", "1", "10"]}, run)
    assert _warm_start_classes_problem({"dataset": "digits28"}, run) is None
    assert _warm_start_classes_problem({"dataset": None}, run).startswith("unknown:")
    assert _warm_start_classes_problem({"dataset": "folder:/q"}, {"num_classes": 0, "dataset": "npz:/p"}) is None


def test_sampler_keywords_reach_the_sampler_and_the_npz(tmp_path):
    from dpdm.sample import sample_checkpoint
    x, y, c = tiny_data()
    out = tmp_path / "run"
    train(tiny_plan(steps=2), x, y, c, out, TrainConfig(**CFG), progress=False)
    path = out / CHECKPOINT_NAME
    heun = sample_checkpoint(path, n=3, sampler="heun", sampler_steps=3, out_path=tmp_path / "h.npz")
    churn0 = sample_checkpoint(path, n=3, sampler="churn", sampler_steps=3, sampler_kwargs={"S_churn": 0.0},
                               out_path=tmp_path / "c0.npz")
    churn = sample_checkpoint(path, n=3, sampler="churn", sampler_steps=3, sampler_kwargs={"S_churn": 5.0},
                              out_path=tmp_path / "c5.npz")
    with np.load(tmp_path / "h.npz") as h, np.load(tmp_path / "c0.npz") as c0, np.load(tmp_path / "c5.npz") as c5:
        assert np.array_equal(h["x"], c0["x"])          # churn 0 is Heun
        assert not np.array_equal(h["x"], c5["x"])
        assert json.loads(str(c5["meta_sampler_kwargs"])) == {"S_churn": 5.0}
    assert heun["sampler_kwargs"] == "{}" and churn["sampler"] == "churn"


def _assert_laundering_refused(tmp_path, leaked, doc, x, y, c):
    """A public run started from `leaked` (a run on the private images) is refused as a warm start too, also
    after it was interrupted and resumed: a resume keeps the digests its checkpoint holds (its own images' and its
    warm start's), which its own data alone cannot give back (h94 F2: recomputed from its data, they forgot
    `leaked`'s images, and a reordered copy of them then started a "private" run)."""
    x_pub, y_pub, _ = tiny_data(n=30, seed=7)
    laundered, public_doc, cfg = tmp_path / "laundered", tiny_plan(n=30, steps=2), {**CFG, "checkpoint_every": 1}
    with pytest.raises(Stop):   # killed after step 2: the checkpoint of step 1 survives
        train(public_doc, x_pub, y_pub, c, laundered,
              TrainConfig(**cfg, private=False, init_from=str(leaked / CHECKPOINT_NAME)), dataset_name="public-2",
              progress=False, on_step=stop_at(2))
    train(public_doc, x_pub, y_pub, c, laundered, TrainConfig(**cfg, private=False), dataset_name="public-2",
          resume=True, progress=False)
    kept = ckpt.load_checkpoint(laundered / CHECKPOINT_NAME)
    assert kept["ledger"]["steps_done"] == 2
    assert len(kept["image_digests"]) == 30 + len(ckpt.load_checkpoint(leaked / CHECKPOINT_NAME)["image_digests"])
    with pytest.raises(TrainError, match="through its own warm start"):
        train(doc, x, y, c, tmp_path / "run",
              TrainConfig(**CFG, init_from=str(tmp_path / "laundered" / CHECKPOINT_NAME)), dataset_name="tiny",
              progress=False)
    assert not (tmp_path / "run").exists()


def test_warm_start_from_the_private_data_is_refused(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    leaked = tmp_path / "leak"
    train(doc, x, y, c, leaked, TrainConfig(**CFG, private=False), dataset_name="other-name", progress=False)
    with pytest.raises(TrainError, match="same data"):   # same images, whatever the name
        train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(leaked / CHECKPOINT_NAME)),
              dataset_name="tiny", progress=False)
    assert not (tmp_path / "run").exists()
    init = _public_run(tmp_path)
    with pytest.raises(TrainError, match="same data"):   # same dataset name, other images
        train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(init)),
              dataset_name="public-tiny", progress=False)
    # Laundered through a public run that itself started from the private data: still refused.
    _assert_laundering_refused(tmp_path, leaked, doc, x, y, c)


def test_warm_start_from_reordered_or_partial_private_images_is_refused(tmp_path):
    """The whole-data digest changes when the images are reordered or one is left out: the images are
    compared one by one, also through a warm start's own warm start."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    perm = torch.arange(len(x) - 1, 0, -1)               # reversed, the first image left out
    leaked = tmp_path / "leak"
    train(tiny_plan(n=len(perm), steps=2), x[perm], y[perm], c, leaked, TrainConfig(**CFG, private=False),
          dataset_name="npz:public.npz", progress=False)
    table = ckpt.load_checkpoint(leaked / CHECKPOINT_NAME)["image_digests"]
    assert table.dtype == torch.uint8 and tuple(table.shape) == (len(perm), 16)
    with pytest.raises(TrainError, match=f"trained on {len(perm)} of the {len(x)} private images"):
        train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(leaked / CHECKPOINT_NAME)),
              dataset_name="tiny", progress=False)
    _assert_laundering_refused(tmp_path, leaked, doc, x, y, c)
    # Public images only: accepted, and the run keeps the digests of its own images and of its warm start's.
    init = _public_run(tmp_path)
    train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(init)), dataset_name="tiny",
          progress=False)
    kept = ckpt.load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["image_digests"]
    assert len(kept) == len(x) + 30
    from dpdm.export import export_model   # a release file does not carry them
    export_model(tmp_path / "run" / CHECKPOINT_NAME, tmp_path / "model.pt")
    release = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "image_digests" not in release and "image_digests" not in str(release["config"])


def test_warm_start_of_another_shape_or_corrupt_is_refused(tmp_path):
    init = _public_run(tmp_path, classes=4)
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    with pytest.raises(TrainError, match="num_classes=4"):
        train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(init)), dataset_name="tiny",
              progress=False)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(init.read_bytes()[:1000])
    with pytest.raises(TrainError, match=f"--init-from {str(bad)!r}: checkpoint .* is corrupt or truncated"):
        train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(bad)), dataset_name="tiny",
              progress=False)
    assert not (tmp_path / "run").exists()


def test_warm_started_run_resumes_with_its_record(tmp_path):
    init = _public_run(tmp_path)
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = TrainConfig(**CFG, init_from=str(init))
    train(doc, x, y, c, full, cfg, dataset_name="tiny", progress=False)

    class Stop(Exception):
        pass

    def stop_at_3(n):     # killed after step 3: the checkpoint of step 2 survives
        if n == 3:
            raise Stop
    with pytest.raises(Stop):
        train(doc, x, y, c, part, cfg, dataset_name="tiny", progress=False, on_step=stop_at_3)
    other = _public_run(tmp_path / "b", steps=2)
    with pytest.raises(TrainError, match="started from"):
        train(doc, x, y, c, part, TrainConfig(**CFG, init_from=str(other)), dataset_name="tiny", resume=True,
              progress=False)
    # Resuming without --init-from continues from the checkpoint and keeps the record.
    train(doc, x, y, c, part, TrainConfig(**CFG), dataset_name="tiny", resume=True, progress=False)
    resumed = params_of(part)   # loaded once: a checkpoint load per parameter took tens of seconds
    for k, v in params_of(full).items():
        torch.testing.assert_close(resumed[k], v, atol=0, rtol=0)
    saved = ckpt.load_checkpoint(part / CHECKPOINT_NAME)["config"]
    assert saved["init"] == ckpt.load_checkpoint(full / CHECKPOINT_NAME)["config"]["init"]
    assert saved["train"]["init_from"] == str(init)


def test_trainable_subset_trains_alone_and_the_rest_keeps_its_public_start(tmp_path):
    init = _public_run(tmp_path)
    start = ckpt.load_checkpoint(init)["ema"]
    x, y, c = tiny_data()
    doc = tiny_plan(steps=3)
    out = tmp_path / "run"
    cfg = TrainConfig(**CFG, init_from=str(init), trainable=("net.mid.*", "net.label_embed.*"))
    train(doc, x, y, c, out, cfg, dataset_name="tiny", progress=False)
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    trained = [k for k in start if k.startswith(("net.mid.", "net.label_embed."))]
    assert trained and len(trained) < len(start)
    for k, v in start.items():
        moved = not torch.equal(state["model"][k], v)
        if k in trained:
            assert moved or not v.is_floating_point(), k
        else:
            assert not moved, k            # no gradient, no noise: bitwise the public start
            assert torch.equal(state["ema"][k], v), k
    # The optimizer holds state for the trained parameters only.
    assert len(state["optimizer"]["state"]) == len(trained)
    public = json.loads((out / "config.json").read_text())
    assert public["train"]["trainable"] == ["net.mid.*", "net.label_embed.*"]
    assert public["trained_parameters"] == sum(v.numel() for k, v in start.items() if k in trained)


def test_trainable_resume_is_exact_and_refuses_another_subset(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    cfg = TrainConfig(**CFG, trainable=("net.dec.*",))   # a cold start: the seeded init is public too
    full, part = tmp_path / "full", tmp_path / "part"
    train(doc, x, y, c, full, cfg, dataset_name="tiny", progress=False)

    class Stop(Exception):
        pass

    def stop_at_3(n):
        if n == 3:
            raise Stop
    with pytest.raises(Stop):
        train(doc, x, y, c, part, cfg, dataset_name="tiny", progress=False, on_step=stop_at_3)
    with pytest.raises(TrainError, match="only net.dec.*, now all parameters"):
        train(doc, x, y, c, part, TrainConfig(**CFG), dataset_name="tiny", resume=True, progress=False)
    train(doc, x, y, c, part, TrainConfig(**CFG, trainable=("net.dec.*",)), dataset_name="tiny", resume=True,
          progress=False)
    resumed = params_of(part)   # loaded once: a checkpoint load per parameter took tens of seconds
    for k, v in params_of(full).items():
        torch.testing.assert_close(resumed[k], v, atol=0, rtol=0)


def test_trainable_pattern_that_matches_nothing_is_refused_before_writing(tmp_path):
    x, y, c = tiny_data()
    with pytest.raises(TrainError, match="'mid.*' match no parameter"):
        train(tiny_plan(steps=2), x, y, c, tmp_path / "run", TrainConfig(**CFG, trainable=("mid.*",)),
              progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable=())


def test_a_plan_document_whose_epsilon_does_not_recompute_is_refused(tmp_path):
    """The library re-checks a document built in Python, as load_plan checks a file: the ledger
    must never record a smaller epsilon than the accountant's."""
    import dataclasses

    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    forged = dataclasses.replace(doc, epsilon=doc.epsilon / 2)
    with pytest.raises(TrainError, match="does not re-compute"):
        train(forged, x, y, c, tmp_path / "run", TrainConfig(**CFG), progress=False)
    assert not (tmp_path / "run").exists()
    # --no-dp runs keep no budget: their plan only schedules the steps.
    assert train(forged, x, y, c, tmp_path / "nodp", TrainConfig(**CFG, private=False),
                 progress=False)["steps_done"] == 2


@pytest.mark.parametrize("forge, match", [
    (lambda doc: {"plan": dataclasses.replace(doc.plan, target_epsilon=doc.epsilon * 0.9)}, "exceeds target_epsilon"),
    (lambda doc: {"epsilon": float("nan")}, "is not a certificate"),
])
def test_a_plan_document_certified_above_its_target_or_at_nan_is_refused(tmp_path, forge, match):
    """verify_document re-computed the certificate but never checked it against the target, nor that it is a
    number (stop 42: a document certified at 21.7 against a target of 10 trained, and one at NaN trained and wrote
    a plan.json its own --resume refused). It now refuses what load_plan refuses in a file."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    forged = dataclasses.replace(doc, **forge(doc))
    with pytest.raises(accounting.PlanError, match=match):
        accounting.verify_document(forged)
    with pytest.raises(TrainError, match=match):
        train(forged, x, y, c, tmp_path / "run", TrainConfig(**CFG), progress=False)
    assert not (tmp_path / "run").exists()


def test_pick_grad_engine_takes_plain_vmap_only_where_it_is_faster_and_fits():
    from dpdm.train import pick_grad_engine

    h200 = 139.8   # GiB; the H200 figures of stop 27 (mnist preset, chunks of 1024, K 2)
    assert pick_grad_engine({"rules": 0.7049, "vmap": 0.4162}, {"rules": 19.21, "vmap": 62.77}, h200) == "vmap"
    assert pick_grad_engine({"rules": 1.0, "vmap": 0.97}, {"vmap": 1.0}, h200) == "rules"     # under 5% faster
    assert pick_grad_engine({"rules": 1.0, "vmap": None}, {"vmap": 139.0}, h200) == "rules"   # out of memory
    assert pick_grad_engine({"rules": 1.0, "vmap": 0.5}, {"vmap": 118.9}, h200) == "rules"    # over 80% of memory
    assert pick_grad_engine({"rules": None, "vmap": 0.5}, {"vmap": 60.0}, h200) == "vmap"     # the rules failed
    assert pick_grad_engine({"rules": 1.0, "vmap": 0.5}, {"vmap": None}, None) == "vmap"      # memory unknown


def test_grad_engine_auto_is_the_rules_on_a_cpu_untimed(tmp_path, monkeypatch):
    """--grad-engine auto on a CPU trains exactly as the rules do, without timing either engine, and
    records what it chose; the run's config keeps the user's choice (auto: per_layer_rules None)."""
    import dpdm.train as train_mod

    def no_timing(*a, **k):
        raise AssertionError("timed on a CPU")

    monkeypatch.setattr(train_mod, "time_grad_engines", no_timing)
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    auto = train(doc, x, y, c, tmp_path / "auto", TrainConfig(**CFG, per_layer_rules=None), progress=False)
    rules = train(doc, x, y, c, tmp_path / "rules", TrainConfig(**CFG), progress=False)
    assert auto["grad_engine"] == rules["grad_engine"] == "rules"
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["train"]["per_layer_rules"] is None
    assert config["grad_engine"] == {"engine": "rules", "auto": True, "timed": None}
    assert json.loads((tmp_path / "rules" / "config.json").read_text())["grad_engine"] == {"engine": "rules",
                                                                                         "auto": False}
    auto_params = params_of(tmp_path / "auto")
    for k, v in params_of(tmp_path / "rules").items():
        torch.testing.assert_close(auto_params[k], v, atol=0, rtol=0)
    nodp = train(doc, x, y, c, tmp_path / "nodp", TrainConfig(**CFG, per_layer_rules=None, private=False),
                 progress=False)
    assert nodp["grad_engine"] is None


def test_grad_engine_auto_on_a_gpu_follows_the_timing(monkeypatch, capsys):
    """On cuda, `choose_grad_engine` times both engines (on random inputs, no data passed in) and
    takes pick_grad_engine's answer, with one line on stderr saying why."""
    import dpdm.train as train_mod

    rows = {"vmap": {"rules": 0.7049, "vmap": 0.4162}, "rules": {"rules": 0.7049, "vmap": None}}
    for want, seconds in rows.items():
        calls = []

        def fake_timing(D, loss_fn, loss_obj, **kw):
            calls.append(kw)
            return {"chunk": kw["chunk"], "K": kw["K"], "seconds": seconds,
                    "peak_gib": {"rules": 19.21, "vmap": 62.77 if seconds["vmap"] else 139.0}}

        class Props:
            total_memory = 139.8 * 2**30

        monkeypatch.setattr(train_mod, "time_grad_engines", fake_timing)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
        got = train_mod.choose_grad_engine(None, None, None, shape=(1, 28, 28), num_classes=10, K=2, chunk=1024,
                                           device=torch.device("cuda"), private=True, dist=train_mod._Dist())
        assert got["engine"] == want and got["timed"]["seconds"] == seconds and len(calls) == 1
        assert calls[0]["chunk"] == 1024 and calls[0]["K"] == 2
        assert f"grad engine (auto): {want}" in capsys.readouterr().err


def test_time_grad_engines_runs_both_engines_on_random_inputs():
    from dpdm.loss import VLoss, engine_loss_fn
    from dpdm.train import build_denoiser, time_grad_engines

    D = build_denoiser({"model": "small", "precond": "v", "sigma_data": 0.5, "img_resolution": 8,
                        "img_channels": 1, "num_classes": 3})
    loss_obj = VLoss()
    got = time_grad_engines(D, engine_loss_fn(loss_obj, conditional=True), loss_obj, shape=(1, 8, 8),
                            num_classes=3, K=2, chunk=4, device=torch.device("cpu"), repeats=1)
    assert got["chunk"] == 4 and got["K"] == 2
    assert all(s is not None and s > 0 for s in got["seconds"].values()) and set(got["seconds"]) == {"rules", "vmap"}
    assert got["peak_gib"] == {"rules": None, "vmap": None}



@pytest.mark.parametrize("failure", ["CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                     "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory"])
def test_time_grad_engines_takes_a_cublas_or_cudnn_allocation_failure_as_out_of_memory(monkeypatch, failure):
    """h135 F2 (stop 53): cuBLAS's and cuDNN's failed allocations are plain RuntimeErrors, not torch's
    OutOfMemoryError; plain vmap's timing chunk failing so ended `dpdm train --grad-engine auto` at start-up where
    the rules fit. The engine gets None and the choice falls back to the rules; any other error is raised."""
    import dpdm.train as train_module
    from dpdm.loss import VLoss, engine_loss_fn

    real = train_module.clipped_grad_sum
    error = [RuntimeError(failure)]

    def vmap_fails(*a, per_layer_rules, **k):
        if not per_layer_rules:
            raise error[0]
        return real(*a, per_layer_rules=per_layer_rules, **k)

    monkeypatch.setattr(train_module, "clipped_grad_sum", vmap_fails)
    D = train_module.build_denoiser({"model": "small", "precond": "v", "sigma_data": 0.5, "img_resolution": 8,
                                     "img_channels": 1, "num_classes": 0})
    loss_obj = VLoss()
    timed = dict(shape=(1, 8, 8), num_classes=0, K=2, chunk=2, device=torch.device("cpu"), repeats=1)
    got = train_module.time_grad_engines(D, engine_loss_fn(loss_obj, conditional=False), loss_obj, **timed)
    assert got["seconds"]["vmap"] is None and got["seconds"]["rules"] > 0
    assert train_module.pick_grad_engine(got["seconds"], got["peak_gib"], 80.0) == "rules"
    error[0] = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train_module.time_grad_engines(D, engine_loss_fn(loss_obj, conditional=False), loss_obj, **timed)

def test_resume_refuses_other_training_knobs_before_writing(tmp_path, monkeypatch):
    """The EMA decay, train_sigma, label dropout, power EMAs and precision stay those of the run (the lr and its
    schedule may change: test_the_lr_may_change_on_resume_and_replays_exactly_from_its_segments)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    out = tmp_path / "run"
    knobs = dict(precond="v", train_sigma=(0.05, 20.0), lr=1e-3, lr_schedule="cosine", ema_decay=0.9,
                 ema_powers=(1.0,))
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG, **knobs), progress=False, on_step=stop_at(3))
    before = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "metrics.csv", "config.json")}
    for key, value, flag in [("ema_decay", 0.999, "--ema-decay"), ("train_sigma", None, "--train-sigma"),
                             ("label_dropout", 0.2, "label_dropout")]:
        with pytest.raises(TrainError, match=f"cannot resume with {flag} "):
            train(doc, x, y, c, out, TrainConfig(**CFG, **{**knobs, key: value}), resume=True, progress=False)
        assert {f: (out / f).read_bytes() for f in before} == before
    # Nor may the run's power EMA be dropped (stop 48, mut49 RF3: a check of `saved >= now` let this resume go on,
    # and the EMA would have left the next checkpoint without a word).
    with pytest.raises(TrainError, match=r"kept power EMAs \['1'\], now none"):
        train(doc, x, y, c, out, TrainConfig(**CFG, **{**knobs, "ema_powers": ()}), resume=True, progress=False)
    assert {f: (out / f).read_bytes() for f in before} == before
    # The resume goes on from the checkpoint's power EMA (mut49 EM6 restarted it from the fresh network, and only
    # a slow test saw it): its first update starts from the saved average, at update number 2.
    saved = ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ema_power"]
    first = {}
    power_update = PowerEMA.update

    def spy(self, model, num_updates):
        first.setdefault(ema_power_key(self.gamma), ({k: v.clone() for k, v in self.model.state_dict().items()},
                                                     num_updates))
        return power_update(self, model, num_updates)

    monkeypatch.setattr(PowerEMA, "update", spy)
    assert train(doc, x, y, c, out, TrainConfig(**CFG, **knobs), resume=True, progress=False)["steps_done"] == 4
    assert sorted(first) == sorted(saved) == ["1"]
    for key, (weights, num_updates) in first.items():
        assert num_updates == 2 and all(torch.equal(weights[k], saved[key][k]) for k in saved[key]), key


def test_initial_weights_do_not_reveal_the_seeds_low_bits(tmp_path):
    """Frozen parameters keep their seeded initial values and are released: they must not be those of
    torch.manual_seed(seed), which depends on the seed's low 32 bits only."""
    x, y, c = tiny_data()
    models = []
    for seed in (3, 3 + (5 << 32)):
        out = tmp_path / str(seed)
        train(tiny_plan(steps=1), x, y, c, out, TrainConfig(**{**CFG, "seed": seed}, trainable=("net.dec.*",)),
              progress=False)
        models.append(params_of(out))
    frozen = [k for k in models[0] if not k.startswith("net.dec.") and models[0][k].is_floating_point()]
    assert frozen and any(not torch.equal(models[0][k], models[1][k]) for k in frozen)


# --- the loop feeds the plan to the mechanism (the engine's own tests cannot see the loop) -------------

def test_the_train_loop_runs_the_plans_mechanism(tmp_path, monkeypatch):
    """Each step gets the plan's Poisson batch (K draws per example, clipped as one), the plan's noise
    multiplier and clip norm, the public expected batch size and a fresh noise seed; the ledger and
    metrics.csv hold the accountant's epsilon at every step done. Halving the noise, doubling the rate,
    dividing by the realised batch, reusing a noise seed or clipping each draw alone each passed every
    other train test (the tests review of stop 34)."""
    import csv

    import dpdm.train as T
    from dpdm.data import PoissonSampler

    x, y, c = tiny_data(n=24)
    doc = tiny_plan(n=24, steps=5, batch=6, K=2)
    plan = doc.plan
    calls, ledgers = [], {}
    real = T.distributed_private_grad

    def spy(D, loss_fn, *batch, **kw):
        calls.append(([t.detach().clone() for t in batch], kw))
        return real(D, loss_fn, *batch, **kw)

    out = tmp_path / "run"

    def on_step(n):   # the checkpoint of step n - 1 (checkpoint_every=1) is on disk
        if n > 1:
            ledgers[n - 1] = ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]

    made = []

    class SpySampler(PoissonSampler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(T, "distributed_private_grad", spy)
    monkeypatch.setattr(T, "PoissonSampler", SpySampler)
    train(doc, x, y, c, out, TrainConfig(**{**CFG, "checkpoint_every": 1}), progress=False, on_step=on_step)
    # The sampler's own arguments, exactly: the batches below are 120 uniform draws, and none of seed 3's falls in
    # [0.25, 0.2836), so a loop sampling at 1.1 q drew the same batches and passed (stop 42's mutation walk).
    assert [(type(m.sample_rate), m.sample_rate, m.dataset_size, m.seed) for m in made] == \
        [(float, plan.sample_rate, plan.dataset_size, CFG["seed"])]
    sampler = PoissonSampler(plan.dataset_size, plan.sample_rate, seed=CFG["seed"])
    assert len(calls) == plan.steps
    for step, (batch, kw) in enumerate(calls):
        idx = sampler.batch(step)
        assert torch.equal(batch[0], x[idx]), f"step {step}: not the plan's Poisson batch"
        assert tuple(batch[-2].shape) == (len(idx), plan.noise_multiplicity)   # sigma: [B, K], one row per example
        assert kw["noise_multiplier"] == plan.noise_multiplier and kw["clip_norm"] == plan.clip_norm
        assert kw["expected_batch_size"] == pytest.approx(plan.sample_rate * plan.dataset_size, rel=1e-12)
    assert len({kw["noise_seed"] for _, kw in calls}) == plan.steps
    assert sorted(ledgers) == list(range(1, plan.steps))
    for s, ledger in ledgers.items():
        assert ledger["steps_done"] == s
        assert ledger["epsilon_spent"] == pytest.approx(accounting.epsilon_spent(plan, s), rel=1e-9)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, plan.steps + 1))
    for row in rows:
        s = int(row["step"])
        assert float(row["epsilon_spent"]) == pytest.approx(accounting.epsilon_spent(plan, s), rel=1e-5)


def test_checkpoints_are_owner_only(tmp_path):
    """They hold the secret seed: 0600 whatever the umask, and so are metrics.csv (the noise-free losses of the
    private batches) and config.json (the data's digest), which were 0644 (h99 N2, stop 49); plan.json follows the
    umask, for other users to read. A resume rewrites an older run's metrics.csv as 0600 too."""
    import stat

    from dpdm.train import _truncate_metrics

    x, y, c = tiny_data()
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(tiny_plan(steps=2), x, y, c, out, TrainConfig(**CFG), progress=False)
        for name in (CHECKPOINT_NAME, "metrics.csv", "config.json"):
            assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600, name
        assert stat.S_IMODE(os.stat(out / "plan.json").st_mode) == 0o644
        os.chmod(out / "metrics.csv", 0o644)   # an older dpdm's
        _truncate_metrics(out / "metrics.csv", 2)   # what a resume does first
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out / "metrics.csv").st_mode) == 0o600
    assert len((out / "metrics.csv").read_text().splitlines()) == 3   # the header and the rows of steps 1 and 2


# --- the run folder: other runs' files, a second trainer, its mode; a diverging run ------------------------

def test_a_new_run_never_replaces_another_runs_files(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    # Another plan, a config.json of something else, or the metrics of a run whose checkpoint was removed.
    other = tmp_path / "other"
    other.mkdir()
    accounting.write_plan(tiny_plan(steps=5), other / "plan.json")
    with pytest.raises(TrainError, match="holds another plan.json"):
        train(doc, x, y, c, other, TrainConfig(**CFG), progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own config"}')
    with pytest.raises(TrainError, match="holds a config.json of something else"):
        train(doc, x, y, c, mine, TrainConfig(**CFG), progress=False)
    assert (mine / "config.json").read_text() == '{"my": "own config"}' and (other / "plan.json").exists()
    done = tmp_path / "done"
    train(doc, x, y, c, done, TrainConfig(**CFG), progress=False)
    (done / CHECKPOINT_NAME).unlink()
    metrics = (done / "metrics.csv").read_text()
    with pytest.raises(TrainError, match="holds a run that saved a checkpoint, but no checkpoint.pt: it was removed"):
        train(doc, x, y, c, done, TrainConfig(**{**CFG, "seed": None}), progress=False)
    assert (done / "metrics.csv").read_text() == metrics
    # Without the mark either (a run from before it), under another --checkpoint-every: the rows logged past
    # the first checkpoint of that run's own --checkpoint-every (its config.json) still tell.
    (done / ".checkpointed").unlink()
    with pytest.raises(TrainError, match="holds a run that saved a checkpoint"):
        train(doc, x, y, c, done, TrainConfig(**{**CFG, "checkpoint_every": 100}), progress=False)
    # Anything that is not the run's: data, a release file, the user's own metrics.csv.
    for name, content in (("0.png", b"an image"), ("model.pt", b"a release file"), ("metrics.csv", b"a,b\n")):
        folder = tmp_path / f"foreign-{name}"
        folder.mkdir()
        (folder / name).write_bytes(content)
        with pytest.raises(TrainError, match="not this run's|not a dpdm run's"):
            train(doc, x, y, c, folder, TrainConfig(**CFG), progress=False)
        assert [p.name for p in folder.iterdir()] == [name] and (folder / name).read_bytes() == content
    # Restarted with a smaller --checkpoint-every after a kill before the first checkpoint (at the earlier
    # run's 100): not taken for a removed checkpoint. (The steps that attempt ran are spent: stop 52's
    # test_a_new_run_after_an_attempt_killed_before_its_first_checkpoint_spends_its_steps_or_is_refused.)
    early = tmp_path / "early"
    with pytest.raises(Stop):
        train(doc, x, y, c, early, TrainConfig(**{**CFG, "checkpoint_every": 100}), progress=False, on_step=stop_at(3))
    assert train(doc, x, y, c, early, TrainConfig(**{**CFG, "checkpoint_every": 1}), progress=False,
                 spend_unsaved_steps=True)["steps_done"] == 4
    # Its own locked plan beside it (`dpdm plan --out RUN/plan.json`), or a run killed before its first
    # checkpoint: a new run may start there.
    own = tmp_path / "own"
    own.mkdir()
    accounting.write_plan(doc, own / "plan.json")
    with pytest.raises(Stop):
        train(doc, x, y, c, own, TrainConfig(**{**CFG, "checkpoint_every": 3}), progress=False, on_step=stop_at(2))
    assert not (own / CHECKPOINT_NAME).exists()
    assert train(doc, x, y, c, own, TrainConfig(**CFG), progress=False, spend_unsaved_steps=True)["steps_done"] == 4
    # Killed while saving its first checkpoint: the row of that step is logged, the checkpoint never written.
    died = tmp_path / "died"

    def killed_mid_save(state, path):
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "save_checkpoint", killed_mid_save)
        with pytest.raises(Stop):
            train(doc, x, y, c, died, TrainConfig(**CFG), progress=False)
    assert "\n2," in (died / "metrics.csv").read_text() and not (died / CHECKPOINT_NAME).exists()
    assert train(doc, x, y, c, died, TrainConfig(**CFG), progress=False, spend_unsaved_steps=True)["steps_done"] == 4


def test_a_second_trainer_in_the_same_folder_is_refused_and_the_folder_is_private(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    out = tmp_path / "run"
    verdicts = []

    def second_trainer(steps_done):   # called inside the first run, which holds the folder's lock
        if steps_done == 3:           # after the checkpoint of step 2
            with pytest.raises(TrainError, match="another dpdm train is running in"):
                train(doc, x, y, c, out, TrainConfig(**CFG), progress=False, resume=True)
            verdicts.append("refused")

    train(doc, x, y, c, out, TrainConfig(**CFG), progress=False, on_step=second_trainer)
    assert verdicts == ["refused"]
    assert (out.stat().st_mode & 0o777) == 0o700
    # The lock is released when the run ends: a finished run says so, not "another train".
    with pytest.raises(TrainError, match="is finished"):
        train(doc, x, y, c, out, TrainConfig(**CFG), progress=False, resume=True)
    # ... and when it fails, while its frame still lives (here in the traceback pytest keeps).
    failed = tmp_path / "failed"
    with pytest.raises(Stop) as stopped:
        train(doc, x, y, c, failed, TrainConfig(**CFG), progress=False, on_step=stop_at(3))
    assert stopped.tb is not None
    assert train(doc, x, y, c, failed, TrainConfig(**CFG), progress=False, resume=True)["steps_done"] == 4
    # A folder made beforehand (`dpdm plan --out RUN/plan.json`) is made private when a run starts there.
    made = tmp_path / "made"
    made.mkdir(mode=0o755)
    os.chmod(made, 0o755)
    train(tiny_plan(steps=2), x, y, c, made, TrainConfig(**CFG), progress=False)
    assert (made.stat().st_mode & 0o777) == 0o700


def test_a_run_whose_weights_become_non_finite_stops_at_once(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    steps = []
    with pytest.raises(TrainDiverged, match=r"the run diverged: .* became NaN or inf at step \d of 6 .*lower --lr"):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "lr": 1e30}), progress=False, on_step=steps.append)
    assert len(steps) < 6
    with pytest.raises(TrainError, match="cannot create the run folder"):
        train(doc, x, y, c, Path("/proc/nope/run"), TrainConfig(**CFG), progress=False)



def _failing_train_cli(tmp_path, monkeypatch, failure, at_call=3):
    """`dpdm train` argv for a 4-step run on tiny npz data, with the engine raising `failure` at its call
    `at_call` (step 3: after the checkpoint of step 2)."""
    import dpdm.train as train_module

    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=4, noise_multiplier=2.0, noise_multiplicity=1,
                                  delta=1e-5)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    x, y, _ = tiny_data()
    np.savez(tmp_path / "d.npz", x=((x + 1) * 127.5).round().numpy().astype(np.uint8), y=y.numpy(), num_classes=3)
    real, calls = train_module.clipped_grad_sum, []

    def fails(*a, **k):
        calls.append(1)
        if len(calls) == at_call:
            raise failure
        return real(*a, **k)

    monkeypatch.setattr(train_module, "clipped_grad_sum", fails)
    return ["train", "--plan", str(tmp_path / "plan.json"), "--dataset", f"npz:{tmp_path / 'd.npz'}",
            "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet", "--model", "small",
            "--checkpoint-every", "2"]


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 10737418240 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_out_of_memory_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys, failure):
    """Running out of memory mid-run (torch's CPU allocator raises a RuntimeError) is not a bug: one line naming
    the memory knob, exit 4, no traceback; the checkpoint written before stays, and --resume finishes the run."""
    from cli.main import main

    argv = _failing_train_cli(tmp_path, monkeypatch, failure)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 4 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("dpdm: runtime failure: out of memory on the machine") and "--physical-batch" in line, line
    assert "--resume" in line and ("10.0 GiB" in line) == isinstance(failure, RuntimeError), line
    assert params_of(tmp_path / "run", "ledger")["steps_done"] == 2
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    assert params_of(tmp_path / "run", "ledger")["steps_done"] == 4


def test_other_runtime_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    """Only memory failures lose the traceback: any other RuntimeError is a bug to report."""
    from cli.main import main

    code = main(_failing_train_cli(tmp_path, monkeypatch, RuntimeError("something else went wrong"), at_call=1))
    err = capsys.readouterr().err
    assert code == 4 and "Traceback" in err, err
    assert err.strip().splitlines()[-1] == "dpdm: runtime failure: RuntimeError: something else went wrong", err


@pytest.mark.parametrize("where,code,fail_at", [   # two in the default suite, the rest in make test-all (time)
    ("checkpoint", "EROFS", 2), pytest.param("checkpoint", "EACCES", 1, marks=pytest.mark.slow),
    pytest.param("checkpoint", "EIO", 2, marks=pytest.mark.slow), ("metrics", "EPERM", 3),
    pytest.param("metrics", "EROFS", 1, marks=pytest.mark.slow)])
def test_a_run_folder_that_cannot_be_written_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys,
                                                                                      where, code, fail_at):
    """A run folder that turns read-only (ext4 errors=remount-ro, an NFS server), loses its permissions or gives an
    I/O error at a checkpoint or a metrics row was a traceback and "runtime failure: OSError" (h72 F2, stop 44): a
    machine condition, like a full disk. One line naming the file and the reason, what is kept and where --resume
    continues, exit 4; the run then resumes (or, before its first checkpoint, starts again) and finishes."""
    import csv
    import errno

    from cli.main import main

    argv = [*_failing_train_cli(tmp_path, monkeypatch, None, at_call=0), "--log-every", "1"]   # no engine failure:
    # 4 steps, checkpoints at 2 and 4, a metrics row each step
    failure = OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    calls = []
    if where == "checkpoint":
        real_save = ckpt.atomic_torch_save

        def save(obj, path):   # the fail_at-th checkpoint
            calls.append(1)
            if len(calls) == fail_at:
                raise failure
            return real_save(obj, path)

        monkeypatch.setattr(ckpt, "atomic_torch_save", save)
    else:
        real_writer = csv.writer

        class Rows:   # metrics.csv's writer, failing at the row of step fail_at
            def __init__(self, f):
                self.inner = real_writer(f)

            def writerow(self, row):
                if row[0] == fail_at:
                    raise failure
                return self.inner.writerow(row)

        monkeypatch.setattr(csv, "writer", Rows)
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    what = f"the checkpoint of step {2 * fail_at}" if where == "checkpoint" else f"the metrics row of step {fail_at}"
    assert line.startswith(f"dpdm: runtime failure: cannot write {what} ("), line
    assert code in line and os.strerror(getattr(errno, code)) in line and "files written before are kept" in line
    run = tmp_path / "run"
    saved = 2 if fail_at > 2 or (where == "checkpoint" and fail_at == 2) else 0
    if saved:
        assert f"`dpdm train --resume` continues from the checkpoint of step {saved} once {str(run)!r}" in line, line
        assert params_of(run, "ledger")["steps_done"] == saved
    else:   # the steps that ran are recorded: a new run there spends them (stop 52)
        ran = "steps 1 to 2" if where == "checkpoint" else "step 1"
        assert (f"no checkpoint was saved, and {ran} ran: once {str(run)!r} can be written, the same command with "
                "--spend-unsaved-steps counts") in line and not (run / CHECKPOINT_NAME).exists(), line
    monkeypatch.undo()
    assert main([*argv, "--resume"] if saved else [*argv, "--spend-unsaved-steps"]) == 0, capsys.readouterr().err
    assert params_of(run, "ledger")["steps_done"] == 4
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    # the row of step 1 was never written, and a new run that spends step 1 goes on from step 2
    assert [int(r.split(",")[0]) for r in rows] == ([2, 3, 4] if (where, fail_at) == ("metrics", 1) else [1, 2, 3, 4])


def test_out_of_memory_line_names_the_gpu_and_the_commands_knob():
    from cli.main import _out_of_memory, _out_of_memory_line

    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                               "79.19 GiB of which 3.1 GiB is free.")
    assert _out_of_memory(e) and not _out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
    assert _out_of_memory_line(e, ["sample", "--run", "r", "--n", "9"]) == (
        "out of memory on the GPU (tried to allocate 20.00 GiB); a smaller --batch-size needs less; files written "
        "before are kept")
    assert _out_of_memory_line(MemoryError(), ["eval", "--samples", "s.npz"]) == (
        "out of memory on the machine; files written before are kept")
    # cuBLAS's and cuDNN's failed allocations are RuntimeErrors of their own (h135 F2, stop 53)
    for text in ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                 "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory"):
        assert _out_of_memory(RuntimeError(text)), text
        assert _out_of_memory_line(RuntimeError(text), ["sample", "--run", "r"]).startswith("out of memory on the GPU;")
    # --public-subspace holds its --subspace-examples' gradients whole, whatever --physical-batch is (h135 F1)
    for subspace in (["--public-subspace", "8"], ["--public-subspace=8"]):
        assert _out_of_memory_line(MemoryError(), ["train", "--plan", "p.json", *subspace, "--out", "run"]).startswith(
            "out of memory on the machine; a smaller --physical-batch or --subspace-examples needs less; ")
    assert "; a smaller --physical-batch needs less; " in _out_of_memory_line(MemoryError(), ["train", "--out", "r"])
    # a resume keeps the run's --subspace-examples: it is not advised there (r2 F2)
    assert "; a smaller --physical-batch needs less; " in _out_of_memory_line(
        MemoryError(), ["train", "--plan", "p.json", "--public-subspace", "8", "--out", "run", "--resume"])


@pytest.mark.parametrize("sigma, clip, needle", [
    (1e39, 1.0, "the noise std noise_multiplier x clip_norm = 1e+39 (clip_norm 1) is above 1e+30"),
    (2.0, 1e39, "the noise std noise_multiplier x clip_norm = 2e+39"),
    (2.0, 1e-44, "clip_norm=1e-44 is below 1e-30"),
])
def test_a_plan_float32_cannot_train_is_refused_before_anything_is_written(tmp_path, sigma, clip, needle):
    """The accountants take any noise scale; float32 does not: noise of std 1e39 overflowed to inf ("the run
    diverged ... lower --lr", exit 4), and a clip norm of 1e-44 clipped gradients to 1.575 C in the subnormals."""
    from dpdm.baseline import train_dp_classifier
    from dpdm.datasets import ImageData

    x, y, c = tiny_data()
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=sigma, clip_norm=clip,
                                  noise_multiplicity=1, delta=1e-5)
    doc = accounting.make_plan_document(plan)
    with pytest.raises(TrainError, match=re.escape(f"the plan cannot be trained: {needle}")):
        train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG), progress=False)
    assert not (tmp_path / "run").exists()
    data = ImageData(x, y, c, "tiny")
    with pytest.raises(ValueError, match=re.escape(needle)):
        train_dp_classifier(plan, data, data)
    train(accounting.make_plan_document(dataclasses.replace(plan, noise_multiplier=2.0, clip_norm=1.0)), x, y, c,
          tmp_path / "ok", TrainConfig(**CFG), progress=False)


def test_subspace_labels_outside_the_private_classes_are_refused():
    """Labels 0..9 of public digits beside 3 private classes were an IndexError deep in the network (exit 4);
    label 3 was taken silently as the dropped-label class."""
    from dpdm.train import _check_public_data

    x, y, c = tiny_data()
    config = TrainConfig(model="small", subspace_dim=2, subspace_data="npz:public.npz", subspace_examples=8)
    px = torch.rand(16, 1, 8, 8) * 2 - 1
    _check_public_data((px, torch.arange(16) % 3), x, y, config, None, num_classes=c)
    for labels in (torch.arange(16) % 4, torch.arange(16) % 10, torch.arange(16) % 3 - 1):
        with pytest.raises(TrainError, match=r"the subspace data 'npz:public.npz' has labels -?\d\.\.\d, the private "
                                             r"data 3 classes \(0\.\.2\)"):
            _check_public_data((px, labels), x, y, config, None, num_classes=c)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge"])
def test_a_run_folders_plan_json_that_is_no_file_is_refused_without_reading_it(tmp_path, kind):
    """A FIFO as RUN/plan.json blocked a new run for good; a link to /dev/zero read without end."""
    x, y, c = tiny_data()
    out = tmp_path / "run"
    out.mkdir()
    if kind == "fifo":
        os.mkfifo(out / "plan.json")
    elif kind == "dev_zero":
        (out / "plan.json").symlink_to("/dev/zero")
    else:
        with open(out / "plan.json", "wb") as f:
            f.truncate(accounting.MAX_PLAN_BYTES + 1)
    with pytest.raises(TrainError, match="is not a regular file" if kind != "huge" else "holds another plan.json"):
        train(tiny_plan(steps=2), x, y, c, out, TrainConfig(**CFG), progress=False)


def test_the_lr_may_change_on_resume_and_replays_exactly_from_its_segments(tmp_path):
    """A diverged run could never go on: a resume with the same lr diverged again, and another lr was refused. The
    lr (privacy-neutral) may change on resume; the run records each change as a segment (first step, lr, schedule),
    so an uninterrupted run given the same segments trains the same model, bit for bit."""
    from dpdm.train import lr_at

    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), progress=False, on_step=stop_at(3))
    at_2 = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    summary = train(doc, x, y, c, out, TrainConfig(**CFG, lr=4e-4, lr_schedule="cosine"), resume=True,
                    progress=False)
    from dpdm.train import _resumed_lr_segments

    assert _resumed_lr_segments(at_2, TrainConfig(lr=1e-3)) == (None, None)   # the run's own lr: no segment
    segments = ((0, 1e-3, "constant"), (2, 4e-4, "cosine"))
    saved = ckpt.load_checkpoint(out / CHECKPOINT_NAME)["config"]["train"]
    assert tuple(map(tuple, saved["lr_segments"])) == segments
    assert (saved["lr"], saved["lr_schedule"]) == (4e-4, "cosine")
    assert json.loads((out / "config.json").read_text())["train"]["lr_segments"] == [list(s) for s in segments]
    # Resumed again with that lr: no new segment; with another, one from the checkpoint's step.
    at_4 = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    assert _resumed_lr_segments(at_4, TrainConfig(lr=4e-4, lr_schedule="cosine"))[0] == segments
    assert _resumed_lr_segments(at_4, TrainConfig(lr=1e-4))[0] == (*segments, (4, 1e-4, "constant"))
    cfg = TrainConfig(**CFG, lr=4e-4, lr_schedule="cosine", lr_segments=segments)
    assert [lr_at(cfg, s, 4) for s in (0, 1)] == [1e-3, 1e-3]
    assert lr_at(cfg, 2, 4) == pytest.approx(2e-4) and lr_at(cfg, 3, 4) == pytest.approx(4e-4 * 0.5 * (1 - 0.5 ** 0.5))
    assert summary["lr"] == lr_at(cfg, 3, 4) and summary["lr_segments"] == [list(s) for s in segments]
    full = tmp_path / "full"
    train(doc, x, y, c, full, cfg, progress=False)
    for key in ("model", "ema"):
        a, b = params_of(out, key), params_of(full, key)
        assert all(torch.equal(a[k], b[k]) for k in a), key
    with pytest.raises(ValueError, match="lr_segments"):
        TrainConfig(lr=1e-3, lr_segments=((0, 1e-3, "constant"), (0, 2e-3, "constant")))
    with pytest.raises(ValueError, match="last segment"):
        TrainConfig(lr=1e-3, lr_segments=((0, 2e-3, "constant"),))


def _full_disk_at_the_rollback(monkeypatch):
    """`ckpt.save_checkpoint` fails with ENOSPC for a rollback's checkpoint (one with discarded steps) only."""
    import errno

    real = ckpt.save_checkpoint

    def full_disk(state, path):
        if state.get(ckpt.DISCARDED_STEPS_KEY):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)


def _diverging_run(monkeypatch, at_step):
    """Records what the next `train` does: the copy of each checkpoint it saves, and (step, weights) at the start of
    each private step it executes; its weights "diverge" at its `at_step`-th step."""
    import dpdm.train as train_module

    real_finite, real_grad, real_save = train_module._finite_model, train_module.plan_private_grad, ckpt.save_checkpoint
    seen = {"calls": 0, "saved": [], "steps": []}

    def finite(*a):
        seen["calls"] += 1
        return seen["calls"] != at_step and real_finite(*a)

    def grad(D, *a, step, **k):
        seen["steps"].append((step, {n: t.clone() for n, t in D.state_dict().items()}))
        return real_grad(D, *a, step=step, **k)

    def save(state, path):
        seen["saved"].append(copy.deepcopy(state))
        return real_save(state, path)

    monkeypatch.setattr(train_module, "_finite_model", finite)
    monkeypatch.setattr(train_module, "plan_private_grad", grad)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    return seen


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics_steps(out: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]


def test_a_diverged_run_counts_its_steps_and_continues_from_its_checkpoints_weights(tmp_path, monkeypatch):
    """h115 F1 (stop 51): a run that diverged at step 3 after its checkpoint of step 2 was told to resume with a
    lower lr "at no privacy cost"; the resume trained steps 3..6 again on fresh noise under a ledger of 6 steps,
    though the release depends on the 3 the first attempt spent (where it diverged chose the lr). Now the steps done
    are spent: the checkpoint holds step 2's weights, EMA, optimizer and RNG state with a ledger of 3 steps, and the
    resume goes on from step 4, so the run executes the plan's 6 private steps, no more, each once."""
    from dpdm.report_utils import epsilon_text

    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    seen = _diverging_run(monkeypatch, 3)
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=3.0), progress=False)
    eps3 = min(accounting.epsilon_spent(doc.plan, 3), doc.epsilon)
    assert str(e.value) == (
        "the run diverged: its weights, or its output on a fixed input, became NaN or inf at step 3 of 6 (lr 3); lower "
        f"--lr. Steps 1 to 3 ran on the private data and are spent (epsilon {epsilon_text(eps3)} of the plan's "
        f"{epsilon_text(doc.epsilon)}); its checkpoint now holds the weights of step 2 with a ledger "
        "of 3 steps: dpdm train --resume and a lower --lr continue from step 4 within the plan (the model loses 1 "
        "step, the budget does not get it back)")
    assert "no privacy cost" not in str(e.value)
    at_2 = seen["saved"][-2]
    assert at_2["ledger"]["steps_done"] == 2
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)   # its own checks: Adam's 2 steps, 3 done, 1 discarded
    assert state["ledger"]["steps_done"] == 3 and state["ledger"]["epsilon_spent"] == pytest.approx(eps3, rel=1e-12)
    assert state[ckpt.DISCARDED_STEPS_KEY] == 1
    for key in ("model", "ema"):
        assert _same(state[key], at_2[key]), key
    assert torch.equal(state["rng"]["torch"], at_2["rng"]["torch"])
    assert all(float(s["step"]) == 2 for s in state["optimizer"]["state"].values())
    assert _metrics_steps(out) == [1, 2, 3]   # the row of the step that diverged: it was spent
    for bad in (0, 4, True, -1):   # an edited count: Adam's steps no longer match the ledger, or it is no count
        torch.save({**state, ckpt.DISCARDED_STEPS_KEY: bad}, tmp_path / "edited.pt")
        with pytest.raises(ckpt.CheckpointError, match="corrupt or was edited"):
            ckpt.load_checkpoint(tmp_path / "edited.pt")
    with pytest.raises(TrainError, match="already holds a run; pass --resume"):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), progress=False)
    monkeypatch.undo()
    seen = _diverging_run(monkeypatch, 0)
    summary = train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)
    assert summary["steps_done"] == 6 and summary["lr_segments"] == [[0, 3.0, "constant"], [3, 1e-3, "constant"]]
    first_step, weights = seen["steps"][0]
    assert first_step == 3 and _same(weights, at_2["model"])   # step 4 starts from step 2's weights
    assert [s for s, _ in seen["steps"]] == [3, 4, 5]           # with randomness no step used (steps 1-3 drew 0-2)
    ledger = params_of(out, "ledger")
    assert ledger["steps_done"] == 6 and ledger["epsilon_spent"] == pytest.approx(doc.epsilon, rel=1e-6)
    assert ledger["epsilon_spent"] == pytest.approx(min(accounting.epsilon_spent(doc.plan, 6), doc.epsilon), rel=1e-12)
    assert params_of(out, ckpt.DISCARDED_STEPS_KEY) == 1
    assert _metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(TrainError, match="is finished"):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)


def test_a_run_that_diverged_before_its_first_checkpoint_goes_on_from_its_start_within_the_plan(tmp_path,
                                                                                                monkeypatch):
    """h115 F1 (stop 51): a run that diverged before its first checkpoint was to be "run again" in its folder, which
    spent its steps a second time under a ledger that did not count the first ones. Now the checkpoint holds the
    weights it started from (no optimizer state) with a ledger of the steps done; a new run there is refused."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    cfg = {**CFG, "checkpoint_every": 4}
    seen = _diverging_run(monkeypatch, 2)
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, TrainConfig(**cfg, lr=3.0), progress=False)
    assert "at step 2 of 6" in str(e.value) and "Steps 1 to 2 ran on the private data and are spent" in str(e.value)
    assert "its checkpoint now holds the weights it started from with a ledger of 2 steps: dpdm train --resume and " \
           "a lower --lr continue from step 3 within the plan (the model loses 2 steps" in str(e.value)
    start = seen["steps"][0][1]
    assert seen["steps"][0][0] == 0 and len(seen["saved"]) == 1
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    eps2 = min(accounting.epsilon_spent(doc.plan, 2), doc.epsilon)
    assert state["ledger"]["steps_done"] == 2 and state["ledger"]["epsilon_spent"] == pytest.approx(eps2, rel=1e-12)
    assert state[ckpt.DISCARDED_STEPS_KEY] == 2 and state["optimizer"]["state"] == {}
    assert _same(state["model"], start) and _same(state["ema"], start)
    assert _metrics_steps(out) == [1, 2] and (out / ".checkpointed").exists()
    with pytest.raises(TrainError, match="already holds a run; pass --resume"):
        train(doc, x, y, c, out, TrainConfig(**cfg, lr=1e-3), progress=False)
    monkeypatch.undo()
    seen = _diverging_run(monkeypatch, 0)
    assert train(doc, x, y, c, out, TrainConfig(**cfg, lr=1e-3), resume=True, progress=False)["steps_done"] == 6
    assert [s for s, _ in seen["steps"]] == [2, 3, 4, 5] and _same(seen["steps"][0][1], start)
    ledger = params_of(out, "ledger")
    assert ledger["epsilon_spent"] == pytest.approx(min(accounting.epsilon_spent(doc.plan, 6), doc.epsilon), rel=1e-12)
    assert _metrics_steps(out) == [1, 2, 3, 4, 5, 6]


def test_the_diverged_message_says_what_was_spent_and_what_the_checkpoint_holds():
    """One step, the last step, a --no-dp run: the line never says the steps cost nothing (h115 F1, stop 51)."""
    from dpdm.train import _diverged_message

    one = _diverged_message(1, 6, 0.5, 0, 0.25, 4.0)
    assert one.endswith("at step 1 of 6 (lr 0.5); lower --lr. Step 1 ran on the private data and is spent (epsilon "
                        "0.25 of the plan's 4); its checkpoint now holds the weights it started from with a ledger of "
                        "1 step: dpdm train --resume and a lower --lr continue from step 2 within the plan (the model "
                        "loses 1 step, the budget does not get it back)"), one
    last = _diverged_message(6, 6, 0.5, 4, 4.0, 4.0)
    assert last.endswith("at step 6 of 6 (lr 0.5); steps 1 to 6 ran on the private data and are spent (epsilon 4 of "
                         "the plan's 4), and the plan has none left: the run's checkpoint holds the weights of step 4; "
                         "a new run on these data spends a new plan on top"), last
    nodp = _diverged_message(3, 6, 0.5, 2, None, None)
    assert nodp.endswith("Steps 1 to 3 are done (--no-dp); its checkpoint now holds the weights of step 2 with a "
                         "ledger of 3 steps: dpdm train --resume and a lower --lr continue from step 4 within the plan "
                         "(the model loses 1 step)"), nodp
    assert not any("no privacy cost" in m or "lower --lr" not in m for m in (one, nodp))


@pytest.mark.parametrize("every, first, second, held, lost", [
    (4, 6, 7, "the weights its last checkpoint held (the updates of 4 steps)", 3),   # rolled back to 4 (ledger 6)
    (2, 3, 7, "the weights its last checkpoint held (the updates of 5 steps)", 2),   # r3 F2: not "of step 5" (6's)
    (8, 2, 3, "the weights it started from", 3),    # rolled back to the start (ledger 2), diverged again at 3
])
def test_a_second_divergence_names_the_weights_the_checkpoint_holds(tmp_path, monkeypatch, every, first, second,
                                                                    held, lost):
    """A run that diverged again before its next checkpoint was told its checkpoint held the weights of the rolled-back
    checkpoint's ledger step, and that the model lost only the steps since (r1 F2, stop 51); then the weights of a
    step their updates count, where a checkpoint lay between the two (r3 F2)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=12)
    out = tmp_path / "run"
    cfg = {**CFG, "checkpoint_every": every}
    _diverging_run(monkeypatch, first)
    with pytest.raises(TrainDiverged):
        train(doc, x, y, c, out, TrainConfig(**cfg, lr=1e-3), progress=False)
    monkeypatch.undo()
    _diverging_run(monkeypatch, second - first)   # the resume's (second - first)-th step
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, TrainConfig(**cfg, lr=1e-4), resume=True, progress=False)
    assert f"at step {second} of 12" in str(e.value)
    assert f"its checkpoint now holds {held} with a ledger of {second} steps" in str(e.value), str(e.value)
    assert f"the model loses {lost} steps" in str(e.value), str(e.value)


def test_a_rollback_that_cannot_be_written_advises_the_replay_that_records_it(tmp_path, monkeypatch):
    """A divergence whose rollback hits a full disk said `dpdm train --resume` continues from the checkpoint of step
    2; the lower lr the line asked for then trained step 3 again on fresh noise, the first attempt's uncounted (r1
    F1, stop 51). The line now says to resume without --lr or --lr-schedule (r3 F1: under a cosine schedule the
    lr it named was the decayed one, another lr to the resume); the run's own lr replays step 3 exactly, diverges
    there again and records it."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    _diverging_run(monkeypatch, 3)
    _full_disk_at_the_rollback(monkeypatch)
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=3.0), progress=False)
    line = str(e.value)
    assert "continues from the checkpoint of step 2" not in line and "\n" not in line, line
    assert line.endswith("steps 1 to 3 are spent but could not be recorded: no space left on the device: cannot "
                         f"write the checkpoint of step 3 (the run diverged) ({str(out / 'checkpoint.pt')!r}: No space "
                         "left on device, ENOSPC); once it can be written, `dpdm train --resume` without --lr or "
                         "--lr-schedule (the run keeps its own) replays steps 3 to 3 exactly and records them; with a "
                         "lower --lr, add --spend-unsaved-steps, which records them and goes on from step 4"), line
    monkeypatch.undo()
    with pytest.raises(TrainError, match="the run trained step 3 after its checkpoint of step 2, at lr 3.0"):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)   # the lower lr: refused
    seen = _diverging_run(monkeypatch, 1)   # the replay diverges at step 3 again, as the first attempt did
    with pytest.raises(TrainDiverged, match="Steps 1 to 3 ran on the private data and are spent"):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=3.0), resume=True, progress=False)
    assert [s for s, _ in seen["steps"]] == [2]
    ledger = torch.load(out / "checkpoint.pt", weights_only=True)["ledger"]
    assert ledger["steps_done"] == 3 and ledger["epsilon_spent"] == pytest.approx(
        min(accounting.epsilon_spent(doc.plan, 3), doc.epsilon))


def test_a_divergence_at_the_plans_last_step_whose_rollback_cannot_be_written_advises_no_step_past_it(tmp_path,
                                                                                                     monkeypatch):
    """r2 F2 (stop 52): a divergence at step 6 of 6 whose rollback hit a full disk advised a lower --lr with
    --spend-unsaved-steps, which "goes on from step 7", and that resume is refused: the plan has no step left. The
    line names the replay alone, which diverges at the plan's last step again and records it."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=3)
    out = tmp_path / "run"
    cfg = TrainConfig(**CFG, lr=3.0)
    _diverging_run(monkeypatch, 3)
    _full_disk_at_the_rollback(monkeypatch)
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, cfg, progress=False)
    line = str(e.value)
    assert "--spend-unsaved-steps" not in line and "step 4" not in line, line
    assert line.endswith("once it can be written, `dpdm train --resume` without --lr or --lr-schedule (the run keeps "
                         "its own) replays steps 3 to 3 exactly, diverges at step 3 again and records them: they end "
                         "the plan, so no lower --lr has a step left to train"), line
    monkeypatch.undo()
    with pytest.raises(TrainError, match="that is all 3 steps of its plan, so a resume at another lr has no step"):
        train(doc, x, y, c, out, dataclasses.replace(cfg, lr=1e-3), resume=True, progress=False,
              spend_unsaved_steps=True)
    _diverging_run(monkeypatch, 1)   # the replay of step 3 diverges there again, and is recorded
    with pytest.raises(TrainDiverged, match="and the plan has none left"):
        train(doc, x, y, c, out, cfg, resume=True, progress=False)
    monkeypatch.undo()
    assert params_of(out, "ledger")["steps_done"] == 3


def test_a_run_that_saved_no_checkpoint_and_cannot_record_its_last_step_says_its_plan_is_spent(tmp_path, monkeypatch):
    """r2 F2 (stop 52), before any checkpoint: a divergence at the plan's last step whose rollback, or a run whose
    checkpoint at its end, hit a full disk advised the same command with --spend-unsaved-steps, which "goes on from
    step 3" of 2; a new run there is refused, the plan spent. The lines say so."""
    import errno

    from dpdm.train import RunStorageError

    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    cfg = TrainConfig(**{**CFG, "checkpoint_every": 4}, lr=3.0)
    for name, diverges in (("diverged", True), ("full", False)):
        run = tmp_path / name
        if diverges:
            _diverging_run(monkeypatch, 2)
        monkeypatch.setattr(ckpt, "atomic_torch_save", lambda obj, path: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(TrainDiverged if diverges else RunStorageError) as e:
            train(doc, x, y, c, run, cfg, progress=False)
        monkeypatch.undo()
        line = str(e.value)
        assert "--spend-unsaved-steps" not in line and "step 3" not in line, line
        assert line.endswith(
            "no checkpoint holds them, and they are all 2 steps of the plan, which is spent (.steps_done records "
            "them): a new run on these data needs a new plan and another --out" if diverges else
            "no checkpoint was saved, and all 2 steps of the plan ran: it is spent, though no checkpoint holds its "
            "weights; a new run on these data needs a new plan and another --out"), line
    with pytest.raises(TrainError, match="that is all 2 steps of its plan, which is spent"):
        train(doc, x, y, c, run, dataclasses.replace(cfg, lr=1e-3), progress=False, spend_unsaved_steps=True)


def _run_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".train.lock"}


def _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after, every=2):
    """A run of 6 steps, checkpoints every `every`, killed after step `killed_after` (its metrics row logged): its
    data, plan, folder, and what `_diverging_run` saw (the steps it executed, its checkpoints)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    seen = _diverging_run(monkeypatch, 0)
    kill_as_step_begins(monkeypatch, killed_after)
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "checkpoint_every": every}), progress=False)
    monkeypatch.undo()
    return (x, y, c), doc, out, seen


def test_a_resume_at_another_lr_of_a_run_killed_past_its_checkpoint_is_refused(tmp_path, monkeypatch):
    """Stop 52: a run killed at step 3 after its checkpoint of step 2, resumed with another lr, trained step 3 again on
    fresh noise under a ledger of 6 steps, the killed attempt's step 3 in no ledger, though what it showed (the
    progress bar, metrics.csv) may have chosen the new lr (the README admitted it). The run records the steps it ran
    (`.steps_done`, written after each step's update, before anything shows it), and such a resume is refused, one
    line, nothing written; so is one whose record is damaged. The run's own lr replays the step
    (test_interrupted_then_resumed_equals_uninterrupted), and the lr of a resume that ran them, which the refusal
    names, not the checkpoint's; a record at or below the checkpoint says nothing."""
    (x, y, c), doc, out, _ = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=3)
    record = out / ".steps_done"
    assert record.read_text().split()[:3] == ["dpdm-steps-run", "v2", "3"] and record.stat().st_mode & 0o777 == 0o600
    assert _metrics_steps(out) == [1, 2, 3] and params_of(out, "ledger")["steps_done"] == 2
    before = _run_files(out)
    for lr, schedule in ((1e-3, "constant"), (3e-4, "cosine")):
        with pytest.raises(TrainError) as e:
            train(doc, x, y, c, out, TrainConfig(**CFG, lr=lr, lr_schedule=schedule), resume=True, progress=False)
        assert str(e.value) == (
            f"the run trained step 3 after its checkpoint of step 2, at lr 0.0003 (constant), before it stopped "
            f"({str(record)!r} records it): a resume at another lr trains it again on fresh noise, the first "
            "attempt's in no ledger, though what it showed may have chosen that lr; resume with --lr 0.0003 "
            "--lr-schedule constant, which replays it exactly (change the lr at a later checkpoint), or pass "
            "--spend-unsaved-steps to count it as spent and go on from step 4 with the weights of step 2 (nothing "
            "was written)")
        assert _run_files(out) == before
    record.write_text("dpdm-steps-run v1 three\n")   # damaged or edited: the steps that ran cannot be told
    with pytest.raises(TrainError, match=r"\.steps_done' is not the record dpdm keeps of the steps a run ran \(not "
                                         r"the line dpdm writes there: damaged or edited\), so how many steps ran "
                                         r"after the checkpoint of step 2, and at which lr, cannot be told: move it "
                                         r"away and resume with the lr the run last trained at"):
        train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False, spend_unsaved_steps=True)
    # A record of no step past the checkpoint (a kill between a checkpoint and the next step's update, or a record a
    # machine crash set back) says nothing, as none does (an older dpdm's run): the lr may change; the record then
    # goes on at the resume's steps and lr.
    record.write_text("dpdm-steps-run v1 1 0123456789abcdef 0.0003 constant\n")
    kill_as_step_begins(monkeypatch, 3)
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)
    monkeypatch.undo()
    # That resume ran step 3 at lr 0.001 and stopped: the checkpoint's own lr would now train it again on fresh noise.
    with pytest.raises(TrainError, match=r"^the run trained step 3 after its checkpoint of step 2, at lr 0\.001 "
                                         r"\(constant\).*; resume with --lr 0\.001 --lr-schedule constant, which"):
        train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)
    summary = train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)
    assert summary["steps_done"] == 6 and summary["lr_segments"] == [[0, 3e-4, "constant"], [2, 1e-3, "constant"]]
    assert [record.read_text().split()[i] for i in (2, 4, 5)] == ["6", "0.001", "constant"]


def test_a_run_killed_past_its_checkpoint_may_spend_those_steps_and_go_on_at_another_lr(tmp_path, monkeypatch):
    """--spend-unsaved-steps: steps 4 and 5, run after the checkpoint of step 3, are spent as a divergence's are. The
    checkpoint is written again before any step (a kill right after leaves them counted) with step 3's weights, EMA,
    optimizer and RNG state, a ledger of 5 steps and 2 discarded; the resume goes on from step 6 on randomness no
    step used, and the run executes the plan's 6 private steps, each once. metrics.csv keeps the rows of steps 4 and
    5, which a resume from the checkpoint's step rewrites."""
    (x, y, c), doc, out, seen = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=5, every=3)
    at_3 = seen["saved"][0]
    assert at_3["ledger"]["steps_done"] == 3 and params_of(out, "ledger")["steps_done"] == 3
    rows = (out / "metrics.csv").read_text().splitlines()
    executed = [s for s, _ in seen["steps"]]
    assert executed == [0, 1, 2, 3, 4] and _metrics_steps(out) == [1, 2, 3, 4, 5]
    cfg = TrainConfig(**{**CFG, "checkpoint_every": 3}, lr=1e-3)
    with pytest.raises(TrainError, match=r"trains them again on fresh noise, the first attempt's in no ledger, though "
                                         r"what they showed may have chosen that lr; "):   # h133 N1: not "what them"
        train(doc, x, y, c, out, cfg, resume=True, progress=False)
    seen = _diverging_run(monkeypatch, 0)
    kill_as_step_begins(monkeypatch, 5)
    with pytest.raises(Stop):   # killed as its first step (6) begins: the spend is on disk already
        train(doc, x, y, c, out, cfg, resume=True, progress=False, spend_unsaved_steps=True)
    monkeypatch.undo()
    assert seen["steps"] == []
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)   # its own checks: Adam's 3 steps, 5 done, 2 discarded
    eps5 = min(accounting.epsilon_spent(doc.plan, 5), doc.epsilon)
    assert state["ledger"]["steps_done"] == 5 and state["ledger"]["epsilon_spent"] == pytest.approx(eps5, rel=1e-12)
    assert state[ckpt.DISCARDED_STEPS_KEY] == 2
    for key in ("model", "ema"):
        assert _same(state[key], at_3[key]), key
    assert torch.equal(state["rng"]["torch"], at_3["rng"]["torch"])
    # Resumed again at the new lr (nothing is recorded past that checkpoint): step 6 starts from step 3's weights.
    seen = _diverging_run(monkeypatch, 0)
    summary = train(doc, x, y, c, out, cfg, resume=True, progress=False)
    assert [s for s, _ in seen["steps"]] == [5] and _same(seen["steps"][0][1], at_3["model"])
    executed += [s for s, _ in seen["steps"]]
    assert summary["steps_done"] == 6 and summary["lr_segments"] == [[0, 3e-4, "constant"], [5, 1e-3, "constant"]]
    ledger = params_of(out, "ledger")
    assert ledger["steps_done"] == 6 and ledger["epsilon_spent"] == pytest.approx(
        min(accounting.epsilon_spent(doc.plan, 6), doc.epsilon), rel=1e-12)
    assert params_of(out, ckpt.DISCARDED_STEPS_KEY) == 2 and executed == list(range(6))   # each step once
    assert (out / "metrics.csv").read_text().splitlines()[:6] == rows and _metrics_steps(out) == [1, 2, 3, 4, 5, 6]


def test_config_json_shows_no_lr_before_a_spends_checkpoint_lands(tmp_path, monkeypatch):
    """h133 F1 (stop 53): `--resume --lr 0.001 --spend-unsaved-steps` wrote config.json with lr 0.001 before its
    rewrite of the checkpoint; killed in between, step 3 (past the checkpoint of step 2) had run at 0.0003 alone, and
    a damaged record's refusal ("resume with the lr the run last trained at (config.json shows it)") sent the user to
    0.001, which trained step 3 again on fresh noise, the first attempt's in no ledger. config.json is written after
    the spend's checkpoint (and a new run's spend's), so it only shows an lr some start trained at, and the advice
    replays step 3 exactly: the run executes each step once."""
    (x, y, c), doc, out, seen = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=3)
    real = ckpt.save_checkpoint

    def killed_in_the_spend(state, path):
        if state.get(ckpt.DISCARDED_STEPS_KEY):
            raise Stop
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", killed_in_the_spend)
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False, spend_unsaved_steps=True)
    monkeypatch.undo()
    shown = json.loads((out / "config.json").read_text())["train"]
    assert (shown["lr"], params_of(out, "ledger")["steps_done"]) == (3e-4, 2)
    (out / ".steps_done").write_text("dpdm-steps-run v1 three\n")
    with pytest.raises(TrainError, match=r"resume with the lr the run last trained at \(config\.json shows it\)"):
        train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)
    (out / ".steps_done").rename(tmp_path / "damaged")   # "move it away and resume with" config.json's lr
    executed = [s for s, _ in seen["steps"]]
    seen = _diverging_run(monkeypatch, 0)
    kill_as_step_begins(monkeypatch, 3)
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=shown["lr"], lr_schedule=shown["lr_schedule"]), resume=True,
              progress=False)
    monkeypatch.undo()
    assert executed == [0, 1, 2] and [s for s, _ in seen["steps"]] == [2]
    # step 3 replayed on the checkpoint's segment (the same seed, batch and noise): nothing new spent
    assert (out / ".steps_done").read_text().split()[2:6:2] == ["3", "0.0003"]
    # A new run's spend (an attempt killed before its first checkpoint): its checkpoint first, then config.json.
    new = tmp_path / "new"
    kill_as_step_begins(monkeypatch, 2)
    with pytest.raises(Stop):
        train(doc, x, y, c, new, TrainConfig(**{**CFG, "checkpoint_every": 3}), progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(ckpt, "save_checkpoint", killed_in_the_spend)
    with pytest.raises(Stop):
        train(doc, x, y, c, new, TrainConfig(**{**CFG, "checkpoint_every": 3}, lr=1e-3), progress=False,
              spend_unsaved_steps=True)
    assert json.loads((new / "config.json").read_text())["train"]["lr"] == 3e-4


def test_a_resume_of_a_spent_checkpoint_notes_the_lr_change_it_makes_and_no_other(tmp_path, monkeypatch):
    """r2 F3 (stop 52): the spend records its lr from the checkpoint's own step on, and the resume dropped that
    segment: one at the spend's lr (what `dpdm train --resume` without --lr takes) was told that the lr changes from
    the lr before the spend, and one at that earlier lr changed it without a note and went on from step 4 on the
    seed the steps before the spend drew from (`run_seed_at`), the seed a copy of the folder made before the spend
    draws step 4 from, resumed at that lr, at other weights. The segment is kept, or replaced with the resume's lr:
    the notes say what changes, and those steps draw other seeds than any attempt before the spend."""
    from dpdm.train import _resumed_lr_segments, run_seed_at

    (x, y, c), doc, out, _ = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=3)   # 3 ran, 2 saved
    spend = TrainConfig(**CFG, lr=1e-3)
    kill_as_step_begins(monkeypatch, 3)
    with pytest.raises(Stop):   # killed as step 4 begins, right after the spend's checkpoint
        train(doc, x, y, c, out, spend, resume=True, progress=False, spend_unsaved_steps=True)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    spent = ((0, 3e-4, "constant"), (3, 1e-3, "constant"))
    assert state["ledger"]["steps_done"] == 3 and tuple(map(tuple, state["config"]["train"]["lr_segments"])) == spent
    assert _resumed_lr_segments(state, spend) == (spent, None)   # the run's own lr: nothing changes, no note
    given = TrainConfig(**CFG, lr=5e-4, lr_segments=((0, 3e-4, "constant"), (3, 5e-4, "constant")))
    assert _resumed_lr_segments(state, given) == (given.lr_segments, (
        "the learning rate changes from 0.001 (constant) to 0.0005 (constant) at step 3, where the run resumes; its "
        "checkpoint records the change"))
    back = ((0, 3e-4, "constant"), (3, 3e-4, "constant"))   # the lr before the spend replaces the spend's
    note = ("the learning rate changes from 0.001 (constant) to 0.0003 (constant) at step 3, where the run resumes; "
            "its checkpoint records the change")
    assert _resumed_lr_segments(state, TrainConfig(**CFG)) == (back, note)
    seed = state["config"]["train"]["seed"]
    assert all(run_seed_at(seed, back, s) not in (seed, run_seed_at(seed, spent, s)) for s in (3, 4, 5))
    notes = []
    summary = train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False, on_start=notes.extend)
    assert note in notes and summary["steps_done"] == 6 and summary["lr_segments"] == [list(s) for s in back]


def test_a_new_run_after_an_attempt_killed_before_its_first_checkpoint_spends_its_steps_or_is_refused(tmp_path,
                                                                                                       monkeypatch):
    """Stop 52: a run killed after step 2, before its first checkpoint, may be started afresh in its folder, and was
    started afresh: a new seed, steps 1.. trained again, the first attempt's 2 steps (shown in metrics.csv and on the
    bar) in no ledger. Its record (`.steps_done`) tells: a new run there is refused, one line, nothing written (all
    the plan's steps recorded: the plan is spent); with --spend-unsaved-steps it writes, before any step, a
    checkpoint of 2 steps spent and discarded on fresh weights, goes on from step 3 (the steps executed are each
    step once, on a new seed), keeps metrics.csv's rows 1 and 2, and its Adam steps and EMA warmups count the 4
    updates its weights hold."""
    import dpdm.train as train_module

    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    cfg = TrainConfig(**{**CFG, "checkpoint_every": 3, "seed": None})
    seeds = []
    real_randbits = train_module.secrets.randbits
    monkeypatch.setattr(train_module.secrets, "randbits", lambda k: seeds.append(real_randbits(k)) or seeds[-1])
    seen = _diverging_run(monkeypatch, 0)
    kill_as_step_begins(monkeypatch, 2)
    with pytest.raises(Stop):
        train(doc, x, y, c, out, cfg, progress=False)
    executed = [s for s, _ in seen["steps"]]
    assert executed == [0, 1] and not (out / CHECKPOINT_NAME).exists() and _metrics_steps(out) == [1, 2]
    rows, record = (out / "metrics.csv").read_text().splitlines(), out / ".steps_done"
    before = _run_files(out)
    with pytest.raises(TrainError) as e:
        train(doc, x, y, c, out, cfg, progress=False)
    assert str(e.value) == (
        f"a run in {str(out)!r} trained steps 1 to 2 and was stopped before its first checkpoint ({str(record)!r} "
        "records them): a new run there draws a new seed and trains from step 1 again, the first attempt's steps 1 "
        "to 2 in no ledger; pass --spend-unsaved-steps to count them as spent and go on from step 3 with new "
        "weights, or choose another --out and count them in what it releases (nothing was written)")
    assert _run_files(out) == before
    record.write_bytes(before[".steps_done"].replace(b" 2 ", b" 6 ", 1))   # all the plan's steps ran
    with pytest.raises(TrainError, match=r"trained steps 1 to 6 and was stopped before its first checkpoint .*: that "
                                         r"is all 6 steps of its plan, which is spent, though no checkpoint holds its "
                                         r"weights; make a new plan and choose another --out \(nothing was written\)$"):
        train(doc, x, y, c, out, cfg, progress=False, spend_unsaved_steps=True)
    record.write_text("dpdm-steps-run v1 two\n")
    with pytest.raises(TrainError, match=r"\.steps_done' is not the record dpdm keeps of the steps a run ran"):
        train(doc, x, y, c, out, cfg, progress=False)
    record.write_bytes(before[".steps_done"])
    monkeypatch.undo()
    seen = _diverging_run(monkeypatch, 0)
    monkeypatch.setattr(train_module.secrets, "randbits", lambda k: seeds.append(real_randbits(k)) or seeds[-1])
    ema_steps = []
    real_update = train_module.EMA.update
    monkeypatch.setattr(train_module.EMA, "update", lambda self, D, k: ema_steps.append(k) or real_update(self, D, k))
    summary = train(doc, x, y, c, out, cfg, progress=False, spend_unsaved_steps=True)
    assert len(seeds) == 2 and seeds[0] != seeds[1]   # a new secret seed: the first attempt's is lost
    first = seen["saved"][0]   # written before any step: the spend is on disk whatever happens next
    assert first["ledger"]["steps_done"] == 2 and first[ckpt.DISCARDED_STEPS_KEY] == 2
    assert first["optimizer"]["state"] == {}
    assert first["ledger"]["epsilon_spent"] == pytest.approx(min(accounting.epsilon_spent(doc.plan, 2), doc.epsilon),
                                                             rel=1e-12)
    executed += [s for s, _ in seen["steps"]]
    assert executed == list(range(6)) and ema_steps == [0, 1, 2, 3]   # each step once; the EMA warms up from 0
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)   # its own checks: Adam's 4 steps, 6 done, 2 discarded
    assert state["ledger"]["steps_done"] == 6 and state[ckpt.DISCARDED_STEPS_KEY] == 2
    assert {int(v["step"]) for v in state["optimizer"]["state"].values()} == {4}
    assert summary["steps_done"] == 6 and summary[ckpt.DISCARDED_STEPS_KEY] == 2
    assert (out / "metrics.csv").read_text().splitlines()[:3] == rows and _metrics_steps(out) == list(range(1, 7))
    assert record.read_text().split()[2] == "6"


def test_init_from_weights_that_do_not_fit_the_network_are_one_train_error_before_writing(tmp_path):
    """A warm start whose EMA weights have another shape, or lack a key (a dpdm whose network layout changed since,
    under the same preset name), was a RuntimeError traceback (exit 4); a resume's such checkpoint is one line. Weights
    of another dtype (float64) were cast without a word, where `dpdm sample` refuses them (stop 49)."""
    init = _public_run(tmp_path)
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    state = torch.load(init, weights_only=True)
    key = next(iter(state["ema"]))
    for name, edit in (("shape", lambda ema: ema.__setitem__(key, torch.zeros(3, 3))),
                       ("missing", lambda ema: ema.pop(key)),
                       ("dtype", lambda ema: ema.__setitem__(key, ema[key].double()))):   # was cast silently
        bad = {**state, "ema": dict(state["ema"])}
        edit(bad["ema"])
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(TrainError, match=rf"--init-from .*{name}\.pt'?: its EMA weights do not fit the 'small' "
                                             rf"network \(.*{re.escape(key)}"):
            train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG, init_from=str(tmp_path / f"{name}.pt")),
                  dataset_name="tiny", progress=False)
        assert not (tmp_path / "run").exists()


def test_init_from_weights_that_are_not_finite_are_one_train_error_before_writing(tmp_path):
    """A warm start holding NaN or inf (an edited file, or a diverged run saved by other code): all NaN stopped the
    run at step 1 advising a lower --lr, one NaN row of a frozen label embedding trained on silently (h92 F3)."""
    init = _public_run(tmp_path)
    x, y, c = tiny_data()
    state = torch.load(init, weights_only=True)
    key = next(k for k, v in state["ema"].items() if v.is_floating_point() and v.numel() > 1)
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = {**state, "ema": dict(state["ema"])}
        bad["ema"][key] = bad["ema"][key].clone()
        bad["ema"][key].view(-1)[0] = value
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(TrainError, match=rf"{name}\.pt'?: its EMA weights are not finite .*{re.escape(key)}"):
            train(tiny_plan(steps=2), x, y, c, tmp_path / "run",
                  TrainConfig(**CFG, init_from=str(tmp_path / f"{name}.pt")), dataset_name="tiny", progress=False)
        assert not (tmp_path / "run").exists()


def test_leftover_checkpoint_temp_files_are_removed_when_a_run_starts_or_resumes(tmp_path):
    """A checkpoint write killed after its fsync and before its rename left `.checkpoint.pt.XXXX.tmp`, a full copy of
    the run's secrets under a hidden name, for good."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG), progress=False, on_step=stop_at(3))
    left = out / ".checkpoint.pt.a51taljq.tmp"
    left.write_bytes((out / CHECKPOINT_NAME).read_bytes())
    other = out / ".notes.tmp"   # not a checkpoint write's: kept
    other.write_text("x")
    # config.json's and metrics.csv's writes (atomic_write_text) killed alike: the data's digest, the losses (h106 N2)
    written = [out / ".config.json.k3j_9x2a.tmp", out / ".metrics.csv.q0w8e7r6.tmp"]
    for path in written:
        path.write_text("a killed write")
    os.chmod(out, 0o755)   # a run folder of an older dpdm, or one opened up by hand: private again on resume
    train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)
    assert not left.exists() and other.exists()
    assert not [path for path in written if path.exists()]
    assert (out.stat().st_mode & 0o777) == 0o700
    # A run killed while writing its first checkpoint starts afresh in its folder: the leftover goes too.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".checkpoint.pt.zz.tmp").write_bytes(b"half a checkpoint")
    train(doc, x, y, c, fresh, TrainConfig(**CFG), progress=False)
    assert not (fresh / ".checkpoint.pt.zz.tmp").exists()


def test_metrics_epsilon_is_rounded_up_and_the_bar_shows_its_steps_epsilon(tmp_path, capsys):
    """metrics.csv rounded epsilon to the nearest (below the bound at some steps), and the progress bar's postfix
    was set before its update: "1/6 eps=..." showed step 2's epsilon."""
    from dpdm.report_utils import epsilon_text

    x, y, c = tiny_data()
    doc = tiny_plan(steps=5)   # its step 5: 4.559003446, which ".6g" wrote as 4.559
    out = tmp_path / "run"
    train(doc, x, y, c, out, TrainConfig(**{**CFG, "log_every": 2}), progress=True)
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [2, 4, 5]
    for row in rows:
        step, eps = int(row.split(",")[0]), row.split(",")[4]
        exact = min(accounting.epsilon_spent(doc.plan, step), doc.epsilon)
        assert eps == epsilon_text(exact, 6) and float(eps) >= exact, (step, eps, exact)
    frames = re.findall(r"(\d+)/5 [^\r\n]*?eps=([0-9.]+)(?: \(step (\d+)\))?", capsys.readouterr().err)
    assert frames and frames[-1][0] == "5"
    for shown, eps, of in frames:
        step = int(of or shown)
        assert step <= int(shown) and eps == epsilon_text(min(accounting.epsilon_spent(doc.plan, step), doc.epsilon))
        assert of or int(shown) in (2, 4, 5), frames   # an epsilon of an earlier step says which


def test_a_plan_file_without_prv_eps_error_trains_samples_and_exports(tmp_path):
    """A locked plan.json without epsilon.prv_eps_error (DESIGN.md's schema lists none; load_plan takes it) trained,
    then the run's plan.json held the token NaN and sample, export, audit and resume refused the run (stop 44).
    Now the run's files are strict JSON and the run is used as any other."""
    from dpdm.export import export_model
    from dpdm.sample import sample_checkpoint

    d = tiny_plan(steps=2).to_dict()
    del d["epsilon"]["prv_eps_error"]
    (tmp_path / "plan.json").write_text(json.dumps(d))
    doc = accounting.load_plan(tmp_path / "plan.json")
    x, y, c = tiny_data()
    out = tmp_path / "run"
    train(doc, x, y, c, out, TrainConfig(**CFG), progress=False)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    for name in ("plan.json", "config.json"):
        json.loads((out / name).read_text(), parse_constant=refuse)
    assert "prv_eps_error" not in (out / "plan.json").read_text()
    assert accounting.load_plan(out / "plan.json").digest == doc.digest
    sample_checkpoint(out / CHECKPOINT_NAME, n=2, sampler_steps=2, out_path=tmp_path / "s.npz")
    export_model(out / CHECKPOINT_NAME, tmp_path / "model.pt")
    release = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "NaN" not in release["plan"] and accounting.parse_plan(release["plan"]).digest == doc.digest


def test_the_runs_json_files_are_strict_json(tmp_path):
    """A NaN or an infinity can never reach a run's plan.json or config.json as a token no JSON reader takes:
    a ValueError before the file is written."""
    from dpdm.train import _write_json

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            _write_json(tmp_path / "x.json", {"epsilon": {"prv_eps_error": bad}})
        assert list(tmp_path.iterdir()) == []


def test_a_resume_on_other_data_is_told_what_would_resume_it(tmp_path):
    """h83 F4 (stop 46): every refusal of other data ended "resume without --dataset, or with that one", also for
    a resume that gave no --dataset (the CLI takes the run's recorded name) after that file was replaced by other
    images, or where the recorded file no longer exists (the CLI then takes the plan's name)."""
    x, y, c = tiny_data()
    other, _, _ = tiny_data(seed=1)
    doc = tiny_plan()
    out = tmp_path / "run"
    mine = tmp_path / "mine.npz"
    mine.write_bytes(b"")   # the library reads no file: only whether the recorded name still exists
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG), dataset_name=f"npz:{mine}", progress=False, on_step=stop_at(3))
    refused = "cannot resume on other data: the images or their labels differ from those the run was trained on "
    for name, advice in (
            (f"npz:{mine}", f"('npz:{mine}', which held them, now holds others: resume with --dataset naming the "
                            "data the run was trained on; the plan names 'tiny')"),
            ("tiny", f"('npz:{mine}'; resume without --dataset, or with that one)"),
            (None, f"('npz:{mine}'; resume without --dataset, or with that one)")):
        with pytest.raises(TrainError, match="^" + re.escape(refused + advice) + "$"):
            train(doc, other, y, c, out, TrainConfig(**CFG), dataset_name=name, resume=True, progress=False)
    mine.unlink()
    with pytest.raises(TrainError, match="^" + re.escape(refused + f"('npz:{mine}', which no longer exists: resume "
                                                         "with --dataset naming that data where it lies now)") + "$"):
        train(doc, other, y, c, out, TrainConfig(**CFG), dataset_name="tiny", resume=True, progress=False)
    assert ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]["steps_done"] == 2


def test_a_resume_checks_its_subspace_datas_fingerprint_not_its_path(tmp_path, monkeypatch):
    """h94 F3: --subspace-data was kept by its path alone, so a resume after the file there was replaced by other
    public images trained on without a word (another run under the same seed). The run records the images'
    fingerprint now, as it records the private data's: other images are refused, naming the file, and the same
    images resume from a new place (the file moved). A run recorded without it resumes on its path, as before."""
    from dpdm.train import SUBSPACE_DIGEST_KEY, data_fingerprint

    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    # Each start verifies the plan document (the PRV accountant, seconds on 2 busy cores): checked once here.
    accounting.verify_document(doc)
    monkeypatch.setattr(accounting, "verify_document", lambda d: None)
    pub, other = tiny_data(n=30, seed=7)[:2], tiny_data(n=30, seed=8)[:2]
    sub = dict(**{**CFG, "checkpoint_every": 1}, subspace_dim=3, subspace_every=1, subspace_examples=6)
    name, moved = f"npz:{tmp_path / 'pub.npz'}", f"npz:{tmp_path / 'moved.npz'}"   # the library reads no file
    run = tmp_path / "run"

    def resume(subspace_data, public_data, **kw):
        return train(doc, x, y, c, run, TrainConfig(**sub, subspace_data=subspace_data), dataset_name="tiny",
                     resume=True, progress=False, public_data=public_data, **kw)

    with pytest.raises(Stop):   # killed after step 2: the checkpoint of step 1 survives
        train(doc, x, y, c, run, TrainConfig(**sub, subspace_data=name), dataset_name="tiny", progress=False,
              public_data=pub, on_step=stop_at(2))
    path = run / CHECKPOINT_NAME
    assert ckpt.load_checkpoint(path)["config"][SUBSPACE_DIGEST_KEY] == data_fingerprint(*pub)
    assert json.loads((run / "config.json").read_text())[SUBSPACE_DIGEST_KEY] == data_fingerprint(*pub)
    before = path.read_bytes()
    with pytest.raises(TrainError, match="^" + re.escape(
            f"cannot resume: the run's --subspace-data {name!r} now holds other images than it was trained with "
            "(their fingerprint differs from the run's record); put the run's file back there, or give "
            "--subspace-data naming it where it now lies") + "$"):
        resume(name, other)
    with pytest.raises(TrainError, match="^" + re.escape(
            f"cannot resume with --subspace-data {moved!r}: it holds other images than the run's public data "
            f"{name!r} (their fingerprint differs from the run's record); give --subspace-data naming that file "
            "where it now lies") + "$"):
        resume(moved, other)
    assert path.read_bytes() == before
    # A run recorded without the fingerprint (an older dpdm): its path decides, as before; other images there train.
    state = ckpt.load_checkpoint(path)
    del state["config"][SUBSPACE_DIGEST_KEY]
    ckpt.save_checkpoint(state, path)
    with pytest.raises(TrainError, match=re.escape(f"cannot resume: the run used subspace_data={name!r}, now "
                                                   f"{moved!r}")):
        resume(moved, pub)
    with pytest.raises(Stop):   # trained its step 2, and stopped before saving it
        resume(name, other, on_step=stop_at(2))
    assert SUBSPACE_DIGEST_KEY not in json.loads((run / "config.json").read_text())
    path.write_bytes(before)
    # The same images at a new place: resumed, and the run records where they lie now.
    resume(moved, pub)
    saved = ckpt.load_checkpoint(path)
    assert saved["ledger"]["steps_done"] == 2 and saved["config"]["train"]["subspace_data"] == moved
    assert saved["config"][SUBSPACE_DIGEST_KEY] == data_fingerprint(*pub)
    from dpdm.export import export_model   # a release file does not carry it
    export_model(path, tmp_path / "model.pt")
    assert SUBSPACE_DIGEST_KEY not in str(torch.load(tmp_path / "model.pt", weights_only=True))


def test_power_ema_weights_are_edm2s_in_a_unit_run():
    """beta_t = (1 - 1/t)^(gamma + 1) after t updates (the first update copies the weights), checked after every
    update for three exponents: the in-process half of the slow test_power_ema_is_edm2s_average_and_survives_resume,
    so that the default suite pins the profile too (stop 48, mut49 EM2/EM3)."""
    net = torch.nn.Linear(1, 1, bias=False)
    values = [3.0, -1.0, 4.0, 1.0, 5.0]
    for gamma in (1e-12, 2.0, 6.94):
        ema = PowerEMA(net, gamma)
        w = np.zeros(len(values))
        for t, v in enumerate(values, start=1):
            with torch.no_grad():
                net.weight.fill_(v)
            ema.update(net, t - 1)
            beta = (1 - 1 / t) ** (gamma + 1)
            w *= beta
            w[t - 1] = 1 - beta
            assert float(ema.model.weight) == pytest.approx(float(np.dot(w, values)), rel=1e-6), (gamma, t)
    assert PowerEMA(net, 1e-12).beta(0) == 0.0   # the first update copies the weights


def test_step_seeds_use_63_bits():
    """step_seed is "a 63-bit seed": over 128 (step, stream) pairs most exceed 2**32 (a 32-bit seed is 2**32
    guesses away from replaying the batches and the noise), none reaches 2**63, and none repeats. Every replay
    test recomputes through step_seed itself, so none saw a 32-bit one (stop 48, mut49 RS3)."""
    from dpdm.train import step_seed

    seeds = [step_seed(3, t, s) for t in range(64) for s in (1, 2)]
    assert sum(v >= 2**32 for v in seeds) > 100 and max(seeds) < 2**63 and len(set(seeds)) == len(seeds)


def test_after_a_rollback_to_the_start_the_emas_warm_up_from_the_updates_the_weights_hold(tmp_path, monkeypatch):
    """mut54 (stop 52): a run rolled back to its start by a divergence before its first checkpoint holds the weights,
    EMA and power EMAs it started from (not the power EMAs it diverged with), and its resume warms both EMAs up from
    the updates its weights hold (steps done less the discarded ones: 0, 1, ...), as a fresh run would. The line
    names the lr of the step that diverged (under a cosine schedule, not the next step's), and the `on_step`
    callback never sees the diverged step, which is recorded first."""
    import dpdm.train as train_module
    from dpdm.train import lr_at

    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    cfg = dict(CFG, checkpoint_every=4, ema_powers=(1.0,))
    seen = _diverging_run(monkeypatch, 2)
    first, calls = TrainConfig(**cfg, lr=3.0, lr_schedule="cosine"), []
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, first, progress=False, on_step=calls.append)
    assert calls == [1]
    assert f"at step 2 of 6 (lr {lr_at(first, 1, 6):g}); lower --lr" in str(e.value), str(e.value)
    start = seen["steps"][0][1]
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    assert state[ckpt.DISCARDED_STEPS_KEY] == 2 and _same(state["ema"], start)
    assert _same(state["ema_power"][ema_power_key(1.0)], start)
    monkeypatch.undo()
    updates, real_update = [], train_module.EMA.update

    def update(self, model, num_updates):   # PowerEMA inherits it
        updates.append((type(self).__name__, num_updates))
        return real_update(self, model, num_updates)

    monkeypatch.setattr(train_module.EMA, "update", update)
    assert train(doc, x, y, c, out, TrainConfig(**cfg, lr=1e-3), resume=True, progress=False)["steps_done"] == 6
    assert updates == [(kind, n) for n in range(4) for kind in ("EMA", "PowerEMA")], updates


def test_a_rollback_before_any_checkpoint_that_cannot_be_written_says_no_checkpoint_holds_its_steps(tmp_path,
                                                                                                   monkeypatch):
    """mut54 (stop 52): the full-disk line of a divergence before the first checkpoint cannot advise `--resume`
    (there is nothing to resume). Its lr is that of the step that diverged. A new run in the folder, which the line
    advised, is refused since the run records its steps (stop 52), unless it spends them: the line says so."""
    import errno

    from dpdm.train import lr_at

    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    cfg = TrainConfig(**{**CFG, "checkpoint_every": 4}, lr=3.0, lr_schedule="cosine")
    _diverging_run(monkeypatch, 2)

    def full_disk(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, cfg, progress=False)
    line = str(e.value)
    assert (f"at step 2 of 6 (lr {lr_at(cfg, 1, 6):g}); steps 1 to 2 are spent but could not be recorded: no space "
            f"left on the device: cannot write the checkpoint of step 2 (the run diverged)") in line, line
    assert line.endswith("no checkpoint holds them: once it can be written, the same command with a lower --lr and "
                         "--spend-unsaved-steps counts them (.steps_done records them) and goes on from step 3 with "
                         "new weights"), line
    assert "--resume" not in line and not (out / CHECKPOINT_NAME).exists()
    monkeypatch.undo()
    with pytest.raises(TrainError, match=r"trained steps 1 to 2 and was stopped before its first checkpoint .*; pass "
                                         r"--spend-unsaved-steps to count them as spent and go on from step 3"):
        train(doc, x, y, c, out, dataclasses.replace(cfg, lr=1e-3), progress=False)


def test_a_rollback_whose_last_checkpoint_cannot_be_read_back_is_still_the_diverged_line(tmp_path, monkeypatch):
    """mut54 (stop 52): the rollback reads the last checkpoint back (weights_only) to write its weights again; a
    checkpoint damaged on disk meanwhile is CheckpointError, which must end in TrainDiverged's one line saying the
    steps are spent but not recorded, not in a CheckpointError about a file the user never named. It advised a
    resume, which refuses that checkpoint too: it says so (mut54 N1)."""
    import dpdm.train as train_module

    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    _diverging_run(monkeypatch, 3)
    diverging = train_module._finite_model

    def damaged(*a):
        ok = diverging(*a)
        if not ok:
            (out / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
        return ok

    monkeypatch.setattr(train_module, "_finite_model", damaged)
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=3.0), progress=False)
    line = str(e.value)
    assert "at step 3 of 6" in line and "steps 1 to 3 are spent but could not be recorded: " in line, line
    assert "\n" not in line and line.endswith(
        "the checkpoint of step 2 cannot be read back, so `dpdm train --resume` refuses it too: the run cannot go on "
        "from it; count these 3 steps in what any new run on these data releases (another --out)"), line
    monkeypatch.undo()
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)


def test_a_rolled_back_no_dp_checkpoint_holds_no_more_adam_steps_than_the_updates_it_keeps(tmp_path, monkeypatch):
    """mut54 (stop 52): a --no-dp run skips empty batches, so its Adam step counts are at most the steps whose
    updates the weights hold, steps_done - discarded_steps, not steps_done: after a rollback from step 3 to the
    checkpoint of step 2, Adam counts of 3 are an edited file; and a discarded count above the steps done is one
    whatever the optimizer holds (with none, a --no-dp resume would warm its EMAs up from negative counts)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    _diverging_run(monkeypatch, 3)
    with pytest.raises(TrainDiverged):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=3.0, private=False), progress=False)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    assert state[ckpt.DISCARDED_STEPS_KEY] == 1 and state["ledger"]["steps_done"] == 3
    assert not state["ledger"]["private"] and state["optimizer"]["state"]
    opt = copy.deepcopy(state["optimizer"])
    for per_param in opt["state"].values():
        per_param["step"] = torch.full_like(per_param["step"], 3.0) if torch.is_tensor(per_param["step"]) else 3.0
    torch.save({**state, "optimizer": opt}, tmp_path / "edited.pt")
    with pytest.raises(ckpt.CheckpointError, match="corrupt or was edited"):
        ckpt.load_checkpoint(tmp_path / "edited.pt")
    # A count past the steps done, where no Adam count can disagree (no optimizer state): the count's own check.
    torch.save({**state, "optimizer": {**opt, "state": {}}, ckpt.DISCARDED_STEPS_KEY: 4}, tmp_path / "past.pt")
    with pytest.raises(ckpt.CheckpointError, match="discarded_steps is 4, not a number of steps from 0 to its 3 done"):
        ckpt.load_checkpoint(tmp_path / "past.pt")


def test_a_second_divergence_records_every_discarded_step_and_its_checkpoint_loads(tmp_path, monkeypatch):
    """mut54 (stop 52): a run rolled back to its start at step 2 (2 steps discarded) that diverges again at step 3
    discards 3 steps in all, not the 1 since its checkpoint: with 1 its checkpoint of 3 steps whose weights hold no
    update (no Adam state) failed its own check, so `--resume` refused the run as edited, and the EMAs would warm
    up from the wrong count."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    cfg = {**CFG, "checkpoint_every": 4}
    _diverging_run(monkeypatch, 2)
    with pytest.raises(TrainDiverged):
        train(doc, x, y, c, out, TrainConfig(**cfg, lr=3.0), progress=False)
    monkeypatch.undo()
    _diverging_run(monkeypatch, 1)   # the resume's first step, step 3
    with pytest.raises(TrainDiverged, match="at step 3 of 6"):
        train(doc, x, y, c, out, TrainConfig(**cfg, lr=1e-3), resume=True, progress=False)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)   # its own checks: no Adam state, 3 done, 3 discarded
    assert state["ledger"]["steps_done"] == 3 and state[ckpt.DISCARDED_STEPS_KEY] == 3
    assert state["optimizer"]["state"] == {}


def test_a_rollback_whose_mark_alone_cannot_be_written_says_its_checkpoint_is_whole(tmp_path, monkeypatch):
    """h121 N1, mut54 N2 (stop 52): where the rolled-back checkpoint was written and only its `.checkpointed` mark
    then failed (an inode quota), the line said the steps "could not be recorded" and advised a new run, which is
    refused: checkpoint.pt holds them. It is the rollback's line, naming the mark as the one thing missing."""
    import errno

    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    out = tmp_path / "run"
    _diverging_run(monkeypatch, 3)
    touches, real_touch = [], Path.touch

    def touch(self, *a, **k):
        if self.name == ".checkpointed":
            touches.append(1)
            if len(touches) == 2:   # the rollback's: the first is the checkpoint of step 2's
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_touch(self, *a, **k)

    monkeypatch.setattr(Path, "touch", touch)
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=3.0), progress=False)
    line = str(e.value)
    assert "could not be recorded" not in line and "lower --lr. Steps 1 to 3 ran on the private data and are " in line
    assert line.endswith(f"; only the checkpoint's mark could not be written (no space left on the device: cannot "
                         f"write the mark of the checkpoint of step 3 ({str(out / '.checkpointed')!r}: Disk quota "
                         "exceeded, EDQUOT)): the checkpoint is whole, and the resume goes on from it"), line
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    assert state["ledger"]["steps_done"] == 3 and state[ckpt.DISCARDED_STEPS_KEY] == 1


def test_the_steps_records_digest_covers_every_field_of_the_lr_segments_begun_before_its_step():
    """mut55 (stop 53), t03 t04 t05: a resume replays the steps a stopped attempt ran past its checkpoint only where
    the digest of the lr segments they ran under matches the resume's (`_unsaved_steps`). A digest that left out the
    schedule or the step a segment begins at let a resume that changes only those train the steps again on fresh
    noise (`run_seed_at` hashes every field), uncounted; one that took in a segment begun at the record's own step (a
    library config's later change) refused a resume that replays them exactly."""
    from dpdm.train import _segments_digest

    ran = ((0, 3e-4, "constant"), (2, 1e-3, "constant"))
    digest = _segments_digest(ran, 5)
    assert len(digest) == 16 and digest != _segments_digest(ran[:1], 5)
    for other in (((0, 3e-4, "constant"), (2, 1e-3, "cosine")),     # the schedule alone differs
                  ((0, 3e-4, "constant"), (3, 1e-3, "constant")),   # the step of the change alone
                  ((0, 3e-4, "constant"), (2, 1e-3 * (1 + 2**-52), "constant"))):   # the lr by an ulp
        assert _segments_digest(other, 5) != digest, other
    # segments begun at or after the record's step trained none of its steps
    assert _segments_digest((*ran, (5, 5e-4, "constant")), 5) == digest
    assert _segments_digest((*ran, (4, 5e-4, "constant")), 5) != digest


def test_a_resume_that_changes_only_the_schedule_of_steps_run_past_the_checkpoint_is_refused(tmp_path, monkeypatch):
    """mut55 (stop 53), t03: a resume at 1e-3 (cosine) from the checkpoint of step 2 ran step 3 and stopped; a resume
    at 1e-3 (constant) draws step 3 on other seeds (`run_seed_at` hashes the schedule) at another lr: refused as
    another lr is."""
    (x, y, c), doc, out, _ = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=2)   # record = checkpoint
    kill_as_step_begins(monkeypatch, 3)
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3, lr_schedule="cosine"), resume=True, progress=False)
    monkeypatch.undo()
    with pytest.raises(TrainError, match=r"^the run trained step 3 after its checkpoint of step 2, at lr 0\.001 "
                                         r"\(cosine\).*; resume with --lr 0\.001 --lr-schedule cosine, which"):
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)


def test_a_divergence_right_after_a_spend_counts_each_discarded_step_once(tmp_path, monkeypatch):
    """mut55 (stop 53), t09: --spend-unsaved-steps writes the checkpoint of step 3 (steps 3 spent, step 2's weights)
    before any step; a divergence at step 4 then rolls back to it. Had the run kept the checkpoint's step as its last
    saved one, the rollback counted step 3 as discarded twice (3 of 4, Adam's 2 steps against 1 update kept) and wrote
    a checkpoint that fails its own load check: the run could never resume."""
    (x, y, c), doc, out, seen = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=3)
    at_2 = seen["saved"][0]
    assert at_2["ledger"]["steps_done"] == 2
    _diverging_run(monkeypatch, 1)   # step 4, the first the resume executes, diverges
    with pytest.raises(TrainDiverged) as e:
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False, spend_unsaved_steps=True)
    monkeypatch.undo()
    assert "at step 4 of 6" in str(e.value) and "a ledger of 4 steps" in str(e.value), str(e.value)
    state = ckpt.load_checkpoint(out / CHECKPOINT_NAME)   # its own checks: Adam's 2 steps, 4 done, 2 discarded
    assert state["ledger"]["steps_done"] == 4 and state[ckpt.DISCARDED_STEPS_KEY] == 2
    assert _same(state["model"], at_2["model"])


def test_a_replay_of_fewer_steps_than_the_record_holds_leaves_the_record_as_it_is(tmp_path, monkeypatch):
    """mut55 (stop 53), t13: the record never goes down. Steps 4 and 5 ran past the checkpoint of step 3; a resume
    at the run's own lr replays step 4 and is killed: the record still says 5, so a resume at another lr names both
    (and --spend-unsaved-steps spends both). Opened as it held nothing, the record said 4, and step 5 of the first
    attempt was in no ledger."""
    (x, y, c), doc, out, _ = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=5, every=3)
    record = out / ".steps_done"
    cfg = TrainConfig(**{**CFG, "checkpoint_every": 3})
    kill_as_step_begins(monkeypatch, 4)   # replays step 4 and stops as step 5 begins
    with pytest.raises(Stop):
        train(doc, x, y, c, out, cfg, resume=True, progress=False)
    monkeypatch.undo()
    assert record.read_text().split()[2] == "5" and params_of(out, "ledger")["steps_done"] == 3
    with pytest.raises(TrainError, match=r"^the run trained steps 4 to 5 after its checkpoint of step 3"):
        train(doc, x, y, c, out, dataclasses.replace(cfg, lr=1e-3), resume=True, progress=False)


def test_a_spend_whose_checkpoint_cannot_be_written_names_the_checkpoint_on_disk(tmp_path, monkeypatch):
    """mut55 (stop 53), t10: the checkpoint that --spend-unsaved-steps writes before any step hits a full disk. The
    line names the checkpoint still on disk (step 2's, of a resume) or says none is (a new run after an attempt
    killed before its first checkpoint, whose steps the same command spends once it can write): taken as already
    written, it sent the user to `--resume` from a checkpoint of step 3 that is not there, or of step 2 of a run
    that has none."""
    from dpdm.train import RunStorageError

    (x, y, c), doc, out, _ = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=3)
    _full_disk_at_the_rollback(monkeypatch)   # fails the checkpoints with discarded steps: the spend's
    with pytest.raises(RunStorageError) as e:
        train(doc, x, y, c, out, TrainConfig(**CFG, lr=1e-3), resume=True, progress=False, spend_unsaved_steps=True)
    monkeypatch.undo()
    line = str(e.value)
    assert "cannot write the checkpoint of step 3 (steps 3 to 3 spent)" in line, line
    assert line.endswith(f"`dpdm train --resume` continues from the checkpoint of step 2 once {str(out)!r} can be "
                         "written"), line
    assert params_of(out, "ledger")["steps_done"] == 2
    new = tmp_path / "new"
    cfg = TrainConfig(**{**CFG, "checkpoint_every": 3})
    kill_as_step_begins(monkeypatch, 2)   # steps 1 and 2 ran, no checkpoint
    with pytest.raises(Stop):
        train(doc, x, y, c, new, cfg, progress=False)
    monkeypatch.undo()
    _full_disk_at_the_rollback(monkeypatch)
    with pytest.raises(RunStorageError) as e:
        train(doc, x, y, c, new, cfg, progress=False, spend_unsaved_steps=True)
    monkeypatch.undo()
    line = str(e.value)
    assert "continues from the checkpoint" not in line and not (new / CHECKPOINT_NAME).exists(), line
    assert line.endswith(f"no checkpoint was saved, and steps 1 to 2 ran: once {str(new)!r} can be written, the same "
                         "command with --spend-unsaved-steps counts them and goes on from step 3"), line


def test_a_resume_of_a_spend_whose_steps_ran_after_an_lr_change_goes_on_at_its_lr(tmp_path, monkeypatch):
    """mut55 (stop 53), t16: a resume at lr 1e-3 ran step 3 past the checkpoint of step 2 and stopped; a resume at
    5e-4 spent it (checkpoint of step 3, the record's step) and stopped before step 4. The record (step 3, run under
    the segments of the 1e-3 resume) says nothing of a resume from step 3: it goes on at 5e-4. Read as steps past the
    checkpoint, its digest (another lr before step 3) refused that resume, "the run trained steps 4 to 3"."""
    (x, y, c), doc, out, _ = _killed_past_its_checkpoint(tmp_path, monkeypatch, killed_after=2)   # record = checkpoint
    for lr, spend in ((1e-3, False), (5e-4, True)):
        kill_as_step_begins(monkeypatch, 3)
        with pytest.raises(Stop):
            train(doc, x, y, c, out, TrainConfig(**CFG, lr=lr), resume=True, progress=False, spend_unsaved_steps=spend)
        monkeypatch.undo()
    assert params_of(out, "ledger")["steps_done"] == 3 and (out / ".steps_done").read_text().split()[2] == "3"
    summary = train(doc, x, y, c, out, TrainConfig(**CFG, lr=5e-4), resume=True, progress=False)
    assert summary["steps_done"] == 6 and summary[ckpt.DISCARDED_STEPS_KEY] == 1
    assert summary["lr_segments"] == [[0, 3e-4, "constant"], [3, 5e-4, "constant"]]


def test_the_steps_record_names_the_plan_and_data_its_steps_ran_under_and_no_other_run_spends_them(tmp_path,
                                                                                                   monkeypatch):
    """h141 F1 (stop 54): the record (`.steps_done`) named the steps a run killed before its first checkpoint ran,
    but not the plan or data they ran under: once RUN/plan.json held another plan (`dpdm plan --force`), a new run
    under it with --spend-unsaved-steps counted 2 steps at sigma 0.7 as steps of a sigma-3 plan, its ledger far below
    what they cost; other data of the plan's size spent them in a ledger that is not theirs. The record's line
    (v2) names both; such a run is refused, one line, nothing written, as is a resume beside a record of another
    plan's steps (a file copied from another run). The same plan and data spend them as before."""
    import dpdm.train as train_module
    from dpdm.train import data_fingerprint

    x, y, c = tiny_data()
    weak, strong = tiny_plan(steps=6, sigma=0.7), tiny_plan(steps=6, sigma=3.0)
    # Each start verifies the plan document (seconds on 2 busy cores): these are make_plan_document's own.
    monkeypatch.setattr(accounting, "verify_document", lambda d: None)
    out, record = tmp_path / "run", tmp_path / "run" / ".steps_done"
    cfg = TrainConfig(**{**CFG, "checkpoint_every": 4}, per_layer_rules=True)
    with pytest.raises(Stop):   # steps 1 and 2 run under `weak`, no checkpoint
        train(weak, x, y, c, out, cfg, progress=False, on_step=stop_at(3))
    line = record.read_text()
    assert len(line) == 128 and line.split() == [
        "dpdm-steps-run", "v2", "2", line.split()[3], "0.0003", "constant", weak.digest.split(":")[1][:16],
        data_fingerprint(x, y).split(":")[1][:16]]
    accounting.write_plan(strong, out / "plan.json")   # `dpdm plan --out RUN/plan.json --force`, before stop 54
    before = _run_files(out)
    other_plan = (f"a run in {str(out)!r} trained steps 1 to 2 under plan sha256:{weak.digest[7:23]}... (not this "
                  f"plan, sha256:{strong.digest[7:23]}...) and was stopped before its first checkpoint "
                  f"({str(record)!r} records them): this plan cannot count them at its own price; they stay spent "
                  "against the data they ran on: choose another --out for this run (nothing was written)")
    for spend in (True, False):
        with pytest.raises(TrainError) as e:
            train(strong, x, y, c, out, cfg, progress=False, spend_unsaved_steps=spend)
        assert str(e.value) == other_plan and _run_files(out) == before
    two = record.read_bytes()   # one step: "it stays spent", not "it stay spent" (r1 F4, stop 54)
    record.write_bytes(two.replace(b" v2 2 ", b" v2 1 ", 1))
    with pytest.raises(TrainError, match=r"trained step 1 under plan .*: this plan cannot count it at its own price; "
                                         r"it stays spent against the data it ran on: choose another --out"):
        train(strong, x, y, c, out, cfg, progress=False, spend_unsaved_steps=True)
    record.write_bytes(two)
    accounting.write_plan(weak, out / "plan.json")
    # The same plan on other data: it is the data's ledger, not the plan's price, that cannot count them (h155 N4).
    with pytest.raises(TrainError, match=r"trained steps 1 to 2 on other data \(other images or labels than these\) "
                                         r"and was stopped before its first checkpoint \(.*\): this run's ledger, of "
                                         r"these data, cannot count them; they stay spent against the data they ran "
                                         r"on: choose another --out"):
        train(weak, *tiny_data(seed=1)[:2], c, out, cfg, progress=False, spend_unsaved_steps=True)
    # Its own plan and data spend them (their record's words: "they are spent", h141 N1), and the run goes on.
    notes = []
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Stop):   # killed as step 3 begins, after the spend's
        kill_as_step_begins(mp, 2)                                   # checkpoint of steps 1 and 2
        train(weak, x, y, c, out, cfg, progress=False, spend_unsaved_steps=True, on_start=notes.extend)
    assert any(": they are spent (--spend-unsaved-steps)" in note for note in notes), notes
    assert params_of(out, "ledger")["steps_done"] == 2
    # A record of another plan's steps beside this run's checkpoint (copied from another run's folder): refused.
    foreign = record.read_bytes().replace(weak.digest[7:23].encode(), strong.digest[7:23].encode())
    record.write_bytes(foreign)
    before = _run_files(out)
    with pytest.raises(TrainError, match=re.escape(
            f"{str(record)!r} records 2 steps of a run under plan sha256:{strong.digest[7:23]}... (not this plan, "
            f"sha256:{weak.digest[7:23]}...): it is not this run's record") + r".*checkpoint of step 2, and at which "
            r"lr, cannot be told: move it back to its own run's folder and resume with the lr this run last trained "
            r"at \(config\.json shows it\), which replays them exactly \(nothing was written\)$"):
        train(weak, x, y, c, out, cfg, resume=True, progress=False)
    assert _run_files(out) == before
    # h141 N3: a folder where the resume rewrites config.json (or plan.json) is one line, exit 2, naming it, not a
    # storage failure (exit 4) that advised waiting until the folder can be written.
    record.write_bytes(before[".steps_done"])
    (out / "config.json").rename(tmp_path / "config.json")
    (out / "config.json").mkdir()
    with pytest.raises(TrainError, match=re.escape(f"{str(out / 'config.json')!r} is not a regular file (a folder, "
                                                   "FIFO, device or broken link); move it away") + "$"):
        train(weak, x, y, c, out, cfg, resume=True, progress=False)
    assert _run_files(out) == {name: v for name, v in before.items() if name != "config.json"}
    # A record of a dpdm before stop 54 (v1: no plan or data) reads as before.
    record.write_bytes(b" ".join(foreign.split()[:6]).replace(b" v2 ", b" v1 ").ljust(127) + b"\n")
    assert train_module._read_steps_record(out)[1] == (2, foreign.split()[3].decode(), 3e-4, "constant", None, None)


def test_a_sample_probing_the_run_folder_is_waited_for_not_taken_for_another_train(tmp_path, monkeypatch):
    """h141 F2 (stop 54): `dpdm sample` and `dpdm export` ask whether a run is training with a shared lock on its
    `.train.lock`, held for a moment (`cli._common._run_is_training`); a `dpdm train` taking the folder's lock in that
    moment refused, "another dpdm train is running". The lock is tried again for about a second: a probe's shared
    lock is waited for, a train's (held for its run) is still refused."""
    import fcntl
    import threading

    import dpdm.train as train_module

    lock_file = tmp_path / ".train.lock"
    probe = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(probe, fcntl.LOCK_SH)   # the probe, released 0.1 s later
    threading.Timer(0.1, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
    try:
        lock = train_module._lock_run_folder(tmp_path)
        assert lock is not None
        lock.close()
    finally:
        os.close(probe)
    monkeypatch.setattr(train_module, "_LOCK_PATIENCE_S", 0.1)
    with open(lock_file, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)   # a train
        with pytest.raises(TrainError, match=re.escape(f"another dpdm train is running in {str(tmp_path)!r}")):
            train_module._lock_run_folder(tmp_path)


def test_data_notes_take_images_in_0_1_with_black_pixels_as_nonnegative():
    """The "nonnegative" note (mut56, stop 54) is for images in [0, 1] as torchvision's ToTensor() gives them, whose
    black pixels are exactly 0 (MNIST's background): a test of min > 0 said nothing of the usual case."""
    from dpdm.train import data_notes

    x = torch.rand(4, 1, 8, 8)
    x[:, :, :2] = 0.0   # a black border
    notes = data_notes(x, None, 0)
    assert "nonnegative" in notes and "[0, " in notes["nonnegative"], notes
    assert "nonnegative" not in data_notes(x * 2 - 1, None, 0)


def test_the_steps_record_is_read_only_as_a_whole_v2_line_or_a_v1_line(tmp_path):
    """mut57 (stop 54): a v2 line of the steps record names the plan and data its steps ran under; one with fewer
    fields (its binding cut: an edit, a partial write) or more, or a binding that is not 16 lowercase hex digits,
    is damaged, never a record bound to no plan (a v1 line's reading, under which any plan would spend its steps)
    nor one bound to a part of a digest. `recorded_steps` (the CLI's reader, no torch) counts no cut v2 line, and
    reads a v1 line as a dpdm before stop 54 did: from its steps field on."""
    import dpdm.train as train_module
    from dpdm.steps_record import recorded_steps

    hexa, data = "0123456789abcdef", "fedcba9876543210"
    whole = f"dpdm-steps-run v2 3 {hexa} 0.0003 constant {hexa} {data}"

    def put(line):
        (tmp_path / ".steps_done").write_bytes(line.encode().ljust(127) + b"\n")

    put(whole)
    assert train_module._read_steps_record(tmp_path)[1:] == ((3, hexa, 3e-4, "constant", hexa, data), None)
    assert recorded_steps(tmp_path) == 3
    damaged = (None, "not the line dpdm writes there: damaged or edited")
    for cut in (whole.rsplit(" ", 1)[0], whole.rsplit(" ", 2)[0], f"{whole} {hexa}"):
        put(cut)
        assert train_module._read_steps_record(tmp_path)[1:] == damaged, cut
        assert recorded_steps(tmp_path) == 0, cut
    for bad in (data.upper(), data[:15], data[:15] + "g"):
        put(whole.replace(data, bad))
        assert train_module._read_steps_record(tmp_path)[1:] == damaged, bad
    put(f"dpdm-steps-run v1 3 {hexa} 0.0003 constant")
    assert train_module._read_steps_record(tmp_path)[1:] == ((3, hexa, 3e-4, "constant", None, None), None)
    assert recorded_steps(tmp_path) == 3
    put("dpdm-steps-run v1 3")   # a v1 line cut short: counted, as before stop 54
    assert recorded_steps(tmp_path) == 3


def test_train_reads_the_record_of_a_run_folder_spelled_with_a_leading_tilde_where_it_writes_it(tmp_path,
                                                                                                 monkeypatch):
    """r2 F1 (stop 55): d0fbe8f read the record of train(out_dir="~/run") under $HOME while train wrote it in a
    literal "~" folder, so a killed library run was started again with its steps in no ledger."""
    import dpdm.train as t
    from dpdm.steps_record import STEPS_RECORD

    def _line(steps):
        line = f"dpdm-steps-run v2 {steps} {'0' * 16} 0.001 constant {'1' * 16} {'2' * 16}"
        return (line.ljust(127) + "\n").encode()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "~" / "run").mkdir(parents=True)
    (tmp_path / "~" / "run" / STEPS_RECORD).write_bytes(_line(9))   # where train(out_dir="~/run") writes it
    (tmp_path / "home" / "run").mkdir(parents=True)
    (tmp_path / "home" / "run" / STEPS_RECORD).write_bytes(_line(4))   # another run's, under $HOME
    out = Path("~/run")
    assert t._read_steps_record(out)[1][0] == 9
    assert t._StepsRecord(out, [(0, 1e-3, "constant")], 0).path == Path("~/run") / STEPS_RECORD
