"""Streamed scoring of a feature store: equal to in-memory sdi_core.influence (float64), same top-k."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sdi_core
from sdi_core import SDIError
from sdi_core import topk as topk_mod
from sdi_core.scoring import StreamedScores, parse_bytes, score_store, self_influence_store
from sdi_core.store import featurize_to_store, write_features
from test_store_helpers import BatchFeaturizer, make_features, make_plan

SIZES = [7, 5, 9, 4, 6, 8, 3]  # 42 train examples over several shards
DENSE = ("trajectory", "tracin", "train_trajectory", "step_matrix")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A per-step and a step-summed float64 train store (several shards) and the in-memory features."""
    root = tmp_path_factory.mktemp("scoring")
    fz = BatchFeaturizer(SIZES)
    per_step = featurize_to_store(root / "per_step", fz, list(range(len(SIZES))), shard_size=2, dtype="float64",
                                  consolidate=False)
    summed = featurize_to_store(root / "summed", BatchFeaturizer(SIZES), list(range(len(SIZES))), shard_size=3,
                                dtype="float64", summed=True)
    return {"per_step": per_step, "summed": summed, "train": fz.all_features(), "root": root}


def _query(tau=4, n=5, seed=50, **kw):
    return make_features(n, tau=tau, seed=seed, ids=True, id_start=7000, **kw)


def _check_topk(res: StreamedScores, ref, k: int, largest: bool = True):
    """Streamed top-k equals InfluenceResult.top_k for every query slot and in total (indices, ids and scores)."""
    for t in range(len(res.slot_labels)):
        want = ref.top_k(k, step=t, largest=largest)
        got_i = res.slot_topk.indices[:, t]
        np.testing.assert_array_equal(got_i, want.indices, err_msg=f"top-k indices, query slot {t}")
        np.testing.assert_array_equal(res.slot_topk.ids[:, t], want.ids, err_msg=f"top-k ids, slot {t}")
        np.testing.assert_allclose(res.slot_topk.scores[:, t], want.scores, rtol=1e-12, atol=1e-12)
    want = ref.top_k(k, largest=largest)
    np.testing.assert_array_equal(res.total_topk.indices, want.indices, err_msg="total (TracIn) top-k")
    np.testing.assert_allclose(res.total_topk.scores, want.scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["per_step", "summed"])
@pytest.mark.parametrize("block_rows", [None, 1, 5, 16])
@pytest.mark.parametrize("normalize", [None, "cosine"])
def test_streamed_equals_in_memory_float64(stores, kind, block_rows, normalize):
    query = _query()
    ref = sdi_core.influence(stores["train"], query, normalize=normalize)
    dense = DENSE if kind == "per_step" else DENSE[:2]
    res = score_store(stores[kind], query, k=6, dense=dense, normalize=normalize, block_rows=block_rows)
    assert res.block_rows == (block_rows or len(stores["train"]))
    for name in dense:
        got, want = getattr(res, name), getattr(ref, name)
        assert got.shape == want.shape and got.dtype == np.float64, (name, got.shape, want.shape, got.dtype)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"dense {name}")
    _check_topk(res, ref, 6)
    assert res.slot_labels == query.slot_labels() and res.rows == (0, len(stores["train"]))
    np.testing.assert_array_equal(res.query_ids, query.example_ids)


def test_opponents_and_large_k(stores):
    query = _query(tau=2, n=3)
    ref = sdi_core.influence(stores["train"], query)
    res = score_store(stores["summed"], query, k=6, largest=False, block_rows=4)
    _check_topk(res, ref, 6, largest=False)
    everything = score_store(stores["summed"], query, k=10_000)
    assert everything.k == len(stores["train"])
    _check_topk(everything, ref, len(stores["train"]))


def test_ties_break_towards_the_smaller_index(tmp_path):
    """Integer features make many exact ties; ranks must match the in-memory stable order."""
    train = make_features(60, ties=True, seed=3)
    query = make_features(4, ties=True, seed=4)
    st_ = write_features(tmp_path / "t", train, dtype="float64")
    ref = sdi_core.influence(train, query)
    for block_rows in (1, 7, 60):
        _check_topk(score_store(st_, query, k=9, block_rows=block_rows), ref, 9)


