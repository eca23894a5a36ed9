"""Shared builders for the feature-store tests (synthetic features with a real layout); holds no tests."""
from __future__ import annotations

import os

import numpy as np

from sdi_core import CheckpointInfo, Features, ParamInfo, SketchPlan, TensorSketch

PARAMS = (
    ParamInfo("prelude.emb.weight", (12, 8), "prelude"),
    ParamInfo("block.fc.weight", (16, 8), "loop"),
    ParamInfo("block.fc.bias", (16,), "loop"),
    ParamInfo("head.weight", (6, 8), "coda"),
)
CHECKPOINTS = (CheckpointInfo("ckpt-a", 1.0, 10), CheckpointInfo("ckpt-b", 0.25, 20))


def make_plan(dim: int = 32, seed: int = 0, params=PARAMS) -> SketchPlan:
    return SketchPlan(TensorSketch(dim=dim, seed=seed), list(params))


def make_features(n: int, *, tau: int = 3, seed: int = 0, plan: SketchPlan | None = None, checkpoints=CHECKPOINTS,
                  ids: bool = True, id_start: int = 0, dtype=np.float64, ties: bool = False) -> Features:
    """Deterministic per-step features of ``n`` examples (``seed`` picks the values).

    ``ties``: small integer values, so that many scores tie exactly.
    """
    plan = plan or make_plan()
    rng = np.random.default_rng(seed)
    steps = {g.name: (tau if g.name == "loop" else 1) for g in plan.layout.groups}
    data = []
    for _ in checkpoints:
        block = {}
        for g in plan.layout.groups:
            shape = (n, steps[g.name], g.width)
            block[g.name] = (rng.integers(-1, 2, size=shape) if ties else rng.standard_normal(shape)).astype(dtype)
        data.append(block)
    example_ids = 1000 + id_start + 3 * np.arange(n) if ids else None
    return Features(data, plan.layout, tuple(checkpoints), steps, example_ids=example_ids)


def tree_bytes(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content), for bit-identity checks."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def assert_same_tree(a: str, b: str) -> None:
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb), f"file sets differ: only in {a}: {sorted(set(ta) - set(tb))}, only in {b}: {sorted(set(tb) - set(ta))}"
    differing = [p for p in ta if ta[p] != tb[p]]
    assert not differing, f"files differ between {a} and {b}: {differing}"


class BatchFeaturizer:
    """``featurize_fn`` over integer batch indices: batch ``i`` has ``sizes[i]`` examples seeded by ``i``.

    Counts its calls and can raise on a given call (to simulate a crash).
    """

    def __init__(self, sizes, *, tau: int = 3, plan: SketchPlan | None = None, fail_on_call: int | None = None,
                 ids: bool = True):
        self.sizes = list(sizes)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.tau = tau
        self.plan = plan or make_plan()
        self.fail_on_call = fail_on_call
        self.ids = ids
        self.calls = 0
        self.seen: list[list[int]] = []

    def __call__(self, batch_list):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash in featurize_fn")
        self.seen.append(list(batch_list))
        parts = [make_features(self.sizes[i], tau=self.tau, seed=100 + i, plan=self.plan, ids=self.ids,
                               id_start=3 * int(self.starts[i])) for i in batch_list]
        return Features.concat(parts)

    def all_features(self) -> Features:
        return Features.concat([make_features(s, tau=self.tau, seed=100 + i, plan=self.plan, ids=self.ids,
                                              id_start=3 * int(self.starts[i])) for i, s in enumerate(self.sizes)])


def count_calls(monkeypatch, owner, name: str) -> dict:
    """Patch ``owner.<name>`` to count its calls in ``counts["calls"]``, still calling the original."""
    counts = {"calls": 0}
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        counts["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return counts
