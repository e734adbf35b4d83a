"""`dpdm sample --out/--grid`: they replace only files that `dpdm sample` wrote, never the run's data, and
an output that cannot be written, or more images than fit in memory, is one error line before any drawing."""
from __future__ import annotations

import errno
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

import accounting
from cli.main import main
from tests.cli.test_export import one_error_line, run_cli


def train_tiny_runs(d, runs=(("run", ()),)):
    """`d` holding data.npz (24 8x8 images of 3 classes), plan.json (2 steps over them) and, for each (name, extra
    options) of `runs`, a run trained under it in d/name."""
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8), y=(np.arange(24) % 3),
             num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=2.0,
                                  noise_multiplicity=1, delta=1e-5, dataset_name=f"npz:{d / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), d / "plan.json")
    for name, extra in runs:
        assert main(["train", "--plan", str(d / "plan.json"), "--out", str(d / name), "--device", "cpu", "--quiet",
                     *extra]) == 0
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.mktemp("output_safety"))


def _sample(run, out, *extra, n=4):
    return ["sample", "--run", run / "run", "--n", n, "--sampler-steps", 2, "--device", "cpu", "--out", out, *extra]


@pytest.fixture()
def no_drawing(monkeypatch):
    """Fails the test if `dpdm sample` starts drawing images."""
    import dpdm.sampling

    def generate(*a, **k):
        raise AssertionError("drew images before checking the outputs")
    monkeypatch.setattr(dpdm.sampling, "generate", generate)


def test_sample_replaces_only_its_own_files(run, tmp_path, capsys, no_drawing):
    """`dpdm sample --out data.npz` replaced the run's training set, `--grid good/a/0.png` a training image,
    `--out other/scores.npz` an audit's scores: now each is kept, and nothing is drawn."""
    np.savez(tmp_path / "scores.npz", included=np.ones(4, dtype=bool))
    (tmp_path / "notes.npz").write_text("the user's own file")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n the user's own image")
    cases = [("--out", run / "data.npz", ()), ("--out", tmp_path / "scores.npz", ()),
             ("--out", tmp_path / "notes.npz", ()),
             ("--grid", tmp_path / "photo.png", ("--grid", tmp_path / "photo.png"))]
    before = {p: p.read_bytes() for p in (run / "data.npz", *tmp_path.iterdir())}
    for option, path, extra in cases:
        out = tmp_path / "s.npz" if option == "--grid" else path
        code, _, err = run_cli(_sample(run, out, *extra), capsys)
        line = one_error_line(code, err)
        assert f"{option}='{path}' already exists" in line and "kept" in line, line
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "s.npz").exists()


def test_sample_rewrites_its_own_samples_and_grid(run, tmp_path, capsys):
    """What `dpdm sample` wrote it may write again (the README's `--out samples.npz --grid grid.png`). A finished
    run's record holds its checkpoint's steps: no line about steps past it (h131 F1), and none on the line. The
    grid's mark names the model's plan and kind, as the samples' meta arrays do (r2 N1, stop 55)."""
    from dpdm.report_utils import grid_identity

    for seed in (0, 1):
        code, _, err = run_cli(_sample(run, tmp_path / "s.npz", "--grid", tmp_path / "grid.png", "--seed", seed),
                               capsys)
        assert code == 0, err
        assert ".steps_done" not in err and "from step" not in err, err
        with np.load(tmp_path / "s.npz") as z:
            assert int(z["meta_seed"]) == seed
            assert grid_identity(tmp_path / "grid.png") == (str(z["meta_plan_digest"]), True)
    assert grid_identity(tmp_path / "grid.png")[0] == accounting.load_plan(run / "plan.json").digest


def test_sample_keeps_a_grid_of_another_plan_or_kind_without_force(run, tmp_path, capsys, no_drawing):
    """`dpdm sample --grid` replaced the grid of a private model's samples with its --no-dp baseline's, or with
    another plan's model's, without --force, exit 0: a grid was told by its `dpdm.grid/1` mark alone, while the
    samples file beside it was kept (r2 N1, stop 55). The mark names the model's plan and kind, checked as the
    samples file's meta arrays, before any drawing: one line naming both, nothing written. A grid whose mark names
    neither (an older dpdm's, a `dpdm plan --curve` plot) is replaced only with --force too."""
    from dpdm.report_utils import grid_identity, save_grid
    from dpdm.sample import check_outputs

    digest, other = accounting.load_plan(run / "plan.json").digest, "sha256:" + "0" * 64
    x = np.zeros((3, 1, 8, 8), np.uint8)
    cases = {"kind.png": ((digest, False), "holds a grid of samples of the model of a NON-PRIVATE (--no-dp) run of "
                                           "this plan, and this model is private"),
             "plan.pdf": ((other, True), "holds a grid of samples of a model of another plan (sha256:000000000000...)"),
             "both.svg": ((other, False), "holds a grid of samples of the model of a NON-PRIVATE (--no-dp) run of "
                                          "another plan (sha256:000000000000...; this model is private)"),
             "bare.jpg": (None, "holds a grid from `dpdm sample` that names no plan or kind (private or --no-dp) of "
                                "the model it shows")}
    for name, (identity, says) in cases.items():
        grid = save_grid(x, np.arange(3), tmp_path / name, identity=identity)
        assert grid_identity(grid) == identity
        before = grid.read_bytes()
        line = one_error_line(*run_cli(_sample(run, tmp_path / "s.npz", "--grid", grid), capsys)[::2])
        assert line.startswith(f"dpdm: error: --grid='{grid}' {says}"), line
        assert line.endswith("; it is kept: choose another --grid, or pass --force to replace it"), line
        assert grid.read_bytes() == before and not (tmp_path / "s.npz").exists()
        check_outputs(tmp_path / "s.npz", grid, plan_digest=digest, private=True, force=True)   # --force replaces it
    same = save_grid(x, np.arange(3), tmp_path / "same.png", identity=(digest, True))
    check_outputs(tmp_path / "s.npz", same, plan_digest=digest, private=True)   # this plan's and kind's: replaced


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg", ".jpg", ".jpeg"])
def test_every_grid_format_is_recognised_as_dpdms(tmp_path, suffix):
    """Each format carries the mark, and the plan and kind of the model after it, read back whatever bytes the format
    puts after them (a PNG chunk's CRC: r2 N1, stop 55); a grid without them names none."""
    from dpdm.report_utils import grid_identity, is_dpdm_grid, save_grid

    x = np.zeros((3, 1, 8, 8), dtype=np.uint8)
    save_grid(x, np.arange(3), tmp_path / f"g{suffix}", title="t")
    assert is_dpdm_grid(tmp_path / f"g{suffix}") and grid_identity(tmp_path / f"g{suffix}") is None
    (tmp_path / f"h{suffix}").write_bytes((tmp_path / f"g{suffix}").read_bytes().replace(b"dpdm.grid/1", b"other/1"))
    assert not is_dpdm_grid(tmp_path / f"h{suffix}") and not is_dpdm_grid(tmp_path / "missing.png")
    for i, private in enumerate((True, False) * 2):   # titles of several lengths: the CRC differs
        identity = (f"sha256:{i:064x}", private)
        save_grid(x, np.arange(3), tmp_path / f"g{suffix}", title="t" * i, identity=identity)
        assert is_dpdm_grid(tmp_path / f"g{suffix}") and grid_identity(tmp_path / f"g{suffix}") == identity


