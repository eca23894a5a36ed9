"""What a capture saw: which selected parameters were captured, as what, at which steps.

Both backends fill the same :class:`Coverage` and store it in ``Features.meta["coverage"]``;
:meth:`Coverage.describe` prints it.  Use kinds are one vocabulary across backends:

- ``linear``: ``y = a W^T`` (``nn.Linear``, matmul, einsum that is a linear map, ``dot_general``);
- ``embedding``: ``y = W[ids]``;
- ``scale``: ``y = xhat * gamma`` (norm weights, elementwise scales);
- ``bias``: ``y = x + b``;
- ``dense``: the exact per-example gradient of the use (an N-D broadcast parameter, or a use with no
  factor form taken with the framework's autodiff).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["Coverage", "KINDS"]

KINDS = ("linear", "embedding", "scale", "bias", "dense")


@dataclass
class Coverage:
    """The capture's account of one featurisation (merged over batches and checkpoints).

    Attributes:
        uses: ``{param: {step: {kind: count}}}``: uses of each selected parameter per step slot (loop
            steps ``0 .. S-1``; side groups have the one slot ``0``) and kind (see :data:`KINDS`).
        groups: ``{param: group}`` for every selected parameter, in layout order.
        steps_run: ``{group: S}``: the most step slots any batch ran.
        steps_with_grad: ``{group: k}``: how many of those slots had a use with gradients enabled in
            some batch (a ``torch.no_grad()`` / ``stop_gradient`` prefix of steps runs without).
        unused: selected parameters never used with gradients enabled (their features are zero).
    """

    uses: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    steps_run: dict = field(default_factory=dict)
    steps_with_grad: dict = field(default_factory=dict)

    @property
    def unused(self) -> list[str]:
        return [p for p in self.groups if not any(sum(k.values()) for k in self.uses.get(p, {}).values())]

    def add(self, param: str, step: int, kind: str, count: int = 1) -> None:
        """Count ``count`` uses of ``param`` of ``kind`` at step slot ``step``."""
        if kind not in KINDS:
            raise ValueError(f"unknown use kind {kind!r}; one of {KINDS}")
        per = self.uses.setdefault(param, {}).setdefault(int(step), {})
        per[kind] = per.get(kind, 0) + int(count)

    def merge(self, other: "Coverage") -> "Coverage":
        """Counts of both, the most of each (a batch's counts against another's: per-batch maxima)."""
        out = Coverage(groups=dict(self.groups) or dict(other.groups))
        for src in (self, other):
            for p, steps in src.uses.items():
                for s, kinds in steps.items():
                    for k, n in kinds.items():
                        per = out.uses.setdefault(p, {}).setdefault(s, {})
                        per[k] = max(per.get(k, 0), n)
        for attr in ("steps_run", "steps_with_grad"):
            a, b = getattr(self, attr), getattr(other, attr)
            setattr(out, attr, {g: max(a.get(g, 0), b.get(g, 0)) for g in {**a, **b}})
        return out

    def describe(self) -> str:
        """A readable table: per group its steps, per parameter how it was captured at which steps."""
        lines = []
        by_group: dict = {}
        for p, g in self.groups.items():
            by_group.setdefault(g, []).append(p)
        for g, params in by_group.items():
            run, grad = self.steps_run.get(g, 0), self.steps_with_grad.get(g, 0)
            lines.append(f"group {g!r}: {run} step slot(s) run, {grad} with gradient")
            for p in params:
                steps = self.uses.get(p, {})
                if not any(sum(k.values()) for k in steps.values()):
                    lines.append(f"  {p}: NEVER USED with gradients (its features are zero)")
                    continue
                kinds: dict = {}
                for kk in steps.values():
                    for k, n in kk.items():
                        kinds[k] = kinds.get(k, 0) + n
                used = sorted(s for s, kk in steps.items() if sum(kk.values()))
                per_step = sorted({sum(steps[s].values()) for s in used})
                what = ", ".join(f"{k} x{n}" for k, n in kinds.items())
                lines.append(f"  {p}: {what}; steps {_ranges(used)}; {'/'.join(map(str, per_step))} use(s) per step")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-able data (step keys as strings)."""
        return {"uses": {p: {str(s): dict(k) for s, k in st.items()} for p, st in self.uses.items()},
                "groups": dict(self.groups), "steps_run": dict(self.steps_run),
                "steps_with_grad": dict(self.steps_with_grad), "unused": self.unused}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Coverage":
        return cls({p: {int(s): dict(k) for s, k in st.items()} for p, st in d.get("uses", {}).items()},
                   dict(d.get("groups", {})), dict(d.get("steps_run", {})), dict(d.get("steps_with_grad", {})))


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "none"
    out, start, prev = [], steps[0], steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ",".join(out)
