"""Train every task preset of ``sdi run`` with several seeds: test accuracy and training time.

Each (task, seed) trains in its own process with one torch thread (the demo
models are too small to gain from more), as ``sdi run --task TASK --seed S``
trains them (``sdi_core.app.cli_demo.train_task_model``).  Accuracy does not
depend on machine load; times do, so each run records the load average
before and after and is marked invalid above 0.5.

    python benchmarks/tasks.py                   # 4 tasks x 3 seeds (about an hour, one at a time)
    python benchmarks/tasks.py --tasks sudoku --seeds 0
    python benchmarks/tasks.py --quick           # seconds: tiny budgets, for the test suite

Writes ``benchmarks/results/tasks.json``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

TASKS = ("parity", "pointer", "addition", "sudoku")


def train_one(task: str, seed: int, quick: bool) -> dict:
    """Train one preset in this process; returns accuracy, steps, seconds and the load around it."""
    import torch

    torch.set_num_threads(1)
    from sdi_core.app.cli_demo import resolve_settings, train_task_model

    settings = resolve_settings(task, "small" if quick else "default", seed=seed, quiet=True)
    before = common.load_snapshot(probe_s=1.0)
    t0, c0 = time.perf_counter(), time.process_time()
    trained = train_task_model(settings)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "task": task, "seed": seed, "test_accuracy": trained.result.final_accuracy,
        "evals": [list(e) for e in trained.result.evals], "train_steps": settings.train_steps,
        "d_model": settings.d_model, "tau": settings.tau, "train_size": settings.train_size,
        "seconds_wall": wall, "seconds_cpu": cpu, **common.load_record(before, common.load_snapshot()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=1,
                    help="runs at a time, one process each (default 1; with 2 the load makes the times invalid)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run for the test suite")
    ap.add_argument("--out-dir", default=None, help="folder for tasks.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    info = common.machine_info()
    info["load_average_start"] = common._loadavg()
    jobs = [(t, s) for t in args.tasks for s in args.seeds]
    runs = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=ctx) as pool:
        futures = [pool.submit(train_one, t, s, args.quick) for t, s in jobs]
        for fut in cf.as_completed(futures):
            r = fut.result()
            runs.append(r)
            print(f"{r['task']:9s} seed {r['seed']}: test accuracy {r['test_accuracy']:.3f} in "
                  f"{r['seconds_wall']:.0f} s wall ({r['seconds_cpu']:.0f} s CPU)"
                  + ("" if r["valid"] else f"  [{r['reason']}: time not valid]"),
                  flush=True)
    runs.sort(key=lambda r: (TASKS.index(r["task"]), r["seed"]))
    summary = {}
    for t in args.tasks:
        rs = [r for r in runs if r["task"] == t]
        summary[t] = {"test_accuracy": [r["test_accuracy"] for r in rs], "min_accuracy": min(r["test_accuracy"] for r in rs),
                      "max_seconds_wall": max(r["seconds_wall"] for r in rs),
                      "times_valid": all(r["valid"] for r in rs)}
    payload = {"command": common.command_line(__file__, argv), "machine": common.finish_info(info),
               "workers": args.workers, "summary": summary, "runs": runs}
    path = common.write_json(common.results_path(args.out_dir, "tasks", args.quick), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
