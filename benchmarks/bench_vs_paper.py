"""sdi_torch against the paper's published implementation, side by side in one process.

The paper's implementation is the PyPI package ``step-decomposed-influence``
(import name ``sdi``; it needs ``opacus``).  It is installed only to run this
script and is never a dependency of this library::

    pip install step-decomposed-influence opacus

When it is absent the script says so, reports the paper comparison as
SKIPPED, and still measures this library against the forward+backward
baseline.

Two parts, on the canonical looped GPT (``sdi_torch.models.LoopedGPT``),
the whole loop body selected (16 tensors, each sketched to ``m`` numbers per
step by both implementations):

1. **Cost** (float32, ``--d-model``/``--tau``/``--seq``/``--batch``, default
   the issue-3 configuration d_model=256, 8 heads, tau=8, T=128, vocabulary
   128, batch 32): per-batch featurisation time of
   ``sdi_torch.Attributor(...).featurize`` and of the paper's
   ``ProjectedTracInSDI(...).featurize_loader`` at each ``m``, and a plain
   forward+backward, all timed in interleaved rounds
   (:func:`common.interleaved`); the ratios are paired medians.  Peak memory
   (:func:`common.peak_memory`) is measured in the first, untimed call of
   each candidate, so one-time allocations (hash tables) count towards it.
   The paper's estimator runs on its own deep copy of the model, because its
   backward hooks stay registered and would slow down every other candidate.
2. **Accuracy** (a smaller model, ``--acc-d-model``, so that exact SDI is
   affordable): the query-step trajectory and TracIn of both sketches
   against exact SDI (``sdi_core.Exact()`` on the float64 model), over
   several seeds: relative Frobenius error and Pearson correlation.

    python benchmarks/bench_vs_paper.py            # default (4 minutes on 2 cores at load ~2)
    python benchmarks/bench_vs_paper.py --quick    # a few seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

PAPER_PACKAGE = "step-decomposed-influence"
INSTALL_HINT = f"pip install {PAPER_PACKAGE} opacus"

FULL = dict(d_model=256, heads=8, tau=8, seq=128, vocab=128, batch=32, dims="2048,8192", repeats=2,
            acc_d_model=128, acc_heads=4, acc_tau=4, acc_seq=16, acc_vocab=32, acc_n_train=64, acc_n_query=16,
            acc_seeds=3)
QUICK = dict(d_model=32, heads=2, tau=2, seq=8, vocab=32, batch=4, dims="256", repeats=1,
             acc_d_model=32, acc_heads=2, acc_tau=2, acc_seq=8, acc_vocab=16, acc_n_train=8, acc_n_query=4,
             acc_seeds=1)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_common_args(ap)
    for key, val in FULL.items():
        if key == "repeats":
            continue
        ap.add_argument("--" + key.replace("_", "-"), type=type(val), default=None,
                        help=f"default {val} (quick: {QUICK[key]})")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, val in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    args.dims = [int(m) for m in str(args.dims).split(",") if m.strip()]
    return args


def load_paper():
    """``(module, version)`` of the paper's package, or ``(None, reason)`` when it cannot be imported."""
    try:
        import sdi as paper  # the paper's package; this library never imports it elsewhere
    except ImportError as exc:
        return None, f"not installed ({exc.__class__.__name__}: {exc})"
    try:
        from importlib.metadata import version

        ver = version(PAPER_PACKAGE)
    except Exception:  # noqa: BLE001 - an `sdi` module that is not the paper's package
        return None, f"an `sdi` module was found but the distribution {PAPER_PACKAGE!r} is not installed"
    if not hasattr(paper, "ProjectedTracInSDI"):
        return None, f"`sdi` {ver} has no ProjectedTracInSDI"
    return paper, ver


# ------------------------------------------------------------------------- helpers


def make_batch(B, T, vocab, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    return {"tokens": tokens, "targets": torch.roll(tokens, -1, dims=1)}


def ours_featurizer(model, m, seed):
    import sdi_core
    import sdi_torch
    from sdi_torch.models import per_example_loss

    attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss,
                                sketch=sdi_core.TensorSketch(dim=m, seed=seed), progress=False)
    return lambda batches: attr.featurize(batches, progress=False)


