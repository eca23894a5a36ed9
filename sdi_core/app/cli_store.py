"""``sdi featurize`` and ``sdi score``: featurise a split once into a store, score many query sets against it.

::

    sdi featurize --demo train --out train.store --summed          # built-in tiny model and data
    sdi featurize --demo query --out query.store
    sdi score train.store query.store --k 5 --out scores.npz

    sdi featurize --model model.json --checkpoint ckpt.npz --data train.npz --out train.store \\
        --sketch-dim 4096 --groups loop --summed --shard-size 16
    torchrun --nproc-per-node 2 -m sdi_core.app.cli featurize ...   # ranks write alternate shards, rank 0 finalises
    torchrun --nproc-per-node 2 -m sdi_core.app.cli score ...       # ranks score their share of the rows, merged

Backends: ``numpy`` (the float64 NumPy reference looped transformer of
:mod:`sdi_core.reference.looped_transformer`) and ``torch`` (the same model
as ``sdi_torch.models.LoopedGPT``, featurised by ``sdi_torch.Attributor``).
Both read the same files: ``--model`` a JSON of :class:`LoopedConfig`
fields, ``--checkpoint`` an ``.npz`` of canonical weights (name -> array,
e.g. from ``init_weights``), ``--data`` an ``.npz`` with ``tokens`` and
``targets`` (int ``[N, T]``, ``-100`` ignored) and optional ``n_steps``
``[N]`` and ``ids`` ``[N]``.

Backends are found by name in the ``sdi.backends`` registry
(:mod:`sdi_core.app.backends`); nothing here imports a framework unless a
framework's backend is chosen, or the command runs under ``torchrun``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from ..driver import BatchFeatures, featurize as run_driver
from ..factors import SDIError
from ..features import Checkpoint, CheckpointInfo, Features
from ..specs import Exact, SketchPlan, TensorSketch
from ..weights import checkpoint_id

GROUPS = ("prelude", "loop", "coda")
DEMO_SPLITS = {"train": (256, 1), "query": (16, 2)}  # examples, data seed


# --------------------------------------------------------------------------- inputs


def demo_model():
    """The built-in tiny looped transformer of ``--demo``: ``(config, weights)``."""
    from ..reference.looped_transformer import LoopedConfig, init_weights

    config = LoopedConfig(vocab_size=12, d_model=16, n_heads=2, tau=3, max_len=10)
    return config, init_weights(config, seed=0)


def demo_data(split: str, config) -> dict[str, np.ndarray]:
    """Random token rows for ``--demo``: next-token targets on the second half of each row."""
    n, seed = DEMO_SPLITS[split]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(n, config.max_len), dtype=np.int64)
    targets = np.full_like(tokens, -100)
    half = config.max_len // 2
    targets[:, half:-1] = tokens[:, half + 1 :]
    return {"tokens": tokens, "targets": targets, "ids": np.arange(n, dtype=np.int64)}


def load_config(path: str):
    from ..reference.looped_transformer import LoopedConfig

    try:
        with open(path) as fh:
            fields = json.load(fh)
    except FileNotFoundError:
        raise SDIError(f"--model {path!r}: no such file.") from None
    except ValueError as exc:
        raise SDIError(f"--model {path!r} is not valid JSON ({exc}).") from None
    try:
        return LoopedConfig(**fields)
    except TypeError as exc:
        raise SDIError(f"--model {path!r}: {exc}; the keys are the fields of LoopedConfig.") from None


def _load_npz(path: str, option: str, what: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive (never unpickled), or an SDIError naming the option and the fix."""
    from .._io import io_errors

    if os.path.isdir(path):
        raise SDIError(f"{option} {path!r} is a folder; give the .npz file of {what}.")
    if not os.path.exists(path):
        raise SDIError(f"{option} {path!r}: no such file.")
    try:
        with io_errors(f"{option} {path!r}: cannot read it", path):
            z = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise SDIError(f"{option} {path!r} is not an .npz of {what} ({exc}); write it with numpy.savez.") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise SDIError(
            f"{option} {path!r} holds a single array (an .npy), not an .npz archive of {what}; write the named "
            "arrays with numpy.savez(path, name=array, ...)."
        )
    try:
        with z, io_errors(f"{option} {path!r}: cannot read it", path):
            return {k: np.asarray(z[k]) for k in z.files}
    except (ValueError, EOFError, KeyError) as exc:
        raise SDIError(f"{option} {path!r} is a damaged .npz ({exc}); write it again with numpy.savez.") from None


