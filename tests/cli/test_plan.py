"""`dpdm plan` and `dpdm account` through the real entry point (cli.main.main)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import accounting
from cli.main import main
from cli.plan import DATASET_SIZES, PRESETS


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bare_dpdm_prints_its_help_and_the_recipe_writes_the_plan(capsys):
    """`dpdm` alone shows the help as it is (not squeezed into one error line); its recipe's first line
    writes the plan file that the second line reads."""
    assert main([]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "Commands:" in lines and not err.startswith("dpdm: error:"), err
    recipe = [ln.strip() for ln in lines if ln.strip().startswith("dpdm plan ")]
    assert recipe and "--out plan.json" in recipe[0]
    assert main(["baseline"]) == 2 and "dp-classifier" in capsys.readouterr().err.splitlines()[-1]


def test_plain_plan_uses_mnist5k_defaults(capsys):
    rc, out, err = run(capsys, "--eps", "10", "--delta", "1e-5")
    assert rc == 0, err
    assert err == ""
    for word in ("mnist5k", "RDP", "PLD", "PRV", "certified epsilon"):
        assert word in out


def test_a_plan_on_a_set_of_distorted_copies_says_its_epsilon_is_per_copy(capsys):
    """digits28-aug holds 10 distorted copies of each digit (fonts28-aug 80 of each glyph): a plan on it was
    written without a word (stop 42), though an image's copies are protected only as a group."""
    from dpdm.datasets import DIGITS28_AUG_REPLICAS, FONTS28_AUG_REPLICAS
    from dpdm.dataset_sizes import copies_per_source_image

    for name, copies in [("digits28-aug", DIGITS28_AUG_REPLICAS), ("fonts28-aug", FONTS28_AUG_REPLICAS),
                         ("digits-fonts28-aug", FONTS28_AUG_REPLICAS)]:
        assert copies_per_source_image(name) == copies
    assert {n for n in DATASET_SIZES if copies_per_source_image(n) > 1} == {"digits28-aug", "fonts28-aug",
                                                                           "digits-fonts28-aug"}
    rc, out, err = run(capsys, "--dataset", "digits28-aug", "--noise-multiplier", "1", "--steps", "10",
                       "--delta", "1e-5")
    assert rc == 0 and err.startswith("dpdm: warning: digits28-aug holds up to 10 distorted copies of each") \
        and len(err.splitlines()) == 1, err


def test_json_prints_only_the_document_and_out_writes_a_locked_plan(capsys, tmp_path):
    path = tmp_path / "plan.json"
    rc, out, err = run(capsys, "--eps", "4", "--delta", "1e-5", "--dataset", "digits", "--batch-size", "128",
                       "--steps", "200", "--clip-norm", "0.5", "--multiplicity", "4", "--out", str(path), "--json")
    assert rc == 0, err
    d = json.loads(out)  # nothing else on stdout
    assert d["dataset"] == {"name": "digits", "size": 1797}
    assert (d["batch_size"], d["steps"], d["clip_norm"], d["noise_multiplicity"]) == (128, 200, 0.5, 4)
    assert d["epsilon"]["certified"] <= 4.0
    loaded = accounting.load_plan(path)
    assert loaded.to_dict()["digest"] == d["digest"]
    assert loaded.plan.noise_multiplier == d["noise_multiplier"]


