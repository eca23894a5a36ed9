"""Small algorithmic tasks for training looped transformers (NumPy only).

Every task turns examples into fixed-length token-id rows for a causal
next-token language model:

- ``tokens``  int64 ``[N, T]``: the sequence fed to the model, answer included
  (teacher forcing), right-padded with the task's PAD id (always id 0).
- ``targets`` int64 ``[N, T]``: ``targets[i, t]`` is the token the model must
  predict from position ``t``, i.e. ``tokens[i, t + 1]``, at *answer
  positions* only, and ``-100`` (:data:`IGNORE_INDEX`) everywhere else.

*Answer positions* of a row are the positions ``t`` with
``targets[t] != -100``: the logits at ``t`` predict the answer token that sits
at ``tokens[t + 1]``.  :meth:`Task.answer_positions` returns them for a tokens
row, and :meth:`Task.check` / :meth:`Task.accuracy` take predictions read off
at exactly those positions (in increasing position order).  The loss is
``cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
ignore_index=-100)`` with ``logits`` of shape ``[N, T, V]`` computed from
``tokens``; no extra shift is needed.

Token layouts (``|`` separates nothing, it is only for reading):

=========  ===============================================  ===================
task       tokens row                                       answer positions
=========  ===============================================  ===================
parity     ``<bos> b1 .. bn <sep> ans <pad>..``             ``[n + 1]`` (the SEP)
pointer    ``<bos> s1 d1 .. sM dM h<k> start <sep> ans``    ``[2M + 3]``
addition   ``<bos> a.. + b.. = c0 c1 .. cD``                ``2D + 2 .. 3D + 2``
sudoku     ``<bos> g0 .. g15 <sep> s0 .. s15``              ``17 .. 32``
=========  ===============================================  ===================

Generation is deterministic for a seed; :meth:`Task.splits` deduplicates by
input (the row with its answer tokens removed) and keeps train and test
disjoint whenever the input space allows.

The checkers (:meth:`Task.check`) never look at stored targets: they re-derive
the answer from the input part of the row (and, for Sudoku, verify the
constraints of the predicted grid directly).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, NamedTuple, Sequence

import numpy as np

from ..factors import SDIError

__all__ = [
    "IGNORE_INDEX",
    "TaskData",
    "Task",
    "ParityTask",
    "PointerTask",
    "AdditionTask",
    "SudokuTask",
    "TASKS",
    "get_task",
    "SudokuSolveResult",
    "solve_sudoku4",
    "sudoku4_is_valid_solution",
    "all_sudoku4_grids",
]

IGNORE_INDEX = -100
"""Target value at positions that carry no loss (PyTorch's default ``ignore_index``)."""


# --------------------------------------------------------------------------- data container


@dataclass
class TaskData:
    """A batch of N examples of one task.

    Attributes:
        tokens: int64 ``[N, T]`` model input, answer included, PAD-padded right.
        targets: int64 ``[N, T]`` next-token targets at answer positions and
            :data:`IGNORE_INDEX` (-100) elsewhere.
        meta: per-example information, every value an array of shape ``[N]``
            (e.g. ``"length"``, ``"hops"``, ``"difficulty"``, ``"n_steps_hint"``).
        task: name of the task that produced the data ("" when unknown).
    """

    tokens: np.ndarray
    targets: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    task: str = ""

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.targets = np.asarray(self.targets, dtype=np.int64)
        if self.tokens.ndim != 2 or self.tokens.shape != self.targets.shape:
            raise SDIError(
                f"TaskData: tokens and targets must both be [N, T]; got {self.tokens.shape} "
                f"and {self.targets.shape}."
            )
        n = self.tokens.shape[0]
        meta = {}
        for k, v in self.meta.items():
            v = np.asarray(v)
            if v.shape[:1] != (n,):
                raise SDIError(f"TaskData: meta[{k!r}] must have leading dimension {n}, got {v.shape}.")
            meta[k] = v
        self.meta = meta

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """T, the row length."""
        return int(self.tokens.shape[1])

    @property
    def answer_mask(self) -> np.ndarray:
        """bool ``[N, T]``: True at answer positions (where ``targets != -100``)."""
        return self.targets != IGNORE_INDEX

    def subset(self, idx: Any) -> "TaskData":
        """Rows ``idx`` (integer index array, boolean mask ``[N]`` or slice), meta included."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.dtype != bool:
                idx = idx.astype(np.int64).reshape(-1)
        return TaskData(
            tokens=self.tokens[idx],
            targets=self.targets[idx],
            meta={k: v[idx] for k, v in self.meta.items()},
            task=self.task,
        )

    @staticmethod
    def concat(parts: Sequence["TaskData"]) -> "TaskData":
        """Concatenate batches of the same task along N (meta keys must agree)."""
        parts = list(parts)
        if not parts:
            raise SDIError("TaskData.concat: need at least one part.")
        keys = list(parts[0].meta)
        for p in parts[1:]:
            if list(p.meta) != keys or p.seq_len != parts[0].seq_len:
                raise SDIError("TaskData.concat: parts differ in meta keys or sequence length.")
        return TaskData(
            tokens=np.concatenate([p.tokens for p in parts]),
            targets=np.concatenate([p.targets for p in parts]),
            meta={k: np.concatenate([p.meta[k] for p in parts]) for k in keys},
            task=parts[0].task,
        )

    def __repr__(self) -> str:
        return (
            f"TaskData(task={self.task!r}, N={len(self)}, T={self.seq_len}, "
            f"meta={sorted(self.meta)})"
        )


# --------------------------------------------------------------------------- option checks


def _int_option(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SDIError(f"option {name}={value!r} must be an integer in [{lo}, {hi}].")
    value = int(value)
    if not lo <= value <= hi:
        raise SDIError(f"option {name}={value} is out of range: allowed [{lo}, {hi}].")
    return value


def _bool_option(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise SDIError(f"option {name}={value!r} must be a bool (True or False).")
    return bool(value)


def _as_row(tokens_row: Any, seq_len: int, task: str) -> np.ndarray:
    row = np.asarray(tokens_row)
    if row.ndim != 1 or row.shape[0] != seq_len:
        raise SDIError(f"{task}: expected a tokens row of shape [{seq_len}], got {row.shape}.")
    return row.astype(np.int64)


# --------------------------------------------------------------------------- base class


class Task:
    """Base class of the algorithmic tasks.

    Subclasses set ``name``, ``vocab`` (token strings; id = position; id 0 is
    always ``"<pad>"``) and ``seq_len``, and implement ``_generate``,
    ``answer_positions``, ``answer``, ``check`` and ``render``.

    Attributes:
        name: task name as used by :func:`get_task`.
        vocab: token strings; a token's id is its index.
        seq_len: T, fixed for the task configuration.
        options: the constructor options (for logging / reproducibility).
    """

    name: ClassVar[str] = ""
    vocab: tuple[str, ...]
    seq_len: int
    options: dict[str, Any]

    PAD = "<pad>"
    BOS = "<bos>"
    SEP = "<sep>"

    # ---- vocabulary helpers
    @property
    def vocab_size(self) -> int:
        """V = ``len(vocab)``."""
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return 0

    def token_id(self, token: str) -> int:
        """Id of a token string (ValueError when it is not in the vocabulary)."""
        try:
            return self.vocab.index(token)
        except ValueError:
            raise SDIError(f"{self.name}: token {token!r} is not in the vocabulary {self.vocab}.") from None

    def token_str(self, tid: int) -> str:
        """String of a token id; ``"?"`` for ids outside the vocabulary."""
        tid = int(tid)
        return self.vocab[tid] if 0 <= tid < len(self.vocab) else "?"

    def decode(self, tokens_row: np.ndarray) -> list[str]:
        """Token strings of a row, PAD dropped (the literal view of a row)."""
        return [self.token_str(t) for t in np.asarray(tokens_row).reshape(-1) if int(t) != self.pad_id]

    # ---- generation
    def _generate(self, n: int, rng: np.random.Generator) -> TaskData:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> TaskData:
        """``n`` i.i.d. examples (repeats possible), deterministic for ``seed``.

        Returns:
            TaskData with tokens/targets int64 ``[n, seq_len]`` and meta ``[n]``.
        """
        n = _int_option("n", n, 0, 10**9)
        return self._generate(n, np.random.default_rng(seed))

    def input_keys(self, data: TaskData) -> np.ndarray:
        """int64 ``[N, T]``: the tokens with answer tokens replaced by -1 (identity of the input)."""
        ans_tok = np.zeros(data.tokens.shape, dtype=bool)
        ans_tok[:, 1:] = data.targets[:, :-1] != IGNORE_INDEX
        return np.where(ans_tok, -1, data.tokens)

    def splits(self, n_train: int, n_test: int, seed: int) -> tuple[TaskData, TaskData]:
        """Deterministic train/test split with inputs deduplicated.

        Examples are drawn i.i.d. (as :meth:`sample`) and kept by first
        occurrence of their input (the row without its answer tokens).  Test
        receives ``n_test`` distinct inputs, train ``n_train`` distinct inputs
        none of which is in test.  When the input space holds fewer than
        ``n_train + n_test`` distinct inputs (e.g. short parity strings), test
        is still filled with distinct inputs and train is topped up with
        repeats of non-test inputs, so train and test never share an input.

        Raises:
            ValueError: if not even ``n_test`` distinct inputs (plus one for
                train when ``n_train > 0``) can be found.
        """
        n_train = _int_option("n_train", n_train, 0, 10**9)
        n_test = _int_option("n_test", n_test, 0, 10**9)
        need = n_train + n_test
        rng = np.random.default_rng(seed)
        parts: list[TaskData] = []
        seen: dict[bytes, int] = {}  # input key -> unique id, in order of first occurrence
        first: list[int] = []  # pool index of each unique input's first occurrence
        inverse_parts: list[np.ndarray] = []
        offset = 0
        batch = max(64, int(need * 1.1) + 16)
        for _ in range(12):
            part = self._generate(batch, rng)
            keys = np.ascontiguousarray(self.input_keys(part))
            inv = np.empty(len(part), dtype=np.int64)
            before = len(first)
            for i, r in enumerate(keys):
                k = r.tobytes()
                u = seen.get(k)
                if u is None:
                    u = seen[k] = len(first)
                    first.append(offset + i)
                inv[i] = u
            parts.append(part)
            inverse_parts.append(inv)
            offset += len(part)
            if len(first) >= need or len(first) == before:
                break
        pool = TaskData.concat(parts)
        inverse = np.concatenate(inverse_parts)
        order = np.asarray(first, dtype=np.int64)  # first occurrences, in draw order (already random)
        if len(order) < n_test + (1 if n_train > 0 else 0):
            raise SDIError(
                f"{self.name}: only {len(order)} distinct inputs exist/were found; cannot build "
                f"{n_test} distinct test inputs plus a disjoint train set. Lower n_test or "
                f"enlarge the task (options {self.options})."
            )
        test_idx = order[:n_test]
        train_idx = order[n_test : n_test + n_train]
        if len(train_idx) < n_train:
            # Input space too small: top up with repeats of non-test inputs, in draw order.
            in_test = np.zeros(len(order), dtype=bool)
            in_test[inverse[test_idx]] = True
            chosen = np.zeros(len(pool), dtype=bool)
            chosen[train_idx] = True
            extra = np.flatnonzero(~in_test[inverse] & ~chosen)
            if len(extra) == 0:
                extra = train_idx
            if len(extra) < n_train - len(train_idx):
                extra = np.tile(extra, -(-(n_train - len(train_idx)) // len(extra)))
            train_idx = np.concatenate([train_idx, extra[: n_train - len(train_idx)]])
        return pool.subset(train_idx), pool.subset(test_idx)

    # ---- answers and checking
    def answer_positions(self, tokens_row: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """int64 positions ``t`` whose logits predict the answer tokens (``tokens[t + 1]``)."""
        raise NotImplementedError

    def answer(self, tokens_row: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """int64 ``[n_answer]``: correct answer token ids, recomputed from the input part of the row."""
        raise NotImplementedError

    def check(self, tokens_row: np.ndarray, predicted: np.ndarray) -> bool:  # pragma: no cover
        """True iff ``predicted`` (ids at the answer positions, in order) answers the row's input."""
        raise NotImplementedError

    def render(self, tokens_row: np.ndarray, answer_ids: np.ndarray | None = None) -> str:  # pragma: no cover
        """The example as the task's own text; ``answer_ids`` replaces the row's answer (e.g. a prediction)."""
        raise NotImplementedError

    def _answer_ids_of(self, row: np.ndarray, answer_ids: np.ndarray | None) -> np.ndarray:
        pos = self.answer_positions(row)
        if answer_ids is None:
            return row[pos + 1]
        a = np.asarray(answer_ids).reshape(-1).astype(np.int64)
        if a.shape[0] != pos.shape[0]:
            raise SDIError(f"{self.name}: expected {pos.shape[0]} answer ids, got {a.shape[0]}.")
        return a

    # ---- evaluation
    def predictions(self, data: TaskData, logits_or_pred: np.ndarray) -> np.ndarray:
        """int64 ``[N, T]`` predicted ids from logits ``[N, T, V]`` (argmax) or ids ``[N, T]``."""
        x = np.asarray(logits_or_pred)
        if x.ndim == 3:
            x = x.argmax(axis=-1)
        if x.shape != data.tokens.shape:
            raise SDIError(
                f"{self.name}: predictions must be [N, T] = {data.tokens.shape} ids or "
                f"[N, T, V] logits; got {np.asarray(logits_or_pred).shape}."
            )
        return x.astype(np.int64)

    def correct(self, data: TaskData, logits_or_pred: np.ndarray) -> np.ndarray:
        """bool ``[N]``: every answer position predicted right (exact match against the targets).

        ``logits_or_pred`` is ``[N, T, V]`` logits or ``[N, T]`` predicted ids,
        aligned with ``data.targets`` (position ``t`` predicts ``tokens[t + 1]``).
        """
        pred = self.predictions(data, logits_or_pred)
        mask = data.answer_mask
        return np.all((pred == data.targets) | ~mask, axis=1)

    def accuracy(self, data: TaskData, logits_or_pred: np.ndarray) -> float:
        """Fraction of examples with all answer positions right (see :meth:`correct`)."""
        if len(data) == 0:
            return float("nan")
        return float(self.correct(data, logits_or_pred).mean())

    def check_batch(self, data: TaskData, logits_or_pred: np.ndarray) -> np.ndarray:
        """bool ``[N]``: :meth:`check` of each row (independent checker; slower than :meth:`correct`)."""
        pred = self.predictions(data, logits_or_pred)
        out = np.zeros(len(data), dtype=bool)
        for i in range(len(data)):
            row = data.tokens[i]
            out[i] = self.check(row, pred[i, self.answer_positions(row)])
        return out

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


# --------------------------------------------------------------------------- parity


class ParityTask(Task):
    """Parity of a variable-length bit string.

    Layout (T = ``max_len + 3``)::

        tokens:  <bos> b1 .. bn <sep> ans <pad> ..
        targets: -100 ...  -100  ans  -100 ...      (target at the SEP position n + 1)

    ``ans`` is ``"0"``/``"1"``, the XOR of the bits.  Lengths are uniform in
    ``[min_len, max_len]``.  meta: ``length`` (n), ``n_steps_hint`` (= n; a
    longer string needs more loop steps, since one step can only fold a
    bounded number of bits into the running parity).

    Options:
        min_len: shortest string, in [1, 256] (default 2).
        max_len: longest string, in [min_len, 256] (default 10).
    """

    name = "parity"

    def __init__(self, min_len: int = 2, max_len: int = 10) -> None:
        self.min_len = _int_option("min_len", min_len, 1, 256)
        self.max_len = _int_option("max_len", max_len, self.min_len, 256)
        self.options = {"min_len": self.min_len, "max_len": self.max_len}
        self.vocab = (self.PAD, self.BOS, self.SEP, "0", "1")
        self.seq_len = self.max_len + 3
        self.bos_id, self.sep_id, self.zero_id, self.one_id = 1, 2, 3, 4

    def _generate(self, n: int, rng: np.random.Generator) -> TaskData:
        L = self.max_len
        lengths = rng.integers(self.min_len, L + 1, size=n)
        bits = rng.integers(0, 2, size=(n, L))
        bits[np.arange(L)[None, :] >= lengths[:, None]] = 0
        parity = bits.sum(axis=1) % 2
        T = self.seq_len
        tokens = np.zeros((n, T), dtype=np.int64)
        tokens[:, 0] = self.bos_id
        pos = np.arange(L)[None, :]
        tokens[:, 1 : L + 1] = np.where(pos < lengths[:, None], self.zero_id + bits, self.pad_id)
        rows = np.arange(n)
        tokens[rows, lengths + 1] = self.sep_id
        tokens[rows, lengths + 2] = self.zero_id + parity
        targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        targets[rows, lengths + 1] = self.zero_id + parity
        meta = {"length": lengths.astype(np.int64), "n_steps_hint": lengths.astype(np.int64)}
        return TaskData(tokens, targets, meta, task=self.name)

    def _parse(self, tokens_row: np.ndarray) -> tuple[np.ndarray, list[int]]:
        row = _as_row(tokens_row, self.seq_len, self.name)
        seps = np.flatnonzero(row == self.sep_id)  # the first SEP ends the input; what follows is the answer
        if row[0] != self.bos_id or len(seps) == 0 or seps[0] > self.max_len + 1:
            raise SDIError(f"parity: malformed row {row.tolist()} (need <bos> bits <sep> ans).")
        s = int(seps[0])
        bits = [int(t) - self.zero_id for t in row[1:s]]
        if any(b not in (0, 1) for b in bits) or not 1 <= len(bits) <= self.max_len:
            raise SDIError(f"parity: malformed bit string in row {row.tolist()}.")
        return row, bits

    def answer_positions(self, tokens_row: np.ndarray) -> np.ndarray:
        row, bits = self._parse(tokens_row)
        return np.array([len(bits) + 1], dtype=np.int64)

    def answer(self, tokens_row: np.ndarray) -> np.ndarray:
        _, bits = self._parse(tokens_row)
        p = 0
        for b in bits:
            p ^= b
        return np.array([self.zero_id + p], dtype=np.int64)

    def check(self, tokens_row: np.ndarray, predicted: np.ndarray) -> bool:
        pred = np.asarray(predicted).reshape(-1)
        return pred.shape == (1,) and int(pred[0]) == int(self.answer(tokens_row)[0])

    def render(self, tokens_row: np.ndarray, answer_ids: np.ndarray | None = None) -> str:
        row, bits = self._parse(tokens_row)
        ans = self._answer_ids_of(row, answer_ids)
        return "".join(str(b) for b in bits) + " -> " + self.token_str(ans[0])


# --------------------------------------------------------------------------- pointer chasing


class PointerTask(Task):
    """Multi-hop pointer chasing.

    A random map ``f`` on ``n_nodes`` symbols is listed as ``(src, dst)`` pairs,
    followed by a hop count ``k`` and a start node; the answer is ``f^k(start)``.

    Layout (M = ``n_nodes``, T = ``2M + 5``)::

        tokens:  <bos> s1 d1 s2 d2 .. sM dM h<k> start <sep> ans
        targets: -100 .......................................  ans  -100
                 (target at the SEP position 2M + 3)

    Node tokens are ``"0" .. str(M-1)``, hop tokens ``"h1" .. "h<max_hops>"``.
    meta: ``hops`` (k), ``n_steps_hint`` (= k; one loop step per hop is the
    natural algorithm).

    Options:
        n_nodes: number of symbols M, in [2, 64] (default 8).
        min_hops: fewest hops, in [1, max_hops] (default 1).
        max_hops: most hops, in [min_hops, 32] (default 4).
        permutation: if True (default) ``f`` is a random permutation (every
            hop moves along a cycle), else an arbitrary random function.
        shuffle_pairs: if True (default) the pairs are listed in random order;
            else sorted by source (then the source tokens are redundant).
    """

    name = "pointer"

    def __init__(
        self,
        n_nodes: int = 8,
        min_hops: int = 1,
        max_hops: int = 4,
        permutation: bool = True,
        shuffle_pairs: bool = True,
    ) -> None:
        self.n_nodes = _int_option("n_nodes", n_nodes, 2, 64)
        self.max_hops = _int_option("max_hops", max_hops, 1, 32)
        self.min_hops = _int_option("min_hops", min_hops, 1, self.max_hops)
        self.permutation = _bool_option("permutation", permutation)
        self.shuffle_pairs = _bool_option("shuffle_pairs", shuffle_pairs)
        self.options = {
            "n_nodes": self.n_nodes,
            "min_hops": self.min_hops,
            "max_hops": self.max_hops,
            "permutation": self.permutation,
            "shuffle_pairs": self.shuffle_pairs,
        }
        M = self.n_nodes
        self.vocab = (
            (self.PAD, self.BOS, self.SEP)
            + tuple(str(i) for i in range(M))
            + tuple(f"h{k}" for k in range(1, self.max_hops + 1))
        )
        self.bos_id, self.sep_id, self.node0 = 1, 2, 3
        self.hop0 = self.node0 + M  # id of "h1"
        self.seq_len = 2 * M + 5

    def _generate(self, n: int, rng: np.random.Generator) -> TaskData:
        M = self.n_nodes
        rows = np.arange(n)
        if self.permutation:
            f = np.argsort(rng.random((n, M)), axis=1)
        else:
            f = rng.integers(0, M, size=(n, M))
        if self.shuffle_pairs:
            src = np.argsort(rng.random((n, M)), axis=1)
        else:
            src = np.broadcast_to(np.arange(M), (n, M)).copy()
        dst = np.take_along_axis(f, src, axis=1)
        hops = rng.integers(self.min_hops, self.max_hops + 1, size=n)
        start = rng.integers(0, M, size=n)
        cur = start.copy()
        for h in range(self.max_hops):
            cur = np.where(h < hops, f[rows, cur], cur)
        T = self.seq_len
        tokens = np.zeros((n, T), dtype=np.int64)
        tokens[:, 0] = self.bos_id
        tokens[:, 1 : 2 * M + 1 : 2] = self.node0 + src
        tokens[:, 2 : 2 * M + 2 : 2] = self.node0 + dst
        tokens[:, 2 * M + 1] = self.hop0 + hops - 1
        tokens[:, 2 * M + 2] = self.node0 + start
        tokens[:, 2 * M + 3] = self.sep_id
        tokens[:, 2 * M + 4] = self.node0 + cur
        targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        targets[:, 2 * M + 3] = self.node0 + cur
        meta = {"hops": hops.astype(np.int64), "n_steps_hint": hops.astype(np.int64)}
        return TaskData(tokens, targets, meta, task=self.name)

    def _parse(self, tokens_row: np.ndarray) -> tuple[np.ndarray, dict[int, int], list[tuple[int, int]], int, int]:
        row = _as_row(tokens_row, self.seq_len, self.name)
        M = self.n_nodes

        def node(t: int) -> int:
            v = int(t) - self.node0
            if not 0 <= v < M:
                raise SDIError(f"pointer: expected a node token, got id {int(t)} in {row.tolist()}.")
            return v

        if row[0] != self.bos_id or row[2 * M + 3] != self.sep_id:
            raise SDIError(f"pointer: malformed row {row.tolist()}.")
        pairs = [(node(row[1 + 2 * i]), node(row[2 + 2 * i])) for i in range(M)]
        f: dict[int, int] = {}
        for s, d in pairs:
            if s in f:
                raise SDIError(f"pointer: source {s} listed twice in {row.tolist()}.")
            f[s] = d
        k = int(row[2 * M + 1]) - self.hop0 + 1
        if not 1 <= k <= self.max_hops:
            raise SDIError(f"pointer: expected a hop token, got id {int(row[2 * M + 1])}.")
        start = node(row[2 * M + 2])
        return row, f, pairs, k, start

    def answer_positions(self, tokens_row: np.ndarray) -> np.ndarray:
        return np.array([2 * self.n_nodes + 3], dtype=np.int64)

    def answer(self, tokens_row: np.ndarray) -> np.ndarray:
        _, f, _, k, x = self._parse(tokens_row)
        for _ in range(k):
            x = f[x]
        return np.array([self.node0 + x], dtype=np.int64)

    def check(self, tokens_row: np.ndarray, predicted: np.ndarray) -> bool:
        pred = np.asarray(predicted).reshape(-1)
        return pred.shape == (1,) and int(pred[0]) == int(self.answer(tokens_row)[0])

    def render(self, tokens_row: np.ndarray, answer_ids: np.ndarray | None = None) -> str:
        row, _, pairs, k, start = self._parse(tokens_row)
        ans = self._answer_ids_of(row, answer_ids)
        listing = " ".join(f"{s}>{d}" for s, d in pairs)
        return f"{k} hop{'s' if k != 1 else ''} from {start}: {listing} -> {self.token_str(ans[0])}"


# --------------------------------------------------------------------------- addition


class AdditionTask(Task):
    """Multi-digit addition ``a + b`` with fixed-width, zero-padded operands.

    Layout (D = ``n_digits``, T = ``3D + 4``)::

        tokens:  <bos> a_{D-1} .. a_0 + b_{D-1} .. b_0 = c_0 c_1 .. c_D
        targets: -100 ..........................  c_0 .. c_D  -100
                 (answer positions 2D + 2 .. 3D + 2, i.e. the "=" and the
                  first D answer digits; D + 1 answer digits in all)

    Operands are written most significant digit first.  The sum has D + 1
    digits (zero-padded); with ``reverse_answer=True`` (default) it is written
    least significant digit first (``c_0`` = units), which lets a causal
    model emit each digit from the carry of the one before; with
    ``reverse_answer=False`` it is written most significant first.
    :meth:`render` always shows ordinary text, ``"123+456=579"``.

    Each operand's digit count is uniform in ``[min_digits, n_digits]``, its
    value uniform among numbers with that many digits.  meta: ``n_digits``
    (longer operand), ``carries`` (number of carries), ``carry_chain`` (longest
    run of consecutive carries), ``n_steps_hint`` (= carry_chain + 1: carry
    propagation is the sequential part).

    Options:
        n_digits: operand width D, in [1, 15] (default 3).
        min_digits: fewest digits of an operand, in [1, n_digits] (default 1).
        reverse_answer: sum written units-first (default True).
    """

    name = "addition"

    def __init__(self, n_digits: int = 3, min_digits: int = 1, reverse_answer: bool = True) -> None:
        self.n_digits = _int_option("n_digits", n_digits, 1, 15)
        self.min_digits = _int_option("min_digits", min_digits, 1, self.n_digits)
        self.reverse_answer = _bool_option("reverse_answer", reverse_answer)
        self.options = {
            "n_digits": self.n_digits,
            "min_digits": self.min_digits,
            "reverse_answer": self.reverse_answer,
        }
        self.vocab = (self.PAD, self.BOS, "+", "=") + tuple(str(d) for d in range(10))
        self.bos_id, self.plus_id, self.eq_id, self.digit0 = 1, 2, 3, 4
        D = self.n_digits
        self.seq_len = 3 * D + 4
        self._a0, self._plus, self._b0, self._eq = 1, D + 1, D + 2, 2 * D + 2

    def _operands(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        d = rng.integers(self.min_digits, self.n_digits + 1, size=n)
        lo = np.where(d > 1, 10 ** (d - 1), 0).astype(np.int64)
        hi = (10**d).astype(np.int64)
        return rng.integers(lo, hi), d

    def _digits(self, x: np.ndarray, width: int) -> np.ndarray:
        """int64 ``[n, width]`` digits of ``x``, most significant first."""
        p = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
        return (x[:, None] // p[None, :]) % 10

    def _generate(self, n: int, rng: np.random.Generator) -> TaskData:
        D = self.n_digits
        a, da = self._operands(n, rng)
        b, db = self._operands(n, rng)
        s = a + b
        ad, bd, sd = self._digits(a, D), self._digits(b, D), self._digits(s, D + 1)
        if self.reverse_answer:
            sd = sd[:, ::-1]
        T = self.seq_len
        tokens = np.zeros((n, T), dtype=np.int64)
        tokens[:, 0] = self.bos_id
        tokens[:, self._a0 : self._a0 + D] = self.digit0 + ad
        tokens[:, self._plus] = self.plus_id
        tokens[:, self._b0 : self._b0 + D] = self.digit0 + bd
        tokens[:, self._eq] = self.eq_id
        tokens[:, self._eq + 1 :] = self.digit0 + sd
        targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        targets[:, self._eq : T - 1] = tokens[:, self._eq + 1 :]
        # carries, units first
        ar, br = ad[:, ::-1], bd[:, ::-1]
        carry = np.zeros(n, dtype=np.int64)
        run = np.zeros(n, dtype=np.int64)
        longest = np.zeros(n, dtype=np.int64)
        n_carries = np.zeros(n, dtype=np.int64)
        for i in range(D):
            carry = (ar[:, i] + br[:, i] + carry >= 10).astype(np.int64)
            n_carries += carry
            run = np.where(carry == 1, run + 1, 0)
            longest = np.maximum(longest, run)
        meta = {
            "n_digits": np.maximum(da, db).astype(np.int64),
            "carries": n_carries,
            "carry_chain": longest,
            "n_steps_hint": longest + 1,
        }
        return TaskData(tokens, targets, meta, task=self.name)

    def _parse(self, tokens_row: np.ndarray) -> tuple[np.ndarray, int, int]:
        row = _as_row(tokens_row, self.seq_len, self.name)
        D = self.n_digits

        def number(ids: np.ndarray) -> int:
            v = 0
            for t in ids:
                d = int(t) - self.digit0
                if not 0 <= d <= 9:
                    raise SDIError(f"addition: expected a digit token, got id {int(t)} in {row.tolist()}.")
                v = 10 * v + d
            return v

        if row[0] != self.bos_id or row[self._plus] != self.plus_id or row[self._eq] != self.eq_id:
            raise SDIError(f"addition: malformed row {row.tolist()}.")
        a = number(row[self._a0 : self._a0 + D])
        b = number(row[self._b0 : self._b0 + D])
        return row, a, b

    def answer_positions(self, tokens_row: np.ndarray) -> np.ndarray:
        return np.arange(self._eq, self.seq_len - 1, dtype=np.int64)

    def answer(self, tokens_row: np.ndarray) -> np.ndarray:
        _, a, b = self._parse(tokens_row)
        digits = [int(c) for c in str(a + b).zfill(self.n_digits + 1)]
        if self.reverse_answer:
            digits = digits[::-1]
        return np.array([self.digit0 + d for d in digits], dtype=np.int64)

    def check(self, tokens_row: np.ndarray, predicted: np.ndarray) -> bool:
        pred = np.asarray(predicted).reshape(-1)
        want = self.answer(tokens_row)
        return pred.shape == want.shape and bool(np.all(pred == want))

    def render(self, tokens_row: np.ndarray, answer_ids: np.ndarray | None = None) -> str:
        row, a, b = self._parse(tokens_row)
        ans = self._answer_ids_of(row, answer_ids)
        chars = [self.token_str(t) for t in ans]
        if self.reverse_answer:
            chars = chars[::-1]
        text = "".join(chars)
        if all(c.isdigit() for c in chars):
            text = text.lstrip("0") or "0"
        return f"{a}+{b}={text}"


# --------------------------------------------------------------------------- sudoku 4x4

_ROW = np.arange(16) // 4
_COL = np.arange(16) % 4
_BOX = (_ROW // 2) * 2 + _COL // 2
_UNITS = np.array(
    [[c for c in range(16) if _ROW[c] == u] for u in range(4)]
    + [[c for c in range(16) if _COL[c] == u] for u in range(4)]
    + [[c for c in range(16) if _BOX[c] == u] for u in range(4)],
    dtype=np.int64,
)  # [12, 4]
_PEERS = (
    (_ROW[:, None] == _ROW[None, :]) | (_COL[:, None] == _COL[None, :]) | (_BOX[:, None] == _BOX[None, :])
) & ~np.eye(16, dtype=bool)  # [16, 16]
_PEER_LISTS = [tuple(int(d) for d in np.flatnonzero(_PEERS[c])) for c in range(16)]


class SudokuSolveResult(NamedTuple):
    """Result of :func:`solve_sudoku4`.

    Attributes:
        count: number of solutions found, capped at ``limit``.
        nodes: search nodes visited (one per recursive call), a measure of effort.
        solution: the first solution found (tuple of 16 values 1..4) or None.
    """

    count: int
    nodes: int
    solution: tuple[int, ...] | None


def solve_sudoku4(grid: Sequence[int], limit: int = 2) -> SudokuSolveResult:
    """Count solutions of a 4x4 Sudoku (2x2 boxes) by plain backtracking.

    Args:
        grid: 16 values in row-major order, 0 for a blank and 1..4 for a given.
        limit: stop once this many solutions are found (2 decides uniqueness).

    Cells are filled in row-major order, trying values 1..4; no propagation, so
    ``nodes`` reflects raw search effort.  Conflicting givens give count 0.
    """
    g = [int(v) for v in grid]
    if len(g) != 16 or any(not 0 <= v <= 4 for v in g):
        raise SDIError(f"solve_sudoku4: need 16 values in 0..4, got {list(grid)!r}.")
    for c in range(16):
        if g[c] and any(g[d] == g[c] for d in _PEER_LISTS[c]):
            return SudokuSolveResult(0, 0, None)
    blanks = [c for c in range(16) if g[c] == 0]
    count = 0
    nodes = 0
    first: tuple[int, ...] | None = None

    def rec(i: int) -> None:
        nonlocal count, nodes, first
        nodes += 1
        if i == len(blanks):
            count += 1
            if first is None:
                first = tuple(g)
            return
        c = blanks[i]
        for v in (1, 2, 3, 4):
            if all(g[d] != v for d in _PEER_LISTS[c]):
                g[c] = v
                rec(i + 1)
                g[c] = 0
                if count >= limit:
                    return

    rec(0)
    return SudokuSolveResult(count, nodes, first)


def sudoku4_is_valid_solution(grid: Sequence[int]) -> bool:
    """True iff ``grid`` (16 values) is a complete 4x4 Sudoku: every row, column and 2x2 box holds 1..4."""
    g = np.asarray(grid).reshape(-1)
    if g.shape != (16,):
        return False
    return all(sorted(int(v) for v in g[u]) == [1, 2, 3, 4] for u in _UNITS)


@lru_cache(maxsize=1)
def _all_grids() -> np.ndarray:
    out: list[list[int]] = []
    g = [0] * 16

    def rec(c: int) -> None:
        if c == 16:
            out.append(list(g))
            return
        for v in (1, 2, 3, 4):
            if all(g[d] != v for d in _PEER_LISTS[c] if d < c):
                g[c] = v
                rec(c + 1)
        g[c] = 0

    rec(0)
    arr = np.array(out, dtype=np.int64)
    arr.setflags(write=False)
    return arr


def all_sudoku4_grids() -> np.ndarray:
    """int64 ``[288, 16]``: every complete 4x4 Sudoku grid (values 1..4), enumerated by backtracking."""
    return _all_grids()


def _propagation_rounds(puzzles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Synchronous rounds of naked + hidden singles.

    Args:
        puzzles: int64 ``[N, 16]``, 0 = blank.
    Returns:
        rounds int64 ``[N]`` (rounds that made progress) and remaining int64 ``[N]``
        (blanks left when singles stall; 0 when solved).
    """
    g = puzzles.copy()
    n = g.shape[0]
    rounds = np.zeros(n, dtype=np.int64)
    vals = np.arange(1, 5)
    for _ in range(16):
        blank = g == 0
        if not blank.any():
            break
        onehot = (g[:, :, None] == vals).astype(np.int64)  # [N,16,4]
        used = np.einsum("cd,ndv->ncv", _PEERS.astype(np.int64), onehot) > 0
        cand = blank[:, :, None] & ~used  # [N,16,4]
        new = g.copy()
        naked = blank & (cand.sum(-1) == 1)
        new[naked] = cand[naked].argmax(-1) + 1
        ucand = cand[:, _UNITS, :]  # [N,12,4,4] (unit, cell-in-unit, value)
        single = ucand.sum(axis=2) == 1  # [N,12,4] value has exactly one place in the unit
        nn, uu, vv = np.nonzero(single)
        cells = _UNITS[uu, ucand[nn, uu, :, vv].argmax(-1)]
        new[nn, cells] = vv + 1
        progress = (new != g).any(axis=1)
        rounds += progress
        g = new
        if not progress.any():
            break
    return rounds, (g == 0).sum(axis=1)


class SudokuTask(Task):
    """4x4 Sudoku (2x2 boxes) with a unique solution.

    Layout (T = 34)::

        tokens:  <bos> g0 .. g15 <sep> s0 .. s15
        targets: -100 .. -100  s0 .. s15  -100
                 (answer positions 17 .. 32: the SEP and s0 .. s14)

    ``g`` is the puzzle in row-major order (``"1".."4"`` or ``"."`` for a
    blank), ``s`` the full solution.  Generation: a uniformly random complete
    grid (from the 288 grids enumerated by backtracking), then cells are
    blanked in random order, each removal kept only while the puzzle still has
    exactly one solution, until the target number of blanks (uniform in
    ``[min_blanks, max_blanks]``) is reached or no cell can be removed.

    meta: ``blanks``; ``search_nodes`` (nodes of the plain backtracking
    counter :func:`solve_sudoku4`, which proves uniqueness); ``difficulty``
    (= ``search_nodes``); ``prop_rounds`` (synchronous rounds of naked/hidden
    singles needed, -1 if singles stall); ``n_steps_hint`` (``prop_rounds``,
    or rounds-before-stall + remaining blanks when singles stall).

    Options:
        min_blanks: in [0, 12] (default 4).
        max_blanks: in [min_blanks, 12] (default 10).  At most 12 blanks are
            possible (a unique 4x4 puzzle needs at least 4 givens).
    """

    name = "sudoku"

    def __init__(self, min_blanks: int = 4, max_blanks: int = 10) -> None:
        self.min_blanks = _int_option("min_blanks", min_blanks, 0, 12)
        self.max_blanks = _int_option("max_blanks", max_blanks, self.min_blanks, 12)
        self.options = {"min_blanks": self.min_blanks, "max_blanks": self.max_blanks}
        self.vocab = (self.PAD, self.BOS, self.SEP, ".", "1", "2", "3", "4")
        self.bos_id, self.sep_id, self.blank_id, self.digit1 = 1, 2, 3, 4
        self.seq_len = 34

    def _generate(self, n: int, rng: np.random.Generator) -> TaskData:
        grids = _all_grids()
        sol = grids[rng.integers(0, len(grids), size=n)]  # [n,16]
        target = rng.integers(self.min_blanks, self.max_blanks + 1, size=n)
        order = np.argsort(rng.random((n, 16)), axis=1)
        rows = np.arange(n)
        given = np.ones((n, 16), dtype=bool)
        blanks = np.zeros(n, dtype=np.int64)
        chunk = 512
        for lo in range(0, n, chunk):
            sl = slice(lo, min(n, lo + chunk))
            match = grids[None, :, :] == sol[sl, None, :]  # [c,288,16]
            r = rows[sl]
            for j in range(16):
                c = order[sl, j]
                trial = given[sl].copy()
                trial[r - lo, c] = False
                count = (match | ~trial[:, None, :]).all(axis=2).sum(axis=1)
                ok = (count == 1) & (blanks[sl] < target[sl])
                given[r[ok], c[ok]] = False
                blanks[r[ok]] += 1
        puzzle = np.where(given, sol, 0)
        tokens = np.zeros((n, self.seq_len), dtype=np.int64)
        tokens[:, 0] = self.bos_id
        tokens[:, 1:17] = np.where(given, self.digit1 + sol - 1, self.blank_id)
        tokens[:, 17] = self.sep_id
        tokens[:, 18:34] = self.digit1 + sol - 1
        targets = np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        targets[:, 17:33] = tokens[:, 18:34]
        nodes = np.array([solve_sudoku4(p).nodes for p in puzzle], dtype=np.int64)
        rounds, remaining = _propagation_rounds(puzzle)
        prop_rounds = np.where(remaining == 0, rounds, -1)
        hint = rounds + remaining
        meta = {
            "blanks": blanks,
            "search_nodes": nodes,
            "difficulty": nodes.copy(),
            "prop_rounds": prop_rounds.astype(np.int64),
            "n_steps_hint": hint.astype(np.int64),
        }
        return TaskData(tokens, targets, meta, task=self.name)

    def _parse(self, tokens_row: np.ndarray) -> tuple[np.ndarray, list[int]]:
        row = _as_row(tokens_row, self.seq_len, self.name)
        if row[0] != self.bos_id or row[17] != self.sep_id:
            raise SDIError(f"sudoku: malformed row {row.tolist()}.")
        puzzle = []
        for t in row[1:17]:
            t = int(t)
            if t == self.blank_id:
                puzzle.append(0)
            elif self.digit1 <= t < self.digit1 + 4:
                puzzle.append(t - self.digit1 + 1)
            else:
                raise SDIError(f"sudoku: bad puzzle token id {t} in {row.tolist()}.")
        return row, puzzle

    def answer_positions(self, tokens_row: np.ndarray) -> np.ndarray:
        return np.arange(17, 33, dtype=np.int64)

    def answer(self, tokens_row: np.ndarray) -> np.ndarray:
        """Solution token ids from the backtracking solver (ValueError if the puzzle is not unique)."""
        _, puzzle = self._parse(tokens_row)
        res = solve_sudoku4(puzzle, limit=2)
        if res.count != 1:
            raise SDIError(f"sudoku: puzzle has {res.count if res.count < 2 else '>=2'} solutions.")
        return np.array([self.digit1 + v - 1 for v in res.solution], dtype=np.int64)

    def check(self, tokens_row: np.ndarray, predicted: np.ndarray) -> bool:
        """Predicted grid is a valid complete Sudoku that agrees with every given (no solver involved)."""
        _, puzzle = self._parse(tokens_row)
        pred = np.asarray(predicted).reshape(-1)
        if pred.shape != (16,):
            return False
        vals = pred.astype(np.int64) - self.digit1 + 1
        if np.any((vals < 1) | (vals > 4)):
            return False
        if any(p and p != int(v) for p, v in zip(puzzle, vals)):
            return False
        return sudoku4_is_valid_solution(vals)

    def render(self, tokens_row: np.ndarray, answer_ids: np.ndarray | None = None) -> str:
        """Puzzle and solution side by side, e.g.::

            1 . | . 4    1 2 | 3 4
            . 4 | . .    3 4 | 1 2
            ----+----    ----+----
            ...
        """
        row, _ = self._parse(tokens_row)
        ans = self._answer_ids_of(row, answer_ids)
        left = [self.token_str(t) for t in row[1:17]]
        right = [self.token_str(t) for t in ans]

        def line(cells: list[str], r: int) -> str:
            c = cells[4 * r : 4 * r + 4]
            return f"{c[0]} {c[1]} | {c[2]} {c[3]}"

        out = []
        for r in range(4):
            if r == 2:
                out.append("----+----    ----+----")
            out.append(f"{line(left, r)}    {line(right, r)}")
        return "\n".join(out)


# --------------------------------------------------------------------------- registry

TASKS: dict[str, type[Task]] = {
    "parity": ParityTask,
    "pointer": PointerTask,
    "addition": AdditionTask,
    "sudoku": SudokuTask,
}


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name.

    Args:
        name: one of ``TASKS`` ("parity", "pointer", "addition", "sudoku").
        **options: the task's constructor options (see each class).

    Raises:
        ValueError (:class:`~sdi_core.factors.SDIError`): unknown name (the
            message lists the names), unknown option (lists the allowed ones)
            or an option out of range (names it and its allowed range).
    """
    key = str(name).strip().lower()
    if key not in TASKS:
        raise SDIError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}.")
    cls = TASKS[key]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p != "self"]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise SDIError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for task {key!r}; "
            f"allowed options: {', '.join(allowed)}."
        )
    return cls(**options)
