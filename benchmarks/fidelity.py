"""Fidelity of TensorSketch SDI against exact SDI on a trained looped GPT (the paper's experiment in miniature).

A looped GPT is trained on parity with :func:`sdi_torch.train.train`, which
saves checkpoints with their learning rates (TracIn's ``eta_k``).  At every
checkpoint the per-step factors of the loop body (all 16 tensors of the
block) are computed once, in float64, by the NumPy reference model
(:func:`sdi_core.reference.looped_transformer.loss_and_factors`), and handed
to the library's streaming sketcher under ``sdi_core.Exact()`` (ground truth)
and under ``sdi_core.TensorSketch(dim=m, seed=s)`` for every ``m`` and seed.
Reusing the factors is what keeps many seeds affordable; a check at the end
featurises the queries again through ``sdi_torch.Attributor`` and reports how
far its features are from the reference path's (they should agree to float64
rounding).

Reported per ``m`` (mean, min and max over seeds), with the metrics and names
of :mod:`sdi_core.metrics` (the report's too):

- relative Frobenius error ``||S - E||_F / ||E||_F`` of the query-step
  trajectory ``[N_train, N_query, tau]`` and of TracIn ``[N_train, N_query]``;
- Pearson and Spearman correlation of the flattened arrays, and Spearman of
  each query's TracIn over the train examples, averaged over queries;
- top-k overlap: per query, the fraction of the exact top-k training examples
  (by TracIn, and by each step's influence) that the sketch also ranks top-k;
- the error of the mean of all seeds' estimates (independent sketches average).

The mean error over seeds is fitted to ``c / sqrt(m)`` (least squares on
``log err + log(m) / 2``; a free slope is fitted too) and compared with the
paper's headline numbers at ``m = 2048``.

The library stores a tensor with at most ``m`` entries exactly instead of
sketching it (its ``TensorSketch`` documents this): with the default
``d_model = 128`` the LayerNorm and bias vectors (128 or 512 numbers) are
exact for ``m >= 512``, and the four 128 x 128 attention matrices become exact
at ``m >= 16384``, leaving only the two 128 x 512 MLP matrices sketched.  The
fit therefore uses only the ``m`` at which every matrix is sketched; the
larger ``m`` are reported (and plotted) as measured.

    python benchmarks/fidelity.py            # default study (4 minutes on 2 cores at load ~2, 14 at load ~6)
    python benchmarks/fidelity.py --quick    # a few seconds, tiny model
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

# The paper's headline (arXiv 2602.10097): a 135M-parameter looped GPT, 48
# sketched tensors, m = 2048.
PAPER = {"m": 2048, "rel_error_trajectory": 0.0388, "rel_error_tracin": 0.0220,
         "setting": "135M-parameter looped GPT, 48 sketched tensors, m=2048"}

FULL = dict(d_model=128, heads=4, tau=4, max_len=8, train_size=1500, test_size=100, train_steps=600,
            train_batch=64, lr=1e-3, checkpoints=2, n_train=256, n_query=32, batch=32,
            dims="256,1024,2048,4096,8192,16384,32768", seeds=5, topk=10)
QUICK = dict(d_model=32, heads=2, tau=2, max_len=4, train_size=64, test_size=16, train_steps=10,
             train_batch=16, lr=3e-3, checkpoints=1, n_train=16, n_query=4, batch=8,
             dims="64,256", seeds=2, topk=3)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_common_args(ap)
    for key, val in FULL.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(val), default=None,
                        help=f"default {val} (quick: {QUICK[key]})")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, val in base.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    args.dims = [int(x) for x in str(args.dims).split(",") if x.strip()]
    return args


# ------------------------------------------------------------------------ training


def train_model(args, task, train_data, test_data, ckpt_dir):
    """Train the looped GPT (float32, torch) and return (config, saved checkpoints, train result)."""
    import torch

    from sdi_core.reference.looped_transformer import LoopedConfig
    from sdi_torch.models import LoopedGPT
    from sdi_torch.train import TrainConfig, train

    config = LoopedConfig(vocab_size=task.vocab_size, d_model=args.d_model, n_heads=args.heads, tau=args.tau,
                          max_len=task.seq_len)
    torch.manual_seed(0)
    model = LoopedGPT(config)
    tc = TrainConfig(steps=args.train_steps, batch_size=args.train_batch, lr=args.lr,
                     n_checkpoints=args.checkpoints, warmup=min(100, args.train_steps // 10), seed=0)
    result = train(model, train_data, tc, out_dir=ckpt_dir, eval_data=test_data, task=task, progress=False)
    from sdi_torch.train import evaluate

    result.train_eval = evaluate(model, train_data, task=task)  # (loss, accuracy) on the training strings
    return config, model, result


def load_weights(path):
    """Canonical float64 NumPy weights and the recorded learning rate of a checkpoint file."""
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    weights = {k: v.double().numpy() for k, v in payload["state_dict"].items()}
    return weights, float(payload["lr"]), int(payload["step"])


# ----------------------------------------------------------------------- features


def batches_of(data, batch):
    n = len(data)
    return [{"tokens": data.tokens[i:i + batch], "targets": data.targets[i:i + batch]} for i in range(0, n, batch)]


def reference_factors(weights, config, batches, loop_names):
    """Per batch, ``(B, uses)``: the loop body's factor uses from the float64 NumPy reference."""
    from sdi_core.reference.looped_transformer import loss_and_factors

    out = []
    for b in batches:
        _, uses = loss_and_factors(weights, config, b, select=loop_names)
        out.append((b["tokens"].shape[0], uses))
    return out


