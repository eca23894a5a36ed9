"""The example-axis tracker (sdi_torch.example_axis) on sequences of operations, with no tensor in sight.

Every expectation is derived by hand from the operation's semantics; a few are checked against real torch
tensors holding their example index (the last test), which is the independent ground truth.
"""

from __future__ import annotations

import pytest

from sdi_torch.example_axis import Axis, Lost, Tensor, einsum_axis, index_axis, propagate, reshape_axis

B, T, D = 5, 6, 4


def run(op, *args, out, **kwargs):
    (p,) = propagate(op, args, kwargs, [out])
    return p


def batch(shape=(B, T, D), prov=Axis(0)):
    return Tensor(tuple(shape), prov)


def test_transposes_and_permutes_move_the_axis():
    x = batch()
    assert run("transpose", x, 0, 1, out=(T, B, D)) == Axis(1)
    assert run("transpose", x, 1, 2, out=(B, D, T)) == Axis(0)
    assert run("permute", x, (2, 0, 1), out=(D, B, T)) == Axis(1)
    assert run(".mT", Tensor((T, B, D), Axis(1)), out=(T, D, B)) == Axis(2)
    assert run("movedim", x, 0, -1, out=(T, D, B)) == Axis(2)


@pytest.mark.parametrize("shape,ax,new,want", [
    ((B, T, D), Axis(0), (B * T, D), Axis(0, 1, T)),  # example-major rows
    ((T, B, D), Axis(1), (T * B, D), Axis(0, T, 1)),  # sequence-first rows: examples are the inner digit
    ((T * B, D), Axis(0, T, 1), (T, B, D), Axis(1)),  # and back
    ((B, T, D), Axis(0), (B, T * D), Axis(0)),
    ((B, T, D), Axis(0), (B, T, 2, 2), Axis(0)),
    ((B, T, D), Axis(0), (1, B, T, D), Axis(1)),
])
def test_reshapes_follow_the_example_digit(shape, ax, new, want):
    assert reshape_axis(shape, new, ax) == want


def test_a_reshape_that_splits_the_example_axis_is_lost():
    got = run("reshape", batch((6, 4)), out=(3, 8))
    assert isinstance(got, Lost) and "splits the example axis" in got.why


def test_reductions_and_ops_along_the_example_axis_lose_it():
    x = batch()
    assert run("sum", x, 1, out=(B, D)) == Axis(0)
    assert run("mean", Tensor((T, B, D), Axis(1)), 0, out=(B, D)) == Axis(0)
    assert isinstance(run("sum", x, 0, out=(T, D)), Lost)
    assert isinstance(run("sum", x, out=()), Lost)
    assert run("softmax", x, -1, out=(B, T, D)) == Axis(0)
    assert isinstance(run("softmax", x, 0, out=(B, T, D)), Lost)
    assert isinstance(run("cumsum", Tensor((T, B), Axis(1)), 1, out=(T, B)), Lost)


def test_broadcasting_combines_axes_and_catches_conflicts():
    a, b = batch(), Tensor((D,), None)
    assert run("add", a, b, out=(B, T, D)) == Axis(0)
    # B == T: a batch-first and a sequence-first tensor of the same shape must not be combined silently
    sq = (B, B, D)
    got = run("add", Tensor(sq, Axis(0)), Tensor(sq, Axis(1)), out=sq)
    assert isinstance(got, Lost) and "different axes" in got.why


def test_cat_stack_split():
    x = batch()
    assert run("cat", [x, x], -1, out=(B, T, 2 * D)) == Axis(0)
    assert isinstance(run("cat", [x, x], 0, out=(2 * B, T, D)), Lost)
    assert run("stack", [x, x], 0, out=(2, B, T, D)) == Axis(1)
    got = propagate("chunk", (x, 2, -1), {}, [(B, T, 2), (B, T, 2)])
    assert got == [Axis(0), Axis(0)]
    assert all(isinstance(p, Lost) for p in propagate("split", (x, 2, 0), {}, [(2, T, D), (3, T, D)]))


def test_indexing():
    shape, ax = (B, T, D), Axis(0)
    assert index_axis(shape, (slice(None), -1), ax) == Axis(0)
    assert index_axis(shape, (None, Ellipsis, 0), ax) == Axis(1)
    assert index_axis((T, B, D), (slice(2, 4),), Axis(1)) == Axis(1)
    assert isinstance(index_axis(shape, (slice(0, 2),), ax), str)
    assert isinstance(index_axis(shape, (0,), ax), str)
    ids = Tensor((3,), None)
    assert index_axis(shape, (slice(None), ids), ax) == Axis(0)
    assert index_axis((T, D, B), (ids, slice(None), slice(None)), Axis(2)) == Axis(2)


