"""Sketch configurations, per-parameter hash tables and the feature layout.

Hash and sign tables are drawn in NumPy from a generator seeded by
``(seed, parameter name, canonical shape, role)``, so that

- the same seed gives the same sketch in every backend and on every device;
- adding or removing a parameter never changes the other parameters' hashes;
- a weight stored ``(d_in, d_out)`` in one framework and ``(d_out, d_in)`` in
  another gets the same sketch, because hashes are keyed by the canonical
  ``(rows, cols)`` orientation (see :mod:`sdi_core.factors`).

Everything here is pure Python/NumPy bookkeeping (a *plan*); array work lives
in :mod:`sdi_core.sketch`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .factors import ParamInfo, SDIError

ROUTES = ("auto", "fft", "exact_hash")


@dataclass(frozen=True)
class TensorSketch:
    """TensorSketch every selected parameter tensor to ``dim`` numbers per step.

    ``dim`` is the sketch dimension *of each parameter tensor* (as in the
    paper's implementation): a loop body of 16 tensors sketched at
    ``dim=2048`` stores ``16 * 2048`` numbers per example and step.  A tensor
    with at most ``dim`` elements is stored exactly instead (its sketch would
    be no smaller).

    Args:
        dim: sketch dimension ``m`` per parameter tensor, a positive int.
        seed: non-negative int; the same seed gives the same sketch in every
            backend.  Independent seeds give independent sketches (average
            them for lower variance and error bars).
        route: how outer-product uses are sketched: ``"fft"`` (sum over tokens
            in the frequency domain, one inverse FFT), ``"exact_hash"``
            (form each example's ``sum_t g_t a_t^T`` with one batched matmul,
            then hash it), or ``"auto"`` (time both on the first use of each
            shape and keep the faster; see :mod:`sdi_core.engine`).  Both
            routes give the same features to float rounding.
        time_routes: with ``route="auto"``, time the routes (default); False
            decides by the cost model :func:`sdi_core.sketch.choose_route`
            alone (deterministic, no timing runs).
    """

    dim: int
    seed: int = 0
    route: str = "auto"
    time_routes: bool = True

    kind = "tensorsketch"

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim <= 0:
            raise SDIError(
                f"TensorSketch(dim={self.dim!r}): the sketch dimension must be a positive int "
                "(typical values 2048-32768)."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise SDIError(f"TensorSketch(seed={self.seed!r}): the seed must be a non-negative int.")
        if self.route not in ROUTES:
            raise SDIError(f"TensorSketch(route={self.route!r}): expected one of {ROUTES}.")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "seed", int(self.seed))

    def fingerprint(self) -> dict:
        """What must agree between train and query features (the route does not matter)."""
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed}


@dataclass(frozen=True)
class Exact:
    """No sketch: features are the flattened exact per-step gradients.

    For small models, and as the ground truth the sketches are tested against.
    Each parameter occupies ``numel`` features, in row-major order of its
    canonical shape.
    """

    kind = "exact"

    def fingerprint(self) -> dict:
        return {"kind": self.kind}


def sketch_from_fingerprint(fp: Mapping[str, Any]) -> TensorSketch | Exact:
    """Rebuild a sketch configuration from :meth:`TensorSketch.fingerprint`."""
    if fp.get("kind") == "exact":
        return Exact()
    if fp.get("kind") == "tensorsketch":
        return TensorSketch(dim=int(fp["dim"]), seed=int(fp["seed"]))
    raise SDIError(f"Unknown sketch fingerprint {dict(fp)!r}.")


def _rng(seed: int, name: str, shape: Sequence[int], role: str) -> np.random.Generator:
    key = f"{name}|{'x'.join(str(int(s)) for s in shape)}|{role}".encode()
    words = np.frombuffer(hashlib.sha256(key).digest()[:16], dtype=np.uint32)
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, *words.tolist()])


def draw_hash(seed: int, name: str, shape: Sequence[int], role: str, length: int, m: int):
    """Hash ``h: [length] -> [m]`` (int64) and sign ``s: [length] -> {+1, -1}`` (float64)."""
    rng = _rng(seed, name, shape, role)
    h = rng.integers(0, m, size=length, dtype=np.int64)
    s = rng.integers(0, 2, size=length, dtype=np.int64) * 2.0 - 1.0
    return h, s


@dataclass(frozen=True, eq=False)
class ParamSketchSpec:
    """How one parameter's per-example gradient becomes ``width`` features.

    Modes:
        ``"exact"``: the flattened canonical gradient (``width = numel``).
        ``"tensor"``: TensorSketch of the ``(rows, cols)`` matrix view: row
            hash/sign ``h_rows, s_rows``, column hash/sign ``h_cols, s_cols``;
            the flat combined hash is ``(h_rows[i] + h_cols[j]) mod m`` with
            sign ``s_rows[i] * s_cols[j]`` (``width = m``).
        ``"count"``: CountSketch of a 1-D parameter with ``h, s`` (``width = m``).
    """

    param: ParamInfo
    mode: str
    width: int
    h_rows: np.ndarray | None = None
    s_rows: np.ndarray | None = None
    h_cols: np.ndarray | None = None
    s_cols: np.ndarray | None = None
    h: np.ndarray | None = None
    s: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def flat_table(self):
        """:class:`~sdi_core.countsketch.HashTable` over the flattened canonical gradient (``numel``)."""
        from .countsketch import HashTable

        if "flat" not in self._cache:
            if self.mode == "tensor":
                idx = (self.h_rows[:, None] + self.h_cols[None, :]) % self.width
                sgn = self.s_rows[:, None] * self.s_cols[None, :]
                self._cache["flat"] = HashTable(idx.reshape(-1), sgn.reshape(-1), self.width)
            elif self.mode == "count":
                self._cache["flat"] = HashTable(self.h, self.s, self.width)
            else:
                raise SDIError(f"Parameter {self.param.name!r} is stored exactly and has no hash.")
        return self._cache["flat"]

    def axis_table(self, axis: str):
        """Row (``"rows"``) or column (``"cols"``) CountSketch of a ``"tensor"`` spec."""
        from .countsketch import HashTable

        if self.mode != "tensor":
            raise SDIError(f"Parameter {self.param.name!r} is not TensorSketched (mode {self.mode!r}).")
        if axis not in self._cache:
            h, s = (self.h_rows, self.s_rows) if axis == "rows" else (self.h_cols, self.s_cols)
            self._cache[axis] = HashTable(h, s, self.width)
        return self._cache[axis]


def make_spec(sketch: TensorSketch | Exact, param: ParamInfo) -> ParamSketchSpec:
    """Build the sketch spec of one parameter (pure NumPy, deterministic)."""
    if isinstance(sketch, Exact) or param.numel <= sketch.dim:
        return ParamSketchSpec(param=param, mode="exact", width=param.numel)
    m = sketch.dim
    mat = param.matrix_shape
    if mat is None:
        h, s = draw_hash(sketch.seed, param.name, param.shape, "flat", param.numel, m)
        return ParamSketchSpec(param=param, mode="count", width=m, h=h, s=s)
    rows, cols = mat
    h_r, s_r = draw_hash(sketch.seed, param.name, mat, "rows", rows, m)
    h_c, s_c = draw_hash(sketch.seed, param.name, mat, "cols", cols, m)
    return ParamSketchSpec(param=param, mode="tensor", width=m, h_rows=h_r, s_rows=s_r, h_cols=h_c, s_cols=s_c)


@dataclass(frozen=True)
class GroupLayout:
    """Parameters of one slot group and where each one sits in the group's feature axis."""

    name: str
    params: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]  # (start, stop) per parameter

    @property
    def width(self) -> int:
        return self.offsets[-1][1] if self.offsets else 0


