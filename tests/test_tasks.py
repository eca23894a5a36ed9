"""Tests of the algorithmic task generators in sdi_core.app.tasks."""
from __future__ import annotations

import re

import numpy as np
import pytest

from sdi_core.app.tasks import (
    IGNORE_INDEX,
    TASKS,
    AdditionTask,
    ParityTask,
    PointerTask,
    SudokuTask,
    Task,
    TaskData,
    all_sudoku4_grids,
    get_task,
    solve_sudoku4,
    sudoku4_is_valid_solution,
)

# One default and one non-default configuration of every task.
CONFIGS = [
    ("parity", {}),
    ("parity", {"min_len": 5, "max_len": 16}),
    ("pointer", {}),
    ("pointer", {"n_nodes": 12, "max_hops": 6, "permutation": False, "shuffle_pairs": False}),
    ("addition", {}),
    ("addition", {"n_digits": 5, "min_digits": 2, "reverse_answer": False}),
    ("sudoku", {}),
    ("sudoku", {"min_blanks": 8, "max_blanks": 12}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)]


def _answer_ids(row_targets: np.ndarray) -> np.ndarray:
    return row_targets[row_targets != IGNORE_INDEX]


@pytest.fixture(scope="module", params=CONFIGS, ids=IDS)
def task_and_data(request):
    name, opts = request.param
    task = get_task(name, **opts)
    return task, task.sample(300, seed=123)


# --------------------------------------------------------------------------- structure


def test_registry():
    assert set(TASKS) == {"parity", "pointer", "addition", "sudoku"}
    for name, cls in TASKS.items():
        t = get_task(name)
        assert isinstance(t, cls) and isinstance(t, Task) and t.name == name
        assert t.vocab[0] == "<pad>" and t.pad_id == 0
        assert t.vocab_size == len(t.vocab) == len(set(t.vocab))


def test_shapes_dtypes_vocab(task_and_data):
    task, d = task_and_data
    assert isinstance(d, TaskData) and len(d) == 300 and d.task == task.name
    assert d.tokens.shape == d.targets.shape == (300, task.seq_len)
    assert d.tokens.dtype == np.int64 and d.targets.dtype == np.int64
    assert d.tokens.min() >= 0 and d.tokens.max() < task.vocab_size
    t = d.targets[d.targets != IGNORE_INDEX]
    assert t.min() >= 0 and t.max() < task.vocab_size
    for k, v in d.meta.items():
        assert v.shape == (300,), k
    assert "n_steps_hint" in d.meta


def test_targets_only_at_answer_positions(task_and_data):
    task, d = task_and_data
    for i in range(len(d)):
        row, tgt = d.tokens[i], d.targets[i]
        pos = task.answer_positions(row)
        mask = np.zeros(task.seq_len, dtype=bool)
        mask[pos] = True
        assert np.all(tgt[~mask] == IGNORE_INDEX)
        # next-token convention: target at t is the token at t + 1
        np.testing.assert_array_equal(tgt[pos], row[pos + 1])
        np.testing.assert_array_equal(d.answer_mask[i], mask)


def test_labels_correct_by_independent_checker(task_and_data):
    task, d = task_and_data
    for i in range(len(d)):
        row = d.tokens[i]
        ans = _answer_ids(d.targets[i])
        assert task.check(row, ans), task.render(row)
        np.testing.assert_array_equal(task.answer(row), ans)
    assert task.check_batch(d, d.targets.clip(min=0)).all()


def test_checker_rejects_wrong_answers(task_and_data):
    task, d = task_and_data
    rng = np.random.default_rng(0)
    for i in range(len(d)):
        row = d.tokens[i]
        ans = _answer_ids(d.targets[i]).copy()
        j = rng.integers(len(ans))
        wrong = ans.copy()
        wrong[j] = (ans[j] + 1 + rng.integers(task.vocab_size - 1)) % task.vocab_size
        assert not task.check(row, wrong)
        assert not task.check(row, ans[:-1])  # wrong length
        # the checker reads the input, not the row's stored answer: corrupting
        # the stored answer in the row does not change what is correct
        bad_row = row.copy()
        bad_row[task.answer_positions(row) + 1] = wrong
        assert task.check(bad_row, ans) and not task.check(bad_row, wrong)


