"""An on-disk feature store: memory-mapped arrays, JSON metadata, resumable sharded writes.

A store holds the features of one split (e.g. the training set) at one or
more checkpoints.  It is a directory::

    STORE/
      meta.json                 sketch, layout, model fingerprint, steps, checkpoints, dtype, run configuration, ...
      shards/000000/ckpt0.loop.npy   [n_0, S_g, D_g] per checkpoint k and group g (S_g = 1 when summed)
      shards/000000/example_ids.npy  [n_0] (when the features carry ids)
      shards/000000.json        commit marker of shard 0: rows, input fingerprint, file sizes and CRC-32s
      shards.json               number of shards (written once the input is exhausted)
      data/ ... + data.json     the same arrays merged into one file each (after :meth:`FeatureStore.consolidate`)
      .sdi-tmp/                 temporaries of a write in progress
      .sdi-lock-R               the lock of the process writing rank R's shards

What the store guarantees:

- *Atomic shards.*  A shard is written into ``.sdi-tmp/``, every file is
  fsynced, the folder is renamed into place (``os.replace``) and only then
  is its commit marker written, itself through a temporary file and
  ``os.replace``.  Readers only ever look at shards whose marker exists.
- *Resume.*  A rerun of :func:`featurize_to_store` skips committed shards
  and writes the rest; the finished store is byte-for-byte identical to an
  uninterrupted run's (no file holds timestamps or process ids).
- *A run is its configuration.*  ``meta.json`` records what determines the
  contents (the sketch, layout, steps, checkpoints with their ids and etas,
  the dtype, summing and shard size, and the caller's run configuration:
  backend, model, data and batch size for ``sdi featurize``); every shard
  marker records a fingerprint of its input batches.  A rerun or a resume
  whose configuration or inputs differ is refused, naming every field that
  differs, unless ``overwrite=True`` replaces the store.
- *Verified reads.*  Every JSON file carries a CRC-32 of its content and
  every array file CRC-32s of its 1 MiB chunks.  By default a chunk is
  checked when a block first reads it, and before consolidation copies it;
  ``verify=False`` opts out.  Array headers are compared with the header the
  metadata implies (no pickle is ever loaded, NumPy never parses a header).
- *Refuse, never delete.*  A non-empty folder that is not a store is
  refused; the writer removes only files it wrote itself, under the names
  above.
- *One writer per rank.*  A lock file created with ``O_EXCL`` (holding the
  pid and host, and a ``flock`` while the writer lives) refuses a second
  writer of the same shards; a lock left by a killed run is detected and
  taken over.
- *Clear errors.*  A full disk, an I/O error, a read-only file system and
  every damaged file give an :class:`~sdi_core.SDIError` naming the store,
  the file and the remedy.

Several processes may write disjoint shards of one store (``rank`` /
``world_size``): shard ``i`` belongs to rank ``i % world_size``; the shared
files (``meta.json``, ``shards.json``) are created with an atomic
create-if-absent and compared field by field when they already exist.

This module is framework-neutral: NumPy memory maps and JSON, no torch or
jax.  Framework glue for ``torchrun`` and ``jax.sharding`` lives in
``sdi_torch.distributed`` and ``sdi_jax.distributed``.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._array import is_array_api_obj, to_numpy
from ._io import PROBE_PREFIX, check_writable_dir, io_errors
from .factors import SDIError
from .features import CheckpointInfo, Features, check_compatible
from .specs import FeatureLayout

try:  # flock tells a live lock holder from a dead one; absent on Windows (the pid is checked instead)
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureStore",
    "open_store",
    "write_features",
    "featurize_to_store",
    "finalize_store",
    "check_destination",
    "batch_fingerprint",
    "shards_of_rank",
    "describe_difference",
    "describe_differences",
    "combine_checkpoints",
]

FORMAT = "sdi-feature-store"
FORMAT_VERSION = 2  # 2: sealed JSON, chunk CRC-32s, input fingerprints, run configuration, .sdi-tmp
DTYPES = ("float32", "float64")

_META = "meta.json"
_COUNT = "shards.json"
_SHARDS = "shards"
_DATA = "data"
_DATA_COMMIT = "data.json"
_TMP = ".sdi-tmp"
_LOCK_PREFIX = ".sdi-lock-"
_IDS = "example_ids.npy"
_SHARD_RE = re.compile(r"^(\d{6,})$")
_MARKER_RE = re.compile(r"^(\d{6,})\.json$")
_ARRAY_FILE_RE = re.compile(r"^(ckpt\d+\.[^/\\]+\.npy|example_ids\.npy)$")
_CHUNK = 1 << 24  # bytes per write when streaming arrays to disk
_CRC_CHUNK = 1 << 20  # bytes per recorded CRC-32 of an array file (the unit of verification)
_READ = 1 << 20  # bytes per read when verifying


# --------------------------------------------------------------------------- low-level I/O


def _fsync_dir(path: str) -> None:
    """Make a rename or a new directory entry in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_dir(root: str) -> str:
    d = os.path.join(root, _TMP)
    os.makedirs(d, exist_ok=True)
    return d


def _tmp_name(root: str, stem: str) -> str:
    return os.path.join(_tmp_dir(root), f"{stem}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def _temporary_dir(root: str, stem: str) -> Iterator[str]:
    """A fresh folder under ``.sdi-tmp`` for files to be renamed into place; removed if the block fails."""
    tmp = _tmp_name(root, stem)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    """``obj`` as JSON with a ``checksum`` (CRC-32 of its canonical form) so that damage is detected on read."""
    sealed = dict(obj)
    sealed["checksum"] = zlib.crc32(_canonical(dict(obj)))
    return (json.dumps(sealed, indent=1, sort_keys=True) + "\n").encode()


def _write_file_durably(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write(root: str, dest: str, data: bytes) -> None:
    """Write ``data`` to ``dest`` so that readers see the old file or the whole new one."""
    tmp = _tmp_name(root, os.path.basename(dest))
    _write_file_durably(tmp, data)
    os.replace(tmp, dest)
    _fsync_dir(os.path.dirname(dest))


def _create_once(root: str, dest: str, data: bytes) -> bool:
    """Atomically create ``dest`` with ``data`` unless it exists; True when this call created it.

    ``os.link`` fails when the target exists, which makes this safe when
    several ranks race to create the same file.
    """
    if os.path.exists(dest):
        return False
    tmp = _tmp_name(root, os.path.basename(dest))
    _write_file_durably(tmp, data)
    try:
        os.link(tmp, dest)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:  # filesystems without hard links: fall back to an exclusive create
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT):
            raise
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            created = True
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _fsync_dir(os.path.dirname(dest))
    return created


class _CrcWriter:
    """File wrapper that keeps the CRC-32 of everything written, of each ``_CRC_CHUNK`` bytes, and the size."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.crc = 0
        self.size = 0
        self.chunks: list[int] = []
        self._chunk_crc = 0

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.crc = zlib.crc32(mv, self.crc)
        pos = 0
        while pos < mv.nbytes:
            piece = mv[pos : pos + _CRC_CHUNK - self.size % _CRC_CHUNK]
            self._chunk_crc = zlib.crc32(piece, self._chunk_crc)
            self.size += piece.nbytes
            pos += piece.nbytes
            if self.size % _CRC_CHUNK == 0:
                self.chunks.append(self._chunk_crc)
                self._chunk_crc = 0
        self.fh.write(mv)

    def record(self) -> dict:
        chunks = self.chunks + ([self._chunk_crc] if self.size % _CRC_CHUNK else [])
        return {"bytes": self.size, "crc32": self.crc, "chunk_bytes": _CRC_CHUNK, "chunk_crc32": chunks}


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _write_npy(path: str, parts: Sequence[np.ndarray], dtype: np.dtype, shape: tuple[int, ...],
               checks: Sequence[Callable[[int, int], None] | None] | None = None) -> dict:
    """Write the row-wise concatenation of ``parts`` as one ``.npy`` file, fsynced; returns sizes and CRC-32s.

    Streams in chunks, so ``parts`` may be memory maps larger than memory.
    ``checks[i](a, b)``, when given, runs before rows ``a..b`` of part ``i``
    are read (consolidation verifies its source there).
    """
    dtype = np.dtype(dtype)
    with open(path, "wb") as fh:
        w = _CrcWriter(fh)
        w.write(_npy_header(dtype, shape))
        for i, part in enumerate(parts):
            if part.shape[0] == 0:
                continue
            row_bytes = max(1, int(np.prod(part.shape[1:], dtype=np.int64)) * dtype.itemsize)
            rows = max(1, _CHUNK // row_bytes)
            for a in range(0, part.shape[0], rows):
                b = min(part.shape[0], a + rows)
                if checks is not None and checks[i] is not None:
                    checks[i](a, b)
                w.write(np.ascontiguousarray(part[a:b], dtype=dtype))
        fh.flush()
        os.fsync(fh.fileno())
    return w.record()


_buffers = threading.local()


def _read_buffer() -> memoryview:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(_READ))
    return buf


def _pread_into(fd: int, dest: memoryview, offset: int) -> int:  # pragma: no cover - platforms without preadv
    data = os.pread(fd, dest.nbytes, offset)
    dest[: len(data)] = data
    return len(data)


def _range_crc(path: str, lo: int, hi: int) -> int:
    """CRC-32 of bytes ``[lo, hi)`` of ``path``, read (not mapped) through one reused 1 MiB buffer.

    Reading rather than mapping turns a failing disk into an ``OSError``
    here instead of a ``SIGBUS`` in the middle of a matrix product, and keeps
    the pages out of this process's resident set.
    """
    buf = _read_buffer()
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = lo
        while pos < hi:
            want = min(hi - pos, len(buf))
            got = os.preadv(fd, [buf[:want]], pos) if hasattr(os, "preadv") else _pread_into(fd, buf[:want], pos)
            data = buf[:got]
            if got == 0:
                raise OSError(errno.EIO, "file ended early", path)
            crc = zlib.crc32(data, crc)
            pos += got
    finally:
        os.close(fd)
    return crc


def _load_json(path: str, what: str) -> dict:
    """Parse a JSON object; FileNotFoundError propagates, anything unreadable is a damaged store."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        obj = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SDIError(f"{what} {path!r} is not valid JSON ({exc}); the store is damaged.") from None
    if not isinstance(obj, dict):
        raise SDIError(f"{what} {path!r} holds a JSON {type(obj).__name__}, not an object; the store is damaged.")
    return obj


def _unseal(obj: dict, path: str, what: str, *, verify: bool, required: bool) -> dict:
    """``obj`` without its ``checksum``, after checking it (when ``verify``)."""
    obj = dict(obj)
    checksum = obj.pop("checksum", None)
    if not verify:
        return obj
    if checksum is None:
        if required:
            raise SDIError(f"{what} {path!r} has no checksum; the store is damaged or was edited by hand.")
        return obj
    if checksum != zlib.crc32(_canonical(obj)):
        raise SDIError(
            f"{what} {path!r} fails its checksum: it was damaged or edited. Restore the store from a copy, or "
            "featurise it again (sdi featurize --overwrite, or overwrite=True)."
        )
    return obj


def _read_json(path: str, what: str, *, verify: bool = True, required: bool = True) -> dict:
    return _unseal(_load_json(path, what), path, what, verify=verify, required=required)


# --------------------------------------------------------------------------- names and metadata


def _check_name(name: Any, kind: str, where: str) -> None:
    """Refuse a group or parameter name that is not a plain file-name component (group names name files)."""
    ok = (isinstance(name, str) and name not in ("", ".", "..") and len(name.encode()) <= 200
          and not any(c in "/\\" or ord(c) < 32 for c in name))
    if not ok:
        raise SDIError(
            f"{where}: {kind} name {name!r} is not a plain file-name component (it must be non-empty, not '.' "
            "or '..', and hold no '/', '\\' or control characters); the metadata is damaged or was crafted."
        )


def _array_name(k: int, group: str) -> str:
    return f"ckpt{k}.{group}.npy"


def _json_config(config: Mapping[str, Any] | None, where: str) -> dict | None:
    """``config`` as it reads back from JSON (tuples become lists), or an error naming what cannot be stored."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise SDIError(f"{where}: config must be a mapping of JSON values, got {type(config).__name__}.")
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise SDIError(f"{where}: config cannot be stored as JSON ({exc}); use numbers, strings, lists and dicts.") from None


def _settings(*, summed: bool, dtype: str, shard_size: int | None, split: str | None, run: dict | None) -> dict:
    """The metadata fields a run fixes before it has featurised anything."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "summed": bool(summed), "dtype": dtype,
            "shard_size": shard_size, "split": split, "run": run}


