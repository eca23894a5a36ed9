"""``sdi validate``: counterfactual evidence for a built-in task (LDS, per-step removal, mislabel detection).

The pipeline (:func:`run_validation`):

1. build the task's training set and queries, and train the full-data model
   with checkpoints (seed 0 of the validation schedule);
2. featurise the training set and the queries at those checkpoints
   (TensorSketch) and compute the query-step trajectory, TracIn and the
   last-checkpoint gradient dot product;
3. :func:`sdi_core.validate.validate`: retrain on random half subsets (LDS)
   and without each ranking's top-``k`` (step-resolved counterfactual), in
   parallel processes, cached in ``--cache`` and resumable;
4. flip 10 % of the training labels, train on that, rank by self-influence
   (:func:`sdi_core.validate.mislabel_detection`);
5. write ``validation.md`` / ``validation.html``, ``validation.json`` and three figures.

The validation schedule is smaller than the demo's (``VALIDATION_PRESETS``):
retraining is the cost, and the numbers depend on it; the report says so.
PyTorch is imported when the command runs, never at ``import sdi_core``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..factors import SDIError

__all__ = ["ValidationSettings", "VALIDATION_PRESETS", "QUICK", "resolve_validation", "run_validation",
           "corrupt_answers", "register"]

# Model, data and schedule of the full-data model and of every retraining, per task.
# parity: d_model 32, tau 6, 512 training strings, 600 AdamW steps reach ~0.98 test accuracy in
# ~13 s of one CPU thread (the demo's tau 10 / 1544 strings / 1200 steps takes ~85 s), which is what
# makes ~100 retrainings fit the default 15-minute budget on 2 cores.
VALIDATION_PRESETS: dict[str, dict[str, Any]] = {
    "parity": dict(task_options={"min_len": 2, "max_len": 10}, d_model=32, n_heads=2, tau=6, n_train=512,
                   n_query=16, train_steps=600, batch_size=64, lr=2e-3, warmup=40, aux_targets=True),
    "pointer": dict(task_options={"n_nodes": 8, "min_hops": 1, "max_hops": 4}, d_model=48, n_heads=4, tau=4,
                    n_train=512, n_query=16, train_steps=600, batch_size=64, lr=2e-3, warmup=40, aux_targets=False),
    "addition": dict(task_options={"n_digits": 3}, d_model=48, n_heads=4, tau=4, n_train=512, n_query=16,
                     train_steps=600, batch_size=64, lr=2e-3, warmup=40, aux_targets=False),
    "sudoku": dict(task_options={"min_blanks": 4, "max_blanks": 10}, d_model=48, n_heads=4, tau=6, n_train=512,
                   n_query=16, train_steps=600, batch_size=64, lr=2e-3, warmup=40, aux_targets=False),
}

# Sizes of the default experiments, and of --quick (seconds; the tests use it: plumbing, not evidence).
# Retrainings start from the full run's weights at warm_start_fraction of the schedule: full retraining
# of this model is chaotic (removing 25 random examples of 512 moved the final query loss by 0.3-0.4 on
# average, as much as any ranking did, and gave TracIn an LDS of 0.07); from a mid-run start the same
# removal moves it by ~0.1 and the LDS is 0.16 (exploration on the shared machine, one seed).
EXPERIMENT_DEFAULTS: dict[str, Any] = dict(
    n_subsets=32, seeds=2, removal_k=40, counterfactual_queries=4, n_random=4, n_checkpoints=8, sketch_dim=2048,
    mislabel_fraction=0.1, warm_start_fraction=0.5,
)
QUICK: dict[str, Any] = dict(
    d_model=16, n_heads=2, tau=2, n_train=48, n_query=4, train_steps=30, batch_size=16, warmup=5, n_subsets=4,
    seeds=1, removal_k=4, counterfactual_queries=1, n_random=1, n_checkpoints=2, sketch_dim=128,
)


@dataclass
class ValidationSettings:
    """All settings of one ``sdi validate`` (see ``sdi validate --help``)."""

    task: str = "parity"
    task_options: dict = field(default_factory=dict)
    d_model: int = 32
    n_heads: int = 2
    tau: int = 6
    n_train: int = 512
    n_query: int = 16
    train_steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 40
    aux_targets: bool = True
    n_subsets: int = 32
    seeds: int = 2
    removal_k: int = 40
    counterfactual_queries: int = 4
    n_random: int = 4
    n_checkpoints: int = 8
    sketch_dim: int = 2048
    mislabel_fraction: float = 0.1
    warm_start_fraction: float = 0.5
    workers: int = 0
    seed: int = 0
    out: str = "sdi_validation"
    cache: str | None = None
    quiet: bool = False
    quick: bool = False

    def validate(self) -> "ValidationSettings":
        """Raise :class:`SDIError` naming the first bad setting and its fix."""
        if self.task not in VALIDATION_PRESETS:
            raise SDIError(f"unknown task {self.task!r}; choose one of {', '.join(VALIDATION_PRESETS)}.")
        for name in ("d_model", "n_heads", "tau", "n_train", "n_query", "train_steps", "batch_size", "seeds",
                     "removal_k", "n_checkpoints", "sketch_dim", "n_subsets"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SDIError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}.")
        for name in ("warmup", "counterfactual_queries", "n_random", "workers", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise SDIError(f"--{name.replace('_', '-')} must be a non-negative integer, got {v!r}.")
        if self.d_model % self.n_heads:
            raise SDIError(f"--heads {self.n_heads} does not divide --d-model {self.d_model}.")
        if self.n_subsets > self.n_train:
            raise SDIError(f"--subsets {self.n_subsets} exceeds the {self.n_train} training examples "
                           "(--n-train); ask for at most as many subsets as there are training examples.")
        if self.n_subsets < 2:
            raise SDIError("--subsets must be at least 2: the LDS ranks subsets against each other.")
        if self.removal_k >= self.n_train:
            raise SDIError(f"--k {self.removal_k} must be below --n-train {self.n_train}.")
        if self.counterfactual_queries > self.n_query:
            raise SDIError(f"--cf-queries {self.counterfactual_queries} exceeds --n-query {self.n_query}.")
        if not (0.0 < self.mislabel_fraction < 1.0) or round(self.mislabel_fraction * self.n_train) < 1:
            raise SDIError(f"--mislabel-fraction {self.mislabel_fraction} must flip at least one of the "
                           f"{self.n_train} examples and lie below 1.")
        if not (0.0 <= self.warm_start_fraction < 1.0):
            raise SDIError(f"--warm-start {self.warm_start_fraction} must lie in [0, 1): the fraction of the "
                           "schedule run once on the full data before every retraining starts.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SDIError(f"--lr must be a positive number, got {self.lr!r}.")
        if self.n_checkpoints > self.train_steps:
            raise SDIError(f"--n-checkpoints {self.n_checkpoints} exceeds --train-steps {self.train_steps}.")
        return self

    def experiment(self):
        from ..validate import ValidationConfig

        return ValidationConfig(n_subsets=self.n_subsets, seeds=tuple(range(self.seeds)), removal_k=self.removal_k,
                                counterfactual_queries=self.counterfactual_queries, n_random=self.n_random,
                                seed=self.seed)


def resolve_validation(task: str = "parity", quick: bool = False, **overrides: Any) -> ValidationSettings:
    """The task's validation preset, then ``QUICK`` when asked, then explicit ``overrides`` (None = not given)."""
    if task not in VALIDATION_PRESETS:
        raise SDIError(f"unknown task {task!r}; choose one of {', '.join(VALIDATION_PRESETS)}.")
    values: dict[str, Any] = {"task": task, "quick": quick}
    values.update(VALIDATION_PRESETS[task])
    values["task_options"] = dict(values["task_options"])
    values.update(EXPERIMENT_DEFAULTS)
    if quick:
        values.update(QUICK)
    known = {f.name for f in dataclasses.fields(ValidationSettings)}
    for k, v in overrides.items():
        if k not in known:
            raise SDIError(f"unknown setting {k!r}; known settings: {', '.join(sorted(known))}.")
        if v is not None:
            values[k] = v
    return ValidationSettings(**values).validate()