def paper_featurizer(paper, model, m, seed):
    """The paper's projected estimator on ``model`` (give it its own copy: its hooks stay registered)."""
    from sdi_torch.models import per_example_loss

    est = paper.ProjectedTracInSDI(model=model, target_modules=model.block, projection_size=m, seed=seed,
                                   loss_reduction="sum")
    return est, (lambda batches: est.featurize_loader(loader=batches, loss_fn=per_example_loss))


def paper_trajectory(train_fs, query_fs):
    """Query-step trajectory ``[N_train, N_query, S]`` from the paper's FeatureSets (NumPy float64)."""
    import numpy as np

    names = sorted(train_fs.phi)
    tr = np.concatenate([train_fs.phi[n].double().numpy() for n in names], axis=-1).sum(axis=1)
    q = np.concatenate([query_fs.phi[n].double().numpy() for n in names], axis=-1)
    return np.einsum("id,jtd->ijt", tr, q)


ERROR_KEYS = ("rel_error_trajectory", "rel_error_tracin", "pearson_trajectory", "pearson_tracin")


def errors(est, exact):
    """The accuracy figures of this comparison, from :func:`sdi_core.metrics.compare` (one set of names)."""
    from sdi_core.metrics import compare

    m = compare(est, exact)
    return {k: m[k] for k in ERROR_KEYS}


# ---------------------------------------------------------------------------- cost


def cost(args, paper):
    import torch

    from sdi_core.reference.looped_transformer import LoopedConfig
    from sdi_torch.models import LoopedGPT, per_example_loss

    torch.manual_seed(0)
    config = LoopedConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads, tau=args.tau,
                          max_len=args.seq)
    model = LoopedGPT(config).float().eval()
    batch = make_batch(args.batch, args.seq, args.vocab, seed=1)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        per_example_loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)

    cands = {"fwd_bwd": fwd_bwd}
    closers = []
    for m in args.dims:
        f = ours_featurizer(model, m, seed=0)
        cands[f"sdi_torch m={m}"] = (lambda f=f: f([batch]))
        if paper is not None:
            twin = copy.deepcopy(model)
            est, g = paper_featurizer(paper, twin, m, seed=0)
            closers.append(est)

            def run(g=g, twin=twin):
                g([batch])
                twin.zero_grad(set_to_none=True)  # the paper's estimator leaves parameter .grad behind

            cands[f"paper m={m}"] = run
    mem = {}
    for name, fn in cands.items():  # the first call of each: peak memory, and the warm-up of the timing
        _, mem[name] = common.peak_memory(fn)
    samples = common.interleaved(cands, repeats=args.repeats, warmup=0)
    summ = common.summarize(samples, "fwd_bwd")
    for est in closers:
        est.close()
    rows = []
    for name, s in summ.items():
        impl, _, mpart = name.partition(" m=")
        rows.append({"candidate": name, "implementation": impl, "m": int(mpart) if mpart else None,
                     "median_s": s["median_s"], "best_s": s["best_s"], "ratio_to_fwd_bwd": s["ratio_paired_median"],
                     "ratio_min": s["ratio_paired_min"], "ratio_max": s["ratio_paired_max"],
                     "peak_mib": common.mib(mem[name]),
                     "memory_ratio": (mem[name] / mem["fwd_bwd"]) if (mem[name] is not None and mem["fwd_bwd"]) else None,
                     "times_s": s["times_s"]})
    for m in args.dims:  # the head-to-head ratio, paired by round
        a, b = samples.get(f"paper m={m}"), samples.get(f"sdi_torch m={m}")
        if a and b:
            import statistics

            for r in rows:
                if r["candidate"] == f"paper m={m}":
                    r["paper_over_sdi_torch"] = statistics.median(x / y for x, y in zip(a, b))
    return rows


# ------------------------------------------------------------------------ accuracy


