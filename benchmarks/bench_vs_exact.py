"""Sketched SDI against the exact full-gradient baseline: time and memory as N, tau and model size grow.

End to end, on the canonical looped GPT (``sdi_torch.models.LoopedGPT``,
float32, the loop body's 16 tensors): featurise ``N`` training examples and
``--n-query`` queries, then compute the query-step trajectory
``[N, N_query, tau]`` with :func:`sdi_core.influence`, and compare every
method's trajectory with the exact one (:func:`sdi_core.metrics.compare`:
relative error, Pearson, Spearman per query, top-k overlap).  Methods:

- ``untied``: the textbook full-gradient baseline, ``sdi_torch.untied_baseline``
  (the loop body untied into ``tau`` weight copies, per-example gradients by
  ``torch.func.vmap(grad)``), features = flattened per-step gradients;
- ``exact``: ``sdi_torch.Attributor`` with ``sdi_core.Exact()`` (the factor
  capture, per-step gradients materialised from the factors);
- ``ts<m>``: ``sdi_torch.Attributor`` with ``sdi_core.TensorSketch(dim=m)``.

All methods keep the train side summed over steps, batch by batch (all the
trajectory needs), and the query side per step.  Each method is warmed up on
one query batch (untimed: ``torch.func`` transforms, hash tables), then each
grid point runs the methods in interleaved rounds (:func:`common.interleaved`);
every call also records its peak resident memory (:func:`common.peak_memory`).  An exact
method whose features alone would exceed ``--max-exact-gib`` is not run and is
reported with that projection instead.

Three sweeps from one centre point (d_model 128, tau 4, N 256): N, tau, d_model.

    python benchmarks/bench_vs_exact.py            # default sweeps (4 minutes on 2 cores at load ~2)
    python benchmarks/bench_vs_exact.py --quick    # a few seconds
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

FULL = dict(d_model=128, tau=4, n_train=256, n_sweep="64,256,1024", tau_sweep="2,4,8,16", d_sweep="64,128,256,384",
            n_query=16, seq=16, vocab=64, batch=32, dims="2048,8192", repeats=1, max_exact_gib=3.0)
QUICK = dict(d_model=32, tau=2, n_train=8, n_sweep="8", tau_sweep="2", d_sweep="32", n_query=4, seq=8,
             vocab=16, batch=8, dims="256", repeats=1, max_exact_gib=1.0)
HEAD_DIM = 32


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_common_args(ap)
    for key, val in FULL.items():
        if key == "repeats":
            continue
        ap.add_argument("--" + key.replace("_", "-"), type=type(val), default=None,
                        help=f"default {val} (quick: {QUICK[key]})")
    ap.add_argument("--methods", default="untied,exact,ts", help="comma-separated: untied, exact, ts (sketches)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, val in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    ints = lambda s: [int(x) for x in str(s).split(",") if x.strip()]  # noqa: E731
    args.n_sweep, args.tau_sweep, args.d_sweep, args.dims = (ints(args.n_sweep), ints(args.tau_sweep),
                                                              ints(args.d_sweep), ints(args.dims))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def grid(args):
    """(sweep, d_model, tau, N) points; the centre appears once, listed under every sweep it belongs to."""
    pts = [("N", args.d_model, args.tau, n) for n in args.n_sweep]
    pts += [("tau", args.d_model, t, args.n_train) for t in args.tau_sweep]
    pts += [("d_model", d, args.tau, args.n_train) for d in args.d_sweep]
    return pts


def make_batches(n, B, T, vocab, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, B):
        tokens = torch.randint(0, vocab, (min(B, n - i), T), generator=g)
        out.append({"tokens": tokens, "targets": torch.roll(tokens, -1, dims=1)})
    return out


def pipeline(featurize_batch, train_batches, query_batches):
    """Train features summed over steps batch by batch, per-step query features, then the trajectory."""
    import sdi_core

    train = sdi_core.Features.concat([featurize_batch(b).sum_steps() for b in train_batches])
    query = sdi_core.Features.concat([featurize_batch(b) for b in query_batches])
    return sdi_core.influence(train, query).trajectory


def methods_for(args, d, tau):
    """name -> (featurize one batch, features per step, kind) for one model."""
    import torch

    import sdi_core
    import sdi_torch
    from sdi_core.reference.looped_transformer import LoopedConfig
    from sdi_torch.models import LoopedGPT, per_example_loss

    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=args.vocab, d_model=d, n_heads=max(1, d // HEAD_DIM), tau=tau, max_len=args.seq)
    model = LoopedGPT(config).float().eval()
    out = {}
    exact_width = sum(p.numel() for p in model.block.parameters())
    if "untied" in args.methods:
        out["untied"] = (lambda b: sdi_torch.untied_baseline(model, model.block, per_example_loss, [b]),
                         exact_width, "exact")
    if "exact" in args.methods:
        attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss, sketch=sdi_core.Exact(),
                                    progress=False)
        out["exact"] = (lambda b, a=attr: a.featurize([b], progress=False), exact_width, "exact")
    if "ts" in args.methods:
        for m in args.dims:
            attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss,
                                        sketch=sdi_core.TensorSketch(dim=m, seed=0), progress=False)
            out[f"ts{m}"] = (lambda b, a=attr: a.featurize([b], progress=False),
                             attr.plan.features_per_step()["loop"], "sketch")
    return out, exact_width


def main(argv=None):
    args = parse(argv)
    info = common.setup(args.threads)
    import torch  # noqa: F401

    common.set_torch_threads(args.threads)
    t_start = time.perf_counter()
    rows = []
    done = {}
    for sweep, d, tau, n in grid(args):
        key = (d, tau, n)
        if key in done:
            rows += [dict(r, sweep=sweep) for r in done[key]]
            continue
        t0 = time.perf_counter()
        meths, exact_width = methods_for(args, d, tau)
        train_b = make_batches(n, args.batch, args.seq, args.vocab, seed=1)
        query_b = make_batches(args.n_query, args.batch, args.seq, args.vocab, seed=2)
        cands, peaks, skipped, trajs = {}, {}, {}, {}
        for name, (feat, width, kind) in meths.items():
            # features held: train summed [N, width] + query [N_q, tau, width], float32
            need = 4 * width * (n + args.n_query * tau)
            if kind == "exact":
                # ... plus one batch of per-step gradients while it is being summed
                need += 4 * width * args.batch * tau
                if need > args.max_exact_gib * 2**30:
                    skipped[name] = need
                    continue

            feat(query_b[0])  # warm-up (torch.func transforms, hash tables), untimed

            def run(feat=feat, name=name):
                trajs[name], peak = common.peak_memory(lambda: pipeline(feat, train_b, query_b))
                if peak is not None:
                    peaks[name] = max(peaks.get(name, 0), peak)

            cands[name] = run
        base = "exact" if "exact" in cands else next(iter(cands))
        samples = common.interleaved(cands, repeats=args.repeats, warmup=0)
        summ = common.summarize(samples, base)
        point = []
        for name, (_, width, kind) in meths.items():
            r = {"sweep": sweep, "d_model": d, "tau": tau, "n_train": n, "method": name, "kind": kind,
                 "features_per_step": width, "exact_features_per_step": exact_width}
            if name in skipped:
                r.update(status="skipped", projected_feature_gib=skipped[name] / 2**30)
            else:
                s = summ[name]
                r.update(status="ran", seconds=s["median_s"], peak_mib=common.mib(peaks.get(name)),
                         time_vs_exact=s["ratio_paired_median"] if base == "exact" else None,
                         times_s=s["times_s"])
            point.append(r)
        add_accuracy(point, trajs)
        ex = next((r for r in point if r["method"] == "exact" and r["status"] == "ran"), None)
        for r in point:
            if ex is not None and r["status"] == "ran" and r.get("peak_mib") and ex.get("peak_mib"):
                r["memory_vs_exact"] = r["peak_mib"] / ex["peak_mib"]
        done[key] = point
        rows += point
        desc = "  ".join(f"{r['method']} " + (f"{r['seconds']:.2f}s/{common.fmt(r['peak_mib'], '.0f')}MiB"
                                              if r["status"] == "ran" else
                                              f"skipped ({r['projected_feature_gib']:.1f} GiB)") for r in point)
        print(f"d={d:<4d} tau={tau:<3d} N={n:<5d} {desc}   [{time.perf_counter() - t0:.0f} s]", flush=True)

    seen, table_rows = set(), []
    for r in rows:  # one row per (point, method): the centre point belongs to every sweep
        k = (r["d_model"], r["tau"], r["n_train"], r["method"])
        if k not in seen:
            seen.add(k)
            table_rows.append(r)
    print()
    print(common.table(table_rows, [("d_model", "d_model", ""), ("tau", "tau", ""), ("n_train", "N", ""),
                                    ("method", "method", ""), ("features_per_step", "features/step", ""),
                                    ("seconds", "seconds", ".2f"), ("time_vs_exact", "time / exact", ".2f"),
                                    ("peak_mib", "peak MiB", ".0f"), ("memory_vs_exact", "memory / exact", ".3f"),
                                    ("rel_error_trajectory", "rel. error vs exact", ".4f"),
                                    ("status", "status", "")]))
    wins = crossover(table_rows, args)
    for line in wins["lines"]:
        print(line)
    payload = {
        "benchmark": "bench_vs_exact",
        "command": common.command_line("bench_vs_exact.py", argv),
        "config": {k: getattr(args, k) for k in FULL} | {"methods": args.methods, "threads": args.threads,
                                                        "quick": args.quick, "dtype": "float32",
                                                        "head_dim": HEAD_DIM},
        "rows": rows,
        "where_sketching_wins": wins,
        "seconds": time.perf_counter() - t_start,
        "machine": common.finish_info(info),
    }
    path = common.write_json(common.results_path(args.out_dir, "vs_exact", args.quick), payload)
    png = plot(payload, common.results_path(args.out_dir, "vs_exact", args.quick, ext="png"))
    print(f"wrote {path} and {png}")
    return payload


ACCURACY_KEYS = ("rel_error_trajectory", "rel_error_tracin", "pearson_trajectory", "spearman_per_query",
                 "topk_overlap_tracin")


def add_accuracy(point, trajs):
    """Each method's trajectory against the exact one (``exact``, else ``untied``): :func:`sdi_core.metrics.compare`."""
    import numpy as np

    from sdi_core.metrics import compare

    ref = next((m for m in ("exact", "untied") if m in trajs), None)
    for r in point:
        if ref is not None and r["method"] in trajs and r["method"] != ref:
            m = compare(np.asarray(trajs[r["method"]]), np.asarray(trajs[ref]))
            r["accuracy_vs"] = ref
            r.update({k: m[k] for k in ACCURACY_KEYS})