def test_the_runs_own_data_is_never_an_output(run, tmp_path):
    """A run trained on an npz that `dpdm sample` wrote, or on an image folder: sampling into that npz, or a
    grid into that folder (a new training image), is refused."""
    from dpdm.sample import SampleError, check_outputs

    np.savez(tmp_path / "synthetic.npz", x=np.zeros((2, 1, 8, 8), np.uint8), meta_plan_digest=np.asarray("x"),
             meta_private=np.asarray(True))
    check_outputs(tmp_path / "synthetic.npz")   # a samples file: replaceable in itself
    with pytest.raises(SampleError, match="the run's training data"):
        check_outputs(tmp_path / "synthetic.npz", dataset=f"npz:{tmp_path / 'synthetic.npz'}")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(SampleError, match="inside the run's training data"):
        check_outputs(tmp_path / "s.npz", tmp_path / "imgs" / "a" / "new.png", dataset=f"folder:{tmp_path / 'imgs'}")
    check_outputs(tmp_path / "s.npz", tmp_path / "new.png", dataset=f"folder:{tmp_path / 'imgs'}")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_output_folders_are_one_error_line(run, tmp_path, capsys, no_drawing):
    """Under /proc (as for a folder without write permission) the folder cannot be created; os.access says
    yes to root, so sample and export raised FileNotFoundError (exit 4) after all the work."""
    for args, option in ((_sample(run, "/proc/nope/s.npz"), "--out"),
                         (_sample(run, tmp_path / "s.npz", "--grid", "/proc/g.png"), "--grid"),
                         (["export", "--run", run / "run", "--out", "/proc/nope/m.pt"], "--out")):
        code, _, err = run_cli(args, capsys)
        assert one_error_line(code, err).startswith(f"dpdm: error: {option}='/proc/")
    assert not (tmp_path / "s.npz").exists()


def test_output_parent_problem_probes_the_folder(tmp_path, monkeypatch):
    """A folder that refuses new files although os.access says it may be written (root, or a read-only
    mount) is found by the probe file, which is removed again."""
    import tempfile

    from dpdm.report_utils import output_parent_problem

    assert output_parent_problem(tmp_path / "new" / "s.npz") is None and list(tmp_path.iterdir()) == []

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert "not writable (Permission denied)" in output_parent_problem(tmp_path / "s.npz")
    assert "cannot be created" in output_parent_problem(tmp_path / "new" / "s.npz")


def test_an_output_under_a_file_then_dotdot_is_one_line_before_any_work(run, tmp_path, capsys, no_drawing):
    """`--grid DATA.npz/../g.png`: os.path.abspath removed the `..` by its spelling, the check passed, and the OS
    refused the path (ENOTDIR) after every image was drawn: a traceback, exit 4 (h131 F2). The same for sample's
    --out and export's --out; train's --out gave a line about its steps record, of a run that never was (N3)."""
    from dpdm.report_utils import output_parent_problem

    (tmp_path / "afile").write_text("a file, not a folder")
    via = tmp_path / "afile" / ".."
    problem = output_parent_problem(via / "s.npz")
    assert f"its folder '{via}' cannot be reached ('{tmp_path / 'afile'}' is not a folder)" == problem, problem
    assert "is not a folder" in output_parent_problem(tmp_path / "afile" / "x" / ".." / ".." / "s.npz")
    assert "does not exist" in output_parent_problem(tmp_path / "new" / ".." / "s.npz")   # r1 F4: see below
    for args, option, value in ((_sample(run, tmp_path / "s.npz", "--grid", via / "g.png"), "--grid", via / "g.png"),
                                (_sample(run, via / "s.npz"), "--out", via / "s.npz"),
                                (["export", "--run", run / "run", "--out", via / "m.pt"], "--out", via / "m.pt"),
                                (["train", "--plan", run / "plan.json", "--out", via / "run2"], "--out", via / "run2")):
        code, _, err = run_cli(args, capsys)
        line = one_error_line(code, err)
        assert line.startswith(f"dpdm: error: {option}") and str(value) in line and "is not a folder" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "a file, not a folder"


