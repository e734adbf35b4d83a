"""`dpdm export`: a release file holds one set of weights, the network's description and the ledger,
and none of the run's secrets; `dpdm sample` reads it as it reads the checkpoint."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import accounting
from cli.main import main
from dpdm import checkpoint as ckpt
from tests.dpdm.test_train import RunsCodeWhenUnpickled

SEED = 987654321987


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpdm: error:") and "Traceback" not in err, err
    return lines[0]


def walk(obj, path=()):
    """Every (key path, leaf) of nested dicts and lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*path, k), k
            yield from walk(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, (*path, i))
    else:
        yield path, obj


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8), y=(np.arange(24) % 3))
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=3, noise_multiplier=2.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name=f"npz:{d / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), d / "plan.json")
    code = main(["train", "--plan", str(d / "plan.json"), "--out", str(d / "run"), "--device", "cpu", "--quiet",
                 "--seed", str(SEED), "--ema-power", "0.1"])
    assert code == 0
    return d


def test_release_file_holds_no_secret(run, capsys):
    d = run
    code, out, err = run_cli(["export", "--run", d / "run", "--out", d / "model.pt", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    state = ckpt.load_checkpoint(d / "run" / "checkpoint.pt")
    assert doc["private"] is True and doc["steps_done"] == 3 and doc["weights"] == "ema"
    assert doc["epsilon_spent"] == pytest.approx(state["ledger"]["epsilon_spent"])
    assert doc["plan_digest"] == accounting.load_plan(d / "plan.json").digest
    model = torch.load(d / "model.pt", weights_only=True)
    assert sorted(model) == sorted(ckpt.MODEL_KEYS) and model["format"] == ckpt.MODEL_FORMAT
    # The checkpoint holds the secret seed and the data's fingerprint; the release file neither.
    assert state["config"]["train"]["seed"] == SEED and state["config"]["data_digest"]
    leaves = list(walk({k: v for k, v in model.items() if k != "state_dict"}))
    keys = {p[-1] for p, _ in leaves if p}
    assert not keys & {"seed", "data_digest", "rng", "optimizer", "lineage", "checkpoint", "ema_power"}, keys
    values = [v for _, v in leaves]
    assert SEED not in values and state["config"]["data_digest"] not in values
    for name, t in model["state_dict"].items():
        assert torch.equal(t, state["ema"][name])
    assert model["ledger"] == state["ledger"]
    # The text form prints the whole sha256, the one the README says to publish.
    code, out, err = run_cli(["export", "--run", d / "run", "--out", d / "model2.pt"], capsys)
    assert code == 0 and f"sha256 {doc['sha256']}" in err and len(doc["sha256"]) == 64, err


def test_sample_from_release_file_equals_sample_from_run(run, capsys):
    d = run
    assert run_cli(["export", "--run", d / "run", "--out", d / "m.pt"], capsys)[0] == 0
    args = ["--n", 4, "--sampler-steps", 3, "--device", "cpu", "--seed", 5]
    assert run_cli(["sample", "--run", d / "run", "--out", d / "a.npz", *args], capsys)[0] == 0
    code, out, err = run_cli(["sample", "--checkpoint", d / "m.pt", "--out", d / "b.npz", "--json", *args], capsys)
    assert code == 0, err
    with np.load(d / "a.npz") as a, np.load(d / "b.npz") as b:
        assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
        assert bool(b["meta_private"]) and float(b["meta_epsilon"]) == pytest.approx(float(a["meta_epsilon"]))


def test_samples_name_the_weights_they_were_drawn_with_as_the_release_does(run, tmp_path, capsys):
    """Nothing in a samples file named the model it came from: samples of a second run of the same plan carried the
    same meta_* as the released model's, and only the release file's sha256 was there to publish (h115 F4). Samples
    now record the digest of the weights they were drawn with (meta_weights_sha256), the same from the run folder
    and from its release file, whose weights `dpdm export` keeps bit for bit and whose digest it reports beside the
    file's sha256."""
    from dpdm.sample import weights_digest

    d = run
    code, out, err = run_cli(["export", "--run", d / "run", "--out", tmp_path / "m.pt", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    state = ckpt.load_checkpoint(d / "run" / "checkpoint.pt")
    released = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]
    assert doc["sha256"] == ckpt.file_sha256(tmp_path / "m.pt")   # the file's, as before
    assert doc["weights_sha256"] == weights_digest(state["ema"]) == weights_digest(released)
    assert all(torch.equal(t, state["ema"][k]) and t.dtype == state["ema"][k].dtype for k, t in released.items())
    flipped = dict(released)   # one bit of one weight: another digest
    first = sorted(flipped)[0]
    flipped[first] = flipped[first].clone()
    flipped[first].view(-1).view(torch.int32)[0] ^= 1
    assert weights_digest(flipped) != doc["weights_sha256"]
    args = ["--n", 2, "--sampler-steps", 2, "--device", "cpu", "--json"]
    got = {}
    for name, source in (("run", ["--run", d / "run"]), ("release", ["--checkpoint", tmp_path / "m.pt"]),
                         ("raw", ["--run", d / "run", "--weights", "raw"])):
        code, out, err = run_cli(["sample", *source, "--out", tmp_path / f"{name}.npz", *args], capsys)
        assert code == 0, err
        got[name] = json.loads(out)["weights_sha256"]
        with np.load(tmp_path / f"{name}.npz") as z:
            assert str(z["meta_weights_sha256"]) == got[name]
    assert got["run"] == got["release"] == doc["weights_sha256"]
    assert got["raw"] == weights_digest(state["model"]) != got["run"]   # other weights of the same run and plan
    code, _, err = run_cli(["export", "--run", d / "run", "--out", tmp_path / "m2.pt"], capsys)
    assert code == 0 and f"sha256 {doc['sha256']}; weights sha256 {doc['weights_sha256']}" in err, err


def test_the_weights_digest_covers_names_dtypes_shapes_and_bytes_in_a_fixed_order():
    from dpdm.sample import weights_digest

    a, b = torch.arange(6, dtype=torch.float32), torch.ones(2, 2)
    digest = weights_digest({"a": a, "b": b})
    assert digest == weights_digest({"b": b.clone(), "a": a.clone()})   # the dict's order is not the network's
    assert len({digest, weights_digest({"a": a.reshape(2, 3), "b": b}), weights_digest({"c": a, "b": b}),
                weights_digest({"a": a.view(torch.int32), "b": b}), weights_digest({"a": a, "b": b.bfloat16()}),
                weights_digest({"a": a[:5], "b": b})}) == 6
    assert weights_digest({"a": a.reshape(3, 2).t(), "b": b}) == weights_digest({"a": a.reshape(3, 2).t().contiguous(),
                                                                                "b": b})


def test_one_set_of_weights(run, capsys):
    d = run
    code, _, err = run_cli(["export", "--run", d / "run", "--weights", "power:0.1", "--out", d / "p.pt"], capsys)
    assert code == 0, err
    assert "power:0.1 weights" in err
    code, _, err = run_cli(["sample", "--checkpoint", d / "p.pt", "--n", 2, "--weights", "ema", "--out", d / "p.npz"],
                           capsys)
    assert "holds only its 'power:0.1' weights" in one_error_line(code, err)
    assert not (d / "p.npz").exists()
    code, _, err = run_cli(["sample", "--checkpoint", d / "p.pt", "--n", 2, "--sampler-steps", 2,
                            "--weights", "power:0.1", "--out", d / "p.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", "--run", d / "run", "--weights", "power:0.5", "--out", d / "q.pt"], capsys)
    assert "power:0.5" in one_error_line(code, err) and not (d / "q.pt").exists()


def test_bad_input_loses_nothing(run, capsys):
    d = run
    ck = d / "run" / "checkpoint.pt"
    before = ck.read_bytes()
    code, _, err = run_cli(["export", "--checkpoint", ck, "--out", ck], capsys)
    assert "checkpoint itself" in one_error_line(code, err)
    assert ck.read_bytes() == before
    (d / "bad.pt").write_bytes(before[: len(before) // 2])
    code, _, err = run_cli(["export", "--checkpoint", d / "bad.pt", "--out", d / "x.pt"], capsys)
    one_error_line(code, err)
    assert not (d / "x.pt").exists()
    code, _, err = run_cli(["export", "--out", d / "x.pt"], capsys)
    assert "--run" in one_error_line(code, err)
    # A release file cannot be resumed or warm-started from: it is not a training checkpoint.
    assert run_cli(["export", "--run", d / "run", "--out", d / "m2.pt"], capsys)[0] == 0
    with pytest.raises(ckpt.CheckpointError, match="release file"):
        ckpt.load_checkpoint(d / "m2.pt")
    # Nor is a release file missing its ledger sampled from.
    broken = torch.load(d / "m2.pt", weights_only=True)
    del broken["ledger"]
    torch.save(broken, d / "m3.pt")
    code, _, err = run_cli(["sample", "--checkpoint", d / "m3.pt", "--n", 2, "--out", d / "m3.npz"], capsys)
    assert "incomplete" in one_error_line(code, err) and not (d / "m3.npz").exists()


def test_non_private_run_is_marked(tmp_path, run, capsys):
    """A --no-dp run's release says so. Trained under the private run's plan (the non-private ceiling), its release
    and samples do not replace the private run's of that plan without --force, nor the reverse: "the same plan"
    replaced them, exit 0, the warning printed after the private file was gone (h151 F1, stop 55)."""
    d = run
    code = main(["train", "--plan", str(d / "plan.json"), "--out", str(tmp_path / "np"), "--device", "cpu",
                 "--quiet", "--no-dp"])
    assert code == 0
    capsys.readouterr()
    code, _, err = run_cli(["export", "--run", tmp_path / "np", "--out", tmp_path / "np.pt"], capsys)
    assert code == 0 and "NON-PRIVATE" in err
    assert torch.load(tmp_path / "np.pt", weights_only=True)["ledger"]["private"] is False
    assert run_cli(["export", "--run", d / "run", "--out", tmp_path / "p.pt"], capsys)[0] == 0
    sample = ["sample", "--n", 2, "--sampler-steps", 2, "--device", "cpu"]
    assert run_cli([*sample, "--run", d / "run", "--out", tmp_path / "p.npz", "--grid", tmp_path / "p.png"],
                   capsys)[0] == 0
    # Nor its grid, which a new samples file beside it replaced without --force (r2 N1, stop 55)
    before = (tmp_path / "p.png").read_bytes()
    line = one_error_line(*run_cli([*sample, "--run", tmp_path / "np", "--out", tmp_path / "np.npz", "--grid",
                                    tmp_path / "p.png"], capsys)[::2])
    assert line == (f"dpdm: error: --grid='{tmp_path / 'p.png'}' holds a grid of samples of the model of a private run "
                    "of this plan, and this model is NON-PRIVATE (--no-dp); it is kept: choose another --grid, or pass "
                    "--force to replace it"), line
    assert (tmp_path / "p.png").read_bytes() == before and not (tmp_path / "np.npz").exists()
    for src, out, kind in ((tmp_path / "np", tmp_path / "p.pt", "of a private run of this plan, and this run is "
                                                               "NON-PRIVATE (--no-dp)"),
                           (d / "run", tmp_path / "np.pt", "of a NON-PRIVATE (--no-dp) run of this plan, and this run "
                                                          "is private"),
                           (tmp_path / "np", tmp_path / "p.npz", "of a private run of this plan, and this model is "
                                                                "NON-PRIVATE (--no-dp)")):
        before = out.read_bytes()
        command = [*sample, "--run", src, "--out", out] if out.suffix == ".npz" else ["export", "--run", src,
                                                                                        "--out", out]
        line = one_error_line(*run_cli(command, capsys)[::2])
        assert f"--out='{out}'" in line and kind in line and line.endswith("pass --force to replace it"), line
        assert out.read_bytes() == before
    assert run_cli(["export", "--run", tmp_path / "np", "--out", tmp_path / "p.pt", "--force"], capsys)[0] == 0
    assert torch.load(tmp_path / "p.pt", weights_only=True)["ledger"]["private"] is False


def test_release_ledger_is_reaccounted_against_its_plan(run, tmp_path, capsys):
    """The release file carries its plan; an edited ledger or a swapped plan is refused by `dpdm sample`."""
    d = run
    assert run_cli(["export", "--run", d / "run", "--out", tmp_path / "m.pt"], capsys)[0] == 0
    model = torch.load(tmp_path / "m.pt", weights_only=True)
    assert accounting.parse_plan(model["plan"]).digest == model["ledger"]["plan_digest"]
    other = accounting.make_plan_document(dataclasses.replace(accounting.load_plan(d / "plan.json").plan,
                                                              noise_multiplier=3.0))
    accounting.write_plan(other, tmp_path / "other.json")
    edits = {
        "epsilon": lambda m: m["ledger"].update(epsilon_spent=m["ledger"]["epsilon_spent"] / 2),
        "steps": lambda m: m["ledger"].update(steps_done=1),
        "plan": lambda m: m.update(plan=(tmp_path / "other.json").read_text()),
        "tampered plan": lambda m: m.update(plan=m["plan"].replace('"steps": 3', '"steps": 2')),
        "no plan": lambda m: m.update(plan=None),
    }
    for name, edit in edits.items():
        bad = torch.load(tmp_path / "m.pt", weights_only=True)
        edit(bad)
        torch.save(bad, tmp_path / "bad.pt")
        code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "bad.pt", "--n", 2, "--out",
                                tmp_path / "bad.npz"], capsys)
        line = one_error_line(code, err)
        assert ("edited" in line or "digest" in line or "incomplete" in line), (name, line)
        assert not (tmp_path / "bad.npz").exists()
    # Export needs the run's plan.json beside the checkpoint (the plan its ledger is certified against).
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(d / "run" / "checkpoint.pt", lone / "checkpoint.pt")
    code, _, err = run_cli(["export", "--checkpoint", lone / "checkpoint.pt", "--out", tmp_path / "x.pt"], capsys)
    assert "plan.json" in one_error_line(code, err) and not (tmp_path / "x.pt").exists()
    shutil.copy(tmp_path / "other.json", lone / "plan.json")
    code, _, err = run_cli(["export", "--checkpoint", lone / "checkpoint.pt", "--out", tmp_path / "x.pt"], capsys)
    assert "trained under" in one_error_line(code, err) and not (tmp_path / "x.pt").exists()


def test_out_inside_the_run_folder_is_refused(run, tmp_path, capsys):
    """`dpdm export --out RUN/plan.json` replaced the locked plan with a torch zip (and config.json,
    metrics.csv the same way); every later export of the run then failed."""
    copy = tmp_path / "runcp"
    shutil.copytree(run / "run", copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert {"plan.json", "config.json", "metrics.csv", "checkpoint.pt"} <= {str(p) for p in before}
    link = tmp_path / "link"
    link.symlink_to(copy, target_is_directory=True)
    for out in ("plan.json", "config.json", "metrics.csv", "new.pt", "sub/model.pt"):
        for source in (["--run", copy], ["--checkpoint", copy / "checkpoint.pt"]):
            code, _, err = run_cli(["export", *source, "--out", copy / out], capsys)
            line = one_error_line(code, err)
            assert f"--out='{copy / out}'" in line and "inside the run folder" in line, line
    code, _, err = run_cli(["export", "--run", copy, "--out", link / "m.pt"], capsys)   # through a link
    assert "inside the run folder" in one_error_line(code, err)
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before and not (copy / "sub").exists()
    assert run_cli(["export", "--run", copy, "--out", tmp_path / "m.pt"], capsys)[0] == 0   # outside: fine


def test_out_under_a_file_is_one_error_line(run, tmp_path, capsys):
    """`--out afile/m.pt` raised FileExistsError (a traceback) after loading the checkpoint."""
    (tmp_path / "afile").write_text("a file, not a folder")
    for out in (tmp_path / "afile" / "m.pt", tmp_path / "afile" / "deeper" / "m.pt"):
        code, _, err = run_cli(["export", "--run", run / "run", "--out", out], capsys)
        line = one_error_line(code, err)
        assert f"--out='{out}'" in line and "not a folder" in line
    assert (tmp_path / "afile").read_text() == "a file, not a folder"


@pytest.mark.slow   # stop 48: 13-95 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_out_never_replaces_another_runs_files_or_a_non_release_file(run, tmp_path, capsys):
    """`dpdm export --run A --out B/checkpoint.pt` replaced run B's checkpoint (its secret seed: B could no
    longer resume), `--out plan.json` a locked plan, `--out data.npz` the training data. Now each is kept,
    even with --force, and no file is written into another run's folder (one whose checkpoint is gone too)."""
    other = tmp_path / "other_run"
    shutil.copytree(run / "run", other)
    gone = tmp_path / "no_checkpoint"
    shutil.copytree(run / "run", gone)
    (gone / "checkpoint.pt").unlink()
    shutil.copy(run / "plan.json", tmp_path / "plan.json")
    shutil.copy(run / "data.npz", tmp_path / "data.npz")
    (tmp_path / "notes.pt").write_text("the user's own file")
    marker = tmp_path / "pwned"
    torch.save({"format": ckpt.MODEL_FORMAT, "ledger": RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pt")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    inside = [other / "checkpoint.pt", other / "new.pt", other / "sub" / "m.pt", gone / "m.pt"]
    kept = [tmp_path / "plan.json", tmp_path / "data.npz", tmp_path / "notes.pt", tmp_path / "evil.pt"]
    for out in inside + kept:
        for force in ([], ["--force"]):
            code, _, err = run_cli(["export", "--run", run / "run", "--out", out, *force], capsys)
            line = one_error_line(code, err)
            assert f"--out='{out}'" in line, line
            assert ("inside the run folder" in line) if out in inside else ("is not a release file" in line), line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (other / "sub").exists() and not marker.exists()


def test_a_release_file_of_another_plan_needs_force(run, tmp_path, capsys):
    """As `dpdm plan --out` keeps a different plan: a release file of the same plan is replaced (re-export),
    one of another plan only with --force."""
    out = tmp_path / "model.pt"
    for _ in range(2):
        assert run_cli(["export", "--run", run / "run", "--out", out], capsys)[0] == 0
    digest = torch.load(out, weights_only=True)["ledger"]["plan_digest"]
    foreign = torch.load(out, weights_only=True)
    foreign["ledger"]["plan_digest"] = "sha256:" + "0" * 64
    torch.save(foreign, out)
    before = out.read_bytes()
    code, _, err = run_cli(["export", "--run", run / "run", "--out", out], capsys)
    line = one_error_line(code, err)
    assert "another plan" in line and "--force" in line and out.read_bytes() == before
    assert "run of another plan" not in line and "and this run is" not in line, line   # of its kind: the plan alone
    # Of another plan and the other kind (a --no-dp run's): the line named only the plan, and --force then replaced a
    # file nobody was told was a NON-PRIVATE release (r2 N4, stop 55)
    foreign["ledger"]["private"] = False
    torch.save(foreign, out)
    before = out.read_bytes()
    line = one_error_line(*run_cli(["export", "--run", run / "run", "--out", out], capsys)[::2])
    assert line == (f"dpdm: error: --out='{out}' already exists and holds the release file of a NON-PRIVATE (--no-dp) "
                    f"run of another plan (sha256:000000000000..., this run's is {digest[:19]}...), and this run is "
                    "private; it is kept. Choose another --out, or pass --force to replace it"), line
    assert out.read_bytes() == before
    assert run_cli(["export", "--run", run / "run", "--out", out, "--force"], capsys)[0] == 0
    assert torch.load(out, weights_only=True)["ledger"]["plan_digest"] == digest


def test_out_that_names_a_folder_is_one_error_line(run, tmp_path, capsys):
    """`--out newdir/` wrote a file named newdir."""
    code, _, err = run_cli(["export", "--run", run / "run", "--out", f"{tmp_path / 'newdir'}/"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "names a folder" in lines[0] and not (tmp_path / "newdir").exists()


def _edited_copy(src_run, dst_run, edit):
    """A copy of the run folder whose checkpoint has been through `edit(state)` (a hand edit, or a flipped bit)."""
    shutil.copytree(src_run, dst_run)
    state = torch.load(dst_run / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, dst_run / "checkpoint.pt")
    return dst_run


@pytest.mark.parametrize("name, edit, needle", [
    # One field of a finished 3-step run: steps_done 1 had it resume and train 2 more noisy steps.
    ("steps", lambda s: s["ledger"].update(steps_done=1), "optimizer has taken 3 steps, its ledger says 1"),
    ("epsilon", lambda s: s["ledger"].update(epsilon_spent=s["ledger"]["epsilon_spent"] / 2), "edited"),
    ("private flag", lambda s: s["ledger"].update(private=False), "private=False, its config private=True"),
    ("infinite epsilon", lambda s: s["ledger"].update(epsilon_spent=float("inf")), "private with epsilon inf"),
    ("config.train", lambda s: s["config"].update(train="x"), "train is str"),
    ("train_sigma", lambda s: s["config"]["train"].update(train_sigma="abc"), "train_sigma is 'abc'"),
    ("train_sigma nan", lambda s: s["config"]["train"].update(train_sigma=[float("nan"), 1.0]),
     "train_sigma is [nan, 1.0], not (min, max) with 0 < min < max"),   # sampled with sigma_max 1
    ("train_sigma reversed", lambda s: s["config"]["train"].update(train_sigma=[5.0, 1.0]),
     "train_sigma is [5.0, 1.0]"),   # blamed on --sigma-min, which the user had not given
    ("config.init", lambda s: s["config"].update(init="x"), "init is str"),
    ("optimizer", lambda s: s.update(optimizer="x"), "optimizer state is not"),
    ("rng", lambda s: s.update(rng={}), "RNG state"),
    ("power EMAs", lambda s: s.update(ema_power=5), "power EMAs are not a mapping"),
    ("step count", lambda s: [v.update(step=torch.tensor([3.0, 3.0])) for v in s["optimizer"]["state"].values()],
     "a parameter without a step count"),
    ("seed", lambda s: s["config"]["train"].update(seed=-5), "train.seed is -5"),
    ("a parameter's state", lambda s: s["optimizer"]["state"].pop(next(iter(s["optimizer"]["state"]))),
     "has state for"),
    # Three edits agreeing with each other: no step done, epsilon 0, an optimizer that has taken no step.
    ("step 0", lambda s: (s["ledger"].update(steps_done=0, epsilon_spent=0.0), s["optimizer"].update(state={})),
     "no step done"),
])
def test_an_edited_training_checkpoint_is_refused_by_every_command(run, tmp_path, capsys, name, edit, needle):
    """A checkpoint's ledger is checked against itself, its config, its optimizer and (where its run's plan lies
    beside it) the accountant: before, an edited or bit-flipped field re-spent the budget on resume, or reached
    the samples' epsilon, or was a traceback (exit 4)."""
    d = run
    bad = _edited_copy(d / "run", tmp_path / "bad", edit)
    commands = {"sample": ["sample", "--run", bad, "--n", 2, "--out", tmp_path / "s.npz"],
                "export": ["export", "--run", bad, "--out", tmp_path / "m.pt"],
                "resume": ["train", "--plan", d / "plan.json", "--out", bad, "--resume", "--device", "cpu", "--quiet"]}
    if name == "epsilon":   # a finished run: resume refuses it as finished, whatever its epsilon
        del commands["resume"]
    for command, args in commands.items():
        line = one_error_line(*run_cli(args, capsys)[::2])
        assert needle in line, (command, line)
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "m.pt").exists()


def test_a_non_private_model_flipped_to_private_is_refused(run, tmp_path, capsys):
    """ledger.private is checked against config.private (a release file's and a checkpoint's): one flipped bit
    had a --no-dp run's samples and release marked (epsilon, delta)-DP."""
    d = run
    assert main(["train", "--plan", str(d / "plan.json"), "--out", str(tmp_path / "np"), "--device", "cpu",
                 "--quiet", "--no-dp"]) == 0
    assert run_cli(["export", "--run", tmp_path / "np", "--out", tmp_path / "np.pt"], capsys)[0] == 0
    spent = accounting.load_plan(d / "plan.json").epsilon
    model = torch.load(tmp_path / "np.pt", weights_only=True)
    model["ledger"].update(private=True, epsilon_spent=spent)
    torch.save(model, tmp_path / "flipped.pt")
    code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "flipped.pt", "--n", 2, "--out", tmp_path / "s.npz"],
                           capsys)
    assert "private=True, its config private=False" in one_error_line(code, err)
    bad = _edited_copy(tmp_path / "np", tmp_path / "np2",
                       lambda s: s["ledger"].update(private=True, epsilon_spent=spent))
    code, _, err = run_cli(["sample", "--run", bad, "--n", 2, "--out", tmp_path / "s.npz"], capsys)
    assert "private=True, its config private=False" in one_error_line(code, err)
    assert not (tmp_path / "s.npz").exists()


def test_a_training_checkpoint_away_from_its_plan_is_not_sampled(run, tmp_path, capsys):
    """Its ledger can be checked only against its run's plan.json: without it, `dpdm sample` refuses (an edited
    epsilon reached the samples) and names the release file, which carries its plan; beside its plan, it works."""
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run / "run" / "checkpoint.pt", lone / "checkpoint.pt")
    args = ["sample", "--checkpoint", lone / "checkpoint.pt", "--n", 2, "--sampler-steps", 2, "--out",
            tmp_path / "s.npz"]
    line = one_error_line(*run_cli(args, capsys)[::2])
    assert "without its run's plan.json" in line and "dpdm export" in line and not (tmp_path / "s.npz").exists()
    shutil.copy(run / "plan.json", lone / "plan.json")
    code, _, err = run_cli(args, capsys)
    assert code == 0, err


def test_a_run_folder_that_lost_its_plan_asks_for_it_back_by_digest(run, tmp_path, capsys):
    """`dpdm sample --run RUN` with RUN/plan.json moved away said "sample from the run folder", which the user had
    done (h89 F3), and export "export from the run folder". Both now ask for the run's plan.json back, naming the
    digest the run was trained under, by which the file can be found; a copied checkpoint keeps its advice."""
    moved = tmp_path / "moved"
    shutil.copytree(run / "run", moved)
    (moved / "plan.json").unlink()
    digest = accounting.load_plan(run / "plan.json").digest
    for args in (["sample", "--run", moved, "--n", 2, "--sampler-steps", 2, "--out", tmp_path / "s.npz"],
                 ["export", "--run", moved, "--out", tmp_path / "m.pt"]):
        line = one_error_line(*run_cli(args, capsys)[::2])
        assert f"the run folder {str(moved)!r}" in line and "has lost its plan.json" in line, line
        assert "put the run's plan.json back" in line and f"{digest[:19]}..." in line, line
        assert "from the run folder" not in line and "release file" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved"]
    # `dpdm plan` puts it back: it refused every plan beside the finished run's record (`.steps_done`, v2, naming the
    # plan), saying the run "trained 3 steps before its first checkpoint" (r2 F1, stop 54). The plan the
    # checkpoint's ledger names is written, even beside a v1 record (which names none); another plan is not.
    options = ["plan", "--noise-multiplier", "2", "--multiplicity", "2", "--delta", "1e-5", "--dataset-size", "24",
               "--batch-size", "6", "--steps", "3", "--dataset", f"npz:{run / 'data.npz'}",
               "--out", moved / "plan.json"]
    code, _, err = run_cli([*options[:2], "3", *options[3:], "--force"], capsys)
    line = one_error_line(code, err)
    assert f"its checkpoint {moved / 'checkpoint.pt'} was trained under plan {digest[:19]}..., not this plan" in line
    assert "before its first checkpoint" not in line and not (moved / "plan.json").exists(), line
    assert (moved / ".steps_done").read_bytes().startswith(b"dpdm-steps-run v2 3 ")
    for record in (None, b"dpdm-steps-run v1 3 0123456789abcdef 0.0003 constant"):
        if record:
            (moved / "plan.json").unlink()
            (moved / ".steps_done").write_bytes(record.ljust(127) + b"\n")
        code, out, err = run_cli(options, capsys)
        assert code == 0 and f"({digest[:19]}...)" in out, err
    assert run_cli(["export", "--run", moved, "--out", tmp_path / "m.pt"], capsys)[0] == 0


def test_export_refuses_weights_that_do_not_fit_the_network(run, tmp_path, capsys):
    """Before, it wrote a release file that `dpdm sample` then refused."""
    key = next(iter(torch.load(run / "run" / "checkpoint.pt", weights_only=True)["ema"]))
    bad = _edited_copy(run / "run", tmp_path / "bad", lambda s: s["ema"].update({key: torch.zeros(1)}))
    code, _, err = run_cli(["export", "--run", bad, "--out", tmp_path / "m.pt"], capsys)
    line = one_error_line(code, err)   # the key, not only torch's "Error(s) in loading state_dict for EDMPrecond:"
    assert "do not fit its own config" in line and f"its {key!r} is float32 (1,), the network's is" in line, line
    assert not (tmp_path / "m.pt").exists()
    # A release file edited the same way (an unexpected key): `dpdm sample` names it as well.
    assert run_cli(["export", "--run", run / "run", "--out", tmp_path / "good.pt"], capsys)[0] == 0
    release = torch.load(tmp_path / "good.pt", weights_only=True)
    release["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(release, tmp_path / "edited.pt")
    code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "edited.pt", "--n", 2, "--out", tmp_path / "s.npz"],
                           capsys)
    line = one_error_line(code, err)
    assert "does not match its own config: it has 'extra.weight', which the network has not" in line, line
    release = torch.load(tmp_path / "good.pt", weights_only=True)   # build_denoiser took "xyz" for EDM
    release["config"]["precond"] = "xyz"
    torch.save(release, tmp_path / "edited.pt")
    code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "edited.pt", "--n", 2, "--out", tmp_path / "s.npz"],
                           capsys)
    assert "its config's precond is 'xyz', not one of 'edm', 'v'" in one_error_line(code, err)
    assert not (tmp_path / "s.npz").exists()


def _names_no_dataset(z) -> bool:
    """Samples whose meta_dataset names no dataset: "None" as dpdm sample wrote it, or NaN (dpdm sample writes a
    missing name so since 2026-12)."""
    value = z["meta_dataset"]
    return str(value) == "None" or (value.dtype.kind == "f" and bool(np.isnan(value)))


def _release_and_samples_name_no_dataset(d, tmp_path, capsys, *, plan_dataset):
    """Trains on d/data.npz under the run's plan renamed `plan_dataset`, exports tmp_path/anon.pt, and checks
    that neither the release file nor the samples (from the release file and from the run) name a dataset or
    the path. Returns the release file's contents."""
    plan = dataclasses.replace(accounting.load_plan(d / "plan.json").plan, dataset_name=plan_dataset)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    assert main(["train", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "r"), "--dataset",
                 f"npz:{d / 'data.npz'}", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert run_cli(["export", "--run", tmp_path / "r", "--out", tmp_path / "anon.pt"], capsys)[0] == 0
    model = torch.load(tmp_path / "anon.pt", weights_only=True)
    assert model["config"]["dataset"] is None and "data.npz" not in json.dumps(model["config"])
    for source in (["--checkpoint", tmp_path / "anon.pt"], ["--run", tmp_path / "r"]):
        code = run_cli(["sample", *source, "--n", 2, "--sampler-steps", 2, "--out", tmp_path / "s.npz"], capsys)[0]
        assert code == 0
        with np.load(tmp_path / "s.npz") as z:
            assert _names_no_dataset(z), source
    return model


@pytest.mark.slow   # stop 48: 13-95 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_release_names_the_dataset_only_as_its_plan_does(run, tmp_path, capsys):
    """A plan made with --dataset-size alone names no dataset; the path `dpdm train --dataset` was given (a local
    file name, perhaps telling) stays out of the release file and its samples. A path the plan names is kept."""
    d = run
    assert run_cli(["export", "--run", d / "run", "--out", tmp_path / "named.pt"], capsys)[0] == 0
    assert torch.load(tmp_path / "named.pt", weights_only=True)["config"]["dataset"] == f"npz:{d / 'data.npz'}"
    model = _release_and_samples_name_no_dataset(d, tmp_path, capsys, plan_dataset=None)
    # A release file exported before dpdm left such paths out: its samples do not show it either.
    model["config"]["dataset"] = f"npz:{d / 'data.npz'}"
    torch.save(model, tmp_path / "old.pt")
    assert run_cli(["sample", "--checkpoint", tmp_path / "old.pt", "--n", 2, "--sampler-steps", 2, "--out",
                    tmp_path / "s.npz"], capsys)[0] == 0
    with np.load(tmp_path / "s.npz") as z:
        assert _names_no_dataset(z)


@pytest.mark.slow   # stop 48: 13-95 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_release_leaves_out_a_path_the_plan_does_not_name_when_it_names_another_dataset(run, tmp_path, capsys):
    """A plan for another dataset (digits), a run on private npz data of its size: the release file and the samples
    named digits as the training data, which turned off eval's check that its test images are held out from the
    generator's training images. The path is left out (None), as for a plan that names no dataset."""
    _release_and_samples_name_no_dataset(run, tmp_path, capsys, plan_dataset="digits")


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_relative_plan_path_names_only_the_file_it_meant_where_train_ran(run, tmp_path, capsys, monkeypatch):
    """A plan for npz:data.npz (relative), a run on sub/data.npz (other images of the same size): the release and
    the samples named npz:data.npz, matched by the path's ending, so eval checked its test images against the
    wrong file and said nothing. `dpdm train` now records whether the plan's name is the run's file, resolved
    where it ran; resumed from another folder, the record stands."""
    d = run
    (tmp_path / "sub").mkdir()
    rng = np.random.default_rng(5)
    with np.load(d / "data.npz") as z:
        np.savez(tmp_path / "data.npz", **z)
        np.savez(tmp_path / "sub" / "data.npz", x=rng.permutation(z["x"]), y=z["y"])
    plan = dataclasses.replace(accounting.load_plan(d / "plan.json").plan, dataset_name="npz:data.npz")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    monkeypatch.chdir(tmp_path)
    for out, extra, named in (("other", ["--dataset", "npz:sub/data.npz"], None), ("own", [], "npz:data.npz")):
        assert main(["train", "--plan", "plan.json", "--out", out, "--device", "cpu", "--quiet", *extra]) == 0
        capsys.readouterr()
        assert run_cli(["export", "--run", out, "--out", f"{out}.pt"], capsys)[0] == 0
        assert torch.load(f"{out}.pt", weights_only=True)["config"]["dataset"] == named, out
        assert run_cli(["sample", "--run", out, "--n", 2, "--sampler-steps", 2, "--out", f"{out}.npz"], capsys)[0] == 0
        with np.load(f"{out}.npz") as z:
            assert (str(z["meta_dataset"]) == named) if named else _names_no_dataset(z), out
    monkeypatch.chdir(tmp_path / "sub")   # the run's own record holds from any folder
    assert run_cli(["export", "--run", tmp_path / "own", "--out", tmp_path / "own2.pt"], capsys)[0] == 0
    assert torch.load(tmp_path / "own2.pt", weights_only=True)["config"]["dataset"] == "npz:data.npz"


def test_resume_refuses_optimizer_state_of_another_shape(run, tmp_path, capsys):
    """An optimizer state whose moments have another shape than their parameters loads (torch checks only their
    number) and failed at the first step, a traceback."""
    d = run
    plan = accounting.load_plan(d / "plan.json").plan

    def killed_at_2_with_a_bad_moment(s):
        s["ledger"].update(steps_done=2, epsilon_spent=accounting.epsilon_spent(plan, 2))
        for per_param in s["optimizer"]["state"].values():
            per_param["step"] = torch.tensor(2.0)
        first = next(iter(s["optimizer"]["state"].values()))
        first["exp_avg"] = torch.zeros(1)

    bad = _edited_copy(d / "run", tmp_path / "bad", killed_at_2_with_a_bad_moment)
    line = one_error_line(*run_cli(["train", "--plan", d / "plan.json", "--out", bad, "--resume", "--device", "cpu",
                                    "--quiet", "--ema-power", "0.1"], capsys)[::2])
    assert "optimizer's exp_avg has shape (1,)" in line, line


def test_a_warm_starts_local_path_leaves_its_folders_out_of_releases_and_samples():
    """The release named the run's own data as the plan does, but copied the warm start's data verbatim
    (`config.init.dataset` 'npz:/home/alice/secret_project/public_faces.npz'), and the samples too
    (`meta_init_dataset`). Now a path keeps its kind and file name; a built-in name stays as it is."""
    from dpdm.datasets import public_init_name
    from dpdm.export import release_config

    config = {"model": "small", "dataset": "npz:/home/alice/secret_project/patients.npz",
              "init": {"dataset": "npz:/home/alice/secret_project/public_faces.npz", "sha256": "ab" * 32}}
    out = release_config(config, None)
    assert out["dataset"] is None and out["init"] == {"dataset": "npz:public_faces.npz", "sha256": "ab" * 32}
    assert "/home" not in repr(out)
    assert public_init_name("folder:/data/alice/public/") == "folder:public"
    assert public_init_name("digits28-aug") == "digits28-aug" and public_init_name(None) is None


def test_a_power_ema_has_one_name_and_a_release_samples_its_own_weights_by_default(run, tmp_path, capsys):
    """`--weights power:0.10` and `power:0.1` exported the same EMA into two files (the name as typed), and
    `dpdm sample --weights power:0.1` refused the first; `dpdm sample --checkpoint` of a raw or power release
    refused the default ema although the file holds one set of weights."""
    d = run
    names = {}
    for spelling in ("power:0.10", "power: 0.1", "power:1e-1"):
        out = tmp_path / f"{len(names)}.pt"
        code, _, err = run_cli(["export", "--run", d / "run", "--out", out, "--weights", spelling, "--json"], capsys)
        assert code == 0, err
        names[spelling] = out.read_bytes()
    assert len(set(names.values())) == 1
    release = tmp_path / "0.pt"
    for weights, want in ((("--weights", "power:0.1"), "power:0.1"), ((), "power:0.1")):
        code, _, err = run_cli(["sample", "--checkpoint", release, "--n", 2, "--sampler-steps", 2, "--device", "cpu",
                                "--out", tmp_path / "s.npz", *weights], capsys)
        assert code == 0, err
        with np.load(tmp_path / "s.npz") as z:
            assert str(z["meta_weights"]) == want
    line = one_error_line(*run_cli(["sample", "--checkpoint", release, "--n", 2, "--device", "cpu", "--out",
                                    tmp_path / "t.npz", "--weights", "ema"], capsys)[::2])
    assert "holds only its 'power:0.1' weights" in line, line
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler-steps", 2, "--device", "cpu",
                            "--out", tmp_path / "u.npz"], capsys)   # a run's default stays its EMA
    assert code == 0, err
    with np.load(tmp_path / "u.npz") as z:
        assert str(z["meta_weights"]) == "ema"


