"""The SDI report: figures and text about which training examples shaped which loop steps.

Framework-neutral: everything comes in as NumPy arrays and strings
(:class:`ReportData`), so any backend's results can be reported.  Figures are
drawn with matplotlib's object-oriented API on the Agg canvas, imported inside
the functions that draw (``import sdi_core`` does not import matplotlib, and
no global matplotlib state is changed).

:func:`write_report` writes into a folder:

- ``report.md`` and ``report.html`` (the same content; the HTML embeds the
  PNGs by relative path, so the folder can be moved as a whole),
- one PNG per figure (see :data:`FIGURES`),
- ``summary.json`` (the numbers of the report) and ``influence.npz`` (the
  trajectory arrays, for further analysis).

Notation: ``I(i, j, t)`` is the influence of training example ``i`` on query
``j`` through query slot ``t`` (a loop step, or the prelude/coda slot);
``sum_t I(i, j, t)`` is TracIn.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..factors import SDIError
from ..metrics import compare as _compare, spearman as _spearman

__all__ = [
    "FIGURES",
    "ExactComparison",
    "Extrapolation",
    "TrainingCurve",
    "ReportData",
    "ReportFiles",
    "compare_sketch_exact",
    "step_profile",
    "top_train_examples",
    "loop_slots",
    "write_report",
]

FIGURES = {
    "training": "training.png",
    "query": "query_{j}.png",
    "step_profile": "step_profile.png",
    "sketch_vs_exact": "sketch_vs_exact.png",
    "difficulty": "late_step_vs_difficulty.png",
    "extrapolation": "extra_steps.png",
}
"""File names of the figures (``query_{j}`` is formatted with the query's position)."""

_DPI = 110
_PROFILE_KEYS = ("length", "hops", "n_digits", "blanks", "n_steps_hint")


# --------------------------------------------------------------------------- inputs


@dataclass
class ExactComparison:
    """Sketched and exact query-step trajectories of the same train x query subset.

    Attributes:
        sketch: ``[n_train, n_query, S]`` trajectory from sketched features.
        exact: ``[n_train, n_query, S]`` trajectory from exact features
            (``sdi_core.Exact()``), same examples and checkpoints.
        train_index: ``[n_train]`` positions of the subset's rows in the report's train set.
        query_index: ``[n_query]`` positions of the subset's columns in the report's queries.
        sketch_dim: the sketch dimension, for the captions.
    """

    sketch: np.ndarray
    exact: np.ndarray
    train_index: np.ndarray
    query_index: np.ndarray
    sketch_dim: int | None = None

    def __post_init__(self) -> None:
        self.sketch = np.asarray(self.sketch, dtype=np.float64)
        self.exact = np.asarray(self.exact, dtype=np.float64)
        if self.sketch.ndim != 3 or self.sketch.shape != self.exact.shape:
            raise SDIError(
                f"ExactComparison: sketch and exact trajectories must both be [n_train, n_query, S]; got "
                f"{self.sketch.shape} and {self.exact.shape}."
            )
        self.train_index = np.asarray(self.train_index, dtype=np.int64)
        self.query_index = np.asarray(self.query_index, dtype=np.int64)
        if self.train_index.shape != (self.sketch.shape[0],) or self.query_index.shape != (self.sketch.shape[1],):
            raise SDIError(
                f"ExactComparison: train_index {self.train_index.shape} / query_index {self.query_index.shape} "
                f"do not match the trajectories' first two axes {self.sketch.shape[:2]}."
            )


@dataclass
class Extrapolation:
    """The query-step trajectory when queries run more loop steps than training did.

    Attributes:
        trajectory: ``[N_train, N_query, S_q]`` at ``query_tau`` loop steps
            (same train and query examples as the main trajectory).
        slot_labels: ``S_q`` slot labels (``"loop[t]"`` for loop steps).
        query_tau, train_tau: loop counts at query and at training time.
        accuracy: test accuracy of the model run at ``query_tau`` (optional).
    """

    trajectory: np.ndarray
    slot_labels: Sequence[str]
    query_tau: int
    train_tau: int
    accuracy: float | None = None

    def __post_init__(self) -> None:
        self.trajectory = np.asarray(self.trajectory, dtype=np.float64)
        self.slot_labels = list(self.slot_labels)
        if self.trajectory.ndim != 3 or self.trajectory.shape[2] != len(self.slot_labels):
            raise SDIError(
                f"Extrapolation: trajectory {self.trajectory.shape} must be [N_train, N_query, S] with "
                f"S = {len(self.slot_labels)} slot labels."
            )


@dataclass
class TrainingCurve:
    """Training history for the training figure.

    Attributes:
        losses: ``[steps]`` training loss per optimiser step.
        evals: ``(step, loss, accuracy)`` on held-out data.
        checkpoint_steps: steps at which checkpoints were saved.
    """

    losses: np.ndarray
    evals: Sequence[tuple[int, float, float]] = ()
    checkpoint_steps: Sequence[int] = ()


@dataclass
class ReportData:
    """Everything the report shows (NumPy arrays and strings only).

    Attributes:
        trajectory: ``[N_train, N_query, S]`` query-step trajectory ``I(i, j, t)``
            (with several sketch seeds: their mean).
        trajectory_se: ``[N_train, N_query, S]`` its standard error over
            independent sketch seeds (:mod:`sdi_core.error_bars`), drawn as
            +-2 SE bands; None for a single sketch.
        slot_labels: ``S`` labels (``Features.slot_labels()``: ``"prelude"``,
            ``"loop[0]"``, ..., ``"coda"``).
        train_text, query_text: the examples as the task's own text
            (``Task.render``), ``N_train`` and ``N_query`` strings.
        task: task name.
        train_tau: loop steps at training time.
        train_ids, query_ids: ``[N]`` example ids shown next to the text
            (default: positions).
        train_meta, query_meta: per-example arrays ``[N]`` (e.g. ``length``,
            ``difficulty``) used to group queries and for the Sudoku figure.
        query_pred_text: the queries rendered with the model's own answer.
        query_correct: ``[N_query]`` bool, the model's answer is right.
        exact: sketch-vs-exact comparison on a subset, or None.
        extrapolation: trajectory at a larger query loop count, or None.
        training: training history, or None.
        summary: ``{name: value}`` shown in the report's first table.
        title: the report's heading.
    """

    trajectory: np.ndarray
    slot_labels: Sequence[str]
    train_text: Sequence[str]
    query_text: Sequence[str]
    task: str = ""
    train_tau: int | None = None
    train_ids: np.ndarray | None = None
    query_ids: np.ndarray | None = None
    train_meta: Mapping[str, np.ndarray] = field(default_factory=dict)
    query_meta: Mapping[str, np.ndarray] = field(default_factory=dict)
    query_pred_text: Sequence[str] | None = None
    query_correct: np.ndarray | None = None
    exact: ExactComparison | None = None
    extrapolation: Extrapolation | None = None
    training: TrainingCurve | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    title: str = "Step-Decomposed Influence report"
    trajectory_se: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.trajectory = np.asarray(self.trajectory, dtype=np.float64)
        if self.trajectory.ndim != 3:
            raise SDIError(f"ReportData.trajectory must be [N_train, N_query, S], got shape {self.trajectory.shape}.")
        if self.trajectory_se is not None:
            self.trajectory_se = np.asarray(self.trajectory_se, dtype=np.float64)
            if self.trajectory_se.shape != self.trajectory.shape:
                raise SDIError(f"ReportData.trajectory_se has shape {self.trajectory_se.shape}, expected the "
                               f"trajectory's {self.trajectory.shape}.")
        n_tr, n_q, s = self.trajectory.shape
        self.slot_labels = list(self.slot_labels)
        if len(self.slot_labels) != s:
            raise SDIError(f"ReportData: {len(self.slot_labels)} slot labels for {s} slots.")
        self.train_text = [str(t) for t in self.train_text]
        self.query_text = [str(t) for t in self.query_text]
        if len(self.train_text) != n_tr or len(self.query_text) != n_q:
            raise SDIError(
                f"ReportData: {len(self.train_text)} train texts and {len(self.query_text)} query texts for a "
                f"trajectory of {n_tr} train x {n_q} query examples."
            )
        self.train_ids = np.arange(n_tr) if self.train_ids is None else np.asarray(self.train_ids)
        self.query_ids = np.arange(n_q) if self.query_ids is None else np.asarray(self.query_ids)
        if self.train_ids.shape != (n_tr,) or self.query_ids.shape != (n_q,):
            raise SDIError("ReportData: train_ids / query_ids must have one id per example.")
        for side, meta, n in (("train", self.train_meta, n_tr), ("query", self.query_meta, n_q)):
            for k, v in meta.items():
                if np.asarray(v).shape[:1] != (n,):
                    raise SDIError(f"ReportData.{side}_meta[{k!r}] must have {n} entries, got shape {np.shape(v)}.")
        if self.query_pred_text is not None and len(self.query_pred_text) != n_q:
            raise SDIError("ReportData.query_pred_text must have one entry per query.")
        if self.query_correct is not None:
            self.query_correct = np.asarray(self.query_correct, dtype=bool).reshape(-1)
            if self.query_correct.shape != (n_q,):
                raise SDIError("ReportData.query_correct must have one entry per query.")


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    folder: Path
    markdown: Path
    html: Path
    figures: dict[str, Path]
    summary_json: Path
    arrays: Path
    metrics: dict


# --------------------------------------------------------------------------- numbers


def loop_slots(slot_labels: Sequence[str]) -> np.ndarray:
    """Positions of the loop-step slots (labels ``"loop[t]"``) among ``slot_labels``."""
    return np.asarray([i for i, s in enumerate(slot_labels) if str(s).startswith("loop[")], dtype=np.int64)


def _pretty_slot(label: str) -> str:
    if label.startswith("loop[") and label.endswith("]"):
        return f"step {int(label[5:-1]) + 1}"
    return label


def _slot_axis(ax, slot_labels: Sequence[str], what: str = "query slot") -> None:
    """Ticks for a slot axis: ``pre, 1, 2, ..., coda`` when there are many slots, else ``step t``."""
    many = len(slot_labels) > 7
    ticks = []
    for lab in slot_labels:
        if lab.startswith("loop["):
            ticks.append(str(int(lab[5:-1]) + 1) if many else _pretty_slot(lab))
        else:
            ticks.append({"prelude": "pre"}.get(lab, lab) if many else lab)
    ax.set_xticks(np.arange(len(slot_labels)), ticks)
    ax.set_xlabel(f"{what}: loop step t" + (" (pre = prelude slot)" if many and "prelude" in slot_labels else ""))


def compare_sketch_exact(sketch: np.ndarray, exact: np.ndarray, k: int = 10) -> dict:
    """How well sketched trajectories ``[n_train, n_query, S]`` match exact ones: :func:`sdi_core.metrics.compare`."""
    return _compare(sketch, exact, k=k)


def step_profile(trajectory: np.ndarray, slots: Sequence[int] | None = None) -> np.ndarray:
    """Share of each query's absolute influence in each slot.

    ``P[j, t] = sum_i |I(i, j, t)| / sum_{i, t'} |I(i, j, t')|`` over the slots
    ``slots`` (default all).  Rows sum to 1 (a query with no influence at all
    gets a uniform row).

    Args:
        trajectory: ``[N_train, N_query, S]``.
        slots: slot positions to keep (e.g. :func:`loop_slots`).

    Returns:
        ``[N_query, len(slots)]``.
    """
    traj = np.asarray(trajectory, dtype=np.float64)
    if traj.ndim != 3:
        raise SDIError(f"step_profile: trajectory must be [N_train, N_query, S], got {traj.shape}.")
    if slots is not None:
        traj = traj[:, :, np.asarray(slots, dtype=np.int64)]
    mass = np.abs(traj).sum(axis=0)  # [N_query, S]
    tot = mass.sum(axis=1, keepdims=True)
    uniform = np.full_like(mass, 1.0 / max(1, mass.shape[1]))
    return np.where(tot > 0, mass / np.where(tot > 0, tot, 1.0), uniform)


def top_train_examples(trajectory: np.ndarray, query: int, k: int, slot: int | None = None, largest: bool = True):
    """Indices and scores of the ``k`` train examples with the largest (or smallest) influence on one query.

    ``slot=None`` ranks by TracIn (the sum over slots), otherwise by ``I(:, query, slot)``.

    Returns:
        ``(indices [k'], scores [k'])`` with ``k' = min(k, N_train)``, best first.
    """
    traj = np.asarray(trajectory, dtype=np.float64)
    col = traj[:, query, :].sum(axis=1) if slot is None else traj[:, query, slot]
    k = int(min(k, col.shape[0]))
    order = np.argsort(-col if largest else col, kind="stable")[:k]
    return order, col[order]


# --------------------------------------------------------------------------- document


class _Doc:
    """A tiny document model rendered both as Markdown and as HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [list(map(str, r)) for r in rows])))

    def img(self, path: str, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "table":
                header, rows = v
                esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                out.append("| " + " | ".join(map(esc, header)) + " |")
                out.append("|" + "|".join(["---"] * len(header)) + "|")
                out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
            elif kind == "img":
                out.append(f"![{v[1]}]({v[0]})\n\n*{v[1]}*")
            elif kind == "code":
                out.append("```\n" + v.rstrip("\n") + "\n```")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
            "line-height:1.45;color:#222}img{max-width:100%;border:1px solid #ddd}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:left}th{background:#f3f3f3}pre{background:#f7f7f7;padding:0.6em;overflow-x:auto}"
            "figcaption{font-style:italic;color:#555;margin-bottom:1.2em}code{background:#f3f3f3}</style>",
            "</head><body>",
        ]
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{e(v[1])}</h{v[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline_html(v)}</p>")
            elif kind == "table":
                header, rows = v
                out.append("<table><tr>" + "".join(f"<th>{_inline_html(c)}</th>" for c in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                out.append(f'<figure><img src="{e(v[0])}" alt="{e(v[1])}"><figcaption>{e(v[1])}</figcaption></figure>')
            elif kind == "code":
                out.append(f"<pre>{e(v)}</pre>")
        out.append("</body></html>")
        return "\n".join(out)


def _inline_html(text: str) -> str:
    """Escape, then turn Markdown ``code`` and **bold** spans into HTML."""
    import re

    s = html.escape(str(text))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def _short(text: str, width: int = 26) -> str:
    line = text.replace("\n", " ")
    return line if len(line) <= width else line[: width - 1] + "…"


def _label_of(data: ReportData, i: int) -> str:
    text = data.train_text[i]
    if "\n" in text or len(text) > 40:
        return f"#{data.train_ids[i]}"
    return f"#{data.train_ids[i]}  {text}"


def _fmt(x: float) -> str:
    return f"{x:+.2e}"


def _plot_training(curve: TrainingCurve, path: Path) -> Path:
    fig, ax = _figure(9, 3.4, ncols=2)
    ax_l, ax_a = ax[0]
    losses = np.asarray(curve.losses, dtype=np.float64)
    steps = np.arange(1, len(losses) + 1)
    ax_l.plot(steps, losses, color="0.75", lw=0.8, label="batch loss")
    w = max(1, len(losses) // 50)
    if len(losses) >= w > 1:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax_l.plot(steps[w - 1 :], smooth, color="C0", lw=1.6, label=f"moving average ({w} steps)")
    if curve.evals:
        ev = np.asarray(curve.evals, dtype=np.float64)
        ax_l.plot(ev[:, 0], ev[:, 1], "o-", color="C3", ms=3, label="test loss")
        ax_a.plot(ev[:, 0], ev[:, 2], "o-", color="C2", ms=3)
        ax_a.set_ylim(-0.02, 1.02)
        ax_a.axhline(1.0, color="0.85", lw=0.8)
    else:
        ax_a.text(0.5, 0.5, "no held-out evaluation was run", ha="center", va="center", transform=ax_a.transAxes)
    for c in curve.checkpoint_steps:
        for a in (ax_l, ax_a):
            a.axvline(c, color="C1", lw=0.9, ls="--")
    if curve.checkpoint_steps:
        ax_l.plot([], [], color="C1", ls="--", label="checkpoints")
    if losses.size and losses.min() > 0 and losses.max() / losses.min() > 20:
        ax_l.set_yscale("log")
    ax_l.set_xlabel("training step")
    ax_l.set_ylabel("cross-entropy loss")
    ax_l.set_title("Training loss")
    ax_l.legend(fontsize=8)
    ax_a.set_xlabel("training step")
    ax_a.set_ylabel("test accuracy (exact answer)")
    ax_a.set_title("Test accuracy")
    return _save(fig, path)


def _query_rows(data: ReportData, j: int, n_each: int) -> tuple[np.ndarray, int]:
    """Top proponents then top opponents (by TracIn) of query j; returns (indices, number of proponents)."""
    tracin = data.trajectory[:, j, :].sum(axis=1)
    order = np.argsort(-tracin, kind="stable")
    pro = [i for i in order[:n_each] if tracin[i] > 0]
    opp = [i for i in order[::-1][:n_each] if tracin[i] < 0 and i not in pro]
    if not pro and not opp:  # all zero: show the first rows anyway
        pro = list(order[:n_each])
    return np.asarray(pro + opp, dtype=np.int64), len(pro)


def _plot_query(data: ReportData, j: int, path: Path, n_each: int = 5) -> Path:
    rows, n_pro = _query_rows(data, j, n_each)
    vals = data.trajectory[rows, j, :]  # [r, S]
    labels = list(data.slot_labels)
    fig, ax = _figure(14, 0.36 * len(rows) + 2.6, ncols=2, gridspec_kw={"width_ratios": [1.1, 1]})
    fig.get_layout_engine().set(wspace=0.06)
    ax_h, ax_l = ax[0]
    lim = float(np.abs(vals).max()) or 1.0
    im = ax_h.imshow(vals, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    _slot_axis(ax_h, labels)
    tracin = vals.sum(axis=1)
    ax_h.set_yticks(range(len(rows)), [f"{_label_of(data, i)}  (TracIn {_fmt(t)})" for i, t in zip(rows, tracin)],
                    fontsize=8)
    if 0 < n_pro < len(rows):
        ax_h.axhline(n_pro - 0.5, color="k", lw=1.2)
    ax_h.set_ylabel("training example\n(proponents above the line, opponents below)", fontsize=9)
    ax_h.set_title("I(i, j, t) of the top training examples", fontsize=10)
    cb = fig.colorbar(im, ax=ax_h, shrink=0.9, pad=0.02)
    cb.set_label("influence I(i, j, t)", fontsize=9)
    x = np.arange(len(labels))
    for r, i in enumerate(rows):
        color = f"C{r % 10}"
        ax_l.plot(x, vals[r], "-" if r < n_pro else "--", color=color, marker="o", ms=3, lw=1.3,
                  label=_short(_label_of(data, i), 24))
        if data.trajectory_se is not None:
            band = 2.0 * data.trajectory_se[i, j, :]
            ax_l.fill_between(x, vals[r] - band, vals[r] + band, color=color, alpha=0.15, lw=0)
    ax_l.axhline(0, color="0.6", lw=0.8)
    _slot_axis(ax_l, labels)
    ax_l.set_ylabel("influence I(i, j, t)")
    bands = "" if data.trajectory_se is None else "; bands: +-2 SE over sketch seeds"
    ax_l.set_title(f"Trajectories (solid: proponents, dashed: opponents{bands})", fontsize=10)
    ax_l.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    q = data.query_pred_text[j] if data.query_pred_text is not None else data.query_text[j]
    status = ""
    if data.query_correct is not None:
        status = "  [model correct]" if data.query_correct[j] else "  [model wrong]"
    shown = "" if "\n" in q else ": " + _short(q, 70)  # multi-line examples (grids) are printed in the text
    fig.suptitle(f"Query #{data.query_ids[j]}{shown}{status}", fontsize=11)
    return _save(fig, path)


def _profile_groups(data: ReportData) -> tuple[str, list[tuple[str, np.ndarray]]] | None:
    key = next((k for k in _PROFILE_KEYS if k in data.query_meta), None)
    if key is None:
        return None
    v = np.asarray(data.query_meta[key], dtype=np.float64)
    uniq = np.unique(v)
    if len(uniq) < 2:
        return None
    if len(uniq) <= 4:
        bins = [(f"{key} = {u:g}", v == u) for u in uniq]
    else:
        edges = np.unique(np.quantile(v, [0, 1 / 3, 2 / 3, 1]))
        bins = []
        for a, b in zip(edges[:-1], edges[1:]):
            last = b == edges[-1]
            m = (v >= a) & ((v <= b) if last else (v < b))
            hi = v[m].max() if m.any() else b
            bins.append((f"{key} {a:g}-{hi:g}", m))
    return key, [(name, m) for name, m in bins if m.any()]


def _plot_profile(data: ReportData, path: Path) -> tuple[Path, dict]:
    prof = step_profile(data.trajectory)  # [N_query, S]
    raw = list(data.slot_labels)
    labels = [_pretty_slot(s) for s in raw]
    x = np.arange(len(labels))
    groups = _profile_groups(data)
    fig, ax = _figure(11 if groups else 6.5, 3.8, ncols=2 if groups else 1)
    a0 = ax[0][0]
    mean = prof.mean(axis=0)
    lo, hi = np.quantile(prof, [0.25, 0.75], axis=0)
    a0.bar(x, mean, color=["C0" if lab.startswith("loop[") else "0.6" for lab in raw], alpha=0.85,
           label="mean over queries (grey: prelude/coda)")
    # The spread as a 25-75% range (the mean can lie outside it when a few queries dominate a slot).
    a0.vlines(x, lo, hi, color="k", lw=1.4, label="25-75% of queries")
    a0.plot(x, np.median(prof, axis=0), "_", color="k", ms=10, mew=1.4, label="median")
    _slot_axis(a0, raw)
    a0.set_ylabel("share of |influence| in the slot")
    a0.set_title(f"Where training data acts ({prof.shape[0]} queries)")
    a0.legend(fontsize=8)
    out = {"mean_share": mean.tolist(), "slots": labels}
    if groups:
        key, bins = groups
        a1 = ax[0][1]
        for c, (name, m) in enumerate(bins):
            a1.plot(x, prof[m].mean(axis=0), "o-", color=f"C{c}", label=f"{name} ({int(m.sum())} queries)")
        _slot_axis(a1, raw)
        a1.set_ylabel("share of |influence| in the slot")
        a1.set_title(f"By query {key}")
        a1.legend(fontsize=8)
        out["by_group"] = {name: prof[m].mean(axis=0).tolist() for name, m in bins}
    return _save(fig, path), out


def _plot_exact(cmp: ExactComparison, labels: Sequence[str], metrics: dict, path: Path) -> Path:
    s, e = cmp.sketch, cmp.exact
    fig, ax = _figure(13, 4.0, ncols=3)
    a0, a1, a2 = ax[0]
    nslot = s.shape[2]
    for t in range(nslot):
        a0.scatter(e[..., t].ravel(), s[..., t].ravel(), s=6, alpha=0.5, color=f"C{t % 10}", label=_pretty_slot(labels[t]))
    lim = float(max(np.abs(e).max(), np.abs(s).max())) or 1.0
    a0.plot([-lim, lim], [-lim, lim], color="k", lw=0.8, label="y = x")
    # Influence spans orders of magnitude: a symmetric log scale shows the small values as well as the large.
    nz = np.abs(e[e != 0])
    lin = float(np.quantile(nz, 0.2)) if nz.size else 1.0
    scaled = lim / lin > 100
    a0.set_xlim(-lim * 1.5, lim * 1.5)
    a0.set_ylim(-lim * 1.5, lim * 1.5)
    if scaled:
        decades = 10.0 ** np.arange(math.ceil(math.log10(lin)) + 1, math.floor(math.log10(lim)) + 1)
        decades = decades[:: max(1, math.ceil(len(decades) / 3))]  # at most 3 ticks per sign
        ticks = np.concatenate([-decades[::-1], [0.0], decades])
        names = [f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-") if v else "0" for v in ticks]
        for setter, tick in ((a0.set_xscale, a0.set_xticks), (a0.set_yscale, a0.set_yticks)):
            setter("symlog", linthresh=lin)
            tick(ticks, names)
            # no minor ticks: on a symlog axis they crowd every decade
        a0.minorticks_off()
    a0.set_xlabel("exact I(i, j, t)" + (" (symmetric log scale)" if scaled else ""))
    a0.set_ylabel("sketched I(i, j, t)")
    a0.set_title(f"Pearson {metrics['pearson_trajectory']:.3f}, rel. error {metrics['rel_error_trajectory']:.3f}")
    a0.legend(fontsize=7, ncol=2, markerscale=2, loc="lower right")
    x = np.arange(nslot)
    errs = np.asarray(metrics["rel_error_per_slot"], dtype=np.float64)
    a1.bar(x, np.nan_to_num(errs), color="C0")
    top = float(np.nanmax(errs)) if np.isfinite(errs).any() else 1.0
    for t in np.flatnonzero(errs < 1e-5):  # slots whose tensors are small enough to be stored exactly
        a1.text(t, 0.02 * top, "unsketched", rotation=90, ha="center", va="bottom", fontsize=7, color="0.3")
    _slot_axis(a1, list(labels))
    a1.set_ylabel("||sketch - exact|| / ||exact||")
    a1.set_title(f"Relative error per slot (TracIn: {metrics['rel_error_tracin']:.3f})")
    curve = metrics["topk_overlap_curve"]
    kk = np.arange(1, len(curve) + 1)
    a2.plot(kk, curve, "o-", color="C2")
    a2.set_ylim(0, 1.05)
    a2.set_xlabel("k")
    a2.set_ylabel("top-k overlap (fraction shared)")
    a2.set_title(f"Top-k by TracIn: overlap@{metrics['k']} = {metrics['topk_overlap_tracin']:.2f}")
    dim = f"TensorSketch dim {cmp.sketch_dim}" if cmp.sketch_dim else "sketch"
    fig.suptitle(f"{dim} vs exact gradients: {s.shape[0]} train x {s.shape[1]} query examples", fontsize=11)
    return _save(fig, path)


def _late_share(traj: np.ndarray, slot_labels: Sequence[str], axis: int) -> np.ndarray:
    """Share of |influence| in the later half of the loop steps, per query (axis=1) or train example (axis=0)."""
    ls = loop_slots(slot_labels)
    if len(ls) < 2:
        raise SDIError("late-step influence needs at least 2 loop steps.")
    late = ls[len(ls) // 2 :]
    a = np.abs(traj)
    other = 0 if axis == 1 else 1
    tot = a[:, :, ls].sum(axis=(other, 2))
    lt = a[:, :, late].sum(axis=(other, 2))
    return np.where(tot > 0, lt / np.where(tot > 0, tot, 1), np.nan)


def _plot_difficulty(data: ReportData, key: str, path: Path) -> tuple[Path, dict]:
    fig, ax = _figure(11, 3.8, ncols=2)
    out = {}
    ls = loop_slots(data.slot_labels)
    late_from = len(ls) // 2 + 1
    for a, side, meta, axis in ((ax[0][0], "query", data.query_meta, 1), (ax[0][1], "train", data.train_meta, 0)):
        if key not in meta:
            a.text(0.5, 0.5, f"no {key!r} for {side} examples", ha="center", va="center", transform=a.transAxes)
            a.set_axis_off()
            continue
        d = np.asarray(meta[key], dtype=np.float64)
        y = _late_share(data.trajectory, data.slot_labels, axis)
        ok = np.isfinite(y)
        rng = np.random.default_rng(0)
        jitter = (rng.random(len(d)) - 0.5) * 0.25 * (np.ptp(d) / max(1, len(np.unique(d))) if np.ptp(d) else 1)
        a.scatter(d[ok] + jitter[ok], y[ok], s=10, alpha=0.45, color="C0", label=f"{side} examples")
        uniq = np.unique(d[ok])
        if len(uniq) <= 12:
            means = [y[ok][d[ok] == u].mean() for u in uniq]
            a.plot(uniq, means, "o-", color="C3", lw=1.8, label="mean per value")
        rho = _spearman(d[ok], y[ok])
        out[side] = {"spearman": rho, "n": int(ok.sum())}
        a.set_xlabel(f"{side} puzzle {key}")
        steps = f"loop step {late_from}" if late_from == len(ls) else f"loop steps {late_from}-{len(ls)}"
        a.set_ylabel(f"share of |influence| in {steps}")
        a.set_title(f"{side.capitalize()} side: Spearman rho = {rho:.2f}")
        a.legend(fontsize=8)
    fig.suptitle("Late-step influence against puzzle difficulty", fontsize=11)
    return _save(fig, path), out


def _plot_extrapolation(data: ReportData, ex: Extrapolation, path: Path) -> tuple[Path, dict]:
    raw = list(ex.slot_labels)
    labels = [_pretty_slot(s) for s in raw]
    x = np.arange(len(labels))
    ls = loop_slots(raw)
    # Between the last training-time loop step and the first extra one (only when queries run more steps).
    boundary = ls[ex.train_tau - 1] + 0.5 if len(ls) > ex.train_tau >= 1 else None
    prof = step_profile(ex.trajectory)
    fig, ax = _figure(11.5, 3.9, ncols=2)
    a0, a1 = ax[0]
    is_loop = [lab.startswith("loop[") for lab in raw]
    extra = [i for i in range(len(raw)) if is_loop[i] and boundary is not None and i > boundary]
    a0.bar(x, prof.mean(axis=0), color=["C3" if i in extra else ("C0" if is_loop[i] else "0.6") for i in range(len(raw))])
    a0.set_ylabel("share of |influence| in the slot")
    a0.set_title(f"Queries run {ex.query_tau} loop steps (trained with {ex.train_tau}; red: extra steps)")
    j = 0
    rows, n_pro = _query_rows(
        ReportData(ex.trajectory, ex.slot_labels, data.train_text, data.query_text, train_ids=data.train_ids,
                   query_ids=data.query_ids), j, 4)
    for r, i in enumerate(rows):
        a1.plot(x, ex.trajectory[i, j], "-" if r < n_pro else "--", marker="o", ms=3, label=_short(_label_of(data, i), 22))
    a1.axhline(0, color="0.6", lw=0.8)
    a1.set_ylabel("influence I(i, j, t)")
    a1.set_title(f"Query #{data.query_ids[j]}: top training examples")
    a1.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    for a in (a0, a1):
        _slot_axis(a, raw)
        if boundary is not None:
            a.axvline(boundary, color="k", ls=":", lw=1.2)
            a.text(boundary, 0.98, f" training tau = {ex.train_tau}", transform=a.get_xaxis_transform(), va="top",
                   ha="left", fontsize=8)
    share = float(prof[:, extra].sum(axis=1).mean()) if extra else 0.0
    return _save(fig, path), {"extra_step_share": share, "mean_share": prof.mean(axis=0).tolist(), "slots": labels}


# --------------------------------------------------------------------------- text


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + line for line in text.split("\n"))


def _ranked_text(data: ReportData, idx: np.ndarray, scores: np.ndarray) -> str:
    """One line per training example (its text after the score), or the score line then the indented text."""
    lines = []
    for i, s in zip(idx, scores):
        head = f"{_fmt(s)}  train #{data.train_ids[i]}"
        text = data.train_text[i]
        lines += [head, _indent(text, "    ")] if "\n" in text else [f"{head:<30} {text}"]
    return "\n".join(lines)


def _per_step_text(data: ReportData, j: int, n_top: int) -> str:
    lines = []
    multiline = any("\n" in data.train_text[i] for i in range(len(data.train_text)))
    for t, lab in enumerate(data.slot_labels):
        idx, sc = top_train_examples(data.trajectory, j, n_top, slot=t)
        lines.append(f"{_pretty_slot(lab)}:")
        for i, s in zip(idx, sc):
            head = f"  {_fmt(s)}  train #{data.train_ids[i]}"
            if multiline:
                lines.append(head)
                lines.append(_indent(data.train_text[i], "      "))
            else:
                lines.append(f"{head:<34} {data.train_text[i]}")
    return "\n".join(lines)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------- main entry


def write_report(
    data: ReportData,
    out_dir: str | os.PathLike,
    *,
    max_queries: int = 4,
    n_each: int = 5,
    n_text: int = 3,
    k_overlap: int = 10,
) -> ReportFiles:
    """Write the report folder (Markdown, HTML, PNG figures, JSON summary, arrays).

    Args:
        data: the :class:`ReportData`.
        out_dir: folder to write into (created; existing report files are overwritten).
        max_queries: queries that get their own figure and text section (the first ones).
        n_each: proponents and opponents shown per query figure.
        n_text: training examples listed per loop step in the text.
        k_overlap: ``k`` of the sketch-vs-exact top-k overlap.

    Returns:
        :class:`ReportFiles` with the paths and the computed metrics.
    """
    if not isinstance(data, ReportData):
        raise SDIError(f"write_report takes sdi_core.app.report.ReportData, got {type(data).__name__}.")
    for name, v in (("max_queries", max_queries), ("n_each", n_each), ("n_text", n_text), ("k_overlap", k_overlap)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SDIError(f"write_report({name}={v!r}): must be a positive int.")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    metrics: dict[str, Any] = {"summary": {k: _jsonable(v) for k, v in data.summary.items()}}
    doc = _Doc()
    doc.h(1, data.title)
    n_tr, n_q, n_s = data.trajectory.shape
    doc.p(
        f"Task **{data.task or '?'}**: influence of {n_tr} training examples on {n_q} query examples, decomposed "
        f"over {n_s} query slots ({', '.join(_pretty_slot(s) for s in data.slot_labels)}). "
        "`I(i, j, t)` is the influence of training example `i` on query `j` through slot `t`; summed over `t` it "
        "is TracIn. Positive values (proponents) lowered the query's loss when trained on; negative values "
        "(opponents) raised it."
    )
    if data.summary:
        doc.table(["setting", "value"], [[k, _fmt_value(v)] for k, v in data.summary.items()])

    if data.training is not None:
        figs["training"] = _plot_training(data.training, folder / FIGURES["training"])
        doc.h(2, "Training")
        doc.img(FIGURES["training"], "Training loss and test accuracy; dashed lines mark the checkpoints used for attribution.")

    figs["step_profile"], prof = _plot_profile(data, folder / FIGURES["step_profile"])
    metrics["step_profile"] = prof
    doc.h(2, "At which loop steps does training data matter?")
    doc.p(
        "For each query, the share of its total absolute influence `sum_i |I(i, j, t)|` that falls in each slot, "
        "averaged over queries (error bars: 25-75% of queries)"
        + (", and split by query group." if "by_group" in prof else ".")
    )
    doc.img(FIGURES["step_profile"], "Average step profile of influence.")
    doc.table(["slot", "mean share"], [[s, f"{v:.3f}"] for s, v in zip(prof["slots"], prof["mean_share"])])

    if data.exact is not None:
        cmp = data.exact
        m = compare_sketch_exact(cmp.sketch, cmp.exact, k=k_overlap)
        metrics["sketch_vs_exact"] = m
        figs["sketch_vs_exact"] = _plot_exact(cmp, data.slot_labels, m, folder / FIGURES["sketch_vs_exact"])
        doc.h(2, "Sketch against exact")
        doc.p(
            f"On a subset of {cmp.sketch.shape[0]} training x {cmp.sketch.shape[1]} query examples, the trajectories "
            "from TensorSketch features are compared with those from exact per-step gradients (same model, same "
            "checkpoints)."
        )
        doc.img(FIGURES["sketch_vs_exact"], "Sketched against exact influence: scatter, relative error per slot, top-k overlap.")
        doc.table(
            ["metric", "value"],
            [
                ["Pearson r, all I(i, j, t)", f"{m['pearson_trajectory']:.4f}"],
                ["relative error, all I(i, j, t)", f"{m['rel_error_trajectory']:.4f}"],
                ["Pearson r, TracIn", f"{m['pearson_tracin']:.4f}"],
                ["relative error, TracIn", f"{m['rel_error_tracin']:.4f}"],
                [f"top-{m['k']} overlap (TracIn ranking)", f"{m['topk_overlap_tracin']:.3f}"],
            ],
        )

    if data.extrapolation is not None:
        ex = data.extrapolation
        figs["extrapolation"], em = _plot_extrapolation(data, ex, folder / FIGURES["extrapolation"])
        metrics["extrapolation"] = em
        doc.h(2, f"Running queries past the training loop count ({ex.train_tau} -> {ex.query_tau} steps)")
        acc = f" Test accuracy at {ex.query_tau} steps: {ex.accuracy:.3f}." if ex.accuracy is not None else ""
        doc.p(
            f"The queries were featurised again with {ex.query_tau} loop steps; the training side is unchanged "
            f"(it only enters summed over its own {ex.train_tau} steps). On average "
            f"{100 * em['extra_step_share']:.1f}% of the absolute influence falls on the extra steps.{acc}"
        )
        doc.img(FIGURES["extrapolation"], "Influence over the extra loop steps; the dotted line marks where the training loop count ends.")

    diff_key = "difficulty" if "difficulty" in data.query_meta or "difficulty" in data.train_meta else None
    if diff_key and len(loop_slots(data.slot_labels)) >= 2:
        figs["difficulty"], dm = _plot_difficulty(data, diff_key, folder / FIGURES["difficulty"])
        metrics["late_step_vs_difficulty"] = dm
        doc.h(2, "Late-step influence against puzzle difficulty")
        doc.p(
            "Share of each example's absolute influence that falls in the later half of the loop steps, against "
            f"its `{diff_key}` (search nodes of a backtracking solver). Left: per query; right: per training example."
        )
        doc.img(FIGURES["difficulty"], "Late-step influence against difficulty.")

    doc.h(2, "Queries")
    shown = min(max_queries, n_q)
    for j in range(shown):
        name = FIGURES["query"].format(j=j)
        figs[f"query_{j}"] = _plot_query(data, j, folder / name, n_each=n_each)
        q = data.query_pred_text[j] if data.query_pred_text is not None else data.query_text[j]
        status = ""
        if data.query_correct is not None:
            status = " (model correct)" if data.query_correct[j] else " (model wrong)"
        doc.h(3, f"Query #{data.query_ids[j]}{status}")
        doc.code(("model's answer:\n" if data.query_pred_text is not None else "") + q)
        doc.img(name, f"Query #{data.query_ids[j]}: influence of its top proponents and opponents across the loop steps.")
        idx, sc = top_train_examples(data.trajectory, j, n_text)
        doc.p("Most influential training examples by TracIn:")
        doc.code(_ranked_text(data, idx, sc))
        doc.p(f"Top {n_text} training examples at each slot, ranked by `I(i, j, t)`:")
        doc.code(_per_step_text(data, j, n_text))
    if shown < n_q:
        doc.p(f"{n_q - shown} more queries are in `influence.npz` (not drawn).")

    doc.h(2, "Files")
    doc.p("`influence.npz` holds the arrays (`trajectory`, `tracin`, ids, slot labels); `summary.json` the numbers above.")
    md_path = folder / "report.md"
    html_path = folder / "report.html"
    md_path.write_text(doc.markdown(), encoding="utf-8")
    html_path.write_text(doc.html(data.title), encoding="utf-8")
    arrays = {
        "trajectory": data.trajectory,
        "tracin": data.trajectory.sum(axis=2),
        "train_ids": data.train_ids,
        "query_ids": data.query_ids,
        "slot_labels": np.asarray(data.slot_labels),
    }
    if data.exact is not None:
        arrays.update(exact_trajectory=data.exact.exact, sketch_trajectory_subset=data.exact.sketch,
                      exact_train_index=data.exact.train_index, exact_query_index=data.exact.query_index)
    if data.extrapolation is not None:
        arrays.update(extrapolated_trajectory=data.extrapolation.trajectory,
                      extrapolated_slot_labels=np.asarray(data.extrapolation.slot_labels))
    npz_path = folder / "influence.npz"
    np.savez_compressed(npz_path, **arrays)
    metrics["figures"] = {k: p.name for k, p in figs.items()}
    json_path = folder / "summary.json"
    json_path.write_text(json.dumps(_jsonable(metrics), indent=2), encoding="utf-8")
    return ReportFiles(folder, md_path, html_path, figs, json_path, npz_path, metrics)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)