def crossover(rows, args):
    """Per grid point, whether the smallest sketch beats the exact capture in time and in memory."""
    m0 = f"ts{min(args.dims)}" if args.dims else None
    lines, points = [], []
    for key in sorted({(r["d_model"], r["tau"], r["n_train"]) for r in rows}):
        here = {r["method"]: r for r in rows if (r["d_model"], r["tau"], r["n_train"]) == key}
        ts, ex = here.get(m0), here.get("exact")
        if ts is None or ts["status"] != "ran" or ex is None:
            continue
        p = {"d_model": key[0], "tau": key[1], "n_train": key[2]}
        if ex["status"] != "ran":
            p.update(time="exact not run (over memory budget)", memory="exact not run (over memory budget)")
        else:
            p["time_ratio"] = ts["seconds"] / ex["seconds"]
            p["memory_ratio"] = (ts["peak_mib"] / ex["peak_mib"]) if ts.get("peak_mib") and ex.get("peak_mib") else None
        points.append(p)
        if "time_ratio" in p:
            lines.append(f"d={key[0]} tau={key[1]} N={key[2]}: {m0} takes {p['time_ratio']:.2f}x the exact time and "
                         f"{common.fmt(p['memory_ratio'], '.3f')}x its peak memory")
        else:
            lines.append(f"d={key[0]} tau={key[1]} N={key[2]}: exact needs more than {args.max_exact_gib} GiB; "
                         f"{m0} ran in {ts['seconds']:.1f} s")
    return {"sketch": m0, "points": points, "lines": lines}


