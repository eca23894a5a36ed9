"""benchmarks/bench_torch_featurize.py runs (--quick) and writes every field it reports (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

pytest.importorskip("torch")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_torch_featurize.py"


def test_quick_benchmark_writes_its_report(tmp_path):
    import torch

    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("bench_torch_featurize", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    try:
        res = bench.main(["--quick", "--threads", "1", "--repeats", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["time_ratio"] == pytest.approx(res["time_ratio"])
    assert math.isfinite(saved["time_ratio"]) and saved["time_ratio"] > 0
    assert saved["feature_shape"]["loop"] == [8, 4, saved["features_per_step"]["loop"]]
    assert saved["config"]["m"] == 1024 and saved["profile_top_tottime"]
    if saved["memory_ratio"] is not None:
        assert saved["peak_extra_mb_featurize"] >= 0 and saved["peak_extra_mb_forward_backward"] > 0