def test_accuracy_and_correct(task_and_data):
    task, d = task_and_data
    V = task.vocab_size
    pred = np.where(d.targets == IGNORE_INDEX, 0, d.targets)
    logits = np.eye(V)[pred] + 0.01 * np.random.default_rng(1).random((*pred.shape, V))
    assert task.accuracy(d, pred) == 1.0
    assert task.accuracy(d, logits) == 1.0
    # non-answer positions are ignored
    noisy = np.where(d.answer_mask, pred, (pred + 1) % V)
    assert task.accuracy(d, noisy) == 1.0
    # break the first answer position of half the rows
    broken = pred.copy()
    first = d.answer_mask.argmax(axis=1)
    rows = np.arange(0, len(d), 2)
    broken[rows, first[rows]] = (broken[rows, first[rows]] + 1) % V
    assert task.accuracy(d, broken) == pytest.approx(1 - len(rows) / len(d))
    np.testing.assert_array_equal(task.correct(d, broken), task.check_batch(d, broken))
    with pytest.raises(ValueError):
        task.accuracy(d, pred[:, :-1])


def test_sample_deterministic(task_and_data):
    task, d = task_and_data
    d2 = task.sample(300, seed=123)
    np.testing.assert_array_equal(d.tokens, d2.tokens)
    np.testing.assert_array_equal(d.targets, d2.targets)
    assert not np.array_equal(d.tokens, task.sample(300, seed=124).tokens)


def test_subset_and_concat(task_and_data):
    task, d = task_and_data
    s = d.subset([3, 1, 4])
    assert len(s) == 3
    np.testing.assert_array_equal(s.tokens, d.tokens[[3, 1, 4]])
    for k in d.meta:
        np.testing.assert_array_equal(s.meta[k], d.meta[k][[3, 1, 4]])
    m = np.zeros(len(d), dtype=bool)
    m[:5] = True
    assert len(d.subset(m)) == 5 and len(d.subset(slice(0, 7))) == 7 and len(d.subset([])) == 0
    c = TaskData.concat([d.subset(slice(0, 10)), d.subset(slice(10, 30))])
    np.testing.assert_array_equal(c.tokens, d.tokens[:30])


# --------------------------------------------------------------------------- splits


def _input_set(task, data):
    return {r.tobytes() for r in task.input_keys(data)}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_deterministic_disjoint(name):
    task = get_task(name)
    tr, te = task.splits(400, 100, seed=7)
    tr2, te2 = task.splits(400, 100, seed=7)
    assert len(tr) == 400 and len(te) == 100
    np.testing.assert_array_equal(tr.tokens, tr2.tokens)
    np.testing.assert_array_equal(te.tokens, te2.tokens)
    for k in tr.meta:
        np.testing.assert_array_equal(tr.meta[k], tr2.meta[k])
    tr3, te3 = task.splits(400, 100, seed=8)
    assert not np.array_equal(tr.tokens, tr3.tokens)
    assert not np.array_equal(te.tokens, te3.tokens)
    a, b = _input_set(task, tr), _input_set(task, te)
    assert len(a) == 400 and len(b) == 100  # deduplicated
    assert not a & b


def test_splits_small_space_stays_disjoint():
    task = ParityTask(min_len=1, max_len=3)  # 2 + 4 + 8 = 14 distinct inputs
    tr, te = task.splits(50, 6, seed=0)
    assert len(tr) == 50 and len(te) == 6
    a, b = _input_set(task, tr), _input_set(task, te)
    assert len(b) == 6 and len(a) == 8 and not a & b  # train repeats the 8 remaining inputs
    with pytest.raises(ValueError, match="distinct"):
        task.splits(10, 14, seed=0)
    tr0, te0 = task.splits(0, 14, seed=0)
    assert len(tr0) == 0 and len(_input_set(task, te0)) == 14
    one = ParityTask(min_len=1, max_len=1)  # 2 inputs: one for test, the other repeated in train
    tr1, te1 = one.splits(7, 1, seed=0)
    assert len(tr1) == 7 and len(_input_set(one, tr1)) == 1
    assert not _input_set(one, tr1) & _input_set(one, te1)


