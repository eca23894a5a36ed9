"""benchmarks/bench_torch_featurize.py --quick: time and memory in separate processes, every field written,
load recorded and the validity flag set (no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_torch_featurize.py"


def test_quick_benchmark_measures_time_and_memory_in_separate_processes(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--- time run" in proc.stdout and "--- memory run" in proc.stdout, proc.stdout
    res = json.loads(out.read_text())
    assert res["time"]["measure"] == "time" and res["memory"]["measure"] == "memory"
    assert res["time"]["machine"]["memory_instrumentation"] is False, "the time run must not instrument malloc"
    assert res["memory"]["machine"]["memory_instrumentation"] is True
    assert res["time"]["machine"]["pid"] != res["memory"]["machine"]["pid"], "one process per measurement"
    assert {(r["m"], r["side"]) for r in res["rows"]} == {(256, "per_step"), (256, "summed")}
    for r in res["rows"]:
        assert math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0, r
    for part in ("time", "memory"):
        load = res[part]["load"]
        assert len(load["load_before"]) == 3 and len(load["load_after"]) == 3, load
        # valid iff the load average at the start and other processes' cores just before and during are <= 0.5
        assert load["valid"] == (max(load["load_before"][0], load["other_cores_during"],
                                     load["other_cores_before"] or 0.0) <= 0.5), load
    assert res["valid"] == (res["time"]["load"]["valid"] and res["memory"]["load"]["valid"])
    assert res["time"]["profile_top_tottime"], "the time run stores a profile"
    assert "per_step m=256" in res["time"]["routes"], res["time"]["routes"]


def test_single_measurement_flag_runs_in_this_process(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1", "--repeats", "1", "--measure",
                           "time", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["memory"] is None and res["time"]["measure"] == "time"
    assert res["rows"][0]["memory_ratio"] is None
