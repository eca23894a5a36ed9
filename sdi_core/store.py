"""An on-disk feature store: memory-mapped arrays, JSON metadata, resumable sharded writes.

A store holds the features of one split (e.g. the training set) at one or
more checkpoints.  It is a directory::

    STORE/
      meta.json                 sketch, layout, model fingerprint, steps, checkpoints, dtype, ...
      shards/000000/ckpt0.loop.npy   [n_0, S_g, D_g] per checkpoint k and group g (S_g = 1 when summed)
      shards/000000/example_ids.npy  [n_0] (when the features carry ids)
      shards/000000.json        commit marker of shard 0: rows, file sizes and CRC-32s
      shards.json               number of shards (written once the input is exhausted)
      data/ ... + data.json     the same arrays merged into one shard (after :meth:`FeatureStore.consolidate`)

Writes are crash-safe.  A shard is written into a private temporary folder,
every file is fsynced, the folder is renamed into place (``os.replace``) and
only then is its commit marker written, itself through a temporary file and
``os.replace``.  Readers only ever look at shards whose marker exists, so a
shard that was half written when the process died is never read as data; a
rerun of :func:`featurize_to_store` rewrites it.  No file holds timestamps or
process ids, so a resumed run leaves a store byte-for-byte identical to an
uninterrupted one (given a deterministic ``featurize_fn``).

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
import json
import math
import mmap
import os
import re
import secrets
import shutil
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._array import to_numpy
from .factors import SDIError
from .features import CheckpointInfo, Features, check_compatible
from .specs import FeatureLayout

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureStore",
    "open_store",
    "write_features",
    "featurize_to_store",
    "finalize_store",
    "shards_of_rank",
    "describe_difference",
    "combine_checkpoints",
]

FORMAT = "sdi-feature-store"
FORMAT_VERSION = 1
DTYPES = ("float32", "float64")

_META = "meta.json"
_COUNT = "shards.json"
_SHARDS = "shards"
_DATA = "data"
_DATA_COMMIT = "data.json"
_TMP = ".tmp"
_IDS = "example_ids.npy"
_SHARD_RE = re.compile(r"^(\d{6,})$")
_MARKER_RE = re.compile(r"^(\d{6,})\.json$")
_CHUNK = 1 << 24  # bytes per write when streaming arrays to disk


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


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


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
    except OSError:  # filesystems without hard links: fall back to an exclusive create
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
    """File wrapper that keeps a CRC-32 and a byte count of everything written through it."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.crc = 0
        self.size = 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.crc = zlib.crc32(mv, self.crc)
        self.size += mv.nbytes
        return self.fh.write(mv)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _write_npy(path: str, parts: Sequence[np.ndarray], dtype: np.dtype, shape: tuple[int, ...]) -> dict:
    """Write the row-wise concatenation of ``parts`` as one ``.npy`` file, fsynced; returns size and CRC-32.

    Streams in chunks, so ``parts`` may be memory maps larger than memory.
    """
    dtype = np.dtype(dtype)
    with open(path, "wb") as fh:
        w = _CrcWriter(fh)
        w.write(_npy_header(dtype, shape))
        for part in parts:
            part = np.asarray(part)
            if part.shape[0] == 0:
                continue
            row_bytes = max(1, int(np.prod(part.shape[1:], dtype=np.int64)) * dtype.itemsize)
            rows = max(1, _CHUNK // row_bytes)
            for a in range(0, part.shape[0], rows):
                chunk = np.ascontiguousarray(part[a : a + rows], dtype=dtype)
                w.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return {"bytes": w.size, "crc32": w.crc}


def _file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode())
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise SDIError(f"{what} {path!r} is not valid JSON ({exc}); the store is damaged.") from None


# --------------------------------------------------------------------------- metadata


def _array_name(k: int, group: str) -> str:
    return f"ckpt{k}.{group}.npy"


