"""Counterfactual validation of attributions: does removing what they rank highest move the model?

Three experiments, each framework-neutral (NumPy only).  The backend supplies
a :class:`Retrainer`: "train this model on this subset of the training set,
from this initialisation and schedule" and "the loss of the queries read out
at loop step t".  Everything else (which subsets, which removals, the
statistics, the cache) lives here.

- **Linear datamodeling score** (LDS; Park et al. 2023, as TRAK, dattri and
  Kronfluence publish it): ``M`` random subsets holding ``fraction`` of the
  training set; a model is retrained on each with ``S`` seeds; per query, the
  Spearman correlation over subsets between the attribution's prediction
  ``sum_{i in subset} score(i, j)`` and the retrained models' actual
  ``-loss_j`` (negated: a positive score means "training on i lowers the
  query loss"), averaged over queries, with a bootstrap interval over subsets.
- **Step-resolved counterfactual**: for query ``j`` and loop step ``t``,
  remove the top-``k`` training examples ranked by ``I(., j, t)``, retrain,
  and measure the change of the query loss *read out at step t* (the coda
  applied to the hidden state after step ``t``, as an early-exit readout
  does).  The same is done for the top-``k`` by TracIn and for ``k`` random
  examples.  A ranking that captures what matters at step ``t`` raises the
  step-``t`` loss more when its top examples are removed.
- **Mislabel detection** (:func:`mislabel_detection`): rank the training set
  by self-influence and measure how well it finds flipped labels (AUC, and
  the fraction found in the top 10 % inspected).

Retraining is the expensive part: jobs run in parallel processes
(``workers``) and their results are cached on disk (:class:`RetrainCache`),
so an interrupted run resumes where it stopped.  A cache written under
another configuration is refused.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .factors import SDIError
from .metrics import spearman

__all__ = [
    "Retrainer",
    "RetrainJob",
    "RetrainCache",
    "run_jobs",
    "Attributions",
    "ValidationConfig",
    "LDSResult",
    "CounterfactualResult",
    "MislabelResult",
    "ValidationResult",
    "random_subsets",
    "linear_datamodeling_score",
    "counterfactual_jobs",
    "counterfactual_effects",
    "mislabel_detection",
    "validate",
]

CACHE_FORMAT = 1


# --------------------------------------------------------------------------- the backend's part


@runtime_checkable
class Retrainer(Protocol):
    """What a backend supplies to retrain its model (see :mod:`sdi_torch.validate` for PyTorch).

    Attributes:
        n_train: size of the full training set (indices ``0 .. n_train - 1``).
        n_query: number of query examples whose losses are read out.
        readout_steps: the loop steps ``t`` (1-based) at which query losses can
            be read out; the last one is the model's ordinary output.

    A retrainer must be picklable when ``workers > 1`` (jobs then run in
    spawned processes, each calling :meth:`setup_worker` once).
    """

    n_train: int
    n_query: int
    readout_steps: tuple[int, ...]

    def config(self) -> Mapping[str, Any]:
        """JSON-able description of everything that determines a retrained model (the cache key)."""

    def initial_weights(self, seed: int) -> Mapping[str, np.ndarray]:
        """The weights training starts from under ``seed``, as NumPy arrays by name."""

    def retrain(self, train_indices: np.ndarray, seed: int) -> Any:
        """A model trained on ``train_indices`` (int ``[n]``) from initialisation ``seed`` and the fixed schedule."""

    def weights(self, model: Any) -> Mapping[str, np.ndarray]:
        """A retrained model's weights as NumPy arrays by name."""

    def query_losses(self, model: Any, steps: Sequence[int]) -> np.ndarray:
        """Per-query loss read out after each loop step in ``steps``: float ``[len(steps), n_query]``."""

    def setup_worker(self) -> None:
        """Called once in each worker process before its first job (e.g. to set thread counts)."""


