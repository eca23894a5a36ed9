"""The validation report section: LDS scatter, per-step counterfactual curves, mislabel ranking curve.

Framework-neutral: it draws the results of :mod:`sdi_core.validate` with
matplotlib's object-oriented API (imported when drawing) and writes
``validation.md`` and ``validation.html`` beside the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .report import _Doc, _figure, _save
from ..validate import MislabelResult, ValidationResult

__all__ = ["VALIDATION_FIGURES", "write_validation_report"]

VALIDATION_FIGURES = {
    "lds": "validation_lds.png",
    "counterfactual": "validation_counterfactual.png",
    "mislabel": "validation_mislabel.png",
}

_COLORS = {"sdi": "tab:blue", "tracin": "tab:orange", "random": "tab:gray", "last_checkpoint": "tab:green",
           "sdi_step_sum": "tab:blue"}
_NAMES = {"sdi": "top-k by I(., j, t) (step t)", "tracin": "top-k by TracIn", "random": "k random"}
_LDS_NAMES = {"tracin": "TracIn", "sdi_step_sum": "SDI summed over steps (= TracIn)",
              "last_checkpoint": "last-checkpoint gradient dot product"}


def _plot_lds(vres: ValidationResult, path: Path) -> Path:
    methods = [m for m in ("tracin", "last_checkpoint") if m in vres.lds]
    fig, axes = _figure(4.2 * len(methods), 3.6, ncols=len(methods))
    for ax, m in zip(axes[0], methods):
        r = vres.lds[m]
        # One query, the one whose correlation is the median, shown on its own scale; the title gives the mean.
        finite = np.flatnonzero(np.isfinite(r.per_query))
        j = int(finite[np.argsort(r.per_query[finite])[len(finite) // 2]]) if finite.size else 0
        ax.scatter(r.predicted[:, j], -r.actual[:, j], s=18, color=_COLORS[m])
        ax.set_xlabel("predicted: sum of scores over the subset")
        ax.set_ylabel("actual: -loss of the retrained model")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.set_title(f"{_LDS_NAMES[m]}\nLDS {r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]; query {j} "
                     f"(rho {r.per_query[j]:+.2f})", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_counterfactual(vres: ValidationResult, path: Path) -> Path:
    cf = vres.counterfactual
    fig, axes = _figure(6.4, 3.8)
    ax = axes[0, 0]
    steps = np.asarray(cf.steps)
    for m in ("sdi", "tracin", "random"):
        if m not in cf.mean:
            continue
        mu, se = cf.mean[m], np.nan_to_num(cf.se[m])
        ax.plot(steps, mu, marker="o", color=_COLORS[m], label=_NAMES[m])
        ax.fill_between(steps, mu - se, mu + se, color=_COLORS[m], alpha=0.2)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(steps)
    ax.set_xlabel("loop step t of the readout")
    ax.set_ylabel("change of the query loss read out at step t")
    ax.set_title(f"Remove k={cf.k} training examples and retrain ({len(cf.queries)} queries x "
                 f"{next(iter(cf.delta.values())).shape[2]} seeds; bands: +-1 SE)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_mislabel(mis: MislabelResult, path: Path) -> Path:
    fig, axes = _figure(4.4, 3.8)
    ax = axes[0, 0]
    ax.plot(mis.curve[:, 0], mis.curve[:, 1], color="tab:red", label=f"self-influence (AUC {mis.auc:.3f})")
    ax.plot([0, 1], [0, 1], color="tab:gray", ls="--", label="random order")
    ax.axvline(mis.inspect, color="k", lw=0.6, ls=":")
    ax.set_xlabel("fraction of training set inspected\n(highest self-influence first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"{mis.n_flipped} flipped labels; {mis.found_at:.0%} found in the top {mis.inspect:.0%}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_validation_report(out: str | Path, vres: ValidationResult, mis: MislabelResult | None,
                            summary: Mapping[str, Any], query_text: Sequence[str] = ()) -> dict[str, Path]:
    """Write the figures, ``validation.md`` and ``validation.html`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"lds": _plot_lds(vres, out / VALIDATION_FIGURES["lds"])}
    if vres.counterfactual is not None:
        files["counterfactual"] = _plot_counterfactual(vres, out / VALIDATION_FIGURES["counterfactual"])
    if mis is not None:
        files["mislabel"] = _plot_mislabel(mis, out / VALIDATION_FIGURES["mislabel"])
    doc = _Doc()
    doc.h(1, f"Is it right? Counterfactual validation on {summary.get('task', 'the task')}")
    full = summary.get("full_model", {})
    if full:
        acc = ", ".join(f"t{t + 1}: {a:.2f}" for t, a in enumerate(full.get("test_accuracy_by_readout_step", [])))
        doc.p(f"Full-data model: test accuracy {full.get('test_accuracy', float('nan')):.3f}; read out after each "
              f"loop step: {acc}.")
    doc.h(2, "Linear datamodeling score")
    doc.table(["attribution", "LDS (mean Spearman over queries)", "95% bootstrap interval"],
              [[_LDS_NAMES.get(m, m), f"{r.mean:+.3f}", f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]"]
               for m, r in vres.lds.items()])
    doc.img(files["lds"].name, "Predicted subset sum against the retrained model's -loss, one query per panel")
    cf = vres.counterfactual
    if cf is not None:
        doc.h(2, "Step-resolved counterfactual")
        doc.p(f"For each query and loop step t: remove the top-{cf.k} training examples by I(., j, t), by TracIn, "
              f"or {cf.k} at random; retrain; measure the change of the loss read out at step t (coda applied "
              "after step t). Positive: the removal hurt the query at that step.")
        header = ["loop step t"] + [_NAMES[m] for m in ("sdi", "tracin", "random") if m in cf.mean] + [
            "step-t ranking beats TracIn", "top-k overlap with TracIn"]
        rows = []
        for s, t in enumerate(cf.steps):
            row = [t] + [f"{cf.mean[m][s]:+.4f} +- {cf.se[m][s]:.4f}" for m in ("sdi", "tracin", "random") if m in cf.mean]
            rows.append(row + [f"{cf.sdi_beats_tracin[s]:.2f}", f"{cf.overlap[:, s].mean():.2f}"])
        doc.table(header, rows)
        doc.img(files["counterfactual"].name, "Change of the step-t loss after removal, per loop step (+-1 SE)")
        if query_text:
            doc.p("Queries: " + "; ".join(f"`{query_text[j]}`" for j in cf.queries if j < len(query_text)))
    if mis is not None:
        doc.h(2, "Mislabel detection")
        extra = summary.get("mislabel", {}).get("auc_training_loss")
        doc.p(f"{mis.n_flipped} training answers flipped, a model trained on them, its training set ranked by "
              f"self-influence T(i, i) of the answer loss: AUC {mis.auc:.3f}, {mis.found_at:.0%} of the flips in the "
              f"top {mis.inspect:.0%}." + ("" if extra is None else f" Ranked by the self-influence of the training "
              f"loss (answer plus auxiliary targets): AUC {extra:.3f}."))
        doc.img(files["mislabel"].name, "Fraction of flipped labels found against the fraction inspected")
    doc.h(2, "What the numbers depend on")
    for line in vres.shortcuts:
        doc.p("- " + line)
    files["markdown"] = out / "validation.md"
    files["markdown"].write_text(doc.markdown(), encoding="utf-8")
    files["html"] = out / "validation.html"
    files["html"].write_text(doc.html("SDI validation"), encoding="utf-8")
    return files