def corrupt_answers(task, data, fraction: float, seed: int):
    """A copy of ``data`` with the answer of ``round(fraction * N)`` examples replaced by a wrong one.

    The first answer token of each chosen row is replaced (in ``tokens`` and
    ``targets`` alike) by another token drawn from the answer tokens seen at
    that position across the data, so the row stays well formed.

    Returns:
        ``(corrupted TaskData, flipped bool [N])``.
    """
    from .tasks import IGNORE_INDEX, TaskData

    rng = np.random.default_rng(seed)
    n = len(data)
    count = int(round(fraction * n))
    chosen = np.sort(rng.choice(n, size=count, replace=False))
    tokens, targets = data.tokens.copy(), data.targets.copy()
    answer_mask = targets != IGNORE_INDEX
    pool = np.unique(targets[answer_mask])
    if pool.size < 2:
        raise SDIError(f"{task.name}: every answer is the same token; there is no wrong label to flip to.")
    flipped = np.zeros(n, dtype=bool)
    for i in chosen:
        t = int(np.flatnonzero(answer_mask[i])[0])
        wrong = pool[pool != targets[i, t]]
        new = int(rng.choice(wrong))
        targets[i, t] = new
        if t + 1 < tokens.shape[1]:
            tokens[i, t + 1] = new
        flipped[i] = True
    return TaskData(tokens, targets, dict(data.meta), task=data.task), flipped


