"""`dpdm demo` end to end at a few steps: the report, the samples and the file to release."""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

from cli.main import main
from dpdm import checkpoint as ckpt


@pytest.mark.slow
def test_demo_writes_report_and_release_file(tmp_path, capsys, monkeypatch):
    # The demo keeps freed memory in glibc's heap for the rest of its process; here that process is pytest's.
    monkeypatch.setenv("DPDM_MALLOC", "default")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--public-steps", "2", "--device", "cpu",
                 "--skip-audit"]) == 0
    report = capsys.readouterr().out.strip()
    assert report.endswith("report.html") and (out / "report.html").exists()
    md = (out / "report.md").read_text()
    assert "model.pt" in md and "keep private" in md
    assert "the reference CNN eval trained on the private images, cached in " in md and "(in Quality)" in md
    assert str(out / "audit") not in md   # --skip-audit: no audit folder to keep private (it was named, stop 42)
    model = torch.load(out / "model.pt", weights_only=True)
    state = ckpt.load_checkpoint(out / "run" / "checkpoint.pt")
    assert model["format"] == ckpt.MODEL_FORMAT and model["ledger"] == state["ledger"]
    assert model["ledger"]["steps_done"] == 3 and "seed" not in model["config"].get("train", {})
    assert (out / "samples.npz").exists() and (out / "grid.png").exists()
    # The private run starts from the public warm start, and the report says so and what real data reaches.
    public = ckpt.load_checkpoint(out / "public" / "checkpoint.pt")
    assert public["ledger"]["private"] is False and public["ledger"]["steps_done"] == 2
    assert state["config"]["train"]["init_from"] == str(out / "public" / "checkpoint.pt")
    assert "public warm start | 2 non-private steps (batch 128, K 1) on the public digits28-aug" in md
    assert "real training images instead" in md


def test_demo_report_shows_the_audit_verdict_with_its_reason():
    """The demo's eps-10 plan is beyond what the quick suite can certify: its report says INCONCLUSIVE and why,
    and which epsilon the verdict compared against (the demo itself exits 0: the verdict is not its exit code)."""
    from pathlib import Path

    from cli.demo import NON_PRIVATE, audit_rows

    # a reason as `audits.canary.power_advice` once worded it for the demo's plan (quick suite, 30-step canary run): the
    # row repeats whatever the reason says
    reason = ("with 200 canaries this audit cannot certify more than epsilon 3.124, so it cannot detect a "
              "violation of the claim 9.997; no number of canaries can: at delta 1e-05 and this error budget the "
              "one-run bound certifies at most 4.281 (with about 900 canaries; more certify less); a shorter canary "
              "run can: --steps 1, whose epsilon 2.733 is below 3.124, or --steps 4 or fewer with --canaries 900")
    report = {"verdict": "INCONCLUSIVE", "reasons": [reason],
              "canary_audit": {"claimed_epsilon": 9.997, "max_epsilon_lower_bound": 0.0,
                               "max_certifiable_epsilon": 3.12459, "control_max_epsilon": 0.58834,
                               "training": {"target": {"steps": 30}}}}
    rows = audit_rows(report, Path("demo_out/audit"))
    assert rows[0] == (f"verdict {NON_PRIVATE}", "INCONCLUSIVE")
    assert (f"reason {NON_PRIVATE}", reason) in rows
    label, value = next(r for r in rows if r[0].startswith("epsilon of the 30-step canary run"))
    assert value.startswith("9.997;") and "certifiable with these canaries 3.124" in value   # rounded down
    # What the attacks reach with no noise at all, which "certifiable up to 3.124" does not say (h136 F2, stop 53);
    # and that the audit is of dpdm's step, not of this run's model.
    control = dict(rows)[f"positive control (noise off) {NON_PRIVATE}"]
    assert control.startswith("largest epsilon lower bound 0.5883:"), control   # rounded down
    from cli.demo import AUDIT_TEXT

    assert "never reads this run's weights" in AUDIT_TEXT and "canary trainings of its own" in AUDIT_TEXT
    assert rows[-1] == ("report", str(Path("demo_out/audit")))
    # From canary runs on private images, outside the plan's budget (the positive control's, without noise, can
    # be a reason): marked, as the Quality rows computed from the private images are (h75 F1, stop 44).
    assert all(label.endswith(NON_PRIVATE) for label, _ in rows[:-1])