# --------------------------------------------------------------------------- per task


def test_parity_layout_and_render():
    task = ParityTask()
    d = task.sample(300, seed=0)
    assert task.seq_len == task.max_len + 3
    for i in range(len(d)):
        row, n = d.tokens[i], int(d.meta["length"][i])
        assert task.min_len <= n <= task.max_len
        assert row[0] == task.bos_id and row[n + 1] == task.sep_id
        assert np.all(row[n + 3 :] == task.pad_id)
        text = task.render(row)
        m = re.fullmatch(r"([01]+) -> ([01])", text)
        assert m and len(m.group(1)) == n
        assert int(m.group(2)) == m.group(1).count("1") % 2
        np.testing.assert_array_equal(task.answer_positions(row), [n + 1])
    assert set(np.unique(d.meta["length"])) == set(range(task.min_len, task.max_len + 1))


def test_pointer_render_and_hops():
    task = PointerTask(n_nodes=6, max_hops=5)
    d = task.sample(300, seed=0)
    assert set(np.unique(d.meta["hops"])) == set(range(1, 6))
    for i in range(len(d)):
        text = task.render(d.tokens[i])
        m = re.fullmatch(r"(\d+) hops? from (\d+): ((?:\d+>\d+ ?)+) -> (\d+)", text)
        assert m, text
        k, x = int(m.group(1)), int(m.group(2))
        assert k == d.meta["hops"][i]
        f = dict(tuple(map(int, p.split(">"))) for p in m.group(3).split())
        assert sorted(f) == list(range(6)) and sorted(f.values()) == list(range(6))  # permutation
        for _ in range(k):
            x = f[x]
        assert x == int(m.group(4))


def test_addition_render_and_layout():
    for rev in (True, False):
        task = AdditionTask(n_digits=3, reverse_answer=rev)
        d = task.sample(300, seed=0)
        assert task.seq_len == 13
        for i in range(len(d)):
            text = task.render(d.tokens[i])
            m = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", text)
            assert m, text
            a, b, c = map(int, m.groups())
            assert a + b == c and a < 1000 and b < 1000
            assert text == f"{a}+{b}={a + b}"
            digits = "".join(task.token_str(t) for t in _answer_ids(d.targets[i]))
            assert digits == (str(c).zfill(4)[::-1] if rev else str(c).zfill(4))
        np.testing.assert_array_equal(task.answer_positions(d.tokens[0]), [8, 9, 10, 11])
    assert (d.meta["carry_chain"] <= d.meta["carries"]).all()


def test_sudoku_unique_and_valid():
    task = SudokuTask(min_blanks=4, max_blanks=12)
    d = task.sample(300, seed=5)
    blank_tok = task.token_id(".")
    for i in range(len(d)):
        row = d.tokens[i]
        puzzle = [0 if t == blank_tok else int(t) - task.digit1 + 1 for t in row[1:17]]
        res = solve_sudoku4(puzzle, limit=2)
        assert res.count == 1
        sol = _answer_ids(d.targets[i]) - task.digit1 + 1
        np.testing.assert_array_equal(res.solution, sol)
        assert sudoku4_is_valid_solution(sol)
        assert all(p in (0, s) for p, s in zip(puzzle, sol))
        nb = puzzle.count(0)
        assert nb == d.meta["blanks"][i] and 4 <= nb <= 12
        assert d.meta["search_nodes"][i] == res.nodes == d.meta["difficulty"][i]
    assert d.meta["blanks"].max() >= 11 and len(np.unique(d.meta["blanks"])) >= 6
    assert (d.meta["n_steps_hint"] >= 1).all()