def _meta_for(features: Features, settings: Mapping[str, Any]) -> dict:
    from . import __version__

    layout = features.layout
    for g in layout.groups:
        _check_name(g.name, "group", "Feature store")
    for p in layout.param_shapes:
        _check_name(p, "parameter", "Feature store")
    return {
        **settings,
        "library_version": __version__,
        "sketch": dict(layout.sketch),
        "layout": layout.to_dict(),
        "model_fingerprint": layout.model_fingerprint(),
        "steps": {g.name: int(features.steps[g.name]) for g in layout.groups},
        "checkpoints": [{"id": c.id, "eta": float(c.eta), "step": c.step} for c in features.checkpoints],
        "example_ids": features.example_ids is not None,
    }


# Fields compared between two stores (or a store and a run), in the order mismatches are reported.
_FIELDS = (
    ("format_version", "format version"),
    ("sketch", "sketch"),
    ("model_fingerprint", "model (parameter names, shapes and groups)"),
    ("layout", "feature layout"),
    ("checkpoints", "checkpoints"),
    ("steps", "step counts"),
    ("summed", "step-summed flag"),
    ("dtype", "dtype"),
    ("shard_size", "shard size (batches per shard)"),
    ("example_ids", "presence of example ids"),
    ("split", "split"),
    ("run", "run configuration"),
)


