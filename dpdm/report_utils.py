"""Image grids for reports and `dpdm sample --grid` (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def save_grid(x: np.ndarray, y: np.ndarray | None, path: str | Path, *, title: str = "", per_row: int = 10) -> Path:
    """Saves uint8 images [N, C, H, W] as a grid with one row per class (or rows of `per_row`)."""
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
    ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=255)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
