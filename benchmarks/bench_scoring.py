"""Streamed scoring from an on-disk feature store against a bare in-memory matrix product, as N_train and the budget grow.

Workload (issue 7): ``--n-train`` synthetic training examples (features of
width ``--dim``, summed over steps, float32) in a store on disk, scored
against ``--n-query`` queries with ``--steps`` loop steps each, keeping the
top ``--k`` train examples per query and step and per query in total.

Two sweeps: N_train over ``n_train / s`` for ``s`` in ``--splits`` (the first
rows of the store, handed to ``score_store`` as a row source of that many
rows: what a store of that size gives) at the ``--budget``, and the budget
over ``--budgets`` at the full ``n_train``.  At every point:

- *time*, in a process of its own: one bare ``np.matmul`` of the same rows
  held in memory ``[N, dim]`` with the query matrix ``[dim, n_query * steps]``
  into a preallocated output (no top-k, no disk, no budget), and
  ``score_store``, in interleaved rounds (``benchmarks/common.py``); the
  headline is the median over rounds of the paired throughput ratio
  ``baseline_time / streamed_time`` (1.0 = as fast as the bare product);
- *memory*, in another process that never holds the baseline's arrays: the
  peak resident memory one ``score_store`` call adds (Linux ``VmHWM``;
  memory-mapped store pages count while resident) after a warm-up call.

Every measurement records the CPU other processes used just before and
during it and is marked ``valid: false`` above 0.5 core
(``common.load_record``): timings under load are not results.  The store is read through the page cache (right after
it is written its pages are usually resident; dropping caches needs root), so
the figures measure the scorer, not the disk.  Results: ``scoring.json`` and
the figure ``scoring.png`` beside it (throughput and peak memory against
N_train and against the budget).

    python benchmarks/bench_scoring.py            # the issue's workload: 200,000 x 2048, 256 queries x 8 steps, 2 GiB
    python benchmarks/bench_scoring.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402  (benchmarks/common.py; set threads before NumPy loads BLAS)

QUICK = dict(n_train=4_000, dim=256, n_query=16, steps=4, shard_rows=1_000, splits="4,2,1", budgets="3MiB,8MiB,64MiB",
             budget="64MiB")


def workload_args(ap, *, n_train: int, dim: int, budget: str, shard_rows: int) -> None:
    """The synthetic store and query workload's options (shared with ``gpu_check.py``)."""
    ap.add_argument("--n-train", type=int, default=n_train, help="training examples in the store")
    ap.add_argument("--dim", type=int, default=dim, help="feature width m")
    ap.add_argument("--n-query", type=int, default=256, help="query examples")
    ap.add_argument("--steps", type=int, default=8, help="loop steps per query")
    ap.add_argument("--k", type=int, default=10, help="top-k per query and step (and in total)")
    ap.add_argument("--budget", default=budget, help="memory budget of score_store")
    ap.add_argument("--shard-rows", type=int, default=shard_rows, help="rows per shard when writing the store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-dir", default=None, help="where to write the store (default: a temporary directory)")


def finish_args(ap, argv, quick: dict):
    """Parsed arguments, with ``quick``'s values under ``--quick`` and 1 (quick) or 3 timed rounds by default."""
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    workload_args(ap, n_train=200_000, dim=2048, budget="2GiB", shard_rows=25_000)
    ap.add_argument("--budgets", default="256MiB,512MiB,1GiB,2GiB,4GiB", help="budgets of the budget sweep")
    ap.add_argument("--splits", default="10,5,2,1", help="N_train sweep: score the first n_train / s rows")
    ap.add_argument("--no-verify", action="store_true",
                    help="open the store without CRC-32 checks (they run once per chunk, on the first read)")
    ap.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--split", type=int, default=1, help=argparse.SUPPRESS)
    return finish_args(ap, argv, QUICK)