@dataclass(frozen=True)
class FeatureLayout:
    """Everything that must agree between two feature sets before they can be contracted.

    Attributes:
        sketch: the sketch fingerprint, e.g. ``{"kind": "tensorsketch", "dim": 4096, "seed": 0}``.
        groups: one :class:`GroupLayout` per slot group, in slot order
            (``prelude`` before ``loop`` before ``coda`` by convention).
        param_shapes: canonical shape of every parameter, by name.
    """

    sketch: Mapping[str, Any]
    groups: tuple[GroupLayout, ...]
    param_shapes: Mapping[str, tuple[int, ...]]

    def group(self, name: str) -> GroupLayout:
        for g in self.groups:
            if g.name == name:
                return g
        raise SDIError(f"No parameter group {name!r}; groups are {[g.name for g in self.groups]}.")

    def model_fingerprint(self) -> str:
        """A short hash of the parameter names, shapes and groups."""
        items = [(g.name, p, tuple(self.param_shapes[p])) for g in self.groups for p in g.params]
        return hashlib.sha256(repr(items).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "sketch": dict(self.sketch),
            "groups": [
                {"name": g.name, "params": list(g.params), "offsets": [list(o) for o in g.offsets]}
                for g in self.groups
            ],
            "param_shapes": {k: list(v) for k, v in self.param_shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureLayout":
        return cls(
            sketch=dict(d["sketch"]),
            groups=tuple(
                GroupLayout(g["name"], tuple(g["params"]), tuple(tuple(o) for o in g["offsets"]))
                for g in d["groups"]
            ),
            param_shapes={k: tuple(v) for k, v in d["param_shapes"].items()},
        )

    def diff(self, other: "FeatureLayout", *, ordered: bool = True) -> str | None:
        """A sentence naming the first field that differs, or None when compatible.

        Parameters are matched by name and canonical shape.  With ``ordered``
        (writing one store, concatenating batches) the groups and the
        parameters within each group must also come in the same order; without
        it (contracting train with query features) any order is accepted and
        :meth:`column_order` says how to line the columns up.
        """
        if dict(self.sketch) != dict(other.sketch):
            return f"sketch differs: {dict(self.sketch)} vs {dict(other.sketch)}"
        names_a, names_b = [g.name for g in self.groups], [g.name for g in other.groups]
        if sorted(names_a) != sorted(names_b) or (ordered and names_a != names_b):
            return f"parameter groups differ: {names_a} vs {names_b}"
        for ga in self.groups:
            gb = other.group(ga.name)
            if sorted(ga.params) != sorted(gb.params) or (ordered and ga.params != gb.params):
                only_a = sorted(set(ga.params) - set(gb.params))
                only_b = sorted(set(gb.params) - set(ga.params))
                return (
                    f"model structure differs: parameters of group {ga.name!r} differ (only in first: {only_a}, "
                    f"only in second: {only_b}{'' if only_a or only_b else ', or in another order'})"
                )
            for p, (lo, hi) in zip(ga.params, ga.offsets):
                shp_a, shp_b = tuple(self.param_shapes[p]), tuple(other.param_shapes.get(p, ()))
                lo_b, hi_b = gb.offsets[gb.params.index(p)]
                if shp_a != shp_b or hi - lo != hi_b - lo_b:
                    return f"model structure differs: parameter {p!r} has shape {shp_a} vs {shp_b}"
        return None

    def column_order(self, other: "FeatureLayout") -> dict[str, np.ndarray | None]:
        """Per group, the columns of ``other`` in this layout's parameter order (None where already equal).

        ``other_array[..., order[g]]`` has this layout's columns; call after
        :meth:`diff` (``ordered=False``) found no difference.
        """
        out: dict[str, np.ndarray | None] = {}
        for ga in self.groups:
            gb = other.group(ga.name)
            if ga.params == gb.params:
                out[ga.name] = None
                continue
            where = dict(zip(gb.params, gb.offsets))
            out[ga.name] = np.concatenate([np.arange(*where[p], dtype=np.int64) for p in ga.params])
        return out


class SketchPlan:
    """Specs and offsets for a set of parameters under one sketch (pure bookkeeping).

    Args:
        sketch: :class:`TensorSketch` or :class:`Exact`.
        params: the selected parameters, each with its group.  Within a group,
            features are laid out in the order given here.
        group_order: slot order of the groups; defaults to ``prelude``,
            ``loop``, ``coda`` first, then others in order of appearance.
    """

    def __init__(
        self,
        sketch: TensorSketch | Exact,
        params: Iterable[ParamInfo],
        group_order: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(sketch, (TensorSketch, Exact)):
            raise SDIError(
                f"sketch must be sdi_core.TensorSketch(dim=..., seed=...) or sdi_core.Exact(), "
                f"got {type(sketch).__name__}."
            )
        params = list(params)
        if not params:
            raise SDIError("No parameters selected: select at least one parameter to attribute through.")
        seen: dict[str, ParamInfo] = {}
        for p in params:
            if not isinstance(p, ParamInfo):
                raise SDIError(f"SketchPlan params must be ParamInfo, got {type(p).__name__}.")
            if p.name in seen:
                raise SDIError(f"Parameter {p.name!r} is selected twice; select each parameter once.")
            seen[p.name] = p
        self.sketch = sketch
        self.params = seen
        appearance: list[str] = []
        for p in params:
            if p.group not in appearance:
                appearance.append(p.group)
        if group_order is None:
            conventional = [g for g in ("prelude", "loop", "coda") if g in appearance]
            group_order = conventional + [g for g in appearance if g not in conventional]
        else:
            group_order = list(group_order)
            missing = [g for g in appearance if g not in group_order]
            if missing:
                raise SDIError(f"group_order {group_order} does not list the groups {missing}.")
        self.specs: dict[str, ParamSketchSpec] = {name: make_spec(sketch, p) for name, p in seen.items()}
        groups = []
        self.offsets: dict[str, tuple[str, int, int]] = {}
        for g in group_order:
            names = tuple(p.name for p in params if p.group == g)
            offs = []
            start = 0
            for n in names:
                stop = start + self.specs[n].width
                offs.append((start, stop))
                self.offsets[n] = (g, start, stop)
                start = stop
            groups.append(GroupLayout(g, names, tuple(offs)))
        self.layout = FeatureLayout(
            sketch=sketch.fingerprint(),
            groups=tuple(groups),
            param_shapes={n: p.shape for n, p in seen.items()},
        )

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.layout.groups)

    def spec(self, name: str) -> ParamSketchSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise SDIError(
                f"Parameter {name!r} is not in the sketch plan; selected parameters are "
                f"{sorted(self.specs)[:8]}{' ...' if len(self.specs) > 8 else ''}."
            ) from None

    def features_per_step(self) -> dict[str, int]:
        """Feature width of each group (numbers stored per example and step)."""
        return {g.name: g.width for g in self.layout.groups}

    def __repr__(self) -> str:
        widths = ", ".join(f"{g.name}: {len(g.params)} tensors, {g.width} features/step" for g in self.layout.groups)
        return f"SketchPlan({self.sketch!r}; {widths})"


def total_numel(params: Iterable[ParamInfo]) -> int:
    return sum(math.prod(p.shape) for p in params)
