"""Keep benchmarks/bench_routes.py from rotting: its --quick mode runs in seconds."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_routes_quick_runs_and_reports_both_routes():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_routes.py"), "--quick",
                           "--backends", "numpy"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "exact_hash" in proc.stdout and "fft" in proc.stdout, proc.stdout