@dataclass(frozen=True)
class RetrainJob:
    """One retraining: the kept training indices and the seed.

    Attributes:
        keep: sorted int ``[n]`` indices of the training examples trained on.
        seed: initialisation and batch-order seed.
        label: what the job is for (``"lds[3]"``, ``"remove sdi q1 t2"``...), for messages only.
    """

    keep: tuple[int, ...]
    seed: int
    label: str = ""

    @property
    def key(self) -> str:
        """Content key: the same kept set and seed give the same key, whatever the label."""
        h = hashlib.sha256()
        h.update(np.asarray(self.keep, dtype=np.int64).tobytes())
        h.update(f"|seed={self.seed}".encode())
        return h.hexdigest()[:24]


def _describe_config_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _describe_config_difference(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: cached {a!r}, now {b!r}")
    return diffs


class RetrainCache:
    """Retrained query losses on disk, one small ``.npz`` per job, keyed by :attr:`RetrainJob.key`.

    ``config.json`` in the folder records the retrainer's :meth:`Retrainer.config`;
    opening the folder under a different configuration raises, naming every
    field that differs.  Each result is written to a temporary file and renamed
    into place, so a killed run leaves only whole results behind.
    """

    def __init__(self, folder: str | os.PathLike, config: Mapping[str, Any]) -> None:
        self.folder = os.fspath(folder)
        self.config = json.loads(json.dumps({"format": CACHE_FORMAT, "retrainer": dict(config)}))
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise SDIError(f"Validation cache {self.folder!r} is a file, not a folder; pass a folder path.")
        os.makedirs(os.path.join(self.folder, "jobs"), exist_ok=True)
        path = os.path.join(self.folder, "config.json")
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    old = json.load(fh)
            except (OSError, ValueError) as exc:
                raise SDIError(f"Validation cache {self.folder!r}: cannot read config.json ({exc}); "
                               "delete the folder or pass another --cache.") from exc
            diffs = _describe_config_difference(old if isinstance(old, Mapping) else {}, self.config)
            if diffs:
                raise SDIError(
                    f"Validation cache {self.folder!r} was written by another configuration ("
                    + "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
                    + "). Pass another cache folder, or delete this one to recompute."
                )
        else:
            self._atomic_write(path, json.dumps(self.config, indent=1, sort_keys=True).encode())

    def _atomic_write(self, path: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _path(self, job: RetrainJob) -> str:
        return os.path.join(self.folder, "jobs", f"{job.key}.npz")

    def get(self, job: RetrainJob) -> np.ndarray | None:
        """The cached ``[readout_steps, n_query]`` losses of ``job``, or None."""
        path = self._path(job)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                keep, seed, losses = z["keep"], int(z["seed"]), np.array(z["losses"])
        except (OSError, ValueError, KeyError) as exc:
            raise SDIError(f"Validation cache entry {path!r} is damaged ({exc}); delete it to recompute.") from exc
        if seed != job.seed or not np.array_equal(keep, np.asarray(job.keep, dtype=np.int64)):
            raise SDIError(f"Validation cache entry {path!r} does not hold the job it is named after; delete it.")
        return losses

    def put(self, job: RetrainJob, losses: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, keep=np.asarray(job.keep, dtype=np.int64), seed=np.int64(job.seed), losses=losses)
        self._atomic_write(self._path(job), buf.getvalue())


def _run_one(retrainer: Retrainer, job: RetrainJob) -> np.ndarray:
    """Retrain for ``job``, check that training happened, and read the query losses out at every step."""
    keep = np.asarray(job.keep, dtype=np.int64)
    try:
        model = retrainer.retrain(keep, job.seed)
    except SDIError:
        raise
    except Exception as exc:
        raise SDIError(f"Retraining for {job.label or job.key} ({len(keep)} examples, seed {job.seed}) "
                       f"failed: {type(exc).__name__}: {exc}") from exc
    init = retrainer.initial_weights(job.seed)
    trained = retrainer.weights(model)
    if set(init) != set(trained):
        raise SDIError(f"Retrainer.weights() names {sorted(trained)[:4]}... but initial_weights() names "
                       f"{sorted(init)[:4]}...; both must return the same parameter names.")
    if all(np.array_equal(np.asarray(init[n]), np.asarray(trained[n])) for n in init):
        raise SDIError(
            f"Retrainer.retrain() returned the initial model unchanged for {job.label or job.key} "
            f"(seed {job.seed}): no weight moved. It must train a fresh model on the given indices "
            "and return it."
        )
    steps = tuple(retrainer.readout_steps)
    losses = np.asarray(retrainer.query_losses(model, steps), dtype=np.float64)
    if losses.shape != (len(steps), retrainer.n_query):
        raise SDIError(f"Retrainer.query_losses() returned shape {losses.shape}, expected "
                       f"({len(steps)}, {retrainer.n_query}) = [readout steps, queries].")
    if not np.all(np.isfinite(losses)):
        raise SDIError(f"Retrained model for {job.label or job.key} gives non-finite query losses; "
                       "lower the learning rate of the validation schedule.")
    return losses


_WORKER_RETRAINER: Retrainer | None = None


def _worker_init(retrainer: Retrainer) -> None:
    global _WORKER_RETRAINER
    _WORKER_RETRAINER = retrainer
    setup = getattr(retrainer, "setup_worker", None)
    if setup is not None:
        setup()


def _worker_run(job: RetrainJob) -> np.ndarray:
    assert _WORKER_RETRAINER is not None
    return _run_one(_WORKER_RETRAINER, job)


def run_jobs(
    retrainer: Retrainer,
    jobs: Sequence[RetrainJob],
    *,
    cache: RetrainCache | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run every job not already cached; returns ``{job.key: losses [readout_steps, n_query]}``.

    Jobs with the same key (same kept set and seed) run once.  With
    ``workers > 1`` they run in that many spawned processes; each result is
    cached as soon as it arrives, so an interrupted run loses at most the
    jobs in flight.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SDIError(f"workers must be a positive integer, got {workers!r}.")
    unique: dict[str, RetrainJob] = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    results: dict[str, np.ndarray] = {}
    todo = []
    for key, job in unique.items():
        got = cache.get(job) if cache is not None else None
        if got is not None:
            results[key] = got
        else:
            todo.append(job)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="retraining", unit="model", leave=False, dynamic_ncols=True,
                   initial=0, postfix={"cached": len(results)})

    def done(job: RetrainJob, losses: np.ndarray) -> None:
        results[job.key] = losses
        if cache is not None:
            cache.put(job, losses)
        if bar is not None:
            bar.update(1)

    try:
        if workers == 1 or len(todo) <= 1:
            setup = getattr(retrainer, "setup_worker", None)
            if setup is not None and todo:
                setup()
            for job in todo:
                done(job, _run_one(retrainer, job))
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                        initializer=_worker_init, initargs=(retrainer,)) as pool:
                futures = {pool.submit(_worker_run, job): job for job in todo}
                try:
                    for fut in cf.as_completed(futures):
                        done(futures[fut], fut.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        if bar is not None:
            bar.close()
    return results


# --------------------------------------------------------------------------- statistics


def random_subsets(n_train: int, n_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """``n_subsets`` distinct random subsets of ``round(fraction * n_train)`` examples: bool ``[M, n_train]``."""
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, (int, np.integer)) or n_subsets < 2:
        raise SDIError(f"n_subsets={n_subsets!r}: the LDS needs at least 2 subsets to rank.")
    if n_subsets > n_train:
        raise SDIError(
            f"n_subsets={n_subsets} exceeds the {n_train} training examples; ask for at most as many "
            "subsets as there are training examples (or validate on a larger training set)."
        )
    if not (0.0 < fraction < 1.0):
        raise SDIError(f"subset fraction {fraction!r} must lie strictly between 0 and 1 (the LDS uses 0.5).")
    size = int(round(fraction * n_train))
    if not 1 <= size < n_train:
        raise SDIError(f"a subset of fraction {fraction} of {n_train} examples has {size} examples; "
                       "choose a fraction that keeps at least one and leaves out at least one.")
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    seen: set[bytes] = set()
    for m in range(n_subsets):
        for _ in range(1000):
            row = np.zeros(n_train, dtype=bool)
            row[rng.choice(n_train, size=size, replace=False)] = True
            if row.tobytes() not in seen:
                break
        else:  # pragma: no cover - only for tiny training sets
            raise SDIError(f"cannot draw {n_subsets} distinct subsets of {size} from {n_train} examples.")
        seen.add(row.tobytes())
        masks[m] = row
    return masks


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score of one attribution method.

    Attributes:
        method: the attribution's name.
        mean: Spearman correlation averaged over queries.
        ci_low, ci_high: 95 % bootstrap interval of ``mean`` (resampling subsets).
        per_query: ``[Q]`` Spearman correlation per query (NaN where undefined).
        predicted: ``[M, Q]`` the attribution's predicted subset sums.
        actual: ``[M, Q]`` retrained ``-loss``, averaged over seeds.
    """

    method: str
    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray

    def to_dict(self) -> dict:
        return {"method": self.method, "lds": self.mean, "ci95": [self.ci_low, self.ci_high],
                "per_query": [None if not np.isfinite(v) else float(v) for v in self.per_query]}


def linear_datamodeling_score(
    scores: np.ndarray, masks: np.ndarray, actual_loss: np.ndarray, *, method: str = "",
    n_boot: int = 1000, seed: int = 0,
) -> LDSResult:
    """LDS of ``scores`` against retrained losses.

    Args:
        scores: ``[N_train, Q]`` attribution scores (positive: training on the
            example lowers the query's loss).
        masks: bool ``[M, N_train]``, the subsets trained on.
        actual_loss: ``[M, Q]`` query loss of the model retrained on each
            subset (averaged over seeds).
        n_boot: bootstrap resamples of the subsets for the interval.

    Returns:
        :class:`LDSResult`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    actual = -np.asarray(actual_loss, dtype=np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise SDIError(f"LDS: scores [N_train, Q] {scores.shape} and masks [M, N_train] {masks.shape} do not fit.")
    if actual.shape != (masks.shape[0], scores.shape[1]):
        raise SDIError(f"LDS: actual losses have shape {actual.shape}, expected [M, Q] = "
                       f"{(masks.shape[0], scores.shape[1])}.")
    if not np.all(np.isfinite(scores)):
        raise SDIError("LDS: the attribution scores contain NaN or inf.")
    predicted = masks.astype(np.float64) @ scores  # [M, Q]
    per_query = spearman(predicted, actual, axis=0)  # over subsets, one value per query
    mean = float(np.nanmean(per_query)) if np.any(np.isfinite(per_query)) else float("nan")
    rng = np.random.default_rng(seed)
    m = masks.shape[0]
    boot = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, m, size=m)
        r = spearman(predicted[idx], actual[idx], axis=0)
        boot[b] = np.nanmean(r) if np.any(np.isfinite(r)) else np.nan
    lo, hi = (np.nanpercentile(boot, [2.5, 97.5]) if np.any(np.isfinite(boot)) else (np.nan, np.nan))
    return LDSResult(method, mean, float(lo), float(hi), per_query, predicted, -actual)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores (ties broken by the lower index)."""
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    return np.sort(order[:k])


def _keep_without(n_train: int, removed: np.ndarray) -> tuple[int, ...]:
    keep = np.ones(n_train, dtype=bool)
    keep[removed] = False
    return tuple(int(i) for i in np.flatnonzero(keep))


def counterfactual_jobs(
    trajectory: np.ndarray, tracin: np.ndarray, *, queries: Sequence[int], k: int, n_random: int,
    seeds: Sequence[int], seed: int = 0,
) -> dict[str, Any]:
    """The removal retrainings of the step-resolved counterfactual.

    Args:
        trajectory: ``[N_train, Q, S]`` query-step trajectory over the loop
            steps (slot ``s`` is loop step ``readout_steps[s]``).
        tracin: ``[N_train, Q]``.
        queries: query indices to run the experiment for.
        k: examples removed per retraining.
        n_random: random ``k``-sets, shared by all queries.
        seeds: retraining seeds (every removal is retrained with each).

    Returns:
        ``{"full": {seed: job}, "sdi": {(j, s, seed): job}, "tracin": {(j, seed): job},
        "random": {(r, seed): job}, "removed": {...}}``.
    """
    n, q, s = trajectory.shape
    if tracin.shape != (n, q):
        raise SDIError(f"counterfactual: tracin has shape {tracin.shape}, expected {(n, q)} from the trajectory.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
        raise SDIError(f"counterfactual: k={k!r} examples to remove must be between 1 and {n - 1} (N_train - 1).")
    for j in queries:
        if not 0 <= j < q:
            raise SDIError(f"counterfactual: query index {j} is outside the {q} queries.")
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"full": {}, "sdi": {}, "tracin": {}, "random": {}, "removed": {}}
    everything = tuple(range(n))
    random_sets = [np.sort(rng.choice(n, size=k, replace=False)) for _ in range(n_random)]
    for sd in seeds:
        out["full"][sd] = RetrainJob(everything, sd, f"full seed {sd}")
        for r, removed in enumerate(random_sets):
            out["random"][(r, sd)] = RetrainJob(_keep_without(n, removed), sd, f"remove random #{r} seed {sd}")
            out["removed"][("random", r)] = removed
        for j in queries:
            removed = _top_k(tracin[:, j], k)
            out["tracin"][(j, sd)] = RetrainJob(_keep_without(n, removed), sd, f"remove tracin top-{k} q{j} seed {sd}")
            out["removed"][("tracin", j)] = removed
            for st in range(s):
                removed = _top_k(trajectory[:, j, st], k)
                out["sdi"][(j, st, sd)] = RetrainJob(_keep_without(n, removed), sd,
                                                     f"remove sdi top-{k} q{j} step {st} seed {sd}")
                out["removed"][("sdi", j, st)] = removed
    return out


@dataclass(frozen=True)
class CounterfactualResult:
    """Change of the query loss read out at each loop step after removing ``k`` examples.

    Attributes:
        steps: the loop steps ``t`` (1-based) of the readout.
        k: examples removed per retraining.
        queries: the query indices.
        delta: ``{method: [len(queries), len(steps), n_seeds]}`` loss at step
            ``t`` after removal minus the loss of the full-data model of the
            same seed (``random`` is averaged over its random sets).
        mean, se: ``{method: [len(steps)]}`` mean and standard error of
            ``delta`` over queries and seeds.
        sdi_beats_tracin: ``[len(steps)]`` fraction of (query, seed) pairs
            where removing the step-``t`` top-``k`` moved the step-``t`` loss
            more than removing the TracIn top-``k``.
        overlap: ``[len(queries), len(steps)]`` fraction of the step-``t``
            top-``k`` that is also in the TracIn top-``k``.
    """

    steps: tuple[int, ...]
    k: int
    queries: tuple[int, ...]
    delta: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]
    se: dict[str, np.ndarray]
    sdi_beats_tracin: np.ndarray
    overlap: np.ndarray

    def to_dict(self) -> dict:
        return {
            "steps": list(self.steps), "k": self.k, "queries": list(self.queries),
            "mean_delta_loss": {m: v.tolist() for m, v in self.mean.items()},
            "se": {m: v.tolist() for m, v in self.se.items()},
            "sdi_beats_tracin": self.sdi_beats_tracin.tolist(),
            "topk_overlap_sdi_tracin": self.overlap.mean(axis=0).tolist(),
        }


def counterfactual_effects(plan: Mapping[str, Any], losses: Mapping[str, np.ndarray], *, steps: Sequence[int],
                           queries: Sequence[int], seeds: Sequence[int], k: int) -> CounterfactualResult:
    """Assemble :class:`CounterfactualResult` from :func:`counterfactual_jobs` and :func:`run_jobs`' losses."""
    ns, nq, nd = len(steps), len(queries), len(seeds)
    n_random = len({r for (r, _) in plan["random"]})
    delta = {m: np.zeros((nq, ns, nd)) for m in ("sdi", "tracin", "random")}
    for d, sd in enumerate(seeds):
        full = losses[plan["full"][sd].key]  # [ns, Q]
        rand = np.mean([losses[plan["random"][(r, sd)].key] for r in range(n_random)], axis=0) if n_random else None
        for a, j in enumerate(queries):
            tr = losses[plan["tracin"][(j, sd)].key]
            delta["tracin"][a, :, d] = tr[:, j] - full[:, j]
            if rand is not None:
                delta["random"][a, :, d] = rand[:, j] - full[:, j]
            for st in range(ns):
                sdi = losses[plan["sdi"][(j, st, sd)].key]
                delta["sdi"][a, st, d] = sdi[st, j] - full[st, j]
    if not n_random:
        del delta["random"]
    mean = {m: v.mean(axis=(0, 2)) for m, v in delta.items()}
    count = nq * nd
    se = {m: (v.reshape(nq, ns, nd).transpose(1, 0, 2).reshape(ns, -1).std(axis=1, ddof=1) / math.sqrt(count)
              if count > 1 else np.full(ns, np.nan)) for m, v in delta.items()}
    beats = (delta["sdi"] > delta["tracin"]).mean(axis=(0, 2))
    overlap = np.zeros((nq, ns))
    for a, j in enumerate(queries):
        top_t = set(plan["removed"][("tracin", j)].tolist())
        for st in range(ns):
            overlap[a, st] = len(top_t & set(plan["removed"][("sdi", j, st)].tolist())) / k
    return CounterfactualResult(tuple(steps), k, tuple(queries), delta, mean, se, beats, overlap)


@dataclass(frozen=True)
class MislabelResult:
    """How well self-influence finds flipped labels.

    Attributes:
        auc: area under the ROC curve of self-influence as a detector of the
            flipped examples (0.5: chance; ties count one half).
        found_at: fraction of the flipped examples among the top ``inspect``
            fraction of the ranking.
        inspect: the inspected fraction (0.1 by default).
        curve: ``[N + 1, 2]`` (fraction inspected, fraction of flips found).
        n_flipped: number of flipped examples.
    """

    auc: float
    found_at: float
    inspect: float
    curve: np.ndarray
    n_flipped: int

    def to_dict(self) -> dict:
        return {"auc": self.auc, f"found_in_top_{round(self.inspect * 100)}pct": self.found_at,
                "n_flipped": self.n_flipped}


def mislabel_detection(self_influence: np.ndarray, flipped: np.ndarray, *, inspect: float = 0.1) -> MislabelResult:
    """Rank by ``self_influence`` (``[N]``, largest first) against the bool ``[N]`` mask of flipped labels."""
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    y = np.asarray(flipped, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise SDIError(f"mislabel_detection: {s.shape[0]} self-influence scores but {y.shape[0]} labels.")
    if not np.all(np.isfinite(s)):
        raise SDIError("mislabel_detection: self-influence contains NaN or inf.")
    n_pos, n = int(y.sum()), y.size
    if n_pos == 0 or n_pos == n:
        raise SDIError("mislabel_detection needs both flipped and clean examples.")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    auc = float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))
    order = np.lexsort((np.arange(n), -s))
    found = np.concatenate([[0], np.cumsum(y[order])]) / n_pos
    curve = np.stack([np.arange(n + 1) / n, found], axis=1)
    top = int(math.ceil(inspect * n))
    return MislabelResult(auc, float(found[top]), float(inspect), curve, n_pos)


# --------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class Attributions:
    """Scores of the full-data model that validation tests.

    Attributes:
        trajectory: ``[N_train, Q, slots]`` query-step trajectory over every
            slot (prelude, loop steps, coda), as :func:`sdi_core.influence` gives it.
        tracin: ``[N_train, Q]`` TracIn over the same parameters.
        step_slots: the slot of each readout step: ``trajectory[:, :, step_slots[s]]``
            is loop step ``readout_steps[s]``.  Default: every slot.
        last_checkpoint: ``[N_train, Q]`` plain gradient dot product at the
            last checkpoint (the usual baseline), or None.
    """

    trajectory: np.ndarray
    tracin: np.ndarray
    step_slots: tuple[int, ...] | None = None
    last_checkpoint: np.ndarray | None = None

    def __post_init__(self) -> None:
        traj = np.asarray(self.trajectory, dtype=np.float64)
        tracin = np.asarray(self.tracin, dtype=np.float64)
        if traj.ndim != 3 or tracin.shape != traj.shape[:2]:
            raise SDIError(f"Attributions: trajectory [N, Q, slots] {traj.shape} and tracin [N, Q] {tracin.shape} "
                           "do not fit.")
        slots = tuple(range(traj.shape[2])) if self.step_slots is None else tuple(int(s) for s in self.step_slots)
        if not slots or any(not 0 <= s < traj.shape[2] for s in slots):
            raise SDIError(f"Attributions.step_slots={self.step_slots!r}: each must index one of the "
                           f"{traj.shape[2]} trajectory slots.")
        if self.last_checkpoint is not None and np.shape(self.last_checkpoint) != tracin.shape:
            raise SDIError(f"Attributions: last_checkpoint has shape {np.shape(self.last_checkpoint)}, "
                           f"expected {tracin.shape}.")
        for name, a in (("trajectory", traj), ("tracin", tracin)):
            if not np.all(np.isfinite(a)):
                raise SDIError(f"Attributions.{name} contains NaN or inf.")
        object.__setattr__(self, "trajectory", traj)
        object.__setattr__(self, "tracin", tracin)
        object.__setattr__(self, "step_slots", slots)

    @property
    def step_trajectory(self) -> np.ndarray:
        """``[N_train, Q, len(step_slots)]``: the trajectory at the readout steps."""
        return self.trajectory[:, :, list(self.step_slots)]


@dataclass(frozen=True)
class ValidationConfig:
    """Sizes of a validation run.

    Attributes:
        n_subsets: LDS subsets ``M``.
        subset_fraction: fraction of the training set in each subset.
        seeds: retraining seeds ``S`` (LDS losses are averaged over them; the
            counterfactual pairs each removal with the full model of the same seed).
        removal_k: examples removed per counterfactual retraining.
        counterfactual_queries: how many queries (the first ones) get the
            step-resolved counterfactual (it costs ``tau + 1`` retrainings per
            query and seed).
        n_random: random removal sets (shared by all queries).
        n_boot: bootstrap resamples for the LDS interval.
        seed: draws the subsets and random removals.
    """

    n_subsets: int = 24
    subset_fraction: float = 0.5
    seeds: tuple[int, ...] = (0, 1)
    removal_k: int = 25
    counterfactual_queries: int = 3
    n_random: int = 3
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SDIError(f"ValidationConfig.seeds={self.seeds!r}: give at least one seed, each once.")
        for name, lo in (("counterfactual_queries", 0), ("n_random", 0), ("n_boot", 10), ("removal_k", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise SDIError(f"ValidationConfig.{name}={v!r}: must be an integer >= {lo}.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d


@dataclass
class ValidationResult:
    """Everything :func:`validate` measured.

    Attributes:
        lds: ``{method: LDSResult}`` for ``"tracin"``, ``"sdi_step_sum"`` and
            (when given) ``"last_checkpoint"``.
        counterfactual: :class:`CounterfactualResult`, or None when no query was asked for.
        config: the :class:`ValidationConfig` used.
        n_retrained: models trained (cached ones included).
        shortcuts: what the numbers depend on, in words.
    """

    lds: dict[str, LDSResult]
    counterfactual: CounterfactualResult | None
    config: ValidationConfig
    n_retrained: int
    shortcuts: list[str] = field(default_factory=list)
    masks: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "lds": {m: r.to_dict() for m, r in self.lds.items()},
            "counterfactual": None if self.counterfactual is None else self.counterfactual.to_dict(),
            "n_retrained": self.n_retrained,
            "shortcuts": list(self.shortcuts),
        }


def validate(
    retrainer: Retrainer,
    attributions: Attributions,
    config: ValidationConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = True,
) -> ValidationResult:
    """Run the LDS and the step-resolved counterfactual for ``attributions`` of ``retrainer``'s model.

    Args:
        retrainer: the backend's :class:`Retrainer`.
        attributions: scores of the full-data model (:class:`Attributions`);
            their step axis must match ``retrainer.readout_steps``.
        config: sizes (:class:`ValidationConfig`).
        cache_dir: folder for retrained results (resumable); None keeps nothing.
        workers: parallel retraining processes.

    Returns:
        :class:`ValidationResult`.
    """
    config = ValidationConfig() if config is None else config
    steps = tuple(int(t) for t in retrainer.readout_steps)
    n, q, _ = attributions.trajectory.shape
    s = len(attributions.step_slots)
    if n != retrainer.n_train or q != retrainer.n_query:
        raise SDIError(f"validate: attributions cover {n} train x {q} query examples, but the retrainer has "
                       f"{retrainer.n_train} x {retrainer.n_query}; attribute exactly the retrainer's examples.")
    if s != len(steps):
        raise SDIError(f"validate: the attributions name {s} step slots but the retrainer reads out at "
                       f"{len(steps)} steps {steps}; set Attributions.step_slots to one slot per readout step.")
    masks = random_subsets(n, config.n_subsets, config.subset_fraction, config.seed)
    lds_jobs = {(m, sd): RetrainJob(tuple(int(i) for i in np.flatnonzero(masks[m])), sd, f"lds subset {m} seed {sd}")
                for m in range(config.n_subsets) for sd in config.seeds}
    n_cf = min(config.counterfactual_queries, q)
    queries = tuple(range(n_cf))
    plan = None
    jobs = list(lds_jobs.values())
    if n_cf:
        plan = counterfactual_jobs(attributions.step_trajectory, attributions.tracin, queries=queries, k=config.removal_k,
                                   n_random=config.n_random, seeds=config.seeds, seed=config.seed + 1)
        for part in ("full", "sdi", "tracin", "random"):
            jobs += list(plan[part].values())
    cache = None if cache_dir is None else RetrainCache(cache_dir, retrainer.config())
    losses = run_jobs(retrainer, jobs, cache=cache, workers=workers, progress=progress)

    final = len(steps) - 1  # the LDS uses the model's ordinary output (the last readout step)
    actual = np.stack([np.mean([losses[lds_jobs[(m, sd)].key][final] for sd in config.seeds], axis=0)
                       for m in range(config.n_subsets)])
    methods = {"tracin": attributions.tracin, "sdi_step_sum": attributions.trajectory.sum(axis=-1)}
    if attributions.last_checkpoint is not None:
        methods["last_checkpoint"] = np.asarray(attributions.last_checkpoint, dtype=np.float64)
    lds = {name: linear_datamodeling_score(sc, masks, actual, method=name, n_boot=config.n_boot, seed=config.seed)
           for name, sc in methods.items()}
    cf_result = None
    if plan is not None:
        cf_result = counterfactual_effects(plan, losses, steps=steps, queries=queries, seeds=config.seeds,
                                           k=config.removal_k)
    shortcuts = [
        f"{len({j.key for j in jobs})} models retrained from the same initialisation per seed "
        f"({len(config.seeds)} seeds) with the full-data schedule, not to convergence on each subset",
        f"LDS over {config.n_subsets} subsets of {config.subset_fraction:g} of the training set; query losses "
        "averaged over seeds",
        f"counterfactual on the first {n_cf} queries, removing k={config.removal_k} examples",
    ]
    return ValidationResult(lds, cf_result, config, len({j.key for j in jobs}), shortcuts, masks)
