"""Featurisation cost of sdi_torch relative to a plain forward + backward pass, in one process.

Configuration (issue 3): LoopedGPT with d_model=256, 8 heads, tau=8, sequence
length 128, vocabulary 128, batch 32, float32, the whole loop body selected
(``loop=model.block``), TensorSketch m=8192, ``torch.set_num_threads(2)``.

Reported, all measured in this process on the same batch:

- ``time_ratio``: median featurisation time / median plain forward+backward
  time (``per_example_loss(model, batch).sum().backward()`` with parameter
  gradients), the two interleaved so that machine load affects both alike;
  ``time_ratio_per_pair`` divides each featurisation by the forward+backward
  run just before it (the spread shows how noisy the machine was);
- ``memory_ratio``: peak extra resident memory of featurisation / that of the
  forward+backward (peak RSS above the RSS before the call, read from
  ``/proc/self/status`` VmHWM after ``malloc_trim`` and resetting the peak through
  ``/proc/self/clear_refs``), each taken as the median of three measurements;
- a cProfile of one featurisation (top functions by total time).

    python benchmarks/bench_torch_featurize.py            # issue configuration (about a minute)
    python benchmarks/bench_torch_featurize.py --quick    # small configuration, seconds

Results go to ``benchmarks/results/torch_featurize.json`` (``torch_featurize_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time

import numpy as np
import torch

import sdi_core
import sdi_torch
from sdi_core.reference.looped_transformer import LoopedConfig
from sdi_torch.models import LoopedGPT, per_example_loss

FULL = dict(d_model=256, n_heads=8, tau=8, seq_len=128, vocab=128, batch=32, m=8192, repeats=5)
QUICK = dict(d_model=64, n_heads=4, tau=4, seq_len=32, vocab=64, batch=8, m=1024, repeats=3)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap back to the OS, so that RSS measures live memory (glibc keeps freed pages otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mb(fn) -> float | None:
    """Peak resident memory above the level before ``fn()``, in MiB (None where /proc is unavailable)."""
    gc.collect()
    _trim()
    if not _reset_peak():
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024.0


def run(cfg: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=cfg["vocab"], d_model=cfg["d_model"], n_heads=cfg["n_heads"], tau=cfg["tau"],
                          max_len=cfg["seq_len"])
    model = LoopedGPT(config).float().eval()
    g = torch.Generator().manual_seed(1)
    B, T, V = cfg["batch"], cfg["seq_len"], cfg["vocab"]
    batch = {"tokens": torch.randint(0, V, (B, T), generator=g), "targets": torch.randint(0, V, (B, T), generator=g)}
    attr = sdi_torch.Attributor(model, model.block, per_example_loss, sdi_core.TensorSketch(dim=cfg["m"], seed=0),
                                progress=False)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        per_example_loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    def featurize():
        return attr.featurize([batch], progress=False)

    featurize()  # warm-up: hash tables, device copies, allocator
    forward_backward()
    t_fb, t_feat = [], []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        forward_backward()
        t_fb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        feats = featurize()
        t_feat.append(time.perf_counter() - t0)
    mem_fb_all, mem_feat_all = [], []
    for _ in range(3):
        mem_fb_all.append(peak_extra_mb(forward_backward))
        mem_feat_all.append(peak_extra_mb(featurize))
    mem_fb = None if None in mem_fb_all else statistics.median(mem_fb_all)
    mem_feat = None if None in mem_feat_all else statistics.median(mem_feat_all)

    prof = cProfile.Profile()
    prof.enable()
    featurize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    # Profile lines name files by absolute path: keep them relative to the repository (no machine paths in results).
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    top = [line.rstrip().replace(repo, "") for line in s.getvalue().splitlines() if line.strip()][-16:]

    fb, ft = statistics.median(t_fb), statistics.median(t_feat)
    widths = attr.plan.features_per_step()
    out = {
        "config": dict(cfg, threads=threads, dtype="float32", selection="loop=model.block (whole loop body)"),
        "features_per_step": widths,
        "feature_shape": {g: list(feats.data[0][g].shape) for g in feats.data[0]},
        "forward_backward_s": t_fb,
        "featurize_s": t_feat,
        "forward_backward_median_s": fb,
        "featurize_median_s": ft,
        "time_ratio": ft / fb,
        "time_ratio_per_pair": [b / a for a, b in zip(t_fb, t_feat)],
        "time_ratio_per_pair_median": statistics.median(b / a for a, b in zip(t_fb, t_feat)),
        "time_target": 1.3,
        "peak_extra_mb_forward_backward": mem_fb,
        "peak_extra_mb_featurize": mem_feat,
        "peak_extra_mb_forward_backward_all": mem_fb_all,
        "peak_extra_mb_featurize_all": mem_feat_all,
        "memory_ratio": None if not (mem_fb and mem_feat) else mem_feat / mem_fb,
        "memory_target": 1.2,
        "profile_top_tottime": top,
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small configuration (seconds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="output JSON path")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"] = args.repeats
    res = run(cfg, args.threads)
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or os.path.join(here, "results", "torch_featurize_quick.json" if args.quick else "torch_featurize.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"forward+backward {res['forward_backward_median_s']:.3f} s, featurize {res['featurize_median_s']:.3f} s, "
          f"time ratio {res['time_ratio']:.2f} (target <= 1.3); per pair "
          f"{', '.join(f'{r:.2f}' for r in res['time_ratio_per_pair'])}")
    if res["memory_ratio"] is not None:
        print(f"peak extra memory: forward+backward {res['peak_extra_mb_forward_backward']:.0f} MiB, featurize "
              f"{res['peak_extra_mb_featurize']:.0f} MiB, ratio {res['memory_ratio']:.2f} (target <= 1.2)")
    print("\n".join(res["profile_top_tottime"]))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
