"""The ``numpy`` backend: the float64 NumPy reference looped transformer, trained and featurised without a framework.

The teaching path: :mod:`sdi_core.reference.looped_transformer` has a
hand-written backward pass that emits every use's factors; training sums
them over the batch into the mean-loss gradient and takes NumPy AdamW steps
(:mod:`sdi_core.app.training`); featurising hands the same factors to the
core's sketch engine.  ``sdi demo --backend numpy`` needs NumPy, SciPy and
(for the figures) matplotlib only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..factors import FactorUse, SDIError
from ..features import Checkpoint, CheckpointInfo, Features
from ..weights import checkpoint_id
from .backends import Backend, TrainedModel
from .training import BatchOrder, TrainConfig, adamw_init, adamw_update, clip_by_global_norm, evaluate_logits, \
    learning_rate

__all__ = ["BACKEND", "ReferenceModel", "batch_gradients", "train", "featurize", "save_checkpoint", "load_checkpoint"]


@dataclass
class ReferenceModel:
    """The NumPy model: its shape and canonical float64 weights (name -> array)."""

    config: Any  # LoopedConfig
    weights: dict[str, np.ndarray]


def build_model(config, seed: int = 0) -> ReferenceModel:
    """GPT-2 style initial weights (:func:`~sdi_core.reference.looped_transformer.gpt2_init_weights`)."""
    from ..reference.looped_transformer import gpt2_init_weights

    return ReferenceModel(config, gpt2_init_weights(config, seed))


def _use_batch_gradient(use: FactorUse, shape: tuple[int, ...]) -> np.ndarray:
    """Sum over the batch (and tokens) of one use's per-example gradient, ``[*shape]``."""
    g = np.asarray(use.grad_output, dtype=np.float64)
    a = None if use.activation is None else np.asarray(use.activation)
    if use.kind == "dense":
        return g.sum(axis=0).reshape(shape)
    if g.ndim == 2:  # no token axis
        g = g[:, None, :]
        if a is not None and a.ndim == 2 and use.kind != "embedding":
            a = a[:, None, :]
    out = np.zeros(shape)
    lo, hi = use.row_slice or (0, shape[0])
    if use.kind == "bias":
        out[lo:hi] = g.sum(axis=(0, 1))
    elif use.kind == "scale":
        out[lo:hi] = (a * g).sum(axis=(0, 1))
    elif use.kind == "linear":
        out[lo:hi] = np.tensordot(g, a.astype(np.float64), axes=([0, 1], [0, 1]))  # sum_{b,t} g a^T
    elif use.kind == "embedding":
        ids = (a if a.ndim == 2 else a[:, None]).reshape(-1)
        rows = g.reshape(-1, g.shape[-1])
        keep = ids != use.ignore_index if use.ignore_index is not None else slice(None)
        np.add.at(out, ids[keep], rows[keep])
    else:
        raise SDIError(f"unknown use kind {use.kind!r}")
    return out


def batch_gradients(uses: Sequence[FactorUse], shapes: Mapping[str, tuple[int, ...]], batch_size: int) -> dict:
    """Gradient of the batch-mean loss from the per-example factor uses: ``{name: [*shape]}``.

    ``sum_b sum_s phi_s(z_b) / B``: every use's factors are contracted over
    the examples and tokens directly, so no per-example gradient is formed.
    """
    grads = {n: np.zeros(s) for n, s in shapes.items()}
    for u in uses:
        grads[u.param] += _use_batch_gradient(u, shapes[u.param])
    return {n: g / batch_size for n, g in grads.items()}


def save_checkpoint(path: str | os.PathLike, model: ReferenceModel, step: int, lr: float) -> Path:
    """Write ``path`` (``.npz`` of canonical weights, for ``sdi featurize --checkpoint``) and a ``.json``
    beside it with ``step``, ``lr`` and the model's ``config``."""
    import dataclasses

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **model.weights)
    path.with_suffix(".json").write_text(json.dumps(
        {"step": int(step), "lr": float(lr), "config": dataclasses.asdict(model.config)}, indent=1))
    return path


def load_checkpoint(path: str | os.PathLike):
    """``(LoopedConfig, weights)`` of a checkpoint written by :func:`save_checkpoint`."""
    from ..reference.looped_transformer import LoopedConfig

    path = Path(path)
    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise SDIError(f"Checkpoint {str(path)!r} needs the .npz and its .json ({side.name}) written by the numpy "
                       "backend's training; pass such a file.")
    meta = json.loads(side.read_text())
    with np.load(path, allow_pickle=False) as z:
        weights = {k: np.asarray(z[k]) for k in z.files}
    return LoopedConfig(**meta["config"]), weights