def test_an_output_through_a_missing_folder_then_dotdot_or_naming_a_folder_is_one_line_before_any_work(
        run, tmp_path, capsys, no_drawing):
    """`new/../s.npz` (new/ missing): `dpdm sample` and `dpdm export` made an empty new/ to get there, and `dpdm
    plan` failed after its calibration (r1 F4, stop 53): the OS follows '..' only out of a folder that exists, so
    it is refused for every output, in one line before any work. `export --out data.npz/..` gave a traceback
    (FileExistsError, exit 4), `--out new/..` made new/ and then failed (EBUSY): a folder's name, not a file's."""
    (tmp_path / "afile").write_text("a file, not a folder")
    new = tmp_path / "new"
    for args, option, expected in (
            (_sample(run, new / ".." / "s.npz"), "--out", f"('{new}' does not exist"),
            (_sample(run, tmp_path / "s.npz", "--grid", new / "x" / ".." / "g.png"), "--grid", "does not exist"),
            (["export", "--run", run / "run", "--out", new / ".." / "m.pt"], "--out", "does not exist"),
            (["export", "--run", run / "run", "--out", tmp_path / "afile" / ".."], "--out",
             "names a folder (its last part is '..')"),
            (["export", "--run", run / "run", "--out", new / ".."], "--out", "names a folder"),
            (["train", "--plan", run / "plan.json", "--out", new / ".." / "run2"], "--out", "does not exist")):
        code, _, err = run_cli(args, capsys)
        line = one_error_line(code, err)
        assert line.startswith(f"dpdm: error: {option}") and expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_outputs_through_a_link_then_dotdot_are_checked_and_written_where_the_os_puts_them(
        run, tmp_path, capsys, monkeypatch, no_drawing):
    """`--out L/../m.pt`, L a link to a folder elsewhere: the OS writes into the parent of L's target, but the check
    probed the folder holding L, and `export`'s temporary file was made there (mkstemp's os.path.abspath removes
    `L/..` by spelling): across file systems the rename failed (EXDEV, exit 4) after the work, and `dpdm sample
    --out L/../s.npz` into a folder that takes no files (L -> /proc/1) failed after drawing (r1 F4, stop 53). Here a
    rename between folders fails as it would across file systems, and `other` takes no probe file."""
    import errno
    import tempfile

    from dpdm.report_utils import output_parent_problem

    (tmp_path / "work").mkdir()
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "work" / "L").symlink_to(tmp_path / "other" / "sub")
    monkeypatch.chdir(tmp_path / "work")
    real_replace, real_mkstemp = os.replace, tempfile.mkstemp

    def replace(src, dst):
        if os.path.realpath(os.path.dirname(src)) != os.path.realpath(os.path.dirname(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_cli(["export", "--run", run / "run", "--out", "L/../m.pt"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["m.pt", "sub"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["L"]

    def mkstemp(*a, dir=None, **k):
        if dir is not None and os.path.realpath(dir) == str(tmp_path / "other"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert "is not writable (Permission denied)" in output_parent_problem("L/../s.npz")
    assert output_parent_problem("L/s.npz") is None   # L's target itself takes files
    code, _, err = run_cli(_sample(run, "L/../s.npz"), capsys)
    assert "is not writable" in one_error_line(code, err)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["m.pt", "sub"]


def test_an_upper_case_npz_suffix_is_a_samples_file(run, tmp_path, capsys, no_drawing):
    """`--out s.NPZ` was refused as not ending in .npz (h131 N4): the suffix is read case-insensitively, as --grid's.
    (The refusal that follows is the memory check's: the option passed the suffix check.)"""
    code, _, err = run_cli(_sample(run, tmp_path / "s.NPZ", n=10**15), capsys)
    line = one_error_line(code, err)
    assert "must end in .npz" not in line and "GiB of memory" in line, line
    code, _, err = run_cli(_sample(run, tmp_path / "s.npy", n=10**15), capsys)
    assert "must end in .npz" in one_error_line(code, err)


def test_more_images_than_memory_is_one_error_line(run, tmp_path, capsys, no_drawing):
    """--n 10**15 tried to allocate the whole output (784 GB at 10**9 of 28x28) and died with a traceback."""
    code, _, err = run_cli(_sample(run, tmp_path / "s.npz", n=10**15), capsys)
    line = one_error_line(code, err)
    assert f"n={10**15} (--n)" in line and "GiB of memory" in line, line
    assert not (tmp_path / "s.npz").exists()


def test_memory_needed_counts_images_labels_and_one_batch():
    from dpdm.sample import memory_needed, physical_memory

    cfg = {"img_channels": 1, "img_resolution": 28, "num_classes": 10}
    assert memory_needed(10**9, cfg, batch_size=256) == 10**9 * (784 + 16) + 256 * 784 * 4
    assert memory_needed(10, {**cfg, "num_classes": 0}, batch_size=256) == 10 * 784 + 16 * 784 * 4   # MIN_ROWS
    assert physical_memory() is None or physical_memory() > 2**20


@pytest.mark.parametrize("argv, option", [
    (["plan", "--eps", "10", "--delta", "1e-5", "--out", ""], "--out"),        # wrote no plan, exit 0
    (["plan", "--eps", "10", "--delta", "1e-5", "--out", "   "], "--out"),     # a plan file named by spaces
    (["plan", "--eps", "10", "--delta", "1e-5", "--dataset", " ", "--out", "p.json"], "--dataset"),  # a mnist5k plan
    (["train", "--plan", "plan.json", "--out", ""], "--out"),                  # the current folder as the run
    (["train", "--plan", "plan.json", "--out", "r", "--dataset", ""], "--dataset"),
    (["sample", "--run", "", "--n", "2", "--out", "s.npz"], "--run"),
    (["export", "--run", "r", "--out", ""], "--out"),                          # named '.'
    (["export", "--run", "r", "--out", "\t"], "--out"),
    (["eval", "--samples", "s.npz", "--dataset", "mnist5k", "--test-dataset", ""], "--test-dataset"),
    (["eval", "--samples", "s.npz", "--dataset", "mnist5k", "--public-pretrain", ""], "--public-pretrain"),
    (["baseline", "dp-classifier", "--plan", ""], "--plan"),
    (["audit", "--run", "r", "--out", ""], "--out"),
    (["demo", "--out", ""], "--out"),
])
def test_an_empty_path_or_dataset_is_one_error_line(tmp_path, monkeypatch, capsys, argv, option):
    """An unset shell variable (`--out "$PLAN"`) gives an empty value: click took it for the current folder, or, in
    `dpdm plan`, for no option at all. Each is refused before anything is read or written, and so is a blank one
    (a file or folder named by its spaces)."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(main(argv), capsys.readouterr().err)
    assert line.startswith(f"dpdm: error: {option}=") and "is empty" in line, line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["npz:", "folder:", "folder: "])
def test_a_path_dataset_without_a_path_is_refused(tmp_path, monkeypatch, name):
    """`folder:` read the current folder's images (`npz:` named '.')."""
    from dpdm.datasets import DataError, load_dataset

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"dataset={name!r} names no path"):
        load_dataset(name)


@pytest.mark.parametrize("name", ["npz: ", "folder: "])
def test_a_plan_is_not_made_for_a_path_dataset_without_a_path(tmp_path, monkeypatch, capsys, name):
    """`dpdm plan --dataset "npz: "` (an unset variable after the colon) wrote a locked plan that every later
    command refused ("names no path")."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(main(["plan", "--dataset", name, "--dataset-size", "10", "--noise-multiplier", "1",
                                "--batch-size", "2", "--steps", "2", "--delta", "1e-5", "--out", "p.json"]),
                          capsys.readouterr().err)
    assert line == f"dpdm: error: --dataset={name!r} names no path (an unset variable?): give {name.split(':')[0]}:PATH"
    assert not list(tmp_path.iterdir())


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_the_runs_data_named_by_a_relative_path_is_kept_from_any_folder(tmp_path, monkeypatch, capsys):
    """A second-generation run trained on samples (`--dataset npz:gen1.npz`, relative): its config recorded the
    path as typed, and `dpdm sample` resolved it against the working directory, so from another folder `--out
    /abs/gen1.npz` replaced the run's training data (exit 0). The same through the release file, which names no
    local path by design. Now the run records the absolute path (and `dpdm audit` reads the same file from any
    folder), and a samples file of a model of another plan is replaced only with --force."""
    import json

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    rng = np.random.default_rng(1)
    data = work / "gen1.npz"   # what `dpdm sample` of an earlier model wrote: x, y and its meta arrays
    np.savez(data, x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8), y=np.arange(24) % 3,
             num_classes=3, meta_plan_digest=np.asarray("sha256:" + "0" * 64), meta_private=np.asarray(True))
    original = data.read_bytes()
    monkeypatch.chdir(work)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=2.0,
                                  noise_multiplicity=1, delta=1e-5, dataset_name="npz:gen1.npz")
    accounting.write_plan(accounting.make_plan_document(plan), work / "plan.json")
    assert main(["train", "--plan", "plan.json", "--out", str(work / "run"), "--device", "cpu", "--quiet"]) == 0
    assert json.loads((work / "run" / "config.json").read_text())["dataset"] == f"npz:{data}"
    code, _, err = run_cli(["export", "--run", str(work / "run"), "--out", str(work / "model.pt")], capsys)
    assert code == 0, err
    monkeypatch.chdir(elsewhere)
    for source in (["--run", str(work / "run")], ["--checkpoint", str(work / "model.pt")]):
        argv = ["sample", *source, "--n", "4", "--sampler-steps", "2", "--device", "cpu", "--out", str(data)]
        line = one_error_line(*run_cli(argv, capsys)[::2])
        assert ("is the run's training data" in line if source[0] == "--run" else
                "holds samples of a model of another plan (sha256:000000000000...)" in line), line
        assert data.read_bytes() == original
    # --force replaces another plan's samples, except where the run's own data is known
    assert one_error_line(*run_cli([*argv[:1], "--run", str(work / "run"), *argv[3:], "--force"], capsys)[::2])
    assert data.read_bytes() == original
    other = elsewhere / "other.npz"
    other.write_bytes(original)
    argv = [a if a != str(data) else str(other) for a in argv]
    assert one_error_line(*run_cli(argv, capsys)[::2]).endswith("or pass --force to replace it")
    code, _, err = run_cli([*argv, "--force"], capsys)
    assert code == 0, err
    code, _, err = run_cli(argv, capsys)   # now samples of this model's plan: replaced as before
    assert code == 0, err


@pytest.mark.parametrize("extra", [("--s-min", 60), ("--s-max", 0.01), ("--s-min", 60, "--s-max", 50)])
def test_a_churn_range_that_churns_nowhere_is_refused_before_drawing(run, tmp_path, capsys, no_drawing, extra):
    """A lone --s-min above the default --s-max (50), or a lone --s-max below the default --s-min (0.05), turned
    the churn off without a word: the samples were Heun's, recorded as churn. Only the explicit pair was refused."""
    code, _, err = run_cli(_sample(run, tmp_path / "s.npz", "--sampler", "churn", *extra), capsys)
    line = one_error_line(code, err)
    assert "--s-min must be below --s-max" in line and "no step would churn" in line, line
    assert not (tmp_path / "s.npz").exists()


def test_a_grid_of_many_classes_is_written_in_every_format(tmp_path):
    """One row per class had no cap: 1,500 classes made a JPEG taller than its 65,500 px limit, and `dpdm sample
    --grid g.jpg` failed after all the drawing, writing neither the grid nor the samples."""
    from PIL import Image

    from dpdm.report_utils import MAX_GRID_ROWS, is_dpdm_grid, save_grid

    x = np.zeros((1500, 1, 8, 8), dtype=np.uint8)
    save_grid(x, np.arange(1500), tmp_path / "g.jpg", title="t")
    assert is_dpdm_grid(tmp_path / "g.jpg")
    with Image.open(tmp_path / "g.jpg") as im:
        assert 20 * MAX_GRID_ROWS < im.height < 65_500, im.size


def test_samples_of_a_plan_naming_no_dataset_record_none_not_the_text_none(run, tmp_path, capsys):
    """The samples' dataset was str(None): "None" in --json and in meta_dataset, where every other missing meta is
    null (NaN in the npz)."""
    import json

    import torch

    assert run_cli(["export", "--run", run / "run", "--out", tmp_path / "model.pt"], capsys)[0] == 0
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    model["config"]["dataset"] = None   # as `dpdm export` writes it for a plan that names no dataset
    torch.save(model, tmp_path / "anon.pt")
    code, out, err = run_cli(["sample", "--checkpoint", tmp_path / "anon.pt", "--n", 2, "--sampler-steps", 2,
                              "--device", "cpu", "--out", tmp_path / "s.npz", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["dataset"] is None
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert z["meta_dataset"].dtype.kind == "f" and np.isnan(z["meta_dataset"])


def test_cpp_bad_alloc_is_the_out_of_memory_line(run, tmp_path, capsys, monkeypatch):
    """Under an address-space limit (`ulimit -v`) torch's C++ `new` fails with RuntimeError("std::bad_alloc"):
    a traceback and "runtime failure: RuntimeError: std::bad_alloc" before, not the out-of-memory line."""
    import dpdm.sampling

    def generate(*a, **k):
        raise RuntimeError("std::bad_alloc")
    monkeypatch.setattr(dpdm.sampling, "generate", generate)
    code, _, err = run_cli(_sample(run, tmp_path / "s.npz"), capsys)
    assert code == 4 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dpdm: runtime failure: out of memory on the machine") and "--batch-size" in err, err
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM])
def test_a_folder_that_cannot_be_written_mid_command_is_one_line(run, tmp_path, monkeypatch, capsys, code):
    """A write that fails after the output checks (a read-only remount after disk errors, an I/O error,
    permissions taken away mid-command) had ended `dpdm sample` (and every command but train's loop, which names
    the checkpoint to resume from) in a traceback: now one line, exit 4, nothing left behind."""
    def fails(path, **arrays):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(np, "savez", fails)
    out = tmp_path / "s.npz"
    rc, _, err = run_cli(_sample(run, out), capsys)
    assert rc == 4 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"dpdm: runtime failure: [Errno {code}] {os.strerror(code)}: "), err
    assert f"({errno.errorcode[code]}); files written before are kept" in err, err
    assert not list(tmp_path.iterdir())


def test_a_pdf_grid_larger_than_the_head_span_is_recognised(tmp_path):
    """Catches is_dpdm_grid reading only the first 64 KiB (mut47): a large PDF's mark lies in the trailer's Info."""
    from dpdm.report_utils import _GRID_MARK_SPAN, is_dpdm_grid, save_grid

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(400, 3, 32, 32), dtype=np.uint8)   # noise: the PDF's image barely compresses
    path = save_grid(x, np.arange(400) % 40, tmp_path / "g.pdf", title="t")
    assert path.stat().st_size > 2 * _GRID_MARK_SPAN
    with open(path, "rb") as f:
        assert b"dpdm.grid/1" not in f.read(_GRID_MARK_SPAN)   # the case this test is about: mark in the trailer
    assert is_dpdm_grid(path)


def test_a_grid_of_too_many_classes_shows_the_first_ones(tmp_path, monkeypatch):
    """Catches a grid of more than MAX_GRID_ROWS classes showing the last ones (mut47; its title says first)."""
    import matplotlib.axes

    from dpdm.report_utils import MAX_GRID_ROWS, save_grid

    shown = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda self, a, **kw: (shown.append(a), real(self, a, **kw))[1])
    n = MAX_GRID_ROWS + 50
    x = np.broadcast_to(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), (n, 1, 4, 4)).copy()
    save_grid(x, np.arange(n), tmp_path / "g.png", title="t")
    canvas = shown[0]
    assert canvas.shape[0] == MAX_GRID_ROWS * 6
    assert [int(canvas[i * 6, 0]) for i in range(MAX_GRID_ROWS)] == list(range(MAX_GRID_ROWS))


def test_a_folder_below_a_run_folder_lies_in_it(tmp_path):
    """Catches run_folder_of checking only the folder itself, not its ancestors (mut47): `dpdm audit --out
    RUN/sub/report` and `dpdm export --out RUN/sub/model.pt` of another run are refused."""
    from audits.suite import AuditInputError, check_out_dir
    from dpdm.report_utils import run_folder_of

    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data_digest": "x", "train": {}}))
    assert run_folder_of(run) == run.resolve()
    assert run_folder_of(run / "sub" / "report") == run.resolve()
    assert run_folder_of(tmp_path / "elsewhere") is None
    with pytest.raises(AuditInputError, match="lies inside the run folder"):
        check_out_dir(run / "sub" / "report", create=False)


def test_a_grid_copies_only_the_images_it_shows(tmp_path):
    """`save_grid` took `x[y == c][:per_row]`: a copy of every image of each class, kept until the grid was drawn.
    `dpdm sample` counts the images once against memory, so a draw with --grid that passed the check needed twice
    that, after all the drawing, and failed with the --batch-size advice (h111 F1). The grid shows 10 a class."""
    import tracemalloc

    from dpdm.report_utils import save_grid

    def peak(n: int) -> int:
        x = np.zeros((n, 1, 28, 28), np.uint8)
        tracemalloc.start()
        try:
            save_grid(x, np.arange(n) % 10, tmp_path / "g.png", title="t")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    save_grid(np.zeros((20, 1, 28, 28), np.uint8), np.arange(20) % 10, tmp_path / "warm.png")   # first-use costs
    few, many = peak(100), peak(60_000)   # the grid is the same; matplotlib's own ~20 MiB in both
    images = 60_000 * 28 * 28   # 45 MiB
    assert many - few < images / 8, f"{(many - few) / 2**20:.0f} MiB more beside {images / 2**20:.0f} MiB of images"


def test_an_output_link_in_the_data_is_where_the_file_lands(tmp_path):
    """An --out that is a link inside a `folder:` dataset, to a samples file outside it, passed the check (the link's
    target was checked), and the write replaced the link with the samples: a new file in the training data (as
    h111 F2 for `dpdm export` and the run folder). The folder the file is written in is checked too."""
    from dpdm.sample import SampleError, check_outputs

    np.savez(tmp_path / "outside.npz", x=np.zeros((2, 1, 8, 8), np.uint8), meta_plan_digest=np.asarray("x"),
             meta_private=np.asarray(True))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "s.npz").symlink_to(tmp_path / "outside.npz")
    with pytest.raises(SampleError, match="is inside the run's training data"):
        check_outputs(tmp_path / "imgs" / "a" / "s.npz", dataset=f"folder:{tmp_path / 'imgs'}")
    check_outputs(tmp_path / "outside.npz", dataset=f"folder:{tmp_path / 'imgs'}")   # outside: fine


