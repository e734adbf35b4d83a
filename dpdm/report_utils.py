"""Image grids for reports and `dpdm sample --grid` (matplotlib, Agg), and checks of output paths."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# The formats `save_grid` writes (matplotlib's Agg and vector backends, Pillow for JPEG).
GRID_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def grid_suffix_problem(path: str | os.PathLike) -> str | None:
    """Why `save_grid` cannot write `path` (its suffix names no format it writes), or None."""
    if Path(path).suffix.lower() in GRID_SUFFIXES:
        return None
    return f"must end in {', '.join(GRID_SUFFIXES[:-1])} or {GRID_SUFFIXES[-1]}"


def output_parent_problem(path: str | os.PathLike) -> str | None:
    """Why the folder of an output file can neither be used nor created (None when it can): the nearest
    existing ancestor must be a folder this process may write into. Creates nothing."""
    parent = Path(os.path.abspath(Path(path).expanduser())).parent
    probe = parent
    while not probe.exists():
        if probe.is_symlink():
            return f"its folder {str(parent)!r} cannot be created ({str(probe)!r} is a broken link)"
        probe = probe.parent
    if not probe.is_dir():
        if probe == parent:
            return f"{str(parent)!r} is not a folder"
        return f"its folder {str(parent)!r} cannot be created ({str(probe)!r} is not a folder)"
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == parent:
            return f"its folder {str(parent)!r} is not writable"
        return f"its folder {str(parent)!r} cannot be created ({str(probe)!r} is not writable)"
    return None


def save_grid(x: np.ndarray, y: np.ndarray | None, path: str | Path, *, title: str = "", per_row: int = 10) -> Path:
    """Saves uint8 images [N, C, H, W] as a grid with one row per class (or rows of `per_row`).

    The format follows the suffix (`GRID_SUFFIXES`); the file is written atomically (a temporary file in
    the same folder, renamed), and no temporary file is left behind on failure.

    Raises:
      ValueError: a suffix that names no format in `GRID_SUFFIXES`.
    """
    path = Path(path)
    problem = grid_suffix_problem(path)
    if problem:
        raise ValueError(f"grid path {str(path)!r} {problem}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(x)
    if y is not None and len(y):
        classes = np.unique(y)
        rows = [x[y == c][:per_row] for c in classes]
    else:
        rows = [x[i : i + per_row] for i in range(0, min(len(x), per_row * per_row), per_row)]
    rows = [r for r in rows if len(r)]
    c, h, w = x.shape[1:]
    canvas = np.full((len(rows) * (h + 2), per_row * (w + 2), c), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            canvas[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = img.transpose(1, 2, 0)
    fig, ax = plt.subplots(figsize=(per_row * 0.6 + 0.5, len(rows) * 0.6 + 0.8))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=255)
        ax.axis("off")
        if title:
            ax.set_title(title, fontsize=9)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format=path.suffix.lower().lstrip("."))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