def test_matmul_and_einsum():
    x = batch()
    w = Tensor((D, 3), None)
    assert run("matmul", x, w, out=(B, T, 3)) == Axis(0)
    xt = Tensor((T, B, D), Axis(1))
    assert run("matmul", xt, w, out=(T, B, 3)) == Axis(1)  # the rows axis of a 3-D matmul
    assert isinstance(run("matmul", Tensor((D, B), Axis(1)), Tensor((B, 3), Axis(0)), out=(D, 3)), Lost)
    assert einsum_axis("btd,de->bte", [(B, T, D), (D, 3)], [Axis(0), None]) == Axis(0)
    assert einsum_axis("tbd,de->bte", [(T, B, D), (D, 3)], [Axis(1), None]) == Axis(0)
    assert einsum_axis("...d,de->...e", [(T, B, D), (D, 3)], [Axis(1), None]) == Axis(1)
    assert isinstance(einsum_axis("btd,btd->td", [(B, T, D)] * 2, [Axis(0)] * 2), str)


def test_unknown_ops_and_lost_inputs_propagate_lost_with_the_first_cause():
    x = batch()
    got = run("my_custom_op", x, out=(B, T, D))
    assert isinstance(got, Lost) and got.op == "my_custom_op"
    later = run("add", Tensor((B, T, D), got), x, out=(B, T, D))
    assert later is got
    assert run("add", Tensor((D,)), Tensor((D,)), out=(D,)) is None  # no batch in, none out


def test_losses_keep_the_examples_only_with_reduction_none():
    logits, y = Tensor((B, 7, T), Axis(0)), Tensor((B, T), Axis(0))
    assert run("cross_entropy", logits, y, reduction="none", out=(B, T)) == Axis(0)
    assert isinstance(run("cross_entropy", logits, y, out=()), Lost)
    flat, yf = Tensor((T * B, 7), Axis(0, T, 1)), Tensor((T * B,), Axis(0, T, 1))
    assert run("cross_entropy", flat, yf, reduction="none", out=(T * B,)) == Axis(0, T, 1)


def test_against_real_tensors_holding_their_example_index():
    torch = pytest.importorskip("torch")
    ex_index = torch.arange(B, dtype=torch.float64).view(B, 1, 1).expand(B, T, D).contiguous()
    chains = [
        lambda x: x.transpose(0, 1).reshape(T * B, D),
        lambda x: x.permute(2, 1, 0).flatten(1),
        lambda x: x.reshape(B * T, D).view(B, T * D)[:, None],
        lambda x: torch.cat([x, x], -1).transpose(1, 2).unflatten(1, (2, D)),
    ]
    import sdi_torch.example_axis as ex

    for chain in chains:
        # follow the ops one at a time through the tracker, with torch's own op names, arguments and shapes
        provs = {id(ex_index): Axis(0)}
        with _Recorder() as rec:
            out = chain(ex_index)

        def info(o):
            return ex.Tensor(tuple(o.shape), provs.get(id(o))) if isinstance(o, torch.Tensor) else o

        for name, args, kwargs, result in rec.calls:
            (provs[id(result)],) = ex.propagate(name, tuple(_map(info, a) for a in args),
                                                {k: _map(info, v) for k, v in kwargs.items()}, [tuple(result.shape)])
        prov = provs[id(out)]
        assert isinstance(prov, Axis), (chain, prov)
        moved = out.unflatten(prov.dim, (prov.outer, B, prov.inner)).movedim(prov.dim + 1, 0).reshape(B, -1)
        want = torch.arange(B, dtype=torch.float64)[:, None].expand_as(moved)
        assert torch.equal(moved, want), (chain, prov)


def _map(f, a):
    if isinstance(a, (list, tuple)):
        return type(a)(_map(f, x) for x in a)
    return f(a)


class _Recorder:
    """Records (name, args, kwargs, output) of each top-level torch call."""

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        rec = self
        self.calls = []

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = getattr(func, "__name__", "?")
                if isinstance(out, torch.Tensor):
                    rec.calls.append((name, args, kwargs or {}, out))
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