def _recorded(monkeypatch, events, fail_rename: int | None = None):
    """Records into `events` each os.fsync (the inode synced), os.replace (the inode renamed and its new name) and
    os.unlink (the name); the rename numbered `fail_rename` (1: the first) fails instead, as a kill there would."""
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, Path(dst).name))
        if sum(e[0] == "replace" for e in events) == fail_rename:
            raise OSError(errno.EIO, "killed between the renames")
        real_replace(src, dst)

    def unlink(path, *a, **k):
        events.append(("unlink", Path(path).name))
        real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)


def test_samples_and_grid_are_written_0600(run, tmp_path):
    """The samples npz and the grid took the umask's mode (0644), while every release file is 0600: the samples of
    a --no-dp model are near-copies of private images (h111 N4)."""
    from dpdm.sample import sample_checkpoint

    old_umask = os.umask(0o022)
    try:
        sample_checkpoint(run / "run" / "checkpoint.pt", n=4, sampler_steps=2, out_path=tmp_path / "s.npz",
                          grid_path=tmp_path / "g.png")
    finally:
        os.umask(old_umask)
    assert [(tmp_path / name).stat().st_mode & 0o777 for name in ("s.npz", "g.png")] == [0o600, 0o600]


def test_samples_and_grid_are_fsynced_before_their_renames(run, tmp_path, monkeypatch):
    """The samples npz (np.savez, os.replace) and the grid were renamed over the old files without an fsync, while
    checkpoints and release files are fsynced: after a power loss --out could be empty, the old samples gone
    (h111 N2). Each file is fsynced before its rename, and the folder after the renames."""
    from dpdm.sample import sample_checkpoint

    events = []
    _recorded(monkeypatch, events)
    sample_checkpoint(run / "run" / "checkpoint.pt", n=4, sampler_steps=2, out_path=tmp_path / "s.npz",
                      grid_path=tmp_path / "g.png")
    renames = [e for e in events if e[0] == "replace"]
    assert sorted(e[2] for e in renames) == ["g.png", "s.npz"], events
    for rename in renames:
        assert ("fsync", rename[1]) in events[:events.index(rename)], (rename, events)
    assert events[-1] == ("fsync", tmp_path.stat().st_ino), events


