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

Candidates per (backend, size, B), for every m: ``auto`` (per-step features,
``route="auto"``: routes timed on the first batch, in the warm-up),
``summed`` (``summed=True``, the train side, route auto) and every forced
route of ``--routes`` (per-step; default ``exact_hash,fft``).  They are timed
in interleaved rounds with the baseline (:func:`common.interleaved`); the
headline ratio is the median over rounds of featurisation time / baseline
time in the same round.  ``auto_vs_best_forced`` is the median time of
``auto`` over the best median time of the forced routes (target <= 1.05).
Peak memory (:func:`common.peak_memory`) is measured in a separate process
(``--measure both``, the default), for the baseline, ``auto`` and ``summed``.
For torch, the time run stores a cProfile of the featurisation with the
worst time ratio.  Each run records the load before and after and is marked
invalid above ``--load-limit``.

    python benchmarks/bench_featurize_grid.py            # full grid, both backends (about an hour on 2 cores)
    python benchmarks/bench_featurize_grid.py --quick    # seconds
    python benchmarks/bench_featurize_grid.py --backends torch --sizes 256:8:8 --batches 32 --dims 8192
    python benchmarks/bench_featurize_grid.py --routes "" # no forced-route candidates (a third of the time)
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
QUICK = dict(sizes="32:2:2", batches="4", dims="256", seq=8, vocab=32, repeats=1, routes="exact_hash")
TARGETS = {"torch": 1.5, "jax": 1.5}
ROUTE_TARGET = 1.05  # auto within this factor of the best forced route


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_common_args(ap)
    common.add_measure_args(ap)
    ap.add_argument("--backends", default="torch,jax", help="comma-separated: torch, jax")
    ap.add_argument("--sizes", default=None, help=f"d_model:heads:tau,... (default {FULL['sizes']})")
    ap.add_argument("--batches", default=None, help=f"batch sizes (default {FULL['batches']})")
    ap.add_argument("--dims", default=None, help=f"sketch dimensions m (default {FULL['dims']})")
    ap.add_argument("--seq", type=int, default=None, help=f"sequence length (default {FULL['seq']})")
    ap.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default {FULL['vocab']})")
    ap.add_argument("--jax-form", default="scan", choices=("scan", "unrolled"), help="JAX model form (default scan)")
    ap.add_argument("--routes", default=None,
                    help="comma-separated forced routes timed beside route=auto (per-step features): exact_hash, "
                         "fft (default both, --quick: exact_hash; \"\" for none)")
    ap.add_argument("--name", default="featurize_grid", help="stem of the output files (default featurize_grid)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile of the worst torch configuration")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    if args.routes is None:
        args.routes = base.get("routes", "exact_hash,fft")
    for key in ("sizes", "batches", "dims", "seq", "vocab", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",") if s.strip()]
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    args.dims = [int(m) for m in str(args.dims).split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    for r in args.routes:
        if r not in ("exact_hash", "fft"):
            ap.error(f"unknown forced route {r!r}; choose from exact_hash, fft")
    # (m, route, summed): auto per-step, auto summed, each forced route per-step
    args.variants = [(m, r, summed) for m in args.dims
                     for r, summed in [("auto", False), ("auto", True)] + [(r, False) for r in args.routes]]
    for b in args.backends:
        if b not in TARGETS:
            ap.error(f"unknown backend {b!r}; choose from {sorted(TARGETS)}")
    return args


# --------------------------------------------------------------------------- torch


def variant_name(m, route, summed):
    """Candidate name: ``m=M auto``, ``m=M summed`` or ``m=M <forced route>``."""
    return f"m={m} {'summed' if summed else route}"


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
    for m, route, summed in variants:
        attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss,
                                    sketch=sdi_core.TensorSketch(dim=m, seed=0, route=route), progress=False)
        feats[(m, route, summed)] = (lambda a=attr, s=summed: a.featurize([batch], progress=False, summed=s))
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
    for m, route, summed in variants:
        attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"],
                                  sketch=sdi_core.TensorSketch(dim=m, seed=0, route=route), progress=False)
        feats[(m, route, summed)] = (lambda a=attr, s=summed: jax.block_until_ready(
            a.featurize_batch(params, batch, summed=s)))
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


