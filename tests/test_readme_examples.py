"""The README's marked code blocks run as written (so the documentation cannot rot)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    m = re.search(r"<!-- readme-test: " + re.escape(name) + r" .*?-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no block marked readme-test: {name}"
    return m.group(1)


def test_torch_capture_example_runs_and_prints_the_coverage(capsys):
    pytest.importorskip("torch")
    exec(compile(readme_block("torch-capture"), "README.md:torch-capture", "exec"), {})
    out = capsys.readouterr().out
    assert "group 'loop': 3 step slot(s) run, 3 with gradient" in out, out
    assert "block.self_attn.in_proj_weight: linear x9; steps 0-2; 3 use(s) per step" in out, out