@contextlib.contextmanager
def synthetic_store(args):
    """Write the workload's store (under ``--store-dir`` or a temporary directory, removed afterwards).

    Yields ``(store, seconds it took to write)``.
    """
    tmp = args.store_dir or tempfile.mkdtemp(prefix="sdi-bench-store-")
    path = os.path.join(tmp, "train")
    shutil.rmtree(path, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        store = build_store(path, args.n_train, args.dim, args.steps, args.shard_rows, args.seed)
        yield store, time.perf_counter() - t0
    finally:
        if args.store_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


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
    return featurize_to_store(path, featurize, batches, shard_size=1, summed=True, dtype="float32")


def query_of(args, store):
    import numpy as np

    from sdi_core import Features

    q = np.random.default_rng([args.seed, 10**9]).standard_normal((args.n_query, args.steps, args.dim), dtype=np.float32)
    return Features([{"loop": q}], store.layout, store.checkpoints, {"loop": args.steps})


class FirstRows:
    """The first ``n`` rows of a store as a row source (``sdi_core.algebra``): a store of ``n`` rows, read in place."""

    def __init__(self, store, n: int):
        self.store, self.n_examples = store, n
        self.layout, self.checkpoints, self.steps = store.layout, store.checkpoints, store.steps
        self.summed, self.dtype = store.summed, store.dtype
        self.example_ids = None if store.example_ids is None else store.example_ids[:n]

    def iter_blocks(self, block_rows, start=0, stop=None):
        return self.store.iter_blocks(block_rows, start, self.n_examples if stop is None else min(stop, self.n_examples))


# ----------------------------------------------------------------------------- workers (one process each)


def worker(args) -> dict:
    """One measurement at (``--split``, ``--budget``) in this process; the record as a dict."""
    info = common.setup(args.threads)
    import numpy as np

    from sdi_core.scoring import parse_bytes, score_store
    from sdi_core.store import open_store

    store = open_store(args.store_dir, verify=not args.no_verify)
    query, budget = query_of(args, store), parse_bytes(args.budget)
    n = store.n_examples // args.split
    train_rows = store if n == store.n_examples else FirstRows(store, n)

    def streamed():
        return score_store(train_rows, query, k=args.k, budget=budget)

    load_before = common.load_snapshot(probe_s=1.0)
    if args.worker == "memory":
        streamed()  # warm-up: one-time allocations are not the scorer's working set
        res, peak = common.peak_memory(streamed)
        out = {"peak_rss_added_bytes": peak, "peak_within_budget": None if peak is None else bool(peak <= budget)}
    else:
        train = np.concatenate([np.asarray(b[0]["loop"]).reshape(-1, args.dim) for _, _, b in store.iter_blocks(8192, 0, n)])
        q_mat = np.ascontiguousarray(np.asarray(query.data[0]["loop"]).reshape(-1, args.dim))
        prod = np.empty((n, q_mat.shape[0]), dtype=np.float32)
        last = {}
        samples = common.interleaved({"bare_matmul": lambda: np.matmul(train, q_mat.T, out=prod),
                                      "streamed": lambda: last.update(res=streamed())},
                                     repeats=args.repeats, warmup=1)
        res, summary = last["res"], common.summarize(samples, baseline="bare_matmul")
        s = summary["streamed"]
        cols = np.linspace(0, prod.shape[1] - 1, 8).astype(int)  # the streamed top-k against the bare product
        verified = all(np.array_equal(np.sort(np.lexsort((np.arange(n), -prod[:, c]))[: args.k]),
                                      np.sort(res.slot_topk.indices[c // args.steps, c % args.steps])) for c in cols)
        out = {"throughput_vs_bare_matmul": {"paired_median": 1 / s["ratio_paired_median"],
                                             "paired_min": 1 / s["ratio_paired_max"],
                                             "paired_max": 1 / s["ratio_paired_min"], "best_over_best": 1 / s["ratio_best"]},
               "timings": summary, "topk_matches_baseline_product": bool(verified),
               "streamed_gflops_best": 2.0 * n * args.dim * q_mat.shape[0] / s["best_s"] / 1e9}
    return {"n_train": n, "budget_bytes": budget, "block_rows": res.block_rows, "pid": os.getpid(),
            "verify": not args.no_verify, **out,
            **common.load_record(load_before, common.load_snapshot()), "machine": common.finish_info(info)}


def run_worker(args, what: str, split: int, budget: str, store_dir: str) -> dict:
    """:func:`worker` in a fresh Python process (so that time and memory never share one)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", what, "--split", str(split), "--budget", budget,
           "--store-dir", store_dir, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    for key in ("n_query", "dim", "steps", "k", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--no-verify"] if args.no_verify else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the sweeps


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    info = common.setup(args.threads)
    import sdi_core
    from sdi_core.scoring import parse_bytes

    with synthetic_store(args) as (store, write_s):
        store_path = store.path
        splits = [int(s) for s in args.splits.split(",")]
        budgets = [b.strip() for b in args.budgets.split(",")]
        plan = [("n_train", s, args.budget) for s in splits] + [("budget", 1, b) for b in budgets]
        points, done = [], {}
        for sweep, split, budget in plan:
            key = (split, parse_bytes(budget))  # the two sweeps share their full-N, --budget point
            if key not in done:
                done[key] = {"time": run_worker(args, "time", split, budget, store_path),
                             "memory": run_worker(args, "memory", split, budget, store_path)}
            point = {"sweep": sweep, "split": split, "budget": budget, **done[key]}
            point["valid"] = point["time"]["valid"] is not False and point["memory"]["valid"] is not False
            points.append(point)
            t, m = point["time"], point["memory"]
            print(f"{sweep:<8} N={t['n_train']:<8d} budget={budget:<7} block={t['block_rows']:<6d} throughput "
                  f"{t['throughput_vs_bare_matmul']['paired_median']:.3f}  peak {common.fmt(common.mib(m['peak_rss_added_bytes']), '.0f')} "
                  f"MiB  other load {common.fmt_cores(t['other_cores_during'])}/{common.fmt_cores(m['other_cores_during'])} cores"
                  f"{'' if point['valid'] else '  INVALID (other processes above 0.5 core)'}", flush=True)
        head = next(p for p in points if p["sweep"] == "n_train" and p["split"] == 1)
        record = {
            "benchmark": "bench_scoring",
            "command": common.command_line(__file__, argv),
            "workload": {"n_train": args.n_train, "dim": args.dim, "n_query": args.n_query, "steps": args.steps,
                         "k": args.k, "budget_bytes": parse_bytes(args.budget), "train_dtype": "float32",
                         "train_summed_over_steps": True, "shard_rows": args.shard_rows, "store_bytes": int(store.nbytes),
                         "topk": "per query and step, and per query in total (TracIn)"},
            "baseline": "np.matmul(train[N, dim] in memory, query[dim, n_query*steps]) into a preallocated output",
            "valid": all(p["valid"] for p in points),
            "validity_rule": f"other processes used <= {common.QUIET_LOAD} cores just before and during every measurement",
            "throughput_vs_bare_matmul": head["time"]["throughput_vs_bare_matmul"],
            "peak_rss_added_bytes": head["memory"]["peak_rss_added_bytes"],
            "block_rows": head["time"]["block_rows"],
            "topk_matches_baseline_product": all(p["time"]["topk_matches_baseline_product"] for p in points),
            "points": points,
            "store_write_s": write_s,
            "machine": common.finish_info(info),
            "sdi_version": sdi_core.__version__,
        }
        path = common.write_json(common.results_path(args.out_dir, "scoring", args.quick), record)
        png = plot(record, common.results_path(args.out_dir, "scoring", args.quick, ext="png"))
        print(f"{'valid' if record['valid'] else 'NOT VALID (machine not quiet)'}; top-k verified: "
              f"{record['topk_matches_baseline_product']} -> {path}, {png}")
        return 0 if record["topk_matches_baseline_product"] else 1


def plot(record, path):
    """Throughput and peak memory against N_train (left) and against the budget (right)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for col, (sweep, key, label) in enumerate((("n_train", "n_train", "N_train (rows scored)"),
                                               ("budget", "budget_bytes", "memory budget (MiB)"))):
        pts = sorted((p for p in record["points"] if p["sweep"] == sweep), key=lambda p: p["time"][key])
        x = [p["time"][key] / (2**20 if sweep == "budget" else 1) for p in pts]
        tput = [p["time"]["throughput_vs_bare_matmul"] for p in pts]
        peak = [common.mib(p["memory"]["peak_rss_added_bytes"]) or 0 for p in pts]
        ok = [p["valid"] for p in pts]
        ax[0][col].errorbar(x, [t["paired_median"] for t in tput], yerr=[[t["paired_median"] - t["paired_min"] for t in tput],
                            [t["paired_max"] - t["paired_median"] for t in tput]], fmt="o-", capsize=3, label="streamed")
        ax[0][col].axhline(1.0, color="k", lw=0.8, ls="--", label="bare matmul")
        ax[1][col].plot(x, peak, "s-", color="C1", label="peak RSS added")
        if sweep == "budget":
            ax[1][col].plot(x, x, ":", color="k", lw=0.8, label="budget")
        else:
            ax[1][col].axhline(record["workload"]["budget_bytes"] / 2**20, color="k", ls=":", lw=0.8, label="budget")
        for r in (0, 1):
            bad = [(xi, yi) for xi, yi, good in zip(x, [t["paired_median"] for t in tput] if r == 0 else peak, ok) if not good]
            if bad:
                ax[r][col].plot(*zip(*bad), "x", color="red", ms=10, label="invalid (load > 0.5)")
            ax[r][col].set_xscale("log")
            ax[r][col].xaxis.set_minor_formatter(plt.NullFormatter())
            ax[r][col].set_xlabel(label)
            ax[r][col].legend(fontsize=8)
    ax[0][0].set_ylabel("throughput / bare matmul")
    ax[1][0].set_ylabel("peak memory added (MiB)")
    w = record["workload"]
    fig.suptitle(f"Streamed scoring: {w['dim']}-wide float32 store, {w['n_query']} queries x {w['steps']} steps, "
                 f"top-{w['k']}" + ("" if record["valid"] else "  [NOT VALID: load above 0.5]"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