def _log(s: ValidationSettings, msg: str) -> None:
    if not s.quiet:
        print(msg, file=sys.stderr, flush=True)


def run_validation(settings: ValidationSettings) -> dict:
    """Run the whole validation (module docstring) and write its report; returns the summary dict."""
    settings.validate()
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only cost; parallelism is across retrainings
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(old_threads)


def _attributions(s: ValidationSettings, model, checkpoints, train_tokens, train_targets, query_tokens,
                  query_targets):
    """Sketched trajectory, TracIn and last-checkpoint dot product of the full model; and the step slots."""
    import torch

    import sdi_torch
    from sdi_torch.models import per_example_loss

    from .. import TensorSketch, influence
    from ..features import Features

    groups = {"prelude": [model.tok_emb, model.pos_emb], "coda": [model.ln_f, model.head]}
    attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss, groups=groups,
                                sketch=TensorSketch(dim=s.sketch_dim, seed=s.seed), progress=not s.quiet)

    def batches(tokens, targets, size=128):
        return [{"tokens": torch.as_tensor(tokens[lo:lo + size]), "targets": torch.as_tensor(targets[lo:lo + size])}
                for lo in range(0, len(tokens), size)]

    f_train = attr.featurize(batches(train_tokens, train_targets), checkpoints)
    f_query = attr.featurize(batches(query_tokens, query_targets), checkpoints)
    res = influence(f_train, f_query)
    labels = f_query.slot_labels()
    step_slots = tuple(i for i, lab in enumerate(labels) if lab.startswith("loop["))
    last = [dataclasses.replace(f.checkpoints[-1], eta=1.0) for f in (f_train, f_query)]
    lt = Features(f_train.data[-1:], f_train.layout, (last[0],), f_train.steps, f_train.example_ids)
    lq = Features(f_query.data[-1:], f_query.layout, (last[1],), f_query.steps, f_query.example_ids)
    to_np = lambda x: x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, np.float64)
    return (to_np(res.trajectory), to_np(res.tracin), to_np(influence(lt, lq).tracin), step_slots, labels)