def test_demo_report_marks_the_statistics_of_the_private_images():
    """The classifier FD, precision / recall and the CNN trained on real images are computed without
    privacy from the private training images: the report marks them and says to share it without them."""
    from cli.demo import NON_PRIVATE, QUALITY_TEXT, quality_rows

    metrics = {"classifiers": {"cnn": {"test_accuracy": 0.7}, "mlp": {"test_accuracy": 0.6}},
               "classifier_fd": {"value": 27.5, "real_test_value": 1.8},
               "classifier_precision_recall": {"precision": 0.8, "recall": 0.6}}
    rows = dict(quality_rows(metrics, 0.9))
    marked = {k for k in rows if k.endswith(NON_PRIVATE)}
    assert {k for k in rows if "synthetic -> real test" in k} == set(rows) - marked   # the DP-derived ones
    assert len(marked) == 4 and any("classifier FD (not FID)" in k for k in marked)
    assert "without privacy" in QUALITY_TEXT and NON_PRIVATE in QUALITY_TEXT
    assert len(quality_rows({"classifiers": {}, "classifier_fd": None}, 0.9)) == 1   # skipped metrics: no row


def test_demo_exits_1_when_its_audit_fails_and_prints_the_verdict(tmp_path, capsys, monkeypatch):
    """A FAIL (a failed mechanism check: a privacy bug) must not hide in the report behind exit 0;
    INCONCLUSIVE, the demo's expected verdict at epsilon 10, exits 0. The stages are replaced by stubs."""
    import cli.demo as demo

    monkeypatch.chdir(tmp_path)
    for verdict, code in (("FAIL", 1), ("INCONCLUSIVE", 0), (None, 0)):
        monkeypatch.setattr(demo, "run_demo", lambda out, **kw: (out / "report.html", verdict))
        assert main(["demo", "--out", "d", "--device", "cpu"]) == code
        # The absolute path: `make -C DIR demo` runs in DIR, the user's shell elsewhere (h136 N6, stop 53).
        assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "report.html")
    line = demo.audit_verdict_line({"verdict": "FAIL", "reasons": ["engine_noise_std: p=1e-9", "other"]})
    assert line == "FAIL (engine_noise_std: p=1e-9)"
    assert demo.audit_verdict_line({"verdict": "PASS", "reasons": []}) == "PASS"


def test_demo_takes_only_a_new_empty_or_earlier_demo_folder(tmp_path, capsys):
    """The demo replaces what it writes (a run/ folder included): a folder of something else is refused before
    any work; an earlier demo's outputs are removed, the rest of its folder kept."""
    from cli.demo import DEMO_MARK, _claim_demo_folder

    project = tmp_path / "project"
    (project / "run").mkdir(parents=True)
    (project / "run" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(project), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files of something other than an earlier demo" in err[0]
    assert (project / "run" / "notes.txt").read_text() == "mine" and not (project / DEMO_MARK).exists()

    # A copy of a demo's report among a project's files (another plan's run and plan.json, all of them names the
    # demo writes) is no demo folder; an unmarked demo (from before the mark) cannot be told from it.
    from cli.errors import BadInput

    (project / "plan.json").write_text("another plan")
    (project / "report.md").write_text("# dpdm demo: DP diffusion on mnist5k\n")
    with pytest.raises(BadInput, match="holds a demo's report.md but no .dpdm-demo mark"):
        _claim_demo_folder(project)
    assert (project / "run" / "notes.txt").read_text() == "mine" and (project / "plan.json").read_text() == \
        "another plan" and not (project / DEMO_MARK).exists()

    earlier = tmp_path / "demo"   # an earlier demo's folder: its outputs replaced, the rest kept
    (earlier / "run").mkdir(parents=True)
    (earlier / "grid.png").write_bytes(b"an earlier demo's grid")
    (earlier / DEMO_MARK).write_text("written by `dpdm demo`")
    (earlier / "keep.txt").write_text("not the demo's")
    _claim_demo_folder(earlier)
    assert sorted(p.name for p in earlier.iterdir()) == [DEMO_MARK, "keep.txt"]
    _claim_demo_folder(tmp_path / "new")
    assert (tmp_path / "new" / DEMO_MARK).is_file()


def test_demo_refuses_step_counts_and_out_paths_before_claiming_its_folder(tmp_path, capsys):
    """--steps or --public-steps of 10**7 and more removed an earlier demo's outputs, then crashed; an --out below
    a file was a traceback."""
    from cli.demo import DEMO_MARK

    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / DEMO_MARK).write_text("x")
    (earlier / "report.md").write_text("# dpdm demo: an earlier one\n")
    for option in ("--steps", "--public-steps"):
        assert main(["demo", "--out", str(earlier), option, "10000001", "--device", "cpu"]) == 2
        assert "100000" in capsys.readouterr().err
        assert (earlier / "report.md").exists()
    (tmp_path / "a_file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "a_file" / "sub"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0], err


def test_demo_refuses_an_unusable_cache_folder_before_any_work(tmp_path, capsys, monkeypatch):
    """The eval stage caches its reference CNN under $DPDM_CACHE: a file there (or a read-only home) was found
    after the training and sampling, a traceback with exit 4 and no report; now one line, exit 2, before the
    demo claims its folder."""
    import cli.demo as demo

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "afile"))
    monkeypatch.setattr(demo, "_claim_demo_folder", lambda out: pytest.fail("claimed its folder"))
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"the cache folder of the eval stage {str(tmp_path / 'afile')!r}" in err[0] and "is not a folder" in err[0]
    assert not (tmp_path / "d").exists()


