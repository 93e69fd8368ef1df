"""README's Python examples run as written (a newcomer copies them)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=lambda c: c.split("\n")[1][:40])
def test_readme_example_runs(code):
    if "torch" in code:
        pytest.importorskip("torch")
    if "opacus" in code:
        pytest.importorskip("opacus")
    if "torch.compile" in code:  # compiling is slow on 2 cores; tests/test_torch.py covers it
        code = code.replace("compiled = torch.compile(model, fullgraph=True)", "")
    exec(compile(code, str(README), "exec"), {})