def test_filtered_merge_path_on_a_long_store(tmp_path, monkeypatch):
    """Prime with two rows so nearly every block goes through the threshold filter and padded merge.

    (Its exact fallback for too many candidates is forced in ``test_running_merge_is_exact``.)
    """
    monkeypatch.setattr(topk_mod, "_PRIME_COLUMNS", 2)
    calls = {"filtered": 0}
    real = topk_mod._TopKMerger._filtered

    def counting(self, scores, offset):
        calls["filtered"] += 1
        return real(self, scores, offset)

    monkeypatch.setattr(topk_mod._TopKMerger, "_filtered", counting)
    train = make_features(400, seed=8)
    query = _query(n=3, tau=2)
    st_ = write_features(tmp_path / "long", train, dtype="float64")
    _check_topk(score_store(st_, query, k=5, block_rows=37), sdi_core.influence(train, query), 5)
    assert calls["filtered"] >= 40, calls


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_rows_and_merge_back(stores, world_size):
    query = _query()
    whole = score_store(stores["per_step"], query, k=5, dense=("tracin",))
    parts = [score_store(stores["per_step"], query, k=5, dense=("tracin",), rank=r, world_size=world_size)
             for r in range(world_size)]
    assert [p.rows for p in parts][0][0] == 0 and parts[-1].rows[1] == len(stores["train"])
    merged = StreamedScores.merge(parts[::-1])
    np.testing.assert_array_equal(merged.slot_topk.indices, whole.slot_topk.indices)
    np.testing.assert_array_equal(merged.total_topk.ids, whole.total_topk.ids)
    np.testing.assert_allclose(merged.tracin, whole.tracin, rtol=1e-13, atol=1e-13)


def test_merge_refuses_gaps_and_mismatched_parts(stores):
    query = _query()
    parts = [score_store(stores["summed"], query, k=3, rank=r, world_size=3) for r in range(3)]
    with pytest.raises(SDIError, match="not adjacent"):
        StreamedScores.merge([parts[0], parts[2]])
    other_k = score_store(stores["summed"], query, k=4, rank=1, world_size=3)
    with pytest.raises(SDIError, match="different k"):
        StreamedScores.merge([parts[0], other_k])


def test_float32_store_scores_in_float32(tmp_path):
    train, query = make_features(50, seed=11), _query()
    st_ = write_features(tmp_path / "f32", train, summed=True, dtype="float32")
    res = score_store(st_, query, k=4, dense=("trajectory",))
    assert res.trajectory.dtype == np.float32
    ref = sdi_core.influence(train, query)
    np.testing.assert_allclose(res.trajectory, ref.trajectory, rtol=1e-4, atol=1e-4)
    # Lossless per sketch draw: the trajectory sums over query slots to TracIn.
    res64 = score_store(st_, query, k=4, dense=("trajectory", "tracin"), dtype="float64")
    np.testing.assert_allclose(res64.trajectory.sum(-1), res64.tracin, rtol=1e-12, atol=1e-12)


def test_query_may_be_a_store_and_train_may_be_features(stores, tmp_path):
    query = _query()
    q_store = write_features(tmp_path / "q", query, dtype="float64")
    a = score_store(stores["per_step"], q_store, k=3)
    b = score_store(stores["train"], query, k=3)
    c = score_store(str(stores["root"] / "per_step"), query, k=3)
    for other in (b, c):
        np.testing.assert_array_equal(a.slot_topk.indices, other.slot_topk.indices)


