"""Backends by registry: the ``sdi.backends`` entry-point group.

A backend is a :class:`Backend`: a frozen record of plain functions that
build, train, run and featurise the demo's looped transformer in one
framework, and featurise stores for ``sdi featurize``.  A distribution
registers one in its ``pyproject.toml``::

    [project.entry-points."sdi.backends"]
    mybackend = "my_package.sdi_app:BACKEND"

and ``sdi --help`` lists it, ``sdi demo --backend mybackend`` runs it.  The
module an entry point names must not import its framework at import time:
the functions import it when they are called, so listing the backends (and
every ``--backend numpy`` command) loads no framework.

The command line looks backends up here by name and never imports one by
its module name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from ..factors import SDIError
from ..features import Checkpoint

__all__ = ["Backend", "TrainedModel", "GROUP", "available", "get_backend", "backend_names", "describe_backends"]

GROUP = "sdi.backends"


@dataclass
class TrainedModel:
    """What :attr:`Backend.train` returns.

    Attributes:
        model: the backend's trained model object (whatever its other
            functions take).
        checkpoints: :class:`sdi_core.Checkpoint` per saved checkpoint, in step
            order, ``eta`` the learning rate in force and ``step`` set; the
            ``source`` is whatever :attr:`Backend.featurize` accepts.
        losses: ``[steps]`` mean training loss of every optimiser step.
        evals: ``(step, loss, accuracy)`` on the evaluation data.
    """

    model: Any
    checkpoints: list[Checkpoint]
    losses: np.ndarray
    evals: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        """Accuracy at the last evaluation (NaN without one)."""
        return self.evals[-1][2] if self.evals else float("nan")


@contextlib.contextmanager
def _no_threads(n: int | None):
    yield


@dataclass(frozen=True)
class Backend:
    """One framework's entry in the ``sdi`` application.

    Every function imports its framework when called, never at import time.
    Data are NumPy: ``tokens``/``targets`` int ``[N, T]`` (``-100`` ignored).

    Attributes:
        name: the ``--backend`` name.
        description: one line for ``sdi --help``.
        build_model: ``(config: LoopedConfig, seed: int) -> model``, the demo's
            looped transformer with seeded initial weights.
        train: ``(model, data, train_config, *, out_dir, eval_data, task,
            progress) -> TrainedModel``: trains in place with
            :class:`sdi_core.app.training.TrainConfig` (AdamW, the shared
            schedule and batch order), evaluates ``eval_data`` (a
            ``TaskData``) with ``task.accuracy``, writes checkpoint files to
            ``out_dir`` (None: none).
        logits: ``(model, tokens [B, T], tau=None) -> float [B, T, V]`` NumPy.
        featurize: ``(model, sketch, data, checkpoints, *, groups, tau,
            example_ids, batch_size, progress) -> Features`` with NumPy
            arrays; ``groups`` a subset of ``("prelude", "loop", "coda")``.
        load_checkpoint: ``path -> (LoopedConfig, weights)``: a checkpoint
            file this backend's ``train`` wrote, as canonical NumPy weights.
        store_featurizer: ``(config, checkpoints, sketch, data, *, groups,
            tau, summed, device, dtype) -> featurize_fn`` for
            :func:`sdi_core.store.featurize_to_store` (row ranges ->
            Features) on canonical weights (``sdi featurize``); None: the
            backend has no store path.
        check_device: ``device -> None``, raising :class:`SDIError` for a
            ``--device`` the framework cannot use (checked before any work);
            None: the backend has no devices to choose.
        threads: ``n -> context manager`` limiting the framework's CPU
            threads while a command runs (``n`` None: unchanged).
        conformance: ``"pkg.module:attr"`` of this framework's backend for the
            conformance suite (``pytest --sdi-backend NAME`` resolves a
            registered name through it); None: none.
        distributed: ``() -> module`` with ``process_group``,
            ``featurize_to_store`` and ``score_store`` for runs under this
            framework's launcher (``sdi_torch.distributed``); None: none.
    """

    name: str
    description: str
    build_model: Callable[..., Any]
    train: Callable[..., TrainedModel]
    logits: Callable[..., np.ndarray]
    featurize: Callable[..., Any]
    load_checkpoint: Callable[[str], tuple[Any, dict]]
    store_featurizer: Callable[..., Callable] | None = None
    check_device: Callable[[str], None] | None = None
    threads: Callable[[int | None], ContextManager] = _no_threads
    distributed: Callable[[], Any] | None = None
    conformance: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SDIError(f"Backend name {self.name!r} must be an identifier (it is a --backend value).")
        for f in ("build_model", "train", "logits", "featurize", "load_checkpoint"):
            if not callable(getattr(self, f)):
                raise SDIError(f"Backend {self.name!r}: {f} must be callable, got {type(getattr(self, f)).__name__}.")


def _entry_points() -> list:
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=GROUP))
    return list(eps.get(GROUP, []))  # Python < 3.10 style mapping


def backend_names() -> list[str]:
    """Names of the installed backends (from the entry points; nothing is imported), sorted, numpy first."""
    names = sorted({ep.name for ep in _entry_points()})
    return sorted(names, key=lambda n: (n != "numpy", n))


def available() -> dict[str, Any]:
    """``name -> entry point`` of the installed backends (not loaded)."""
    out: dict[str, Any] = {}
    for ep in _entry_points():
        out.setdefault(ep.name, ep)
    return out


def get_backend(name: str) -> Backend:
    """Load the backend registered as ``name``.

    Raises:
        SDIError: no such backend (listing the installed ones), or its entry
            point does not load or is not a :class:`Backend`.
    """
    eps = available()
    if name not in eps:
        installed = ", ".join(backend_names()) or "none"
        raise SDIError(
            f"unknown backend {name!r}; installed backends: {installed}. Install the one you want (e.g. "
            f"pip install 'sdi[torch]') or register yours under the {GROUP!r} entry-point group."
        )
    ep = eps[name]
    try:
        obj = ep.load()
    except ImportError as exc:
        raise SDIError(f"backend {name!r} ({ep.value}) cannot be imported: {exc}. Reinstall the package that "
                       "provides it.") from None
    if not isinstance(obj, Backend):
        raise SDIError(f"backend {name!r} ({ep.value}) is a {type(obj).__name__}, not an sdi_core.app.backends."
                       "Backend; point the entry point at a Backend(...) object.")
    if obj.name != name:
        raise SDIError(f"backend entry point {name!r} ({ep.value}) holds a Backend named {obj.name!r}; the names "
                       "must agree.")
    return obj


def describe_backends() -> str:
    """The ``installed backends`` epilog of ``sdi --help``: one line per backend with its description.

    Loading an entry point imports the module it names, which must not import
    its framework; a backend whose module fails to load is listed with the error.
    """
    lines = ["installed backends (--backend NAME):"]
    for name in backend_names() or []:
        try:
            desc = get_backend(name).description
        except SDIError as exc:
            desc = f"(does not load: {exc})"
        lines.append(f"  {name:<8} {desc}")
    if len(lines) == 1:
        lines.append("  none (reinstall sdi: pip install -e .)")
    return "\n".join(lines)