def load_weights(path: str) -> dict[str, np.ndarray]:
    return _load_npz(path, "--checkpoint", "weights (name -> array)")


def load_data(path: str) -> dict[str, np.ndarray]:
    data = _load_npz(path, "--data", "tokens and targets")
    for key in ("tokens", "targets"):
        if key not in data:
            raise SDIError(f"--data {path!r} has no {key!r} array (it has {sorted(data)}).")
    n = data["tokens"].shape[0]
    if n == 0:
        raise SDIError(f"--data {path!r} holds no rows; nothing to featurise.")
    for key, a in data.items():
        if a.shape[:1] != (n,):
            raise SDIError(f"--data {path!r}: {key!r} has {a.shape[0] if a.ndim else 0} rows, tokens has {n}.")
    return data


def batch_ranges(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` batches of ``batch_size`` consecutive rows."""
    return [(a, min(n, a + batch_size)) for a in range(0, n, batch_size)]


def rows(data: dict, start: int, stop: int) -> dict:
    """The batch of rows ``[start, stop)`` of ``data`` (tokens, targets and n_steps when present)."""
    return {k: data[k][start:stop] for k in ("tokens", "targets", "n_steps") if k in data}


def example_ids(data: dict, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Example ids of the rows in ``ranges``: ``data["ids"]`` when given, else the row positions."""
    idx = np.concatenate([np.arange(a, b) for a, b in ranges])
    return np.asarray(data["ids"])[idx] if "ids" in data else idx


# --------------------------------------------------------------------------- featurisers


class _ReferenceSession:
    """The driver's session for the NumPy reference model: batches are row ranges of the data."""

    def __init__(self, config, plan: SketchPlan, data, steps, tau, names):
        from ..engine import SketchEngine

        self.config, self.plan, self.data, self.steps, self.tau, self.names = config, plan, data, steps, tau, names
        self.engine = SketchEngine(plan)
        self.weights = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.weights = None

    def load(self, ckpt: Checkpoint) -> CheckpointInfo:
        self.weights = ckpt.source
        return CheckpointInfo(ckpt.name, ckpt.eta, ckpt.step)

    def run(self, span: tuple[int, int], *, summed: bool) -> BatchFeatures:
        from ..reference.looped_transformer import loss_and_factors

        start, stop = span
        _, uses = loss_and_factors(self.weights, self.config, rows(self.data, start, stop), tau=self.tau,
                                   select=self.names)
        state = self.engine.update(self.engine.init(stop - start, self.steps, summed=summed), uses)
        return BatchFeatures(self.engine.finalize(state), dict(self.steps), self.plan.layout)

    def meta(self) -> dict:
        return {"backend": "numpy-reference", "routes": self.engine.routes()}


def as_checkpoints(checkpoints: Sequence[tuple[Any, CheckpointInfo]], convert=lambda w: w) -> list[Checkpoint]:
    """``(weights, CheckpointInfo)`` pairs as :class:`Checkpoint` objects (weights passed through ``convert``)."""
    return [Checkpoint(convert(w), eta=info.eta, name=info.id, step=info.step) for w, info in checkpoints]


def numpy_reference_featurizer(
    config,
    checkpoints: Sequence[tuple[dict[str, np.ndarray], CheckpointInfo]],
    sketch,
    data: dict[str, np.ndarray],
    *,
    groups: Sequence[str] = ("loop",),
    tau: int | None = None,
    summed: bool = False,
) -> Callable[[list[tuple[int, int]]], Features]:
    """``featurize_fn`` for :func:`~sdi_core.store.featurize_to_store` on the NumPy reference model.

    The returned function maps a list of row ranges ``(start, stop)`` of
    ``data`` to their float64 :class:`Features` at every checkpoint (summed
    over steps with ``summed=True``).
    """
    from ..reference.looped_transformer import group_steps, param_infos

    infos = param_infos(config, groups)
    plan = SketchPlan(sketch, infos)
    all_steps = group_steps(config, tau)
    session = _ReferenceSession(config, plan, data, {g: all_steps[g] for g in plan.group_names}, tau,
                                [p.name for p in infos])
    ckpts = as_checkpoints(checkpoints)

    def featurize(ranges: list[tuple[int, int]]) -> Features:
        return run_driver(session, ranges, ckpts, example_ids=example_ids(data, ranges), summed=summed, progress=False)

    return featurize


# --------------------------------------------------------------------------- featurize


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        raise SDIError(f"Environment variable {name}={v!r} is not an int.") from None


def _parse_groups(text: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if not groups or bad:
        raise SDIError(f"--groups {text!r}: choose a comma-separated subset of {', '.join(GROUPS)}.")
    return groups


def _run_config(args, config, checkpoints, sketch, groups, data) -> dict:
    """What determines a store's contents besides the store settings: compared on every rerun and resume."""
    import dataclasses

    return {
        "backend": args.backend,
        "torch_dtype": args.torch_dtype if args.backend == "torch" else None,
        "device": args.device.split(":")[0] if args.backend == "torch" else None,
        "model": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "checkpoints": [{"id": info.id, "eta": info.eta} for _, info in checkpoints],
        "sketch": {"kind": type(sketch).__name__, **{k: getattr(sketch, k) for k in ("dim", "seed") if hasattr(sketch, k)}},
        "groups": list(groups),
        "tau": args.tau,
        "data": {"rows": int(data["tokens"].shape[0]), "fingerprint": _data_fingerprint(data)},
        "batch_size": args.batch_size,
    }


def _data_fingerprint(data: dict) -> str:
    from ..store import batch_fingerprint

    return batch_fingerprint([data])


def _rows_fingerprint(data: dict) -> Callable[[list[tuple[int, int]]], str]:
    """Input fingerprint of a shard: its row ranges and the rows of every data array in them."""
    from ..store import batch_fingerprint

    def fingerprint(ranges: list[tuple[int, int]]) -> str:
        return batch_fingerprint([{"rows": [a, b], **{k: v[a:b] for k, v in data.items()}} for a, b in ranges])

    return fingerprint


def run_featurize(args: argparse.Namespace) -> int:
    from ..store import check_destination, featurize_to_store

    from .backends import get_backend

    check_destination(args.out, "--out", create=False)  # before anything is loaded or computed; creates nothing
    backend = get_backend(args.backend)
    if backend.store_featurizer is None:
        raise SDIError(f"backend {backend.name!r} has no store featurizer for `sdi featurize`; use --backend numpy "
                       "or torch (or featurise with its Attributor and sdi_core.store.featurize_to_store).")
    if backend.check_device is not None:
        backend.check_device(args.device)
    if args.demo is not None:
        if args.model or args.checkpoint or args.data:
            raise SDIError("--demo uses a built-in model and data; drop --model, --checkpoint and --data.")
        config, weights = demo_model()
        weights_list = [weights]
        data = demo_data(args.demo, config)
        split = args.split or args.demo
    else:
        missing = [o for o, v in (("--model", args.model), ("--checkpoint", args.checkpoint), ("--data", args.data)) if not v]
        if missing:
            raise SDIError(f"sdi featurize needs {', '.join(missing)} (or --demo train|query for the built-in example).")
        config = load_config(args.model)
        weights_list = [load_weights(p) for p in args.checkpoint]
        data = load_data(args.data)
        split = args.split
    etas = args.eta or [1.0] * len(weights_list)
    if len(etas) != len(weights_list):
        raise SDIError(f"Got {len(etas)} --eta values for {len(weights_list)} --checkpoint files; give one per checkpoint or none.")
    if any(not np.isfinite(e) or e <= 0 for e in etas):
        raise SDIError(f"--eta values must be positive, got {etas}.")
    checkpoints = [(w, CheckpointInfo(checkpoint_id(w), float(e), None)) for w, e in zip(weights_list, etas)]
    if args.sketch_dim == 0:
        sketch = Exact()
    elif args.sketch_dim < 0:
        raise SDIError(f"--sketch-dim {args.sketch_dim}: use a positive dimension, or 0 for exact features.")
    else:
        # Routes by the cost model, not timed: every rank and every resumed run must make the same choice, or
        # the store would not be bit-identical to an uninterrupted single-process one.
        sketch = TensorSketch(dim=args.sketch_dim, seed=args.seed, time_routes=False)
    groups = _parse_groups(args.groups)
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise SDIError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}.")
    rank = _env_int("RANK", 0) if args.rank is None else args.rank
    world = _env_int("WORLD_SIZE", 1) if args.world_size is None else args.world_size
    kw = dict(groups=groups, tau=args.tau, summed=args.summed)
    fn = backend.store_featurizer(config, checkpoints, sketch, data, device=args.device, dtype=args.torch_dtype, **kw)
    batches = batch_ranges(int(data["tokens"].shape[0]), args.batch_size)
    common = dict(shard_size=args.shard_size, summed=args.summed, dtype=args.dtype, split=split, progress=args.progress,
                  config=_run_config(args, config, checkpoints, sketch, groups, data),
                  fingerprint=_rows_fingerprint(data), verify=not args.no_verify)
    if args.overwrite and (world > 1 or _under_torchrun(args)):
        raise SDIError("--overwrite replaces the store from one process; run it without torchrun or --world-size, "
                       "then featurise with every rank.")
    if _under_torchrun(args):
        # torchrun: every rank writes its shards, ranks meet on torch.distributed, rank 0 finalises.
        sd = _launcher_distributed()
        with sd.process_group() as (rank, _):
            store = sd.featurize_to_store(args.out, fn, batches, consolidate=not args.no_consolidate, **common)
        if rank == 0:
            print(store)
        return 0
    store = featurize_to_store(args.out, fn, batches, rank=rank, world_size=world, overwrite=args.overwrite,
                               consolidate=(world == 1 and not args.no_consolidate), **common)
    if store is None:
        print(f"rank {rank}/{world}: shards written to {args.out}; the store is complete once every rank has "
              "finished (sdi score reads it as it is; sdi_core.store.finalize_store consolidates it).")
    else:
        print(store)
    return 0


def _under_torchrun(args: argparse.Namespace) -> bool:
    """Launched by ``torchrun`` with several processes and ranks not given by hand.

    Decided from the environment alone (``torchrun`` sets
    ``TORCHELASTIC_RUN_ID`` besides ``WORLD_SIZE``), never by importing
    torch: a plain ``WORLD_SIZE``/``RANK`` from another launcher gives
    file-based ranks (each writes or scores its share, no collectives).
    """
    if args.rank is not None or args.world_size is not None or _env_int("WORLD_SIZE", 1) <= 1:
        return False
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def _launcher_distributed():
    """The collectives of the launcher's framework (torchrun: the torch backend's ``distributed``)."""
    from .backends import get_backend

    dist = get_backend("torch").distributed
    if dist is None:
        raise SDIError("running under torchrun, but the installed torch backend offers no distributed glue; "
                       "reinstall sdi with the torch extra.")
    return dist()


# --------------------------------------------------------------------------- score


def run_score(args: argparse.Namespace) -> int:
    from .._io import check_writable_file, io_errors
    from ..scoring import DENSE_KINDS, parse_bytes, score_store, self_influence_store
    from ..store import FeatureStore

    budget = parse_bytes(args.budget)
    if args.out:
        check_writable_file(args.out, "--out")  # before any scoring
    verify = not args.no_verify
    train = FeatureStore(args.train, verify=verify)
    rank = _env_int("RANK", 0) if args.rank is None else args.rank
    world = _env_int("WORLD_SIZE", 1) if args.world_size is None else args.world_size
    if args.self_influence:
        if args.query is not None:
            raise SDIError("--self-influence scores the train store against itself; drop the QUERY store argument.")
        res = self_influence_store(train, budget=budget, normalize=args.normalize, rank=rank, world_size=world,
                                   progress=args.progress)
        if args.out:
            arrays = {"tracin": res.tracin, "slot_labels": np.asarray(res.slot_labels)}
            if res.per_slot is not None:
                arrays["per_slot"] = res.per_slot
            with io_errors(f"sdi score: writing --out {args.out!r}", args.out):
                np.savez(_npz_path(args.out), **arrays)
        order = np.argsort(-res.tracin, kind="stable")[: args.k]
        ids = train.example_ids
        print(f"highest self-influence (TracIn) of {train.n_examples} train examples:")
        for i in order:
            print(f"  {int(ids[i]) if ids is not None else int(i)}: {res.tracin[i]:+.6g}")
        return 0
    if args.query is None:
        raise SDIError("sdi score needs a QUERY store (or --self-influence).")
    dense = tuple(d.strip() for d in args.dense.split(",") if d.strip()) if args.dense else ()
    bad = [d for d in dense if d not in DENSE_KINDS]
    if bad:
        raise SDIError(f"--dense {args.dense!r}: unknown {bad}; choose from {', '.join(DENSE_KINDS)}.")
    if dense and not args.out:
        raise SDIError("--dense writes arrays: give --out FILE.npz as well.")
    if args.k < 0:
        raise SDIError(f"--k must be >= 0, got {args.k}.")
    if args.max_queries < 0:
        raise SDIError(f"--max-queries must be >= 0, got {args.max_queries}.")
    query = FeatureStore(args.query, verify=verify)
    kw = dict(k=args.k, budget=budget, slots=not args.no_slots, total=not args.no_total, dense=dense,
              normalize=args.normalize, largest=not args.smallest, block_rows=args.block_rows, progress=args.progress)
    if _under_torchrun(args):
        # torchrun: each rank scores its share of the train rows; results are gathered and merged.
        sd = _launcher_distributed()
        with sd.process_group() as (rank, _):
            res = sd.score_store(train, query, **kw)
        if rank != 0:
            return 0
    else:
        res = score_store(train, query, rank=rank, world_size=world, **kw)
        if world > 1:
            print(f"rank {rank}/{world}: scored train rows {res.rows[0]}..{res.rows[1]} only; combine the parts "
                  "with sdi_core.scoring.StreamedScores.merge (or run under torchrun, which merges).")
    if args.out:
        with io_errors(f"sdi score: writing --out {args.out!r}", args.out):
            res.to_npz(_npz_path(args.out))
    if not args.quiet:
        print(res.table(max_queries=args.max_queries))
    if args.out:
        print(f"wrote {_npz_path(args.out)}")
    return 0


def _npz_path(path: str) -> str:
    """The file ``numpy.savez`` writes for ``path`` (it appends ``.npz`` when missing)."""
    return path if path.endswith(".npz") else path + ".npz"


# --------------------------------------------------------------------------- parsers


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def register(subparsers) -> None:
    """Add ``featurize`` and ``score`` to the ``sdi`` command."""
    f = subparsers.add_parser(
        "featurize",
        help="featurise a split of a dataset into an on-disk feature store (resumable)",
        description="Featurise a dataset split into an on-disk feature store, shard by shard. Killed runs resume: "
        "run the same command again and finished shards are skipped; the result is bit-identical.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = f.add_argument_group("model and data")
    from .backends import backend_names

    src.add_argument("--backend", choices=backend_names(), default="numpy",
                     help="numpy: the float64 NumPy reference looped transformer; torch: sdi_torch.models.LoopedGPT "
                     "with sdi_torch.Attributor (backends with a store featurizer; see `sdi --help`)")
    src.add_argument("--demo", choices=sorted(DEMO_SPLITS),
                     help="use the built-in tiny model and random data of this split instead of --model/--checkpoint/--data")
    src.add_argument("--model", help="JSON file of LoopedConfig fields (vocab_size, d_model, n_heads, tau, ...)")
    src.add_argument("--checkpoint", action="append", metavar="WEIGHTS.npz",
                     help="canonical weights (name -> array); repeat for several checkpoints")
    src.add_argument("--eta", action="append", type=_positive_float, metavar="ETA",
                     help="learning-rate weight of each checkpoint, in --checkpoint order (default 1)")
    src.add_argument("--data", metavar="DATA.npz", help="tokens, targets [N, T] (-100 ignored), optional n_steps, ids [N]")
    src.add_argument("--tau", type=int, default=None, help="loop steps to run (default: the model's tau)")
    sk = f.add_argument_group("features")
    sk.add_argument("--sketch-dim", type=int, default=2048, help="TensorSketch dimension per tensor; 0 for exact features")
    sk.add_argument("--seed", type=int, default=0, help="sketch seed (train and query stores must agree)")
    sk.add_argument("--groups", default="loop", help="parameter groups to attribute through, from prelude,loop,coda")
    sk.add_argument("--summed", action="store_true",
                    help="store features summed over loop steps (enough for train stores scored by query step)")
    sk.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype on disk")
    out = f.add_argument_group("store")
    out.add_argument("--out", required=True, metavar="STORE",
                     help="store directory (created; resumed when it holds a store of the same run; a non-empty folder "
                     "that is not a store is refused)")
    out.add_argument("--split", default=None, help="label kept in the metadata (default: the --demo split)")
    out.add_argument("--batch-size", type=int, default=32, help="examples per forward/backward pass")
    out.add_argument("--shard-size", type=int, default=8, help="batches per shard (the unit of commit and resume)")
    out.add_argument("--rank", type=int, default=None, help="this process's rank (default $RANK or 0)")
    out.add_argument("--world-size", type=int, default=None, help="number of writing processes (default $WORLD_SIZE or 1)")
    out.add_argument("--no-consolidate", action="store_true",
                     help="keep the shards instead of merging them into one file per checkpoint and group")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing store at --out (only the files the store wrote) and featurise from "
                     "scratch; without it a store written with another configuration or other data is refused")
    out.add_argument("--no-verify", action="store_true",
                     help="skip the CRC-32 check of every shard before consolidation copies it")
    out.add_argument("--device", default="cpu", help="torch device (--backend torch)")
    out.add_argument("--torch-dtype", choices=("float32", "float64"), default="float32",
                     help="model dtype (--backend torch)")
    out.add_argument("--progress", action="store_true", help="show a progress bar")
    f.set_defaults(func=run_featurize)

    s = subparsers.add_parser(
        "score",
        help="score query stores against a train store (streamed, under a memory budget)",
        description="Score the queries of QUERY against every example of TRAIN, streaming TRAIN from disk in blocks "
        "under a memory budget. Prints the top-k train examples per query (in total and per loop step).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("train", metavar="TRAIN", help="train feature store (per step or --summed)")
    s.add_argument("query", metavar="QUERY", nargs="?", help="query feature store (per step)")
    s.add_argument("--k", type=int, default=10, help="train examples kept per query (and per query step)")
    s.add_argument("--budget", default="1GiB", help="memory budget, e.g. 2GiB, 512MiB or bytes")
    s.add_argument("--normalize", choices=("cosine",), default=None, help="cosine-normalise gradients per checkpoint")
    s.add_argument("--smallest", action="store_true", help="rank by smallest influence (opponents) instead of largest")
    s.add_argument("--no-slots", action="store_true", help="skip the per-step top-k")
    s.add_argument("--no-total", action="store_true", help="skip the TracIn (total) top-k")
    s.add_argument("--dense", default="", metavar="KINDS",
                   help="also write dense arrays to --out: comma-separated trajectory, tracin, train_trajectory, "
                   "step_matrix (refused when they do not fit the budget)")
    s.add_argument("--self-influence", action="store_true", help="self-influence of the TRAIN store instead")
    s.add_argument("--out", metavar="FILE.npz", help="write all results to this .npz")
    s.add_argument("--max-queries", type=int, default=10, help="queries shown in the printed table")
    s.add_argument("--quiet", action="store_true", help="do not print the table")
    s.add_argument("--block-rows", type=int, default=None, help="cap on train rows per block (default: from the budget)")
    s.add_argument("--rank", type=int, default=None, help="score only this rank's share of TRAIN (default $RANK or 0)")
    s.add_argument("--world-size", type=int, default=None, help="number of scoring ranks (default $WORLD_SIZE or 1)")
    s.add_argument("--no-verify", action="store_true",
                   help="skip the CRC-32 checks of the stores' files as they are read (sizes and headers are still checked)")
    s.add_argument("--progress", action="store_true", help="show a progress bar")
    s.set_defaults(func=run_score)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sdi featurize`` / ``sdi score`` without the rest of the CLI (for tests)."""
    from .cli import main as cli_main

    return cli_main(list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
