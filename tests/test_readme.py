"""The README keeps its promises: its Python snippets run as written (as prv_accountant's test_readme does)
and write the Quick start's plan, every `dpdm CMD --flag` it and docs/*.md name is an option of that command,
and its links to docs/ resolve."""
import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

COMMANDS = ("baseline dp-classifier", "plan", "account", "train", "sample", "export", "eval", "audit", "demo")
_CMD = "|".join(re.escape(c) for c in COMMANDS)
MENTION = re.compile(rf"dpdm ({_CMD})\b([^`\n]*)")             # `dpdm CMD --flag ...` up to the code span's end
TABLE_ROW = re.compile(rf"^\|\s*`dpdm ({_CMD})`\s*\|(.*)$", re.M)  # | `dpdm CMD` | ... | --flags ... |
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


@contextlib.contextmanager
def _cwd(folder: Path):
    """contextlib.chdir, which needs Python 3.11."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def snippet_run(tmp_path_factory):
    """Runs the README's python blocks in a folder of their own (they write plan.json); returns it and stdout."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    folder = tmp_path_factory.mktemp("python")
    out = io.StringIO()
    with _cwd(folder), contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
    return folder, out.getvalue()


def test_readme_python_blocks_run(snippet_run):
    _, out = snippet_run
    assert out.strip()  # the snippet prints the certified epsilon and the digest


def test_readme_python_block_writes_the_quick_start_plan(snippet_run, tmp_path, capsys):
    """The snippet mirrors the Quick start's `dpdm plan` line: the same plan.json, byte for byte."""
    from cli.main import main

    folder, _ = snippet_run
    quick = _section(README.read_text(), "Quick start")
    lines = [ln for ln in quick.splitlines() if ln.startswith("dpdm plan ")]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0].split("#")[0])[1:]
    assert args[args.index("--out") + 1] == "plan.json"
    with _cwd(tmp_path):
        assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "plan.json").read_bytes() == (folder / "plan.json").read_bytes()
    # The figures the README quotes for it are the ones printed (a re-calibration had left an old digest there).
    shown = re.search(r"certified epsilon \(([\d.]+) here", README.read_text())
    assert shown and f"certified epsilon {shown.group(1)} " in capsys.readouterr().out
    comment = re.search(r"print\(doc\.epsilon, doc\.digest\) +# ([\d.]+)\.\.\. (sha256:[0-9a-f]+)\.\.\.",
                        README.read_text())
    printed = snippet_run[1].split()
    assert comment and printed[0].startswith(comment.group(1)) and printed[1].startswith(comment.group(2)), printed


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("## ")[0]
    assert "make demo" in head and "make test" in head
    first_block = head.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def _command(name: str) -> tuple[click.Command, click.Context]:
    from cli.main import cli

    ctx = click.Context(cli, info_name="dpdm")
    cmd: click.Command = cli
    for part in name.split():
        cmd = cmd.get_command(ctx, part)
        assert cmd is not None, f"dpdm {name}: no such command"
        ctx = click.Context(cmd, info_name=part, parent=ctx)
    return cmd, ctx


def _options(name: str) -> set[str]:
    cmd, ctx = _command(name)
    return {o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_flag_named_is_an_option_of_its_command(path):
    """`dpdm CMD --flag` in prose and code, and the flags of a table row whose first cell is `dpdm CMD`."""
    text = path.read_text()
    uses = [(m.group(1), m.group(2)) for m in MENTION.finditer(text)]
    uses += [(m.group(1), m.group(2)) for m in TABLE_ROW.finditer(text)]
    options = {name: _options(name) for name in COMMANDS}
    wrong = [f"dpdm {cmd} {flag}" for cmd, rest in uses for flag in FLAG.findall(rest) if flag not in options[cmd]]
    assert not wrong, f"{path.name} names options that do not exist: {sorted(set(wrong))}"
    if path == README:
        assert sum(bool(FLAG.findall(rest)) for _, rest in uses) >= 40  # the check is not vacuous


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_local_links_resolve(path):
    text = path.read_text()
    links = re.findall(r"\]\(([^)#\s]*\.md)(?:#([\w-]+))?\)", text)
    if path == README:
        assert {f"docs/{d.name}" for d in DOCS} <= {target for target, _ in links}, "README links every doc"
        assert {"docs/results-mnist5k.md", "docs/performance.md", "docs/accounting.md"} <= {d for d, _ in links}
    for target, anchor in links:
        file = (path.parent / target).resolve()
        assert file.is_file(), f"{path.name}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{path.name}: no heading #{anchor} in {target}"
