"""benchmarks/gpu_check.py on a machine without a GPU: argument handling, the clear refusal, and its
sections run on the CPU (--device cpu --quick) so that the GPU run does not meet untested code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _has_gpu() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except ImportError:
        return False


def test_help_and_bad_arguments():
    proc = run("--help")
    assert proc.returncode == 0 and all(s in proc.stdout for s in ("conformance", "cpu_vs_gpu", "bench", "scoring"))
    bad = run("--sections", "conformance,nonsense")
    assert bad.returncode == 2 and "unknown section(s) ['nonsense']" in bad.stderr, bad.stderr
    assert run("--jax-forms", "tree").returncode == 2
    assert run("--n-train", "0").returncode == 2
    dry = run("--dry-run", "--sections", "scoring", "--n-train", "1000")
    assert dry.returncode == 0 and "1000 x 4096" in dry.stdout, dry.stdout


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the refusal cannot be observed")
def test_without_a_gpu_it_stops_with_a_clear_message(tmp_path):
    proc = run("--out", tmp_path / "r.json")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "no CUDA GPU found" in proc.stderr and "--quick" in proc.stderr, proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_scoring_section_runs_on_the_cpu(tmp_path):
    out = tmp_path / "r.json"
    proc = run("--device", "cpu", "--quick", "--sections", "scoring", "--n-train", "3000", "--dim", "64",
               "--out", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())["sections"]["scoring"]
    assert res["status"] == "ok" and res["workload"]["n_train"] == 3000 and res["workload"]["dim"] == 64, res
    assert res["topk_matches_baseline_product"] and res["gpu_result"] is False


@pytest.mark.slow
def test_every_section_runs_on_the_cpu(tmp_path):
    out = tmp_path / "r.json"
    proc = run("--device", "cpu", "--quick", "--out", out, timeout=1800)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, json.dumps(report["sections"], indent=1)[-4000:]
    assert {s: r["status"] for s, r in report["sections"].items()} == dict.fromkeys(
        ("conformance", "cpu_vs_gpu", "bench", "scoring"), "ok")
    conf = report["sections"]["conformance"]["backends"]
    assert conf["torch"]["checks"] > 10 and conf["torch"]["failed"] == 0, conf
    assert conf["jax (unrolled)"]["failed"] == 0, conf
    for cmp in report["sections"]["cpu_vs_gpu"]["comparisons"].values():
        assert cmp["ok"] and cmp["same_checkpoint_id"], cmp
