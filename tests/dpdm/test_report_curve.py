"""The report's privacy curve counts epsilon as the ledger does; its Markdown tables."""
import re

import pytest

import accounting
from dpdm.report import privacy_curve, privacy_curve_points


def test_curve_is_the_ledgers_epsilon_capped_at_the_certificate(monkeypatch, tmp_path):
    """Where RDP's bound certifies (over very many steps) the ledger shows min(PLD of the steps done, certificate);
    the curve showed PLD alone, above the certified epsilon at the last steps (review, stop 40)."""
    plan = accounting.PrivacyPlan(dataset_size=4000, batch_size=256, steps=300, noise_multiplier=1.0, delta=1e-5,
                                  dataset_name="mnist5k")
    steps, eps = privacy_curve_points(plan, points=6)
    assert eps == [accounting.epsilon_spent(plan, int(s)) for s in steps] and eps == sorted(eps)
    cap = eps[3]                                   # as if RDP's bound were that small
    monkeypatch.setattr(accounting, "certified_epsilon", lambda p: cap)
    _, capped = privacy_curve_points(plan, points=6)
    assert capped == pytest.approx(eps[:3] + [cap] * 3)
    assert privacy_curve(plan, tmp_path / "curve.png", points=6, steps_done=100).stat().st_size > 0


def test_report_md_table_cells_show_their_values_whole(tmp_path):
    """A '|' in a folder name ended the cell, so a Markdown renderer dropped the rest of the Release row (the model's
    sha256, the "keep private" advice); a newline ended the table, and '<b>' was raw HTML (stop 42)."""
    from dpdm.report import write_report

    value = "/data/x|<b>&y\nz (sha256 abc) < 0.01"
    md, html_path = write_report(tmp_path, [{"title": "Release", "rows": [("model to release", value),
                                                                          ("after", "kept")]}], title="t")
    lines = md.read_text(encoding="utf-8").splitlines()
    row = next(ln for ln in lines if ln.startswith("| model to release |"))
    assert row == r"| model to release | /data/x\|&lt;b>&y z (sha256 abc) < 0.01 |"
    assert "| after | kept |" in lines   # the table goes on after it
    assert len(re.split(r"(?<!\\)\|", row)[1:-1]) == 2   # two cells: only unescaped bars divide them
    assert "/data/x|&lt;b&gt;&amp;y" in html_path.read_text(encoding="utf-8")   # HTML was escaped already


@pytest.mark.parametrize("value, cell", [
    ("runs/_tmp_/demo/run", r"runs/\_tmp\_/demo/run"),                               # was "tmp" in italics
    ("demo *v2*/run", r"demo \*v2\*/run"),
    ("x![a](https://e.com/p.png)/run", r"x!\[a\](https://e.com/p.png)/run"),         # was an image fetched on view
    ("a `c` ~/r ~x~ &amp; &x", r"a \`c\` \~/r \~x\~ \&amp; &x"),
    ("~/.cache/dpdm/reference", "~/.cache/dpdm/reference"),                          # a lone ~ strikes nothing
    ("demo_out/run_2/model.pt", "demo_out/run_2/model.pt"),                          # inside words: as CommonMark shows
])
def test_report_md_cells_escape_what_a_renderer_would_act_on(tmp_path, value, cell):
    """Paths in report.md are shown verbatim: Markdown's emphasis, code, link/image and entity marks in a folder's
    name are escaped (stop 46, h86 F3); report.html escaped them already."""
    from dpdm.report import write_report

    md, _ = write_report(tmp_path, [{"title": "Release", "rows": [("run", value)]}], title="t")
    assert f"| run | {cell} |" in md.read_text(encoding="utf-8").splitlines()


def test_a_report_cut_short_by_a_full_disk_leaves_the_one_before_whole(tmp_path):
    """report.md and report.html were written in place (Path.write_text): a demo stopped by a full disk or a
    file-size limit while writing one left it cut short (h114 N2, stop 51). Each is written atomically now: the
    file before stays whole, and no temp file is left. A file-size limit (RLIMIT_FSIZE) in a child process stands
    for the full disk."""
    import subprocess
    import sys
    from pathlib import Path

    from dpdm.report import write_report

    md, html_path = write_report(tmp_path, [{"title": "Run", "rows": [("steps", 3)]}], title="before")
    before = {md: md.read_text(encoding="utf-8"), html_path: html_path.read_text(encoding="utf-8")}
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"   # EFBIG instead of the signal's kill
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "from dpdm.report import write_report\n"
            "try:\n"
            "    write_report(sys.argv[1], [{'title': 'Run', 'json': {'x': 'y' * 100000}}], title='after')\n"
            "except OSError as e:\n"
            "    sys.exit(f'refused: {e.strerror}')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 1 and r.stderr.startswith("refused: File too large"), r.stderr[-2000:]
    assert {p: p.read_text(encoding="utf-8") for p in before} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["report.html", "report.md"]


