"""PNG plots for audit reports (matplotlib Agg; no pyplot, no global state).

Every function takes arrays and a path, writes one PNG and returns the path as a ``Path``.
Scores follow ``audits.auditor``'s convention: higher score means member. A claimed epsilon is labelled rounded
up, as on every screen (`dpdm.report_utils.epsilon_text`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from audits.auditor import _scores, auc, dp_tpr_ceiling, roc_curve
from dpdm.report_utils import epsilon_text

__all__ = ["plot_roc", "plot_score_histogram", "plot_epsilon_vs_guesses"]


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path={str(path)!r} must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


def plot_roc(
    in_scores,
    out_scores,
    path,
    *,
    epsilon: float | None = None,
    delta: float = 0.0,
    log: bool = False,
    title: str | None = None,
) -> Path:
    """ROC curve of "member iff score >= threshold", with the (epsilon, delta)-DP ceiling.

    ``log=True`` draws log-log axes (the low-FPR regime that matters for membership inference);
    points with FPR or TPR equal to 0 cannot be shown there and are dropped. With ``epsilon`` the
    largest TPR any attack can reach against an (epsilon, delta)-DP mechanism is overlaid.
    """
    fpr, tpr, _ = roc_curve(in_scores, out_scores)
    area = auc(in_scores, out_scores)
    n_out = np.asarray(out_scores).size

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    if log:
        lo = 0.5 / n_out
        grid = np.geomspace(lo, 1.0, 400)
        keep = (fpr > 0) & (tpr > 0)
        ax.plot(fpr[keep], tpr[keep], lw=1.5, label=f"attack (AUC {area:.3f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 1.0)
        ax.set_ylim(lo, 1.05)
    else:
        grid = np.linspace(0.0, 1.0, 401)
        ax.plot(fpr, tpr, lw=1.5, label=f"attack (AUC {area:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
    ax.plot(grid, grid, ls=":", color="grey", lw=1, label="chance")
    if epsilon is not None:
        ceiling = dp_tpr_ceiling(grid, epsilon, delta)
        ax.plot(grid, ceiling, ls="--", color="crimson", lw=1.2,
                label=f"DP ceiling (eps={epsilon_text(epsilon)}, delta={delta:g})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or ("ROC (log-log)" if log else "ROC"))
    ax.grid(alpha=0.3, which="both" if log else "major")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_score_histogram(
    in_scores, out_scores, path, *, bins: int = 50, title: str | None = None
) -> Path:
    """Overlaid density histograms of in- and out-scores on common bins."""
    ins = _scores("in_scores", in_scores)
    outs = _scores("out_scores", out_scores)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins={bins!r} must be an int >= 1")
    lo, hi = float(min(ins.min(), outs.min())), float(max(ins.max(), outs.max()))
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(outs, bins=edges, density=True, alpha=0.55, label=f"out (n={outs.size})")
    ax.hist(ins, bins=edges, density=True, alpha=0.55, label=f"in (n={ins.size})")
    ax.set_xlabel("score (higher means member)")
    ax.set_ylabel("density")
    ax.set_title(title or "membership scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_epsilon_vs_guesses(
    num_guesses: Sequence[int],
    epsilons: Sequence[float],
    path,
    *,
    claimed_epsilon: float | None = None,
    title: str | None = None,
) -> Path:
    """One-run epsilon lower bound against the number of guesses (e.g. ``OneRunResult.grid``)."""
    k = np.asarray(num_guesses, dtype=np.float64)
    e = np.asarray(epsilons, dtype=np.float64)
    if k.ndim != 1 or k.size == 0 or not np.all(k >= 1):
        raise ValueError(f"num_guesses={num_guesses!r} must be a non-empty 1-D sequence of counts >= 1")
    if e.shape != k.shape or not np.all(np.isfinite(e)):
        raise ValueError(f"epsilons={epsilons!r} must be finite and match num_guesses in length")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(k, e, marker="o", ms=3, label="one-run epsilon lower bound")
    if claimed_epsilon is not None:
        ax.axhline(claimed_epsilon, ls="--", color="crimson", label=f"claimed eps={epsilon_text(claimed_epsilon)}")
    ax.set_xscale("log")
    ax.set_xlabel("number of guesses")
    ax.set_ylabel("epsilon lower bound")
    ax.set_title(title or "one-run audit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