def features_of(plan, factor_batches, tau, info, summed):
    """:class:`sdi_core.Features` of all batches (one checkpoint); step-summed on the train side."""
    from sdi_core import Features, sketch_uses

    parts = []
    for bsz, uses in factor_batches:
        data = sketch_uses(plan, uses, bsz, steps={"loop": tau}, summed=summed)
        parts.append(Features(data=[data], layout=plan.layout, checkpoints=(info,), steps={"loop": tau},
                              summed=summed))
    return Features.concat(parts)


def trajectory(plan, train_factors, query_feats, tau, info):
    """Query-step trajectory ``[N_train, N_query, tau]`` at one checkpoint (eta included), train in batches."""
    import numpy as np

    from sdi_core import influence

    rows = []
    for part in train_factors:
        tr = features_of(plan, [part], tau, info, summed=True)
        rows.append(np.asarray(influence(tr, query_feats).trajectory))
    return np.concatenate(rows, axis=0)


# ------------------------------------------------------------------------ metrics


def metrics(est, exact, topk):
    """The scalar metrics of :func:`sdi_core.metrics.compare` (the names the report uses too)."""
    from sdi_core.metrics import compare

    return {k: v for k, v in compare(est, exact, k=topk).items() if isinstance(v, float)}


def fit_inverse_sqrt(ms, errs):
    """``err = c / sqrt(m)``: c by least squares in log space, plus a free-slope fit ``err = a m^b``."""
    import numpy as np

    lm, le = np.log(np.asarray(ms, float)), np.log(np.asarray(errs, float))
    c = float(np.exp(np.mean(le + 0.5 * lm)))
    resid = le - (math.log(c) - 0.5 * lm)
    slope, icpt = (np.polyfit(lm, le, 1) if len(ms) > 1 else (float("nan"), float("nan")))
    return {"c": c, "rms_log_residual": float(np.sqrt(np.mean(resid**2))), "free_slope": float(slope),
            "free_intercept_c": float(np.exp(icpt)) if np.isfinite(icpt) else None}


# --------------------------------------------------------------------- attributor


