"""One kernel for in-memory and streamed scoring: every mode on every namespace, permuted layouts, rank splits."""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

import sdi_core
from sdi_core import CheckpointInfo, Exact, Features, SDIError, SketchPlan, TensorSketch
from sdi_core import scoring as scoring_mod
from sdi_core import topk as topk_mod
from sdi_core._array import to_numpy
from sdi_core.features import check_compatible
from sdi_core.reference import exact_sdi, per_step_gradients
from sdi_core.scoring import StreamedScores, score_store, self_influence_store
from sdi_core.store import featurize_to_store, write_features
from test_algebra import PARAMS, random_uses
from test_store_helpers import BatchFeaturizer, count_calls, make_features

SIZES = [7, 5, 9, 4, 6, 8, 3]  # 42 train rows over shards of unequal size
DENSE = ("trajectory", "tracin", "train_trajectory", "step_matrix")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    fz = BatchFeaturizer(SIZES)
    st = featurize_to_store(tmp_path_factory.mktemp("kernel") / "s", fz, list(range(len(SIZES))), shard_size=2,
                            dtype="float64", consolidate=False)
    return st, fz.all_features()


def in_namespace(xp, f: Features, device=None) -> Features:
    return replace(f, data=[{g: xp.asarray(a, device=device) for g, a in blk.items()} for blk in f.data])


def brute(train: Features, query: Features, normalize=None) -> dict:
    """Float64 reference by explicit einsum over checkpoints, groups and steps (no code shared with the kernel)."""
    def scaled(f):
        out = []
        for blk in f.data:
            norm = np.sqrt(sum((a.sum(1) ** 2).sum(1) for a in blk.values())) if normalize else np.ones(len(f))
            out.append({g: a / norm[:, None, None] for g, a in blk.items()})
        return out

    groups = [g.name for g in train.layout.groups]
    s_tr, s_q = sum(train.steps.values()), sum(query.steps.values())
    m = np.zeros((len(train), len(query), s_tr, s_q))
    t0 = q0 = 0
    for g in groups:
        st, sq = train.steps[g], query.steps[g]
        for a, b, ck in zip(scaled(train), scaled(query), train.checkpoints):
            m[:, :, t0:t0 + st, q0:q0 + sq] += ck.eta * np.einsum("isd,jtd->ijst", a[g], b[g])
        t0, q0 = t0 + st, q0 + sq
    return {"step_matrix": m, "trajectory": m.sum(2), "train_trajectory": m.sum(3), "tracin": m.sum((2, 3))}