def _meta_for(features: Features, *, summed: bool, dtype: str, shard_size: int | None, split: str | None) -> dict:
    from . import __version__

    layout = features.layout
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "split": split,
        "sketch": dict(layout.sketch),
        "layout": layout.to_dict(),
        "model_fingerprint": layout.model_fingerprint(),
        "steps": {g.name: int(features.steps[g.name]) for g in layout.groups},
        "summed": bool(summed),
        "dtype": dtype,
        "checkpoints": [{"id": c.id, "eta": float(c.eta), "step": c.step} for c in features.checkpoints],
        "shard_size": shard_size,
        "example_ids": features.example_ids is not None,
    }


# Fields compared between two stores (or a store and features), in the order a mismatch is reported.
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
)


def describe_difference(a: Mapping[str, Any], b: Mapping[str, Any], fields: Iterable[str] | None = None) -> str | None:
    """A sentence naming the first metadata field where ``a`` and ``b`` differ, or None.

    Args:
        a, b: store metadata dicts (``FeatureStore.meta``).
        fields: restrict the comparison to these keys (default: all that matter).
    """
    keep = None if fields is None else set(fields)
    for key, label in _FIELDS:
        if keep is not None and key not in keep:
            continue
        va, vb = a.get(key), b.get(key)
        if key == "layout" and va is not None and vb is not None:
            d = FeatureLayout.from_dict(va).diff(FeatureLayout.from_dict(vb))
            if d is not None:
                return f"feature layout differs: {d}"
            continue
        if key == "checkpoints" and va is not None and vb is not None:
            ids_a, ids_b = [c["id"] for c in va], [c["id"] for c in vb]
            if ids_a != ids_b:
                return f"checkpoints differ: ids {ids_a} vs {ids_b}"
            etas_a, etas_b = [c["eta"] for c in va], [c["eta"] for c in vb]
            if not np.allclose(etas_a, etas_b, rtol=1e-12, atol=0):
                return f"checkpoint etas differ: {etas_a} vs {etas_b}"
            steps_a, steps_b = [c.get("step") for c in va], [c.get("step") for c in vb]
            if steps_a != steps_b:
                return f"checkpoint training steps differ: {steps_a} vs {steps_b}"
            continue
        if va != vb:
            return f"{label} differs: {va!r} vs {vb!r}"
    return None


