"""The backend protocol: the few functions a backend provides to be checked.

A *backend* is any object with the attributes and methods of :class:`Backend`
(structural typing: no base class to inherit).  The suite calls nothing else,
and it hands the backend only NumPy arrays, :mod:`sdi_core` objects and
:class:`~sdi_conformance.models.ModelSpec` descriptions, so it never imports a
framework.

Contracts every method must keep (the checks test each of them):

- **Canonical frame.**  Parameters are named and shaped as in the model spec:
  linear weights ``(d_out, d_in)``, embeddings ``(num, dim)``, whatever the
  framework's storage layout (a JAX kernel stored ``(d_in, d_out)`` is
  reported transposed).
- **Rows independent.**  Every per-example quantity of row ``b`` depends on
  example ``b`` only: the loss is a per-example loss ``[B]`` and is
  differentiated as ``sum_b loss_b`` (never a batch mean).
- **Steps in forward order.**  Step indices are assigned at forward time
  (``0 .. tau-1`` for the loop group, ``0`` for single-slot groups such as
  ``prelude`` and ``coda``); factor streams are returned in forward order.
- **No side effects.**  After any call, successful or failed: no hook,
  callback or mode is left installed, the model's parameters are bit-identical
  to what they were (checkpoints are loaded temporarily and restored), flags
  such as ``requires_grad`` / train mode are restored, and no global state
  (default dtype, ``jax.config``, NumPy's global RNG or error state) is changed.
- **Deterministic.**  Repeating a call with the same inputs returns identical
  arrays (set ``Capabilities.deterministic=False`` where the hardware makes
  reductions non-deterministic: repeats are then compared at a tight tolerance).
- **Errors.**  Bad input raises :class:`sdi_core.SDIError` (or a subclass)
  with a message naming the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from sdi_core import Checkpoint, Exact, FactorUse, Features, SDIError, TensorSketch

from .models import CANONICAL_MODELS, ModelSpec

__all__ = ["Backend", "Capabilities", "REQUIRED_METHODS", "validate_backend"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can do; the suite generates its checks from it.

    Attributes:
        float64: the backend computes in float64 when built with
            ``dtype="float64"``.  When true, every exact comparison is made at
            ``1e-10`` relative to the float64 NumPy reference, and
            ``check_float64`` is run.  When false, models are built with
            ``dtype="float32"`` and compared at ``2e-4``.
        jit: :meth:`Backend.featurize` compiles (``jax.jit``, ``torch.compile``,
            ...) and the backend also provides ``featurize_eager(handle,
            batches, sketch, checkpoints=None)``, the same computation without
            compilation; ``check_jit_matches_eager`` compares the two.  Every
            other check runs the compiled path, the one users run.
        devices: device names the backend accepts in :meth:`Backend.build`;
            the first is used by every check, and ``check_devices_agree``
            compares the others with it.
        models: names of the canonical models the backend can build (a subset
            of :data:`sdi_conformance.models.CANONICAL_MODELS`); checks on the
            other models are not generated.
        deterministic: repeat calls return bit-identical arrays.
    """

    float64: bool = True
    jit: bool = False
    devices: tuple[str, ...] = ("cpu",)
    models: frozenset[str] = field(default_factory=lambda: frozenset(CANONICAL_MODELS))
    deterministic: bool = True

    def __post_init__(self) -> None:
        devices = tuple(self.devices)
        if not devices or not all(isinstance(d, str) and d for d in devices):
            raise SDIError(f"Capabilities.devices must be a non-empty tuple of device names, got {self.devices!r}.")
        object.__setattr__(self, "devices", devices)
        models = frozenset(self.models)
        unknown = sorted(models - set(CANONICAL_MODELS))
        if unknown:
            raise SDIError(
                f"Capabilities.models names unknown canonical models {unknown}; "
                f"choose from {list(CANONICAL_MODELS)}."
            )
        object.__setattr__(self, "models", models)

    def describe(self) -> str:
        """One line for report headers."""
        models = ", ".join(m for m in CANONICAL_MODELS if m in self.models)
        return (
            f"float64={self.float64} jit={self.jit} devices={list(self.devices)} "
            f"deterministic={self.deterministic} models=[{models}]"
        )


