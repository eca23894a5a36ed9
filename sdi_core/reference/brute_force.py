"""Exact float64 references, by brute force, in plain NumPy loops.

These are deliberately simple: they materialise every per-example, per-step
gradient and compute SDI, TracIn and step matrices with explicit sums.  They
are the ground truth of the test-suite and the conformance suite, and the
place to read the definitions.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .._array import to_numpy
from ..factors import FactorUse, ParamInfo, SDIError


def use_gradient(use: FactorUse, param: ParamInfo) -> np.ndarray:
    """Per-example gradient of one use, ``[B, *param.shape]`` (float64, canonical frame)."""
    g = to_numpy(use.grad_output).astype(np.float64)
    a = None if use.activation is None else to_numpy(use.activation)
    if use.kind == "dense":
        return g.reshape((g.shape[0],) + param.shape)
    if g.ndim == 2:
        g = g[:, None, :]
        if a is not None and a.ndim == 2 and use.kind != "embedding":
            a = a[:, None, :]
    b = g.shape[0]
    out = np.zeros((b,) + param.shape)
    if use.kind == "bias":
        lo, hi = use.row_slice or (0, param.shape[0])
        out[:, lo:hi] = g.sum(axis=1)
    elif use.kind == "scale":
        lo, hi = use.row_slice or (0, param.shape[0])
        out[:, lo:hi] = (a.astype(np.float64) * g).sum(axis=1)
    elif use.kind == "linear":
        lo, hi = use.row_slice or (0, param.shape[0])
        out[:, lo:hi] = np.einsum("bto,bti->boi", g, a.astype(np.float64))
    elif use.kind == "embedding":
        ids = a if a.ndim == 2 else a[:, None]
        for bi in range(b):
            for t in range(ids.shape[1]):
                if use.ignore_index is not None and ids[bi, t] == use.ignore_index:
                    continue
                out[bi, ids[bi, t]] += g[bi, t]
    else:
        raise SDIError(f"unknown use kind {use.kind!r}")
    return out


def per_step_gradients(
    uses: Iterable[FactorUse], params: Sequence[ParamInfo], batch_size: int, steps: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Materialise ``phi_s`` for every parameter: ``{name: [B, S_g, *shape]}`` (float64).

    ``steps`` gives the number of steps of every group.
    """
    by_name = {p.name: p for p in params}
    out = {p.name: np.zeros((batch_size, steps[p.group]) + p.shape) for p in params}
    for u in uses:
        p = by_name[u.param]
        out[u.param][:, u.step] += use_gradient(u, p)
    return out


def exact_sdi(
    train_grads: Sequence[Mapping[str, np.ndarray]],
    query_grads: Sequence[Mapping[str, np.ndarray]],
    etas: Sequence[float],
    params: Sequence[ParamInfo],
    group_order: Sequence[str],
) -> dict[str, np.ndarray]:
    """Exact SDI by explicit sums over checkpoints, parameters and steps.

    Args:
        train_grads, query_grads: one dict per checkpoint from
            :func:`per_step_gradients` (``[N, S_g, *shape]`` per parameter).
        etas: learning-rate weight per checkpoint.
        params: the parameters (with groups).
        group_order: slot order of the groups.

    Returns:
        dict with ``trajectory [Ntr, Nq, Sq]``, ``tracin [Ntr, Nq]``,
        ``train_trajectory [Ntr, Nq, Str]``, ``step_matrix [Ntr, Nq, Str, Sq]``.
    """
    first_tr, first_q = train_grads[0], query_grads[0]
    n_tr = next(iter(first_tr.values())).shape[0]
    n_q = next(iter(first_q.values())).shape[0]

    def slots(grads):
        start, table = 0, {}
        for g in group_order:
            members = [p for p in params if p.group == g]
            s = grads[members[0].name].shape[1] if members else 0
            table[g] = (start, s)
            start += s
        return table, start

    tr_slots, s_tr = slots(first_tr)
    q_slots, s_q = slots(first_q)
    step_matrix = np.zeros((n_tr, n_q, s_tr, s_q))
    for tr_k, q_k, eta in zip(train_grads, query_grads, etas):
        for p in params:
            a = tr_k[p.name].reshape(n_tr, tr_k[p.name].shape[1], -1)
            b = q_k[p.name].reshape(n_q, q_k[p.name].shape[1], -1)
            t0, ts = tr_slots[p.group]
            q0, qs = q_slots[p.group]
            for s in range(ts):
                for t in range(qs):
                    step_matrix[:, :, t0 + s, q0 + t] += eta * (a[:, s, :] @ b[:, t, :].T)
    return {
        "step_matrix": step_matrix,
        "trajectory": step_matrix.sum(axis=2),
        "train_trajectory": step_matrix.sum(axis=3),
        "tracin": step_matrix.sum(axis=(2, 3)),
    }


def countsketch_loop(vec: np.ndarray, h: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    """CountSketch by an explicit loop: ``out[h[j]] += s[j] * vec[j]``."""
    out = np.zeros(m)
    for j in range(vec.shape[0]):
        out[h[j]] += s[j] * vec[j]
    return out


def tensorsketch_by_definition(x: np.ndarray, h_rows, s_rows, h_cols, s_cols, m: int) -> np.ndarray:
    """TensorSketch of a matrix ``x [R, C]`` as the CountSketch of ``vec(x)`` with the combined hash.

    Combined hash ``(h_rows[i] + h_cols[j]) mod m`` and sign ``s_rows[i] * s_cols[j]``.
    """
    out = np.zeros(m)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[(h_rows[i] + h_cols[j]) % m] += s_rows[i] * s_cols[j] * x[i, j]
    return out


def tensorsketch_by_fft(g: np.ndarray, a: np.ndarray, h_rows, s_rows, h_cols, s_cols, m: int) -> np.ndarray:
    """TensorSketch of ``g a^T`` for vectors ``g [R]``, ``a [C]`` by the FFT identity."""
    cs_g = countsketch_loop(g, h_rows, s_rows, m)
    cs_a = countsketch_loop(a, h_cols, s_cols, m)
    return np.fft.irfft(np.fft.rfft(cs_g) * np.fft.rfft(cs_a), n=m)