def test_a_kill_between_the_renames_leaves_no_grid_of_other_samples(run, tmp_path, monkeypatch):
    """The grid was renamed into place before the samples: a kill between the two renames left a new grid beside
    the old samples (h111 N3). The old grid goes first, then the samples are renamed, then the new grid: a kill
    between them leaves samples (old or new) without a grid."""
    from dpdm.sample import sample_checkpoint

    ck, out, grid = run / "run" / "checkpoint.pt", tmp_path / "s.npz", tmp_path / "g.png"
    sample_checkpoint(ck, n=4, sampler_steps=2, seed=0, out_path=out, grid_path=grid)
    old_samples, old_grid = out.read_bytes(), grid.read_bytes()
    events = []
    _recorded(monkeypatch, events, fail_rename=2)
    with pytest.raises(OSError, match="killed between the renames"):
        sample_checkpoint(ck, n=4, sampler_steps=2, seed=7, out_path=out, grid_path=grid)
    new_samples = out.read_bytes() != old_samples
    assert not grid.exists() or (grid.read_bytes() != old_grid) == new_samples, events   # never a mismatched pair
    assert new_samples and not grid.exists(), events   # the samples first, the old grid gone before them
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_sample_removes_its_own_stale_temp_files_and_no_other(run, tmp_path, capsys):
    """A `dpdm sample` killed between its write and its rename left `.OUT.PID.TOKEN.tmp.npz` (every image, 0644)
    beside --out, and its grid's `.GRID.PID.TOKEN.tmp`, which no later sample removed (h111 N1). A later sample of
    the same outputs removes those over an hour old: one newer may be another sample's write in flight."""
    old = os.path.getmtime(tmp_path) - 2 * 86400   # two days
    stale = [".s.npz.4242.0a1b2c3d.tmp.npz", ".g.png.4242.0a1b2c3d.tmp"]
    kept = [".s.npz.4243.0a1b2c3e.tmp.npz",   # fresh: perhaps in flight
            ".t.npz.4242.0a1b2c3d.tmp.npz", ".s.npz.4242.tmp.npz", "s.npz.4242.0a1b2c3d.tmp.npz",   # not its own
            ".s.npz.4242.0a1b2c3d.tmp.npz.keep"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
        if name != kept[0]:
            os.utime(tmp_path / name, (old, old))
    code, _, err = run_cli(_sample(run, tmp_path / "s.npz", "--grid", tmp_path / "g.png"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["s.npz", "g.png"])


def test_a_quoted_home_is_where_the_file_goes(run, tmp_path, monkeypatch, capsys):
    """`--out '~/x/s.npz'` (quoted, so the shell left the ~): the check probed the home folder, the write went to
    ./~/x/s.npz (h111 N5). Both read it as the home folder now, for `dpdm sample` and `dpdm export`."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    code, _, err = run_cli(_sample(run, "~/x/s.npz", "--grid", "~/x/g.png"), capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", "--run", run / "run", "--out", "~/m.pt"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in home.rglob("*")) == ["g.png", "m.pt", "s.npz", "x"] and not list(cwd.iterdir())


def test_samples_record_the_models_class_count(run, tmp_path, capsys):
    """The samples npz held no num_classes: read as `npz:` data, its class count came from its largest label, 2 for
    --n 2 of a 3-class model (h111 N8). The count is public (a label embedding per class)."""
    from dpdm.datasets import load_npz

    code, _, err = run_cli(_sample(run, tmp_path / "s.npz", n=2), capsys)
    assert code == 0, err
    data = load_npz(tmp_path / "s.npz")
    assert data.num_classes == 3 and not data.num_classes_inferred and data.y.tolist() == [0, 1]


def test_a_samples_file_whose_plan_digest_header_lies_is_read_on_its_header(tmp_path):
    """`dpdm sample --out` onto an existing samples file read its meta_plan_digest in full: a header claiming 10**12
    bytes ended the command in "out of memory on the machine", exit 4 (h112 F1). It is sized on its header
    (`read_npz_scalars`): no scalar, no digest, so the file is another plan's and kept."""
    from dpdm.sample import SampleError, check_outputs

    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros((2, 1, 8, 8), np.uint8), meta_private=np.array(True))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("meta_plan_digest.npy", header.getvalue())   # no data: reading it would fail
    before = path.read_bytes()
    with pytest.raises(SampleError, match=r"holds samples of a model of another plan \(\.\.\.\), perhaps another"):
        check_outputs(path, plan_digest="sha256:" + "0" * 64)
    assert path.read_bytes() == before
    np.savez(path, x=np.zeros((2, 1, 8, 8), np.uint8), meta_private=np.array(True),
             meta_plan_digest=np.array("sha256:" + "0" * 64))
    check_outputs(path, plan_digest="sha256:" + "0" * 64)   # its own plan's: replaced without --force
    # Of its plan, but a private model's where this one is --no-dp (its baseline under that plan): kept without
    # --force (h151 F1, stop 55)
    check_outputs(path, plan_digest="sha256:" + "0" * 64, private=True)
    with pytest.raises(SampleError, match=r"holds samples of the model of a private run of this plan, and this model "
                                          r"is NON-PRIVATE \(--no-dp\); it is kept: .* pass --force to replace it"):
        check_outputs(path, plan_digest="sha256:" + "0" * 64, private=False)
    check_outputs(path, plan_digest="sha256:" + "0" * 64, private=False, force=True)


def test_a_kept_samples_file_of_another_plan_names_its_kind_where_it_is_the_other(tmp_path):
    """A samples file of another plan's model and of the other kind (a private model's, where this one is --no-dp)
    was kept naming only the other plan; `--force` then replaced it, and nobody had been told it held private
    samples (r2 N4, stop 55). The line names its kind too."""
    from dpdm.sample import SampleError, check_outputs

    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros((2, 1, 8, 8), np.uint8), meta_private=np.array(True),
             meta_plan_digest=np.array("sha256:" + "0" * 64))
    with pytest.raises(SampleError, match=r"^--out='.*' holds samples of the model of a private run of another plan "
                                          r"\(sha256:000000000000\.\.\.; this model is NON-PRIVATE \(--no-dp\)\), "
                                          r"perhaps another run's training data; it is kept: choose another --out, or "
                                          r"pass --force to replace it$"):
        check_outputs(path, plan_digest="sha256:" + "1" * 64, private=False)
    with pytest.raises(SampleError, match=r"holds samples of a model of another plan \(sha256:000000000000\.\.\.\), "
                                          r"perhaps"):   # of its kind: the plan alone, as before
        check_outputs(path, plan_digest="sha256:" + "1" * 64, private=True)