def plot(payload, path):
    plt = common.pyplot()
    rows = payload["rows"]
    sweeps = [s for s in ("N", "tau", "d_model") if any(r["sweep"] == s for r in rows)]
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    xkey = {"N": "n_train", "tau": "tau", "d_model": "d_model"}
    label = {"untied": "untied torch.func (exact)", "exact": "Attributor + Exact()"}
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5 * len(sweeps), 7.5), squeeze=False)
    for j, s in enumerate(sweeps):
        mine = [r for r in rows if r["sweep"] == s]
        for k, meth in enumerate(methods):
            pts = sorted((r for r in mine if r["method"] == meth and r["status"] == "ran"), key=lambda r: r[xkey[s]])
            if not pts:
                continue
            name = label.get(meth, f"TensorSketch m={meth[2:]}" if meth.startswith("ts") else meth)
            xs = [r[xkey[s]] for r in pts]
            axes[0, j].plot(xs, [r["seconds"] for r in pts], "o-", color=f"C{k}", label=name)
            axes[1, j].plot(xs, [r["peak_mib"] for r in pts], "o-", color=f"C{k}", label=name)
            skipped = [r for r in mine if r["method"] == meth and r["status"] == "skipped"]
            for r in skipped:
                axes[1, j].plot([r[xkey[s]]], [r["projected_feature_gib"] * 1024], "x", color=f"C{k}", markersize=9)
        c = payload["config"]
        fixed = {"N": f"d_model {c['d_model']}, tau {c['tau']}", "tau": f"d_model {c['d_model']}, N {c['n_train']}",
                 "d_model": f"tau {c['tau']}, N {c['n_train']}"}[s]
        for i, what in enumerate(("wall time (s)", "peak extra memory (MiB)")):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ticks = sorted({r[xkey[s]] for r in mine})
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_xlabel({"N": "training examples N", "tau": "loop steps tau", "d_model": "d_model"}[s])
            ax.set_ylabel(what)
            ax.set_title(f"{what.split(' (')[0]} vs {s} ({fixed})", fontsize=9)
            ax.legend(fontsize=7.5)
    any_skipped = any(r["status"] == "skipped" for r in rows)
    fig.suptitle(f"Featurise {payload['config']['n_query']} queries and N training examples, then the trajectory "
                 f"(float32, T={payload['config']['seq']})"
                 + ("; x: exact run skipped, its projected feature memory" if any_skipped else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
