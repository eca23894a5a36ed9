"""Keep the benchmark scripts from rotting: each one's ``--quick`` mode runs end to end in seconds.

Every script in ``benchmarks/`` runs here in a subprocess (as a user would run
it) with its output sent to a temporary folder, and what it writes is checked
for the fields the README's results section is built from.  A new script must
be added to :data:`SCRIPTS` (or to :data:`TESTED_ELSEWHERE`): the first test
fails otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# script -> arguments that send its output to the folder {out}
SCRIPTS = {
    "fidelity.py": ["--out-dir", "{out}"],
    "bench_featurize_grid.py": ["--out-dir", "{out}"],
    "bench_vs_exact.py": ["--out-dir", "{out}"],
    "bench_vs_paper.py": ["--out-dir", "{out}"],
    "bench_scoring.py": ["--out-dir", "{out}"],
    "bench_jax_featurize.py": ["--out-dir", "{out}"],
    "gpu_check.py": ["--sections", "scoring", "--out-dir", "{out}"],  # every section: tests/test_gpu_check.py
    "tasks.py": ["--out-dir", "{out}", "--tasks", "parity", "sudoku", "--seeds", "0"],
    "bench_capture_vs_ref.py": ["--ref", "HEAD", "--out-dir", "{out}"],
}
TESTED_ELSEWHERE = {
    "bench_routes.py": "tests/test_bench_routes.py",
    "bench_torch_featurize.py": "tests/test_torch_bench.py",
    "common.py": "a helper module, not a script",
}

PAPER_PRESENT = importlib.util.find_spec("sdi") is not None


def run_quick(script: str, out: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    args = [a.format(out=out) for a in SCRIPTS[script]]
    cmd = [sys.executable] + (prefix or [str(BENCH / script)]) + ["--quick"] + args
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{script} --quick failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def load(out: Path, name: str) -> dict:
    path = out / name
    assert path.is_file(), f"expected {path} to be written; the folder holds {sorted(p.name for p in out.iterdir())}"
    with open(path) as f:
        return json.load(f)


def assert_png(out: Path, name: str) -> None:
    path = out / name
    assert path.is_file(), f"expected the figure {path}"
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes: an empty figure?"


def test_every_benchmark_script_has_a_quick_test():
    scripts = {p.name for p in BENCH.glob("*.py")}
    untested = sorted(scripts - set(SCRIPTS) - set(TESTED_ELSEWHERE))
    assert not untested, f"benchmark scripts without a --quick test: {untested}; add them to SCRIPTS"
    missing = sorted(set(SCRIPTS) - scripts)
    assert not missing, f"SCRIPTS names scripts that do not exist: {missing}"


def test_capture_vs_ref_quick_runs_a_git_reference_beside_today(tmp_path):
    run_quick("bench_capture_vs_ref.py", tmp_path)
    res = load(tmp_path, "capture_vs_ref_quick.json")
    s = res["summary"]
    assert set(s) == {"fwd_bwd", "ref m=256", "new m=256 (no row check)", "new m=256"}, list(s)
    for name in ("new m=256 (no row check)", "new m=256"):
        assert s[name]["vs_ref_paired_min"] <= s[name]["vs_ref_paired_median"] <= s[name]["vs_ref_paired_max"]
    assert "valid" in res["load"] and res["config"]["ref"] == "HEAD"


def test_fidelity_quick(tmp_path):
    proc = run_quick("fidelity.py", tmp_path)
    res = load(tmp_path, "fidelity_quick.json")
    assert_png(tmp_path, "fidelity_quick.png")
    assert "c / sqrt(m)" in proc.stdout, proc.stdout
    assert [r["m"] for r in res["per_m"]] == res["config"]["dims"], res["per_m"]
    for r in res["per_m"]:
        assert 0 < r["rel_error_trajectory"] < 10 and 0 < r["rel_error_tracin"] < 10, r
        assert -1 <= r["pearson_trajectory"] <= 1 and 0 <= r["topk_overlap_tracin"] <= 1, r
    assert res["fit"]["rel_error_trajectory"]["c"] > 0, res["fit"]
    # The reference factors and sdi_torch's capture give the same float64 features (exact claim).
    check = res["attributor_check"]
    assert check["ok"], check
    assert check["max_abs_diff_over_max_abs"] < 1e-10, check


def test_featurize_grid_quick(tmp_path):
    run_quick("bench_featurize_grid.py", tmp_path)
    res = load(tmp_path, "featurize_grid_quick.json")
    assert_png(tmp_path, "featurize_grid_quick.png")
    cfg = res["config"]
    want = {(b, d, B, m) for b in ("torch", "jax") for (d, _, _) in cfg["sizes"] for B in cfg["batches"]
            for m in cfg["dims"]}
    got = {(r["backend"], r["d_model"], r["batch"], r["m"]) for r in res["rows"]}
    assert got == want, f"grid rows {sorted(got)} != {sorted(want)}"
    for r in res["rows"]:
        assert r["time_ratio"] > 0 and r["fwd_bwd_s"] > 0 and r["auto_s"] > 0 and r["summed_time_ratio"] > 0, r
        forced = [r[f"{route}_s"] for route in res["config"]["forced_routes"]]
        assert forced and r["auto_vs_best_forced"] == pytest.approx(r["auto_s"] / min(forced)), r
        assert "auto_peak_mib" in r and "summed_peak_mib" in r, "memory rows joined from the memory run"
    assert res["profiles"]["torch"]["top_tottime"], res["profiles"]
    assert res["time"]["machine"]["pid"] != res["memory"]["machine"]["pid"], "time and memory in separate processes"
    for part in ("time", "memory"):
        assert len(res[part]["load"]["load_before"]) == 3 and len(res[part]["load"]["load_after"]) == 3
    assert res["valid"] == (res["time"]["load"]["valid"] and res["memory"]["load"]["valid"])


def test_vs_exact_quick(tmp_path):
    run_quick("bench_vs_exact.py", tmp_path)
    res = load(tmp_path, "vs_exact_quick.json")
    assert_png(tmp_path, "vs_exact_quick.png")
    methods = {r["method"] for r in res["rows"]}
    assert {"untied", "exact"} <= methods and any(m.startswith("ts") for m in methods), methods
    for r in res["rows"]:
        assert r["status"] == "ran", r
        if r["kind"] == "sketch":
            assert r["features_per_step"] < r["exact_features_per_step"], r
            assert 0 < r["rel_error_trajectory"] < 10 and r["accuracy_vs"] == "exact", r
        if r["method"] == "untied":  # two exact methods agree to float32 rounding
            assert r["rel_error_trajectory"] < 1e-4, r
    assert res["where_sketching_wins"]["points"], res["where_sketching_wins"]


@pytest.mark.skipif(not PAPER_PRESENT, reason="the paper's package step-decomposed-influence (import sdi) is not "
                                               "installed; pip install step-decomposed-influence opacus")
def test_vs_paper_quick_with_the_paper_package(tmp_path):
    run_quick("bench_vs_paper.py", tmp_path)
    res = load(tmp_path, "vs_paper_quick.json")
    assert_png(tmp_path, "vs_paper_quick.png")
    assert res["paper_package"]["status"] == "compared", res["paper_package"]
    impls = {r["implementation"] for r in res["cost"]}
    assert impls == {"fwd_bwd", "sdi_torch", "paper"}, impls
    assert {r["implementation"] for r in res["accuracy"]["summary"]} == {"sdi_torch", "paper"}


def test_vs_paper_quick_reports_skipped_when_the_paper_package_is_absent(tmp_path):
    # Hide any installed `sdi` so that `import sdi` raises ImportError, as on a machine without the package.
    runner = ("import runpy, sys; sys.modules['sdi'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = run_quick("bench_vs_paper.py", tmp_path, prefix=["-c", runner, str(BENCH / "bench_vs_paper.py")])
    assert "PAPER COMPARISON SKIPPED" in proc.stdout and "pip install step-decomposed-influence" in proc.stdout, \
        proc.stdout
    res = load(tmp_path, "vs_paper_quick.json")
    assert res["paper_package"]["status"] == "skipped", res["paper_package"]
    assert {r["implementation"] for r in res["cost"]} == {"fwd_bwd", "sdi_torch"}, res["cost"]
    assert {r["implementation"] for r in res["accuracy"]["summary"]} == {"sdi_torch"}


def test_scoring_quick_sweeps_time_and_memory_in_separate_processes(tmp_path):
    run_quick("bench_scoring.py", tmp_path)
    res = load(tmp_path, "scoring_quick.json")
    assert_png(tmp_path, "scoring_quick.png")
    sweeps = {p["sweep"] for p in res["points"]}
    assert sweeps == {"n_train", "budget"}, sweeps
    n_values = sorted(p["time"]["n_train"] for p in res["points"] if p["sweep"] == "n_train")
    assert n_values[-1] == res["workload"]["n_train"] and len(set(n_values)) >= 3, n_values
    for p in res["points"]:
        t, m = p["time"], p["memory"]
        assert t["pid"] != m["pid"], "time and memory must be measured in separate processes"
        assert t["throughput_vs_bare_matmul"]["paired_median"] > 0 and t["topk_matches_baseline_product"], t
        assert m["peak_rss_added_bytes"] is None or m["peak_rss_added_bytes"] > 0, m
        for rec in (t, m):
            assert rec["load_limit"] == 0.5 and "load_before" in rec and "load_after" in rec, rec
            during, before = rec["other_cores_during"], rec["other_cores_before"]
            want = None if during is None else max(during, before or 0.0, rec["load_before"][0]) <= 0.5
            assert rec["valid"] == want, rec
        assert p["valid"] == (t["valid"] is not False and m["valid"] is not False)
    assert res["valid"] == all(p["valid"] for p in res["points"])
    budgets = sorted(p["memory"]["budget_bytes"] for p in res["points"] if p["sweep"] == "budget")
    blocks = [p["time"]["block_rows"] for p in sorted(res["points"], key=lambda p: p["memory"]["budget_bytes"])
              if p["sweep"] == "budget"]
    assert len(budgets) >= 2 and blocks == sorted(blocks), "a larger budget never gives smaller blocks"


def test_gpu_check_quick_runs_on_whatever_torch_has(tmp_path):
    pytest.importorskip("torch")
    run_quick("gpu_check.py", tmp_path)
    res = load(tmp_path, "gpu_check_quick.json")["sections"]["scoring"]
    assert res["topk_matches_baseline_product"] is True, res
    assert "torch" in res["scored_on"]["namespace"], res["scored_on"]
    assert res["gpu_result"] == res["scored_on"]["device"].startswith("cuda"), res
    assert res["throughput_vs_bare_matmul"]["paired_median"] > 0 and "valid" in res


def test_tasks_quick_trains_each_preset_and_records_accuracy_time_and_load(tmp_path):
    proc = run_quick("tasks.py", tmp_path)
    res = load(tmp_path, "tasks_quick.json")
    assert set(res["summary"]) == {"parity", "sudoku"}, res["summary"]
    for r in res["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seconds_wall"] > 0 and "load_before" in r, r
        assert r["evals"][-1][0] == r["train_steps"], r["evals"]
    assert "test accuracy" in proc.stdout


def test_load_record_marks_loaded_machines_invalid():
    sys.path.insert(0, str(BENCH))
    import common

    def snap(wall, busy, own, probe=None, load1=0.3):
        return {"loadavg": [load1, 1.0, 0.5], "wall": wall, "busy_s": busy, "own_s": own,
                "other_cores_idle_probe": probe}

    # 10 s during which the machine was busy 21 CPU-s and this process used 20: others 0.1 core -> valid
    # (the 1-minute load average of 2 at the end, which this process causes by itself, does not decide)
    quiet = common.load_record(snap(0, 100, 5, probe=0.05), snap(10, 121, 25, load1=2.0))
    assert quiet["valid"] is True and abs(quiet["other_cores_during"] - 0.1) < 1e-9
    # others took 8 CPU-s in 10 s: 0.8 core
    busy = common.load_record(snap(0, 100, 5), snap(10, 128, 25))
    assert busy["valid"] is False and "0.80 cores during" in busy["reason"]
    # quiet during, but busy in the idle probe just before
    loaded_before = common.load_record(snap(0, 100, 5, probe=1.3), snap(10, 120, 25))
    assert loaded_before["valid"] is False and "just before" in loaded_before["reason"]
    # quiet before and during by the counters, but the load average at the start above the limit
    late_start = common.load_record(snap(0, 100, 5, probe=0.0, load1=0.9), snap(10, 120, 25))
    assert late_start["valid"] is False and "0.90 at the start" in late_start["reason"]
    assert common.load_record(None, None)["valid"] is None
    # the live counters: a process that sleeps sees about its own idle machine
    start = common.load_snapshot(probe_s=0.2, wait_s=0.0)
    rec = common.load_record(start, common.load_snapshot())
    assert rec["other_cores_during"] is not None and 0.0 <= rec["other_cores_during"]


@pytest.mark.parametrize("script,result", [
    ("bench_jax_featurize.py", "jax_featurize_quick.json"),
])
def test_backend_benchmark_quick(tmp_path, script, result):
    run_quick(script, tmp_path)
    res = load(tmp_path, result)
    assert res, f"{script} wrote an empty result"
    if script == "bench_jax_featurize.py":
        assert {r["candidate"] for r in res["rows"]} == {"featurize", "summed"}, res["rows"]
        assert all(r["time_ratio"] > 0 and "memory_ratio" in r for r in res["rows"]), res["rows"]
        assert res["time"]["machine"]["memory_instrumentation"] is False and res["memory"]["load"]["load_after"]
