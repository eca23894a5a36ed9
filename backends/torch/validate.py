"""PyTorch side of counterfactual validation: a :class:`sdi_core.validate.Retrainer` for looped GPTs.

:class:`LoopedGPTRetrainer` retrains :class:`sdi_torch.models.LoopedGPT` with
:func:`sdi_torch.train.train` on a subset of a fixed training set, from the
initialisation and schedule of a seed, and reads the query loss out after
loop step ``t`` by running the model with ``tau=t`` (the coda and head applied
to the hidden state after step ``t``: an early-exit readout).  It holds only
NumPy arrays and plain configs, so it pickles into worker processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from sdi_core.factors import SDIError
from sdi_core.reference.looped_transformer import LoopedConfig

from .models import LoopedGPT, per_example_cross_entropy
from .train import TrainConfig, train

__all__ = ["LoopedGPTRetrainer", "initial_model"]


def initial_model(config: LoopedConfig, seed: int) -> LoopedGPT:
    """A :class:`LoopedGPT` with the initial weights of ``seed`` (the caller's torch RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return LoopedGPT(config)


@dataclass
class LoopedGPTRetrainer:
    """Retrain a looped GPT on subsets of ``train_tokens`` (see the module docstring).

    Attributes:
        model_config: the architecture.
        train_config: the schedule (its ``seed`` is replaced by each job's seed).
        train_tokens, train_targets: int ``[N_train, T]`` the full training set
            and the targets it is trained on (auxiliary targets included).
        query_tokens, query_targets: int ``[Q, T]`` the queries and the targets
            whose loss is read out.
        threads: torch intra-op threads in each worker process.
        leave_out: how a retraining leaves examples out.  ``"mask"`` (default):
            the full run's batches, in the full run's order, with the left-out
            examples' losses weighted 0, so two retrainings differ only by the
            examples they leave out.  ``"subset"``: train on the kept examples
            alone, with batches drawn from them (a new batch order per subset,
            which adds training noise to every comparison).
        warm_start, warm_start_step: when given, every retraining starts from
            these weights (NumPy, by name: the full run's after step
            ``warm_start_step``) and runs the rest of the schedule; only the
            part of training after that step is counterfactual.
    """

    model_config: LoopedConfig
    train_config: TrainConfig
    train_tokens: np.ndarray
    train_targets: np.ndarray
    query_tokens: np.ndarray
    query_targets: np.ndarray
    threads: int = 1
    leave_out: str = "mask"
    warm_start: dict | None = None
    warm_start_step: int = 0

    def __post_init__(self) -> None:
        if self.leave_out not in ("mask", "subset"):
            raise SDIError(f"LoopedGPTRetrainer.leave_out={self.leave_out!r}: expected 'mask' or 'subset'.")
        for name in ("train_tokens", "train_targets", "query_tokens", "query_targets"):
            setattr(self, name, np.ascontiguousarray(np.asarray(getattr(self, name), dtype=np.int64)))
        if self.train_tokens.shape != self.train_targets.shape or self.train_tokens.ndim != 2:
            raise SDIError(f"LoopedGPTRetrainer: train tokens {self.train_tokens.shape} and targets "
                           f"{self.train_targets.shape} must both be [N, T].")
        if self.query_tokens.shape != self.query_targets.shape or self.query_tokens.ndim != 2:
            raise SDIError(f"LoopedGPTRetrainer: query tokens {self.query_tokens.shape} and targets "
                           f"{self.query_targets.shape} must both be [Q, T].")

    @property
    def n_train(self) -> int:
        return int(self.train_tokens.shape[0])

    @property
    def n_query(self) -> int:
        return int(self.query_tokens.shape[0])

    @property
    def readout_steps(self) -> tuple[int, ...]:
        return tuple(range(1, self.model_config.tau + 1))

    def config(self) -> dict:
        """Architecture, schedule and a hash of the data: what the cache must match."""
        import hashlib

        h = hashlib.sha256()
        arrays = [self.train_tokens, self.train_targets, self.query_tokens, self.query_targets]
        arrays += [np.asarray(self.warm_start[k]) for k in sorted(self.warm_start)] if self.warm_start else []
        for a in arrays:
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        tc = self.train_config.to_dict()
        tc.pop("seed", None)
        return {"backend": "torch", "model": dataclasses.asdict(self.model_config), "train": tc,
                "leave_out": self.leave_out, "warm_start_step": self.warm_start_step if self.warm_start else 0,
                "data_sha256": h.hexdigest(), "torch": torch.__version__}

    def setup_worker(self) -> None:
        torch.set_num_threads(self.threads)

    def _start(self, seed: int) -> LoopedGPT:
        if self.warm_start is None:
            return initial_model(self.model_config, seed)
        return LoopedGPT.from_numpy(self.model_config, self.warm_start, dtype=torch.float32)

    def initial_weights(self, seed: int) -> dict[str, np.ndarray]:
        return self._start(seed).to_numpy()

    def retrain(self, train_indices: np.ndarray, seed: int) -> LoopedGPT:
        idx = np.asarray(train_indices, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= self.n_train:
            raise SDIError(f"retrain: indices must be a non-empty [n] array in 0..{self.n_train - 1}.")
        model = self._start(seed)
        config = dataclasses.replace(self.train_config, seed=int(seed), eval_every=0)
        if self.leave_out == "mask":
            weight = np.zeros(self.n_train)
            weight[idx] = 1.0
            data = {"tokens": self.train_tokens, "targets": self.train_targets, "example_weight": weight}
        else:
            data = {"tokens": self.train_tokens[idx], "targets": self.train_targets[idx]}
        train(model, data, config, progress=False, start_step=self.warm_start_step if self.warm_start else 0)
        return model

    def weights(self, model: Any) -> dict[str, np.ndarray]:
        return model.to_numpy()

    @torch.no_grad()
    def query_losses(self, model: Any, steps: Sequence[int]) -> np.ndarray:
        model.eval()
        tokens = torch.as_tensor(self.query_tokens)
        targets = torch.as_tensor(self.query_targets)
        return np.stack([per_example_cross_entropy(model(tokens, tau=int(t)), targets).double().numpy()
                         for t in steps])