def test_demo_report_names_the_cache_in_the_home_folder_as_tilde(tmp_path, monkeypatch):
    """The report is for sharing: the cache's path in its "keep private" row does not carry the user's name."""
    from pathlib import Path

    from cli.demo import _home_relative

    (tmp_path / "alice").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    assert _home_relative(tmp_path / "alice" / ".cache" / "dpdm" / "reference") == str(
        Path("~") / ".cache" / "dpdm" / "reference")
    assert _home_relative(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
    assert _home_relative(tmp_path / "alice2" / "demo") == str(tmp_path / "alice2" / "demo")   # whole folders only
    # HOME=/ (CI runners, service accounts) named every path ~/..., wrong for any reader (h114 N3, stop 51); so did a
    # HOME that is no folder.
    for home in ("/", str(tmp_path / "nobody")):
        monkeypatch.setenv("HOME", home)
        assert _home_relative(tmp_path / "demo" / "model.pt") == str(tmp_path / "demo" / "model.pt"), home


def test_demo_prints_each_audit_stage_once():
    """The canary training reports each of its steps: the demo printed 30 "target" and 30 "control" lines."""
    from cli.demo import audit_progress_line

    calls = [("mechanism checks", 0, 1)] + [("target", i, 30) for i in range(1, 31)] + \
        [("control", i, 30) for i in range(1, 31)]
    lines = [line for line in (audit_progress_line(*c) for c in calls) if line]
    assert lines == ["      mechanism checks", "      target (30 steps)", "      control (30 steps)"]


# --- the report's assembly, every heavy stage stubbed (mut47) ----------------------------------------------------
# The end-to-end test above is slow (never in the default suite) and runs --skip-audit; it looks neither at which
# figure is in which section, nor at the "epsilon spent" row, nor at how the epsilons are rounded.

def _sections(md: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _row(section: str, key: str) -> str:
    for line in section.splitlines():
        if line.startswith(f"| {key} |"):
            return line[len(f"| {key} |"):].rsplit("|", 1)[0].strip()
    raise AssertionError(f"no row {key!r} in {section!r}")


@pytest.fixture()
def stubbed_demo(tmp_path, monkeypatch):
    """cli.demo with training, export, sampling, eval and the audit replaced by stubs: run_demo's own assembly of
    the report runs, in seconds."""
    import audits.suite
    import cli.demo as demo
    import dpdm.datasets
    import dpdm.evaluate
    import dpdm.export
    import dpdm.report
    import dpdm.sample
    import dpdm.train

    monkeypatch.setenv("DPDM_MALLOC", "default")
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "cache"))
    calls = {}
    data = types.SimpleNamespace(x=None, y=None, num_classes=10, name="mnist5k")
    monkeypatch.setattr(dpdm.datasets, "load_dataset", lambda name, split="train", **kw: data)
    monkeypatch.setattr(dpdm.datasets, "load_npz", lambda path, **kw: None)

    def train(doc, x, y, num_classes, out, config, **kw):
        calls.setdefault("train", []).append(out)
        return {"epsilon_spent": 1.23456, "steps_done": 2, "private": config.private}

    monkeypatch.setattr(dpdm.train, "train", train)
    monkeypatch.setattr(dpdm.export, "export_model",
                        lambda src, dst: {"model": str(dst), "sha256": "abc123", "weights_sha256": "def456"})

    def sample_checkpoint(path, *, out_path, grid_path, **kw):
        Path(grid_path).write_bytes(b"grid")
        Path(out_path).write_bytes(b"npz")

    monkeypatch.setattr(dpdm.sample, "sample_checkpoint", sample_checkpoint)
    def evaluate_samples(*a, **kw):
        calls["eval_kwargs"] = kw
        return {"classifiers": {"cnn": {"test_accuracy": 0.7}},
                "classifier_fd": {"value": 27.5, "n": 1000, "real_test_value": 1.8, "real_test_n": 1000}}

    monkeypatch.setattr(dpdm.evaluate, "evaluate_samples", evaluate_samples)
    monkeypatch.setattr(demo, "_real_reference", lambda data, test, device: 0.9)
    report = {"verdict": "INCONCLUSIVE", "reasons": ["too few canaries"],
              "canary_audit": {"claimed_epsilon": 9.99712, "max_epsilon_lower_bound": 1.23456,
                               "max_certifiable_epsilon": 3.12459, "control_max_epsilon": 0.58834,
                               "training": {"target": {"steps": 3}}}}
    monkeypatch.setattr(audits.suite, "run_audit", lambda *a, **kw: report)
    real_curve = dpdm.report.privacy_curve

    def privacy_curve(plan, path, **kw):
        calls["curve_steps_done"] = kw.get("steps_done")
        return real_curve(plan, path, **kw)

    monkeypatch.setattr(dpdm.report, "privacy_curve", privacy_curve)
    return demo, calls