def test_sample_writes_its_grid_under_a_umask_without_the_owners_write_bit(run, tmp_path, capsys, monkeypatch):
    """Under umask 0277 the grid's temporary file was read-only (0400) before savefig opened it by name: EACCES,
    exit 4, after every image was drawn (r2 F1, stop 51). Both files are written, with the umask's mode."""
    from tests.dpdm.test_report_curve import refuse_writes_without_the_owners_write_bit

    refuse_writes_without_the_owners_write_bit(monkeypatch)
    old_umask = os.umask(0o277)
    try:
        code, _, err = run_cli(_sample(run, tmp_path / "s.npz", "--grid", tmp_path / "g.png"), capsys)
    finally:
        os.umask(old_umask)
    assert code == 0, err
    assert sorted((p.name, p.stat().st_mode & 0o777) for p in tmp_path.iterdir()) == [("g.png", 0o400),
                                                                                        ("s.npz", 0o400)]


def test_a_link_then_dotdot_in_an_output_is_resolved_as_the_os_does(tmp_path, monkeypatch):
    """`--grid L/../g.png`, L a link to a class folder of a `folder:` dataset, was checked in the folder holding L
    (os.path.abspath removed "L/.." by its spelling) while the OS wrote the grid into the dataset's root, over a
    link g.png there (r2 F2, stop 51). The folder is resolved as the OS resolves it; the link is kept."""
    from dpdm.report_utils import save_grid
    from dpdm.sample import SampleError, check_outputs, written_path

    root = Path(os.path.realpath(tmp_path))
    (root / "imgs" / "a").mkdir(parents=True)
    outside = save_grid(np.zeros((2, 1, 8, 8), np.uint8), None, root / "g.png")   # a grid of dpdm's, outside the data
    (root / "imgs" / "g.png").symlink_to(outside)
    (root / "L").symlink_to(root / "imgs" / "a")
    dataset = f"folder:{root / 'imgs'}"
    monkeypatch.chdir(root)
    for path in (root / "L" / ".." / "g.png", "L/../g.png"):
        assert written_path(path) == root / "imgs" / "g.png"
        with pytest.raises(SampleError, match=r"--grid=.* is inside the run's training data"):
            check_outputs(root / "s.npz", path, dataset=dataset)
    assert (root / "imgs" / "g.png").is_symlink()
    check_outputs(root / "s.npz", root / "g.png", dataset=dataset)   # the grid outside the data: fine
    assert written_path(root / "L" / "g.png") == root / "imgs" / "a" / "g.png"   # a link's own name is kept