def train(model: ReferenceModel, data: Mapping[str, np.ndarray], config: TrainConfig, *, out_dir=None,
          eval_data=None, task=None, progress: bool = False) -> TrainedModel:
    """Train ``model`` in place with AdamW on the mean per-example loss (the hand-written backward pass).

    Same schedule, batch order, clipping and checkpoint steps as
    ``sdi_torch.train.train`` (:mod:`sdi_core.app.training`); SGD is not
    offered here.
    """
    from ..reference.looped_transformer import loss_and_factors, param_shapes
    from .training import checkpoint_steps

    if config.optimizer != "adamw":
        raise SDIError(f"the numpy backend trains with adamw only, got optimizer={config.optimizer!r}; pass "
                       "--optimizer adamw or use --backend torch.")
    tokens, targets = np.asarray(data["tokens"]), np.asarray(data["targets"])
    shapes = param_shapes(model.config)
    order = BatchOrder(tokens.shape[0], config.batch_size, config.seed)
    state = adamw_init(model.weights)
    save_at = set(checkpoint_steps(config.steps, config.n_checkpoints)) if out_dir is not None else set()
    losses = np.zeros(config.steps)
    evals: list[tuple[int, float, float]] = []
    ckpts: list[Checkpoint] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="training (numpy)", unit="step", leave=False, dynamic_ncols=True)
    try:
        for step in range(1, config.steps + 1):
            idx = order.next()
            batch = {"tokens": tokens[idx], "targets": targets[idx]}
            loss, uses = loss_and_factors(model.weights, model.config, batch)
            if not np.all(np.isfinite(loss)):
                raise SDIError(f"train: the loss became {float(np.mean(loss))} at step {step}; lower the learning "
                               f"rate (lr={config.lr}).")
            grads = clip_by_global_norm(batch_gradients(uses, shapes, len(idx)), config.grad_clip)
            lr = learning_rate(step, config)
            model.weights, state = adamw_update(grads, state, model.weights, lr=lr, betas=config.betas,
                                                weight_decay=config.weight_decay)
            losses[step - 1] = float(np.mean(loss))
            if eval_data is not None and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                evals.append((step, *evaluate_logits(logits(model, eval_data.tokens), eval_data, task)))
            if step in save_at:
                save_checkpoint(Path(out_dir) / f"ckpt_{step:06d}.npz", model, step, lr)
                ckpts.append(Checkpoint(dict(model.weights), eta=lr, step=step))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return TrainedModel(model, ckpts, losses, evals)


def logits(model: ReferenceModel, tokens: np.ndarray, tau: int | None = None, batch_size: int = 512) -> np.ndarray:
    """Logits ``[N, T, V]`` (float64), computed in batches."""
    from ..reference.looped_transformer import forward

    tokens = np.asarray(tokens)
    return np.concatenate([forward(model.weights, model.config, {"tokens": tokens[i:i + batch_size]}, tau=tau)
                           for i in range(0, tokens.shape[0], batch_size)])


def featurize(model: ReferenceModel, sketch, data: Mapping[str, np.ndarray], checkpoints: Sequence[Checkpoint], *,
              groups: Sequence[str] = ("prelude", "loop", "coda"), tau: int | None = None, example_ids=None,
              batch_size: int = 64, progress: bool = False) -> Features:
    """Features of ``data`` at ``checkpoints`` (sources: weight dicts) through the reference's factor stream."""
    from .cli_store import batch_ranges, numpy_reference_featurizer

    pairs = [(c.source, CheckpointInfo(c.name or checkpoint_id(c.source), 1.0 if c.eta is None else c.eta, c.step))
             for c in checkpoints]
    n = int(np.asarray(data["tokens"]).shape[0])
    arrays = {"tokens": np.asarray(data["tokens"]), "targets": np.asarray(data["targets"])}
    if example_ids is not None:
        arrays["ids"] = np.asarray(example_ids)
    fn = numpy_reference_featurizer(model.config, pairs, sketch, arrays, groups=tuple(groups), tau=tau)
    return fn(batch_ranges(n, batch_size))


def _store_featurizer(config, checkpoints, sketch, data, *, groups, tau, summed, device="cpu", dtype="float32",
                      progress=False):
    from .cli_store import numpy_reference_featurizer

    return numpy_reference_featurizer(config, checkpoints, sketch, data, groups=groups, tau=tau, summed=summed)


BACKEND = Backend(
    name="numpy",
    description="the float64 NumPy reference looped transformer (hand-written backward, NumPy AdamW); no framework",
    build_model=build_model,
    train=train,
    logits=logits,
    featurize=featurize,
    load_checkpoint=load_checkpoint,
    conformance="sdi_conformance.numpy_backend:backend",
    store_featurizer=_store_featurizer,
)