def _plan():
    return accounting.PrivacyPlan(dataset_size=4000, batch_size=256, steps=300, noise_multiplier=1.0, delta=1e-5,
                                  dataset_name="mnist5k")


def test_curve_runs_from_the_first_to_the_plans_last_step():
    """Catches a curve whose points stop before the plan's last step (mut47)."""
    plan = _plan()
    steps, eps = privacy_curve_points(plan, points=6)
    assert steps[0] == 1 and steps[-1] == plan.steps
    assert eps[-1] == min(accounting.epsilon_spent(plan, plan.steps), accounting.certified_epsilon(plan))


def test_curve_figure_draws_the_points_and_marks_the_steps_done(tmp_path, monkeypatch):
    """Catches the "steps done" line drawn at the plan's steps (mut47): the figure is read, not only written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plan = _plan()
    privacy_curve(plan, tmp_path / "curve.png", points=6, steps_done=100)
    (ax,) = figs[0].axes
    steps, eps = privacy_curve_points(plan, points=6)
    curve = next(line for line in ax.lines if line.get_label().startswith("epsilon spent"))
    assert list(curve.get_xdata()) == list(steps) and list(curve.get_ydata()) == eps
    done = next(line for line in ax.lines if line.get_label() == "steps done 100")
    assert set(done.get_xdata()) == {100}
    close(figs[0])


def refuse_writes_without_the_owners_write_bit(monkeypatch):
    """Opening an existing file for writing (open's "w", "a", "x", "+"; os.open's O_WRONLY, O_RDWR) raises EACCES
    where the file's mode lacks the owner's write bit, as the kernel refuses every user but root: these tests run
    as root, whose CAP_DAC_OVERRIDE writes any file, and that hid a grid and a curve no other user could write
    under umask 0277 (r2 F1, stop 51)."""
    import builtins
    import errno
    import os
    import stat

    real_open, real_os_open = builtins.open, os.open

    def read_only(path, dir_fd=None):
        try:
            return not os.stat(path, dir_fd=dir_fd).st_mode & stat.S_IWUSR
        except (OSError, TypeError, ValueError):   # no such file (yet), or a file object
            return False

    def refused(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and read_only(file):
            raise refused(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR) and read_only(path, dir_fd):
            raise refused(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg", ".jpg"])
def test_a_grid_and_a_curve_are_written_under_a_umask_without_the_owners_write_bit(tmp_path, monkeypatch, suffix):
    """The temporary file was made with the final mode less the umask, then opened again by name for savefig: under
    umask 0277 it was read-only (0400) and the open was refused, so `dpdm sample --grid` failed with exit 4 after
    drawing every image and `dpdm plan --curve` with exit 2 (r2 F1, stop 51). Its owner writes it, then it takes
    that mode: 0400 here."""
    import os
    import stat

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dpdm.report_utils import grid_identity, is_dpdm_grid, save_grid, save_marked_figure

    refuse_writes_without_the_owners_write_bit(monkeypatch)
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    old = os.umask(0o277)
    try:
        grid = save_grid(np.zeros((3, 1, 8, 8), np.uint8), np.arange(3), tmp_path / f"grid{suffix}")
        curve = save_marked_figure(fig, tmp_path / f"curve{suffix}", dpi=50)
    finally:
        os.umask(old)
        plt.close(fig)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (grid, curve)] == [0o400, 0o400]
    assert is_dpdm_grid(grid) and is_dpdm_grid(curve)
    # a curve names no model: `dpdm sample --grid` replaces it only with --force (r2 N1, stop 55)
    assert grid_identity(curve) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([grid.name, curve.name])   # no temporary file


def test_report_html_escapes_a_sections_text(tmp_path):
    """A section's text (which may name folders and datasets, as the rows do) is escaped in report.html as the rows
    are: only the rows were tested, so raw text passed (mut53 r05): '<img src=x onerror=...>' in a folder name was
    markup run on view."""
    from dpdm.report import write_report

    text = "samples in runs/<img src=x onerror=alert(1)>/s.npz & epsilon < 1"
    _, html_path = write_report(tmp_path, [{"title": "Samples", "text": text}], title="t")
    page = html_path.read_text(encoding="utf-8")
    assert "<p>samples in runs/&lt;img src=x onerror=alert(1)&gt;/s.npz &amp; epsilon &lt; 1</p>" in page
    assert "<img" not in page