def test_sudoku_puzzles_minimal_when_below_target():
    # a puzzle with fewer blanks than asked for must be minimal: blanking any
    # further given makes the solution non-unique
    task = SudokuTask(min_blanks=12, max_blanks=12)
    d = task.sample(40, seed=2)
    blank_tok = task.token_id(".")
    for i in range(len(d)):
        puzzle = [0 if t == blank_tok else int(t) - task.digit1 + 1 for t in d.tokens[i, 1:17]]
        if puzzle.count(0) == 12:
            continue
        for c in range(16):
            if puzzle[c]:
                q = list(puzzle)
                q[c] = 0
                assert solve_sudoku4(q).count == 2


def test_sudoku_solver_against_enumeration():
    grids = all_sudoku4_grids()
    assert grids.shape == (288, 16) and len({g.tobytes() for g in grids}) == 288
    assert all(sudoku4_is_valid_solution(g) for g in grids)
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = grids[rng.integers(288)]
        keep = rng.random(16) < rng.uniform(0.1, 0.6)
        puzzle = np.where(keep, g, 0)
        n_true = int(np.all((grids == g) | ~keep, axis=1).sum())
        assert solve_sudoku4(puzzle, limit=1000).count == n_true
        assert solve_sudoku4(puzzle, limit=2).count == min(n_true, 2)
    # conflicting givens -> no solution
    assert solve_sudoku4([1, 1] + [0] * 14).count == 0
    assert not sudoku4_is_valid_solution([1, 2, 3, 4] * 4)


def test_sudoku_check_rejects_invalid_grids():
    task = SudokuTask()
    d = task.sample(50, seed=9)
    for i in range(len(d)):
        row, ans = d.tokens[i], _answer_ids(d.targets[i])
        swapped = ans.copy()
        swapped[[0, 1]] = swapped[[1, 0]]  # breaks columns
        assert not task.check(row, swapped)
        assert not task.check(row, np.full(16, task.blank_id))
    text = task.render(d.tokens[0])
    lines = text.splitlines()
    assert len(lines) == 5 and "|" in lines[0] and lines[2].startswith("----+----")


def test_render_with_predicted_answer():
    task = AdditionTask(n_digits=2)
    d = task.sample(5, seed=0)
    row = d.tokens[0]
    pred = task.answer(row).copy()
    pred[0] = task.token_id("9") if pred[0] != task.token_id("9") else task.token_id("8")
    assert task.render(row, pred) != task.render(row)
    p = ParityTask()
    r = p.sample(1, seed=0).tokens[0]
    assert p.render(r, [p.token_id("<sep>")]).endswith("-> <sep>")


# --------------------------------------------------------------------------- errors


def test_get_task_errors():
    with pytest.raises(ValueError, match="parity.*pointer|addition.*sudoku"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"max_len.*\[2, 256\]"):
        get_task("parity", max_len=1)
    with pytest.raises(ValueError, match="min_len"):
        get_task("parity", min_len=0)
    with pytest.raises(ValueError, match=r"n_nodes.*\[2, 64\]"):
        get_task("pointer", n_nodes=1)
    with pytest.raises(ValueError, match="max_hops"):
        get_task("pointer", max_hops=0)
    with pytest.raises(ValueError, match="min_hops"):
        get_task("pointer", min_hops=5, max_hops=3)
    with pytest.raises(ValueError, match="permutation"):
        get_task("pointer", permutation=1)
    with pytest.raises(ValueError, match=r"n_digits.*\[1, 15\]"):
        get_task("addition", n_digits=16)
    with pytest.raises(ValueError, match="n_digits"):
        get_task("addition", n_digits=2.5)
    with pytest.raises(ValueError, match=r"max_blanks.*12"):
        get_task("sudoku", max_blanks=13)
    with pytest.raises(ValueError, match="bogus.*allowed options: min_len, max_len"):
        get_task("parity", bogus=3)
    assert get_task(" Parity ", max_len=4).seq_len == 7


def test_malformed_rows_raise():
    task = ParityTask()
    with pytest.raises(ValueError):
        task.render(np.zeros(task.seq_len, dtype=np.int64))
    with pytest.raises(ValueError):
        task.check(np.zeros(3, dtype=np.int64), [0])