def test_sample_keeps_samples_of_another_plan_without_force(run, tmp_path, capsys, no_drawing):
    """`dpdm sample --out` onto a samples file of another plan's model (perhaps another run's training data, as a
    second-generation run's gen1.npz is) is one error line, and the file is kept, before any drawing; only the slow
    relative-path test held this, so `sample_checkpoint` passing no plan digest to `check_outputs` (every samples
    file replaced without --force) passed the default tests (mut53 s10)."""
    other = tmp_path / "gen1.npz"
    np.savez(other, x=np.zeros((2, 1, 8, 8), np.uint8), y=np.arange(2), meta_plan_digest=np.asarray("sha256:" + "0" * 64),
             meta_private=np.asarray(True))
    before = other.read_bytes()
    line = one_error_line(*run_cli(_sample(run, other), capsys)[::2])
    assert (f"--out='{other}' holds samples of a model of another plan (sha256:000000000000...)" in line
            and line.endswith("or pass --force to replace it")), line
    assert other.read_bytes() == before


def test_a_dataset_named_through_a_link_is_found_at_its_real_path(tmp_path):
    """A run records its dataset's path as typed, links kept (`absolute_dataset_name`): `npz:~/data/d.npz` with
    ~/data a link to /mnt/disk/data. An output at the real path is that data all the same (`place_in_dataset`
    resolves both sides); with the dataset's side taken as typed, `dpdm sample --out /mnt/disk/data/d.npz` or
    `--grid /mnt/disk/data/x.png` passed as outside it, and no default test said so (mut53 u06)."""
    from dpdm.report_utils import place_in_dataset

    real = tmp_path / "disk" / "data"
    real.mkdir(parents=True)
    np.savez(real / "d.npz", x=np.zeros((2, 1, 8, 8), np.uint8))
    (tmp_path / "data").symlink_to(real, target_is_directory=True)
    (tmp_path / "alias.npz").symlink_to(real / "d.npz")
    assert place_in_dataset(real / "d.npz", f"npz:{tmp_path / 'data' / 'd.npz'}") == "is"
    assert place_in_dataset(real / "d.npz", f"npz:{tmp_path / 'alias.npz'}") == "is"
    assert place_in_dataset(real / "x.png", f"folder:{tmp_path / 'data'}") == "is inside"
    assert place_in_dataset(tmp_path / "x.png", f"folder:{tmp_path / 'data'}") is None


