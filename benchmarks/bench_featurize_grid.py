"""Featurisation cost over a grid, torch and JAX: time and peak memory as ratios to a plain forward+backward.

For each backend, model size (d_model, heads, tau), batch size B and sketch
dimension m, the canonical looped transformer (``sdi_torch.models.LoopedGPT``
/ ``sdi_jax.models``, float32, vocabulary 128, sequence length ``--seq``) is
featurised through the whole loop body (16 tensors, TensorSketch per tensor)
on one batch of random tokens, and compared with a plain forward+backward of
the same batch in the same process:

- torch baseline: ``per_example_loss(model, batch).sum().backward()`` (parameter
  gradients included); candidate: ``sdi_torch.Attributor(model, loop=model.block,
  ...).featurize([batch])``;
- JAX baseline: ``jax.jit(jax.value_and_grad(sum of per-example losses))``;
  candidate: ``sdi_jax.Attributor(...).featurize_batch(params, batch)`` (jitted;
  the ``lax.scan`` form of the model by default, ``--jax-form unrolled`` for
  the Python-unrolled one).  Compilation happens in the untimed warm-up.

Per (backend, size, B) the baseline and the three m values are timed in
interleaved rounds (:func:`common.interleaved`); the headline ratio is the
median over rounds of featurisation time / baseline time in the same round.
Peak memory is the peak resident memory each call adds (:func:`common.peak_memory`),
measured once per candidate after the timing.  For torch, a cProfile of the
featurisation with the worst time ratio is stored.  ``--routes auto,exact_hash``
times the core's route choice against a forced route in the same rounds.

    python benchmarks/bench_featurize_grid.py            # full grid (10 minutes on 2 cores at load ~3)
    python benchmarks/bench_featurize_grid.py --quick    # a few seconds
    python benchmarks/bench_featurize_grid.py --backends torch --sizes 256:8:8 --batches 32 --dims 8192
    python benchmarks/bench_featurize_grid.py --backends torch --dims 2048 --routes auto,exact_hash \
        --name featurize_grid_torch_routes
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

FULL = dict(sizes="128:4:4,256:8:8,512:8:16", batches="8,32", dims="2048,8192,32768", seq=32, vocab=128, repeats=2)
QUICK = dict(sizes="32:2:2", batches="4", dims="256", seq=8, vocab=32, repeats=1)
TARGETS = {"torch": 1.3, "jax": 1.5}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_common_args(ap)
    ap.add_argument("--backends", default="torch,jax", help="comma-separated: torch, jax")
    ap.add_argument("--sizes", default=None, help=f"d_model:heads:tau,... (default {FULL['sizes']})")
    ap.add_argument("--batches", default=None, help=f"batch sizes (default {FULL['batches']})")
    ap.add_argument("--dims", default=None, help=f"sketch dimensions m (default {FULL['dims']})")
    ap.add_argument("--seq", type=int, default=None, help=f"sequence length (default {FULL['seq']})")
    ap.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default {FULL['vocab']})")
    ap.add_argument("--jax-form", default="scan", choices=("scan", "unrolled"), help="JAX model form (default scan)")
    ap.add_argument("--routes", default="auto",
                    help="comma-separated TensorSketch routes for outer-product uses, each timed as its own "
                         "candidate: auto (the core's cost model, default), exact_hash, fft")
    ap.add_argument("--name", default="featurize_grid", help="stem of the output files (default featurize_grid)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile of the worst torch configuration")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key in ("sizes", "batches", "dims", "seq", "vocab", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",") if s.strip()]
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    args.dims = [int(m) for m in str(args.dims).split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    for r in args.routes:
        if r not in ("auto", "exact_hash", "fft"):
            ap.error(f"unknown route {r!r}; choose from auto, exact_hash, fft")
    args.variants = [(m, r) for m in args.dims for r in args.routes]
    for b in args.backends:
        if b not in TARGETS:
            ap.error(f"unknown backend {b!r}; choose from {sorted(TARGETS)}")
    return args


# --------------------------------------------------------------------------- torch


def variant_name(m, route, routes):
    """Candidate name of sketch dimension ``m`` by ``route`` (the route only when several are compared)."""
    return f"m={m}" if len(routes) == 1 else f"m={m} {route}"


def torch_candidates(d, heads, tau, B, variants, seq, vocab):
    """(baseline, {m: featurize callable}, profile target factory) for one torch configuration."""
    import torch

    import sdi_core
    import sdi_torch
    from sdi_core.reference.looped_transformer import LoopedConfig
    from sdi_torch.models import LoopedGPT, per_example_loss

    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=vocab, d_model=d, n_heads=heads, tau=tau, max_len=seq)
    model = LoopedGPT(config).float().eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (B, seq), generator=g)
    batch = {"tokens": tokens, "targets": torch.roll(tokens, -1, dims=1)}

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        per_example_loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    feats = {}
    for m, route in variants:
        attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss,
                                    sketch=sdi_core.TensorSketch(dim=m, seed=0, route=route), progress=False)
        feats[(m, route)] = (lambda a=attr: a.featurize([batch], progress=False))
    return fwd_bwd, feats


# ----------------------------------------------------------------------------- jax


def jax_candidates(d, heads, tau, B, variants, seq, vocab, form="scan"):
    import jax
    import numpy as np

    import sdi_core
    import sdi_jax
    from sdi_jax import models

    config = models.LoopedConfig(vocab_size=vocab, d_model=d, n_heads=heads, tau=tau, max_len=seq)
    params = models.init_params(config, seed=0, dtype=np.float32)
    tokens = np.random.default_rng(1).integers(0, vocab, (B, seq))
    batch = {"tokens": jax.numpy.asarray(tokens), "targets": jax.numpy.asarray(np.roll(tokens, -1, axis=1))}
    scan = form == "scan"

    def loss_fn(p, b):
        return models.per_example_loss(p, b, config, scan=scan)

    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b).sum()))

    def fwd_bwd():
        jax.block_until_ready(grad_fn(params, batch))

    feats = {}
    for m, route in variants:
        attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"],
                                  sketch=sdi_core.TensorSketch(dim=m, seed=0, route=route), progress=False)
        feats[(m, route)] = (lambda a=attr: jax.block_until_ready(a.featurize_batch(params, batch)))
    return fwd_bwd, feats


# ---------------------------------------------------------------------------- main


def profile_top(fn, n=15):
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(n)
    root = os.path.dirname(HERE) + os.sep
    # Paths relative to the repository (and to the Python library folder): results must not name this machine's folders.
    lines = [re.sub(r"/\S*/lib/python\d+\.\d+/", "", ln.rstrip().replace(root, ""))
             for ln in s.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return lines[start:start + n + 1]


def main(argv=None):
    args = parse(argv)
    info = common.setup(args.threads)
    if "jax" in args.backends:
        flags = os.environ.get("XLA_FLAGS", "")
        if args.threads and "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (flags + f" --xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={args.threads}").strip()
    if "torch" in args.backends:
        import torch  # noqa: F401

        common.set_torch_threads(args.threads)
    t_start = time.perf_counter()
    rows = []
    profiles = {}
    for backend in args.backends:
        worst = None
        for d, heads, tau in args.sizes:
            for B in args.batches:
                t0 = time.perf_counter()
                if backend == "torch":
                    base, feats = torch_candidates(d, heads, tau, B, args.variants, args.seq, args.vocab)
                else:
                    base, feats = jax_candidates(d, heads, tau, B, args.variants, args.seq, args.vocab, args.jax_form)
                name = {v: variant_name(*v, args.routes) for v in feats}
                cands = {"fwd_bwd": base, **{name[v]: f for v, f in feats.items()}}
                samples = common.interleaved(cands, repeats=args.repeats, warmup=1)
                summ = common.summarize(samples, "fwd_bwd")
                _, mem_base = common.peak_memory(base)
                for (m, route), f in feats.items():
                    _, mem = common.peak_memory(f)
                    s = summ[name[(m, route)]]
                    row = {"backend": backend, "d_model": d, "heads": heads, "tau": tau, "batch": B, "m": m,
                           "route": route,
                           "seq": args.seq, "fwd_bwd_s": summ["fwd_bwd"]["median_s"], "featurize_s": s["median_s"],
                           "time_ratio": s["ratio_paired_median"], "time_ratio_min": s["ratio_paired_min"],
                           "time_ratio_max": s["ratio_paired_max"], "time_ratio_best": s["ratio_best"],
                           "fwd_bwd_peak_mib": common.mib(mem_base), "featurize_peak_mib": common.mib(mem),
                           "memory_ratio": (mem / mem_base) if (mem is not None and mem_base) else None,
                           "samples_s": {"fwd_bwd": samples["fwd_bwd"], "featurize": samples[name[(m, route)]]}}
                    rows.append(row)
                    if backend == "torch" and (worst is None or row["time_ratio"] > worst[0]):
                        worst = (row["time_ratio"], (d, heads, tau, B, m, route))
                    print(f"{backend:5s} d={d:<4d} tau={tau:<3d} B={B:<3d} {name[(m, route)]:<18s} fwd+bwd {row['fwd_bwd_s']:8.3f} s  "
                          f"featurize {row['featurize_s']:8.3f} s  ratio {row['time_ratio']:6.2f}  "
                          f"peak {common.fmt(row['featurize_peak_mib'], '.0f')} / "
                          f"{common.fmt(row['fwd_bwd_peak_mib'], '.0f')} MiB", flush=True)
                print(f"  ({time.perf_counter() - t0:.0f} s for this configuration)", flush=True)
                del base, feats, cands
        if backend == "torch" and worst is not None and not args.no_profile:
            d, heads, tau, B, m, route = worst[1]
            _, feats = torch_candidates(d, heads, tau, B, [(m, route)], args.seq, args.vocab)
            feats[(m, route)]()
            profiles["torch"] = {"config": {"d_model": d, "heads": heads, "tau": tau, "batch": B, "m": m,
                                            "route": route, "time_ratio": worst[0]},
                                 "top_tottime": profile_top(feats[(m, route)])}

    cols = [("backend", "backend", ""), ("d_model", "d_model", ""), ("tau", "tau", ""), ("batch", "B", ""),
            ("m", "m", ""), ("route", "route", ""), ("fwd_bwd_s", "fwd+bwd s", ".3f"), ("featurize_s", "featurize s", ".3f"),
            ("time_ratio", "time ratio", ".2f"), ("fwd_bwd_peak_mib", "fwd+bwd peak MiB", ".0f"),
            ("featurize_peak_mib", "featurize peak MiB", ".0f"), ("memory_ratio", "memory ratio", ".2f")]
    print()
    print(common.table(rows, cols))
    for b in args.backends:
        mine = [r for r in rows if r["backend"] == b]
        met = sum(r["time_ratio"] <= TARGETS[b] for r in mine)
        print(f"{b}: {met}/{len(mine)} configurations within the {TARGETS[b]}x time goal")
    payload = {
        "benchmark": "bench_featurize_grid",
        "command": common.command_line("bench_featurize_grid.py", argv),
        "config": {"sizes": [list(s) for s in args.sizes], "batches": args.batches, "dims": args.dims,
                   "seq": args.seq, "vocab": args.vocab, "repeats": args.repeats, "threads": args.threads,
                   "jax_form": args.jax_form, "routes": args.routes, "dtype": "float32",
                   "selection": "loop body (16 tensors)",
                   "quick": args.quick},
        "targets": {"torch_time_ratio": TARGETS["torch"], "jax_time_ratio": TARGETS["jax"]},
        "rows": rows,
        "profiles": profiles,
        "seconds": time.perf_counter() - t_start,
        "machine": common.finish_info(info),
    }
    path = common.write_json(common.results_path(args.out_dir, args.name, args.quick), payload)
    png = plot(payload, common.results_path(args.out_dir, args.name, args.quick, ext="png"))
    print(f"wrote {path} and {png}")
    return payload


def plot(payload, path):
    plt = common.pyplot()
    rows = payload["rows"]
    backends = [b for b in ("torch", "jax") if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(2, len(backends), figsize=(max(8, 6 * len(backends)), 7.8), squeeze=False)
    routes = payload["config"].get("routes", ["auto"])
    variants = [(m, rt) for m in payload["config"]["dims"] for rt in routes]
    for j, b in enumerate(backends):
        mine = [r for r in rows if r["backend"] == b]
        configs = sorted({(r["d_model"], r["tau"], r["batch"]) for r in mine})
        width = 0.8 / max(1, len(variants))
        for k, (m, rt) in enumerate(variants):
            xs, tr, mr = [], [], []
            for i, c in enumerate(configs):
                r = next((r for r in mine if (r["d_model"], r["tau"], r["batch"]) == c and r["m"] == m
                          and r.get("route", "auto") == rt), None)
                if r is None:
                    continue
                xs.append(i + (k - (len(variants) - 1) / 2) * width)
                tr.append(r["time_ratio"])
                mr.append(r["memory_ratio"] if r["memory_ratio"] is not None else float("nan"))
            label = f"m = {m}" if len(routes) == 1 else f"m = {m}, route {rt}"
            axes[0, j].bar(xs, tr, width, label=label)
            axes[1, j].bar(xs, mr, width, label=label)
        labels = [f"d{d} tau{t}\nB={bsz}" for d, t, bsz in configs]
        for i, (ax, what) in enumerate(((axes[0, j], "time"), (axes[1, j], "peak memory"))):
            ax.axhline(1.0, color="k", lw=0.8)
            if what == "time":
                ax.axhline(TARGETS[b], color="r", ls="--", lw=1, label=f"goal {TARGETS[b]}x")
            ax.set_xticks(range(len(configs)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylabel(f"featurize / fwd+bwd ({what})")
            ax.set_title(f"{b}: {what} ratio (paired median)" if what == "time" else f"{b}: {what} ratio")
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
            ax.legend(fontsize=7.5, ncol=2 if len(variants) > 2 else 1, loc="upper left")
    fig.suptitle(f"Featurisation cost relative to a plain forward+backward of the same batch\n"
                 f"(T={payload['config']['seq']}, float32, {payload['config']['threads']} threads, "
                 f"route {', '.join(routes)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
