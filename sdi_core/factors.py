"""The factor-stream types that every backend hands to the core.

A *use* is one application of a selected parameter inside the forward pass
(one ``F.linear`` call, one LayerNorm scale, one embedding lookup, ...).  For
every use, autograd already holds two factors whose product is that use's
per-example gradient; the core only ever sees those factors, never a model.

Orientation.  Every parameter has a *canonical* shape that does not depend on
how a framework stores it:

- ``linear``: ``(d_out, d_in)``.  A JAX/flax kernel stored ``(d_in, d_out)``
  is reported with canonical shape ``(d_out, d_in)``; its uses still report
  ``activation [.., d_in]`` and ``grad_output [.., d_out]``.
- ``embedding``: ``(num_embeddings, dim)``, as both frameworks store it.  A
  tied unembedding (``logits = h @ E^T``) is a ``linear`` use of the same
  parameter, with ``d_out = num_embeddings`` and ``d_in = dim``: same frame.
- ``bias``, ``scale``: ``(d,)``.
- tensors of rank 3 or more are viewed as ``(shape[0], prod(shape[1:]))``.

Exact features and sketches are always taken of the gradient in the canonical
frame, so the same weights give the same features in every framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

UseKind = Literal["linear", "bias", "scale", "embedding", "dense"]
USE_KINDS: tuple[str, ...] = ("linear", "bias", "scale", "embedding", "dense")


class SDIError(ValueError):
    """Bad input to the SDI library: the message names the problem and the fix."""


@dataclass(frozen=True)
class ParamInfo:
    """Static description of one selected parameter.

    Attributes:
        name: dotted parameter name, e.g. ``"block.mlp.fc1.weight"``.  Sketch
            hashes are keyed by it, so it must be the same in every backend.
        shape: canonical shape (see the module docstring), a tuple of ints.
        group: the slot group the parameter belongs to, e.g. ``"loop"``,
            ``"prelude"``, ``"coda"``.  Uses of a parameter only ever land in
            the steps of its own group.
    """

    name: str
    shape: tuple[int, ...]
    group: str = "loop"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SDIError(f"ParamInfo.name must be a non-empty string, got {self.name!r}.")
        shape = tuple(int(s) for s in self.shape)
        if len(shape) == 0 or any(s <= 0 for s in shape):
            raise SDIError(
                f"Parameter {self.name!r}: canonical shape must have rank >= 1 and positive "
                f"sizes, got {self.shape!r}."
            )
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        """Number of scalar weights."""
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        """``(rows, cols)`` view used for TensorSketch, or None for 1-D parameters."""
        if len(self.shape) == 1:
            return None
        return (self.shape[0], math.prod(self.shape[1:]))


@dataclass
class FactorUse:
    """The factors of one use of one parameter at one step, for a batch of B examples.

    Shapes by ``kind`` (``T`` is the token axis; it may be absent, i.e. the
    arrays may be ``[B, d]`` instead of ``[B, T, d]``):

    ================  ==========================  ===========================  =========================
    kind              activation                  grad_output                  per-example gradient
    ================  ==========================  ===========================  =========================
    ``linear``        ``[B, T, d_in]``            ``[B, T, d_out]``            ``sum_t g_t a_t^T``
    ``bias``          ``None``                    ``[B, T, d]``                ``sum_t g_t``
    ``scale``         ``[B, T, d]`` (``xhat``)    ``[B, T, d]``                ``sum_t xhat_t * g_t``
    ``embedding``     ``[B, T]`` integer ids      ``[B, T, dim]``              ``sum_t onehot(id_t) g_t^T``
    ``dense``         ``None``                    ``[B, *canonical shape]``    the array itself
    ================  ==========================  ===========================  =========================

    ``grad_output`` is the gradient of the *per-example* loss with respect to
    the use's output (rows independent).  For ``embedding``, ids equal to
    ``ignore_index`` (e.g. a ``padding_idx``) contribute nothing.

    ``row_slice`` (linear only) says that the use touches only rows
    ``[start, stop)`` of the canonical weight, as ``nn.MultiheadAttention``'s
    q/k/v slices of ``in_proj_weight`` do (``bias`` uses may carry it too).

    Attributes:
        param: dotted name of the parameter (a key of the sketch plan).
        step: 0-based step index inside the parameter's group, assigned at
            forward time.  Groups with a single slot use step 0.
        kind: one of ``"linear"``, ``"bias"``, ``"scale"``, ``"embedding"``, ``"dense"``.
        activation, grad_output: arrays of any array-API namespace.
        use_index: forward-time order of this use in the whole pass (for checks).
    """

    param: str
    step: int
    kind: str
    activation: Any
    grad_output: Any
    use_index: int = -1
    row_slice: tuple[int, int] | None = None
    ignore_index: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in USE_KINDS:
            raise SDIError(
                f"Use of parameter {self.param!r} at step {self.step}: unknown kind {self.kind!r}; "
                f"expected one of {USE_KINDS}."
            )


@dataclass
class StackedUse:
    """The factors of one use of one parameter at ``S`` steps at once, for a batch of B examples.

    This is what a ``lax.scan`` (or any stacked capture) produces: the step
    axis is axis 1, one slice per entry of ``steps``.  Shapes by ``kind``
    (``T`` is the token axis and is always present):

    ================  ==========================  ===========================
    kind              activation                  grad_output
    ================  ==========================  ===========================
    ``linear``        ``[B, S, T, d_in]``         ``[B, S, T, d_out]``
    ``bias``          ``None``                    ``[B, S, T, d]``
    ``scale``         ``[B, S, T, d]`` (``xhat``) ``[B, S, T, d]``
    ``embedding``     ``[B, S, T]`` integer ids   ``[B, S, T, dim]``
    ``dense``         ``None``                    ``[B, S, *canonical shape]``
    ================  ==========================  ===========================

    Attributes:
        param, kind, row_slice, ignore_index: as for :class:`FactorUse`.
        steps: the ``S`` step indices (non-negative ints, static), one per
            slice of axis 1.  They may repeat (two uses of a weight in one
            step stacked together): contributions to a step add.
    """

    param: str
    kind: str
    activation: Any
    grad_output: Any
    steps: tuple[int, ...]
    row_slice: tuple[int, int] | None = None
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in USE_KINDS:
            raise SDIError(
                f"Stacked use of parameter {self.param!r}: unknown kind {self.kind!r}; expected one of {USE_KINDS}."
            )
        try:
            steps = tuple(int(s) for s in self.steps)
        except TypeError:
            raise SDIError(
                f"Stacked use of parameter {self.param!r}: steps must be a sequence of ints, got {self.steps!r}."
            ) from None
        if not steps or any(s < 0 for s in steps):
            raise SDIError(
                f"Stacked use of parameter {self.param!r}: steps must be non-empty non-negative ints, got {steps}."
            )
        self.steps = steps
