"""The README's Python snippets run as written (as prv_accountant's test_readme does)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()  # the snippet prints the certified epsilon


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("## ")[0]
    assert "make demo" in head and "make test" in head
