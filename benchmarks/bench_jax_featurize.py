"""sdi_jax featurisation time against a jitted forward+backward of the same batch.

Workload (issue 4, the torch backend's configuration): the canonical looped
transformer (:mod:`sdi_jax.models`) with ``d_model=256``, 8 heads,
``tau=8``, ``T=128``, vocabulary 128, batch 32, float32 on the CPU, the loop
body's 16 tensors TensorSketched to ``m=8192`` each.

Candidates, all jitted, measured in the same process in interleaved rounds
(:func:`common.interleaved`; compilation is in the untimed warm-up and every
call ends with ``block_until_ready``):

- ``fwd_bwd`` (the baseline): ``jax.value_and_grad`` of the summed per-example
  loss with respect to all parameters: one forward and one backward pass.
- ``featurize``: :meth:`sdi_jax.Attributor.featurize_batch`, the whole
  per-batch featurisation (capture, per-example grad-outputs, sketch, per-step
  assembly, finiteness check) of the same batch.

Both run for the Python-unrolled model and for its ``lax.scan`` form.  The
claim is the paired median ratio ``featurize / fwd_bwd`` (target <= 1.5).

Usage::

    python benchmarks/bench_jax_featurize.py            # the issue's configuration
    python benchmarks/bench_jax_featurize.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dim", type=int, default=8192, help="sketch dimension m per tensor")
    ap.add_argument("--forms", default=None,
                    help="comma-separated: unrolled, scan (default both; --quick: unrolled only)")
    ap.add_argument("--groups", default="loop", choices=("loop", "all"),
                    help="attribute through the loop body only (default) or every parameter")
    args = ap.parse_args(argv)
    if args.quick:  # XLA compilation dominates: one form, a tiny model
        args.d_model, args.heads, args.tau, args.seq, args.vocab, args.batch, args.dim = 32, 2, 2, 16, 32, 4, 512
    if args.forms is None:
        args.forms = "unrolled" if args.quick else "unrolled,scan"
    repeats = args.repeats or (2 if args.quick else 5)
    info = common.setup(args.threads)
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
    sketch = sdi_core.TensorSketch(dim=args.dim, seed=0)
    extra = None
    if args.groups == "all":
        extra = {"prelude": lambda p: {"tok_emb": p["tok_emb"], "pos_emb": p["pos_emb"]},
                 "coda": lambda p: {"ln_f": p["ln_f"], "head": p["head"]}}

    rows = []
    results = {}
    for form in [f.strip() for f in args.forms.split(",") if f.strip()]:
        scan = form == "scan"

        def loss_fn(p, b, scan=scan):
            return models.per_example_loss(p, b, cfg, scan=scan)

        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b).sum()))
        attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], extra=extra, sketch=sketch, progress=False)

        def fwd_bwd():
            jax.block_until_ready(grad_fn(params, batch))

        def featurize():
            jax.block_until_ready(attr.featurize_batch(params, batch))

        samples = common.interleaved({"fwd_bwd": fwd_bwd, "featurize": featurize}, repeats=repeats, warmup=1)
        summary = common.summarize(samples, "fwd_bwd")
        cap = attr.capture_plan(params, batch)
        kinds: dict = {}
        for s in cap.sites:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        results[form] = {"summary": summary, "capture_mode": cap.mode, "steps": cap.steps, "site_kinds": kinds,
                         "features_per_step": attr.sketch_plan(params, batch).features_per_step()}
        rows.append({"form": form, "fwd_bwd": summary["fwd_bwd"]["median_s"],
                     "featurize": summary["featurize"]["median_s"],
                     "ratio": summary["featurize"]["ratio_paired_median"]})

    print(common.table(rows, [("form", "form", ""), ("fwd_bwd", "fwd+bwd median s", ".3f"),
                              ("featurize", "featurize median s", ".3f"),
                              ("ratio", "featurize / fwd+bwd (paired median)", ".2f")]))
    payload = {
        "benchmark": "bench_jax_featurize",
        "command": common.command_line("benchmarks/bench_jax_featurize.py", argv),
        "config": {"d_model": args.d_model, "n_heads": args.heads, "tau": args.tau, "seq": args.seq,
                   "vocab": args.vocab, "batch": args.batch, "sketch_dim": args.dim, "dtype": "float32",
                   "groups": args.groups, "repeats": repeats, "threads": args.threads, "quick": args.quick},
        "target": "featurize / fwd_bwd <= 1.5 (paired median)",
        "results": results,
        "machine": common.finish_info(info),
    }
    path = common.write_json(common.results_path(args.out_dir, "jax_featurize", args.quick), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