def measure(args, what: str) -> dict:
    """One process's measurements: ``what`` is ``"time"`` or ``"memory"``."""
    info = common.setup(args.threads, memory=what == "memory")
    if "jax" in args.backends:
        flags = os.environ.get("XLA_FLAGS", "")
        if args.threads and "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (flags + f" --xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={args.threads}").strip()
    if "torch" in args.backends:
        import torch  # noqa: F401

        common.set_torch_threads(args.threads)
    t_start = time.perf_counter()
    rows, profiles = [], {}
    for backend in args.backends:
        worst = None
        for d, heads, tau in args.sizes:
            for B in args.batches:
                t0 = time.perf_counter()
                make = torch_candidates if backend == "torch" else jax_candidates
                extra = () if backend == "torch" else (args.jax_form,)
                variants = args.variants if what == "time" else [v for v in args.variants if v[1] == "auto"]
                base, feats = make(d, heads, tau, B, variants, args.seq, args.vocab, *extra)
                names = {v: variant_name(*v) for v in feats}
                cands = {"fwd_bwd": base, **{names[v]: f for v, f in feats.items()}}
                for fn in cands.values():  # compile, time the routes (route="auto"), hash tables
                    fn()
                key = {"backend": backend, "d_model": d, "heads": heads, "tau": tau, "batch": B, "seq": args.seq}
                if what == "time":
                    samples = common.interleaved(cands, repeats=args.repeats, warmup=0)
                    summ = common.summarize(samples, "fwd_bwd")
                    for m in args.dims:
                        row = dict(key, m=m, fwd_bwd_s=summ["fwd_bwd"]["median_s"])
                        for (mm, route, summed), name in names.items():
                            if mm != m:
                                continue
                            label = "summed" if summed else route
                            row[f"{label}_s"] = summ[name]["median_s"]
                            row[f"{label}_time_ratio"] = summ[name]["ratio_paired_median"]
                            row[f"{label}_time_ratio_range"] = [summ[name]["ratio_paired_min"],
                                                                summ[name]["ratio_paired_max"]]
                        forced = [row[f"{r}_s"] for r in args.routes]
                        row["time_ratio"] = row["auto_time_ratio"]
                        row["auto_vs_best_forced"] = row["auto_s"] / min(forced) if forced else None
                        row["samples_s"] = {n: samples[n] for n in samples if n == "fwd_bwd" or n.startswith(f"m={m} ")}
                        rows.append(row)
                        if backend == "torch" and (worst is None or row["time_ratio"] > worst[0]):
                            worst = (row["time_ratio"], (d, heads, tau, B, m))
                        print(f"{backend:5s} d={d:<4d} tau={tau:<3d} B={B:<3d} m={m:<6d} auto {row['auto_time_ratio']:5.2f}x"
                              f"  summed {row['summed_time_ratio']:5.2f}x  auto/best forced "
                              f"{common.fmt(row['auto_vs_best_forced'], '.2f')}", flush=True)
                else:
                    _, mem_base = common.peak_memory(base)
                    for m in args.dims:
                        row = dict(key, m=m, fwd_bwd_peak_mib=common.mib(mem_base))
                        for label, v in (("auto", (m, "auto", False)), ("summed", (m, "auto", True))):
                            _, mem = common.peak_memory(feats[v])
                            row[f"{label}_peak_mib"] = common.mib(mem)
                            row[f"{label}_memory_ratio"] = (mem / mem_base) if (mem is not None and mem_base) else None
                        row["memory_ratio"] = row["auto_memory_ratio"]
                        rows.append(row)
                        print(f"{backend:5s} d={d:<4d} tau={tau:<3d} B={B:<3d} m={m:<6d} peak "
                              f"{common.fmt(row['auto_peak_mib'], '.0f')} (summed {common.fmt(row['summed_peak_mib'], '.0f')})"
                              f" / {common.fmt(row['fwd_bwd_peak_mib'], '.0f')} MiB", flush=True)
                print(f"  ({time.perf_counter() - t0:.0f} s for this configuration, {what})", flush=True)
                del base, feats, cands
        if what == "time" and backend == "torch" and worst is not None and not args.no_profile:
            d, heads, tau, B, m = worst[1]
            _, feats = torch_candidates(d, heads, tau, B, [(m, "auto", False)], args.seq, args.vocab)
            fn = feats[(m, "auto", False)]
            fn()
            profiles["torch"] = {"config": {"d_model": d, "heads": heads, "tau": tau, "batch": B, "m": m,
                                            "route": "auto", "time_ratio": worst[0]}, "top_tottime": profile_top(fn)}
    machine = common.finish_info(info)
    return {"measure": what, "rows": rows, "profiles": profiles, "seconds": time.perf_counter() - t_start,
            "machine": machine, "load": common.load_validity(machine, args.load_limit)}


def merge(time_part, memory_part) -> list[dict]:
    """Rows of the time run joined with the memory run's (by backend, size, batch and m)."""
    def key(r):
        return (r["backend"], r["d_model"], r["heads"], r["tau"], r["batch"], r["m"])

    mem = {key(r): r for r in (memory_part or {}).get("rows", [])}
    base = (time_part or memory_part)["rows"]
    out = []
    for r in base:
        row = dict(r)
        if time_part:
            for k, v in mem.get(key(r), {}).items():
                row.setdefault(k, v)
        out.append(row)
    return out


