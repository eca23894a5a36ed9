"""Framework-free training pieces shared by every backend's demo training loop.

The hyper-parameters (:class:`TrainConfig`), the learning-rate schedule
(:func:`learning_rate`), where checkpoints fall (:func:`checkpoint_steps`),
the batch order (:class:`BatchOrder`) and, for the NumPy backend, AdamW and
global-norm clipping as pure ``init``/``update`` functions over dicts of
arrays (in the manner of Optax).  ``sdi_torch.train`` and the JAX backend
use the same schedule and batch order, so the three backends train on the
same batches at the same learning rates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import numpy as np

from ..factors import SDIError

__all__ = ["TrainConfig", "learning_rate", "checkpoint_steps", "BatchOrder", "AdamWState", "adamw_init",
           "adamw_update", "clip_by_global_norm", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes:
        steps: optimiser steps (>= 1).
        batch_size: examples per step (>= 1); batches are drawn by shuffling
            the training set once per epoch.
        lr: peak learning rate (> 0).
        optimizer: ``"adamw"`` or ``"sgd"`` (SGD with ``momentum``).
        weight_decay: decoupled weight decay for AdamW, L2 for SGD (>= 0).
        momentum: SGD momentum in [0, 1).
        betas: AdamW betas.
        warmup: linear warm-up steps (>= 0).
        schedule: ``"cosine"`` (decay to ``min_lr_ratio * lr``) or ``"constant"``.
        min_lr_ratio: floor of the cosine schedule, in (0, 1].
        grad_clip: clip the global gradient norm to this (``None`` or 0: no clipping).
        n_checkpoints: checkpoints saved, evenly spaced, the last at ``steps`` (>= 1).
        eval_every: evaluate on ``eval_data`` every this many steps (0: only at the end).
        seed: seeds the batch order (the model's initial weights are the caller's).
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    n_checkpoints: int = 4
    eval_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("n_checkpoints", 1), ("eval_every", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise SDIError(f"TrainConfig.{name}={v!r}: must be an int >= {lo}.")
            object.__setattr__(self, name, int(v))
        if self.n_checkpoints > self.steps:
            raise SDIError(
                f"TrainConfig: n_checkpoints={self.n_checkpoints} exceeds steps={self.steps}; "
                "save at most one checkpoint per step (lower n_checkpoints or train longer)."
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SDIError(f"TrainConfig.lr={self.lr!r}: the learning rate must be a positive finite number.")
        if self.optimizer not in OPTIMIZERS:
            raise SDIError(f"TrainConfig.optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}.")
        if self.schedule not in SCHEDULES:
            raise SDIError(f"TrainConfig.schedule={self.schedule!r}: expected one of {SCHEDULES}.")
        if not (0 < self.min_lr_ratio <= 1):
            raise SDIError(
                f"TrainConfig.min_lr_ratio={self.min_lr_ratio!r}: must be in (0, 1] so that every "
                "checkpoint has a positive learning rate (its TracIn weight eta)."
            )
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise SDIError("TrainConfig: weight_decay must be >= 0 and momentum in [0, 1).")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise SDIError(f"TrainConfig.grad_clip={self.grad_clip!r}: must be None or >= 0.")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (1-based): warm-up, then the schedule."""
    if config.warmup and step <= config.warmup:
        return config.lr * step / config.warmup
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_steps(steps: int, n_checkpoints: int) -> list[int]:
    """``n_checkpoints`` distinct steps evenly spread over ``1..steps``, the last one ``steps``."""
    return sorted({max(1, round(steps * (k + 1) / n_checkpoints)) for k in range(n_checkpoints)})


class BatchOrder:
    """The training batches' row indices: every epoch visits each example once in a fresh order.

    ``next()`` returns ``min(batch_size, n)`` indices; a batch may span two
    epochs.  Seeded by ``TrainConfig.seed`` (a NumPy generator), so every
    backend draws the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.want = int(n), min(int(batch_size), int(n))
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(self.n)
        self.cursor = 0

    def next(self) -> np.ndarray:
        take, got = [], 0
        while got < self.want:
            if self.cursor == self.n:
                self.order, self.cursor = self.rng.permutation(self.n), 0
            m = min(self.want - got, self.n - self.cursor)
            take.append(self.order[self.cursor : self.cursor + m])
            self.cursor, got = self.cursor + m, got + m
        return np.concatenate(take)


class AdamWState(NamedTuple):
    """AdamW moments and step count (``m``, ``v``: name -> array like the parameters)."""

    count: int
    m: dict
    v: dict


def adamw_init(params: Mapping[str, np.ndarray]) -> AdamWState:
    """Zero moments for ``params`` (name -> float array)."""
    return AdamWState(0, {k: np.zeros_like(p) for k, p in params.items()}, {k: np.zeros_like(p) for k, p in params.items()})


def adamw_update(grads: Mapping[str, np.ndarray], state: AdamWState, params: Mapping[str, np.ndarray], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> tuple[dict, AdamWState]:
    """One AdamW step (``torch.optim.AdamW``'s rule); returns ``(new_params, new_state)``.

    Decoupled weight decay applies to parameters with ``ndim >= 2`` only (not
    to biases and LayerNorm scales), as in ``sdi_torch.train``.
    """
    b1, b2 = betas
    count = state.count + 1
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = b1 * state.m[k] + (1 - b1) * g
        v = b2 * state.v[k] + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** count)
        v_hat = v / (1 - b2 ** count)
        decayed = p * (1 - lr * weight_decay) if p.ndim >= 2 else p
        new_p[k] = decayed - lr * m_hat / (np.sqrt(v_hat) + eps)
        new_m[k], new_v[k] = m, v
    return new_p, AdamWState(count, new_m, new_v)


def clip_by_global_norm(grads: Mapping[str, np.ndarray], max_norm: float | None) -> dict:
    """``grads`` scaled so that their global L2 norm is at most ``max_norm`` (None or 0: unchanged)."""
    if not max_norm:
        return dict(grads)
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    scale = min(1.0, max_norm / (norm + 1e-6))
    return {k: g * scale for k, g in grads.items()}


def evaluate_logits(logits: np.ndarray, data, task=None) -> tuple[float, float]:
    """Mean per-example loss and accuracy of ``logits [N, T, V]`` on ``data`` (a ``TaskData``).

    The loss is each example's mean cross-entropy over its targets (``-100``
    ignored), averaged over examples; accuracy is ``task.accuracy`` (every
    answer right), or without a task every target position predicted right.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(data.targets)
    mask = targets != -100
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    loss = float(np.mean(np.where(mask, nll, 0.0).sum(-1) / np.maximum(mask.sum(-1), 1)))
    if task is not None:
        return loss, float(task.accuracy(data, logits))
    pred = logits.argmax(-1)
    return loss, float(np.mean(np.all((pred == targets) | ~mask, axis=1)))