def _config_differences(prefix: str, a: Any, b: Any) -> list[str]:
    """Every leaf of two JSON values that differs, as ``"prefix.key: a vs b"``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            missing = object()
            va, vb = a.get(key, missing), b.get(key, missing)
            if va is missing or vb is missing:
                out.append(f"{prefix}.{key}: {'(absent)' if va is missing else repr(va)} vs "
                           f"{'(absent)' if vb is missing else repr(vb)}")
            else:
                out += _config_differences(f"{prefix}.{key}", va, vb)
        return out
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


def describe_differences(a: Mapping[str, Any], b: Mapping[str, Any], fields: Iterable[str] | None = None) -> list[str]:
    """One sentence per metadata field where ``a`` and ``b`` differ (empty when they agree).

    Args:
        a, b: store metadata dicts (``FeatureStore.meta``), or the settings of a run.
        fields: restrict the comparison to these keys (default: all that matter).
    """
    keep = None if fields is None else set(fields)
    out: list[str] = []
    for key, label in _FIELDS:
        if keep is not None and key not in keep:
            continue
        va, vb = a.get(key), b.get(key)
        if key == "layout" and va is not None and vb is not None:
            d = FeatureLayout.from_dict(va).diff(FeatureLayout.from_dict(vb))
            if d is not None:
                out.append(f"feature layout differs: {d}")
        elif key == "checkpoints" and va is not None and vb is not None:
            ids_a, ids_b = [c["id"] for c in va], [c["id"] for c in vb]
            etas_a, etas_b = [c["eta"] for c in va], [c["eta"] for c in vb]
            steps_a, steps_b = [c.get("step") for c in va], [c.get("step") for c in vb]
            if ids_a != ids_b:
                out.append(f"checkpoints differ: ids {ids_a} vs {ids_b}")
            elif not np.allclose(etas_a, etas_b, rtol=1e-12, atol=0):
                out.append(f"checkpoint etas differ: {etas_a} vs {etas_b}")
            if ids_a == ids_b and steps_a != steps_b:
                out.append(f"checkpoint training steps differ: {steps_a} vs {steps_b}")
        elif key == "run" and isinstance(va, dict) and isinstance(vb, dict):
            diffs = _config_differences("run", va, vb)
            if diffs:
                out.append("run configuration differs: " + "; ".join(diffs))
        elif va != vb:
            out.append(f"{label} differs: {va!r} vs {vb!r}")
    return out


def describe_difference(a: Mapping[str, Any], b: Mapping[str, Any], fields: Iterable[str] | None = None) -> str | None:
    """All of :func:`describe_differences` in one sentence, or None when the metadata agree."""
    diffs = describe_differences(a, b, fields)
    return "; ".join(diffs) if diffs else None


def _validate_meta(meta: Mapping[str, Any], path: str) -> FeatureLayout:
    where = f"Feature store {path!r}"
    if meta.get("format") != FORMAT:
        raise SDIError(f"{where}: meta.json is not an sdi feature store (format {meta.get('format')!r}).")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise SDIError(
            f"{where} has format version {version!r}; this library reads versions 1..{FORMAT_VERSION}. "
            "Upgrade sdi, or featurise again with this version."
        )
    missing = [k for k in ("sketch", "layout", "model_fingerprint", "steps", "summed", "dtype", "checkpoints")
               if k not in meta]
    if missing:
        raise SDIError(f"{where}: meta.json lacks the fields {missing}; the store is damaged.")
    try:
        layout = FeatureLayout.from_dict(meta["layout"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SDIError(f"{where}: the layout in meta.json cannot be read ({exc!r}); the store is damaged.") from None
    for g in layout.groups:
        _check_name(g.name, "group", where)
    for p in layout.param_shapes:
        _check_name(p, "parameter", where)
    if not isinstance(meta["sketch"], dict) or dict(layout.sketch) != dict(meta["sketch"]):
        raise SDIError(f"{where}: meta.json sketch {meta['sketch']} disagrees with its layout {dict(layout.sketch)}.")
    if layout.model_fingerprint() != meta["model_fingerprint"]:
        raise SDIError(
            f"{where}: the model fingerprint {meta['model_fingerprint']!r} does not match the recorded "
            f"parameters (fingerprint {layout.model_fingerprint()!r}); meta.json was edited or damaged."
        )
    if meta["dtype"] not in DTYPES:
        raise SDIError(f"{where}: unsupported dtype {meta['dtype']!r}; expected one of {DTYPES}.")
    groups = [g.name for g in layout.groups]
    steps = meta["steps"]
    if (not isinstance(steps, dict) or sorted(steps) != sorted(groups)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in steps.values())):
        raise SDIError(f"{where}: step counts {steps} do not cover the groups {groups} with positive ints.")
    if any(g.width < 1 for g in layout.groups):
        raise SDIError(f"{where}: the layout has a group without features; the store is damaged.")
    if not isinstance(meta["checkpoints"], list) or not meta["checkpoints"]:
        raise SDIError(f"{where}: no checkpoints recorded.")
    for c in meta["checkpoints"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), str):
            raise SDIError(f"{where}: checkpoint record {c!r} is not {{'id': str, 'eta': float}}; the store is damaged.")
        eta = c.get("eta")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
            raise SDIError(f"{where}: checkpoint {c.get('id')!r} has eta {eta!r}; etas must be positive.")
    if meta.get("run") is not None and not isinstance(meta["run"], dict):
        raise SDIError(f"{where}: the run configuration in meta.json is not an object; the store is damaged.")
    return layout


# --------------------------------------------------------------------------- input fingerprints


def _feed(h, obj: Any, where: str) -> None:
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, Mapping):
        h.update(f"map:{len(obj)};".encode())
        for key in sorted(obj, key=str):
            _feed(h, str(key), where)
            _feed(h, obj[key], where)
    elif isinstance(obj, (list, tuple, range)):
        h.update(f"seq:{len(obj)};".encode())
        for item in obj:
            _feed(h, item, where)
    elif isinstance(obj, (np.ndarray, np.generic)) or is_array_api_obj(obj):
        a = np.ascontiguousarray(to_numpy(obj) if not isinstance(obj, (np.ndarray, np.generic)) else obj)
        h.update(f"array:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    else:
        raise SDIError(
            f"{where}: cannot fingerprint an input batch holding a {type(obj).__module__}.{type(obj).__name__}. "
            "Pass fingerprint=callable (list of batches -> str) that hashes what your batches hold, or "
            "fingerprint=None to record none (a resume with other data then goes unnoticed)."
        )


def batch_fingerprint(batches: Sequence[Any]) -> str:
    """A content hash of a list of input batches (the inputs of one shard).

    Hashes arrays of any library (dtype, shape and bytes), mappings (by
    sorted key), sequences, numbers, strings and None; anything else is an
    :class:`SDIError` (give :func:`featurize_to_store` your own
    ``fingerprint``).  Batch boundaries enter the hash: the same rows cut into
    other batches give another fingerprint.
    """
    h = hashlib.sha256()
    _feed(h, list(batches), "featurize_to_store")
    return "sha256:" + h.hexdigest()[:32]


# --------------------------------------------------------------------------- files and segments


class _File:
    """One committed ``.npy`` of a store: its memory map, its recorded checksums and how much of it was verified."""

    def __init__(self, store: str, what: str, path: str, rec: Any, dtype: np.dtype, shape: tuple[int, ...],
                 verify: bool) -> None:
        name = os.path.basename(path)
        where = f"Feature store {store!r}, {what}: {name}"
        ok = isinstance(rec, dict) and all(isinstance(rec.get(k), int) for k in ("bytes", "crc32"))
        if not ok:
            raise SDIError(f"{where}: its commit record {rec!r} is not readable; the store is damaged.")
        header = _npy_header(dtype, shape)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        want = len(header) + int(shape[0]) * row_bytes
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise SDIError(f"{where} is missing; the store is damaged.") from None
        if size != rec["bytes"] or size != want:
            raise SDIError(
                f"{where} has {size} bytes but {rec['bytes']} were committed ({want} expected for {shape} "
                f"{dtype}); the store is damaged."
            )
        with open(path, "rb") as fh:
            head = fh.read(len(header))
        if head != header:
            raise SDIError(
                f"{where}: its .npy header is not the one its metadata implies ({dtype} {shape}); the file is "
                "damaged. Restore the store from a copy, or featurise it again."
            )
        chunks = rec.get("chunk_crc32")
        if isinstance(chunks, list) and isinstance(rec.get("chunk_bytes"), int) and rec["chunk_bytes"] > 0:
            self.chunk_bytes, self.chunks = int(rec["chunk_bytes"]), [int(c) for c in chunks]
        else:  # format 1: one CRC of the whole file
            self.chunk_bytes, self.chunks = size, [int(rec["crc32"])]
        if len(self.chunks) != max(1, -(-size // self.chunk_bytes)):
            raise SDIError(f"{where}: its commit record lists {len(self.chunks)} chunk checksums for {size} bytes; "
                           "the store is damaged.")
        self.store, self.what, self.path, self.name, self.size = store, what, path, name, size
        self.offset, self.row_bytes, self.verify = len(header), row_bytes, verify
        self.verified = bytearray(len(self.chunks))
        self.array = np.memmap(path, dtype=dtype, mode="r", offset=len(header), shape=tuple(shape))

    def ensure_rows(self, a: int, b: int) -> None:
        """Check the CRC-32 of every not yet verified chunk holding rows ``[a, b)`` (no-op without ``verify``)."""
        if not self.verify or b <= a:
            return
        lo, hi = self.offset + a * self.row_bytes, self.offset + b * self.row_bytes
        for c in range(lo // self.chunk_bytes, (hi - 1) // self.chunk_bytes + 1):
            if not self.verified[c]:
                self._check(c)

    def read_rows(self, a: int, b: int, out: np.ndarray) -> None:
        """Read rows ``[a, b)`` into ``out`` (C-contiguous, ``b - a`` rows), checking the chunks they span.

        Chunks that lie inside the rows are checked on the bytes just read;
        the (at most two) partial chunks at the ends are read once more for
        their check, through the 1 MiB verification buffer.
        """
        lo, hi = self.offset + a * self.row_bytes, self.offset + b * self.row_bytes
        dest = memoryview(out).cast("B")
        if dest.nbytes != hi - lo:
            raise SDIError(f"read_rows: {dest.nbytes} bytes of room for {hi - lo} bytes of rows {a}..{b}.")
        with io_errors(f"Reading feature store {self.store!r}, {self.what}", self.path):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                pos = 0
                while pos < hi - lo:
                    got = os.preadv(fd, [dest[pos:]], lo + pos) if hasattr(os, "preadv") else _pread_into(fd, dest[pos:], lo + pos)
                    if got == 0:
                        raise OSError(errno.EIO, "file ended early", self.path)
                    pos += got
            finally:
                os.close(fd)
            if not self.verify or b <= a:
                return
            for c in range(lo // self.chunk_bytes, (hi - 1) // self.chunk_bytes + 1):
                if self.verified[c]:
                    continue
                c0, c1 = c * self.chunk_bytes, min(self.size, (c + 1) * self.chunk_bytes)
                crc = zlib.crc32(dest[c0 - lo : c1 - lo]) if lo <= c0 and c1 <= hi else _range_crc(self.path, c0, c1)
                self._compare(c, crc)

    def ensure_all(self) -> None:
        if self.verify:
            for c in range(len(self.chunks)):
                if not self.verified[c]:
                    self._check(c)

    def _check(self, c: int) -> None:
        lo, hi = c * self.chunk_bytes, min(self.size, (c + 1) * self.chunk_bytes)
        with io_errors(f"Reading feature store {self.store!r}, {self.what}", self.path):
            crc = _range_crc(self.path, lo, hi)
        self._compare(c, crc)

    def _compare(self, c: int, crc: int) -> None:
        lo, hi = c * self.chunk_bytes, min(self.size, (c + 1) * self.chunk_bytes)
        if crc != self.chunks[c]:
            rows = (max(0, lo - self.offset) // self.row_bytes, -(-(hi - self.offset) // self.row_bytes))
            raise SDIError(
                f"Feature store {self.store!r}, {self.what}: {self.name} fails its CRC-32 check in bytes "
                f"{lo}..{hi} (rows {rows[0]}..{rows[1]}); the store is damaged. Restore it from a copy, or featurise "
                "it again (sdi featurize --overwrite, or overwrite=True)."
            )
        self.verified[c] = 1


@dataclass
class _Segment:
    """A contiguous run of rows stored in one folder (a shard, or the consolidated data)."""

    start: int
    stop: int
    folder: str
    files: list[dict[str, _File]]  # per checkpoint: group -> file
    ids_file: _File | None
    index: int | None  # shard index, None for consolidated data

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def arrays(self) -> list[dict[str, np.ndarray]]:
        """Per checkpoint: group -> memory map ``[n, S, D]``."""
        return [{g: f.array for g, f in blk.items()} for blk in self.files]

    @property
    def ids(self) -> np.ndarray | None:
        return None if self.ids_file is None else self.ids_file.array

    def all_files(self) -> list[_File]:
        return [f for blk in self.files for f in blk.values()] + ([self.ids_file] if self.ids_file else [])


def _shard_name(index: int) -> str:
    return f"{index:06d}"


def _marker_path(root: str, index: int) -> str:
    return os.path.join(root, _SHARDS, _shard_name(index) + ".json")


def _committed_shards(root: str, *, verify: bool = True, required: bool = True) -> dict[int, dict]:
    """Commit markers of the shards written so far: index -> marker (checked for damage and for duplicates)."""
    folder = os.path.join(root, _SHARDS)
    out = {}
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        m = _MARKER_RE.match(name)
        if m:
            index = int(m.group(1))
            path = os.path.join(folder, name)
            marker = _read_json(path, "Shard commit marker", verify=verify, required=required)
            if marker.get("shard", index) != index:
                raise SDIError(
                    f"Feature store {root!r}: the commit marker {name} records shard {marker.get('shard')!r}; it was "
                    "copied from another shard and the store is damaged. Featurise it again (--overwrite)."
                )
            rows = marker.get("rows")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or not isinstance(marker.get("files"), dict):
                raise SDIError(f"Feature store {root!r}: the commit marker {name} is not readable; the store is damaged.")
            out[index] = marker
    return out


def _read_count(root: str, *, verify: bool = True, required: bool = True) -> int | None:
    path = os.path.join(root, _COUNT)
    if not os.path.exists(path):
        return None
    n = _read_json(path, "Shard count", verify=verify, required=required).get("n_shards")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SDIError(f"Feature store {root!r}: shards.json records {n!r} shards; the store is damaged.")
    return n


# --------------------------------------------------------------------------- the store


class FeatureStore:
    """A feature store opened for reading (validated on open).

    Args:
        path: the store directory.
        partial: read a store whose featurisation has not finished, using the
            shards committed so far (rows are then numbered over those shards
            only).  By default an incomplete store is an error that says which
            shards are missing.
        verify: check checksums as data is read (default): the JSON files
            and the example ids on open, each 1 MiB chunk of the feature
            arrays when a block first reads it (:meth:`iter_blocks`), all of
            them before :meth:`as_features` returns memory maps and before
            :meth:`consolidate` copies them.  ``False`` checks only sizes and
            headers.

    Attributes:
        meta: the metadata dict (see the module docstring).
        layout: :class:`~sdi_core.specs.FeatureLayout` of the features.
        checkpoints: one :class:`~sdi_core.features.CheckpointInfo` per checkpoint.
        steps: steps per group (before summing).
        summed: whether the step axis was summed out (``S_g == 1`` on disk).
        dtype: NumPy dtype of the arrays on disk.
        n_examples: number of rows ``N``.
    """

    def __init__(self, path: str | os.PathLike, *, partial: bool = False, verify: bool = True) -> None:
        self.path = os.fspath(path)
        self.verify_reads = bool(verify)
        with io_errors(f"Reading feature store {self.path!r}", self.path):
            self._open(partial)

    def _open(self, partial: bool) -> None:
        meta_path = os.path.join(self.path, _META)
        if not os.path.isdir(self.path):
            if os.path.exists(self.path):
                raise SDIError(f"No feature store at {self.path!r}: it is a file, not a store folder.")
            raise SDIError(f"No feature store at {self.path!r}: the directory does not exist.")
        try:
            raw = _load_json(meta_path, "Store metadata")
        except FileNotFoundError:
            raise SDIError(
                f"{self.path!r} has no meta.json: it is not a feature store, or featurisation was killed "
                "before the first shard was committed (run it again; it resumes)."
            ) from None
        self.format_version = raw.get("format_version")
        self._sealed = isinstance(self.format_version, int) and self.format_version >= 2
        self.meta = _unseal(raw, meta_path, "Store metadata", verify=self.verify_reads, required=self._sealed)
        self.layout = _validate_meta(self.meta, self.path)
        self.checkpoints = tuple(
            CheckpointInfo(c["id"], float(c["eta"]), c.get("step")) for c in self.meta["checkpoints"]
        )
        self.steps = dict(self.meta["steps"])
        self.summed = bool(self.meta["summed"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.segments = self._load_segments(partial)
        self.n_examples = self.segments[-1].stop if self.segments else 0
        self._starts = [s.start for s in self.segments]

    # ------------------------------------------------------------------ opening
    def _json(self, path: str, what: str) -> dict:
        return _read_json(path, what, verify=self.verify_reads, required=self._sealed)

    def _load_segments(self, partial: bool) -> list[_Segment]:
        data_commit = os.path.join(self.path, _DATA_COMMIT)
        if os.path.exists(data_commit):
            marker = self._json(data_commit, "Consolidation marker")
            return [self._open_folder(os.path.join(self.path, _DATA), marker, 0, None)]
        markers = _committed_shards(self.path, verify=self.verify_reads, required=self._sealed)
        n_shards = _read_count(self.path, verify=self.verify_reads, required=self._sealed)
        if not partial:
            if n_shards is None:
                raise SDIError(
                    f"Feature store {self.path!r} is incomplete: featurisation has not finished "
                    f"({len(markers)} shard(s) committed, total not yet known). Run the same featurize "
                    "command again to resume, or open it with partial=True to read the committed shards."
                )
            missing = [i for i in range(n_shards) if i not in markers]
            if missing:
                raise SDIError(
                    f"Feature store {self.path!r} is incomplete: shards {missing[:10]}"
                    f"{' ...' if len(missing) > 10 else ''} of {n_shards} are not committed. Run the same "
                    "featurize command again (every rank) to resume, or open it with partial=True."
                )
        segments, start = [], 0
        for i in sorted(markers):
            if n_shards is not None and i >= n_shards:
                raise SDIError(
                    f"Feature store {self.path!r}: shard {i} is committed but the store has only {n_shards} "
                    "shards; the store was written by two different runs. Featurise into a fresh directory."
                )
            seg = self._open_folder(os.path.join(self.path, _SHARDS, _shard_name(i)), markers[i], start, i)
            segments.append(seg)
            start = seg.stop
        if not segments and not partial:
            raise SDIError(f"Feature store {self.path!r} holds no shards.")
        return segments

    def _open_folder(self, folder: str, marker: Mapping, start: int, index: int | None) -> _Segment:
        what = f"shard {index}" if index is not None else "consolidated data"
        n, files = marker.get("rows"), marker.get("files")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(files, dict):
            raise SDIError(f"Feature store {self.path!r}, {what}: its commit marker is not readable; the store is damaged.")
        blocks = []
        for k in range(len(self.checkpoints)):
            block = {}
            for g in self.layout.groups:
                name = _array_name(k, g.name)
                shape = (n, 1 if self.summed else self.steps[g.name], g.width)
                block[g.name] = self._file(folder, name, files, what, self.dtype, shape)
            blocks.append(block)
        ids_file = None
        if self.meta.get("example_ids"):
            ids_file = self._file(folder, _IDS, files, what, np.dtype(np.int64), (n,))
            ids_file.ensure_all()  # small, and read whole by example_ids and describe_row
        return _Segment(start, start + n, folder, blocks, ids_file, index)

    def _file(self, folder: str, name: str, files: Mapping, what: str, dtype: np.dtype, shape: tuple) -> _File:
        if name not in files:
            raise SDIError(f"Feature store {self.path!r}, {what}: its commit marker does not list {name}.")
        return _File(self.path, what, os.path.join(folder, name), files[name], np.dtype(dtype), shape,
                     self.verify_reads)

    # ------------------------------------------------------------------ views
    @property
    def n_slots(self) -> int:
        return sum(self.steps[g.name] for g in self.layout.groups)

    @property
    def nbytes(self) -> int:
        """Bytes of feature data on disk (all checkpoints and groups)."""
        return self.n_examples * self.row_nbytes

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row of features on disk (all checkpoints and groups)."""
        per_row = sum((1 if self.summed else self.steps[g.name]) * g.width for g in self.layout.groups)
        return per_row * len(self.checkpoints) * self.dtype.itemsize

    @property
    def example_ids(self) -> np.ndarray | None:
        """Ids of all rows ``[N]`` (None when the features carried none)."""
        if not self.meta.get("example_ids"):
            return None
        if not self.segments:
            return np.zeros((0,), dtype=np.int64)
        return np.concatenate([np.asarray(s.ids) for s in self.segments])

    def ids_at(self, rows) -> np.ndarray:
        """Example ids of the rows ``rows`` (int array of any shape), without reading the other ids.

        Rows are returned as they are when the store has no ids.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if not self.meta.get("example_ids"):
            return rows.copy()
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_examples):
            raise SDIError(f"ids_at: rows must lie in [0, {self.n_examples}).")
        out = np.empty(rows.shape, dtype=np.int64)
        seg_of = np.searchsorted(np.asarray(self._starts), rows, side="right") - 1
        for s in np.unique(seg_of):
            seg = self.segments[int(s)]
            sel = seg_of == s
            out[sel] = np.asarray(seg.ids)[rows[sel] - seg.start]
        return out

    def describe_row(self, row: int) -> str:
        """Where row ``row`` lives, for messages: its shard (or the consolidated data), its row there, its id."""
        seg = self.segments[bisect.bisect_right(self._starts, row) - 1]
        place = (f"shard {seg.index}, row {row - seg.start} of the shard (store row {row})" if seg.index is not None
                 else f"row {row} of the consolidated data")
        ident = f", example id {int(seg.ids[row - seg.start])}" if seg.ids is not None else ""
        return f"feature store {self.path!r}, {place}{ident}"

    def __len__(self) -> int:
        return self.n_examples

    def as_features(self, *, in_memory: bool = False) -> Features:
        """The stored features as :class:`~sdi_core.features.Features` (NumPy arrays).

        A store with one shard (or a consolidated one) gives read-only memory
        maps, so ``sdi_core.influence`` can run on a store larger than memory.
        A store of several shards must be consolidated first
        (:meth:`consolidate`), or read into memory with ``in_memory=True``.
        When the store verifies its reads, every file is checked first (one
        pass over the store; ``in_memory`` checks the bytes as it reads them).
        """
        if not self.segments:
            raise SDIError(f"Feature store {self.path!r} holds no rows yet.")
        if len(self.segments) > 1 and not in_memory:
            raise SDIError(
                f"Feature store {self.path!r} has {len(self.segments)} shards, which cannot be one memory map. "
                "Call store.consolidate() once (it merges them on disk), pass in_memory=True to load them, "
                "or score it with sdi_core.scoring.score_store, which streams shard by shard."
            )
        if in_memory:
            data, ids = self._read(0, self.n_examples), self.example_ids
        else:
            seg = self.segments[0]
            for f in seg.all_files():
                f.ensure_all()
            data, ids = [dict(block) for block in seg.arrays], seg.ids
        return Features(
            data=data,
            layout=self.layout,
            checkpoints=self.checkpoints,
            steps=dict(self.steps),
            example_ids=ids,
            summed=self.summed,
            meta={"store": self.path, "split": self.meta.get("split")},
        )

    def iter_blocks(
        self, block_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, int, list[dict[str, np.ndarray]]]]:
        """Yield ``(row_start, row_stop, [ {group: [n, S, D]} per checkpoint ])`` over rows ``[start, stop)``.

        Blocks are ``block_rows`` rows from ``start`` on (the last may be
        shorter), whatever the shard sizes, so that a block's boundaries do
        not depend on how the store was written.  Each block is read (not
        mapped) into fresh arrays: a streamed pass holds exactly the blocks
        its consumer keeps, a failing disk raises an :class:`SDIError`
        instead of a ``SIGBUS``, and with verification on every chunk is
        checked on the bytes read before the block is yielded.
        """
        stop = self.n_examples if stop is None else min(stop, self.n_examples)
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows <= 0:
            raise SDIError(f"iter_blocks(block_rows={block_rows!r}): must be a positive int.")
        for lo in range(start, stop, int(block_rows)):
            hi = min(stop, lo + int(block_rows))
            yield lo, hi, self._read(lo, hi)

    def _read(self, lo: int, hi: int) -> list[dict[str, np.ndarray]]:
        """Rows ``[lo, hi)`` of every checkpoint and group, read into new arrays."""
        out = [{g.name: np.empty((hi - lo, 1 if self.summed else self.steps[g.name], g.width), dtype=self.dtype)
                for g in self.layout.groups} for _ in self.checkpoints]
        stops = [seg.stop for seg in self.segments]
        for seg in self.segments[bisect.bisect_right(stops, lo):]:
            if seg.start >= hi:
                break
            a, b = max(lo, seg.start) - seg.start, min(hi, seg.stop) - seg.start
            at = seg.start + a - lo
            for k, blk in enumerate(seg.files):
                for g, f in blk.items():
                    f.read_rows(a, b, out[k][g][at : at + b - a])
        return out

    # ------------------------------------------------------------------ checks
    def check_compatible(self, other, what: str | None = None) -> dict:
        """:func:`sdi_core.features.check_compatible` of this store and ``other`` (a store or ``Features``).

        Compares the sketch, the parameters (by name and shape, any order)
        and the checkpoints (ids, etas, steps); loop counts and dtypes may
        differ.  Returns the column order of ``other`` per group.
        """
        return check_compatible(self, other, what or "these feature sets")

    def verify(self) -> None:
        """Check every committed file now: JSON checksums, sizes, headers and the CRC-32 of every chunk."""
        full = FeatureStore(self.path, partial=True, verify=True)
        for seg in full.segments:
            for f in seg.all_files():
                f.ensure_all()

    # ------------------------------------------------------------------ consolidation
    def consolidate(self, *, remove_shards: bool = True) -> "FeatureStore":
        """Merge the shards into one file per checkpoint and group (atomically); returns the reopened store.

        Streams shard by shard, so it needs no memory beyond a chunk.  Every
        chunk of a shard is checked against its CRC-32 before it is copied
        (unless the store was opened with ``verify=False``).  The shards are
        removed afterwards unless ``remove_shards=False``.
        """
        root = self.path
        with _WriterLock(root, 0, 1, exclusive=True):
            with io_errors(f"Consolidating feature store {root!r}", root):
                return self._consolidate(remove_shards)

    def _consolidate(self, remove_shards: bool) -> "FeatureStore":
        root = self.path
        if os.path.exists(os.path.join(root, _DATA_COMMIT)):
            return FeatureStore(root, verify=self.verify_reads)
        full = FeatureStore(root, verify=self.verify_reads)  # refuses an incomplete store, with the reason
        markers = _committed_shards(root, verify=self.verify_reads, required=full._sealed)
        with _temporary_dir(root, "data") as tmp:
            files = {}
            for k in range(len(full.checkpoints)):
                for g in full.layout.groups:
                    name = _array_name(k, g.name)
                    srcs = [s.files[k][g.name] for s in full.segments]
                    shape = (full.n_examples,) + tuple(srcs[0].array.shape[1:])
                    files[name] = _write_npy(os.path.join(tmp, name), [f.array for f in srcs], full.dtype, shape,
                                             [f.ensure_rows for f in srcs])
            if full.meta.get("example_ids"):
                srcs = [s.ids_file for s in full.segments]
                files[_IDS] = _write_npy(os.path.join(tmp, _IDS), [f.array for f in srcs], np.int64,
                                         (full.n_examples,), [f.ensure_rows for f in srcs])
            _fsync_dir(tmp)
        dest = os.path.join(root, _DATA)
        if os.path.exists(dest):
            _remove_owned_dir(root, dest)  # left by a consolidation that died before its commit
        os.replace(tmp, dest)
        _fsync_dir(root)
        shards = [{"rows": int(markers[s.index]["rows"]), "inputs": markers[s.index].get("inputs")}
                  for s in full.segments]
        marker = {"rows": full.n_examples, "files": files, "n_shards": len(full.segments), "shards": shards}
        _atomic_write(root, os.path.join(root, _DATA_COMMIT), _json_bytes(marker))
        if remove_shards:
            _cleanup(root)
        return FeatureStore(root, verify=self.verify_reads)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.name}: {self.steps[g.name]} steps x {g.width}" for g in self.layout.groups)
        return (
            f"FeatureStore({self.path!r}, N={self.n_examples}, checkpoints={len(self.checkpoints)}, {groups}, "
            f"sketch={dict(self.layout.sketch)}, {self.dtype}{', summed' if self.summed else ''}, "
            f"{len(self.segments)} segment(s))"
        )


def open_store(path: str | os.PathLike, *, partial: bool = False, verify: bool = True) -> FeatureStore:
    """Open and validate a feature store (see :class:`FeatureStore`)."""
    return FeatureStore(path, partial=partial, verify=verify)


# --------------------------------------------------------------------------- what the writer owns


def _remove_owned_dir(root: str, folder: str) -> None:
    """Remove a shard or data folder: the array files this module names, then the folder if it is empty."""
    if not os.path.isdir(folder):
        return
    foreign = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if _ARRAY_FILE_RE.match(name) and os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
        else:
            foreign.append(name)
    if foreign:
        raise SDIError(
            f"Feature store {root!r}: {os.path.relpath(folder, root)!r} holds files the store did not write "
            f"({sorted(foreign)[:6]}); move them out of the store and run again."
        )
    os.rmdir(folder)


def _cleanup(root: str) -> None:
    """Remove what a finished store no longer needs: temporaries, and the shards once consolidated."""
    if os.path.exists(os.path.join(root, _DATA_COMMIT)):
        shards = os.path.join(root, _SHARDS)
        if os.path.isdir(shards):
            for name in sorted(os.listdir(shards)):
                path = os.path.join(shards, name)
                if _MARKER_RE.match(name) and os.path.isfile(path):
                    os.unlink(path)
                elif _SHARD_RE.match(name) and os.path.isdir(path):
                    _remove_owned_dir(root, path)
            if not os.listdir(shards):
                os.rmdir(shards)
        count = os.path.join(root, _COUNT)
        if os.path.exists(count):
            os.unlink(count)
    tmp = os.path.join(root, _TMP)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    for name in os.listdir(root):  # left by killed runs: probe files, and locks whose holder is gone
        path = os.path.join(root, name)
        if name.startswith(PROBE_PREFIX):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        elif name.startswith(_LOCK_PREFIX) and os.path.abspath(path) not in _held_locks:
            _remove_stale_lock(path)
    _fsync_dir(root)


def _remove_store(root: str) -> None:
    """Remove a store's own files (for ``overwrite``), commit markers first and ``meta.json`` last.

    A run killed half-way through leaves a store whose ``meta.json`` still
    refuses a rerun without ``overwrite``; nothing the store did not write is
    touched.
    """
    for name in (_DATA_COMMIT, _COUNT):
        path = os.path.join(root, name)
        if os.path.exists(path):
            os.unlink(path)
    shards = os.path.join(root, _SHARDS)
    if os.path.isdir(shards):
        for name in sorted(os.listdir(shards)):
            if _MARKER_RE.match(name):
                os.unlink(os.path.join(shards, name))
        for name in sorted(os.listdir(shards)):
            if _SHARD_RE.match(name):
                _remove_owned_dir(root, os.path.join(shards, name))
        if not os.listdir(shards):
            os.rmdir(shards)
    _remove_owned_dir(root, os.path.join(root, _DATA))
    tmp = os.path.join(root, _TMP)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    meta = os.path.join(root, _META)
    if os.path.exists(meta):
        os.unlink(meta)
    _fsync_dir(root)


def _is_owned_leftover(root: str, name: str) -> bool:
    """Whether ``name`` in a folder without ``meta.json`` is what a run killed before its first commit leaves."""
    path = os.path.join(root, name)
    if name == _TMP or name.startswith(_LOCK_PREFIX) or name.startswith(PROBE_PREFIX):
        return True
    return name == _SHARDS and os.path.isdir(path) and not os.listdir(path)


def check_destination(path: str | os.PathLike, option: str = "feature store folder", *, create: bool = True) -> str:
    """Check that ``path`` can receive a feature store, before any work starts.

    It may be new, empty, a feature store (complete or not), or what a run
    killed before its first commit left.  A file, a non-empty folder that is
    not a store, and a folder that cannot be written are refused, naming
    what was found; nothing is ever deleted.

    Args:
        path: the store folder.
        option: how the caller names it in messages (``"--out"``).
        create: create the folder when missing (else only check that it could be).
    """
    root = os.fspath(path)
    where = f"{option} {root!r}"
    if os.path.exists(root) and not os.path.isdir(root):
        raise SDIError(f"{where} is a file, not a folder; choose a folder for the feature store.")
    if os.path.isdir(root):
        with io_errors(f"{where}: cannot read the folder", root):
            entries = sorted(os.listdir(root))
            if _META in entries:
                try:
                    fmt = _load_json(os.path.join(root, _META), "meta.json").get("format")
                except SDIError:
                    fmt = None
                if fmt != FORMAT:
                    raise SDIError(
                        f"Refusing to write a feature store into {where}: it holds a meta.json that is not an sdi "
                        "feature store's (or is damaged). Choose a new or empty folder; nothing was changed."
                    )
            else:
                foreign = [e + ("/" if os.path.isdir(os.path.join(root, e)) else "") for e in entries
                           if not _is_owned_leftover(root, e)]
                if foreign:
                    shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
                    raise SDIError(
                        f"Refusing to write a feature store into {where}: the folder is not empty and is not a "
                        f"feature store (it holds {shown}). Choose a new or empty folder; nothing was changed."
                    )
    return check_writable_dir(root, option, create=create)


# --------------------------------------------------------------------------- the writer lock


_held_locks: dict[str, list] = {}  # lock path -> [thread ident, depth, fd]
_held_guard = threading.Lock()


def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists but belongs to someone else
        return True
    return True


def _try_flock(fd: int, shared: bool = False) -> bool | None:
    """Take a non-blocking flock on ``fd``: True, False when another process holds it, None where unsupported."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP: a file system without flock


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        obj = json.loads(raw.decode()) if raw else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("pid"), int) else None


