"""Featurisation cost of sdi_torch relative to a plain forward + backward pass, in one process.

Configuration (issue 3): LoopedGPT with d_model=256, 8 heads, tau=8, sequence
length 128, vocabulary 128, batch 32, float32, the whole loop body selected
(``loop=model.block``), TensorSketch m=2048 and m=8192, 2 threads.

Candidates, all on the same batch:

- ``fwd_bwd`` (the baseline): ``per_example_loss(model, batch).sum().backward()``
  with parameter gradients;
- ``per_step m=M``: ``Attributor.featurize([batch])``, per-step features (the
  query side), ``route="auto"`` (timed on the first batch, in the warm-up);
- ``summed m=M``: ``featurize([batch], summed=True)`` (the train side of the
  query-step trajectory and TracIn: step-summed gradients hashed once).

Time and peak memory are measured in separate processes (``--measure both``,
the default; see ``benchmarks/common.py``): the time run interleaves the
candidates for ``--repeats`` rounds and reports paired-median ratios to
``fwd_bwd``; the memory run reports the peak resident memory each call adds
(median of three).  The time run also stores a cProfile of one per-step
featurisation at the largest m.  Each result records the load before
and after; above ``--load-limit`` (0.5) it is marked invalid.

    python benchmarks/bench_torch_featurize.py --repeats 5   # issue configuration (a few minutes)
    python benchmarks/bench_torch_featurize.py --quick        # small configuration, seconds
    python benchmarks/bench_torch_featurize.py --device cuda --dtype bfloat16 --out r.json   # on a GPU

Results go to ``benchmarks/results/torch_featurize.json`` (``torch_featurize_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

FULL = dict(d_model=256, heads=8, tau=8, seq=128, vocab=128, batch=32, dims="2048,8192", repeats=5)
QUICK = dict(d_model=32, heads=2, tau=2, seq=16, vocab=32, batch=4, dims="256", repeats=2)
TARGETS = {"per_step_time": 1.15, "per_step_memory": 1.15, "summed_time": 1.05}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    common.add_measure_args(ap)
    for key in ("d_model", "heads", "tau", "seq", "vocab", "batch"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {FULL[key]}")
    ap.add_argument("--dims", default=None, help=f"sketch dimensions m (default {FULL['dims']})")
    ap.add_argument("--route", default="auto", choices=("auto", "exact_hash", "fft"), help="TensorSketch route")
    ap.add_argument("--device", default="cpu", help="torch device (cuda: times synchronise; memory is CUDA memory)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"), help="model dtype")
    ap.add_argument("--out", default=None, help="output JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key in ("d_model", "heads", "tau", "seq", "vocab", "batch", "dims", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.dims = [int(m) for m in str(args.dims).split(",") if m.strip()]
    return args


def candidates(args):
    """``{name: callable}``: the baseline and both featurisations at every m (one Attributor per m and side)."""
    import torch

    import sdi_core
    import sdi_torch
    from sdi_core.reference.looped_transformer import LoopedConfig
    from sdi_torch.models import LoopedGPT, per_example_loss

    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads, tau=args.tau,
                          max_len=args.seq)
    device = torch.device(args.device)
    model = LoopedGPT(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"tokens": tokens.to(device),
             "targets": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        per_example_loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
        sync()

    out = {"fwd_bwd": fwd_bwd}
    attrs = {}
    for m in args.dims:
        sketch = sdi_core.TensorSketch(dim=m, seed=0, route=args.route)
        for side, summed in (("per_step", False), ("summed", True)):
            attr = sdi_torch.Attributor(model, model.block, per_example_loss, sketch, progress=False)
            attrs[f"{side} m={m}"] = attr
            out[f"{side} m={m}"] = (lambda a=attr, s=summed: (a.featurize([batch], progress=False, summed=s), sync()))
    return out, attrs


def cuda_peak(fn) -> int:
    """CUDA memory a call allocates above what was allocated before it (bytes)."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def profile_top(fn, n=15) -> list[str]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(n)
    repo = os.path.dirname(HERE) + os.sep  # no machine paths in results
    lines = [ln.rstrip().replace(repo, "") for ln in s.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return lines[start:start + n + 1]


def measure(args, what: str) -> dict:
    info = common.setup(args.threads, memory=what == "memory")
    import torch  # noqa: F401  (after setup: OMP_WAIT_POLICY)

    common.set_torch_threads(args.threads)
    cands, attrs = candidates(args)
    for fn in cands.values():  # warm-up: route timing, hash tables, device copies, allocator
        fn()
    out: dict = {"measure": what}
    if what == "time":
        samples = common.interleaved(cands, repeats=args.repeats, warmup=1)
        out["summary"] = common.summarize(samples, "fwd_bwd")
        out["routes"] = {name: a.engine.routes() for name, a in attrs.items()}
        out["profile_top_tottime"] = profile_top(cands[f"per_step m={max(args.dims)}"])
    else:
        peak = cuda_peak if args.device.startswith("cuda") else (lambda fn: common.peak_memory(fn)[1])
        peaks = {}
        for name, fn in cands.items():
            peaks[name] = [peak(fn) for _ in range(3)]
        out["memory_kind"] = "CUDA allocated bytes" if args.device.startswith("cuda") else "resident set size"
        med = {k: (None if None in v else statistics.median(v)) for k, v in peaks.items()}
        out["peak_bytes"] = peaks
        out["peak_median_mib"] = {k: common.mib(v) for k, v in med.items()}
        base = med["fwd_bwd"]
        out["memory_ratio"] = {k: (v / base if (v is not None and base) else None) for k, v in med.items()}
    out["machine"] = common.finish_info(info)
    out["load"] = common.load_validity(out["machine"], args.load_limit)
    return out


def combine(args, argv, time_part: dict, memory_part: dict) -> dict:
    rows = []
    for m in args.dims:
        for side in ("per_step", "summed"):
            name = f"{side} m={m}"
            t = time_part["summary"][name] if time_part else None
            rows.append({"m": m, "side": side,
                         "time_ratio": None if t is None else t["ratio_paired_median"],
                         "time_ratio_min": None if t is None else t["ratio_paired_min"],
                         "time_ratio_max": None if t is None else t["ratio_paired_max"],
                         "featurize_s": None if t is None else t["median_s"],
                         "memory_ratio": None if not memory_part else memory_part["memory_ratio"][name],
                         "peak_mib": None if not memory_part else memory_part["peak_median_mib"][name]})
    parts = [p for p in (time_part, memory_part) if p]
    valid = all(p["load"]["valid"] for p in parts)
    return {
        "benchmark": "bench_torch_featurize",
        "command": common.command_line(__file__, argv),
        "config": {"d_model": args.d_model, "heads": args.heads, "tau": args.tau, "seq": args.seq,
                   "vocab": args.vocab, "batch": args.batch, "dims": args.dims, "route": args.route,
                   "repeats": args.repeats, "threads": args.threads, "dtype": args.dtype, "device": args.device,
                   "selection": "loop=model.block (whole loop body)", "quick": args.quick},
        "targets": TARGETS,
        "valid": valid,
        "rows": rows,
        "fwd_bwd_median_s": None if not time_part else time_part["summary"]["fwd_bwd"]["median_s"],
        "fwd_bwd_peak_mib": None if not memory_part else memory_part["peak_median_mib"]["fwd_bwd"],
        "time": time_part,
        "memory": memory_part,
    }


def main(argv=None) -> dict:
    args = parse(argv)
    parts = common.run_measurements(__file__, argv, args, measure)
    if parts is None:  # a child process of --measure both: its part is written
        return {}
    res = combine(args, argv, parts["time"], parts["memory"])
    out = args.out or common.results_path(args.out_dir, "torch_featurize", args.quick)
    common.write_json(out, res)
    print(common.table(res["rows"], [("m", "m", ""), ("side", "side", ""), ("time_ratio", "time / fwd+bwd", ".3f"),
                                     ("memory_ratio", "peak memory / fwd+bwd", ".3f"), ("peak_mib", "peak MiB", ".0f")]))
    print(f"targets: per-step time <= {TARGETS['per_step_time']}, memory <= {TARGETS['per_step_memory']}; "
          f"summed time <= {TARGETS['summed_time']}")
    for p in (parts["time"], parts["memory"]):
        if p:
            common.report_validity(p["load"])
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
