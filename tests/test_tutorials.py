"""The tutorials under docs/tutorials run to the end (each asserts its own claims)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

TUTORIALS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tutorials"
NEEDS = {
    "sdi_from_scratch.py": (),
    "attribute_your_pytorch_model.py": ("torch",),
    "attribute_an_equinox_model.py": ("jax", "equinox"),
}


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("*.py")) == sorted(NEEDS)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_tutorial_runs(name, tmp_path):
    for mod in NEEDS[name]:
        pytest.importorskip(mod)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    proc = subprocess.run([sys.executable, str(TUTORIALS / name)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "hold" in proc.stdout.splitlines()[-1], proc.stdout


def test_from_scratch_needs_no_framework(tmp_path):
    """The NumPy tutorial runs with torch and jax impossible to import."""
    block = ("import sys\nclass _B:\n    def find_spec(self, n, p=None, t=None):\n"
             "        if n.split('.')[0] in ('torch', 'jax', 'jaxlib'): raise ImportError(n)\n"
             "sys.meta_path.insert(0, _B())\n"
             f"import runpy; runpy.run_path({str(TUTORIALS / 'sdi_from_scratch.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every identity holds" in proc.stdout, proc.stdout