def attributor_check(config, ckpt_path, query_batches, plan_sketch, ref_query, info, tau):
    """Max relative difference between sdi_torch.Attributor query features and the reference path's."""
    import numpy as np
    import torch

    import sdi_core
    import sdi_torch
    from sdi_torch.models import LoopedGPT, per_example_loss

    model = LoopedGPT(config).double().eval()
    attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss, sketch=plan_sketch,
                                progress=False)
    tb = [{k: torch.as_tensor(v) for k, v in b.items()} for b in query_batches]
    feats = attr.featurize(tb, checkpoints=[sdi_core.Checkpoint(str(ckpt_path), eta=info.eta)], progress=False)
    if feats.layout.diff(ref_query.layout) is not None:
        return {"ok": False, "why": feats.layout.diff(ref_query.layout)}
    a = feats.data[0]["loop"].numpy()
    b = np.asarray(ref_query.data[0]["loop"])
    return {"ok": True, "max_abs_diff_over_max_abs": float(np.max(np.abs(a - b)) / np.max(np.abs(b)))}


# ---------------------------------------------------------------------------- main


def main(argv=None):
    args = parse(argv)
    # NumPy does many small products here (reference model, sketches); on a shared machine a second
    # OpenBLAS thread made them up to 100x slower (it spins for a descheduled sibling).  Torch keeps
    # --threads for training.  No timing in this script is a claim.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    info_machine = common.setup(args.threads)
    import numpy as np
    import torch

    common.set_torch_threads(args.threads)
    from sdi_core import CheckpointInfo, Exact, SketchPlan, TensorSketch
    from sdi_core.reference.looped_transformer import param_infos
    from sdi_core.app.tasks import get_task

    t_start = time.perf_counter()
    task = get_task("parity", min_len=2, max_len=args.max_len)
    train_data, test_data = task.splits(args.train_size, args.test_size, seed=0)
    with tempfile.TemporaryDirectory() as ckpt_dir:
        t0 = time.perf_counter()
        config, model, tres = train_model(args, task, train_data, test_data, ckpt_dir)
        t_train = time.perf_counter() - t0
        print(f"trained d_model={args.d_model} tau={args.tau} on parity (max_len {args.max_len}) for "
              f"{args.train_steps} steps in {t_train:.0f} s: train loss {tres.train_eval[0]:.3f}, accuracy "
              f"{tres.train_eval[1]:.3f}; test loss {tres.evals[-1][1]:.3f}, accuracy {tres.evals[-1][2]:.3f}",
              flush=True)
        loop_infos = param_infos(config, groups=("loop",))
        loop_names = [p.name for p in loop_infos]
        tau = config.tau
        train_b = batches_of(train_data.subset(np.arange(args.n_train)), args.batch)
        query_b = batches_of(test_data.subset(np.arange(args.n_query)), args.batch)
        configs = [("exact", None, Exact())] + [
            (f"m={m},seed={s}", (m, s), TensorSketch(dim=m, seed=s)) for m in args.dims for s in range(args.seeds)]
        plans = {name: SketchPlan(sk, loop_infos) for name, _, sk in configs}
        traj = {name: 0.0 for name, _, _ in configs}
        t_feat = 0.0
        check = None
        ckpt_meta = []
        for ck in tres.checkpoints:
            weights, lr, step = load_weights(ck.path)
            info = CheckpointInfo(id=ck.path.name, eta=lr, step=step)
            ckpt_meta.append({"step": step, "eta": lr})
            t0 = time.perf_counter()
            tr_f = reference_factors(weights, config, train_b, loop_names)
            q_f = reference_factors(weights, config, query_b, loop_names)
            for name, key, sk in configs:
                qf = features_of(plans[name], q_f, tau, info, summed=False)
                traj[name] = traj[name] + trajectory(plans[name], tr_f, qf, tau, info)
                if check is None and key is not None and key[0] == (2048 if 2048 in args.dims else args.dims[0]):
                    check = attributor_check(config, ck.path, query_b, sk, qf, info, tau)
                    check["config"] = name
                    check["checkpoint_step"] = step
            t_feat += time.perf_counter() - t0
            print(f"checkpoint step {step} (eta {lr:.2e}): {len(configs)} feature sets in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            del tr_f, q_f

    exact = traj.pop("exact")
    per_m = []
    runs = []
    for m in args.dims:
        ests = [traj[f"m={m},seed={s}"] for s in range(args.seeds)]
        ms = [metrics(e, exact, args.topk) for e in ests]
        for s, r in enumerate(ms):
            runs.append(dict(m=m, seed=s, **r))
        row = {"m": m}
        for key in ms[0]:
            vals = np.array([r[key] for r in ms])
            row[key] = float(vals.mean())
            row[key + "_min"] = float(vals.min())
            row[key + "_max"] = float(vals.max())
        ens = metrics(np.mean(ests, axis=0), exact, args.topk)
        row["ensemble_rel_error_trajectory"] = ens["rel_error_trajectory"]
        row["ensemble_rel_error_tracin"] = ens["rel_error_tracin"]
        per_m.append(row)

    sketched = [p for p in loop_infos if p.numel > min(args.dims)]
    matrices = [p for p in loop_infos if len(p.shape) == 2]
    fit_rows = [r for r in per_m if all(p.numel > r["m"] for p in matrices)]
    if len(fit_rows) < 2:  # too few points where everything is sketched: fit them all
        fit_rows = per_m
    fits = {key: fit_inverse_sqrt([r["m"] for r in fit_rows], [r[key] for r in fit_rows]) | {
                "fitted_m": [r["m"] for r in fit_rows]}
            for key in ("rel_error_trajectory", "rel_error_tracin")}
    for r in per_m:
        r["matrices_sketched"] = sum(p.numel > r["m"] for p in matrices)
        r["tensors_sketched"] = sum(p.numel > r["m"] for p in loop_infos)
    width = {m: SketchPlan(TensorSketch(dim=m, seed=0), loop_infos).features_per_step()["loop"] for m in args.dims}
    exact_width = sum(p.numel for p in loop_infos)

    cols = [("m", "m", ""), ("tensors_sketched", "tensors sketched", ""), ("rel_error_trajectory", "rel. err SDI", ".4f"),
            ("rel_error_tracin", "rel. err TracIn", ".4f"),
            ("ensemble_rel_error_trajectory", f"SDI err, mean of {args.seeds} seeds", ".4f"),
            ("pearson_trajectory", "Pearson SDI", ".4f"), ("spearman_trajectory", "Spearman SDI", ".4f"),
            ("pearson_tracin", "Pearson TracIn", ".4f"), ("spearman_tracin", "Spearman TracIn", ".4f"),
            ("spearman_per_query", "Spearman TracIn per query", ".4f"),
            ("topk_overlap_tracin", f"top-{args.topk} TracIn", ".3f"),
            ("topk_overlap_per_slot", f"top-{args.topk} per step", ".3f")]
    print()
    print(common.table(per_m, cols))
    for key, f in fits.items():
        print(f"fit {key} = c / sqrt(m) over m in {f['fitted_m']}: c = {f['c']:.3f} "
              f"(rms log residual {f['rms_log_residual']:.3f}); free fit slope {f['free_slope']:.3f}")
    at = next((r for r in per_m if r["m"] == PAPER["m"]), None)
    if at is not None:
        print(f"at m={PAPER['m']}: SDI error {at['rel_error_trajectory']:.4f} (paper {PAPER['rel_error_trajectory']}), "
              f"TracIn error {at['rel_error_tracin']:.4f} (paper {PAPER['rel_error_tracin']})")
    if check is not None:
        print(f"sdi_torch.Attributor vs reference-factor features ({check.get('config')}): {check}")

    payload = {
        "benchmark": "fidelity",
        "command": common.command_line("fidelity.py", argv),
        "config": {k: getattr(args, k) for k in FULL} | {"quick": args.quick, "threads": args.threads},
        "model": {"d_model": config.d_model, "n_heads": config.n_heads, "d_mlp": config.d_mlp, "tau": config.tau,
                  "vocab": config.vocab_size, "seq_len": config.max_len,
                  "loop_params": sum(p.numel for p in loop_infos),
                  "all_params": int(sum(p.numel() for p in model.parameters())),
                  "loop_tensors": len(loop_infos), "tensors_sketched_at_min_m": len(sketched),
                  "matrices": {p.name: list(p.shape) for p in loop_infos if len(p.shape) == 2}},
        "training": {"seconds": t_train, "final_test_loss": tres.evals[-1][1], "final_test_accuracy": tres.evals[-1][2],
                     "final_train_loss": tres.train_eval[0], "final_train_accuracy": tres.train_eval[1],
                     "checkpoints": ckpt_meta},
        "features_per_step": {"exact": exact_width, **{str(m): w for m, w in width.items()}},
        "per_m": per_m,
        "runs": runs,
        "fit": fits,
        "paper": PAPER | {"implied_c_trajectory": PAPER["rel_error_trajectory"] * math.sqrt(PAPER["m"]),
                          "implied_c_tracin": PAPER["rel_error_tracin"] * math.sqrt(PAPER["m"])},
        "attributor_check": check,
        "seconds": {"train": t_train, "featurize_and_score": t_feat, "total": time.perf_counter() - t_start},
        "machine": common.finish_info(info_machine),
    }
    path = common.write_json(common.results_path(args.out_dir, "fidelity", args.quick), payload)
    png = plot(payload, common.results_path(args.out_dir, "fidelity", args.quick, ext="png"))
    print(f"wrote {path} and {png}")
    return payload


def plot(payload, path):
    import numpy as np

    plt = common.pyplot()
    rows = payload["per_m"]
    ms = np.array([r["m"] for r in rows], float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for key, label, color in (("rel_error_trajectory", "SDI trajectory", "C0"), ("rel_error_tracin", "TracIn", "C1")):
        mean = np.array([r[key] for r in rows])
        lo = mean - np.array([r[key + "_min"] for r in rows])
        hi = np.array([r[key + "_max"] for r in rows]) - mean
        ax.errorbar(ms, mean, yerr=[lo, hi], fmt="o-", color=color, capsize=3,
                    label=f"{label} (mean, min-max over seeds)")
        c = payload["fit"][key]["c"]
        fm = np.array(payload["fit"][key]["fitted_m"], float)
        ax.plot(fm, c / np.sqrt(fm), "--", color=color, alpha=0.7, label=f"fit {c:.2f} / sqrt(m)")
        ax.plot([payload["paper"]["m"]], [payload["paper"][key]], "*", color=color, markersize=13,
                markeredgecolor="k", label=f"paper, {label} (135M model)")
    n_mat = max(r["matrices_sketched"] for r in rows)
    partly = [r["m"] for r in rows if r["matrices_sketched"] < n_mat]
    if partly:
        for a in axes:
            a.axvspan(min(partly) / 1.3, max(ms) * 1.3, color="0.85", zorder=0,
                      label=f"some matrices have <= m entries: stored exactly" if a is axes[0] else None)
    ens = np.array([r["ensemble_rel_error_trajectory"] for r in rows])
    ax.plot(ms, ens, "s:", color="C2", label=f"SDI, mean of {payload['config']['seeds']} seeds' sketches")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sketch dimension m per tensor")
    ax.set_ylabel("relative Frobenius error vs exact")
    ax.set_title("Sketch error against exact SDI")
    ax.legend(fontsize=7.5, loc="lower left")
    ax = axes[1]
    for key, label, style in (("pearson_trajectory", "Pearson, SDI", "o-"), ("spearman_trajectory", "Spearman, SDI", "s-"),
                              ("pearson_tracin", "Pearson, TracIn", "o--"),
                              ("topk_overlap_tracin", f"top-{payload['config']['topk']} overlap, TracIn", "^-"),
                              ("topk_overlap_per_slot", f"top-{payload['config']['topk']} overlap, per step", "v-")):
        ax.plot(ms, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sketch dimension m per tensor")
    ax.set_ylabel("agreement with exact (mean over seeds)")
    ax.set_title("Correlation and top-k agreement")
    ax.legend(fontsize=8, loc="lower right")
    mdl = payload["model"]
    fig.suptitle(f"Looped GPT on parity: d_model {mdl['d_model']}, tau {mdl['tau']}, {mdl['loop_tensors']} loop tensors "
                 f"({mdl['loop_params']:,} weights), {payload['config']['n_train']} train x "
                 f"{payload['config']['n_query']} queries, {len(payload['training']['checkpoints'])} checkpoint(s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