def test_demo_report_puts_each_figure_and_epsilon_in_its_row(tmp_path, stubbed_demo):
    """Catches the grid and the curve swapped, the plan's epsilon shown as "epsilon spent", the guarantee rounded
    down, the audit's epsilons rounded the wrong way, and the audit folder left out of "keep private" (mut47)."""
    import accounting
    from dpdm.report import _md_cell
    from dpdm.report_utils import epsilon_text

    demo, calls = stubbed_demo
    out = tmp_path / "demo"
    html_path, verdict = demo.run_demo(out, steps=3, device="cpu", audit=True, public_steps=0)
    assert verdict == "INCONCLUSIVE" and html_path == out / "report.html"
    s = _sections((out / "report.md").read_text(encoding="utf-8"))
    # Each figure in its own section: the samples' grid under Samples, the privacy curve under Privacy curve.
    assert "![Samples](grid.png)" in s["Samples"] and "privacy_curve" not in s["Samples"]
    assert "![Privacy curve](privacy_curve.png)" in s["Privacy curve"] and "grid.png" not in s["Privacy curve"]
    assert calls["curve_steps_done"] == 2   # the curve marks the steps the run did, not the plan's
    # The guarantee is the plan's certified epsilon, rounded UP; "epsilon spent" is the run's ledger.
    doc = accounting.load_plan(out / "plan.json")
    guarantee = _row(s["Privacy"], "guarantee")
    shown = re.search(r"\(epsilon=([^,]+), delta=", guarantee).group(1)
    assert shown == epsilon_text(doc.epsilon) and float(shown) >= doc.epsilon, (shown, doc.epsilon)
    assert _row(s["Privacy"], "epsilon spent") == "1.235 after 2 of 3 steps"
    # The audit folder is named among what to keep private (as report.md shows a path), with the marked rows.
    keep = _row(s["Release"], "keep private")
    assert _md_cell(str(out / "audit")) in keep and "(in Quality and Audit)" in keep
    # The demo's own console: its training bar shows the un-noised loss (h136 F4, stop 53).
    assert "the demo's terminal output (the training bar shows un-noised losses)" in keep
    # Both digests README says to publish: the file's and its weights', which samples.npz records (h136 F5).
    assert _row(s["Release"], "model to release").endswith("(EMA weights and the ledger; sha256 abc123, weights "
                                                           "sha256 def456, which samples.npz records: publish both)")
    assert "positive control (noise off) (non-private)" in s["Audit"] and "never reads" in s["Audit"]
    # The audit's epsilons: the claim rounded up, the lower bound and the most certifiable rounded down.
    claim = next(line for line in s["Audit"].splitlines() if "canary run (compared against)" in line)
    assert "9.998; largest epsilon lower bound 1.234, largest certifiable with these canaries 3.124" in claim
    assert "(non-private)" in claim