def test_self_influence_matches_in_memory(stores):
    want = sdi_core.self_influence(stores["train"])
    got = self_influence_store(stores["per_step"], budget=4096)
    np.testing.assert_allclose(got.per_slot, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.tracin, want.sum(1), rtol=1e-12, atol=1e-12)
    summed = self_influence_store(stores["summed"])
    assert summed.per_slot is None
    np.testing.assert_allclose(summed.tracin, want.sum(1), rtol=1e-12, atol=1e-12)
    cos = self_influence_store(stores["per_step"], normalize="cosine")
    np.testing.assert_allclose(cos.per_slot, sdi_core.self_influence(stores["train"], normalize="cosine"),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cos.tracin, cos.per_slot.sum(1), rtol=1e-12)
    half = self_influence_store(stores["per_step"], rank=1, world_size=2)
    np.testing.assert_allclose(half.tracin, want.sum(1)[len(stores["train"]) // 2:], rtol=1e-12)


# --------------------------------------------------------------------------- the memory budget


def test_block_size_follows_the_budget(stores):
    query = _query()
    probe = score_store(stores["summed"], query, k=3, budget="2MiB")
    fixed, row, merge = (probe.meta[k] for k in ("fixed_bytes", "bytes_per_row", "merge_bytes"))
    for rows in (1, 10, 30):
        budget = fixed + merge + rows * row + row - 1  # one byte short of rows + 1
        res = score_store(stores["summed"], query, k=3, budget=budget)
        assert res.block_rows == rows, f"budget {budget}: {res.block_rows} rows per block, expected {rows}"
        _check_topk(res, sdi_core.influence(stores["train"], query), 3)


def test_budget_too_small_or_dense_too_big_is_refused(stores):
    query = _query()
    with pytest.raises(SDIError, match="Memory budget 1000 bytes is too small"):
        score_store(stores["summed"], query, k=3, budget=1000)
    big_query = _query(n=400)  # step matrix: 42 x 400 x 5 x 6 float64 = 4 MB; query side 1.9 MB, 4.5 MB while prepared
    with pytest.raises(SDIError, match="too small: the query side and dense outputs take .*drop dense"):
        score_store(stores["per_step"], big_query, k=3, budget="5MiB", dense=("step_matrix",))
    score_store(stores["per_step"], big_query, k=3, budget="5MiB")  # fits without the dense output
    with pytest.raises(SDIError, match="preparing the query side .* takes 4505600 bytes"):
        score_store(stores["per_step"], big_query, k=3, budget="4MiB")


@pytest.mark.parametrize("text,expected", [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1e6", 10**6),
                                           ("3 KB", 3000), (4096, 4096)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_bad_arguments_are_reported(stores):
    query = _query()
    with pytest.raises(SDIError, match="Memory size|memory size"):
        parse_bytes("lots")
    with pytest.raises(SDIError, match="summed over steps"):
        score_store(stores["summed"], query.sum_steps())
    with pytest.raises(SDIError, match="per-step train features"):
        score_store(stores["summed"], query, dense=("step_matrix",))
    with pytest.raises(SDIError, match="unknown kinds"):
        score_store(stores["summed"], query, dense=("everything",))
    with pytest.raises(SDIError, match="rank"):
        score_store(stores["summed"], query, rank=2, world_size=2)
    with pytest.raises(SDIError, match="normalize"):
        score_store(stores["summed"], query, normalize="l2")
    with pytest.raises(SDIError, match="sketch differs"):
        score_store(stores["summed"], make_features(3, plan=make_plan(seed=5)))
    with pytest.raises(SDIError, match="FeatureStore, a store path or sdi_core.Features"):
        score_store({"loop": 0}, query)


# --------------------------------------------------------------------------- the merge itself


def _reference_topk(scores: np.ndarray, k: int, largest: bool):
    """Top-k of each column of ``scores [n, R]``: by score, then by smaller row index."""
    s = scores.T
    key = -s if largest else s
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), key), axis=-1)[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 120),
    rows=st.integers(1, 5),
    k_frac=st.floats(0.01, 1.0),
    kind=st.sampled_from(["normal", "ties", "ascending", "descending"]),
    largest=st.booleans(),
    prime=st.integers(1, 6),
    merge_bytes=st.sampled_from([64, 10**6]),
    seed=st.integers(0, 2**16),
)
def test_running_merge_is_exact(n, rows, k_frac, kind, largest, prime, merge_bytes, seed):
    rng = np.random.default_rng(seed)
    k = max(1, int(k_frac * n))
    if kind == "ties":
        scores = rng.integers(-2, 3, size=(n, rows)).astype(np.float64)
    else:
        scores = rng.standard_normal((n, rows))
        if kind != "normal":
            scores = np.sort(scores, axis=0)[:: 1 if kind == "ascending" else -1]
    old = topk_mod._PRIME_COLUMNS
    topk_mod._PRIME_COLUMNS = prime
    try:
        m = topk_mod._TopKMerger(rows, k, largest, np.float64, merge_bytes)
        pos = 0
        while pos < n:
            b = int(rng.integers(1, 25))
            m.update(np.ascontiguousarray(scores[pos : pos + b]), pos)
            pos += b
    finally:
        topk_mod._PRIME_COLUMNS = old
    idx, val = m.result()
    want_idx, want_val = _reference_topk(scores, k, largest)
    np.testing.assert_array_equal(idx, want_idx, err_msg=f"{kind}, largest={largest}, k={k}")
    np.testing.assert_array_equal(val, want_val)
