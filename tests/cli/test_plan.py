"""`dpdm plan` and `dpdm account` through the real entry point (cli.main.main)."""
import json
import subprocess
import sys

import pytest

import accounting
from cli.main import main
from cli.plan import DATASET_SIZES, PRESETS


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_plain_plan_uses_mnist5k_defaults(capsys):
    rc, out, err = run(capsys, "--eps", "10", "--delta", "1e-5")
    assert rc == 0, err
    assert err == ""
    for word in ("mnist5k", "RDP", "PLD", "PRV", "certified epsilon"):
        assert word in out


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


def test_curve_writes_a_png(capsys, tmp_path):
    path = tmp_path / "curve.png"
    rc, out, err = run(capsys, "--eps", "2", "--delta", "1e-5", "--dataset-size", "2000", "--batch-size", "100",
                       "--steps", "100", "--curve", str(path))
    assert rc == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