def _validate_meta(meta: Mapping[str, Any], path: str) -> FeatureLayout:
    where = f"Feature store {path!r}"
    if meta.get("format") != FORMAT:
        raise SDIError(f"{where}: meta.json is not an sdi feature store (format {meta.get('format')!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
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
    except (KeyError, TypeError, ValueError) as exc:
        raise SDIError(f"{where}: the layout in meta.json cannot be read ({exc!r}).") from None
    if dict(layout.sketch) != dict(meta["sketch"]):
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
    if sorted(steps) != sorted(groups) or any(not isinstance(v, int) or v < 1 for v in steps.values()):
        raise SDIError(f"{where}: step counts {steps} do not cover the groups {groups} with positive ints.")
    if not meta["checkpoints"]:
        raise SDIError(f"{where}: no checkpoints recorded.")
    for c in meta["checkpoints"]:
        eta = c.get("eta")
        if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
            raise SDIError(f"{where}: checkpoint {c.get('id')!r} has eta {eta!r}; etas must be positive.")
    return layout


# --------------------------------------------------------------------------- segments


@dataclass
class _Segment:
    """A contiguous run of rows stored in one folder (a shard, or the consolidated data)."""

    start: int
    stop: int
    folder: str
    arrays: list[dict[str, np.ndarray]]  # per checkpoint: group -> memmap [n, S, D]
    ids: np.ndarray | None
    index: int | None  # shard index, None for consolidated data

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _shard_name(index: int) -> str:
    return f"{index:06d}"


def _marker_path(root: str, index: int) -> str:
    return os.path.join(root, _SHARDS, _shard_name(index) + ".json")


def _committed_shards(root: str) -> dict[int, dict]:
    """Commit markers of the shards written so far: index -> marker."""
    folder = os.path.join(root, _SHARDS)
    out = {}
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        m = _MARKER_RE.match(name)
        if m:
            out[int(m.group(1))] = _read_json(os.path.join(folder, name), "Shard commit marker")
    return out


# --------------------------------------------------------------------------- the store


class FeatureStore:
    """A feature store opened for reading (validated on open).

    Args:
        path: the store directory.
        partial: read a store whose featurisation has not finished, using the
            shards committed so far (rows are then numbered over those shards
            only).  By default an incomplete store is an error that says which
            shards are missing.
        verify: also check the CRC-32 of every file against its commit marker
            (reads every byte once; sizes are always checked).

    Attributes:
        meta: the metadata dict (see the module docstring).
        layout: :class:`~sdi_core.specs.FeatureLayout` of the features.
        checkpoints: one :class:`~sdi_core.features.CheckpointInfo` per checkpoint.
        steps: steps per group (before summing).
        summed: whether the step axis was summed out (``S_g == 1`` on disk).
        dtype: NumPy dtype of the arrays on disk.
        n_examples: number of rows ``N``.
    """

    def __init__(self, path: str | os.PathLike, *, partial: bool = False, verify: bool = False) -> None:
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, _META)
        if not os.path.isdir(self.path):
            raise SDIError(f"No feature store at {self.path!r}: the directory does not exist.")
        try:
            self.meta = _read_json(meta_path, "Store metadata")
        except FileNotFoundError:
            raise SDIError(
                f"{self.path!r} has no meta.json: it is not a feature store, or featurisation was killed "
                "before the first shard was committed (run it again; it resumes)."
            ) from None
        self.layout = _validate_meta(self.meta, self.path)
        self.checkpoints = tuple(
            CheckpointInfo(c["id"], float(c["eta"]), c.get("step")) for c in self.meta["checkpoints"]
        )
        self.steps = dict(self.meta["steps"])
        self.summed = bool(self.meta["summed"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.segments = self._load_segments(partial, verify)
        self.n_examples = self.segments[-1].stop if self.segments else 0

    # ------------------------------------------------------------------ opening
    def _load_segments(self, partial: bool, verify: bool) -> list[_Segment]:
        data_commit = os.path.join(self.path, _DATA_COMMIT)
        if os.path.exists(data_commit):
            marker = _read_json(data_commit, "Consolidation marker")
            return [self._open_folder(os.path.join(self.path, _DATA), marker, 0, None, verify)]
        markers = _committed_shards(self.path)
        count_path = os.path.join(self.path, _COUNT)
        n_shards = _read_json(count_path, "Shard count")["n_shards"] if os.path.exists(count_path) else None
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
            seg = self._open_folder(os.path.join(self.path, _SHARDS, _shard_name(i)), markers[i], start, i, verify)
            segments.append(seg)
            start = seg.stop
        if not segments and not partial:
            raise SDIError(f"Feature store {self.path!r} holds no shards.")
        return segments

    def _open_folder(self, folder: str, marker: Mapping, start: int, index: int | None, verify: bool) -> _Segment:
        n = int(marker["rows"])
        files = marker["files"]
        what = f"shard {index}" if index is not None else "consolidated data"
        arrays = []
        for k in range(len(self.checkpoints)):
            block = {}
            for g in self.layout.groups:
                name = _array_name(k, g.name)
                arr = self._open_array(folder, name, files, what, verify)
                want = (n, 1 if self.summed else self.steps[g.name], g.width)
                if arr.shape != want or arr.dtype != self.dtype:
                    raise SDIError(
                        f"Feature store {self.path!r}, {what}: {name} has shape {arr.shape} and dtype {arr.dtype}, "
                        f"expected {want} {self.dtype}; the store is damaged."
                    )
                block[g.name] = arr
            arrays.append(block)
        ids = None
        if self.meta.get("example_ids"):
            ids = np.asarray(self._open_array(folder, _IDS, files, what, verify))
            if ids.shape != (n,):
                raise SDIError(f"Feature store {self.path!r}, {what}: example ids have shape {ids.shape}, expected ({n},).")
        return _Segment(start, start + n, folder, arrays, ids, index)

    def _open_array(self, folder: str, name: str, files: Mapping, what: str, verify: bool) -> np.ndarray:
        path = os.path.join(folder, name)
        rec = files.get(name)
        if rec is None:
            raise SDIError(f"Feature store {self.path!r}, {what}: its commit marker does not list {name}.")
        try:
            size = os.path.getsize(path)
        except OSError:
            raise SDIError(f"Feature store {self.path!r}, {what}: {name} is missing; the store is damaged.") from None
        if size != rec["bytes"]:
            raise SDIError(
                f"Feature store {self.path!r}, {what}: {name} has {size} bytes but {rec['bytes']} were committed; "
                "the store is damaged."
            )
        if verify and _file_crc(path) != rec["crc32"]:
            raise SDIError(f"Feature store {self.path!r}, {what}: {name} fails its CRC-32 check; the store is damaged.")
        return np.load(path, mmap_mode="r")

    # ------------------------------------------------------------------ views
    @property
    def n_slots(self) -> int:
        return sum(self.steps[g.name] for g in self.layout.groups)

    @property
    def nbytes(self) -> int:
        """Bytes of feature data on disk (all checkpoints and groups)."""
        per_row = sum((1 if self.summed else self.steps[g.name]) * g.width for g in self.layout.groups)
        return self.n_examples * per_row * len(self.checkpoints) * self.dtype.itemsize

    @property
    def example_ids(self) -> np.ndarray | None:
        """Ids of all rows ``[N]`` (None when the features carried none)."""
        if not self.meta.get("example_ids"):
            return None
        if not self.segments:
            return np.zeros((0,), dtype=np.int64)
        return np.concatenate([np.asarray(s.ids) for s in self.segments])

    def __len__(self) -> int:
        return self.n_examples

    def as_features(self, *, in_memory: bool = False) -> Features:
        """The stored features as :class:`~sdi_core.features.Features` (NumPy arrays).

        A store with one shard (or a consolidated one) gives read-only memory
        maps, so ``sdi_core.influence`` can run on a store larger than memory.
        A store of several shards must be consolidated first
        (:meth:`consolidate`), or read into memory with ``in_memory=True``.
        """
        if not self.segments:
            raise SDIError(f"Feature store {self.path!r} holds no rows yet.")
        if len(self.segments) == 1 and not in_memory:
            seg = self.segments[0]
            data = [dict(block) for block in seg.arrays]
            ids = seg.ids
        elif in_memory:
            data = [
                {g.name: np.concatenate([np.asarray(s.arrays[k][g.name]) for s in self.segments]) for g in self.layout.groups}
                for k in range(len(self.checkpoints))
            ]
            ids = self.example_ids
        else:
            raise SDIError(
                f"Feature store {self.path!r} has {len(self.segments)} shards, which cannot be one memory map. "
                "Call store.consolidate() once (it merges them on disk), pass in_memory=True to load them, "
                "or score it with sdi_core.scoring.score_store, which streams shard by shard."
            )
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
        self, block_rows: int, start: int = 0, stop: int | None = None, *, release: bool = True
    ) -> Iterator[tuple[int, int, list[dict[str, np.ndarray]]]]:
        """Yield ``(row_start, row_stop, [ {group: [n, S, D]} per checkpoint ])`` over rows ``[start, stop)``.

        Blocks are ``block_rows`` rows from ``start`` on (the last may be
        shorter), whatever the shard sizes, so that a block's boundaries do
        not depend on how the store was written.  A block within one shard is
        a read-only view of its memory maps (no copy); a block across shards
        is gathered into one array (a copy).

        With ``release`` (default), once the consumer asks for the next block
        the pages of the previous one are unmapped from this process
        (``madvise(MADV_DONTNEED)``; they stay in the page cache), so reading
        a store larger than memory does not grow the resident set.  Do not
        keep views of a block after requesting the next one.
        """
        stop = self.n_examples if stop is None else min(stop, self.n_examples)
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows <= 0:
            raise SDIError(f"iter_blocks(block_rows={block_rows!r}): must be a positive int.")
        groups = [g.name for g in self.layout.groups]
        stops = [seg.stop for seg in self.segments]
        for lo in range(start, stop, int(block_rows)):
            hi = min(stop, lo + int(block_rows))
            pieces = []
            for seg in self.segments[bisect.bisect_right(stops, lo):]:
                if seg.start >= hi:
                    break
                pieces.append((seg, max(lo, seg.start) - seg.start, min(hi, seg.stop) - seg.start))
            views = [[{g: blk[g][a:b] for g in groups} for blk in seg.arrays] for seg, a, b in pieces]
            if len(views) == 1:
                yield lo, hi, views[0]
            else:
                yield lo, hi, [{g: np.concatenate([v[k][g] for v in views]) for g in groups}
                               for k in range(len(self.checkpoints))]
            if release:
                for seg, a, b in pieces:
                    for blk in seg.arrays:
                        for g in groups:
                            _release_rows(blk[g], a, b)

    # ------------------------------------------------------------------ checks
    def check_compatible(self, other, what: str | None = None) -> dict:
        """:func:`sdi_core.features.check_compatible` of this store and ``other`` (a store or ``Features``).

        Compares the sketch, the parameters (by name and shape, any order)
        and the checkpoints (ids, etas, steps); loop counts and dtypes may
        differ.  Returns the column order of ``other`` per group.
        """
        return check_compatible(self, other, what or "these feature sets")

    def verify(self) -> None:
        """Check the size and CRC-32 of every committed file against its marker; raise on damage."""
        self._load_segments(partial=True, verify=True)

    # ------------------------------------------------------------------ consolidation
    def consolidate(self, *, remove_shards: bool = True) -> "FeatureStore":
        """Merge the shards into one file per checkpoint and group (atomically); returns the reopened store.

        Streams shard by shard, so it needs no memory beyond a chunk.  The
        shards are removed afterwards unless ``remove_shards=False``.
        """
        if os.path.exists(os.path.join(self.path, _DATA_COMMIT)):
            return self
        full = FeatureStore(self.path)  # refuses an incomplete store, with the reason
        root = full.path
        tmp = _tmp_name(root, "data")
        os.makedirs(tmp)
        files = {}
        for k in range(len(full.checkpoints)):
            for g in full.layout.groups:
                name = _array_name(k, g.name)
                parts = [s.arrays[k][g.name] for s in full.segments]
                shape = (full.n_examples,) + tuple(parts[0].shape[1:])
                files[name] = _write_npy(os.path.join(tmp, name), parts, full.dtype, shape)
        if full.meta.get("example_ids"):
            ids = [s.ids for s in full.segments]
            files[_IDS] = _write_npy(os.path.join(tmp, _IDS), ids, ids[0].dtype, (full.n_examples,))
        _fsync_dir(tmp)
        dest = os.path.join(root, _DATA)
        if os.path.exists(dest):
            shutil.rmtree(dest)  # left by a consolidation that died before its commit
        os.replace(tmp, dest)
        _fsync_dir(root)
        marker = {"rows": full.n_examples, "files": files, "n_shards": len(full.segments)}
        _atomic_write(root, os.path.join(root, _DATA_COMMIT), _json_bytes(marker))
        if remove_shards:
            _cleanup(root)
        return FeatureStore(root)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.name}: {self.steps[g.name]} steps x {g.width}" for g in self.layout.groups)
        return (
            f"FeatureStore({self.path!r}, N={self.n_examples}, checkpoints={len(self.checkpoints)}, {groups}, "
            f"sketch={dict(self.layout.sketch)}, {self.dtype}{', summed' if self.summed else ''}, "
            f"{len(self.segments)} segment(s))"
        )