def _run(s: ValidationSettings) -> dict:
    from sdi_torch.train import TrainConfig, evaluate, load_model, train
    from sdi_torch.validate import LoopedGPTRetrainer, initial_model

    from .. import self_influence
    from .cli_demo import training_targets
    from ..reference.looped_transformer import LoopedConfig
    from .tasks import get_task
    from ..validate import Attributions, mislabel_detection, validate
    from .validate_report import write_validation_report

    t_start = time.perf_counter()
    out = Path(s.out)
    _check_out(out)
    task = get_task(s.task, **s.task_options)
    train_set, test_set = task.splits(s.n_train, max(s.n_query, 200), seed=s.seed)
    queries = test_set.subset(np.arange(s.n_query))
    fit = training_targets(task, train_set) if s.aux_targets else train_set.targets
    mcfg = LoopedConfig(vocab_size=task.vocab_size, d_model=s.d_model, n_heads=s.n_heads, tau=s.tau,
                        max_len=task.seq_len, input_injection=True)
    tcfg = TrainConfig(steps=s.train_steps, batch_size=s.batch_size, lr=s.lr, warmup=s.warmup,
                       n_checkpoints=s.n_checkpoints, seed=0)
    retrainer = LoopedGPTRetrainer(mcfg, tcfg, train_set.tokens, fit, queries.tokens, queries.targets)

    _log(s, f"[sdi] validate {s.task}: full-data model (d_model {s.d_model}, tau {s.tau}, {s.n_train} examples, "
            f"{s.train_steps} steps)")
    model = initial_model(mcfg, 0)
    result = train(model, {"tokens": train_set.tokens, "targets": fit}, tcfg, out_dir=out / "checkpoints",
                   progress=not s.quiet)
    # Retrainings start from the last checkpoint at or before warm_start_fraction of the schedule, and
    # TracIn/SDI sum over the checkpoints after it: the part of training that the retrainings redo.
    before = [c for c in result.checkpoints if c.step <= s.warm_start_fraction * s.train_steps]
    warm = before[-1] if before and s.warm_start_fraction > 0 else None
    checkpoints = [c.checkpoint() for c in result.checkpoints if warm is None or c.step > warm.step]
    if not checkpoints:
        raise SDIError("no checkpoint falls after the warm start; raise --n-checkpoints or lower --warm-start.")
    if warm is not None:
        retrainer = dataclasses.replace(retrainer, warm_start=load_model(warm.path)[0].to_numpy(),
                                        warm_start_step=warm.step)
    _, test_acc = evaluate(model, test_set, task=task)
    step_acc = [evaluate(model, test_set, task=task, tau=t)[1] for t in retrainer.readout_steps]
    _log(s, f"[sdi] full model: test accuracy {test_acc:.3f}; featurising {s.n_train} train x {s.n_query} queries")
    traj, tracin, last, step_slots, labels = _attributions(
        s, model, checkpoints, train_set.tokens, fit, queries.tokens, queries.targets)
    attributions = Attributions(traj, tracin, step_slots=step_slots, last_checkpoint=last)
    workers = s.workers or max(1, min(os.cpu_count() or 1, 8))
    _log(s, f"[sdi] retraining ({workers} worker processes; cache {s.cache or out / 'cache'})")
    vres = validate(retrainer, attributions, s.experiment(), cache_dir=s.cache or out / "cache", workers=workers,
                    progress=not s.quiet)

    if warm is not None:
        vres.shortcuts.insert(0, f"every retraining starts from the full run's weights after step {warm.step} of "
                                 f"{s.train_steps} (fresh optimiser moments) and redoes the rest of the schedule; "
                                 "TracIn and SDI sum over the checkpoints after that step")
    vres.shortcuts.append("left-out examples keep their place in the full run's batches with loss weight 0 "
                          "(same batch order in every retraining)")
    _log(s, f"[sdi] mislabel detection: flipping {s.mislabel_fraction:.0%} of the training answers")
    bad_set, flipped = corrupt_answers(task, train_set, s.mislabel_fraction, seed=s.seed + 7)
    bad_fit = training_targets(task, bad_set) if s.aux_targets else bad_set.targets
    bad_model = initial_model(mcfg, 0)
    bad_result = train(bad_model, {"tokens": bad_set.tokens, "targets": bad_fit}, tcfg,
                       out_dir=out / "mislabel_checkpoints", progress=not s.quiet)
    mis_all = _mislabel(s, bad_model, bad_result.sdi_checkpoints(), bad_set.tokens, bad_set.targets, bad_fit,
                        flipped, self_influence, mislabel_detection)
    mis = mis_all["answer"]

    summary = {
        "task": s.task,
        "settings": dataclasses.asdict(s),
        "full_model": {"test_accuracy": test_acc, "test_accuracy_by_readout_step": step_acc,
                       "checkpoints": [c.step for c in result.checkpoints],
                       "warm_start_step": 0 if warm is None else warm.step,
                       "attributed_checkpoints": [c.step for c in checkpoints]},
        "validation": vres.to_dict(),
        "mislabel": {**mis.to_dict(), "loss": "answer",
                     **({"auc_training_loss": mis_all["training"].auc} if "training" in mis_all else {})},
        "seconds": time.perf_counter() - t_start,
    }
    files = write_validation_report(out, vres, mis, summary, query_text=[task.render(r) for r in queries.tokens])
    summary["report"] = str(files["markdown"])
    with open(out / "validation.json", "w", encoding="utf-8") as fh:
        json.dump(_json_safe(summary), fh, indent=1)
    return summary