def assert_same_topk(res: StreamedScores, mem, k: int) -> None:
    for t in range(len(res.slot_labels)):
        want = mem.top_k(k, step=t)
        np.testing.assert_array_equal(res.slot_topk.indices[:, t], want.indices, err_msg=f"slot {t} top-k")
        np.testing.assert_array_equal(res.slot_topk.ids[:, t], want.ids, err_msg=f"slot {t} top-k ids")
        np.testing.assert_allclose(res.slot_topk.scores[:, t], want.scores, rtol=1e-12, atol=1e-12)
    want = mem.top_k(k)
    np.testing.assert_array_equal(res.total_topk.indices, want.indices, err_msg="total top-k")
    np.testing.assert_allclose(res.total_topk.scores, want.scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", [None, "cosine"])
def test_every_mode_in_memory_and_streamed_on_every_namespace(xp, store, normalize):
    st, train_np = store
    query_np = make_features(5, tau=4, seed=50, ids=True, id_start=7000)
    train, query = in_namespace(xp, train_np), in_namespace(xp, query_np)
    mem = sdi_core.influence(train, query, normalize=normalize, train_block=16, query_block=3)
    ref = brute(train_np, query_np, normalize)
    runs = {"store": score_store(st, query, k=5, dense=DENSE, normalize=normalize, block_rows=7),
            "features": score_store(train, query, k=5, dense=DENSE, normalize=normalize, block_rows=11)}
    for name in DENSE:
        got = to_numpy(getattr(mem, name))
        np.testing.assert_allclose(got, ref[name], rtol=1e-12, atol=1e-12, err_msg=f"in-memory {name} vs float64 ref")
        for how, res in runs.items():
            np.testing.assert_allclose(getattr(res, name), got, rtol=1e-12, atol=1e-12, err_msg=f"{how} {name}")
    for how, res in runs.items():
        assert res.meta["namespace"] == xp.__name__, f"{how}: scored in {res.meta['namespace']}, not {xp.__name__}"
        assert_same_topk(res, mem, 5)
    si = to_numpy(sdi_core.self_influence(train, normalize=normalize))
    np.testing.assert_allclose(si, brute(train_np, train_np, normalize)["trajectory"][np.arange(42), np.arange(42)],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(self_influence_store(train, normalize=normalize, budget=3000).per_slot, si,
                               rtol=1e-12, atol=1e-12)


def test_store_blocks_follow_the_query_to_its_device():
    """array_api_strict's device1: store blocks (NumPy) are moved to the query's device, nothing leaks to the host."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("device1")
    train_np, query_np = make_features(30, seed=1), make_features(4, tau=2, seed=2)
    query = in_namespace(xs, query_np, dev)
    res = score_store(train_np, query, k=3, dense=("trajectory", "step_matrix"), block_rows=8)
    assert res.meta["device"] == str(dev)
    mem = sdi_core.influence(in_namespace(xs, train_np, dev), query)
    assert mem.trajectory.device == dev and mem.step_matrix.device == dev
    np.testing.assert_allclose(res.trajectory, brute(train_np, query_np)["trajectory"], rtol=1e-12, atol=1e-12)
    assert_same_topk(res, mem, 3)


def test_torch_query_scores_a_numpy_store_without_warnings(store):
    tx = pytest.importorskip("array_api_compat.torch")
    st, train_np = store
    query_np = make_features(3, tau=2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "The given NumPy array is not writable"
        res = score_store(st, in_namespace(tx, query_np), k=4, dense=("tracin",), block_rows=10)
    np.testing.assert_allclose(res.tracin, brute(train_np, query_np)["tracin"], rtol=1e-12, atol=1e-12)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device: store blocks go through pinned memory only to an accelerator")
def test_store_blocks_reach_a_cuda_query_through_pinned_memory(store, monkeypatch):
    import torch

    tx = pytest.importorskip("array_api_compat.torch")
    st, train_np = store
    query_np = make_features(4, tau=3, seed=6)
    pinned = []
    real = scoring_mod._move

    def spy(xp, device, a):
        out = real(xp, device, a)
        pinned.append(isinstance(a, np.ndarray))
        return out

    monkeypatch.setattr(scoring_mod, "_move", spy)
    query = in_namespace(tx, query_np, torch.device("cuda"))
    res = score_store(st, query, k=4, dense=("trajectory",), block_rows=5)
    assert res.meta["device"].startswith("cuda") and any(pinned)
    np.testing.assert_allclose(res.trajectory, brute(train_np, query_np)["trajectory"], rtol=1e-12, atol=1e-12)
    assert_same_topk(res, sdi_core.influence(in_namespace(tx, train_np, torch.device("cuda")), query), 4)


# --------------------------------------------------------------------------- parameter order


STEPS = {"prelude": 1, "loop": 3, "coda": 1}


def _features(params, uses, n, sketch, etas):
    plan = SketchPlan(sketch, params)
    data = [sdi_core.sketch_uses(plan, u, n, steps=STEPS) for u in uses]
    return Features(data, plan.layout, tuple(CheckpointInfo(f"c{k}", e) for k, e in enumerate(etas)), dict(STEPS),
                    example_ids=np.arange(n) + 10)


@pytest.mark.parametrize("sketch", [Exact(), TensorSketch(dim=8, seed=2)], ids=["exact", "ts8"])
def test_layouts_that_differ_only_in_parameter_order_contract_matching_columns(tmp_path, sketch):
    rng = np.random.default_rng(0)
    etas = [0.5, 0.25]
    tr_uses, q_uses = [random_uses(rng, 9, 3) for _ in etas], [random_uses(rng, 4, 3) for _ in etas]
    permuted = [PARAMS[0], PARAMS[3], PARAMS[1], PARAMS[4], PARAMS[2]]  # torch order vs first-use order, say
    train, query = _features(PARAMS, tr_uses, 9, sketch, etas), _features(permuted, q_uses, 4, sketch, etas)
    assert train.layout.group("loop").params != query.layout.group("loop").params
    same = _features(PARAMS, q_uses, 4, sketch, etas)  # the same query in the train side's order
    ref = brute(train, same)
    if isinstance(sketch, Exact):  # the reference itself against materialised per-step gradients
        grads = exact_sdi([per_step_gradients(u, PARAMS, 9, STEPS) for u in tr_uses],
                          [per_step_gradients(u, PARAMS, 4, STEPS) for u in q_uses], etas, PARAMS, list(STEPS))
        for name in DENSE:
            np.testing.assert_allclose(ref[name], grads[name], rtol=1e-12, atol=1e-12, err_msg=name)
    for a, b, want in ((train, query, ref), (query, train, brute(same, train))):
        mem = sdi_core.influence(a, b)
        for name in DENSE:
            np.testing.assert_allclose(to_numpy(getattr(mem, name)), want[name], rtol=1e-12, atol=1e-12, err_msg=name)
    st = write_features(tmp_path / "train", train, dtype="float64")
    res = score_store(st, query, k=3, dense=DENSE, block_rows=4)
    for name in DENSE:
        np.testing.assert_allclose(getattr(res, name), ref[name], rtol=1e-12, atol=1e-12, err_msg=f"streamed {name}")
    assert_same_topk(res, sdi_core.influence(train, same), 3)
    with pytest.raises(SDIError, match="another order"):
        Features.concat([same, query])  # one feature set must keep one column order
    order = check_compatible(train, query)
    assert order["prelude"] is None and order["coda"] is None and order["loop"] is not None


def test_parameter_sets_that_differ_are_still_refused():
    rng = np.random.default_rng(1)
    etas = [1.0]
    a = _features(PARAMS, [random_uses(rng, 3, 3)], 3, Exact(), etas)
    fewer = [p for p in PARAMS if p.name != "block.ln.weight"]
    b = _features(fewer, [[u for u in random_uses(rng, 3, 3) if u.param != "block.ln.weight"]], 3, Exact(), etas)
    with pytest.raises(SDIError, match=r"only in first: \['block.ln.weight'\]"):
        sdi_core.influence(a, b)


# --------------------------------------------------------------------------- rank splits


@pytest.mark.parametrize("block_rows", [4, 7, None])
def test_rank_splits_are_bit_identical_to_one_process(store, block_rows):
    """Blocks lie on a grid of the whole store, so each row is computed with the same arithmetic by any rank."""
    st, _ = store
    query = make_features(6, tau=4, seed=9)
    kw = dict(k=5, dense=("trajectory", "tracin"), block_rows=block_rows)
    whole = score_store(st, query, **kw)
    for world in (2, 3, 5):
        merged = StreamedScores.merge([score_store(st, query, rank=r, world_size=world, **kw) for r in range(world)])
        for name in ("trajectory", "tracin"):
            np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=f"{name}, {world} ranks")
        for name in ("slot_topk", "total_topk"):
            for field in ("indices", "scores"):
                np.testing.assert_array_equal(getattr(getattr(merged, name), field), getattr(getattr(whole, name), field))


# --------------------------------------------------------------------------- the row-source protocol


class RowSource:
    """Not a Features nor a FeatureStore: only the attributes of the row-source protocol."""

    def __init__(self, f: Features):
        self._f = f
        self.layout, self.checkpoints, self.steps, self.summed = f.layout, f.checkpoints, f.steps, f.summed
        self.n_examples, self.example_ids = f.n_examples, f.example_ids

    def iter_blocks(self, block_rows, start=0, stop=None):
        yield from self._f.iter_blocks(block_rows, start, stop)


def test_anything_with_iter_blocks_is_a_train_source(store):
    _, train = store
    query = make_features(3, tau=2, seed=4)
    res = score_store(RowSource(train), query, k=4, dense=("trajectory",), block_rows=6)
    np.testing.assert_allclose(res.trajectory, brute(train, query)["trajectory"], rtol=1e-12, atol=1e-12)
    assert_same_topk(res, sdi_core.influence(train, query), 4)
    si = self_influence_store(RowSource(train))
    np.testing.assert_allclose(si.tracin, brute(train, train)["tracin"][np.arange(42), np.arange(42)], rtol=1e-12)


# --------------------------------------------------------------------------- the array-API merger


def _reference_topk(scores: np.ndarray, k: int, largest: bool):
    s = scores.T
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s if largest else s), axis=-1)[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("kind", ["normal", "ties", "ascending", "descending"])
@pytest.mark.parametrize("largest", [True, False])
def test_array_merger_is_exact_on_every_namespace(xp, kind, largest):
    rng = np.random.default_rng(hash((kind, largest)) % 2**32)
    n, rows, k = 97, 5, 6
    scores = rng.integers(-2, 3, size=(n, rows)).astype(np.float64) if kind == "ties" else rng.standard_normal((n, rows))
    if kind in ("ascending", "descending"):
        scores = np.ascontiguousarray(np.sort(scores, axis=0)[:: 1 if kind == "ascending" else -1])
    m = topk_mod._ArrayTopK(xp, rows, k, largest, xp.float64, None)
    for a in range(0, n, 13):
        m.update(xp.asarray(scores[a:a + 13]), a)
    idx, val = m.result()
    want_idx, want_val = _reference_topk(scores, k, largest)
    np.testing.assert_array_equal(idx, want_idx, err_msg=f"{kind}, largest={largest}")
    np.testing.assert_array_equal(val, want_val)


def test_torch_topk_narrowing_is_taken_and_exact(monkeypatch):
    tx = pytest.importorskip("array_api_compat.torch")
    calls = count_calls(monkeypatch, topk_mod._ArrayTopK, "_narrow")
    rng = np.random.default_rng(3)
    for scores in (rng.standard_normal((400, 7)), rng.integers(-1, 2, size=(400, 7)).astype(np.float64)):
        m = topk_mod._ArrayTopK(tx, 7, 4, True, tx.float64, None)
        for a in range(0, 400, 50):
            m.update(tx.asarray(scores[a:a + 50]), a)
        idx, val = m.result()
        want_idx, want_val = _reference_topk(scores, 4, True)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(val, want_val)
    assert calls["calls"] >= 5, calls