def test_the_release_holds_the_weights_asked_for(run, tmp_path, capsys):
    """--weights raw (and power:GAMMA) released the EMA under the asked name: only the name was checked (mut48,
    stop 47)."""
    state = ckpt.load_checkpoint(run / "run" / "checkpoint.pt")
    for weights, want in (("ema", state["ema"]), ("raw", state["model"]), ("power:0.1", state["ema_power"]["0.1"])):
        out = tmp_path / f"{weights.replace(':', '_')}.pt"
        assert main(["export", "--run", str(run / "run"), "--out", str(out), "--weights", weights]) == 0
        capsys.readouterr()
        model = torch.load(out, weights_only=True)
        assert model["weights"] == weights and set(model["state_dict"]) == set(want)
        for name, t in model["state_dict"].items():
            assert torch.equal(t, want[name]), (weights, name)
    # The three sets differ after 3 steps, so the comparison above tells them apart.
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    assert any(not torch.equal(state["ema"][k], state["ema_power"]["0.1"][k]) for k in state["model"])


def test_a_release_keeps_the_trained_noise_levels():
    """The sampler narrows its default schedule to `dpdm train --train-sigma`'s range; a release file must keep it
    (config.train.train_sigma), or samples from the release ask the network about levels it never saw (mut48)."""
    config = {"model": "small", "precond": "edm", "sigma_data": 3 ** -0.5, "img_resolution": 8, "img_channels": 1,
              "num_classes": 3, "dataset": "digits", "private": True,
              "train": {"train_sigma": [0.1, 10.0], "seed": 5}, "data_digest": "ab" * 32}
    from dpdm.export import release_config

    out = release_config(config, "digits")
    assert out["train"]["train_sigma"] == [0.1, 10.0]
    assert "seed" not in out["train"] and "data_digest" not in out


