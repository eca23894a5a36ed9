"""The on-disk feature store: exact round trip, validation, crash-safe resumable writes, ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import sdi_core
from sdi_core import CheckpointInfo, Features, SDIError
from sdi_core import store as store_mod
from sdi_core.store import FeatureStore, featurize_to_store, finalize_store, open_store, write_features
from test_store_helpers import (CHECKPOINTS, PARAMS, ArrayFeaturizer, BatchFeaturizer, array_batches, assert_same_tree,
                                crash_before_shard, make_features, make_plan, tree_bytes)

from conftest import to_xp


def _assert_features_equal(got: Features, want: Features, dtype=None) -> None:
    assert got.layout == want.layout, "layouts differ"
    assert got.checkpoints == want.checkpoints, f"checkpoints {got.checkpoints} != {want.checkpoints}"
    assert got.steps == want.steps and got.summed == want.summed
    for k, (bg, bw) in enumerate(zip(got.data, want.data)):
        for g in bw:
            w = np.asarray(bw[g]) if dtype is None else np.asarray(bw[g]).astype(dtype)
            a = np.asarray(bg[g])
            assert a.dtype == w.dtype, f"ckpt {k} group {g}: dtype {a.dtype} != {w.dtype}"
            assert np.array_equal(a, w), f"ckpt {k} group {g}: values differ (max {np.abs(a - w).max()})"
    if want.example_ids is None:
        assert got.example_ids is None
    else:
        assert np.array_equal(got.example_ids, want.example_ids)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("summed", [False, True])
@pytest.mark.parametrize("ids", [True, False])
def test_round_trip_float64_is_exact(tmp_path, summed, ids):
    f = make_features(23, ids=ids)
    st = write_features(tmp_path / "s", f, summed=summed, dtype="float64", split="train")
    back = st.as_features()
    want = f.sum_steps() if summed else f
    _assert_features_equal(back, want)
    assert isinstance(back.data[0]["loop"], np.memmap), "a one-shard store must give memory maps"
    assert st.meta["model_fingerprint"] == f.layout.model_fingerprint()
    assert st.meta["library_version"] == sdi_core.__version__
    assert st.meta["split"] == "train" and st.n_examples == 23 and len(st) == 23
    reopened = open_store(tmp_path / "s", verify=True)
    _assert_features_equal(reopened.as_features(), want)


def test_round_trip_float32_casts_once(tmp_path):
    f = make_features(9)
    st = write_features(tmp_path / "s", f, dtype="float32")
    _assert_features_equal(st.as_features(), f, dtype=np.float32)
    f32 = make_features(9, dtype=np.float32)
    st32 = write_features(tmp_path / "t", f32)
    _assert_features_equal(st32.as_features(), f32)


def test_round_trip_from_any_namespace(tmp_path, xp):
    f = make_features(7)
    data = [{g: to_xp(xp, a) for g, a in block.items()} for block in f.data]
    fx = Features(data, f.layout, f.checkpoints, f.steps, example_ids=f.example_ids)
    st = write_features(tmp_path / "s", fx, dtype="float64")
    _assert_features_equal(st.as_features(), f)


def test_store_features_feed_influence(tmp_path):
    train, query = make_features(30, seed=1), make_features(4, seed=2, tau=5)
    st = write_features(tmp_path / "s", train, dtype="float64")
    got = sdi_core.influence(st.as_features(), query)
    want = sdi_core.influence(train, query)
    np.testing.assert_allclose(got.trajectory, want.trajectory, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(got.top_k(5, step=2).indices, want.top_k(5, step=2).indices)


# --------------------------------------------------------------------------- validation


def test_opening_validates_metadata(tmp_path):
    st = write_features(tmp_path / "s", make_features(5), dtype="float64")
    meta_path = os.path.join(st.path, "meta.json")
    meta = json.loads(open(meta_path).read())

    def reopen_with(**changes):
        m = dict(meta, **changes)
        with open(meta_path, "w") as fh:
            json.dump(m, fh)
        try:
            FeatureStore(st.path, verify=False)  # an edited meta.json fails its checksum first (tested below)
        finally:
            with open(meta_path, "w") as fh:
                json.dump(meta, fh)

    with pytest.raises(SDIError, match="format version 99"):
        reopen_with(format_version=99)
    with pytest.raises(SDIError, match="fingerprint"):
        reopen_with(model_fingerprint="0" * 16)
    with pytest.raises(SDIError, match="not an sdi feature store"):
        reopen_with(format="something-else")
    with pytest.raises(SDIError, match="dtype"):
        reopen_with(dtype="int8")
    with pytest.raises(SDIError, match="eta"):
        reopen_with(checkpoints=[dict(meta["checkpoints"][0], eta=-1.0), meta["checkpoints"][1]])
    FeatureStore(st.path)  # restored
    with open(meta_path, "w") as fh:
        json.dump(dict(meta, split="edited"), fh)
    with pytest.raises(SDIError, match="meta.json' fails its checksum"):
        FeatureStore(st.path)


def test_missing_or_damaged_files_are_reported(tmp_path):
    with pytest.raises(SDIError, match="does not exist"):
        FeatureStore(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SDIError, match="no meta.json"):
        FeatureStore(tmp_path / "empty")
    st = write_features(tmp_path / "s", make_features(5), dtype="float64")
    arr = os.path.join(st.path, "shards", "000000", "ckpt1.loop.npy")
    data = bytearray(open(arr, "rb").read())
    data[-3] ^= 0xFF  # flip bits of one stored number: same size, different content
    open(arr, "wb").write(bytes(data))
    damaged = FeatureStore(st.path)  # sizes are fine: opening stays cheap
    with pytest.raises(SDIError, match="shard 0: ckpt1.loop.npy fails its CRC-32 check"):
        list(damaged.iter_blocks(2))
    with pytest.raises(SDIError, match="CRC-32"):
        FeatureStore(st.path).as_features()
    with pytest.raises(SDIError, match="CRC-32"):
        st.verify()
    FeatureStore(st.path, verify=False).as_features()  # the opt-out reads what is there
    open(arr, "wb").write(bytes(data[:-8]))
    with pytest.raises(SDIError, match="bytes but .* were committed"):
        FeatureStore(st.path)


def test_combining_different_sketch_model_or_checkpoints_names_the_field(tmp_path):
    base = make_features(6)
    st = write_features(tmp_path / "s", base, dtype="float64")
    st.check_compatible(make_features(3, seed=9, tau=5))  # other values and loop count: fine
    other_seed = make_features(3, plan=make_plan(seed=1))
    with pytest.raises(SDIError, match="sketch differs"):
        st.check_compatible(other_seed)
    other_dim = write_features(tmp_path / "d", make_features(3, plan=make_plan(dim=64)), dtype="float64")
    with pytest.raises(SDIError, match="sketch differs.*'dim': 32.*'dim': 64"):
        st.check_compatible(other_dim)
    from sdi_core import ParamInfo

    bigger = (PARAMS[0], ParamInfo("block.fc.weight", (16, 9), "loop")) + PARAMS[2:]
    with pytest.raises(SDIError, match="model .* differs"):
        st.check_compatible(make_features(3, plan=make_plan(params=bigger)))
    with pytest.raises(SDIError, match="checkpoints differ"):
        st.check_compatible(make_features(3, checkpoints=(CHECKPOINTS[0], CheckpointInfo("ckpt-c", 0.25, 20))))
    with pytest.raises(SDIError, match="etas differ"):
        st.check_compatible(make_features(3, checkpoints=(CHECKPOINTS[0], CheckpointInfo("ckpt-b", 0.5, 20))))


def test_write_features_refuses_bad_input(tmp_path):
    os.makedirs(tmp_path / "full")
    open(tmp_path / "full" / "x", "w").write("x")
    with pytest.raises(SDIError, match="not empty"):
        write_features(tmp_path / "full", make_features(3))
    with pytest.raises(SDIError, match="dtype"):
        write_features(tmp_path / "a", make_features(3), dtype="float16")
    with pytest.raises(SDIError, match="summed over steps"):
        write_features(tmp_path / "b", make_features(3).sum_steps(), summed=False)
    with pytest.raises(SDIError, match="expected sdi_core.Features"):
        write_features(tmp_path / "c", {"loop": np.zeros((3, 1, 4))})


# --------------------------------------------------------------------------- sharded writes


SIZES = [5, 3, 4, 6, 2, 5, 4]  # examples per batch


def _run(path, fz, **kw):
    kw.setdefault("shard_size", 2)
    kw.setdefault("dtype", "float64")
    return featurize_to_store(path, fz, list(range(len(fz.sizes))), **kw)


@pytest.mark.parametrize("consolidate", [True, False])
@pytest.mark.parametrize("summed", [False, True])
def test_sharded_store_holds_the_concatenation(tmp_path, consolidate, summed):
    fz = BatchFeaturizer(SIZES)
    st = _run(tmp_path / "s", fz, consolidate=consolidate, summed=summed)
    want = fz.all_features()
    want = want.sum_steps() if summed else want
    assert len(st.segments) == (1 if consolidate else 4)
    assert fz.seen == [[0, 1], [2, 3], [4, 5], [6]]
    _assert_features_equal(st.as_features(in_memory=not consolidate), want)
    if not consolidate:
        with pytest.raises(SDIError, match="consolidate"):
            st.as_features()
        merged = st.consolidate()
        assert len(merged.segments) == 1 and not os.path.exists(os.path.join(st.path, "shards"))
        _assert_features_equal(merged.as_features(), want)
    assert not os.path.exists(os.path.join(st.path, ".tmp")), "temporaries must be cleaned up"


def test_iter_blocks_covers_rows_once_across_shards(tmp_path):
    fz = BatchFeaturizer(SIZES)
    st = _run(tmp_path / "s", fz, shard_size=1, consolidate=False)
    want = fz.all_features()
    for block_rows in (1, 3, 4, 7, 100):
        for start, stop in ((0, None), (2, 21), (6, 7)):
            end = st.n_examples if stop is None else stop
            got = {g: [] for g in want.data[0]}
            pos = start
            for a, b, blocks in st.iter_blocks(block_rows, start, stop):
                assert a == pos and 0 < b - a <= block_rows, (block_rows, a, b)
                pos = b
                for g in got:
                    got[g].append(np.asarray(blocks[1][g]))
            assert pos == end
            for g, parts in got.items():
                np.testing.assert_array_equal(np.concatenate(parts), want.data[1][g][start:end])


def test_rerun_of_a_finished_store_does_nothing(tmp_path):
    fz = BatchFeaturizer(SIZES)
    _run(tmp_path / "s", fz)
    before = tree_bytes(tmp_path / "s")
    fz2 = BatchFeaturizer(SIZES)
    _run(tmp_path / "s", fz2)
    assert fz2.calls == 0
    assert tree_bytes(tmp_path / "s") == before


def test_resume_after_an_injected_crash_with_other_batches_or_data_is_refused(tmp_path, monkeypatch):
    _run_arrays(tmp_path / "clean", array_batches(N_ROWS, BATCH))
    crash_before_shard(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH))
    monkeypatch.undo()
    _assert_resumes_refused_then_finishes(tmp_path / "s", tmp_path / "clean", 3)


def test_rerun_of_a_finished_store_with_other_batches_or_data_is_refused(tmp_path):
    _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH))
    before = tree_bytes(tmp_path / "s")
    with pytest.raises(SDIError, match=r"shard 0 .* other inputs"):
        _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH + 1))
    with pytest.raises(SDIError, match=r"shard 0 .* other inputs"):
        _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH, seed=1))
    with pytest.raises(SDIError, match="saw 7 shards but an earlier run .* saw 8"):
        _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH)[:-1])  # a prefix of the data
    assert tree_bytes(tmp_path / "s") == before
    again = ArrayFeaturizer()
    featurize_to_store(tmp_path / "s", again, array_batches(N_ROWS, BATCH), shard_size=1, dtype="float64")
    assert again.calls == 0 and tree_bytes(tmp_path / "s") == before, "the same run returns the store as it is"
    replaced = _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH + 1), overwrite=True)
    assert replaced.n_examples == N_ROWS
    _run_arrays(tmp_path / "fresh", array_batches(N_ROWS, BATCH + 1))
    assert_same_tree(tmp_path / "fresh", tmp_path / "s")


def test_a_run_records_its_configuration_and_refuses_another(tmp_path):
    base = {"backend": "numpy", "batch_size": 4, "sketch": {"dim": 32, "seed": 0}}
    _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH), config=base)
    assert open_store(tmp_path / "s").meta["run"] == base
    other = {"backend": "torch", "batch_size": 4, "sketch": {"dim": 64, "seed": 0}, "tau": 3}
    with pytest.raises(SDIError) as exc:
        _run_arrays(tmp_path / "s", array_batches(N_ROWS, BATCH), config=other, summed=True)
    msg = str(exc.value)
    for field in ("run.backend: 'numpy' vs 'torch'", "run.sketch.dim: 32 vs 64", "run.tau: (absent) vs 3",
                  "step-summed flag differs", "--overwrite"):
        assert field in msg, f"{field!r} not named in: {msg}"
    assert "run.batch_size" not in msg and "run.sketch.seed" not in msg, msg


@pytest.mark.parametrize("consolidate", [True, False])
def test_resume_after_a_raise_is_bit_identical(tmp_path, consolidate):
    clean = BatchFeaturizer(SIZES)
    _run(tmp_path / "clean", clean, consolidate=consolidate)
    crashing = BatchFeaturizer(SIZES, fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "s", crashing, consolidate=consolidate)
    partial = open_store(tmp_path / "s", partial=True)
    assert [s.index for s in partial.segments] == [0, 1] and partial.n_examples == sum(SIZES[:4])
    with pytest.raises(SDIError, match="incomplete"):
        open_store(tmp_path / "s")
    resumed = BatchFeaturizer(SIZES)
    _run(tmp_path / "s", resumed, consolidate=consolidate)
    assert resumed.seen == [[4, 5], [6]], "committed shards must be skipped"
    assert_same_tree(tmp_path / "clean", tmp_path / "s")


def test_half_written_shards_are_never_read(tmp_path, monkeypatch):
    clean = BatchFeaturizer(SIZES)
    _run(tmp_path / "clean", clean, consolidate=False)

    # Crash 1: while a shard's array files are being written (temporary folder left behind).
    real_write = store_mod._write_npy
    calls = {"n": 0}

    def dying_write(path, parts, dtype, shape):
        calls["n"] += 1
        if calls["n"] == 17:  # the third shard (7 files per shard), part-way through
            with open(path, "wb") as fh:
                fh.write(b"\x93NUMPY garbage")
            raise OSError("simulated crash while writing")
        return real_write(path, parts, dtype, shape)

    monkeypatch.setattr(store_mod, "_write_npy", dying_write)
    with pytest.raises(SDIError, match="shard 2: simulated crash while writing"):
        _run(tmp_path / "s", BatchFeaturizer(SIZES), consolidate=False)
    monkeypatch.setattr(store_mod, "_write_npy", real_write)
    assert [s.index for s in open_store(tmp_path / "s", partial=True).segments] == [0, 1]

    # Crash 2: after the shard folder was renamed into place, before its commit marker.
    real_atomic = store_mod._atomic_write

    def dying_marker(root, dest, data):
        if dest.endswith("000002.json"):
            raise OSError("simulated crash before commit")
        return real_atomic(root, dest, data)

    monkeypatch.setattr(store_mod, "_atomic_write", dying_marker)
    with pytest.raises(SDIError, match="simulated crash before commit"):
        _run(tmp_path / "s", BatchFeaturizer(SIZES), consolidate=False)
    monkeypatch.setattr(store_mod, "_atomic_write", real_atomic)
    assert os.path.isdir(tmp_path / "s" / "shards" / "000002"), "the uncommitted shard folder is in place"
    partial = open_store(tmp_path / "s", partial=True)
    assert [s.index for s in partial.segments] == [0, 1], "an uncommitted shard must not be read"

    resumed = BatchFeaturizer(SIZES)
    _run(tmp_path / "s", resumed, consolidate=False)
    assert resumed.seen == [[4, 5], [6]]
    assert_same_tree(tmp_path / "clean", tmp_path / "s")


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_store_helpers import ArrayFeaturizer, array_batches
    from sdi_core.store import featurize_to_store

    class Slow(ArrayFeaturizer):
        def __call__(self, batch_list):
            time.sleep(float(sys.argv[3]))
            return super().__call__(batch_list)

    featurize_to_store(sys.argv[1], Slow(), array_batches(29, 4), shard_size=1, dtype="float64")
    """
)
N_ROWS, BATCH = 29, 4  # 8 batches of array inputs (the last one short)