def test_a_folder_of_a_checkpoint_beside_a_plan_is_a_run_folder_without_its_config(tmp_path):
    """A run folder is one holding a run's config.json, or a checkpoint.pt beside a plan.json (`run_folder_of`):
    a run whose config.json was lost or damaged still holds its secret seed in checkpoint.pt. Only the config was
    tested, so a walk that knew configs alone passed (mut53 u07); a stray checkpoint.pt alone makes no run folder, and
    a config.json of something else (no "train") none either."""
    from audits.suite import AuditInputError, check_out_dir
    from dpdm.report_utils import run_folder_of

    run, stray = tmp_path / "run", tmp_path / "stray"
    (run / "sub").mkdir(parents=True)
    stray.mkdir()
    for folder in (run, stray):
        (folder / "checkpoint.pt").write_bytes(b"not read")
        (folder / "config.json").write_text(json.dumps({"data_digest": "x"}))   # not a run's: no "train"
    (run / "plan.json").write_text("{}")
    assert run_folder_of(run) == run.resolve()
    assert run_folder_of(run / "sub" / "report") == run.resolve()
    assert run_folder_of(stray) is None and run_folder_of(stray / "report") is None
    with pytest.raises(AuditInputError, match="lies inside the run folder"):
        check_out_dir(run / "sub" / "report", create=False)


def test_a_train_out_through_a_link_then_dotdot_is_written_where_the_os_puts_it(tmp_path):
    """`dpdm train --out LINK/../run`: the OS reaches the parent of LINK's target, where os.path.abspath, which the
    checkpoint's and plan.json's temporary files (mkstemp) follow, removed `LINK/..` by spelling: the run failed
    across file systems (EXDEV) after taking the folder, or left an empty ./run the temporary files passed through
    (r2 F1, stop 53). The run is now made, whole, where the OS puts it, and nothing beside the link."""
    from tests.cli.test_train_sample import write_tiny_data_and_plan

    write_tiny_data_and_plan(tmp_path, steps=2)
    (tmp_path / "far" / "inner").mkdir(parents=True)
    (tmp_path / "near").mkdir()
    (tmp_path / "near" / "link").symlink_to(tmp_path / "far" / "inner")
    code = main(["train", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "near" / "link" / ".." / "run"),
                 "--device", "cpu", "--quiet"])
    assert code == 0
    assert (tmp_path / "far" / "run" / "checkpoint.pt").is_file() and (tmp_path / "far" / "run" / "plan.json").is_file()
    assert sorted(p.name for p in (tmp_path / "near").iterdir()) == ["link"]


def test_an_output_whose_dotdot_comes_before_the_folders_it_makes_is_checked_and_written(run, tmp_path, capsys):
    """The '..' refusal (mut56, stop 54) is for a part that does not exist before a later '..': `a/../new/sub/m.pt`,
    a/ existing and new/ not, is one the OS follows (into a/, back, then new/sub/, which the write makes), so it
    passes the checks and is written, as `new/sub/m.pt` would be."""
    from dpdm.report_utils import output_parent_problem, through_a_file_problem

    (tmp_path / "a").mkdir()
    out = tmp_path / "a" / ".." / "new" / "sub" / "m.pt"
    assert through_a_file_problem(out) is None and output_parent_problem(out) is None
    code, _, err = run_cli(["export", "--run", run / "run", "--out", out], capsys)
    assert code == 0, err
    assert (tmp_path / "new" / "sub" / "m.pt").is_file()


def test_an_output_whose_last_part_is_dot_names_a_folder_in_one_line_before_any_work(run, tmp_path, capsys):
    """`--out new/.` (mut56, stop 54), new/ missing (an existing folder click refuses itself), names the folder new/,
    as `new/..` and `new/` do (`file_name_problem`): refused in one line before the checkpoint is read, nothing made
    (else the release was staged in a new/ made for it and renamed onto the folder, failing after the work)."""
    code, _, err = run_cli(["export", "--run", run / "run", "--out", f"{tmp_path / 'new'}{os.sep}."], capsys)
    line = one_error_line(code, err)
    assert line.startswith("dpdm: error: --out") and "names a folder (its last part is '.')" in line, line
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_linked_to_a_device_or_fifo_is_not_a_regular_file_not_a_broken_link(tmp_path, capsys):
    """RUN/checkpoint.pt a link to /dev/zero or to a FIFO was refused as "a broken link" (h151 N6, stop 55): it is
    not a regular file, as a FIFO in its place is said to be. A link to nothing is still a broken link."""
    os.mkfifo(tmp_path / "fifo")
    for target, needle in (("/dev/zero", "is not a regular file"), (tmp_path / "fifo", "is not a regular file"),
                           (tmp_path / "missing.pt", "is a broken link")):
        run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        run.mkdir()
        (run / "checkpoint.pt").symlink_to(target)
        for command in (["export", "--run", run, "--out", tmp_path / "m.pt"], _sample(tmp_path, tmp_path / "s.npz")):
            command[command.index("--run") + 1] = run
            line = one_error_line(*run_cli(command, capsys)[::2])
            assert f"checkpoint '{run / 'checkpoint.pt'}' {needle}" in line, line
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "s.npz").exists()