def test_empty_weights_are_refused_by_sample_as_by_export(run, tmp_path, capsys):
    """`dpdm sample --weights ''` took the EMA and recorded meta_weights='ema', where `dpdm export --weights ''`
    refused it (h97 F5, stop 48): '' was read as "not given". Both now give export's one line (one rule,
    `dpdm.sample._weights_of`), exit 2, and write nothing."""
    lines = {}
    for command, out, extra in (("sample", tmp_path / "s.npz", ["--n", "2", "--sampler-steps", "2", "--device", "cpu"]),
                                ("export", tmp_path / "model.pt", [])):
        code, _, err = run_cli([command, "--run", run / "run", "--weights", "", "--out", out, *extra], capsys)
        lines[command] = one_error_line(code, err)
        assert lines[command].startswith("dpdm: error: weights=''"), err
        assert not out.exists()
    assert lines["sample"] == lines["export"], lines


@pytest.fixture(scope="module")
def release(run, tmp_path_factory):
    """The run's release file (its EMA weights)."""
    path = tmp_path_factory.mktemp("release") / "model.pt"
    assert main(["export", "--run", str(run / "run"), "--out", str(path)]) == 0
    return path


def _set(part, key, value):
    return lambda m: (m[part] if part else m).__setitem__(key, value)