def main(argv=None):
    args = parse(argv)
    parts = common.run_measurements(__file__, argv, args, measure)
    if parts is None:  # a child process of --measure both: its part is written
        return {}
    rows = merge(parts["time"], parts["memory"])
    cols = [("backend", "backend", ""), ("d_model", "d_model", ""), ("tau", "tau", ""), ("batch", "B", ""),
            ("m", "m", ""), ("fwd_bwd_s", "fwd+bwd s", ".3f"), ("time_ratio", "auto", ".2f"),
            ("summed_time_ratio", "summed", ".2f"), ("auto_vs_best_forced", "auto / best forced", ".2f"),
            ("memory_ratio", "memory", ".2f"), ("summed_memory_ratio", "memory summed", ".2f")]
    print()
    print(common.table(rows, cols))
    for b in args.backends:
        mine = [r for r in rows if r["backend"] == b and r.get("time_ratio") is not None]
        if mine:
            met = sum(r["time_ratio"] <= TARGETS[b] for r in mine)
            near = sum(r["auto_vs_best_forced"] is not None and r["auto_vs_best_forced"] <= ROUTE_TARGET for r in mine)
            print(f"{b}: {met}/{len(mine)} configurations within the {TARGETS[b]}x time goal; route auto within "
                  f"{ROUTE_TARGET}x of the best forced route at {near}/{len(mine)}")
    for p in parts.values():
        if p:
            common.report_validity(p["load"])
    payload = {
        "benchmark": "bench_featurize_grid",
        "command": common.command_line("bench_featurize_grid.py", argv),
        "config": {"sizes": [list(s) for s in args.sizes], "batches": args.batches, "dims": args.dims,
                   "seq": args.seq, "vocab": args.vocab, "repeats": args.repeats, "threads": args.threads,
                   "jax_form": args.jax_form, "forced_routes": args.routes, "dtype": "float32",
                   "selection": "loop body (16 tensors)", "quick": args.quick},
        "targets": {"torch_time_ratio": TARGETS["torch"], "jax_time_ratio": TARGETS["jax"],
                    "auto_vs_best_forced": ROUTE_TARGET},
        "valid": all(p["load"]["valid"] for p in parts.values() if p),
        "rows": rows,
        "profiles": (parts["time"] or {}).get("profiles", {}),
        "time": None if not parts["time"] else {k: v for k, v in parts["time"].items() if k != "rows"},
        "memory": None if not parts["memory"] else {k: v for k, v in parts["memory"].items() if k != "rows"},
    }
    path = common.write_json(common.results_path(args.out_dir, args.name, args.quick), payload)
    png = plot(payload, common.results_path(args.out_dir, args.name, args.quick, ext="png"))
    print(f"wrote {path} and {png}")
    return payload


def plot(payload, path):
    """Time (auto, summed) and peak-memory ratios per configuration and m, one column per backend."""
    plt = common.pyplot()
    rows = payload["rows"]
    backends = [b for b in ("torch", "jax") if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(2, len(backends), figsize=(max(8, 6 * len(backends)), 7.8), squeeze=False)
    dims = payload["config"]["dims"]
    series = [("time_ratio", "auto"), ("summed_time_ratio", "summed")]
    for j, b in enumerate(backends):
        mine = [r for r in rows if r["backend"] == b]
        configs = sorted({(r["d_model"], r["tau"], r["batch"]) for r in mine})
        for i, (ax, metrics, what) in enumerate(((axes[0, j], series, "time"),
                                                  (axes[1, j], [("memory_ratio", "auto"),
                                                                ("summed_memory_ratio", "summed")], "peak memory"))):
            variants = [(m, key, label) for m in dims for key, label in metrics]
            width = 0.8 / max(1, len(variants))
            for k, (m, key, label) in enumerate(variants):
                xs, ys = [], []
                for c_i, c in enumerate(configs):
                    r = next((r for r in mine if (r["d_model"], r["tau"], r["batch"]) == c and r["m"] == m), None)
                    v = None if r is None else r.get(key)
                    xs.append(c_i + (k - (len(variants) - 1) / 2) * width)
                    ys.append(float("nan") if v is None else v)
                ax.bar(xs, ys, width, label=f"m = {m}, {label}")
            ax.axhline(1.0, color="k", lw=0.8)
            if what == "time":
                ax.axhline(TARGETS[b], color="r", ls="--", lw=1, label=f"goal {TARGETS[b]}x")
            ax.set_xticks(range(len(configs)))
            ax.set_xticklabels([f"d{d} tau{t}\nB={bsz}" for d, t, bsz in configs], fontsize=8)
            ax.set_ylabel(f"featurize / fwd+bwd ({what})")
            ax.set_title(f"{b}: {what} ratio" + (" (paired median)" if what == "time" else ""))
            top = ax.get_ylim()[1]
            ax.set_ylim(0, (top if top == top else 2.0) * 1.3)  # room for the legend
            ax.legend(fontsize=7, ncol=2, loc="upper left")
    valid = "" if payload.get("valid") else "  [INVALID: taken under load]"
    fig.suptitle(f"Featurisation cost relative to a plain forward+backward of the same batch{valid}\n"
                 f"(T={payload['config']['seq']}, float32, {payload['config']['threads']} threads, route auto)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
