"""The demo's report: one Markdown file and one HTML file that a person opens first."""
from __future__ import annotations

import html
import re
import json
from pathlib import Path
from typing import Any

import numpy as np


def privacy_curve_points(plan, points: int = 24) -> tuple[np.ndarray, list[float]]:
    """(steps, epsilon spent) at `points` steps of a plan, as the ledger counts it: the PLD bound of the steps done,
    at most the plan's certificate (RDP's bound, where that is the smaller)."""
    import accounting

    steps = np.unique(np.linspace(1, plan.steps, points).round().astype(int))
    cap = accounting.certified_epsilon(plan)
    return steps, [min(accounting.epsilon_spent(plan, int(s)), cap) for s in steps]


def privacy_curve(plan, path: str | Path, *, points: int = 24, steps_done: int | None = None) -> Path:
    """Plots epsilon spent against steps for a plan (`privacy_curve_points`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, eps = privacy_curve_points(plan, points)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, eps, marker=".", label="epsilon spent (certified)")
    if plan.target_epsilon is not None:
        ax.axhline(plan.target_epsilon, color="gray", ls="--", lw=1, label=f"target {plan.target_epsilon:g}")
    if steps_done is not None:
        ax.axvline(steps_done, color="tab:red", lw=1, label=f"steps done {steps_done}")
    ax.set_ylim(bottom=0)   # from 0: the first step's large share of the budget shows (h136 N5)
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta={plan.delta:g}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_cell(value: Any) -> str:
    """`value` as one Markdown table cell shown as it is: a '|' (a folder may hold one) ended the cell and a newline
    the table, dropping the rest of the row (the model's sha256 and the "keep private" advice, stop 42), and '<'
    began raw HTML ('<b>'; "< 0.01" stays as it is). The other marks a renderer acts on are escaped too: `*`,
    backticks, `[`, `]`, `~` where two could strike text through (a lone one, `~/.cache`, stays), an `_` at a
    word's edge (`runs/_tmp_/demo` showed "tmp" in italics, and `![a](https://...)` in a folder name became an
    image fetched when report.md is viewed), and `&` before an entity; an `_` inside a word (`demo_out`) stays as
    it is, as CommonMark shows it."""
    text = " ".join(str(value).splitlines())
    marks = r"[\\|*`\[\]~]" if text.count("~") > 1 else r"[\\|*`\[\]]"   # one ~ strikes nothing: ~/.cache stays
    text = re.sub(marks + r"|&(?=#?\w+;)|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", lambda m: "\\" + m.group(), text)
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _table(rows: list[tuple[str, Any]]) -> str:
    out = ["| | |", "|---|---|"]
    out += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows]
    return "\n".join(out)


def write_report(out_dir: str | Path, sections: list[dict[str, Any]], *, title: str) -> tuple[Path, Path]:
    """Writes report.md and report.html, each atomically (a demo stopped while writing one, or out of disk, left it
    cut short: h114 N2, stop 51) and 0600 whatever the umask, as the audit's report: the demo's holds rows computed
    without privacy from the private images (README: "What stays private"; h136 F3, stop 53), and a copy keeps the
    mode. Each section: {"title", "rows"?, "image"?, "text"?, "json"?}."""
    from accounting.plan import atomic_write_text

    out_dir = Path(out_dir)
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        md += [f"## {s['title']}", ""]
        body.append(f"<h2>{html.escape(s['title'])}</h2>")
        if s.get("text"):
            md += [s["text"], ""]
            body.append(f"<p>{html.escape(s['text'])}</p>")
        if s.get("rows"):
            md += [_table(s["rows"]), ""]
            body.append("<table>" + "".join(
                f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in s["rows"]) + "</table>")
        if s.get("image"):
            rel = Path(s["image"]).name
            md += [f"![{s['title']}]({rel})", ""]
            body.append(f'<img src="{html.escape(rel)}" alt="{html.escape(s["title"])}" style="max-width:720px">')
        if s.get("json") is not None:
            text = json.dumps(s["json"], indent=2, default=str)
            md += ["```json", text, "```", ""]
            body.append(f"<pre>{html.escape(text)}</pre>")
    md_path = out_dir / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n", mode=0o600)
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "pre{background:#f6f6f6;padding:8px;overflow-x:auto}")
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n", mode=0o600)
    return md_path, html_path