def _retype(key, dtype):
    return lambda m: m["state_dict"].__setitem__(key, m["state_dict"][key].to(dtype))


BIG = 2**31 - 1   # checkpoint.MAX_CONFIG_SIZE: the most classes or channels a config may claim


@pytest.mark.parametrize("edit, needle", [
    # h101 F1: the network the config describes was built (allocated, initialised) before its shapes were compared:
    # GBs per number (num_classes 5e7: 3.2 GB), and here the allocator's line ("can't allocate memory").
    pytest.param(_set("config", "num_classes", BIG),
                 "its 'net.label_embed.weight' is float32 (4, 16), the network's is float32 (2147483648, 16)",
                 id="num_classes"),
    pytest.param(_set("config", "img_channels", BIG),
                 "its 'net.conv_in.weight' is float32 (16, 1, 3, 3), the network's is float32", id="img_channels"),
    pytest.param(lambda m: (m["config"].update(num_classes=BIG),   # the shape the config asks for, saved in 4 bytes
                            m["state_dict"].update({"net.label_embed.weight": torch.zeros(1).expand(BIG + 1, 16)})),
                 "its 'net.label_embed.weight' (float32 (2147483648, 16)) is a view of 4 bytes", id="stride-0 view"),
    pytest.param(_set("config", "num_classes", 10**15),
                 "its config's num_classes is 1000000000000000, more than any network", id="num_classes 1e15"),
    # h101 F3: 1e300 was a traceback (exit 4), 1e30 NaN blamed on the weights (exit 4), 0.5 another model, sampled.
    pytest.param(_set("config", "sigma_data", 1e300),
                 "its config's sigma_data is 1e+300; dpdm trains every network at sqrt(1/3)", id="sigma_data 1e300"),
    pytest.param(_set("config", "sigma_data", 0.5), "its config's sigma_data is 0.5", id="sigma_data 0.5"),
    # h101 F4: cast to float32 without a word (complex with torch's warning): bool weights loaded as 1.0.
    pytest.param(_retype("net.map0.weight", torch.bool),
                 "its 'net.map0.weight' is bool (64, 16), the network's is float32 (64, 16)", id="bool weights"),
    pytest.param(_retype("net.map0.weight", torch.complex64), "its 'net.map0.weight' is complex64 (64, 16)",
                 id="complex weights"),
    # h101 F6: free-form fields reached the samples' meta as they were; a ragged list was a traceback (exit 4).
    pytest.param(_set(None, "weights", [[1, 2], [3]]), "its weights are a list, not ema, raw or power:GAMMA",
                 id="weights"),
    pytest.param(_set("config", "dataset", [1, 2]), "its config's dataset is a list, not a dataset's name",
                 id="dataset"),
    pytest.param(_set("config", "init", {"dataset": 5, "sha256": None}), "its config's init.dataset is 5, not text",
                 id="init.dataset"),
    pytest.param(_set("config", "train", {"train_sigma": None, "seed_given": "no"}),
                 "its config's train.seed_given is 'no', not true or false", id="seed_given"),
])
def test_a_hostile_release_file_is_one_line_before_any_drawing(release, tmp_path, capsys, monkeypatch, edit, needle):
    """A release file is the one artefact meant to come from someone else: each of these edits is one error line,
    exit 2, naming the field or tensor, before any image is drawn, at the cost of reading the file."""
    import dpdm.sampling

    monkeypatch.setattr(dpdm.sampling, "generate", lambda *a, **kw: pytest.fail("drew images"))
    model = torch.load(release, weights_only=True)
    edit(model)
    torch.save(model, tmp_path / "edited.pt")
    code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "edited.pt", "--n", 2, "--sampler-steps", 2,
                            "--out", tmp_path / "s.npz", "--device", "cpu"], capsys)
    line = one_error_line(code, err)
    assert needle in line and "allocate" not in line, line
    assert not (tmp_path / "s.npz").exists()