def _run_arrays(path, batches, **kw):
    return featurize_to_store(path, ArrayFeaturizer(), batches, shard_size=kw.pop("shard_size", 1), dtype="float64",
                              **kw)


def _assert_resumes_refused_then_finishes(target, clean, committed: int) -> None:
    """A resume with other batch boundaries or other data is refused; the true resume ends bit-identical."""
    before = tree_bytes(target)
    with pytest.raises(SDIError, match=r"shard 0 \(batches 0..0\) was featurised from other inputs"):
        _run_arrays(target, array_batches(N_ROWS, BATCH + 1))
    changed = array_batches(N_ROWS, BATCH)
    changed[0] = {"x": changed[0]["x"] + 1e-9, "ids": changed[0]["ids"]}  # same size, other values
    with pytest.raises(SDIError, match="from other inputs than this run's: the data"):
        _run_arrays(target, changed)
    after = tree_bytes(target)
    assert {p: b for p, b in after.items() if ".sdi-lock" not in p} == {p: b for p, b in before.items()
                                                                          if ".sdi-lock" not in p}, \
        "a refused resume must leave the store as it was"
    resumed = ArrayFeaturizer()
    featurize_to_store(target, resumed, array_batches(N_ROWS, BATCH), shard_size=1, dtype="float64")
    assert resumed.calls == -(-N_ROWS // BATCH) - committed, "only unfinished shards are featurised again"
    assert_same_tree(clean, target)


def _committed(path) -> int:
    shards = os.path.join(path, "shards")
    if not os.path.isdir(shards):
        return 0
    return sum(1 for f in os.listdir(shards) if f.endswith(".json"))


@pytest.mark.parametrize("kill_after", [2, 4])
def test_resume_after_killing_a_subprocess_is_bit_identical(tmp_path, kill_after):
    _run_arrays(tmp_path / "clean", array_batches(N_ROWS, BATCH))
    script = tmp_path / "featurize.py"
    script.write_text(_KILL_SCRIPT)
    target = tmp_path / "s"
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, str(script), str(target), here, "0.15"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _committed(target) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the featurize subprocess ended before it was killed: {proc.stderr.read()!r}"
        time.sleep(0.05 * kill_after)  # land somewhere inside the next shard
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = _committed(target)
    n_shards = -(-N_ROWS // BATCH)
    assert kill_after <= done < n_shards, f"{done} shards committed when killed"
    assert os.path.exists(target / ".sdi-lock-0"), "the killed writer leaves its lock behind"
    _assert_resumes_refused_then_finishes(target, tmp_path / "clean", done)  # the stale lock is taken over


def test_resume_with_other_settings_names_the_field(tmp_path):
    with pytest.raises(RuntimeError):
        _run(tmp_path / "s", BatchFeaturizer(SIZES, fail_on_call=2))
    with pytest.raises(SDIError, match="dtype differs"):
        _run(tmp_path / "s", BatchFeaturizer(SIZES), dtype="float32")
    with pytest.raises(SDIError, match="step-summed flag differs"):
        _run(tmp_path / "s", BatchFeaturizer(SIZES), summed=True)
    with pytest.raises(SDIError, match="shard size .* differs"):
        _run(tmp_path / "s", BatchFeaturizer(SIZES), shard_size=3)
    with pytest.raises(SDIError, match="sketch differs"):
        _run(tmp_path / "s", BatchFeaturizer(SIZES, plan=make_plan(seed=7)))
    with pytest.raises(SDIError, match="step counts differ"):
        _run(tmp_path / "s", BatchFeaturizer(SIZES, tau=4))
    fz = BatchFeaturizer(SIZES)
    featurize_to_store(tmp_path / "s", fz, list(range(len(SIZES))), shard_size=2, dtype="float64")
    featurize_to_store(tmp_path / "s2", BatchFeaturizer(SIZES), list(range(3)), shard_size=2, dtype="float64",
                       consolidate=False)
    with pytest.raises(SDIError, match=r"shard 1 \(batches 2..3\) was featurised from other inputs"):
        featurize_to_store(tmp_path / "s2", BatchFeaturizer(SIZES), list(range(7)), shard_size=2, dtype="float64",
                           consolidate=False)
    with pytest.raises(SDIError, match="saw 4 shards but an earlier run .* saw 2"):
        featurize_to_store(tmp_path / "s2", BatchFeaturizer(SIZES), list(range(7)), shard_size=2, dtype="float64",
                           consolidate=False, fingerprint=None)


def test_featurize_to_store_argument_errors(tmp_path):
    fz = BatchFeaturizer(SIZES)
    with pytest.raises(SDIError, match="shard_size"):
        featurize_to_store(tmp_path / "a", fz, [0], shard_size=0)
    with pytest.raises(SDIError, match="rank"):
        featurize_to_store(tmp_path / "a", fz, [0], rank=2, world_size=2)
    with pytest.raises(SDIError, match="empty"):
        featurize_to_store(tmp_path / "a", fz, [])
    with pytest.raises(SDIError, match="expected sdi_core.Features"):
        featurize_to_store(tmp_path / "b", lambda bl: {"loop": 1}, [0])
    with pytest.raises(SDIError, match="finalize_store"):
        featurize_to_store(tmp_path / "c", fz, [0], rank=0, world_size=2, consolidate=True)


# --------------------------------------------------------------------------- several writers


@pytest.mark.parametrize("concurrent", [False, True])
def test_two_ranks_write_the_same_store_as_one(tmp_path, concurrent):
    _run(tmp_path / "one", BatchFeaturizer(SIZES), consolidate=True)
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = _run(tmp_path / "two", BatchFeaturizer(SIZES), rank=r, world_size=2)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    if concurrent:
        threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        rank(0)
        assert results[0] is None, "rank 0 alone cannot complete the store"
        with pytest.raises(SDIError, match=r"shards \[1, 3\]"):
            open_store(tmp_path / "two")
        rank(1)
    assert not errors, errors
    assert isinstance(results[1] if not concurrent else (results[0] or results[1]), FeatureStore)
    finalize_store(tmp_path / "two")
    assert_same_tree(tmp_path / "one", tmp_path / "two")


def test_shards_of_rank_partition_the_shards():
    parts = [store_mod.shards_of_rank(10, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and parts[1] == [1, 4, 7]


def test_store_scoring_and_cli_import_no_framework():
    code = ("import sys, sdi_core.store, sdi_core.scoring, sdi_core.app.cli_store, sdi_core.app.cli; "
            "sdi_core.app.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'jax', 'jaxlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing the store modules loaded {out.stdout.strip()}"


def test_stores_of_one_checkpoint_each_combine(tmp_path):
    both = make_features(11)
    parts = []
    for k, ck in enumerate(CHECKPOINTS):
        one = Features([both.data[k]], both.layout, (ck,), both.steps, example_ids=both.example_ids)
        parts.append(write_features(tmp_path / f"ck{k}", one, dtype="float64", summed=True))
    combined = store_mod.combine_checkpoints(tmp_path / "both", parts)
    _assert_features_equal(combined.as_features(), both.sum_steps())
    with pytest.raises(SDIError, match="is in both"):
        store_mod.combine_checkpoints(tmp_path / "twice", [parts[0], parts[0]])
    other_rows = write_features(tmp_path / "rows", Features([make_features(10).data[1]], both.layout,
                                                           (CHECKPOINTS[1],), both.steps,
                                                           example_ids=both.example_ids[:10]), dtype="float64",
                                summed=True)
    with pytest.raises(SDIError, match="different examples"):
        store_mod.combine_checkpoints(tmp_path / "bad", [parts[0], other_rows])
    per_step = write_features(tmp_path / "ps", Features([both.data[1]], both.layout, (CHECKPOINTS[1],), both.steps,
                                                        example_ids=both.example_ids), dtype="float64")
    with pytest.raises(SDIError, match="step-summed flag differs"):
        store_mod.combine_checkpoints(tmp_path / "bad2", [parts[0], per_step])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs") or not sys.platform.startswith("linux"),
                    reason="peak resident set read from Linux /proc (VmHWM, reset through clear_refs)")
def test_streaming_holds_only_the_blocks_it_reads(tmp_path):
    from sdi_core import ParamInfo, SketchPlan, TensorSketch

    plan = SketchPlan(TensorSketch(dim=1024, seed=0), [ParamInfo("block.w", (64, 64), "loop")])
    rows = np.random.default_rng(0).standard_normal((12_000, 1, 1024), dtype=np.float32)  # 47 MiB
    f = Features([{"loop": rows}], plan.layout, (CHECKPOINTS[0],), {"loop": 2}, summed=True)
    write_features(tmp_path / "big", f)
    st = open_store(tmp_path / "big")
    total = 0.0
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak to the current resident set
    for _, _, blocks in st.iter_blocks(1000):  # 3.9 MiB per block
        total += float(blocks[0]["loop"][:, 0, ::256].sum())
    grown = _status_kib("VmHWM") - before
    assert total == pytest.approx(float(rows[:, 0, ::256].sum(dtype=np.float64)), rel=1e-4)
    assert grown < 12_000, f"a streamed pass over 47 MiB in 3.9 MiB blocks grew the peak resident set by {grown} KiB"
