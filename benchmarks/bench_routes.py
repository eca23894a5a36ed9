"""Outer-product sketch routes: exact-then-hash vs FFT, and whether the cost model picks the faster.

For each layer shape (d_out, d_in), tokens T and batch B, times both routes of
``sdi_core.outer_features`` on the same factors in the same process and
reports the ratio and the route ``choose_route`` picks.

    python benchmarks/bench_routes.py            # full grid (about 2 minutes on 2 cores)
    python benchmarks/bench_routes.py --quick    # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from sdi_core import ParamInfo, TensorSketch, choose_route, outer_features
from sdi_core.specs import make_spec


def _time(fn, repeat):
    fn()  # warm-up (hash tables, caches)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool, backend: str) -> list[dict]:
    if backend == "torch":
        import torch

        torch.set_num_threads(2)
        conv = lambda a: torch.from_numpy(a)
    else:
        conv = lambda a: a
    if quick:
        grid = [(64, 64, 16, 4, 1024), (256, 256, 1, 2, 1024)]
    else:
        grid = [
            (d, d, t, b, m)
            for (d, t, b) in [(256, 128, 8), (512, 128, 8), (1024, 128, 4), (1024, 8, 8), (2048, 1, 8), (4096, 1, 4)]
            for m in (8192,)
        ] + [(1024, 256, 64, 8, 8192), (256, 1024, 64, 8, 8192)]
    rng = np.random.default_rng(0)
    rows = []
    for d_out, d_in, T, B, m in grid:
        spec = make_spec(TensorSketch(dim=m, seed=0), ParamInfo("w", (d_out, d_in)))
        g = conv(rng.standard_normal((B, T, d_out), dtype=np.float32))
        a = conv(rng.standard_normal((B, T, d_in), dtype=np.float32))
        repeat = 1 if quick else 3
        t_exact = _time(lambda: outer_features(g, a, spec, route="exact_hash"), repeat)
        t_fft = _time(lambda: outer_features(g, a, spec, route="fft"), repeat)
        pick = choose_route(B, T, d_out, d_in, m)
        faster = "exact_hash" if t_exact <= t_fft else "fft"
        rows.append(dict(backend=backend, d_out=d_out, d_in=d_in, T=T, B=B, m=m, exact_hash_s=t_exact, fft_s=t_fft,
                         fft_over_exact=t_fft / t_exact, cost_model_pick=pick, faster=faster))
        print(f"{backend:6s} {d_out:5d}x{d_in:<5d} T={T:<4d} B={B:<3d} m={m:<6d} exact_hash {t_exact*1e3:9.2f} ms  "
              f"fft {t_fft*1e3:9.2f} ms  fft/exact {t_fft/t_exact:7.2f}  pick {pick:10s} "
              f"{'ok' if pick == faster else 'MISPICK'}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny grid, for the test suite")
    ap.add_argument("--backends", default="numpy,torch", help="comma-separated: numpy,torch")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "routes.json"))
    args = ap.parse_args(argv)
    rows = []
    for b in args.backends.split(","):
        rows += run(args.quick, b.strip())
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0], "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
