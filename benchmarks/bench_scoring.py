"""Streamed scoring from an on-disk feature store vs a bare in-memory matrix product.

Workload (issue 7): ``--n-train`` synthetic training examples (features of
width ``--dim``, summed over steps, float32) in a store on disk, scored
against ``--n-query`` queries with ``--steps`` loop steps each, keeping the
top ``--k`` train examples per query and step and per query in total, under
a ``--budget`` memory budget.

Baseline, in the same process on the same numbers: one bare ``np.matmul``
of the train matrix held in memory ``[N, dim]`` with the query matrix
``[dim, n_query * steps]`` into a preallocated output: no top-k, no disk, no
budget.  The two are timed in interleaved rounds (``benchmarks/common.py``);
the headline is the median over rounds of the paired throughput ratio
``baseline_time / streamed_time`` (1.0 = as fast as the bare product).

The peak resident memory that one streamed scoring call adds (Linux
``VmHWM``; memory-mapped store pages count while resident) is reported next
to the budget.  The store is read through the page cache: right after it
is written its pages are usually resident (dropping caches needs root), so
the figure measures the scorer, not the disk.

    python benchmarks/bench_scoring.py            # the issue's workload: 200,000 x 2048, 256 queries x 8 steps
    python benchmarks/bench_scoring.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402  (benchmarks/common.py; set threads before NumPy loads BLAS)


def build_store(path: str, n_train: int, dim: int, steps: int, shard_rows: int, seed: int):
    """Write ``n_train`` synthetic step-summed float32 rows of width ``dim`` (a one-tensor loop group)."""
    import numpy as np

    from sdi_core import CheckpointInfo, Features, ParamInfo, SketchPlan, TensorSketch
    from sdi_core.store import featurize_to_store

    plan = SketchPlan(TensorSketch(dim=dim, seed=0), [ParamInfo("block.mlp.fc1.weight", (4 * dim, 2 * dim), "loop")])
    ckpt = (CheckpointInfo("synthetic", 1.0),)

    def featurize(ranges):
        rows = [np.random.default_rng([seed, a]).standard_normal((b - a, 1, dim), dtype=np.float32) for a, b in ranges]
        ids = np.arange(ranges[0][0], ranges[-1][1])
        return Features([{"loop": np.concatenate(rows)}], plan.layout, ckpt, {"loop": steps}, example_ids=ids,
                        summed=True)

    batches = [(a, min(n_train, a + shard_rows)) for a in range(0, n_train, shard_rows)]
    store = featurize_to_store(path, featurize, batches, shard_size=1, summed=True, dtype="float32")
    return plan, ckpt, store


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--n-train", type=int, default=200_000, help="training examples in the store")
    ap.add_argument("--dim", type=int, default=2048, help="feature width m")
    ap.add_argument("--n-query", type=int, default=256, help="query examples")
    ap.add_argument("--steps", type=int, default=8, help="loop steps per query")
    ap.add_argument("--k", type=int, default=10, help="top-k per query and step (and in total)")
    ap.add_argument("--budget", default="2GiB", help="memory budget of the streamed scorer")
    ap.add_argument("--shard-rows", type=int, default=25_000, help="rows per shard when writing the store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-dir", default=None, help="where to write the store (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.dim, args.n_query, args.shard_rows = 20_000, 1024, 64, 5_000
    repeats = args.repeats or 3
    info = common.setup(args.threads)

    import numpy as np

    import sdi_core
    from sdi_core import Features
    from sdi_core.scoring import parse_bytes, score_store

    budget = parse_bytes(args.budget)
    tmp = args.store_dir or tempfile.mkdtemp(prefix="sdi-bench-store-")
    store_path = os.path.join(tmp, "train")
    shutil.rmtree(store_path, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        plan, ckpt, store = build_store(store_path, args.n_train, args.dim, args.steps, args.shard_rows, args.seed)
        write_s = time.perf_counter() - t0
        rng = np.random.default_rng([args.seed, 10**9])
        q = rng.standard_normal((args.n_query, args.steps, args.dim), dtype=np.float32)
        query = Features([{"loop": q}], plan.layout, ckpt, {"loop": args.steps})

        # Streamed scoring first, alone, for its peak memory (before the baseline's arrays exist).
        result, peak = common.peak_memory(lambda: score_store(store, query, k=args.k, budget=budget))

        train_mem = np.array(store.as_features().data[0]["loop"]).reshape(args.n_train, args.dim)
        q_mat = np.ascontiguousarray(q.reshape(args.n_query * args.steps, args.dim))
        out = np.empty((args.n_train, args.n_query * args.steps), dtype=np.float32)
        last = {}

        def streamed():
            last["res"] = score_store(store, query, k=args.k, budget=budget)

        samples = common.interleaved(
            {"bare_matmul": lambda: np.matmul(train_mem, q_mat.T, out=out), "streamed": streamed},
            repeats=repeats, warmup=1,
        )
        summary = common.summarize(samples, baseline="bare_matmul")
        # Check the streamed top-k against the baseline product for a few query columns.
        cols = np.linspace(0, args.n_query * args.steps - 1, 8).astype(int)
        verified = True
        for c in cols:
            ref = np.lexsort((np.arange(args.n_train), -out[:, c]))[: args.k]
            j, t = divmod(int(c), args.steps)
            verified &= bool(np.array_equal(np.sort(ref), np.sort(last["res"].slot_topk.indices[j, t])))

        s = summary["streamed"]
        throughput = {
            "paired_median": 1.0 / s["ratio_paired_median"],
            "paired_min": 1.0 / s["ratio_paired_max"],
            "paired_max": 1.0 / s["ratio_paired_min"],
            "best_over_best": 1.0 / s["ratio_best"],
        }
        flops = 2.0 * args.n_train * args.dim * args.n_query * args.steps
        record = {
            "benchmark": "bench_scoring",
            "command": common.command_line(__file__, argv),
            "workload": {
                "n_train": args.n_train, "dim": args.dim, "n_query": args.n_query, "steps": args.steps,
                "k": args.k, "budget_bytes": budget, "train_dtype": "float32", "train_summed_over_steps": True,
                "shard_rows": args.shard_rows, "store_bytes": int(store.nbytes),
                "topk": "per query and step, and per query in total (TracIn)",
            },
            "baseline": "np.matmul(train[N, dim] in memory, query[dim, n_query*steps]) into a preallocated output",
            "throughput_vs_bare_matmul": throughput,
            "timings": summary,
            "streamed_gflops_best": flops / s["best_s"] / 1e9,
            "baseline_gflops_best": flops / summary["bare_matmul"]["best_s"] / 1e9,
            "streamed_rows_per_s_best": args.n_train / s["best_s"],
            "block_rows": result.block_rows,
            "peak_rss_added_bytes": peak,
            "peak_within_budget": None if peak is None else bool(peak <= budget),
            "store_write_s": write_s,
            "topk_matches_baseline_product": verified,
            "machine": common.finish_info(info),
            "sdi_version": sdi_core.__version__,
            "note": "Store pages are read through the page cache (just written, usually resident). The CPUs may be "
                    "shared with other processes; paired ratios of interleaved rounds are what is comparable.",
        }
        path = common.write_json(common.results_path(args.out_dir, "scoring", args.quick), record)
        print(common.table(
            [{"candidate": n, "best_s": v["best_s"], "median_s": v["median_s"],
              "throughput": 1.0 / v["ratio_paired_median"]} for n, v in summary.items()],
            [("candidate", "candidate", ""), ("best_s", "best s", ".3f"), ("median_s", "median s", ".3f"),
             ("throughput", "throughput vs bare matmul (paired median)", ".3f")]))
        print(f"block {result.block_rows} rows; peak RSS added {common.fmt(common.mib(peak), '.0f')} MiB "
              f"(budget {budget / 2**20:.0f} MiB); top-k verified: {verified} -> {path}")
        return 0 if verified else 1
    finally:
        if args.store_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