def _holder_text(holder: dict | None) -> str:
    if holder is None:
        return "a process that has not written its pid yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (rank {holder.get('rank')} of {holder.get('world_size')})"


def _remove_stale_lock(path: str) -> None:
    """Delete a lock file whose writer is gone (its flock is free; without flock, its pid is dead on this host)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        got, holder = _try_flock(fd), _read_holder(fd)
        if got is None:
            got = holder is not None and holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"])
        if got and holder is not None:
            os.unlink(path)
    finally:
        os.close(fd)


class _WriterLock:
    """The right of one process to write rank ``rank``'s shards of a store (re-entrant within a thread).

    ``.sdi-lock-R`` is created with ``O_EXCL`` and holds the writer's pid and
    host; the writer also holds an ``flock`` on it while it lives, so a lock
    whose ``flock`` is free was left by a killed process (on file systems
    without ``flock``, a dead pid on this host tells the same).  Such a
    stale lock is taken over.  ``exclusive`` (consolidation) also requires
    that no other rank is writing; any writer refuses one whose world size
    differs from its own.
    """

    def __init__(self, root: str, rank: int, world_size: int, *, exclusive: bool = False) -> None:
        self.root, self.rank, self.world_size, self.exclusive = root, int(rank), int(world_size), exclusive
        self.path = os.path.join(root, f"{_LOCK_PREFIX}{self.rank}")
        self.key = os.path.abspath(self.path)

    def __enter__(self) -> "_WriterLock":
        with io_errors(f"Feature store {self.root!r}: cannot take the writer lock", self.path):
            self._acquire()
        try:
            self._check_others()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _refuse(self, holder: dict | None, path: str) -> SDIError:
        return SDIError(
            f"Feature store {self.root!r} is being written by another process: {_holder_text(holder)} holds "
            f"{os.path.basename(path)}. Wait for it to finish or stop it; if no such process runs any more, "
            f"delete {path!r} and run again."
        )

    def _acquire(self) -> None:
        me = threading.get_ident()
        with _held_guard:
            held = _held_locks.get(self.key)
            if held is not None:
                if held[0] != me:
                    raise self._refuse({"pid": os.getpid(), "host": socket.gethostname(), "rank": self.rank,
                                        "world_size": self.world_size}, self.path)
                held[1] += 1
                return
        unclaimed = 0
        for _ in range(200):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                state, fd = self._inspect()
                if state == "live":
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise self._refuse(holder, self.path)
                if state == "retry":
                    time.sleep(0.01)
                    continue
                if state == "unclaimed":  # a lock file without a holder: a writer in its first instant, or dead
                    unclaimed += 1
                    if unclaimed < 20:
                        os.close(fd)
                        time.sleep(0.01)
                        continue
                # stale (or unclaimed for long): take it over, keeping the flock this process now holds
                os.ftruncate(fd, 0)
            else:
                waited = 0
                while _try_flock(fd) is False:  # someone is inspecting our fresh file; they back off at once
                    waited += 1
                    if waited > 100:
                        os.close(fd)
                        raise SDIError(f"Feature store {self.root!r}: could not lock {self.path!r}; another process "
                                       "is taking it. Run again once it has finished.")
                    time.sleep(0.01)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "rank": self.rank,
                                      "world_size": self.world_size}).encode(), 0)
            os.fsync(fd)
            with _held_guard:
                _held_locks[self.key] = [me, 1, fd]
            return
        raise SDIError(f"Feature store {self.root!r}: could not take the writer lock {self.path!r} (it kept "
                       "changing hands); another process is writing. Run again once it has finished.")

    def _inspect(self) -> tuple[str, int | None]:
        """State of an existing lock file: live / stale / unclaimed (with an fd holding its flock) / retry."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return "retry", None
        got = _try_flock(fd)
        holder = _read_holder(fd)
        if got is False:
            return "live", fd
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released (unlinked) between our open and our flock
            os.close(fd)
            return "retry", None
        if got is None:  # no flock here: only the pid can tell
            if holder is not None and (holder.get("host") != socket.gethostname() or _pid_alive(holder["pid"])):
                return "live", fd
            return ("stale" if holder is not None else "unclaimed"), fd
        return ("stale" if holder is not None else "unclaimed"), fd

    def _check_others(self) -> None:
        """Refuse when another rank of a different world size (or, if ``exclusive``, any other rank) is writing."""
        with io_errors(f"Feature store {self.root!r}: cannot read its lock files", self.root):
            names = sorted(n for n in os.listdir(self.root) if n.startswith(_LOCK_PREFIX))
        for name in names:
            path = os.path.join(self.root, name)
            if os.path.abspath(path) == self.key:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                got = _try_flock(fd, shared=True)
                holder = _read_holder(fd)
                if got is True:
                    continue  # stale: whoever resumes that rank takes it over
                if got is None and (holder is None or (holder.get("host") == socket.gethostname()
                                                       and not _pid_alive(holder["pid"]))):
                    continue
                if self.exclusive or (holder is not None and holder.get("world_size") != self.world_size):
                    raise self._refuse(holder, path)
            finally:
                os.close(fd)

    def _release(self) -> None:
        with _held_guard:
            held = _held_locks.get(self.key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _held_locks[self.key]
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(held[2])


# --------------------------------------------------------------------------- writing


def _prepare(features: Features, summed: bool, dtype: np.dtype, where: str) -> Features:
    if not isinstance(features, Features):
        raise SDIError(f"{where}: expected sdi_core.Features, got {type(features).__name__}.")
    if features.summed and not summed:
        raise SDIError(
            f"{where}: the features were summed over steps but the store keeps steps (summed=False). "
            "Pass summed=True, or featurise without summing."
        )
    f = features.to_numpy()
    if summed:
        f = f.sum_steps()
    data = [{g: np.asarray(a, dtype=dtype) for g, a in block.items()} for block in f.data]
    ids = None if f.example_ids is None else np.asarray(f.example_ids)
    if ids is not None and ids.dtype.kind not in "iu":
        raise SDIError(f"{where}: example ids must be integers, got dtype {ids.dtype}.")
    for k, block in enumerate(data):
        for g, a in block.items():
            finite = np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                ident = f" (example id {int(ids[bad[0]])})" if ids is not None else ""
                raise SDIError(
                    f"{where}: the features of row {int(bad[0])} of the batch{ident}, group {g!r}, checkpoint "
                    f"{features.checkpoints[k].id!r} are not finite (NaN or inf){f'; {len(bad) - 1} more rows too' if len(bad) > 1 else ''}. "
                    "Nothing was written for these rows: check the model's loss on that example and the checkpoint "
                    "(or featurise in float64)."
                )
    return Features(data, f.layout, f.checkpoints, dict(f.steps), ids, f.summed, dict(f.meta))


def _write_shard(root: str, index: int, features: Features, dtype: np.dtype, inputs: str | None) -> dict:
    """Write one shard and commit it (see the module docstring for the protocol)."""
    with _temporary_dir(root, f"shard-{_shard_name(index)}") as tmp:
        files = {}
        for k, block in enumerate(features.data):
            for g in features.layout.groups:
                name = _array_name(k, g.name)
                arr = block[g.name]
                files[name] = _write_npy(os.path.join(tmp, name), [arr], dtype, tuple(arr.shape))
        if features.example_ids is not None:
            ids = features.example_ids.astype(np.int64)
            files[_IDS] = _write_npy(os.path.join(tmp, _IDS), [ids], np.int64, ids.shape)
        _fsync_dir(tmp)
    shards = os.path.join(root, _SHARDS)
    if not os.path.isdir(shards):
        os.makedirs(shards, exist_ok=True)
        _fsync_dir(root)
    dest = os.path.join(shards, _shard_name(index))
    if os.path.exists(dest):
        _remove_owned_dir(root, dest)  # renamed into place by a run that died before committing it
    os.replace(tmp, dest)
    _fsync_dir(shards)
    marker = {"shard": index, "rows": features.n_examples, "files": files, "inputs": inputs}
    _atomic_write(root, _marker_path(root, index), _json_bytes(marker))
    return marker


def _existing_meta(root: str) -> dict | None:
    path = os.path.join(root, _META)
    if not os.path.exists(path):
        return None
    raw = _load_json(path, "Store metadata")
    sealed = isinstance(raw.get("format_version"), int) and raw["format_version"] >= 2
    return _unseal(raw, path, "Store metadata", verify=True, required=sealed)


def _refuse_differences(root: str, diffs: list[str], what: str) -> SDIError:
    return SDIError(
        f"Feature store {root!r} {what}: " + "; ".join(diffs) + " (stored vs this run). Run with the settings "
        "and inputs of the original run, write into another folder, or pass overwrite=True "
        "(sdi featurize --overwrite) to replace the store."
    )


def _ensure_meta(root: str, meta: dict) -> None:
    """Create ``meta.json`` or check that the existing one describes the same features."""
    path = os.path.join(root, _META)
    if _create_once(root, path, _json_bytes(meta)):
        return
    diffs = describe_differences(_existing_meta(root), meta)
    if diffs:
        raise _refuse_differences(root, diffs, "already holds different features")


def _check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise SDIError(f"Store dtype must be one of {DTYPES}, got {dtype!r}.") from None
    if dt.name not in DTYPES:
        raise SDIError(f"Store dtype must be one of {DTYPES}, got {dt.name!r}.")
    return dt


def write_features(
    path: str | os.PathLike,
    features: Features,
    *,
    summed: bool | None = None,
    dtype: str = "float32",
    split: str | None = None,
) -> FeatureStore:
    """Write in-memory features to a new store (one shard) and open it.

    Args:
        path: a directory that does not exist yet (or is empty).
        features: :class:`~sdi_core.features.Features` of any array library
            (copied to the host).
        summed: store the train side summed over steps (``[N, 1, D_g]``, all
            the query-step trajectory and TracIn need; ``S_g`` times smaller);
            default: as the features are.
        dtype: ``"float32"`` (default) or ``"float64"`` (for exact tests).
        split: an optional label (``"train"``, ``"query"``) kept in the metadata.

    Returns:
        the opened :class:`FeatureStore`; ``as_features()`` round-trips
        ``features`` exactly when ``dtype`` matches theirs.
    """
    root = os.fspath(path)
    if os.path.isdir(root) and os.listdir(root):
        raise SDIError(f"write_features: {root!r} exists and is not empty; choose a new directory.")
    dt = _check_dtype(dtype)
    if not isinstance(features, Features):
        raise SDIError(f"write_features: expected sdi_core.Features, got {type(features).__name__}.")
    summed = features.summed if summed is None else bool(summed)
    f = _prepare(features, summed, dt, "write_features")
    check_destination(root)
    with _WriterLock(root, 0, 1, exclusive=True), io_errors(f"Writing feature store {root!r}", root):
        settings = _settings(summed=summed, dtype=dt.name, shard_size=None, split=split, run=None)
        _ensure_meta(root, _meta_for(f, settings))
        _write_shard(root, 0, f, dt, None)
        _create_once(root, os.path.join(root, _COUNT), _json_bytes({"n_shards": 1}))
        _cleanup(root)
    return FeatureStore(root)


def shards_of_rank(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Shard indices written by ``rank`` of ``world_size`` (round robin: ``i % world_size == rank``)."""
    return [i for i in range(n_shards) if i % world_size == rank]


def _check_rank(rank: int, world_size: int) -> None:
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise SDIError(f"{name} must be an int, got {v!r}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise SDIError(f"rank={rank} and world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size.")


def _recorded_inputs(root: str) -> tuple[dict[int, Any], int | None]:
    """Input fingerprints recorded so far (shard -> fingerprint) and the consolidated shard count (else None)."""
    data_commit = os.path.join(root, _DATA_COMMIT)
    if os.path.exists(data_commit):
        marker = _read_json(data_commit, "Consolidation marker")
        shards = marker.get("shards")
        if not isinstance(shards, list):
            return {}, int(marker.get("n_shards", 0)) or None
        return {i: s.get("inputs") if isinstance(s, dict) else None for i, s in enumerate(shards)}, len(shards)
    return {i: m.get("inputs") for i, m in _committed_shards(root).items()}, None


def featurize_to_store(
    path: str | os.PathLike,
    featurize_fn: Callable[[list], Features],
    batches: Iterable,
    *,
    shard_size: int = 1,
    summed: bool = False,
    dtype: str = "float32",
    split: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    consolidate: bool | None = None,
    config: Mapping[str, Any] | None = None,
    fingerprint: Callable[[list], str] | None = batch_fingerprint,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> FeatureStore | None:
    """Featurise ``batches`` into a store, shard by shard; rerunning resumes where a killed run stopped.

    Consecutive groups of ``shard_size`` batches form shards; shard ``i`` is
    ``featurize_fn(batches[i * shard_size : (i + 1) * shard_size])``, written
    and committed atomically.  Shards already committed are skipped without
    calling ``featurize_fn``, so after a crash the same call finishes the
    job, and the final store is bit-identical to an uninterrupted run's.

    A rerun must be the same run: the settings and ``config`` are compared
    with the stored ones and the inputs of every committed shard with its
    recorded fingerprint; any difference is refused, naming every field
    that differs (``overwrite=True`` replaces the store instead).

    Args:
        path: the store directory (created when missing; a non-empty folder
            that is not a store is refused).
        featurize_fn: ``list of batches -> Features`` (any backend; every
            call must return the same layout, checkpoints and steps).
        batches: the input, in a fixed order (a sequence, or an iterable that
            yields the same batches on every run).
        shard_size: batches per shard (commit granularity).
        summed: store features summed over steps (train side of the
            query-step trajectory) instead of per step.
        dtype: ``"float32"`` or ``"float64"``.
        split: optional label kept in the metadata.
        rank, world_size: this process writes the shards ``i`` with
            ``i % world_size == rank``; run every rank to complete the store.
        consolidate: merge the shards into one file per checkpoint and group
            when the store is complete (so ``as_features()`` is one memory
            map).  Default: when ``world_size == 1``; with several ranks call
            :func:`finalize_store` on one rank after all have finished.
        config: what else determines the features (JSON values: backend,
            model, data, batch size, ...), recorded in ``meta["run"]`` and
            compared on every rerun.
        fingerprint: ``list of batches -> str``, recorded per shard and
            checked on resume (default :func:`batch_fingerprint`); None
            records nothing.
        overwrite: replace an existing store (only the files it wrote) and
            featurise from scratch.  One process only.
        verify: check the shards' checksums before consolidation copies them.
        progress: show a progress bar over shards.

    Returns:
        the opened store when it is complete (always for ``world_size == 1``),
        else None (other ranks still have shards to write).
    """
    root = os.fspath(path)
    _check_rank(rank, world_size)
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise SDIError(f"featurize_to_store(shard_size={shard_size!r}): must be a positive int (batches per shard).")
    if not callable(featurize_fn):
        raise SDIError("featurize_to_store: featurize_fn must be callable (list of batches -> Features).")
    if fingerprint is not None and not callable(fingerprint):
        raise SDIError("featurize_to_store: fingerprint must be callable (list of batches -> str) or None.")
    dt = _check_dtype(dtype)
    shard_size = int(shard_size)
    summed = bool(summed)
    if consolidate is None:
        consolidate = world_size == 1
    if consolidate and world_size > 1:
        raise SDIError(
            "featurize_to_store(consolidate=True) with several ranks: consolidate once all ranks have "
            "finished, by calling finalize_store(path) on one rank after a barrier."
        )
    if overwrite and world_size > 1:
        raise SDIError(
            "featurize_to_store(overwrite=True) with several ranks: the ranks would race to remove the store. "
            "Replace it from one process first (e.g. remove the folder), then run every rank."
        )
    settings = _settings(summed=summed, dtype=dt.name, shard_size=shard_size, split=split,
                         run=_json_config(config, "featurize_to_store"))
    check_destination(root)
    with _WriterLock(root, rank, world_size):
        with io_errors(f"Writing feature store {root!r}", root):
            existing = _existing_meta(root)
            if existing is not None or os.path.exists(os.path.join(root, _SHARDS)):
                if overwrite:
                    _remove_store(root)
                    existing = None
                elif existing is not None:
                    diffs = describe_differences(existing, settings, fields=settings)
                    if diffs:
                        raise _refuse_differences(root, diffs, "was written by a different run")
            recorded, consolidated = _recorded_inputs(root)
        n_shards = _featurize_shards(root, featurize_fn, batches, settings, dt, recorded, consolidated,
                                     rank=rank, world_size=world_size, fingerprint=fingerprint,
                                     progress=progress)
        with io_errors(f"Writing feature store {root!r}", root):
            if consolidated is None:
                _record_count(root, n_shards)
            elif n_shards != consolidated:
                raise _count_mismatch(root, n_shards, consolidated)
            if world_size == 1:
                return finalize_store(root, consolidate=consolidate, verify=verify)
            return FeatureStore(root) if _is_complete(root) else None


def _featurize_shards(root, featurize_fn, batches, settings, dt, recorded, consolidated, *, rank, world_size,
                      fingerprint, progress) -> int:
    """The loop of :func:`featurize_to_store`: check committed shards' inputs, write this rank's others."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None
        if hasattr(batches, "__len__"):
            total = len(shards_of_rank(math.ceil(len(batches) / settings["shard_size"]), rank, world_size))
        bar = tqdm(total=total, desc=f"featurize (rank {rank})" if world_size > 1 else "featurize", unit="shard")
    n_shards = 0
    try:
        for index, shard_batches in enumerate(_chunks(batches, settings["shard_size"])):
            n_shards = index + 1
            mine = index % world_size == rank
            if index not in recorded and not mine and consolidated is None:
                continue
            inputs = fingerprint(shard_batches) if fingerprint is not None else None
            if inputs is not None and not isinstance(inputs, str):
                raise SDIError(f"featurize_to_store: fingerprint returned {type(inputs).__name__}, expected a str.")
            if index in recorded:
                if inputs is not None and recorded[index] is not None and inputs != recorded[index]:
                    raise SDIError(
                        f"Feature store {root!r}: shard {index} (batches {index * settings['shard_size']}.."
                        f"{index * settings['shard_size'] + len(shard_batches) - 1}) was featurised from other inputs "
                        "than this run's: the data, its order or the batch boundaries changed since the store was "
                        "written. Run with the original inputs and batch size, write into another folder, or pass "
                        "overwrite=True (sdi featurize --overwrite) to replace the store."
                    )
                if mine and bar is not None:
                    bar.update(1)
                continue
            if consolidated is not None:
                raise _count_mismatch(root, index + 1, consolidated)
            where = f"featurize_to_store, shard {index}"
            f = _prepare(featurize_fn(list(shard_batches)), settings["summed"], dt, where)
            if f.n_examples == 0:
                raise SDIError(f"{where}: featurize_fn returned no rows.")
            with io_errors(f"Writing feature store {root!r}, shard {index}", root):
                _ensure_meta(root, _meta_for(f, settings))
                _write_shard(root, index, f, dt, inputs)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if n_shards == 0:
        raise SDIError("featurize_to_store: batches is empty; nothing to featurise.")
    return n_shards


def _chunks(batches: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for b in batches:
        chunk.append(b)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _count_mismatch(root: str, seen: int, recorded: int) -> SDIError:
    return SDIError(
        f"Feature store {root!r}: this run saw {seen} shards but an earlier run (or another rank) saw {recorded}. "
        "Every run and every rank must iterate the same batches with the same shard_size (or pass overwrite=True "
        "to replace the store)."
    )


def _record_count(root: str, n_shards: int) -> None:
    path = os.path.join(root, _COUNT)
    if _create_once(root, path, _json_bytes({"n_shards": n_shards})):
        return
    existing = _read_count(root)
    if existing != n_shards:
        raise _count_mismatch(root, n_shards, existing)


def _is_complete(root: str) -> bool:
    if os.path.exists(os.path.join(root, _DATA_COMMIT)):
        return True
    n = _read_count(root)
    if n is None:
        return False
    committed = _committed_shards(root)
    return all(i in committed for i in range(n))


def finalize_store(path: str | os.PathLike, *, consolidate: bool = True, verify: bool = True) -> FeatureStore:
    """Check that every shard is committed, optionally consolidate, remove temporaries; return the store.

    Call it once (on one rank) after all ranks finished :func:`featurize_to_store`.
    Consolidation checks every chunk of the shards before copying it (``verify``).
    """
    root = os.fspath(path)
    with _WriterLock(root, 0, 1, exclusive=True):
        store = FeatureStore(root, verify=verify)  # raises, naming the missing shards, when incomplete
        if consolidate:
            store = store.consolidate()
        with io_errors(f"Writing feature store {root!r}", root):
            _cleanup(root)
    return FeatureStore(root, verify=verify)


def combine_checkpoints(path: str | os.PathLike, sources: Sequence[FeatureStore | str | os.PathLike]) -> FeatureStore:
    """Write one store holding the checkpoints of several stores of the same examples.

    For featurising each checkpoint in its own job: every source must hold the
    same rows (same example ids, or the same count when there are none), the
    same sketch, model, step counts, summing and dtype, and checkpoints that
    no other source has.  The result is consolidated; it is written through a
    temporary folder and committed atomically.  Every source chunk is checked
    against its CRC-32 before it is copied.

    Returns:
        the new :class:`FeatureStore`, checkpoints in the order of ``sources``.
    """
    stores = [s if isinstance(s, FeatureStore) else FeatureStore(s) for s in sources]
    if not stores:
        raise SDIError("combine_checkpoints needs at least one source store.")
    first = stores[0]
    seen: dict[str, str] = {}
    for st in stores:
        d = describe_difference(first.meta, st.meta, fields=("format_version", "sketch", "model_fingerprint",
                                                            "layout", "steps", "summed", "dtype", "example_ids"))
        if d is not None:
            raise SDIError(f"Cannot combine {first.path!r} and {st.path!r}: {d}.")
        if st.n_examples != first.n_examples or (
                first.meta.get("example_ids") and not np.array_equal(st.example_ids, first.example_ids)):
            raise SDIError(
                f"Cannot combine {first.path!r} and {st.path!r}: they hold different examples "
                f"({first.n_examples} vs {st.n_examples} rows, or other ids/order). Featurise the same batches."
            )
        for c in st.checkpoints:
            if c.id in seen:
                raise SDIError(f"Checkpoint {c.id!r} is in both {seen[c.id]!r} and {st.path!r}; combine each once.")
            seen[c.id] = st.path
    root = os.fspath(path)
    if os.path.isdir(root) and os.listdir(root):
        raise SDIError(f"combine_checkpoints: {root!r} exists and is not empty; choose a new directory.")
    check_destination(root)
    with _WriterLock(root, 0, 1, exclusive=True), io_errors(f"Writing feature store {root!r}", root):
        meta = dict(first.meta)
        meta["checkpoints"] = [c for st in stores for c in st.meta["checkpoints"]]
        meta["shard_size"] = None
        meta["run"] = None
        meta["format_version"] = FORMAT_VERSION
        with _temporary_dir(root, "data") as tmp:
            files, k_out = {}, 0
            for st in stores:
                for k in range(len(st.checkpoints)):
                    for g in st.layout.groups:
                        srcs = [seg.files[k][g.name] for seg in st.segments]
                        shape = (st.n_examples,) + tuple(srcs[0].array.shape[1:])
                        name = _array_name(k_out, g.name)
                        files[name] = _write_npy(os.path.join(tmp, name), [f.array for f in srcs], st.dtype, shape,
                                                 [f.ensure_rows for f in srcs])
                    k_out += 1
            if first.meta.get("example_ids"):
                ids = first.example_ids.astype(np.int64)
                files[_IDS] = _write_npy(os.path.join(tmp, _IDS), [ids], np.int64, ids.shape)
            _fsync_dir(tmp)
        _ensure_meta(root, meta)
        os.replace(tmp, os.path.join(root, _DATA))
        _fsync_dir(root)
        _atomic_write(root, os.path.join(root, _DATA_COMMIT),
                      _json_bytes({"rows": first.n_examples, "files": files, "n_shards": 1,
                                   "shards": [{"rows": first.n_examples, "inputs": None}]}))
        _cleanup(root)
    return FeatureStore(root)