def _release_rows(arr: np.ndarray, row_start: int, row_stop: int) -> None:
    """Unmap the whole pages holding rows ``[row_start, row_stop)`` of a memory map (no-op elsewhere).

    The pages stay in the page cache and fault back in when read again; the
    point is that a streamed pass over a large store does not keep every page
    it touched in this process's resident set.
    """
    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    # np.memmap maps from an allocation-granularity boundary at or before its offset.
    base = int(arr.offset) % mmap.ALLOCATIONGRANULARITY
    page = mmap.PAGESIZE
    lo = base + row_start * row_bytes
    hi = base + row_stop * row_bytes
    lo = -(-lo // page) * page
    hi = (hi // page) * page
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass


def open_store(path: str | os.PathLike, *, partial: bool = False, verify: bool = False) -> FeatureStore:
    """Open and validate a feature store (see :class:`FeatureStore`)."""
    return FeatureStore(path, partial=partial, verify=verify)


def _cleanup(root: str) -> None:
    """Remove what a finished store no longer needs: temporaries, and shards once consolidated."""
    if os.path.exists(os.path.join(root, _DATA_COMMIT)):
        shards = os.path.join(root, _SHARDS)
        if os.path.exists(shards):
            shutil.rmtree(shards)
        count = os.path.join(root, _COUNT)
        if os.path.exists(count):
            os.unlink(count)
    tmp = os.path.join(root, _TMP)
    if os.path.exists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(root)


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
    return Features(data, f.layout, f.checkpoints, dict(f.steps), ids, f.summed, dict(f.meta))


def _write_shard(root: str, index: int, features: Features, dtype: np.dtype) -> dict:
    """Write one shard and commit it (see the module docstring for the protocol)."""
    tmp = _tmp_name(root, f"shard-{_shard_name(index)}")
    os.makedirs(tmp)
    files = {}
    n = features.n_examples
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
    dest = os.path.join(shards, _shard_name(index))
    if os.path.exists(dest):
        shutil.rmtree(dest)  # renamed into place by a run that died before committing it
    os.replace(tmp, dest)
    _fsync_dir(shards)
    marker = {"shard": index, "rows": n, "files": files}
    _atomic_write(root, _marker_path(root, index), _json_bytes(marker))
    return marker


def _ensure_meta(root: str, meta: dict) -> None:
    """Create ``meta.json`` or check that the existing one describes the same features."""
    path = os.path.join(root, _META)
    if _create_once(root, path, _json_bytes(meta)):
        return
    existing = _read_json(path, "Store metadata")
    d = describe_difference(existing, meta)
    if d is not None:
        raise SDIError(
            f"Feature store {root!r} already holds different features: {d} (existing vs new). "
            "Write into a fresh directory, or rerun with the arguments of the original run."
        )


def _check_run_args(root: str, *, summed: bool, dtype: str, shard_size: int | None, split: str | None) -> None:
    path = os.path.join(root, _META)
    if not os.path.exists(path):
        return
    existing = _read_json(path, "Store metadata")
    _validate_meta(existing, root)
    wanted = {"summed": summed, "dtype": dtype, "shard_size": shard_size, "split": split}
    d = describe_difference(existing, wanted, fields=wanted)
    if d is not None:
        raise SDIError(
            f"Feature store {root!r} was started with other settings: {d} (existing vs this run). "
            "Resume with the original settings, or write into a fresh directory."
        )


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
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
    if os.path.exists(root) and os.listdir(root):
        raise SDIError(f"write_features: {root!r} exists and is not empty; choose a new directory.")
    dt = _check_dtype(dtype)
    if not isinstance(features, Features):
        raise SDIError(f"write_features: expected sdi_core.Features, got {type(features).__name__}.")
    summed = features.summed if summed is None else bool(summed)
    f = _prepare(features, summed, dt, "write_features")
    os.makedirs(os.path.join(root, _SHARDS), exist_ok=True)
    _ensure_meta(root, _meta_for(f, summed=summed, dtype=dt.name, shard_size=None, split=split))
    _write_shard(root, 0, f, dt)
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
    progress: bool = False,
) -> FeatureStore | None:
    """Featurise ``batches`` into a store, shard by shard; rerunning resumes where a killed run stopped.

    Consecutive groups of ``shard_size`` batches form shards; shard ``i`` is
    ``featurize_fn(batches[i * shard_size : (i + 1) * shard_size])``, written
    and committed atomically.  Shards already committed are skipped without
    calling ``featurize_fn``, so after a crash the same call finishes the
    job, and the final store is bit-identical to an uninterrupted run's.

    Args:
        path: the store directory (created when missing).
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
    os.makedirs(os.path.join(root, _SHARDS), exist_ok=True)
    _check_run_args(root, summed=summed, dtype=dt.name, shard_size=shard_size, split=split)
    if os.path.exists(os.path.join(root, _DATA_COMMIT)):
        _cleanup(root)
        return FeatureStore(root)
    committed = _committed_shards(root)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None
        if hasattr(batches, "__len__"):
            total = len(shards_of_rank(math.ceil(len(batches) / shard_size), rank, world_size))
        bar = tqdm(total=total, desc=f"featurize (rank {rank})" if world_size > 1 else "featurize", unit="shard")
    n_shards = 0
    try:
        for index, shard_batches in enumerate(_chunks(batches, shard_size)):
            n_shards = index + 1
            if index % world_size != rank:
                continue
            if index in committed:
                if bar is not None:
                    bar.update(1)
                continue
            where = f"featurize_to_store, shard {index}"
            f = _prepare(featurize_fn(list(shard_batches)), summed, dt, where)
            if f.n_examples == 0:
                raise SDIError(f"{where}: featurize_fn returned no rows.")
            _ensure_meta(root, _meta_for(f, summed=summed, dtype=dt.name, shard_size=shard_size, split=split))
            _write_shard(root, index, f, dt)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if n_shards == 0:
        raise SDIError("featurize_to_store: batches is empty; nothing to featurise.")
    _record_count(root, n_shards)
    if world_size == 1:
        return finalize_store(root, consolidate=consolidate)
    return FeatureStore(root) if _is_complete(root) else None


def _chunks(batches: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for b in batches:
        chunk.append(b)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _record_count(root: str, n_shards: int) -> None:
    path = os.path.join(root, _COUNT)
    if _create_once(root, path, _json_bytes({"n_shards": n_shards})):
        return
    existing = _read_json(path, "Shard count")["n_shards"]
    if existing != n_shards:
        raise SDIError(
            f"Feature store {root!r}: this run saw {n_shards} shards but an earlier run (or another rank) saw "
            f"{existing}. Every run and every rank must iterate the same batches with the same shard_size."
        )


def _is_complete(root: str) -> bool:
    if os.path.exists(os.path.join(root, _DATA_COMMIT)):
        return True
    count = os.path.join(root, _COUNT)
    if not os.path.exists(count):
        return False
    n = _read_json(count, "Shard count")["n_shards"]
    committed = _committed_shards(root)
    return all(i in committed for i in range(n))


def finalize_store(path: str | os.PathLike, *, consolidate: bool = True) -> FeatureStore:
    """Check that every shard is committed, optionally consolidate, remove temporaries; return the store.

    Call it once (on one rank) after all ranks finished :func:`featurize_to_store`.
    """
    root = os.fspath(path)
    store = FeatureStore(root)  # raises, naming the missing shards, when incomplete
    if consolidate:
        store = store.consolidate()
    _cleanup(root)
    return FeatureStore(root)


def combine_checkpoints(path: str | os.PathLike, sources: Sequence[FeatureStore | str | os.PathLike]) -> FeatureStore:
    """Write one store holding the checkpoints of several stores of the same examples.

    For featurising each checkpoint in its own job: every source must hold the
    same rows (same example ids, or the same count when there are none), the
    same sketch, model, step counts, summing and dtype, and checkpoints that
    no other source has.  The result is consolidated; it is written through a
    temporary folder and committed atomically.

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
    if os.path.exists(root) and os.listdir(root):
        raise SDIError(f"combine_checkpoints: {root!r} exists and is not empty; choose a new directory.")
    os.makedirs(root, exist_ok=True)
    meta = dict(first.meta)
    meta["checkpoints"] = [c for st in stores for c in st.meta["checkpoints"]]
    meta["shard_size"] = None
    tmp = _tmp_name(root, "data")
    os.makedirs(tmp)
    files, k_out = {}, 0
    for st in stores:
        for k in range(len(st.checkpoints)):
            for g in st.layout.groups:
                parts = [seg.arrays[k][g.name] for seg in st.segments]
                shape = (st.n_examples,) + tuple(parts[0].shape[1:])
                name = _array_name(k_out, g.name)
                files[name] = _write_npy(os.path.join(tmp, name), parts, st.dtype, shape)
            k_out += 1
    if first.meta.get("example_ids"):
        ids = first.example_ids.astype(np.int64)
        files[_IDS] = _write_npy(os.path.join(tmp, _IDS), [ids], np.int64, ids.shape)
    _fsync_dir(tmp)
    _ensure_meta(root, meta)
    os.replace(tmp, os.path.join(root, _DATA))
    _fsync_dir(root)
    _atomic_write(root, os.path.join(root, _DATA_COMMIT),
                  _json_bytes({"rows": first.n_examples, "files": files, "n_shards": 1}))
    _cleanup(root)
    return FeatureStore(root)