def test_demo_report_names_no_home_folder(tmp_path, monkeypatch, stubbed_demo):
    """The report is for sharing, the user's name is not: with --out in the home folder (--out ~/demo, which the
    shell expands), the model and samples to release, the run and audit folders to keep private and the audit's
    report folder were shown as /home/USER/... in report.md and report.html; only the cache's row was ~/... (stop
    44; h99 F2, stop 49). A relative --out (the default demo_out) stays as given."""
    import html

    from cli.demo import _home_relative
    from dpdm.report import _md_cell

    demo, _ = stubbed_demo
    home = tmp_path / "alice"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = home / "projects" / "demo"
    demo.run_demo(out, steps=2, device="cpu", audit=True, public_steps=0)
    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert str(home) not in md and str(home) not in page
    tilde = Path("~") / "projects" / "demo"
    rows = {"model to release": f"{tilde / 'model.pt'} (EMA weights and the ledger; sha256 abc123, weights sha256 "
                                f"def456, which samples.npz records: publish both)",
            "synthetic data to release": str(tilde / "samples.npz"),
            "report": str(tilde / "audit")}
    s = _sections(md)
    for key, value in rows.items():
        assert _row(s["Audit" if key == "report" else "Release"], key) == _md_cell(value)
        assert f"<th>{html.escape(key)}</th><td>{html.escape(value)}</td>" in page
    keep = f"{tilde / 'run'} (its checkpoint holds the secret seed of the batches and the noise) and {tilde / 'audit'};"
    assert _row(s["Release"], "keep private").startswith(_md_cell(keep)) and html.escape(keep) in page
    assert _home_relative(Path("demo_out") / "run") == str(Path("demo_out") / "run")   # wherever the demo runs


def test_demo_audit_rows_round_the_claim_up_and_the_bounds_down():
    """Catches the audit row's claim rounded down or its lower bound rounded up (mut47): the test above has claim
    9.997 and lower bound 0, which show the same either way."""
    from cli.demo import audit_rows

    report = {"verdict": "FAIL", "reasons": [],
              "canary_audit": {"claimed_epsilon": 2.00001, "max_epsilon_lower_bound": 2.99999,
                               "max_certifiable_epsilon": 5.55559, "training": {"target": {"steps": 7}}}}
    _, value = next(r for r in audit_rows(report, Path("a")) if r[0].startswith("epsilon of the 7-step"))
    assert value == "2.001; largest epsilon lower bound 2.999, largest certifiable with these canaries 5.555"
    # A narrow FAIL (h123 F3, stop 52): at 4 digits 1.72585 > 1.7258 read "1.726 ... lower bound 1.725".
    report["canary_audit"].update(claimed_epsilon=1.7258, max_epsilon_lower_bound=1.72585)
    _, value = next(r for r in audit_rows(report, Path("a")) if r[0].startswith("epsilon of the 7-step"))
    assert value.startswith("1.7258; largest epsilon lower bound 1.72585, "), value


