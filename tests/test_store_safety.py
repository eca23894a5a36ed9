"""The store never loses data and never scores garbage: refusals, verified reads, the writer lock, I/O errors."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import sdi_core
from sdi_core import SDIError
from sdi_core import store as store_mod
from sdi_core.app.cli import main
from sdi_core.scoring import score_store
from sdi_core.store import FeatureStore, featurize_to_store, finalize_store, open_store, write_features
from test_store_helpers import ArrayFeaturizer, array_batches, make_features, tree_bytes

HERE = os.path.dirname(os.path.abspath(__file__))


def _sdi(*argv) -> int:
    return main([str(a) for a in argv])


def _store(path, n=24, shards=True):
    """A float64 store of ``n`` rows, in shards of 4 rows (``consolidate=not shards``)."""
    return featurize_to_store(path, ArrayFeaturizer(), array_batches(n, 4), dtype="float64",
                              consolidate=not shards)


# --------------------------------------------------------------------------- refuse, never delete


def test_a_non_empty_folder_that_is_not_a_store_is_refused_and_kept(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.csv").write_text("a,b\n1,2\n")
    (project / "shards").mkdir()
    (project / "shards" / "notes.txt").write_text("mine")
    before = tree_bytes(project)
    with pytest.raises(SDIError, match=r"not empty and is not a feature store \(it holds data/, shards/\)"):
        _store(project)
    assert _sdi("featurize", "--demo", "train", "--out", project) == 2
    assert "Refusing to write a feature store into --out" in capsys.readouterr().err
    with pytest.raises(SDIError, match="not empty"):
        write_features(project, make_features(3))
    (project / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SDIError, match="holds a meta.json that is not an sdi feature store's"):
        _store(project)
    (project / "meta.json").unlink()
    assert tree_bytes(project) == before, "nothing in the folder may change"


def test_overwrite_removes_only_what_the_store_wrote(tmp_path):
    _store(tmp_path / "s")
    (tmp_path / "s" / "README.txt").write_text("my notes about this store")
    with pytest.raises(SDIError, match="was written by a different run: dtype differs"):
        featurize_to_store(tmp_path / "s", ArrayFeaturizer(), array_batches(24, 4), dtype="float32")
    featurize_to_store(tmp_path / "s", ArrayFeaturizer(), array_batches(24, 4), dtype="float32", overwrite=True)
    assert (tmp_path / "s" / "README.txt").read_text() == "my notes about this store"
    assert open_store(tmp_path / "s").dtype == np.float32
    with pytest.raises(SDIError, match="several ranks"):
        featurize_to_store(tmp_path / "s", ArrayFeaturizer(), array_batches(24, 4), overwrite=True, rank=0,
                           world_size=2)


def test_a_foreign_file_in_a_shard_folder_is_never_deleted(tmp_path):
    _store(tmp_path / "s", shards=True)
    (tmp_path / "s" / "shards" / "000001" / "mine.txt").write_text("keep me")
    with pytest.raises(SDIError, match=r"'shards/000001' holds files the store did not write \(\['mine.txt'\]\)"):
        finalize_store(tmp_path / "s")
    assert (tmp_path / "s" / "shards" / "000001" / "mine.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- verified reads


def _flip(path, offset: int, bit: int = 0) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 1 << bit
    open(path, "wb").write(bytes(data))


@pytest.fixture()
def cli_stores(tmp_path):
    assert _sdi("featurize", "--demo", "train", "--out", tmp_path / "train", "--summed", "--sketch-dim", "64") == 0
    assert _sdi("featurize", "--demo", "query", "--out", tmp_path / "query", "--sketch-dim", "64") == 0
    return tmp_path


@pytest.mark.parametrize("where", ["train shard", "query shard", "train meta", "train ids", "train marker"])
def test_sdi_score_catches_a_flipped_bit_with_no_extra_flag(cli_stores, where, capsys):
    train, query = cli_stores / "train", cli_stores / "query"
    path, offset, message = {
        "train shard": (train / "data" / "ckpt0.loop.npy", 4000, "ckpt0.loop.npy fails its CRC-32 check"),
        "query shard": (query / "data" / "ckpt0.loop.npy", 300, "ckpt0.loop.npy fails its CRC-32 check"),
        "train meta": (train / "meta.json", None, "meta.json' fails its checksum"),
        "train ids": (train / "data" / "example_ids.npy", 500, "example_ids.npy fails its CRC-32 check"),
        "train marker": (train / "data.json", None, "data.json' fails its checksum"),
    }[where]
    if offset is None:  # a digit of a JSON number: still valid JSON, another value
        text = path.read_text()
        i = next(i for i, c in enumerate(text) if c in "123456789" and i > 40)
        offset = i
    _flip(path, offset, bit=0)
    assert _sdi("score", train, query, "--k", "3", "--quiet") == 2
    err = capsys.readouterr().err
    assert message in err and "damaged" in err, err
    assert _sdi("score", train, query, "--k", "3", "--quiet", "--no-verify") in (0, 2)  # the opt-out reads on


def test_a_damaged_shard_is_refused_by_consolidation(tmp_path):
    _store(tmp_path / "s", shards=True)
    shard = tmp_path / "s" / "shards" / "000002" / "ckpt1.loop.npy"
    _flip(shard, os.path.getsize(shard) - 5, bit=3)
    before = tree_bytes(tmp_path / "s")
    with pytest.raises(SDIError, match="shard 2: ckpt1.loop.npy fails its CRC-32 check"):
        finalize_store(tmp_path / "s")
    assert tree_bytes(tmp_path / "s") == before, "no data/ may be committed over a damaged shard"
    with pytest.raises(SDIError, match="CRC-32"):
        FeatureStore(tmp_path / "s").consolidate()
    with pytest.raises(SDIError, match="CRC-32"):
        store_mod.combine_checkpoints(tmp_path / "both", [FeatureStore(tmp_path / "s")])


def test_a_copied_shard_marker_is_refused(tmp_path):
    _store(tmp_path / "s", shards=True)
    shards = tmp_path / "s" / "shards"
    shutil.rmtree(shards / "000003")
    shutil.copytree(shards / "000002", shards / "000003")
    shutil.copy(shards / "000002.json", shards / "000003.json")
    with pytest.raises(SDIError, match="records shard 2; it was copied from another shard"):
        open_store(tmp_path / "s")


def test_crafted_names_and_shapes_in_metadata_are_refused(tmp_path):
    st = write_features(tmp_path / "s", make_features(5), dtype="float64")
    meta_path = os.path.join(st.path, "meta.json")
    meta = json.loads(open(meta_path).read())
    for bad in ("../../outside", "a/b", "..", ""):
        crafted = json.loads(json.dumps(meta))
        crafted["layout"]["groups"][0]["name"] = bad
        crafted.pop("checksum")
        with open(meta_path, "wb") as fh:
            fh.write(store_mod._json_bytes(crafted))  # a valid checksum: the name itself must be refused
        with pytest.raises(SDIError, match="group name .* is not a plain file-name component"):
            FeatureStore(st.path)
    crafted = json.loads(json.dumps(meta))
    crafted["layout"]["param_shapes"]["../x"] = [3]
    crafted.pop("checksum")
    open(meta_path, "wb").write(store_mod._json_bytes(crafted))
    with pytest.raises(SDIError, match="parameter name '../x' is not a plain file-name component"):
        FeatureStore(st.path)
    open(meta_path, "w").write("[]")
    with pytest.raises(SDIError, match="holds a JSON list, not an object"):
        FeatureStore(st.path)


def test_a_zeroed_npy_header_is_a_damaged_store_not_pickle_advice(tmp_path):
    st = write_features(tmp_path / "s", make_features(5), dtype="float64")
    arr = os.path.join(st.path, "shards", "000000", "ckpt0.loop.npy")
    data = bytearray(open(arr, "rb").read())
    data[:128] = bytes(128)
    open(arr, "wb").write(bytes(data))
    with pytest.raises(SDIError, match="its .npy header is not the one its metadata implies") as exc:
        FeatureStore(st.path, verify=False)
    assert "pickle" not in str(exc.value)


# --------------------------------------------------------------------------- non-finite rows


def test_non_finite_features_are_refused_when_written(tmp_path):
    f = make_features(6)
    f.data[1]["loop"][4, 2, 7] = np.nan
    with pytest.raises(SDIError, match=r"row 4 of the batch \(example id 1012\), group 'loop', checkpoint 'ckpt-b' "
                                       r"are not finite"):
        write_features(tmp_path / "s", f)

    def featurize(batch_list):
        out = ArrayFeaturizer()(batch_list)
        if batch_list[0]["ids"][0] == 508:
            out.data[0]["coda"][1, 0, 0] = np.inf
        return out

    with pytest.raises(SDIError, match=r"shard 2: the features of row 1 of the batch \(example id 509\)"):
        featurize_to_store(tmp_path / "t", featurize, array_batches(24, 4), dtype="float64")


@pytest.mark.parametrize("side", ["train", "query"])
def test_a_nan_row_in_a_store_is_refused_never_dropped_from_a_top_k(tmp_path, side):
    train, query = _store(tmp_path / "train", shards=True), make_features(3, tau=3, seed=5)
    q_store = write_features(tmp_path / "query", query, dtype="float64")
    target = (tmp_path / "train" / "shards" / "000003" / "ckpt0.loop.npy" if side == "train"
              else tmp_path / "query" / "shards" / "000000" / "ckpt1.loop.npy")
    arr = np.load(target, mmap_mode="r+")  # what a writer that does not check would have stored
    arr[2, 0, 3] = np.nan
    arr.flush()
    del arr
    where = ("shard 3, row 2 of the shard (store row 14), example id 514" if side == "train"
             else "shard 0, row 2 of the shard (store row 2), example id 1006")
    with pytest.raises(SDIError, match=rf"Scores of feature store .*{re.escape(where)} are not finite"):
        score_store(FeatureStore(tmp_path / "train", verify=False), FeatureStore(tmp_path / "query", verify=False),
                    k=24)
    with pytest.raises(SDIError, match="CRC-32"):  # verified by default: the edit is damage first
        score_store(tmp_path / "train", q_store if side == "train" else tmp_path / "query", k=3)


def test_in_memory_top_k_refuses_a_nan_row(tmp_path):
    train, query = make_features(20, seed=1), make_features(2, seed=2)
    train.data[0]["prelude"][7, 0, 0] = np.nan
    res = sdi_core.influence(train, query)
    with pytest.raises(SDIError, match=r"train row 7 \(example id 1021\) are not finite"):
        res.top_k(3)
    with pytest.raises(SDIError, match="train row 7"):
        res.top_k(3, step=-1)


# --------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_by_the_lock(tmp_path):
    started, release = threading.Event(), threading.Event()

    def slow(batch_list):
        started.set()
        release.wait(30)
        return ArrayFeaturizer()(batch_list)

    errors = []

    def first():
        try:
            featurize_to_store(tmp_path / "s", slow, array_batches(8, 4), dtype="float64")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert started.wait(30)
        code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_store_helpers import *; "
                "from sdi_core.store import featurize_to_store; "
                "featurize_to_store(sys.argv[1], ArrayFeaturizer(), array_batches(8, 4), dtype='float64')")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), HERE], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0
        assert f"is being written by another process: pid {os.getpid()}" in proc.stderr, proc.stderr[-2000:]
        assert "SDIError" in proc.stderr and "damaged" not in proc.stderr
    finally:
        release.set()
        t.join()
    assert not errors, errors
    assert not any(n.startswith(".sdi-lock") for n in os.listdir(tmp_path / "s")), "the lock is removed at the end"
    assert open_store(tmp_path / "s").n_examples == 8


_HOLD_LOCK = textwrap.dedent(
    """
    import os, sys, time
    from sdi_core import store
    lock = store._WriterLock(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    lock.__enter__()
    print("held", flush=True)
    if sys.argv[4] == "die":
        os._exit(0)  # like kill -9: the lock file stays, its flock goes
    time.sleep(60)
    """
)


def test_a_stale_lock_is_taken_over_and_other_world_sizes_are_refused(tmp_path):
    os.makedirs(tmp_path / "s")
    dead = subprocess.run([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "s"), "0", "1", "die"],
                          capture_output=True, text=True, timeout=60)
    assert dead.stdout.strip() == "held" and os.path.exists(tmp_path / "s" / ".sdi-lock-0")
    dead_peer = subprocess.run([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "s"), "1", "2", "die"],
                               capture_output=True, text=True, timeout=60)
    assert dead_peer.stdout.strip() == "held"
    (tmp_path / "s" / ".sdi-probe-123-abcd").write_text("")  # as a run killed while probing the folder leaves it
    _store(tmp_path / "s", shards=False)  # takes the stale lock over; the finished store drops what dead writers left
    assert sorted(os.listdir(tmp_path / "s")) == ["data", "data.json", "meta.json"]

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "t"), "1", "2", "live"],
                              stdout=subprocess.PIPE, text=True)
    try:
        os.makedirs(tmp_path / "t", exist_ok=True)
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SDIError, match=rf"pid {holder.pid} on host .* \(rank 1 of 2\) holds .sdi-lock-1"):
            featurize_to_store(tmp_path / "t", ArrayFeaturizer(), array_batches(8, 4), rank=1, world_size=2)
        with pytest.raises(SDIError, match=r"rank 1 of 2\) holds .sdi-lock-1"):  # rank 0 of another world size
            featurize_to_store(tmp_path / "t", ArrayFeaturizer(), array_batches(8, 4))
        with pytest.raises(SDIError, match="being written by another process"):
            finalize_store(tmp_path / "t")
        featurize_to_store(tmp_path / "t", ArrayFeaturizer(), array_batches(8, 4), rank=0, world_size=2)  # its peer
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- I/O failures


@pytest.mark.parametrize("call", ["os.fsync", "os.replace"])
def test_injected_eio_while_writing_is_an_sdierror(tmp_path, monkeypatch, call):
    real = getattr(os, call.split(".")[1])
    seen = {"n": 0}

    def failing(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 6:
            raise OSError(errno.EIO, "Input/output error", "somefile")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod.os, call.split(".")[1], failing)
    with pytest.raises(SDIError, match=r"Writing feature store .*Input/output error \[EIO\] on 'somefile'; the disk"):
        _store(tmp_path / "s")
    monkeypatch.setattr(store_mod.os, call.split(".")[1], real)
    _store(tmp_path / "s")  # and the run resumes once the disk is back


def test_injected_eio_while_reading_is_an_sdierror(tmp_path, monkeypatch):
    st = _store(tmp_path / "s", shards=False)

    def failing(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod.os, "preadv", failing)
    with pytest.raises(SDIError, match=r"Reading feature store .*consolidated data: Input/output error \[EIO\] on "
                                       r"'.*ckpt0.prelude.npy'; the disk"):
        list(st.iter_blocks(5))


_ENOSPC = textwrap.dedent(
    """
    import sys
    from sdi_core.app.cli import main
    sys.exit(main(["featurize", "--demo", "train", "--out", sys.argv[1] + "/store", "--sketch-dim", "2048",
                   "--dtype", "float64", "--shard-size", "1", "--batch-size", "16"]))
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small tmpfs")
def test_a_full_disk_is_an_sdierror_and_resumes(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m none {mnt} && echo mounted"], capture_output=True, text=True)
    if probe.returncode != 0 or "mounted" not in probe.stdout:
        pytest.skip(f"mounting a tmpfs is not permitted here ({probe.stderr.strip()[:200]})")
    script = tmp_path / "enospc.py"
    script.write_text(_ENOSPC)
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=1m none {mnt} && {sys.executable} {script} {mnt}; "
                           f"echo rc=$?; ls {mnt}/store/shards 2>/dev/null | wc -l"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    assert "No space left on device [ENOSPC]" in proc.stderr and "the disk is full" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
