"""Keep benchmarks/bench_scoring.py from rotting: its --quick mode runs and verifies its own top-k."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_scoring_quick_runs_and_verifies_topk(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_scoring.py"), "--quick",
                           "--repeats", "1", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "scoring_quick.json").read_text())
    assert record["topk_matches_baseline_product"] is True
    assert record["throughput_vs_bare_matmul"]["paired_median"] > 0
    assert record["workload"]["n_train"] == 4_000 and record["block_rows"] > 0
