"""Tests for audits.plots: each function writes a readable PNG and rejects bad input."""

import numpy as np
import pytest
from matplotlib import image as mpimg

import audits.plots
from audits.auditor import Auditor, auc, dp_tpr_ceiling, roc_curve
from audits.plots import plot_epsilon_vs_guesses, plot_roc, plot_score_histogram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def scores():
    rng = np.random.default_rng(0xBAD5EED)
    return rng.normal(1.0, 1, 400), rng.normal(0, 1, 500)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn


@pytest.mark.parametrize("log", [False, True])
def test_plot_roc_writes_png_with_ceiling(tmp_path, scores, log):
    ins, outs = scores
    with_ceiling = plot_roc(ins, outs, tmp_path / "sub" / "roc.png", epsilon=1.0, delta=1e-5, log=log)
    without = plot_roc(ins, outs, tmp_path / "roc_plain.png", log=log)
    _assert_png(with_ceiling)
    _assert_png(without)
    # the ceiling curve changes the picture
    assert not np.array_equal(mpimg.imread(with_ceiling), mpimg.imread(without))


def test_plot_score_histogram_and_epsilon_curve(tmp_path, scores):
    ins, outs = scores
    _assert_png(plot_score_histogram(ins, outs, tmp_path / "hist.png", bins=30))
    _assert_png(plot_score_histogram(np.zeros(5), np.zeros(5), tmp_path / "flat.png"))
    res = Auditor(ins, outs).one_run(1e-5)
    k = [row[0] for row in res.grid]
    e = [row[2] for row in res.grid]
    _assert_png(plot_epsilon_vs_guesses(k, e, tmp_path / "eps.png", claimed_epsilon=1.0))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda p: plot_roc([], [1.0], p / "a.png"), "in_scores"),
        (lambda p: plot_roc([1.0], [0.0], p / "a.jpg"), "path"),
        (lambda p: plot_roc([1.0], [0.0], p / "a.png", epsilon=-1.0), "epsilon"),
        (lambda p: plot_score_histogram([1.0], [np.nan], p / "a.png"), "out_scores"),
        (lambda p: plot_score_histogram([1.0], [0.0], p / "a.png", bins=0), "bins"),
        (lambda p: plot_epsilon_vs_guesses([], [], p / "a.png"), "num_guesses"),
        (lambda p: plot_epsilon_vs_guesses([1, 2], [0.1], p / "a.png"), "epsilons"),
    ],
)
def test_plots_reject_bad_input(tmp_path, call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(tmp_path)


@pytest.fixture()
def figures(monkeypatch):
    """The Figures the plots save, to read what they draw."""
    figs, save = [], audits.plots._save
    monkeypatch.setattr(audits.plots, "_save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    return figs


def test_roc_draws_the_attack_and_the_ceiling_at_the_given_delta(tmp_path, figures, scores):
    """Catches the DP ceiling drawn at delta 0, and in/out swapped in the ROC (mut47): the curve and its AUC are
    checked, not only that a PNG was written."""
    ins, outs = scores
    plot_roc(ins, outs, tmp_path / "roc.png", epsilon=1.0, delta=0.05)
    ax = figures[0].axes[0]
    attack = next(line for line in ax.lines if line.get_label().startswith("attack"))
    fpr, tpr, _ = roc_curve(ins, outs)
    np.testing.assert_array_equal(attack.get_xdata(), fpr)
    np.testing.assert_array_equal(attack.get_ydata(), tpr)
    assert attack.get_label() == f"attack (AUC {auc(ins, outs):.3f})" and auc(ins, outs) > 0.5
    ceiling = next(line for line in ax.lines if line.get_label().startswith("DP ceiling"))
    np.testing.assert_allclose(ceiling.get_ydata(), dp_tpr_ceiling(ceiling.get_xdata(), 1.0, 0.05))


def test_histogram_labels_each_class_with_its_own_count(tmp_path, figures, scores):
    """Catches the histogram's in/out legends swapped (mut47): each label's bars are that class's histogram."""
    ins, outs = scores
    plot_score_histogram(ins, outs, tmp_path / "h.png", bins=20)
    ax = figures[0].axes[0]
    labels = {c.patches[0].get_label(): sum(p.get_height() for p in c.patches) for c in ax.containers}
    assert set(labels) == {"in (n=400)", "out (n=500)"}
    edges = np.linspace(min(ins.min(), outs.min()), max(ins.max(), outs.max()), 21)
    assert labels["in (n=400)"] == pytest.approx(np.histogram(ins, edges, density=True)[0].sum())


def test_the_claimed_epsilon_is_labelled_rounded_up(tmp_path, figures, scores):
    """A claim is an upper bound: its label rounds up, as on every screen (`epsilon_text`). ":g" rounded to nearest,
    so a claim of 10.0000004 read "eps=10" (h108 N2, stop 50)."""
    ins, outs = scores
    plot_roc(ins, outs, tmp_path / "roc.png", epsilon=10.0000004, delta=1e-5)
    plot_epsilon_vs_guesses([1, 2], [0.1, 0.2], tmp_path / "eps.png", claimed_epsilon=2.71828)
    labels = [line.get_label() for fig in figures for line in fig.axes[0].lines]
    assert "DP ceiling (eps=10.01, delta=1e-05)" in labels and "claimed eps=2.719" in labels, labels