def test_export_checks_the_weights_against_the_network_before_building_it(run, tmp_path, capsys):
    """`dpdm export` built the network its checkpoint's config describes to check the weights (h101 F1): a config of
    2**31 - 1 classes asked the allocator for 137 GB. It is built on the meta device now."""
    bad = _edited_copy(run / "run", tmp_path / "bad", lambda s: s["config"].update(num_classes=BIG))
    line = one_error_line(*run_cli(["export", "--run", bad, "--out", tmp_path / "m.pt"], capsys)[::2])
    assert "do not fit its own config (its 'net.label_embed.weight' is float32 (4, 16), the network's" in line, line
    assert "allocate" not in line and not (tmp_path / "m.pt").exists()


def test_a_release_holds_its_weights_alone_whatever_the_checkpoints_storage(run, tmp_path, capsys):
    """torch.save writes a tensor's whole storage: EMA tensors that were views into one storage also holding the raw
    weights (a checkpoint made by hand) put the raw weights into the release, readable from its bytes (h101 N7).
    Export copies each tensor into a storage of its own."""
    def share(state):
        names = list(state["ema"])
        flat = torch.cat([state["ema"][k].flatten() for k in names] + [state["model"][k].flatten() for k in names])
        at = 0
        for k in names:
            n = state["ema"][k].numel()
            state["ema"][k] = flat[at:at + n].view(state["ema"][k].shape)
            at += n

    bad = _edited_copy(run / "run", tmp_path / "shared", share)
    assert run_cli(["export", "--run", bad, "--out", tmp_path / "m.pt"], capsys)[0] == 0
    model = torch.load(tmp_path / "m.pt", weights_only=True)
    ema = ckpt.load_checkpoint(run / "run" / "checkpoint.pt")["ema"]
    assert all(torch.equal(model["state_dict"][k], t) for k, t in ema.items())
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        stored = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)   # the tensors' storages
    assert stored == sum(t.numel() * t.element_size() for t in ema.values())