def test_noise_multiplier_computes_epsilon(capsys):
    rc, out, err = run(capsys, "--noise-multiplier", "1.0", "--delta", "1e-5", "--dataset-size", "1000",
                       "--batch-size", "50", "--epochs", "2", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["target_epsilon"] is None and d["steps"] == 40 and d["dataset"]["name"] is None
    assert d["epsilon"]["certified"] == pytest.approx(
        accounting.compute_epsilon(sample_rate=0.05, noise_multiplier=1.0, steps=40, delta=1e-5), rel=1e-12)


def test_preset_mnist_paper(capsys):
    rc, out, err = run(capsys, "--preset", "mnist-paper", "--eps", "10", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert (d["dataset"]["size"], d["batch_size"], d["steps"], d["noise_multiplicity"], d["delta"]) == (
        60000, 4096, 4395, 32, 1e-5)  # steps = ceil(300 * 60000 / 4096)
    assert 2.3 < d["noise_multiplier"] < 2.45  # tight; the paper's RDP gives 2.488


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_consistent(preset):
    p = PRESETS[preset]
    assert p["dataset"] in DATASET_SIZES and p["batch_size"] <= DATASET_SIZES[p["dataset"]]


def test_dataset_sizes_agree_with_datasets_module():
    import dpdm.datasets as datasets
    for name, size in DATASET_SIZES.items():
        assert datasets.DATASET_SIZES[name] == size


def test_curve_writes_a_png_and_removes_its_own_stale_temp_files_and_no_other(capsys, tmp_path):
    """A `dpdm plan --curve` killed between its write and its rename left `.CURVE.PID.HEX8.tmp` beside the curve,
    which no later --curve removed, as `dpdm sample` and `dpdm export` now remove theirs (fixsample's note on h111
    N1). A later --curve of the same path removes those over an hour old (one newer may be a write in flight)."""
    path = tmp_path / "curve.png"
    old = os.path.getmtime(tmp_path) - 2 * 86400   # two days
    stale = ".curve.png.4242.0a1b2c3d.tmp"
    kept = [".curve.png.4243.0a1b2c3d.tmp", ".curve.png.4242.0a1b2c3.tmp", ".other.png.4242.0a1b2c3d.tmp",
            ".curve.png.4242.0a1b2c3d.tmp.npz", ".curve.png.x.0a1b2c3d.tmp", "curve.png.4242.0a1b2c3d.tmp"]
    for name in [stale] + kept:
        (tmp_path / name).write_bytes(b"x")
        if name != kept[0]:   # the first is fresh: perhaps in flight
            os.utime(tmp_path / name, (old, old))
    (tmp_path / ".curve.png.4244.0a1b2c3d.tmp").mkdir()   # a folder of that name is no file of dpdm's
    os.utime(tmp_path / ".curve.png.4244.0a1b2c3d.tmp", (old, old))
    rc, out, err = run(capsys, "--eps", "2", "--delta", "1e-5", "--dataset-size", "2000", "--batch-size", "100",
                       "--steps", "100", "--curve", str(path))
    assert rc == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["curve.png", ".curve.png.4244.0a1b2c3d.tmp"])


def test_delta_above_one_over_n_warns_on_stderr(capsys):
    rc, out, err = run(capsys, "--eps", "5", "--delta", "0.001", "--dataset", "digits", "--json")
    assert rc == 0
    json.loads(out)
    assert "warning" in err and "delta=0.001" in err


BAD = [
    (["--eps", "0", "--delta", "1e-5"], "--eps"),
    (["--eps", "-1", "--delta", "1e-5"], "--eps"),
    (["--eps", "abc", "--delta", "1e-5"], "'abc' is not a valid float"),
    (["--eps", "inf", "--delta", "1e-5"], "--eps=inf"),
    (["--eps", "nan", "--delta", "1e-5"], "--eps=nan"),
    (["--eps", "1", "--delta", "0"], "--delta"),
    (["--eps", "1", "--delta", "1"], "--delta"),
    (["--eps", "1", "--delta", "2"], "--delta"),
    (["--eps", "1", "--delta", "x"], "--delta"),
    (["--eps", "1"], "--delta is required"),
    (["--eps", "1", "--delta", "1e-5", "--dataset", "imagenet"], "--dataset='imagenet'"),
    (["--eps", "1", "--delta", "1e-5", "--dataset", "folder:/x"], "needs --dataset-size"),
    (["--eps", "1", "--delta", "1e-5", "--dataset", "mnist", "--dataset-size", "10"], "--dataset-size=10"),
    (["--eps", "1", "--delta", "1e-5", "--preset", "nope"], "--preset"),
    (["--eps", "1", "--delta", "1e-5", "--batch-size", "5000"], "--batch-size=5000"),
    (["--eps", "1", "--delta", "1e-5", "--batch-size", "0"], "--batch-size"),
    (["--eps", "1", "--delta", "1e-5", "--steps", "0"], "--steps"),
    (["--eps", "1", "--delta", "1e-5", "--epochs", "0"], "--epochs"),
    (["--eps", "1", "--delta", "1e-5", "--epochs", "2", "--steps", "3"], "mutually exclusive"),
    (["--eps", "1", "--delta", "1e-5", "--dataset-size", "0"], "--dataset-size"),
    (["--eps", "1", "--delta", "1e-5", "--clip-norm", "0"], "--clip-norm"),
    (["--eps", "1", "--delta", "1e-5", "--multiplicity", "0"], "--multiplicity"),
    (["--eps", "1e-6", "--delta", "1e-5"], "eps=1e-06 needs noise_multiplier above"),
    (["--eps", "1", "--noise-multiplier", "1", "--delta", "1e-5"], "mutually exclusive"),
    (["--delta", "1e-5"], "exactly one of --eps"),
    (["--noise-multiplier", "0", "--delta", "1e-5"], "--noise-multiplier"),
    (["--eps", "1", "--delta", "1e-5", "--bogus"], "--bogus"),
    # Huge integers used to end in an OverflowError traceback (exit 1).
    (["--eps", "10", "--delta", "1e-5", "--dataset-size", "1" + "0" * 400], "--dataset-size=10000000...(401 digits)"),
    (["--eps", "10", "--delta", "1e-5", "--dataset-size", str(10**12 + 1)], "--dataset-size=1000000000001"),
    (["--eps", "10", "--delta", "1e-5", "--dataset-size", "10", "--batch-size", "1" + "0" * 400],
     "--batch-size=10000000...(401 digits)"),
    # NaN and inf name their option (--delta nan said only "delta=nan must be in (0, 1)").
    (["--eps", "1", "--delta", "nan"], "--delta=nan is not a finite number"),
    (["--noise-multiplier", "inf", "--delta", "1e-5"], "--noise-multiplier=inf is not a finite number"),
    (["--eps", "1", "--delta", "1e-5", "--clip-norm", "nan"], "--clip-norm=nan"),
    (["--eps", "1", "--delta", "1e-5", "--epochs", "inf"], "--epochs=inf"),
    # Below 1e-10 the accountants lose double precision (3e-15 exited 4, blaming the libraries).
    (["--noise-multiplier", "1", "--delta", "3e-15", "--dataset-size", "4000", "--batch-size", "256", "--steps", "100"],
     "--delta=3e-15 is below 1e-10, where the accountants lose double precision"),
    (["--eps", "10", "--delta", "1e-16"], "--delta=1e-16 is below 1e-10"),
    (["--eps", "10", "--delta", "2e-10", "--dataset-size", "4000", "--batch-size", "40", "--epochs", "30"],
     "--delta=2e-10 is below 3e-10 for 3000 steps (at least 1e-13 per step)"),
    (["--eps", "10", "--delta", "1e-5", "--steps", "10000001"], "--steps=10000001 must be <= 10000000"),
    # The batch size the user never typed: say where it came from.
    (["--eps", "1", "--delta", "1e-5", "--dataset-size", "100"], "--batch-size=256 (default) must be <= the dataset"),
    (["--eps", "1", "--preset", "mnist-paper", "--dataset", "digits"],
     "--batch-size=4096 (from --preset mnist-paper) must be <="),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(capsys, argv, expected):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith("dpdm: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err


def test_account_side_by_side(capsys):
    rc = main(["account", "-s", "1.0", "-p", "0.01", "-i", "1000", "--delta", "1e-5", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    d = json.loads(out)
    assert d["prv"]["lower"] <= d["pld"]["upper"] <= d["prv"]["upper"] <= d["rdp"]["upper"]


def test_account_table_rounds_each_bound_away_from_the_side_it_bounds(capsys):
    """The table printed upper bounds to nearest (an upper bound of 9.999433 as 9.99943, below itself, one line
    above the certified 9.99944), lower bounds too. Every bound the table shows must still be a bound."""
    argv = ["account", "-s", "1.0", "-p", "0.01", "-i", "1000", "--delta", "1e-5"]
    assert main([*argv, "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    for method in ("rdp", "pld", "prv"):
        lower, _, upper = rows[method.upper()]
        assert float(upper) >= exact[method]["upper"], (method, upper, exact[method]["upper"])
        if exact[method]["lower"] is not None:
            assert float(lower) <= exact[method]["lower"], (method, lower, exact[method]["lower"])
    from cli.plan import _fmt

    assert (_fmt(9.9994331, "upper"), _fmt(9.9994331, "lower"), _fmt(9.9994331)) == ("9.99944", "9.99943", "9.99943")
    assert (_fmt(-1.00001e-05, "lower"), _fmt(None, "upper"), _fmt(float("inf"), "upper")) == ("-1.00001e-05", "-", "inf")


def test_plan_runs_without_torch_in_a_fresh_process(tmp_path):
    code = ("import sys; from cli.main import main; "
            f"rc = main(['plan', '--eps', '10', '--delta', '1e-5', '--out', {str(tmp_path / 'p.json')!r}]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_console_script_bad_input_has_no_traceback():
    script = __import__("pathlib").Path(sys.executable).with_name("dpdm")
    proc = subprocess.run([str(script), "plan", "--eps", "-3", "--delta", "1e-5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("dpdm: error:") and "Traceback" not in proc.stderr


def test_plan_that_prv_gets_wrong_is_made_with_a_warning(capsys, tmp_path):
    """prv-accountant 0.2.0 puts its *lower* bound above the true epsilon near sample rate 0.128
    (10.028 against PLD's 9.9999 here); this valid plan used to be refused. dpdm's own PLD settles
    it: the plan is written, certified by PLD, and the warning and the plan both say why."""
    path = tmp_path / "plan.json"
    rc, out, err = run(capsys, "--eps", "10", "--delta", "1e-5", "--batch-size", "512", "--epochs", "30",
                       "--multiplicity", "2", "--out", str(path))
    assert rc == 0, err
    assert err.count("\n") == 1 and err.startswith("dpdm: warning: PRV overruled: PRV lower bound")
    assert "dpdm PLD" in out and "PRV overruled" in out
    doc = accounting.load_plan(path)
    assert doc.certified_by == "pld" and doc.epsilon <= 10.0
    assert doc.independent.lower <= doc.epsilon < doc.independent.upper < doc.prv.lower


def test_plan_that_float32_cannot_train_is_written_with_a_warning(capsys, tmp_path):
    """The accountants take noise multipliers up to 1e100 and any positive clip norm; float32 training does not
    (dpdm.noise_scale). `dpdm plan` wrote such plans silently and `dpdm train` refused them only later: the plan
    is still written (it is a valid mechanism), with one warning naming the reason, and the plain plan none."""
    base = ["--dataset-size", "100", "--batch-size", "10", "--steps", "3", "--delta", "1e-5"]
    for extra, reason in ((["--noise-multiplier", "1e39"], "noise std noise_multiplier x clip_norm = 1e+39"),
                          (["--noise-multiplier", "1", "--clip-norm", "1e-40"], "clip_norm=1e-40 is below 1e-30")):
        path = tmp_path / f"plan{len(extra)}.json"
        rc, out, err = run(capsys, *base, *extra, "--out", str(path))
        assert rc == 0 and path.exists(), err
        assert err.count("\n") == 1 and err.startswith(
            "dpdm: warning: dpdm train and dpdm baseline will refuse this plan: "), err
        assert reason in err
    rc, out, err = run(capsys, *base, "--noise-multiplier", "1e29", "--clip-norm", "10", "--out",
                       str(tmp_path / "ok.json"))
    assert rc == 0 and err == "", err


def test_plan_that_prv_cannot_compute_is_made_with_a_warning(capsys, tmp_path):
    """At sample rate 0.128 and 60 steps (noise multiplier 0.836) prv-accountant 0.2.0 raises instead
    ("Discrete mean differs from continuous mean significantly"); this valid plan used to stop with
    exit 4. dpdm's own PLD takes PRV's place: the plan, its table and its curve are written."""
    path, curve = tmp_path / "plan.json", tmp_path / "curve.png"
    rc, out, err = run(capsys, "--eps", "10", "--delta", "1e-5", "--batch-size", "512", "--steps", "60",
                       "--multiplicity", "2", "--out", str(path), "--curve", str(curve))
    assert rc == 0, err
    assert err.count("\n") == 1 and err.startswith("dpdm: warning: prv-accountant gave no epsilon")
    assert "PRV failed" in out and "dpdm PLD" in out and curve.stat().st_size > 0
    doc = accounting.load_plan(path)
    assert doc.certified_by == "pld" and doc.epsilon <= 10.0 and doc.prv_failed


def test_account_shows_rdp_and_pld_where_prv_cannot_compute(capsys):
    rc = main(["account", "-s", "0.8363", "-p", "0.128", "-i", "60", "--delta", "1e-5", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and err.startswith("dpdm: warning: prv-accountant gave no epsilon") and err.count("\n") == 1
    d = json.loads(out)
    assert "prv" not in d and d["prv_failed"].startswith("RuntimeError")
    assert d["pld"]["upper"] <= d["rdp"]["upper"]


def test_out_keeps_an_existing_different_plan_unless_forced(capsys, tmp_path):
    path = tmp_path / "plan.json"
    args = ("--delta", "1e-5", "--dataset", "digits", "--batch-size", "128", "--steps", "50", "--out", str(path))
    rc, _, err = run(capsys, "--eps", "4", *args)
    assert rc == 0, err
    first = path.read_bytes()
    # The same plan again is fine (same digest: nothing a run is locked to changes).
    rc, _, err = run(capsys, "--eps", "4", *args)
    assert rc == 0, err
    assert path.read_bytes() == first
    # Another plan over it: one line, exit 2, the file untouched, no curve written.
    curve = tmp_path / "curve.png"
    rc, out, err = run(capsys, "--eps", "8", *args, "--curve", str(curve), "--json")
    assert rc == 2 and out == ""
    assert err.startswith("dpdm: error: --out ") and err.count("\n") == 1, err
    assert "different plan (sha256:" in err and "--force" in err
    assert path.read_bytes() == first and not curve.exists()
    # A file that is not a plan is kept too.
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    rc, _, err = run(capsys, "--eps", "8", *args[:-1], str(other))
    assert rc == 2 and "not a dpdm plan" in err
    assert other.read_text() == "my notes\n"
    # --force replaces it.
    rc, out, err = run(capsys, "--eps", "8", *args, "--force", "--json")
    assert rc == 0, err
    assert accounting.load_plan(path).to_dict()["digest"] == json.loads(out)["digest"] != json.loads(first)["digest"]
    # Beside a checkpoint.pt, plan.json is a run's locked plan: not even --force replaces it with another.
    (tmp_path / "checkpoint.pt").write_bytes(b"a run's checkpoint")
    locked = path.read_bytes()
    rc, _, err = run(capsys, "--eps", "4", *args, "--force")
    assert rc == 2 and err.startswith("dpdm: error: --out ") and err.count("\n") == 1, err
    assert "locked plan of the run" in err and path.read_bytes() == locked
    rc, _, err = run(capsys, "--eps", "8", *args, "--force")   # the same plan again is still rewritten
    assert rc == 0, err


def test_force_keeps_the_plan_of_a_run_that_recorded_steps_or_is_training(capsys, tmp_path):
    """h141 F1 and N5 (stop 54): `dpdm plan --force --out RUN/plan.json` replaced the plan of a run stopped before its
    first checkpoint after recording steps (`.steps_done`), the only record of the plan they ran under: a new run
    there then spent them at the new plan's price; and that of a run training toward its first checkpoint (its
    `.train.lock` held), whose export was then refused. Both are kept, one line, exit 2; a record of no step, or a
    lock no train holds, does not keep it."""
    import fcntl

    path = tmp_path / "plan.json"
    args = ("--delta", "1e-5", "--dataset-size", "100", "--batch-size", "10", "--steps", "5", "--out", str(path))
    assert run(capsys, "--noise-multiplier", "2", *args)[0] == 0
    first = path.read_bytes()
    record = tmp_path / ".steps_done"
    record.write_bytes(b"")   # opened by a run that stopped before its first step's update
    (tmp_path / ".train.lock").write_bytes(b"")
    rc, _, err = run(capsys, "--noise-multiplier", "3", *args, "--force")
    assert rc == 0, err
    path.write_bytes(first)
    for line, held in ((b"dpdm-steps-run v2 3 0123456789abcdef 0.0003 constant 0123456789abcdef 0123456789abcdef",
                        "the run in {} trained 3 steps under it before its first checkpoint (.steps_done records "
                        "them), spent against its data"),
                       (b"dpdm-steps-run v1 1 0123456789abcdef 0.0003 constant",
                        "the run in {} trained 1 step under it before its first checkpoint (.steps_done records "
                        "it), spent against its data"),
                       (b"", "a dpdm train is training in {} under it")):
        record.write_bytes(line.ljust(127) + b"\n" if line else b"")
        with open(tmp_path / ".train.lock", "a") as lock:
            if not line:
                fcntl.flock(lock, fcntl.LOCK_EX)   # a train, between its checkpoints
            rc, _, err = run(capsys, "--noise-multiplier", "3", *args, "--force")
        assert rc == 2 and err.count("\n") == 1 and path.read_bytes() == first, err
        assert err.startswith(f"dpdm: error: --out {path} holds a different plan (sha256:") and (
            f"and {held.format(tmp_path)}; even --force does not replace it: write the new plan elsewhere and train a "
            "new run in another --out\n") in err, err
    # RUN/plan.json removed beside a record (a v1 one names no plan): writing a plan there, with or without --force,
    # priced its steps at the new plan's rate once spent (r1 F3, stop 54). Refused; nothing is written.
    path.unlink()
    for line, held in ((b"dpdm-steps-run v1 1 0123456789abcdef 0.0003 constant",
                        "the run in {} trained 1 step (.steps_done records it, spent against its data) under a plan "
                        "its record does not name (a dpdm before stop 54 wrote it) and no checkpoint.pt names; even "
                        "--force does not write a plan there: write the new plan elsewhere and train a new run in "
                        "another --out, or copy the run's own plan.json back by hand"),
                       (b"", "a dpdm train is training in {}; even --force does not write a plan there: write the new "
                        "plan elsewhere and train a new run in another --out")):
        record.write_bytes(line.ljust(127) + b"\n" if line else b"")
        for force in ((), ("--force",)):
            with open(tmp_path / ".train.lock", "a") as lock:
                if not line:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                rc, _, err = run(capsys, "--noise-multiplier", "3", *args, *force)
            assert rc == 2 and err.count("\n") == 1 and not path.exists(), err
            assert err == (f"dpdm: error: --out {path} would be the plan.json of a run whose plan.json is gone, and "
                           f"{held.format(tmp_path)}\n"), err
    assert run(capsys, "--noise-multiplier", "3", *args)[0] == 0   # no step recorded, no train: written


def test_a_runs_own_plan_is_put_back_beside_its_record_and_another_is_not(capsys, tmp_path):
    """r2 F1 (stop 54): with RUN/plan.json removed beside a `.steps_done` of steps (a run stopped before its first
    checkpoint, or a finished one, which keeps its record), `dpdm plan --out RUN/plan.json` refused every plan, the
    run's own too, which `dpdm export` asks for back, saying the run "trained 3 steps before its first checkpoint"
    and to train a new run. The plan the record's v2 line names is written; another plan is refused, with or
    without --force, naming the record's plan; a lock a train holds still refuses it (the finished run, whose
    checkpoint's ledger names the plan: tests/cli/test_export.py)."""
    import fcntl

    path = tmp_path / "plan.json"
    args = ("--delta", "1e-5", "--dataset-size", "100", "--batch-size", "10", "--steps", "5", "--out", str(path))
    rc, out, err = run(capsys, "--noise-multiplier", "2", *args, "--json")
    assert rc == 0, err
    digest, first = json.loads(out)["digest"], path.read_bytes()
    line = f"dpdm-steps-run v2 3 0123456789abcdef 0.0003 constant {digest[7:23]} 0123456789abcdef"
    (tmp_path / ".steps_done").write_bytes(line.encode().ljust(127) + b"\n")
    path.unlink()
    for force in ((), ("--force",)):
        rc, _, err = run(capsys, "--noise-multiplier", "3", *args, *force)
        assert rc == 2 and not path.exists(), err
        assert err.startswith(f"dpdm: error: --out {path} would be the plan.json of a run whose plan.json is gone, "
                              f"and the run in {tmp_path} trained 3 steps under plan sha256:{digest[7:23]}... "
                              "(.steps_done records them), not this plan (sha256:") and err.endswith(
            "...), spent against its data; even --force does not write another plan there: put that plan back (the "
            "one of that digest), or write the new plan elsewhere and train a new run in another --out\n"), err
        assert "before its first checkpoint" not in err and err.count("\n") == 1, err
    with open(tmp_path / ".train.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # a train holds the folder
        rc, _, err = run(capsys, "--noise-multiplier", "2", *args)
    assert rc == 2 and f"a dpdm train is training in {tmp_path}" in err and not path.exists(), err
    rc, out, err = run(capsys, "--noise-multiplier", "2", *args)
    assert rc == 0 and err == "" and f"wrote {path} ({digest[:19]}...)" in out, err
    assert path.read_bytes() == first


BAD_ACCOUNT = [
    # -p nan used to print full-batch (q=1) epsilons and exit 0.
    (["-s", "1", "-p", "nan", "-i", "10", "--delta", "1e-5"], "--sample-rate=nan is not a finite number"),
    (["-s", "nan", "-p", "0.1", "-i", "10", "--delta", "1e-5"], "--noise-multiplier=nan is not a finite number"),
    (["-s", "inf", "-p", "0.1", "-i", "10", "--delta", "1e-5"], "--noise-multiplier=inf is not a finite number"),
    (["-s", "1", "-p", "0.1", "-i", "10", "--delta", "nan"], "--delta=nan is not a finite number"),
    (["-s", "1", "-p", "0.1", "-i", "10", "--delta", "1e-5", "--eps-error", "inf"], "--eps-error=inf"),
    (["-s", "1", "-p", "0.1", "-i", "10", "--delta", "1e-13"], "--delta=1e-13 is below 1e-10"),
    (["-s", "1", "-p", "0.01", "-i", "200000", "--delta", "1e-8"],
     "--delta=1e-08 is below 2e-08 for 200000 steps (at least 1e-13 per step)"),
    (["-s", "1", "-p", "0.1", "-i", "10000001", "--delta", "1e-5"], "--steps=10000001 must be <= 10000000"),
    (["-s", "1", "-p", "2", "-i", "10", "--delta", "1e-5"], "--sample-rate"),
]


@pytest.mark.parametrize("argv,expected", BAD_ACCOUNT, ids=[" ".join(a) for a, _ in BAD_ACCOUNT])
def test_account_bad_input_is_one_line_exit_2(capsys, argv, expected):
    rc = main(["account", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("dpdm: error: ") and err.count("\n") == 1, err
    assert expected in err


def _no_calibration(monkeypatch):
    """Make any calibration or accounting fail loudly: checks must come before it."""
    def boom(*args, **kwargs):
        raise AssertionError("the slow work started before the options were checked")

    monkeypatch.setattr(accounting.PrivacyPlan, "calibrate", boom)
    monkeypatch.setattr(accounting, "make_plan_document", boom)


def test_huge_epochs_are_refused_before_accounting(capsys, monkeypatch):
    """`--epochs 1e12` (1.6e13 steps) ran silently inside dp-accounting with no end in sight."""
    _no_calibration(monkeypatch)
    for epochs in ("1e12", "1e300"):
        rc, out, err = run(capsys, "--eps", "10", "--delta", "1e-5", "--epochs", epochs)
        assert rc == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"dpdm: error: --epochs={float(epochs):g} gives ")
        assert "above the limit of 10000000" in err
    rc, out, err = run(capsys, "--eps", "10", "--delta", "1e-5", "--dataset-size", str(10**9), "--batch-size", "1")
    assert rc == 2 and "--epochs=30 (default) gives 3e+10 steps" in err


def test_unusable_out_and_curve_are_refused_before_calibration(capsys, monkeypatch, tmp_path):
    """A missing folder, a file where the folder should be, or a --curve format matplotlib cannot write
    ended in a traceback (exit 1), after the plan had been written."""
    _no_calibration(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    plan = tmp_path / "plan.json"
    cases = [
        (["--out", str(a_file / "p.json")], f"--out={str(a_file / 'p.json')!r}: {a_file} is not a folder"),
        (["--out", str(a_file / "sub" / "p.json")],
         f"--out={str(a_file / 'sub' / 'p.json')!r}: {a_file} is not a folder"),
        (["--curve", str(a_file / "c.png")], f"--curve={str(a_file / 'c.png')!r}: {a_file} is not a folder"),
        (["--out", str(plan), "--curve", str(a_file / "no" / "c.png")], "--curve="),
        (["--out", str(plan), "--curve", str(tmp_path / "c.json")], "must end in .png, .pdf, .svg, .jpg or .jpeg"),
        (["--out", str(plan), "--curve", str(tmp_path / "c.xyz")], "must end in .png, .pdf, .svg, .jpg or .jpeg"),
        # matplotlib writes these, but without dpdm's mark: the same command then refused its own curve
        (["--out", str(plan), "--curve", str(tmp_path / "c.gif")], "the formats that carry dpdm's mark"),
        (["--out", str(plan), "--curve", str(tmp_path / "c.tiff")], "the formats that carry dpdm's mark"),
    ]
    for extra, expected in cases:
        rc, out, err = run(capsys, "--eps", "1", "--delta", "1e-5", *extra)
        assert rc == 2 and out == "" and err.count("\n") == 1, err
        assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written


def test_failed_writes_are_one_error_line(capsys, monkeypatch, tmp_path):
    """OSError or ValueError from writing the plan or the plot: one line naming the option, exit 2."""
    args = ("--noise-multiplier", "2", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "100",
            "--steps", "10")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accounting, "write_plan", disk_full)
    rc, out, err = run(capsys, *args, "--out", str(tmp_path / "p.json"))
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("dpdm: error: --out=") and "No space left on device" in err
    monkeypatch.undo()
    monkeypatch.setattr("cli.plan._plot_curve", disk_full)
    rc, out, err = run(capsys, *args, "--out", str(tmp_path / "p.json"), "--curve", str(tmp_path / "c.png"))
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("dpdm: error: --curve=") and "No space left" in err and "the plan was written to" in err
    assert accounting.load_plan(tmp_path / "p.json").plan.steps == 10


def test_curve_without_extension_gets_png(capsys, tmp_path):
    rc, out, err = run(capsys, "--noise-multiplier", "2", "--delta", "1e-5", "--dataset-size", "1000",
                       "--batch-size", "100", "--steps", "10", "--curve", str(tmp_path / "curve"))
    assert rc == 0, err
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'curve.png'}" in out


def test_out_and_curve_into_new_folders_create_them(capsys, tmp_path):
    """As `dpdm sample`, `dpdm export` and `write_plan` do."""
    rc, out, err = run(capsys, "--noise-multiplier", "2", "--delta", "1e-5", "--dataset-size", "1000",
                       "--batch-size", "100", "--steps", "10", "--out", str(tmp_path / "a" / "b" / "plan.json"),
                       "--curve", str(tmp_path / "c" / "curve.png"))
    assert rc == 0, err
    assert accounting.load_plan(tmp_path / "a" / "b" / "plan.json").plan.steps == 10
    assert (tmp_path / "c" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preset_with_another_dataset_size_warns_that_the_plan_names_no_dataset(capsys):
    """--preset mnist-paper --dataset-size N silently dropped the preset's dataset name; `dpdm train`
    then asked for --dataset. The preset's own size keeps the name; another size warns."""
    rc, out, err = run(capsys, "--preset", "mnist-paper", "--noise-multiplier", "3", "--dataset-size", "60000",
                       "--steps", "20", "--json")
    assert rc == 0 and err == "", err
    assert json.loads(out)["dataset"] == {"name": "mnist", "size": 60000}
    rc, out, err = run(capsys, "--preset", "mnist-paper", "--noise-multiplier", "3", "--dataset-size", "50000",
                       "--steps", "20", "--json")
    assert rc == 0
    assert json.loads(out)["dataset"] == {"name": None, "size": 50000}
    assert err.count("\n") == 1 and err.startswith("dpdm: warning: --preset mnist-paper with --dataset-size 50000")
    assert "the plan names no dataset" in err and "--dataset" in err


def _run_under_umask(mask: int, capsys, *args):
    """`run` with the process's umask set to `mask`, and put back after."""
    old = os.umask(mask)
    try:
        return run(capsys, *args)
    finally:
        os.umask(old)


def test_plan_written_by_the_cli_is_readable_by_others(capsys, tmp_path):
    import os
    import stat

    rc, _, err = _run_under_umask(0o022, capsys, "--noise-multiplier", "2", "--delta", "1e-5", "--dataset-size",
                                  "1000", "--batch-size", "100", "--steps", "10", "--out", str(tmp_path / "p.json"))
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "p.json").st_mode) == 0o644


@pytest.mark.parametrize("edit", [
    lambda d: d.update(noise_multiplier=10**400),
    lambda d: d.update(versions=[1, 2]),
    lambda d: d["epsilon"].update(certified=10**400),
])
def test_a_malformed_plan_file_is_one_plan_error_line(tmp_path, edit):
    """What `dpdm train --plan` and every other command that loads a plan go through: a huge integer or
    a wrong type was an OverflowError or TypeError traceback."""
    from cli._common import load_locked_plan
    from cli.errors import BadInput

    rc = main(["plan", "--noise-multiplier", "2", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "100",
               "--steps", "10", "--out", str(tmp_path / "p.json")])
    assert rc == 0
    d = json.loads((tmp_path / "p.json").read_text())
    edit(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(BadInput, match=r"^--plan=.*bad\.json") as e:
        load_locked_plan(str(tmp_path / "bad.json"))
    assert "\n" not in str(e.value)


SMALL = ("--dataset-size", "40", "--batch-size", "8", "--steps", "5", "--multiplicity", "1", "--delta", "1e-5")


def test_an_epsilon_beyond_exp_overflow_is_one_error_line(capsys):
    """`--eps 1000` ended in `OverflowError: math range error` (exit 4); eps 50 to 700 gave this line."""
    rc, out, err = run(capsys, *SMALL, "--eps", "1000")
    assert rc == 2 and out == ""
    assert err.splitlines() == [err.strip()], err
    assert "dpdm: error: --eps=1000.0 is met even at noise_multiplier=0.3" in err, err


def test_a_huge_noise_multiplier_prints_a_table_and_a_plan_train_accepts(capsys, tmp_path):
    """At 1e9 the PRV row read `PRV 0-1.00001e-05 0.00999001`, absl warnings went to stderr, and the plan
    written was refused by `dpdm train` (a negative PRV estimate "is not an epsilon")."""
    path = tmp_path / "bigsig.json"
    rc, out, err = run(capsys, *SMALL, "--dataset", "npz:X", "--noise-multiplier", "1e9", "--out", str(path))
    assert rc == 0 and err == "", err
    prv = next(line for line in out.splitlines() if line.startswith("PRV"))
    assert len(prv.split()) == 4 and float(prv.split()[2]) >= 0, prv
    assert accounting.load_plan(path).epsilon == 0.0


@pytest.mark.parametrize("argv", [("plan", *SMALL), ("account", "-p", "0.2", "-i", "5", "--delta", "1e-5")])
def test_a_noise_multiplier_too_small_to_account_for_names_the_bound(capsys, argv):
    """1e-9 gave `dpdm: error: Maximum allowed size exceeded`, which does not say what is wrong."""
    flag = "--noise-multiplier" if argv[0] == "plan" else "-s"
    assert main([*argv, flag, "1e-9"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "=1e-09 is too small to account for: it must be >= 0.05" in err, err


@pytest.mark.parametrize("eps_error", ["1e-09", "100"])
def test_account_eps_error_is_bounded(eps_error, capsys):
    """--eps-error 1e-9 asked PRV for 1.28 TiB (a traceback, exit 4); 100 printed a meaningless estimate."""
    code = main(["account", "-s", "1", "-p", "0.1", "-i", "10", "--delta", "1e-5", "--eps-error", eps_error])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--eps-error={eps_error}" in err[0] and "must be in [0.01, 2.85]" in err[0]


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_outputs_replace_only_what_dpdm_wrote(capsys, tmp_path):
    """Walk of stop 36: --curve replaced any file (through a link too, and the --out plan it had just written),
    --out --force replaced a run's checkpoint.pt, and an --out that is a FIFO or /dev/zero hung or ran out of
    memory."""
    photo, notes = tmp_path / "photo.png", tmp_path / "notes.txt"
    photo.write_bytes(b"\x89PNG not a curve")
    notes.write_text("mine")
    (tmp_path / "lnk.png").symlink_to(notes)
    for curve, needle in ((photo, "is not a curve dpdm wrote"), (tmp_path / "lnk.png", "is not a curve dpdm wrote")):
        rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--curve", str(curve))
        assert rc == 2 and needle in err, err
    assert photo.read_bytes() == b"\x89PNG not a curve" and notes.read_text() == "mine"
    same = tmp_path / "same.png"
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", str(same), "--curve", str(same))
    assert rc == 2 and "is the --out plan file" in err and not same.exists()
    curve = tmp_path / "curve.png"
    for _ in range(2):   # a curve dpdm wrote is replaced
        rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--curve", str(curve))
        assert rc == 0, err
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", str(checkpoint), "--force")
    assert rc == 2 and "even with --force (which replaces only another plan)" in err
    assert checkpoint.read_bytes() == b"weights"
    empty = tmp_path / "empty.json"   # `mktemp`: nothing to lose
    empty.write_text("")
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", str(empty), "--force")
    assert rc == 0 and accounting.load_plan(empty).plan.steps == 5, err
    os.mkfifo(tmp_path / "fifo")
    for out in (tmp_path / "fifo", "/dev/zero"):
        rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", str(out))
        assert rc == 2 and "is not a regular file" in err, err
    rc, _, err = _cli(capsys, "baseline", "dp-classifier", "--plan", str(tmp_path / "fifo"))
    assert rc == 2 and "not a regular file" in err


def test_plan_and_account_limits_are_one_line(capsys):
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1e155")
    assert rc == 2 and "--noise-multiplier=1e+155 must be at most 1e+100" in err   # an OverflowError traceback
    rc, _, err = _cli(capsys, "account", "-s", "1e155", "-p", "0.1", "-i", "10", "--delta", "1e-5")
    assert rc == 2 and "--noise-multiplier=1e+155 must be at most" in err
    rc, _, err = run(capsys, *SMALL[:-4], "--delta", "1e-5", "--noise-multiplier", "1", "--multiplicity", str(10**30))
    assert rc == 2 and f"--multiplicity={10**30} must be an integer in [1, 4096]" in err   # train crashed on it


def test_a_garbage_prv_answer_never_certifies(capsys, tmp_path):
    """At 10**6 steps (q 0.064, sigma 1; PLD 3,481) prv-accountant's grid overflowed and it returned negative
    bounds, which were raised to 0: the plan certified epsilon 0. Its JSON also held an infinity (exit 4)."""
    rc, out, err = run(capsys, "--noise-multiplier", "1", "--steps", "1000000", "--delta", "1e-5",
                       "--multiplicity", "1", "--json", "--out", str(tmp_path / "p.json"))
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["epsilon"]["certified_by"] == "pld" and doc["epsilon"]["certified"] > 3000
    assert "prv-accountant returned no epsilon" in doc["epsilon"]["prv_failed"]
    assert doc["epsilon"]["independent"]["upper"] is None and "so nothing cross-checked the certificate" in err
    assert accounting.load_plan(tmp_path / "p.json").epsilon == doc["epsilon"]["certified"]


def test_empty_checkpoint_paths_are_one_line(capsys, tmp_path):
    for command in (("export", "--out", str(tmp_path / "m.pt")),
                    ("sample", "--n", "2", "--out", str(tmp_path / "s.npz"))):
        rc, _, err = _cli(capsys, command[0], "--checkpoint", "", *command[1:])
        assert rc == 2 and "--checkpoint='' is empty" in err, err


@pytest.mark.parametrize("value", ["B", "I", "IB", " ib "])
def test_a_memory_limit_that_is_only_a_unit_is_refused(capsys, monkeypatch, value):
    """DPDM_MEMORY_LIMIT=B (or I, IB) lost its whole text to the unit strip and read as unset: the default cap, no
    word, while K alone was refused. Now one line, exit 2, as for every other value that names no size."""
    monkeypatch.setenv("DPDM_MEMORY_LIMIT", value)
    rc, out, err = run(capsys, "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "3",
                       "--delta", "1e-5")
    assert rc == 2 and out == "" and err == f"dpdm: error: DPDM_MEMORY_LIMIT={value!r} must be a number of bytes of " \
                                           "at least 256M (optionally with K, M, G or T), or off\n", err


def test_the_accountants_memory_is_capped_so_a_huge_grid_is_one_line(capsys, monkeypatch):
    """`dpdm account -s 0.05 -p 1 -i 10000000` lies within the accepted ranges; PLD took array after array until the
    kernel's OOM killer ended it without a word (24 GB on a 23 GiB machine). dpdm plan and account now run under
    an address-space cap (90% of the memory available, or DPDM_MEMORY_LIMIT), so it is one line, exit 4."""
    argv = [sys.executable, "-m", "cli.main", "account", "-s", "0.05", "-p", "1", "-i", "1000000", "--delta", "1e-5"]
    env = {**os.environ, "DPDM_MEMORY_LIMIT": "1G"}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 4 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("dpdm: runtime failure: out of memory on the machine; fewer steps or more noise need "
                               "less"), r.stderr
    small = ("--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "3", "--delta", "1e-5")
    for value in ("lots", "0.5", "50M", "inf", "0"):   # 50M: scipy's import spun at 100% CPU, or failed to map
        monkeypatch.setenv("DPDM_MEMORY_LIMIT", value)
        rc, out, err = run(capsys, *small)
        assert rc == 2 and err == f"dpdm: error: DPDM_MEMORY_LIMIT={value!r} must be a number of bytes of at least " \
                                  "256M (optionally with K, M, G or T), or off\n", err
    for value in ("off", "1e30", "20e18"):   # no cap ("1e30" was an OverflowError traceback)
        monkeypatch.setenv("DPDM_MEMORY_LIMIT", value)
        rc, out, err = run(capsys, *small)
        assert rc == 0 and err == "", err
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    seen = []
    monkeypatch.setenv("DPDM_MEMORY_LIMIT", "2G")
    monkeypatch.setattr(accounting, "make_plan_document",
                        lambda plan, **kw: seen.append(resource.getrlimit(resource.RLIMIT_AS)) or 1 / 0)
    # the cap holds while the accountants run, and is lifted after (here they fail: a bug's traceback, exit 4)
    assert main(["plan", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "3",
                 "--delta", "1e-5"]) == 4
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert seen and seen[0][0] != resource.RLIM_INFINITY and seen[0][0] <= 2**31 + 64 * 2**30


def test_account_names_a_subnormal_sample_rate_and_a_small_delta_without_jargon(capsys):
    """A subnormal -p reached dp-accounting, whose error named neither option nor value ("a must be greater than b.
    Got a=inf and b=inf."); the delta floor's line spoke of "dpdm before stop 36" and told `dpdm account` to make
    a new plan."""
    rc = main(["account", "-s", "1", "-p", "1e-310", "-i", "10", "--delta", "1e-5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--sample-rate" in err and "1e-310" in err, err
    assert main(["account", "-s", "1", "-p", "1e-300", "-i", "10", "--delta", "1e-5"]) == 0
    capsys.readouterr()
    rc = main(["account", "-s", "1", "-p", "0.1", "-i", "10", "--delta", "1e-300"])
    err = capsys.readouterr().err
    assert rc == 2 and "--delta=1e-300 is below 1e-10" in err and "stop" not in err, err


# q 0.3, sigma 5, 100,000 steps, delta 1e-7: PRV's "upper bound" 130.244 beside a certified 281.593 (the CLT puts the
# true epsilon near 280); a second and a half. Stop 44 found it at 10**6 steps: PRV [529.7, 615.4], certified 2141.55.
PRV_LOW = ["-s", "5", "-p", "0.3", "-i", "100000", "--delta", "1e-7"]


def test_account_and_plan_say_when_prvs_upper_bound_is_far_below_the_certificate(capsys, tmp_path):
    """Both commands printed such a PRV row, and the plan stored it, as bounds, without a word. Now one warning
    line on stderr, and the PRV row marked; plan.json is unchanged (the document says it from its figures)."""
    assert main(["account", *PRV_LOW]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("dpdm: warning: PRV's upper bound 130.244 is below the certified "
                                                   "epsilon 281.593"), err
    assert "unreliable" in err and "the certified epsilon is the figure to use" in err
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "PRV*" in rows and "PRV" not in rows and "* PRV unreliable here" in out
    assert main(["account", *PRV_LOW, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["prv_unreliable"] in err and err.count("\n") == 1
    rc, out, err = run(capsys, "--noise-multiplier", "5", "--dataset-size", "10", "--batch-size", "3", "--steps",
                       "100000", "--delta", "1e-7", "--out", str(tmp_path / "plan.json"))
    assert rc == 0 and err.count("\n") == 1 and "PRV's upper bound 130.244" in err, err
    assert "\nPRV* " in out and "* PRV unreliable here" in out
    assert "prv_unreliable" not in (tmp_path / "plan.json").read_text()


@pytest.mark.parametrize("argv", [
    ["-s", "1", "-p", "0.064", "-i", "469", "--delta", "1e-5"],     # the default plan: PLD and PRV agree
    ["-s", "100", "-p", "1", "-i", "1000000", "--delta", "1e-5"],   # certificate (RDP) 4% above PRV's upper bound
])
def test_account_does_not_warn_where_prv_agrees_within_the_errors(capsys, argv):
    assert main(["account", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "\nPRV " in out and "*" not in out


def test_a_clip_norm_above_the_float32_bound_is_untrainable_at_any_noise_multiplier():
    """Catches dpdm.noise_scale ignoring the clip norm's own size at a multiplier below 1 (mut47): a sum of
    clipped gradients overflows float32 as the noise does (its comment and message), whatever the multiplier."""
    from dpdm.noise_scale import MAX_NOISE_STD, noise_scale_problem

    assert noise_scale_problem(0.5, 1e35) is not None and "above 1e+30" in noise_scale_problem(0.5, 1e35)
    assert noise_scale_problem(1e-6, 10 * MAX_NOISE_STD) is not None
    assert noise_scale_problem(0.5, MAX_NOISE_STD) is None and noise_scale_problem(1.0, 1.0) is None


def test_the_clip_norm_bound_is_1e_30_not_only_far_below_it():
    """Catches a smallest clip norm moved to about 1e-40 (mut47): the test above refuses 1e-40, ten decades below
    the bound, which such a bound still refuses."""
    from dpdm.noise_scale import MIN_CLIP_NORM, noise_scale_problem

    assert noise_scale_problem(1.0, 1e-31) is not None and noise_scale_problem(1.0, 1e-35) is not None
    assert noise_scale_problem(1.0, MIN_CLIP_NORM) is None


def test_help_names_path_datasets_and_no_default_with_a_size(capsys):
    """`dpdm plan --help` listed the named datasets only and "default: mnist5k", where the README plans own data with
    `--dataset npz:PATH --dataset-size N` and a plan of `--dataset-size` alone names none (h103 F5, stop 49)."""
    assert main(["plan", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "folder:PATH, npz:PATH (your own data; with --dataset-size)" in text, text
    assert "[default: mnist5k, none with --dataset-size alone]" in text, text


def test_help_of_force_says_it_replaces_another_plan_or_an_empty_file_only(capsys):
    """`--force` said it replaced a file holding "a different plan (or no plan)", where a file that holds anything
    but a plan is kept even with --force, an empty one aside, and so is a run's own plan.json (h155 F2, stop 55; the
    refusals are tested above)."""
    assert main(["plan", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("--force Let --out replace a file that holds a different plan, or an empty file; any other file is kept, "
            "and so is a run's own plan.json.") in text, text
    assert "no plan)" not in text, text


def test_a_plans_relative_path_not_found_from_here_is_the_plans_not_dataset_option(capsys, tmp_path, monkeypatch):
    """A plan made with `--dataset npz:data.npz` and trained from another folder: the line blamed a `--dataset` the
    user never gave (h103 F6, stop 49). It names the plan's dataset, says the path is read from the current folder,
    and what to do; a --dataset given is still the one named."""
    np.savez(tmp_path / "data.npz", x=np.zeros((8, 1, 4, 4), np.uint8))
    plan = accounting.PrivacyPlan(dataset_size=8, batch_size=2, steps=1, noise_multiplier=1.0, delta=1e-5,
                                  dataset_name="npz:data.npz")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    args = ["train", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == ("dpdm: error: the plan's dataset 'npz:data.npz', a path relative to the current folder, does not "
                   "exist here; run from the folder the plan was made in, or pass --dataset naming the data\n"), err
    assert main([*args, "--dataset", "npz:gone.npz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpdm: error: --dataset='npz:gone.npz': ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    # `dpdm baseline dp-classifier` reads the plan's dataset the same way, and blamed --dataset too (stop 50)
    assert main(["baseline", "dp-classifier", "--plan", str(tmp_path / "plan.json"), "--test-dataset",
                 f"npz:{tmp_path / 'data.npz'}", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("dpdm: error: the plan's dataset 'npz:data.npz', a path relative to the "
                                       "current folder, does not exist here; run from the folder the plan was made "
                                       "in, or pass --dataset naming the data\n")


def test_curve_is_written_under_a_umask_without_the_owners_write_bit(capsys, tmp_path, monkeypatch):
    """Under umask 0277, --curve failed: "cannot write the plot (Permission denied)", exit 2, in a folder the user
    may write (r2 F1, stop 51). The curve is written, read-only as the umask asks."""
    import stat

    from tests.dpdm.test_report_curve import refuse_writes_without_the_owners_write_bit

    refuse_writes_without_the_owners_write_bit(monkeypatch)
    rc, _, err = _run_under_umask(0o277, capsys, "--noise-multiplier", "2", "--delta", "1e-5", "--dataset-size",
                                  "1000", "--batch-size", "50", "--steps", "100", "--curve", str(tmp_path / "curve.png"))
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "curve.png").st_mode) == 0o400
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]



def test_an_out_or_curve_under_a_file_then_dotdot_is_one_line_before_the_calibration(tmp_path, capsys):
    """`--out DATA.npz/../p.json`: os.path.abspath removed the `..` by spelling, the check passed, and the write
    failed after the calibration (--curve: after the plan was written) (h131 F2, stop 53)."""
    (tmp_path / "afile").write_text("a file")
    via = tmp_path / "afile" / ".."
    for extra, option in ((["--out", via / "p.json"], "--out"),
                          (["--out", tmp_path / "p.json", "--curve", via / "c.png"], "--curve")):
        code = main(["plan", "--eps", "2", "--delta", "1e-5", "--dataset-size", "24", "--batch-size", "6", "--steps",
                     "4", *map(str, extra)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"dpdm: error: {option}="), lines
        assert "is not a folder" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_out_or_curve_the_os_cannot_reach_or_naming_a_folder_is_one_line_before_the_calibration(
        tmp_path, capsys, monkeypatch):
    """`--out new/../p.json` (new/ missing: the OS follows '..' only out of a folder that exists), `--out x/..` and
    `--out x/` (a folder's name, not a file's) passed the check and failed after the calibration, `new/x/../p.json`
    leaving an empty new/ behind; `--curve` after the plan was written, or `x/..` became `x/.png` (r1 F4, stop 53).
    Each is one line before the calibration, and nothing is made."""
    _no_calibration(monkeypatch)
    new = tmp_path / "new"
    cases = [(["--out", new / ".." / "p.json"], f"--out='{new / '..' / 'p.json'}': its folder '{new / '..'}' cannot "
                                                f"be reached ('{new}' does not exist"),
             (["--out", new / "x" / ".." / "p.json"], "does not exist"),
             (["--out", tmp_path / "p.json", "--curve", new / ".." / "c.png"], "--curve="),
             (["--out", tmp_path / "x" / ".."], "names a folder (its last part is '..')"),
             (["--out", f"{tmp_path / 'x'}/"], "names a folder (it ends in '/')"),
             (["--out", tmp_path / "p.json", "--curve", tmp_path / "x" / ".."], "--curve=")]
    for extra, expected in cases:
        rc, out, err = run(capsys, "--eps", "1", "--delta", "1e-5", *map(str, extra))
        assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("dpdm: error: "), err
        assert expected in err and ("does not exist" in err or "names a folder" in err), err
    assert list(tmp_path.iterdir()) == []


def test_out_with_a_tilde_and_outputs_through_a_link_then_dotdot_are_written_where_the_os_puts_them(
        tmp_path, capsys, monkeypatch):
    """`--out='~/p.json'` (a '~' the shell leaves alone) made a folder named '~' here where `dpdm sample` and `dpdm
    export` write into the home folder (r1 N1); `--out L/../p.json`, L a link to a folder elsewhere, staged the plan
    in the folder holding L (mkstemp's os.path.abspath removes `L/..` by spelling) and renamed it to where the OS
    puts it: across file systems, EXDEV after the calibration (r1 F4). A rename between folders here fails as it
    would across file systems."""
    import errno

    real_replace = os.replace

    def replace(src, dst):
        if os.path.realpath(os.path.dirname(src)) != os.path.realpath(os.path.dirname(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "work" / "L").symlink_to(tmp_path / "other" / "sub")
    monkeypatch.chdir(tmp_path / "work")
    plan = ["--noise-multiplier", "2", "--delta", "1e-5", "--dataset-size", "100", "--batch-size", "10", "--steps",
            "10", "--multiplicity", "1"]
    rc, out, err = run(capsys, *plan, "--out", "L/../p.json", "--curve", "L/../c.png")
    assert rc == 0, err
    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # after --curve: matplotlib makes its cache in HOME
    rc, out, err = run(capsys, *plan, "--out", "~/p.json")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["p.json"]
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["c.png", "p.json", "sub"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["L"]
    assert accounting.load_plan(tmp_path / "other" / "p.json").digest == accounting.load_plan(
        tmp_path / "home" / "p.json").digest


def test_a_curve_through_a_link_then_dotdot_onto_the_out_plan_file_is_refused(tmp_path, capsys):
    """`--curve L/../p.png` where L links to o/sub names o/p.png, as the OS reaches it (mut56, stop 54): with `--out
    o/p.png` it is the plan file itself, which the plot would replace once the plan was written. Compared as the OS
    reaches both (`report_utils.output_target`), not by spelling, it is refused and nothing is written."""
    (tmp_path / "o" / "sub").mkdir(parents=True)
    (tmp_path / "L").symlink_to(tmp_path / "o" / "sub")
    plan = tmp_path / "o" / "p.png"
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", str(plan), "--curve",
                     f"{tmp_path / 'L'}{os.sep}..{os.sep}p.png")
    assert rc == 2 and "is the --out plan file" in err, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["sub"]


def test_an_out_through_a_link_then_dotdot_onto_a_file_is_one_line_before_the_calibration(tmp_path, capsys,
                                                                                          monkeypatch):
    """`--out L/../x/p.json`, L a link to other/sub and other/x a file (mut56, stop 54): the folder the OS reaches is
    other/x, no folder; checked by spelling it was work/x, missing under a writable work/, so the check passed and the
    write failed after the calibration. `_check_output` checks the folder the OS reaches (`output_folder`)."""
    (tmp_path / "work").mkdir()
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "other" / "x").write_text("a file")
    (tmp_path / "work" / "L").symlink_to(tmp_path / "other" / "sub")
    monkeypatch.chdir(tmp_path / "work")
    out = f"L{os.sep}..{os.sep}x{os.sep}p.json"
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", out)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0] == f"dpdm: error: --out={out!r}: {tmp_path / 'other' / 'x'} is not a folder", lines
    assert (tmp_path / "other" / "x").read_text() == "a file"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["L"]


def test_a_runs_locked_plan_reached_through_a_link_then_dotdot_is_not_replaced_even_with_force(tmp_path, capsys,
                                                                                               monkeypatch):
    """`--out L/../plan.json --force`, L a link to a run folder's sub/ (mut56, stop 54): the file the OS reaches is
    the run's locked plan.json, beside its checkpoint.pt. Looked for by spelling, the checkpoint was sought in the
    folder holding L, and --force replaced the run's plan with another, which no resume of the run then accepts."""
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "sub").mkdir(parents=True)
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", str(run_dir / "plan.json"))
    assert rc == 0, err
    (run_dir / "checkpoint.pt").write_bytes(b"a run's checkpoint")
    locked = (run_dir / "plan.json").read_bytes()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "L").symlink_to(run_dir / "sub")
    monkeypatch.chdir(tmp_path / "work")
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "2", "--out", f"L{os.sep}..{os.sep}plan.json", "--force")
    assert rc == 2 and err.count("\n") == 1 and "locked plan of the run" in err, err
    assert (run_dir / "plan.json").read_bytes() == locked


def test_a_plan_json_reached_through_a_link_then_dotdot_beside_a_runs_record_is_not_written(tmp_path, capsys,
                                                                                              monkeypatch):
    """mut57 (stop 54): `--out L/../plan.json`, L a link to RUN/sub, where RUN's plan.json is gone and its
    `.steps_done` records steps under another plan. The OS writes RUN/plan.json, so the
    record is looked for in RUN (`output_folder`), not in the folder holding L: a plan written there would price
    those steps at its own rate once spent. Refused, with or without --force; nothing is written."""
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "sub").mkdir(parents=True)
    (run_dir / ".steps_done").write_bytes(
        b"dpdm-steps-run v2 2 0123456789abcdef 0.0003 constant 0123456789abcdef 0123456789abcdef".ljust(127) + b"\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "L").symlink_to(run_dir / "sub")
    monkeypatch.chdir(tmp_path / "work")
    for force in ((), ("--force",)):
        rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "2", "--out", f"L{os.sep}..{os.sep}plan.json", *force)
        assert rc == 2 and err.count("\n") == 1 and "would be the plan.json of a run whose plan.json is gone" in err \
            and "trained 2 steps under plan sha256:0123456789abcdef" in err, err
        assert not (run_dir / "plan.json").exists()


def test_a_plan_of_another_name_beside_a_runs_record_is_written(tmp_path, capsys):
    """mut57 (stop 54): only a run's own plan.json is kept beside its record of steps (`_steps_held`: None for another
    name); a plan file of another name in that folder is no run's plan and is written."""
    (tmp_path / ".steps_done").write_bytes(
        b"dpdm-steps-run v2 2 0123456789abcdef 0.0003 constant 0123456789abcdef 0123456789abcdef".ljust(127) + b"\n")
    rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "2", "--out", str(tmp_path / "other.json"))
    assert rc == 0 and (tmp_path / "other.json").is_file(), err
