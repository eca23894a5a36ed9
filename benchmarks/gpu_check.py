"""GPU scoring of a large on-disk store against a bare GPU matrix product (issue 15).

Workload: ``--n-train`` synthetic step-summed float32 rows of width ``--dim``
in a store on disk (default 1,000,000 x 4096: 16 GB), scored by
``sdi_core.scoring.score_store`` against ``--n-query`` x ``--steps`` torch
query features on the GPU, top-``--k`` per query and step and in total,
under ``--budget``.  Store blocks travel to the GPU through pinned memory,
the next one read while the GPU contracts the current one; top-k runs on the
GPU and only the winners come back.

Baseline, same process, same numbers: the whole train matrix already in GPU
memory ``[N, dim]`` times the query matrix ``[dim, n_query * steps]`` into a
preallocated output (one ``torch.matmul``): no disk, no transfer, no top-k.
Timed in interleaved rounds (``benchmarks/common.py``), synchronising the
device in every candidate; the streamed top-k is checked against the
baseline product; peak GPU memory of each (``torch.cuda.max_memory_allocated``)
and the load average around the run (``common.load_record``) are recorded.

    python benchmarks/gpu_check.py            # on a CUDA machine: 1M x 4096, 256 queries x 8 steps, 8 GiB budget
    python benchmarks/gpu_check.py --quick    # seconds, on the device torch has (CPU here: checks the script only)
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

QUICK = dict(n_train=6_000, dim=256, n_query=16, steps=4, shard_rows=2_000, budget="32MiB")


def parse(argv):
    from bench_scoring import finish_args, workload_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    workload_args(ap, n_train=1_000_000, dim=4096, budget="8GiB", shard_rows=100_000)
    return finish_args(ap, argv, QUICK)


def main(argv=None) -> int:
    args = parse(argv)
    info = common.setup(args.threads)
    import numpy as np
    import torch

    import array_api_compat.torch as tx
    from bench_scoring import query_of, synthetic_store
    from sdi_core import Features
    from sdi_core.scoring import parse_bytes, score_store

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("gpu_check: no CUDA device; run it on a GPU machine (or --quick to check the script on the CPU).")
        return 2
    dev = torch.device("cuda" if cuda else "cpu")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with synthetic_store(args) as (store, write_s):
        query_np = query_of(args, store)
        query = Features([{"loop": tx.asarray(query_np.data[0]["loop"], device=dev)}], query_np.layout,
                         query_np.checkpoints, query_np.steps)
        budget = parse_bytes(args.budget)
        load_before = common._loadavg()
        train = torch.cat([torch.from_numpy(np.array(b[0]["loop"]).reshape(-1, args.dim)).to(dev)
                           for _, _, b in store.iter_blocks(args.shard_rows)])
        q_mat = query.data[0]["loop"].reshape(-1, args.dim)
        out = torch.empty((args.n_train, q_mat.shape[0]), dtype=torch.float32, device=dev)
        peaks, last = {}, {}

        def bare():
            torch.matmul(train, q_mat.T, out=out)
            sync()

        def streamed():
            last["res"] = score_store(store, query, k=args.k, budget=budget)  # results are NumPy: synchronised

        for name, fn in (("bare_matmul", bare), ("streamed", streamed)):  # warm-up and peak device memory
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            fn()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) if cuda else None
        samples = common.interleaved({"bare_matmul": bare, "streamed": streamed}, repeats=args.repeats, warmup=0)
        summary = common.summarize(samples, baseline="bare_matmul")
        res = last["res"]
        cols = np.linspace(0, q_mat.shape[0] - 1, 8).astype(int)
        top = torch.topk(out[:, torch.as_tensor(cols, device=dev)], args.k, dim=0).indices.cpu().numpy()
        verified = all(set(top[:, i]) == set(res.slot_topk.indices[c // args.steps, c % args.steps])
                       for i, c in enumerate(cols))
        s = summary["streamed"]
        record = {
            "benchmark": "gpu_check",
            "command": common.command_line(__file__, argv),
            "gpu_result": bool(cuda),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA: checks the script, not a GPU result)",
            "workload": {"n_train": args.n_train, "dim": args.dim, "n_query": args.n_query, "steps": args.steps,
                         "k": args.k, "budget_bytes": budget, "store_bytes": int(store.nbytes)},
            "baseline": "torch.matmul(train[N, dim] on the device, query[dim, n_query*steps]) into a preallocated output",
            "throughput_vs_bare_matmul": {"paired_median": 1 / s["ratio_paired_median"], "best_over_best": 1 / s["ratio_best"]},
            "timings": summary,
            "peak_device_bytes": peaks,
            "block_rows": res.block_rows,
            "scored_on": {"namespace": res.meta["namespace"], "device": res.meta["device"]},
            "topk_matches_baseline_product": bool(verified),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "store_write_s": write_s,
            **common.load_record(load_before, common._loadavg()),
            "machine": common.finish_info(info),
        }
        out_path = common.write_json(common.results_path(args.out_dir, "gpu_check", args.quick), record)
        print(f"{record['device']}: streamed {1 / s['ratio_paired_median']:.3f}x a bare matmul (paired median), "
              f"block {res.block_rows} rows, peak device memory {peaks}, top-k verified {verified}; "
              f"{'valid' if record['valid'] else 'NOT VALID (load above 0.5)'} -> {out_path}")
        return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