def test_demo_fd_floor_row_shows_its_own_n():
    """Catches the FD floor's row showing the samples' n (mut47): the FD and its floor compare only at equal n."""
    from cli.demo import quality_rows

    rows = dict(quality_rows({"classifiers": {}, "classifier_fd": {"value": 27.5, "n": 1000, "real_test_value": 1.8,
                                                                   "real_test_n": 500}}, 0.9))
    fd = next(v for k, v in rows.items() if k.startswith("classifier FD (not FID)"))
    floor = next(v for k, v in rows.items() if k.startswith("classifier FD, real test vs real train"))
    assert fd == "27.500 (n=1000)" and floor == "1.800 (n=500)"


def test_demo_eval_warns_of_an_uncached_reference_in_one_dpdm_line_and_reads_a_read_only_cache(
        tmp_path, monkeypatch, capsys, stubbed_demo):
    """A reference CNN that could not be cached is one `dpdm: warning:` line (the eval stage passed no `warn`, so it
    was Python's two-line RuntimeWarning; h104 N1, stop 49), and a read-only cache folder holding entries is read as
    `dpdm eval` reads it, not refused before any work."""
    import os

    demo, calls = stubbed_demo
    demo.run_demo(tmp_path / "demo", steps=2, device="cpu", audit=False, public_steps=0)
    warn = calls["eval_kwargs"]["warn"]
    capsys.readouterr()
    warn("could not cache the reference CNN in 'x' (Read-only file system)")
    assert capsys.readouterr().err == "dpdm: warning: could not cache the reference CNN in 'x' (Read-only file system)\n"
    cache = tmp_path / "cache"
    (cache / "reference").mkdir(parents=True)
    monkeypatch.setenv("DPDM_CACHE", str(cache))
    os.chmod(cache / "reference", 0o500)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: mode & os.W_OK == 0)   # read-only (tests run as root)
    try:
        assert demo._check_cache_folder() == cache
    finally:
        os.chmod(cache / "reference", 0o700)


def test_demo_report_says_what_its_epsilon_bounds(tmp_path, stubbed_demo):
    """"(epsilon=9.998, delta=1e-05)-DP" alone tells a reader nothing they can use (e^10: 22,000 times the odds). The
    Privacy section bounds any membership test for one training image, from the plan alone and rounded up (h136 F1,
    stop 53): for the demo's own plan, at most 24.6% found at 1% false positives."""
    import accounting
    from accounting.calibrate import certification_discretization
    from cli.demo import DEMO, MEMBERSHIP_FPRS, membership_row

    demo, _ = stubbed_demo
    out = tmp_path / "demo"
    demo.run_demo(out, steps=3, device="cpu", audit=False, public_steps=0)
    row = _row(_sections((out / "report.md").read_text(encoding="utf-8"))["Privacy"], "what it means")
    plan = accounting.load_plan(out / "plan.json").plan
    bound = accounting.membership_bound(plan.to_event(), MEMBERSHIP_FPRS, discretization=certification_discretization(
        plan.sample_rate, plan.noise_multiplier, plan.steps, plan.delta, plan.target_epsilon))
    shown = [float(x) / 100 for x in re.findall(r"at most ([0-9.]+)%", row)]
    assert len(shown) == 2 and all(bound.tpr[a] <= t <= bound.tpr[a] + 1e-3 for a, t in zip(MEMBERSHIP_FPRS, shown))
    assert "wrongly flags 1% of the images not trained on" in row and "(at 0.1%: at most" in row
    # The demo's default plan: the figures of its pessimistic PLD (q 0.256, sigma 1.000466, 30 steps), rounded up.
    plan = accounting.PrivacyPlan(dataset_size=4000, batch_size=DEMO["batch_size"], steps=DEMO["steps"],
                                  noise_multiplier=1.0, delta=DEMO["delta"]).calibrate(epsilon=DEMO["epsilon"])
    assert membership_row(plan) == ("what it means", "any test of whether one image was trained on (whatever else the "
                                    "attacker knows) that wrongly flags 1% of the images not trained on flags at most "
                                    "24.6% of those trained on (at 0.1%: at most 8.42%); at any false-positive rate, "
                                    "the true-positive rate exceeds it by at most 0.544")