def accuracy(args, paper):
    import numpy as np
    import torch

    import sdi_core
    from sdi_core.reference.looped_transformer import LoopedConfig, init_weights
    from sdi_torch.models import LoopedGPT

    config = LoopedConfig(vocab_size=args.acc_vocab, d_model=args.acc_d_model, n_heads=args.acc_heads,
                          tau=args.acc_tau, max_len=args.acc_seq)
    weights = init_weights(config, seed=0)
    model64 = LoopedGPT.from_numpy(config, weights, dtype=torch.float64).eval()
    model32 = LoopedGPT.from_numpy(config, weights, dtype=torch.float32).eval()
    bs = 16
    train = [make_batch(min(bs, args.acc_n_train - i), args.acc_seq, args.acc_vocab, seed=100 + i)
             for i in range(0, args.acc_n_train, bs)]
    query = [make_batch(min(bs, args.acc_n_query - i), args.acc_seq, args.acc_vocab, seed=200 + i)
             for i in range(0, args.acc_n_query, bs)]

    t0 = time.perf_counter()
    from sdi_torch.models import per_example_loss
    import sdi_torch

    exact_attr = sdi_torch.Attributor(model64, loop=model64.block, loss_fn=per_example_loss, sketch=sdi_core.Exact(),
                                      progress=False)
    exact = sdi_core.influence(exact_attr.featurize(train, progress=False).sum_steps(),
                               exact_attr.featurize(query, progress=False)).trajectory.numpy()
    t_exact = time.perf_counter() - t0
    rows = []
    for m in args.dims:
        for seed in range(args.acc_seeds):
            f = ours_featurizer(model32, m, seed)
            ours = sdi_core.influence(f(train), f(query)).trajectory.double().numpy()
            rows.append({"implementation": "sdi_torch", "m": m, "seed": seed, **errors(ours, exact)})
            if paper is not None:
                twin = copy.deepcopy(model32)
                est, g = paper_featurizer(paper, twin, m, seed)
                theirs = paper_trajectory(g(train), g(query))
                est.close()
                rows.append({"implementation": "paper", "m": m, "seed": seed, **errors(theirs, exact)})
    summary = []
    for impl in ("sdi_torch", "paper"):
        for m in args.dims:
            mine = [r for r in rows if r["implementation"] == impl and r["m"] == m]
            if not mine:
                continue
            out = {"implementation": impl, "m": m, "seeds": len(mine)}
            for key in ERROR_KEYS:
                out[key] = float(np.mean([r[key] for r in mine]))
            summary.append(out)
    return {"config": {"d_model": config.d_model, "heads": config.n_heads, "tau": config.tau, "seq": config.max_len,
                       "vocab": config.vocab_size, "n_train": args.acc_n_train, "n_query": args.acc_n_query,
                       "weights": "sdi_core.reference.looped_transformer.init_weights(config, seed=0) (untrained)",
                       "exact": "sdi_core.Exact() through sdi_torch.Attributor, float64 model",
                       "sketches": "float32 model, both implementations"},
            "exact_seconds": t_exact, "runs": rows, "summary": summary}


# ---------------------------------------------------------------------------- main


