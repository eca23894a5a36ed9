"""sdi_jax featurisation time (and peak memory) against a jitted forward+backward of the same batch.

Workload (issue 4, the torch backend's configuration): the canonical looped
transformer (:mod:`sdi_jax.models`) with ``d_model=256``, 8 heads,
``tau=8``, ``T=128``, vocabulary 128, batch 32, float32 on the CPU, the loop
body's 16 tensors TensorSketched to ``m=8192`` each.

Candidates, all jitted (compilation and route timing are in the untimed
warm-up; every call ends with ``block_until_ready``):

- ``fwd_bwd`` (the baseline): ``jax.value_and_grad`` of the summed per-example
  loss with respect to all parameters: one forward and one backward pass.
- ``featurize``: :meth:`sdi_jax.Attributor.featurize_batch`, per-step features
  (capture, per-example grad-outputs, sketch, assembly, finiteness check).
- ``summed``: the same with ``summed=True`` (the train side).

Both run for the ``lax.scan`` form of the model and (unless ``--forms scan``)
for the Python-unrolled one.  The claim is the paired median ratio
``featurize / fwd_bwd`` of the scan form (target <= 1.25).  Time and peak
memory are measured in separate processes (``--measure both``, the default);
each result records the load before and after and is marked invalid above
``--load-limit``.

Usage::

    python benchmarks/bench_jax_featurize.py --repeats 5   # the issue's configuration
    python benchmarks/bench_jax_featurize.py --quick       # a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

TARGET = 1.25


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    common.add_measure_args(ap)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dim", type=int, default=8192, help="sketch dimension m per tensor")
    ap.add_argument("--route", default="auto", choices=("auto", "exact_hash", "fft"))
    ap.add_argument("--forms", default=None, help="comma-separated: scan, unrolled (default both; --quick: scan)")
    ap.add_argument("--groups", default="loop", choices=("loop", "all"),
                    help="attribute through the loop body only (default) or every parameter")
    args = ap.parse_args(argv)
    if args.quick:  # XLA compilation dominates: one form, a tiny model
        args.d_model, args.heads, args.tau, args.seq, args.vocab, args.batch, args.dim = 32, 2, 2, 16, 32, 4, 512
    if args.forms is None:
        args.forms = "scan" if args.quick else "scan,unrolled"
    args.forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


def measure(args, what: str) -> dict:
    info = common.setup(args.threads, memory=what == "memory")
    flags = os.environ.get("XLA_FLAGS", "")
    if args.threads and "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_cpu_multi_thread_eigen=true "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
    import jax
    import numpy as np

    import sdi_core
    import sdi_jax
    from sdi_jax import models

    cfg = models.LoopedConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads, tau=args.tau,
                              max_len=args.seq)
    params = models.init_params(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq))
    batch = {"tokens": jax.numpy.asarray(tokens), "targets": jax.numpy.asarray(np.roll(tokens, -1, axis=1))}
    sketch = sdi_core.TensorSketch(dim=args.dim, seed=0, route=args.route)
    extra = None
    if args.groups == "all":
        extra = {"prelude": lambda p: {"tok_emb": p["tok_emb"], "pos_emb": p["pos_emb"]},
                 "coda": lambda p: {"ln_f": p["ln_f"], "head": p["head"]}}
    results = {}
    for form in args.forms:
        scan = form == "scan"

        def loss_fn(p, b, scan=scan):
            return models.per_example_loss(p, b, cfg, scan=scan)

        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b).sum()))
        attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], groups=extra, sketch=sketch, progress=False)
        cands = {
            "fwd_bwd": lambda: jax.block_until_ready(grad_fn(params, batch)),
            "featurize": lambda: jax.block_until_ready(attr.featurize_batch(params, batch)),
            "summed": lambda: jax.block_until_ready(attr.featurize_batch(params, batch, summed=True)),
        }
        for fn in cands.values():  # compile, time the routes
            fn()
        res: dict = {"capture_mode": attr.capture_plan(params, batch).mode,
                     "routes": attr.engine(params, batch).routes()}
        if what == "time":
            samples = common.interleaved(cands, repeats=args.repeats, warmup=1)
            res["summary"] = common.summarize(samples, "fwd_bwd")
        else:
            peaks = {name: common.peak_memory(fn)[1] for name, fn in cands.items()}
            base = peaks["fwd_bwd"]
            res["peak_mib"] = {k: common.mib(v) for k, v in peaks.items()}
            res["memory_ratio"] = {k: (v / base if (v is not None and base) else None) for k, v in peaks.items()}
        results[form] = res
    machine = common.finish_info(info)
    return {"measure": what, "results": results, "machine": machine, "load": common.load_validity(machine, args.load_limit)}


def main(argv=None) -> dict:
    args = parse(argv)
    parts = common.run_measurements(__file__, argv, args, measure)
    if parts is None:  # a child process of --measure both: its part is written
        return {}
    rows = []
    for form in args.forms:
        t = parts["time"]["results"][form]["summary"] if parts["time"] else None
        mem = parts["memory"]["results"][form]["memory_ratio"] if parts["memory"] else None
        for name in ("featurize", "summed"):
            rows.append({"form": form, "candidate": name,
                         "time_ratio": None if t is None else t[name]["ratio_paired_median"],
                         "median_s": None if t is None else t[name]["median_s"],
                         "fwd_bwd_s": None if t is None else t["fwd_bwd"]["median_s"],
                         "memory_ratio": None if mem is None else mem[name]})
    print(common.table(rows, [("form", "form", ""), ("candidate", "candidate", ""), ("fwd_bwd_s", "fwd+bwd s", ".3f"),
                              ("median_s", "featurize s", ".3f"), ("time_ratio", "time / fwd+bwd", ".2f"),
                              ("memory_ratio", "peak memory / fwd+bwd", ".2f")]))
    payload = {
        "benchmark": "bench_jax_featurize",
        "command": common.command_line("benchmarks/bench_jax_featurize.py", argv),
        "config": {"d_model": args.d_model, "n_heads": args.heads, "tau": args.tau, "seq": args.seq,
                   "vocab": args.vocab, "batch": args.batch, "sketch_dim": args.dim, "route": args.route,
                   "dtype": "float32", "groups": args.groups, "repeats": args.repeats, "threads": args.threads,
                   "forms": args.forms, "quick": args.quick},
        "target": f"featurize / fwd_bwd <= {TARGET} (paired median, lax.scan form)",
        "valid": all(p["load"]["valid"] for p in parts.values() if p),
        "rows": rows,
        "time": parts["time"],
        "memory": parts["memory"],
    }
    for p in parts.values():
        if p:
            common.report_validity(p["load"])
    path = common.write_json(common.results_path(args.out_dir, "jax_featurize", args.quick), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