def test_an_out_link_in_the_run_folder_is_refused(run, tmp_path, capsys):
    """`dpdm export --run RUN --out RUN/release.pt`, where RUN/release.pt is a link to a file outside the run
    folder: the link's target was checked, the write replaced the link, and the release landed in the run folder,
    which export never writes into (h111 F2)."""
    copy = tmp_path / "runcp"
    shutil.copytree(run / "run", copy)
    assert run_cli(["export", "--run", copy, "--out", tmp_path / "model.pt"], capsys)[0] == 0
    before = (tmp_path / "model.pt").read_bytes()
    (copy / "release.pt").symlink_to(tmp_path / "model.pt")
    code, _, err = run_cli(["export", "--run", copy, "--out", copy / "release.pt"], capsys)
    assert "inside the run folder" in one_error_line(code, err)
    assert (copy / "release.pt").is_symlink() and (tmp_path / "model.pt").read_bytes() == before


def test_export_removes_its_own_stale_temp_files_and_no_other(run, tmp_path, capsys):
    """A `dpdm export` killed between its write and its rename left `.OUT.XXXXXXXX.tmp` (a whole release) beside
    --out, which no later export removed (h111 N1). A later export of the same --out removes those over an hour
    old (one newer may be another export's write in flight)."""
    import os

    old = os.path.getmtime(tmp_path) - 2 * 86400   # two days
    stale = ".m.pt.ab_cd12z.tmp"
    kept = [".m.pt.ab_cd12y.tmp", ".n.pt.ab_cd12z.tmp", ".m.pt.ab_cd12.tmp", ".m.pt.ab_cd12z.tmp.npz"]
    for name in [stale] + kept:
        (tmp_path / name).write_bytes(b"x")
        if name != kept[0]:   # the first is fresh: perhaps in flight
            os.utime(tmp_path / name, (old, old))
    assert run_cli(["export", "--run", run / "run", "--out", tmp_path / "m.pt"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["m.pt"])


def test_guidance_is_refused_for_a_model_that_never_trained_its_null_label(run, tmp_path, capsys):
    """With `TrainConfig(label_dropout=0)` no label was ever dropped, so the null label that classifier-free
    guidance steers by was never trained, and `dpdm sample --guidance W` guided by it without a word (h111 N6).
    The run's config records label_dropout, and the release file now carries it."""
    bad = _edited_copy(run / "run", tmp_path / "nodrop", lambda s: s["config"]["train"].update(label_dropout=0.0))
    release = _export(bad, tmp_path / "nodrop.pt", capsys)
    for source in (["--run", bad], ["--checkpoint", release]):
        code, _, err = run_cli(["sample", *source, "--n", 2, "--sampler-steps", 2, "--device", "cpu",
                                "--guidance", 1, "--out", tmp_path / "s.npz"], capsys)
        line = one_error_line(code, err)
        assert "--guidance" in line and "label_dropout 0" in line, line
        assert not (tmp_path / "s.npz").exists()
    assert torch.load(release, weights_only=True)["config"]["train"]["label_dropout"] == 0
    assert torch.load(_export(run / "run", tmp_path / "m.pt", capsys), weights_only=True)["config"]["train"][
        "label_dropout"] == 0.1
    code, _, err = run_cli(["sample", "--checkpoint", release, "--n", 2, "--sampler-steps", 2, "--device", "cpu",
                            "--out", tmp_path / "s.npz"], capsys)   # unguided: fine
    assert code == 0, err


def _export(run_dir, out, capsys):
    code, _, err = run_cli(["export", "--run", run_dir, "--out", out], capsys)
    assert code == 0, err
    return out


# --- mut52 (stop 51): what export refuses to replace, what samples record, epsilons rounded up ---------------

def test_export_never_replaces_a_training_checkpoint_outside_a_run_folder(run, tmp_path, capsys):
    """A copy of a run's checkpoint (its secret seed and RNG state, its data digest) kept outside any run folder is
    no release file, though it holds a ledger of the same plan: `dpdm export --out` it, with or without --force,
    is one line and the file is kept (mut52 e13: the release format test dropped from `release_plan_digest`, now
    `release_identity`; the slow test of kept files covers only a plan, data, a user's file and a forged release)."""
    kept = tmp_path / "backup.pt"
    shutil.copy(run / "run" / "checkpoint.pt", kept)
    before = kept.read_bytes()
    for force in ([], ["--force"]):
        code, _, err = run_cli(["export", "--run", run / "run", "--out", kept, *force], capsys)
        assert "is not a release file" in one_error_line(code, err)
    assert kept.read_bytes() == before


def test_export_writes_no_release_file_into_another_run_folder(run, tmp_path, capsys):
    """A run folder holds its run's secrets and locked files: `dpdm export --out OTHER_RUN/model.pt` is refused,
    without --force and with it (mut52 e07: the other-run check dropped passes every default test; the slow
    test_out_never_replaces_another_runs_files_or_a_non_release_file alone covers it)."""
    other = tmp_path / "other_run"
    shutil.copytree(run / "run", other)
    for force in ([], ["--force"]):
        code, _, err = run_cli(["export", "--run", run / "run", "--out", other / "model.pt", *force], capsys)
        assert "of another run" in one_error_line(code, err)
    assert not (other / "model.pt").exists()


def test_samples_split_into_files_by_seed_are_the_images_and_labels_of_one_file(run, tmp_path):
    """Image i is image seed + i of one sequence, its label (seed + i) % classes included: two files drawn with
    --seed 0 --n 2 and --seed 2 --n 2 are the four images of --seed 0 --n 4 (mut52 s12: labels restarting at 0 in
    each file gave the second file classes 0, 1 instead of 2, 0, and other images)."""
    from dpdm.sample import sample_checkpoint

    def draw(seed, n):
        out = tmp_path / f"s{seed}_{n}.npz"
        sample_checkpoint(run / "run" / "checkpoint.pt", n=n, seed=seed, sampler_steps=2, out_path=out)
        with np.load(out) as z:
            return z["x"], z["y"]

    (x4, y4), (xb, yb) = draw(0, 4), draw(2, 2)
    assert y4.tolist() == [0, 1, 2, 0] and yb.tolist() == [2, 0] and np.array_equal(xb, x4[2:])


def test_samples_never_name_a_data_path_their_plan_does_not_name(run, tmp_path, monkeypatch):
    """A run trained with `--dataset npz:/home/.../patients.npz` under a plan that names no path (or another) must
    not write that local path into its samples: meta_dataset is the public name (`public_dataset_name`), here none
    (mut52 s16: the config's own `dataset` recorded; the slow release tests cover only `dpdm export`)."""
    from dpdm.sample import sample_checkpoint

    private = "npz:/home/alice/patients.npz"
    load = ckpt.load_model_or_checkpoint

    def as_trained_on_a_path_the_plan_does_not_name(path):
        state = load(path)
        state["config"] = {**state["config"], "dataset": private, "plan_names_data": False}
        return state

    monkeypatch.setattr(ckpt, "load_model_or_checkpoint", as_trained_on_a_path_the_plan_does_not_name)
    out = tmp_path / "s.npz"
    summary = sample_checkpoint(run / "run" / "checkpoint.pt", n=2, sampler_steps=2, out_path=out)
    with np.load(out) as z:
        assert z["meta_dataset"].dtype.kind == "f" and np.isnan(z["meta_dataset"])   # None
        assert not any(private in str(z[k]) for k in z.files if k.startswith("meta_"))
    assert summary["dataset"] is None


def test_the_export_line_rounds_the_epsilon_spent_up(run, tmp_path, capsys, monkeypatch):
    """The epsilon on `dpdm export`'s line is a guarantee: shown rounded up (`epsilon_text`), so 1.00001 reads
    1.001, never 1 (mut52 x02: `:.4g` rounded it to nearest; the run's own epsilons rounded alike either way)."""
    import dpdm.export

    def exported(path, out, **kw):
        return {"model": str(out), "sha256": "0" * 64, "weights_sha256": "1" * 64, "checkpoint": str(path),
                "weights": "ema", "parameters": 10, "private": True, "epsilon_spent": 1.00001, "delta": 1e-5,
                "steps_done": 3, "plan_steps": 3, "seed_given": False, "plan_digest": "sha256:" + "0" * 64}

    monkeypatch.setattr(dpdm.export, "export_model", exported)
    code, _, err = run_cli(["export", "--run", run / "run", "--out", tmp_path / "m.pt"], capsys)
    assert code == 0 and "DP: epsilon 1.001, delta 1e-05 after 3 of 3 steps" in err, err


def test_the_grid_title_rounds_the_samples_epsilon_up(run, tmp_path, monkeypatch):
    """The grid's title shows the samples' epsilon, a guarantee, rounded up to 3 digits (`epsilon_text`): a ledger
    of 1.2143 reads 1.22, never 1.21 (mut52 s18: `:.3g` rounded it to nearest). The verified ledger's figure is
    replaced after loading, so that its third digit rounds down to nearest."""
    import dpdm.report_utils
    import dpdm.sample

    load = dpdm.sample.load_denoiser

    def with_epsilon_1_2143(*a, **k):
        D, state = load(*a, **k)
        state["ledger"] = {**state["ledger"], "epsilon_spent": 1.2143}
        return D, state

    titles = []
    monkeypatch.setattr(dpdm.sample, "load_denoiser", with_epsilon_1_2143)
    monkeypatch.setattr(dpdm.report_utils, "save_grid", lambda x, y, path, *, title="", **kw: titles.append(title))
    dpdm.sample.sample_checkpoint(run / "run" / "checkpoint.pt", n=2, sampler_steps=2, out_path=tmp_path / "s.npz",
                                  grid_path=tmp_path / "g.png")
    assert titles == ["dpdm samples, DP (eps=1.22, delta=1e-05), GIVEN --seed"]


def test_samples_name_a_warm_starts_data_without_its_folders(run, tmp_path, monkeypatch):
    """The samples name the public data of a warm start (`--init-from`) by its kind and file name only
    (`public_init_name`), as release files do: its local folders are not the public's business (mut52 s17: the
    config's path written into meta_init_dataset; the existing test checks `release_config` alone)."""
    from dpdm.sample import sample_checkpoint

    load = ckpt.load_model_or_checkpoint

    def warm_started(path):
        state = load(path)
        state["config"] = {**state["config"], "init": {"dataset": "npz:/home/alice/secret_project/public_faces.npz",
                                                       "sha256": "ab" * 32}}
        return state

    monkeypatch.setattr(ckpt, "load_model_or_checkpoint", warm_started)
    summary = sample_checkpoint(run / "run" / "checkpoint.pt", n=2, sampler_steps=2, out_path=tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert str(z["meta_init_dataset"]) == "npz:public_faces.npz"
    assert summary["init_dataset"] == "npz:public_faces.npz"


def test_a_non_private_release_is_warned_of_and_export_promises_no_safety(run, tmp_path, capsys, monkeypatch):
    """`dpdm export --help` called the release file "safe to release", and a --no-dp run's export said only
    "NON-PRIVATE (--no-dp)" on its line, exit 0 (h115 N1): one warning line says its weights carry no guarantee
    about their training data, with --json too; a private release has none."""
    import dpdm.export

    digest = accounting.load_plan(run / "plan.json").digest   # the run's: its .steps_done names it (h151 F2)

    def exporter(private):
        def exported(path, out, **kw):
            return {"model": str(out), "sha256": "0" * 64, "weights_sha256": "1" * 64, "checkpoint": str(path),
                    "weights": "ema", "parameters": 10, "private": private, "epsilon_spent": 1.0 if private else None,
                    "delta": 1e-5, "steps_done": 3, "plan_steps": 3, "seed_given": False, "plan_digest": digest}
        return exported

    for private in (False, True):
        monkeypatch.setattr(dpdm.export, "export_model", exporter(private))
        for as_json in ((), ("--json",)):
            code, _, err = run_cli(["export", "--run", run / "run", "--out", tmp_path / "m.pt", *as_json], capsys)
            assert code == 0, err
            warned = [line for line in err.splitlines() if line.startswith("dpdm: warning:")]
            assert warned == ([] if private else [
                f"dpdm: warning: {str(tmp_path / 'm.pt')!r} holds the weights of a NON-PRIVATE (--no-dp) run: they "
                "carry no guarantee about the data it trained on; do not release them where that data is private"]), err
    code, out, _ = run_cli(["export", "--help"], capsys)
    assert code == 0 and "safe" not in out and "--no-dp run carry no guarantee" in " ".join(out.split()), out


def test_a_release_whose_tensors_share_one_storage_is_one_line_before_any_drawing(release, tmp_path, capsys,
                                                                                   monkeypatch):
    """Two weights of one shape saved as one tensor (a storage of half the bytes the network's tensors need): each
    tensor holds its own elements, so only the sum over the storages refuses it (`weights_problem`); with that sum
    dropped the file was sampled, and no default test said so (mut53 s06)."""
    import dpdm.sampling

    monkeypatch.setattr(dpdm.sampling, "generate", lambda *a, **kw: pytest.fail("drew images"))
    model = torch.load(release, weights_only=True)
    weights, seen = model["state_dict"], {}
    for key, t in weights.items():
        first = seen.setdefault((t.dtype, tuple(t.shape)), key)
        if first != key:
            weights[key] = weights[first]   # torch.save keeps the sharing: one storage for both
            break
    else:
        pytest.fail("no two weights of one dtype and shape")
    torch.save(model, tmp_path / "shared.pt")
    code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "shared.pt", "--n", 2, "--sampler-steps", 2,
                            "--out", tmp_path / "s.npz", "--device", "cpu"], capsys)
    line = one_error_line(code, err)
    assert "its tensors are views of" in line and "bytes of storage, fewer than their" in line, line
    assert not (tmp_path / "s.npz").exists()
