"""The memory budget of streamed scoring is honest: peak RSS added stays within the budget plus a small constant."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sdi_core import CheckpointInfo, Features, ParamInfo, SDIError, SketchPlan, TensorSketch
from sdi_core.scoring import RSS_CONSTANT, score_store
from sdi_core.store import featurize_to_store, write_features

PLAN = SketchPlan(TensorSketch(dim=1024, seed=0), [ParamInfo("block.w", (64, 64), "loop")])
CKPTS = (CheckpointInfo("a", 1.0, 1), CheckpointInfo("b", 0.5, 2))
ROWS_PER_SHARD = 4000

# Runs in a fresh process: the peak resident set is reset right before score_store and read right after.
_PROBE = r"""
import json, sys
import array_api_compat.numpy  # imported on first use by the kernel: an import, not scoring's allocation
from sdi_core.scoring import score_store
from sdi_core.store import open_store

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

train, query = open_store(sys.argv[1]), open_store(sys.argv[2])
kwargs = json.loads(sys.argv[4])
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM := VmRSS
res = score_store(train, query, budget=sys.argv[3], **kwargs)
print(json.dumps({"added": (status("VmHWM") - before) * 1024, "block_rows": res.block_rows,
                  "first": res.total_topk.ids[0].tolist()}))
"""


def _train_batch(batch_list):
    parts = []
    for i in batch_list:
        rng = np.random.default_rng(i)
        parts.append([rng.standard_normal((ROWS_PER_SHARD, 1, 1024), dtype=np.float32) for _ in CKPTS])
    data = [{"loop": np.concatenate([p[k] for p in parts])} for k in range(len(CKPTS))]
    ids = np.concatenate([np.arange(i * ROWS_PER_SHARD, (i + 1) * ROWS_PER_SHARD) for i in batch_list])
    return Features(data, PLAN.layout, CKPTS, {"loop": 8}, example_ids=ids, summed=True)


def _query(n: int, seed: int = 99) -> Features:
    rng = np.random.default_rng(seed)
    return Features([{"loop": rng.standard_normal((n, 8, 1024)).astype(np.float32)} for _ in CKPTS], PLAN.layout,
                    CKPTS, {"loop": 8}, example_ids=np.arange(n))


@pytest.fixture(scope="module")
def big_stores(tmp_path_factory):
    """A 313 MiB step-summed float32 train store in 10 shards (blocks cross shards) and a 4 MiB query store."""
    root = tmp_path_factory.mktemp("budget")
    featurize_to_store(root / "train", _train_batch, list(range(10)), shard_size=1, summed=True, consolidate=False)
    write_features(root / "query", _query(64))
    return root


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="peak resident set read from Linux /proc (VmHWM, reset through clear_refs)")
@pytest.mark.parametrize("budget", ["48MiB", "64MiB"])
@pytest.mark.parametrize("kwargs", [{}, {"dtype": "float64", "normalize": "cosine", "dense": ["tracin"]}],
                         ids=["float32", "float64-cosine-dense"])
def test_peak_rss_stays_within_the_budget(big_stores, budget, kwargs):
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(big_stores / "train"), str(big_stores / "query"), budget,
                           json.dumps(kwargs)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    limit = int(budget[:-3]) << 20
    assert got["block_rows"] > 100, got
    assert got["added"] <= limit + RSS_CONSTANT, (
        f"score_store(budget={budget}, {kwargs}) on a 313 MiB store added {got['added'] / 2**20:.1f} MiB of peak "
        f"RSS; allowed {budget} + {RSS_CONSTANT >> 20} MiB")


def test_a_query_side_larger_than_the_budget_is_refused_not_exceeded(tmp_path):
    train = write_features(tmp_path / "t", _train_batch([0]))
    query = _query(300)  # 19 MiB as stored; 37 MiB prepared in float64, 112 MiB while being prepared
    with pytest.raises(SDIError, match=r"preparing the query side \(300 queries x 8 steps x 2 checkpoints\) takes"):
        score_store(train, query, budget="64MiB", dtype="float64")
    with pytest.raises(SDIError, match="preparing the query side"):
        score_store(train, query, budget="48MiB")
    assert score_store(train, query, budget="160MiB", dtype="float64", k=3).block_rows > 0