def _json_safe(v: Any) -> Any:
    """NaN and inf become None (JSON has neither); NumPy scalars and arrays become Python values."""
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_json_safe(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _mislabel(s, model, checkpoints, tokens, answer_targets, fit_targets, flipped, self_influence,
              mislabel_detection):
    """Self-influence ranking of the flipped-label model's training set, by the answer loss and the training loss.

    The flipped label is the answer; with auxiliary targets (parity's running parity) the training loss
    averages the answer with many correct auxiliary positions, which dilutes exactly the signal looked for.
    """
    import torch

    import sdi_torch
    from sdi_torch.models import per_example_loss

    from .. import TensorSketch

    attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss,
                                groups={"prelude": [model.tok_emb, model.pos_emb], "coda": [model.ln_f, model.head]},
                                sketch=TensorSketch(dim=s.sketch_dim, seed=s.seed), progress=not s.quiet)
    out = {}
    for name, targets in (("answer", answer_targets), ("training", fit_targets)):
        if name == "training" and targets is answer_targets:
            continue
        batches = [{"tokens": torch.as_tensor(tokens[lo:lo + 128]), "targets": torch.as_tensor(targets[lo:lo + 128])}
                   for lo in range(0, len(tokens), 128)]
        si = self_influence(attr.featurize(batches, checkpoints))  # [N, slots]; the sum over slots is T(i, i)
        si = si.detach().cpu().double().numpy() if hasattr(si, "detach") else np.asarray(si, np.float64)
        out[name] = mislabel_detection(si.sum(axis=1), flipped)
    return out


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written before any training starts."""
    if out.exists() and not out.is_dir():
        raise SDIError(f"--out {str(out)!r} is a file; pass a folder for the validation report.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".sdi-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SDIError(f"--out {str(out)!r} is not writable ({exc.strerror}); pass a folder you can write to.") from None


# --------------------------------------------------------------------------- argparse


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def register(subparsers) -> None:
    """Add ``sdi validate`` to the ``sdi`` command line."""
    P = VALIDATION_PRESETS["parity"]
    E = EXPERIMENT_DEFAULTS
    pos, nonneg = _int_at_least(1), _int_at_least(0)
    p = subparsers.add_parser(
        "validate", help="counterfactual evidence: LDS, per-step removal and retraining, mislabel detection",
        description="Train a small looped GPT on a built-in task, attribute it with SDI, then retrain without "
                    "what the attributions rank highest and measure the change (linear datamodeling score, "
                    "step-resolved counterfactual, mislabel detection). The default budget for parity takes "
                    "about 15 minutes on 2 CPU cores; --quick runs in seconds (plumbing only).")
    p.add_argument("--task", default="parity", choices=sorted(VALIDATION_PRESETS), help="built-in task (default parity)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a seconds-long smoke run, not evidence")
    p.add_argument("--out", default="sdi_validation", help="report folder (default ./sdi_validation)")
    p.add_argument("--cache", default=None, help="folder of retrained results, reused and resumed (default OUT/cache)")
    p.add_argument("--workers", type=nonneg, default=0, help="parallel retraining processes (default: one per CPU core)")
    p.add_argument("--subsets", dest="n_subsets", type=pos, default=None, help=f"LDS subsets (default {E['n_subsets']})")
    p.add_argument("--seeds", type=pos, default=None, help=f"retraining seeds per subset and removal (default {E['seeds']})")
    p.add_argument("--k", dest="removal_k", type=pos, default=None, help=f"examples removed per counterfactual (default {E['removal_k']})")
    p.add_argument("--cf-queries", dest="counterfactual_queries", type=nonneg, default=None,
                   help=f"queries given the per-step counterfactual (default {E['counterfactual_queries']})")
    p.add_argument("--random-sets", dest="n_random", type=nonneg, default=None, help=f"random removal sets (default {E['n_random']})")
    p.add_argument("--n-train", type=pos, default=None, help=f"training set size (parity default {P['n_train']})")
    p.add_argument("--n-query", type=pos, default=None, help=f"queries (parity default {P['n_query']})")
    p.add_argument("--train-steps", type=pos, default=None, help=f"optimiser steps per model (parity default {P['train_steps']})")
    p.add_argument("--tau", type=pos, default=None, help=f"loop steps (parity default {P['tau']})")
    p.add_argument("--sketch-dim", type=pos, default=None, help=f"TensorSketch dim (default {E['sketch_dim']})")
    p.add_argument("--warm-start", dest="warm_start_fraction", type=float, default=None,
                   help=f"retrainings start from the full run at this fraction of the schedule (default "
                        f"{E['warm_start_fraction']}; 0: retrain from the initialisation)")
    p.add_argument("--seed", type=nonneg, default=0, help="data split, subsets and random removals")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    names = ("n_subsets", "seeds", "removal_k", "counterfactual_queries", "n_random", "n_train", "n_query",
             "train_steps", "tau", "sketch_dim", "warm_start_fraction")
    settings = resolve_validation(args.task, quick=args.quick, out=args.out, cache=args.cache, workers=args.workers,
                                  seed=args.seed, quiet=args.quiet, **{n: getattr(args, n) for n in names})
    summary = run_validation(settings)
    v = summary["validation"]
    lines = [f"report: {summary['report']}"]
    for name, r in v["lds"].items():
        lines.append(f"LDS {name}: {r['lds']:+.3f} (95% CI {r['ci95'][0]:+.3f} .. {r['ci95'][1]:+.3f})")
    cf = v["counterfactual"]
    if cf is not None:
        for m, vals in cf["mean_delta_loss"].items():
            lines.append(f"remove top-{cf['k']} by {m}: mean change of the step-t loss "
                         + " ".join(f"t{t}:{x:+.3f}" for t, x in zip(cf["steps"], vals)))
        lines.append("step-t ranking beats TracIn (share of query x seed pairs): "
                     + " ".join(f"t{t}:{x:.2f}" for t, x in zip(cf["steps"], cf["sdi_beats_tracin"])))
    m = summary["mislabel"]
    lines.append(f"mislabel detection (self-influence of the answer loss): AUC {m['auc']:.3f}, "
                 f"{m['found_in_top_10pct']:.0%} of flips in the top 10%"
                 + (f"; by the training loss: AUC {m['auc_training_loss']:.3f}" if "auc_training_loss" in m else ""))
    lines.append(f"wall time {summary['seconds']:.0f} s")
    print("\n".join(lines))
    return 0