@runtime_checkable
class Backend(Protocol):
    """What a backend provides.  ``handle`` is whatever :meth:`build` returns (opaque to the suite).

    Batches are dicts of NumPy arrays exactly as :meth:`ModelSpec.batch
    <sdi_conformance.models.ModelSpec.batch>` makes them (integer ids, float
    inputs in float64): convert them to your framework's arrays and dtype.
    Checkpoint sources (:class:`sdi_core.Checkpoint`) are canonical NumPy
    weight dicts like ``spec.weights``: convert them the way your users'
    checkpoints would be converted.
    """

    name: str
    """Short name shown in reports, e.g. ``"sdi_torch"``."""
    version: str
    """Version of the backend under test."""
    capabilities: Capabilities

    def build(self, spec: ModelSpec, *, dtype: str = "float64", device: str | None = None) -> Any:
        """Build the canonical model ``spec`` in the framework and return a handle.

        Args:
            spec: architecture description (``spec.arch``), canonical float64
                weights (``spec.weights``) and the parameters to attribute
                through (``spec.params``: names, canonical shapes, groups).
            dtype: ``"float64"`` or ``"float32"``: the model's parameter dtype.
            device: one of ``capabilities.devices`` (None: the first).

        Selecting a parameter that the model has but never uses, or one it
        does not have, must raise :class:`SDIError` naming it, here or at the
        first :meth:`featurize`.
        """
        ...

    def factor_stream(self, handle: Any, batch: Mapping[str, np.ndarray]) -> list[FactorUse]:
        """The factors of every use of every selected parameter for ``batch`` (current weights).

        Returns:
            One :class:`sdi_core.FactorUse` per use, in forward order (list
            order; ``use_index`` increasing when set), with forward-time step
            indices.  Arrays may be framework arrays (the suite converts them
            with :meth:`to_numpy`) with the shapes of the FactorUse table:
            ``activation [B, T, d_in]`` / ``grad_output [B, T, d_out]`` (or
            without the token axis ``T``).  ``grad_output`` is the gradient of
            each example's own loss.
        """
        ...

    def featurize(
        self,
        handle: Any,
        batches: Sequence[Mapping[str, np.ndarray]],
        sketch: TensorSketch | Exact,
        checkpoints: Sequence[Checkpoint] | None = None,
    ) -> Features:
        """Per-step features of all examples of ``batches`` (in order) at every checkpoint.

        Returns:
            :class:`sdi_core.Features` with ``data[k][group]`` of shape
            ``[N, S_g, D_g]``, ``layout == SketchPlan(sketch, spec.params).layout``,
            ``steps == spec.steps``, one :class:`~sdi_core.CheckpointInfo` per
            checkpoint (``id``: the checkpoint's ``name``, else a hash of its
            weights; ``eta``: its ``eta``, else 1.0).  ``checkpoints=None``
            featurises the handle's current weights with ``eta=1.0``.
        """
        ...

    def per_step_gradients(self, handle: Any, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Exact per-example, per-step gradients ``{name: [B, S_g, *canonical shape]}``.

        ``S_g`` is ``spec.steps[group]``.  Entry ``[b, s]`` is the gradient of
        example ``b``'s loss with respect to the copy of the weight used at
        step ``s`` (the loop body untied).
        """
        ...

    def full_gradients(self, handle: Any, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Exact per-example gradients of the *tied* model, ``{name: [B, *canonical shape]}``.

        Computed by plain per-example autodiff with respect to the shared
        weights (no untying), so that the suite can check that per-step
        gradients sum to it.
        """
        ...

    def parameters(self, handle: Any) -> dict[str, Any]:
        """The handle's current weights ``{name: canonical array}`` for every selected parameter."""
        ...

    def to_numpy(self, x: Any) -> np.ndarray:
        """Copy one array of the framework to a NumPy array on the host, keeping its dtype."""
        ...

    def side_effect_probe(self, handle: Any) -> Hashable:
        """A fingerprint of everything a call could leave behind, compared with ``==`` before and after.

        For example: the number of hooks on every module, the train/eval
        mode and ``requires_grad`` flags, the default dtype, the framework's
        global configuration.  Parameter values need not be included (the
        suite compares :meth:`parameters` itself).
        """
        ...


REQUIRED_METHODS = (
    "build",
    "factor_stream",
    "featurize",
    "per_step_gradients",
    "full_gradients",
    "parameters",
    "to_numpy",
    "side_effect_probe",
)
OPTIONAL_METHODS = ("featurize_eager",)


def validate_backend(backend: Any, where: str = "backend") -> None:
    """Raise :class:`SDIError` listing what ``backend`` lacks to implement :class:`Backend`."""
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(backend, m, None))]
    missing += [a for a in ("name", "version") if not isinstance(getattr(backend, a, None), str)]
    caps = getattr(backend, "capabilities", None)
    if not isinstance(caps, Capabilities):
        missing.append("capabilities (an sdi_conformance.Capabilities)")
    elif caps.jit and not callable(getattr(backend, "featurize_eager", None)):
        missing.append("featurize_eager (declared by capabilities.jit=True)")
    if missing:
        raise SDIError(
            f"{where} ({type(backend).__name__}) does not implement the sdi_conformance backend protocol: "
            f"missing {missing}. See sdi_conformance.Backend for what each one must do."
        )