def main(argv=None):
    args = parse(argv)
    info = common.setup(args.threads)
    import torch  # noqa: F401

    common.set_torch_threads(args.threads)
    paper, paper_version = load_paper()
    status = "compared" if paper is not None else "skipped"
    if paper is None:
        print(f"PAPER COMPARISON SKIPPED: the paper's package {PAPER_PACKAGE!r} (import name `sdi`) is "
              f"{paper_version}. Install it with `{INSTALL_HINT}` to compare; measuring sdi_torch alone.", flush=True)
    else:
        print(f"paper's implementation: {PAPER_PACKAGE} {paper_version}", flush=True)
    t_start = time.perf_counter()
    cost_rows = cost(args, paper)
    print()
    print(f"Cost: d_model={args.d_model}, tau={args.tau}, T={args.seq}, batch {args.batch}, float32, "
          f"{args.threads} threads")
    print(common.table(cost_rows, [("candidate", "candidate", ""), ("median_s", "median s", ".3f"),
                                   ("ratio_to_fwd_bwd", "x fwd+bwd", ".2f"),
                                   ("paper_over_sdi_torch", "paper / sdi_torch", ".2f"),
                                   ("peak_mib", "peak MiB", ".0f"), ("memory_ratio", "x fwd+bwd memory", ".2f")]))
    acc = accuracy(args, paper)
    print()
    print(f"Accuracy against exact SDI: d_model={args.acc_d_model}, tau={args.acc_tau}, "
          f"{args.acc_n_train} train x {args.acc_n_query} queries, mean over {args.acc_seeds} seed(s)")
    print(common.table(acc["summary"], [("implementation", "implementation", ""), ("m", "m", ""),
                                        ("rel_error_trajectory", "rel. err SDI", ".4f"),
                                        ("rel_error_tracin", "rel. err TracIn", ".4f"),
                                        ("pearson_trajectory", "Pearson SDI", ".5f"),
                                        ("pearson_tracin", "Pearson TracIn", ".5f")]))
    if paper is None:
        print(f"\npaper comparison: SKIPPED ({PAPER_PACKAGE} not installed; `{INSTALL_HINT}`)")
    payload = {
        "benchmark": "bench_vs_paper",
        "command": common.command_line("bench_vs_paper.py", argv),
        "paper_package": {"name": PAPER_PACKAGE, "status": status,
                          "version": paper_version if paper is not None else None,
                          "reason": None if paper is not None else paper_version},
        "config": {k: getattr(args, k) for k in FULL} | {"threads": args.threads, "quick": args.quick},
        "cost": cost_rows,
        "accuracy": acc,
        "seconds": time.perf_counter() - t_start,
        "machine": common.finish_info(info),
    }
    path = common.write_json(common.results_path(args.out_dir, "vs_paper", args.quick), payload)
    png = plot(payload, common.results_path(args.out_dir, "vs_paper", args.quick, ext="png"))
    print(f"wrote {path} and {png}")
    return payload


def plot(payload, path):
    import numpy as np

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    cost_rows = [r for r in payload["cost"] if r["m"] is not None]
    dims = sorted({r["m"] for r in cost_rows})
    impls = [i for i in ("sdi_torch", "paper") if any(r["implementation"] == i for r in cost_rows)]
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs = np.arange(len(dims)) + (k - (len(impls) - 1) / 2) * width
        t = [next(r["ratio_to_fwd_bwd"] for r in cost_rows if r["implementation"] == impl and r["m"] == m)
             for m in dims]
        mem = [next((r["memory_ratio"] or np.nan) for r in cost_rows if r["implementation"] == impl and r["m"] == m)
               for m in dims]
        bars = axes[0].bar(xs, t, width, label=impl)
        axes[0].bar_label(bars, fmt="%.1fx", fontsize=8)
        bars = axes[1].bar(xs, mem, width, label=impl)
        axes[1].bar_label(bars, fmt="%.1fx", fontsize=8)
    c = payload["config"]
    for ax, what in ((axes[0], "time"), (axes[1], "peak memory")):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(dims)))
        ax.set_xticklabels([f"m = {m}" for m in dims])
        ax.set_ylabel(f"featurize {what} / fwd+bwd {what}")
        ax.set_title(f"{what.capitalize()}: d_model {c['d_model']}, tau {c['tau']}, T {c['seq']}, B {c['batch']}")
        ax.legend(fontsize=8)
    ax = axes[2]
    summ = payload["accuracy"]["summary"]
    for impl, color in (("sdi_torch", "C0"), ("paper", "C1")):
        rows = [r for r in summ if r["implementation"] == impl]
        if rows:
            ax.plot([r["m"] for r in rows], [r["rel_error_trajectory"] for r in rows], "o-", color=color,
                    label=f"{impl}: SDI trajectory")
            ax.plot([r["m"] for r in rows], [r["rel_error_tracin"] for r in rows], "s--", color=color,
                    label=f"{impl}: TracIn")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sketch dimension m per tensor")
    ax.set_ylabel("relative Frobenius error vs exact")
    a = payload["accuracy"]["config"]
    ax.set_title(f"Accuracy: d_model {a['d_model']}, tau {a['tau']}, {a['n_train']}x{a['n_query']} examples")
    ax.legend(fontsize=8)
    status = payload["paper_package"]
    fig.suptitle("sdi_torch vs the paper's implementation" + (
        f" ({PAPER_PACKAGE} {status['version']})" if status["status"] == "compared" else
        f" (paper package absent: comparison SKIPPED)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
