"""The application (``sdi_core.app``) sits apart from the core, and numpy paths never load a framework."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "sdi_core"
FRAMEWORKS = ("torch", "jax", "jaxlib")

# Runs `sdi ARGS...` in-process and prints which frameworks were imported by the time it returned.
WRAPPER = (
    "import sys\n"
    "from sdi_core.app.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('FRAMEWORKS', sorted(m for m in %r if m in sys.modules))\n"
    "sys.exit(rc)\n" % (FRAMEWORKS,)
)


def _core_modules() -> list[str]:
    mods = []
    for p in sorted(CORE.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        if rel.parts[1:2] == ("app",):
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods.append(".".join(parts))
    return mods


def test_core_modules_never_import_the_app_statically():
    offenders = []
    for p in CORE.rglob("*.py"):
        if "app" in p.relative_to(CORE).parts[:1]:
            continue
        pkg = ".".join(p.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            if any(n == "sdi_core.app" or n.startswith("sdi_core.app.") for n in names):
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"core modules import sdi_core.app: {offenders}"


def test_importing_every_core_module_loads_neither_the_app_nor_a_framework():
    mods = _core_modules()
    assert "sdi_core.store" in mods and "sdi_core.reference.looped_transformer" in mods, mods
    code = (
        f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in list(sys.modules) if m in {FRAMEWORKS!r} or m.startswith('sdi_core.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing the core loaded {out.stdout.strip()}"


def _sdi(args: list[str], cwd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def _frameworks(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"sdi failed: {proc.stdout}\n{proc.stderr}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("FRAMEWORKS")]
    assert line, proc.stdout
    return line[-1]


@pytest.mark.parametrize("launcher", [{}, {"WORLD_SIZE": "2", "RANK": "0"}], ids=["one-process", "world-size-2"])
def test_numpy_featurize_and_score_load_no_framework(tmp_path, launcher):
    """`sdi featurize --backend numpy` and `sdi score` import no framework, also with a launcher's WORLD_SIZE."""
    common = ["--backend", "numpy", "--sketch-dim", "64", "--dtype", "float64", "--batch-size", "64"]
    train = _sdi(["featurize", "--demo", "train", *common, "--summed", "--out", str(tmp_path / "train")], tmp_path,
                 launcher)
    assert _frameworks(train) == "FRAMEWORKS []", train.stdout
    query = _sdi(["featurize", "--demo", "query", *common, "--out", str(tmp_path / "query")], tmp_path)
    assert _frameworks(query) == "FRAMEWORKS []", query.stdout
    if launcher:  # the other rank's shards, then one consolidating process
        other = _sdi(["featurize", "--demo", "train", *common, "--summed", "--out", str(tmp_path / "train")],
                     tmp_path, {"WORLD_SIZE": "2", "RANK": "1"})
        assert _frameworks(other) == "FRAMEWORKS []", other.stdout
    score = _sdi(["score", str(tmp_path / "train"), str(tmp_path / "query"), "--k", "3"], tmp_path, launcher)
    assert _frameworks(score) == "FRAMEWORKS []", score.stdout
    assert "query 0:" in score.stdout, score.stdout


def test_help_loads_no_framework():
    code = ("import sys\nfrom sdi_core.app.cli import build_parser\nbuild_parser().format_help()\n"
            f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"building `sdi --help` loaded {proc.stdout.strip()}"