def test_demo_report_is_its_owners_alone(tmp_path, stubbed_demo):
    """report.md and report.html hold the rows computed without privacy from the private images: 0600 whatever the
    umask, as the audit's report and the release files (they were 0644 under umask 022: h136 F3, stop 53)."""
    import os
    import stat

    demo, _ = stubbed_demo
    out = tmp_path / "demo"
    old = os.umask(0o022)
    try:
        demo.run_demo(out, steps=2, device="cpu", audit=False, public_steps=0)
    finally:
        os.umask(old)
    assert {name: stat.S_IMODE((out / name).stat().st_mode) for name in ("report.md", "report.html")} == \
        {"report.md": 0o600, "report.html": 0o600}


def test_demo_privacy_curve_starts_at_zero(tmp_path, monkeypatch):
    """The y axis from 0: it started at the first point (2.7 of the demo's 10), which hid the first step's large share
    of the budget (h136 N5, stop 53)."""
    import accounting
    import matplotlib.figure

    from dpdm.report import privacy_curve

    shown = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **kw: (shown.append(self.axes[0].get_ylim()), real(self, *a, **kw))[1])
    plan = accounting.PrivacyPlan(dataset_size=4000, batch_size=1024, steps=30, noise_multiplier=1.0, delta=1e-5)
    privacy_curve(plan, tmp_path / "curve.png", steps_done=30)
    assert len(shown) == 1 and shown[0][0] == 0 and shown[0][1] > 9, shown


def test_demo_passes_the_audit_its_warning_line(tmp_path, monkeypatch, capsys, stubbed_demo):
    """`dpdm audit` says before its canary runs train that they cannot test a claim beyond what its canaries can
    certify (the demo's eps 10, always); the demo called `run_audit` without `warn`, so its audit said nothing of it
    until the verdict, minutes later. Its line is the CLI's one `dpdm: warning:` line, as `dpdm audit`'s."""
    import audits.suite

    demo, _ = stubbed_demo
    report = {"verdict": "INCONCLUSIVE", "reasons": ["too few canaries"], "canary_audit": None}

    def run_audit(*a, warn=None, **kw):
        assert warn is not None, "run_audit was given no warn"
        warn("with 200 canaries this audit cannot certify more than epsilon 3.124")
        return report
    monkeypatch.setattr(audits.suite, "run_audit", run_audit)
    demo.run_demo(tmp_path / "demo", steps=2, device="cpu", audit=True, public_steps=0)
    err = capsys.readouterr().err.splitlines()
    warned = [i for i, line in enumerate(err) if line.startswith("dpdm: warning: with 200 canaries")]
    verdict = [i for i, line in enumerate(err) if line.startswith("dpdm: audit verdict:")]
    assert len(warned) == 1 and len(verdict) == 1 and warned[0] < verdict[0], err


def test_demo_privacy_curve_is_written_atomically(tmp_path, monkeypatch, stubbed_demo):
    """privacy_curve.png was the one output the demo wrote in place: a demo stopped while plotting left half a PNG
    under the curve's name (s56 outwalk N1). Now plotted into a temporary file and renamed: a failure midway leaves
    neither, and keeps a file already there; a plot that completes replaces it."""
    import accounting
    import dpdm.report

    demo, _ = stubbed_demo
    real = dpdm.report.privacy_curve

    def stopped(plan, path, **kw):
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt
    monkeypatch.setattr(dpdm.report, "privacy_curve", stopped)
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, steps=2, device="cpu", audit=False, public_steps=0)
    assert not [p.name for p in out.iterdir() if "privacy_curve" in p.name], "half a curve left behind"
    # the file already there is kept by a failure and replaced by a plot that completes
    from cli.demo import _write_curve

    plan = accounting.PrivacyPlan(dataset_size=4000, batch_size=1024, steps=30, noise_multiplier=1.0, delta=1e-5)
    curve = tmp_path / "privacy_curve.png"
    curve.write_bytes(b"the last demo's curve")
    with pytest.raises(KeyboardInterrupt):
        _write_curve(plan, curve, steps_done=30)
    assert curve.read_bytes() == b"the last demo's curve"
    monkeypatch.setattr(dpdm.report, "privacy_curve", real)
    assert _write_curve(plan, curve, steps_done=30) == curve
    assert curve.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir() if "privacy_curve" in p.name) == [curve.name]
