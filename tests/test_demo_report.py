"""sdi_core.app.report: the numbers against NumPy references, and the report folder from synthetic data."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sdi_core import SDIError
from sdi_core.app.report import (
    ExactComparison,
    Extrapolation,
    ReportData,
    TrainingCurve,
    compare_sketch_exact,
    loop_slots,
    step_profile,
    top_train_examples,
    write_report,
)

pytest.importorskip("matplotlib")


def _png_ok(path, min_ink=0.02):
    """A readable PNG with some drawing on it (not blank)."""
    from matplotlib.image import imread

    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = imread(path)[..., :3]
    ink = float(np.mean(img.min(axis=2) < 0.9))
    assert ink > min_ink, f"{path} is nearly blank ({ink:.3%} non-white pixels)"
    assert img.shape[0] > 200 and img.shape[1] > 400, f"{path} is too small: {img.shape}"


# --------------------------------------------------------------------------- numbers


def test_compare_sketch_exact_matches_numpy():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(20, 3, 4))
    sketch = exact + 0.3 * rng.normal(size=exact.shape)
    m = compare_sketch_exact(sketch, exact, k=5)
    assert m["pearson_trajectory"] == pytest.approx(np.corrcoef(sketch.ravel(), exact.ravel())[0, 1], rel=1e-12)
    assert m["rel_error_trajectory"] == pytest.approx(np.linalg.norm(sketch - exact) / np.linalg.norm(exact), rel=1e-12)
    ts, te = sketch.sum(2), exact.sum(2)
    assert m["pearson_tracin"] == pytest.approx(np.corrcoef(ts.ravel(), te.ravel())[0, 1], rel=1e-12)
    assert m["rel_error_tracin"] == pytest.approx(np.linalg.norm(ts - te) / np.linalg.norm(te), rel=1e-12)
    for t in range(4):
        want = np.linalg.norm(sketch[..., t] - exact[..., t]) / np.linalg.norm(exact[..., t])
        assert m["rel_error_per_slot"][t] == pytest.approx(want, rel=1e-12)
    for kk in range(1, 6):
        want = np.mean([len(set(np.argsort(-ts[:, j])[:kk]) & set(np.argsort(-te[:, j])[:kk])) / kk for j in range(3)])
        assert m["topk_overlap_curve"][kk - 1] == pytest.approx(want)
    assert m["topk_overlap_tracin"] == m["topk_overlap_curve"][-1] and m["k"] == 5


def test_compare_identical_and_known_overlap():
    exact = np.zeros((6, 1, 2))
    exact[:, 0, 0] = [6, 5, 4, 3, 2, 1]
    m = compare_sketch_exact(exact, exact, k=3)
    assert m["pearson_trajectory"] == pytest.approx(1.0) and m["rel_error_trajectory"] == 0.0 and m["topk_overlap_tracin"] == 1.0
    swapped = exact.copy()
    swapped[[2, 3], 0, 0] = swapped[[3, 2], 0, 0]  # ranks 3 and 4 trade places: top-3 shares 2 of 3
    m = compare_sketch_exact(swapped, exact, k=3)
    assert m["topk_overlap_curve"] == pytest.approx([1.0, 1.0, 2 / 3])


def test_compare_rejects_bad_shapes():
    with pytest.raises(SDIError, match="same shape"):
        compare_sketch_exact(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(SDIError, match="at least one"):
        compare_sketch_exact(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)))


def test_step_profile_and_top_examples():
    rng = np.random.default_rng(1)
    traj = rng.normal(size=(7, 3, 5))
    p = step_profile(traj)
    want = np.abs(traj).sum(0) / np.abs(traj).sum((0, 2))[:, None]
    np.testing.assert_allclose(p, want, rtol=1e-12)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    sub = step_profile(traj, slots=[1, 2])
    np.testing.assert_allclose(sub, np.abs(traj[:, :, 1:3]).sum(0) / np.abs(traj[:, :, 1:3]).sum((0, 2))[:, None])
    np.testing.assert_allclose(step_profile(np.zeros((2, 2, 4))), 0.25)
    idx, sc = top_train_examples(traj, 1, 3)
    np.testing.assert_array_equal(idx, np.argsort(-traj[:, 1].sum(1))[:3])
    np.testing.assert_allclose(sc, traj[idx, 1].sum(1))
    idx, sc = top_train_examples(traj, 2, 2, slot=4, largest=False)
    np.testing.assert_array_equal(idx, np.argsort(traj[:, 2, 4])[:2])
    assert loop_slots(["prelude", "loop[0]", "loop[1]", "coda"]).tolist() == [1, 2]


def test_report_data_validation():
    traj = np.zeros((3, 2, 4))
    labels = ["prelude", "loop[0]", "loop[1]", "coda"]
    with pytest.raises(SDIError, match="slot labels"):
        ReportData(traj, labels[:3], ["a"] * 3, ["q"] * 2)
    with pytest.raises(SDIError, match="train texts"):
        ReportData(traj, labels, ["a"] * 2, ["q"] * 2)
    with pytest.raises(SDIError, match="meta"):
        ReportData(traj, labels, ["a"] * 3, ["q"] * 2, query_meta={"length": np.zeros(5)})
    with pytest.raises(SDIError, match=r"\[N_train, N_query, S\]"):
        ReportData(np.zeros((3, 2)), labels, ["a"] * 3, ["q"] * 2)
    with pytest.raises(SDIError, match="n_train, n_query, S"):
        ExactComparison(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), [0, 1], [0, 1])
    with pytest.raises(SDIError, match="positive int"):
        write_report(ReportData(traj, labels, ["a"] * 3, ["q"] * 2), "unused", max_queries=0)


# --------------------------------------------------------------------------- the folder


def _synthetic(rng, n_tr=30, n_q=6, tau=4, with_difficulty=True):
    labels = ["prelude"] + [f"loop[{t}]" for t in range(tau)] + ["coda"]
    traj = rng.normal(size=(n_tr, n_q, tau + 2)) * np.linspace(0.2, 1.0, tau + 2)
    grid = ". 2 | 1 3    4 2 | 1 3\n1 3 | 4 2    1 3 | 4 2"
    train_text = [grid if with_difficulty else f"{i:05b} -> {i % 2}" for i in range(n_tr)]
    query_text = [grid if with_difficulty else f"{j:04b} -> {j % 2}" for j in range(n_q)]
    meta_key = "difficulty" if with_difficulty else "length"
    qlabels = ["prelude"] + [f"loop[{t}]" for t in range(tau + 2)] + ["coda"]
    exact = traj[:10, :3]
    return ReportData(
        trajectory=traj,
        slot_labels=labels,
        train_text=train_text,
        query_text=query_text,
        task="sudoku" if with_difficulty else "parity",
        train_tau=tau,
        train_meta={meta_key: rng.integers(1, 9, n_tr)},
        query_meta={meta_key: rng.integers(1, 9, n_q)},
        query_correct=np.arange(n_q) % 2 == 0,
        exact=ExactComparison(exact + 0.05 * rng.normal(size=exact.shape), exact, np.arange(10), np.arange(3), 64),
        extrapolation=Extrapolation(rng.normal(size=(n_tr, n_q, tau + 4)), qlabels, query_tau=tau + 2, train_tau=tau,
                                    accuracy=0.5),
        training=TrainingCurve(np.exp(-np.linspace(0, 3, 200)) + 0.01, [(100, 0.5, 0.6), (200, 0.1, 0.9)], [100, 200]),
        summary={"task": "synthetic", "test accuracy": 0.9},
    )


def test_write_report_synthetic_sudoku(tmp_path):
    data = _synthetic(np.random.default_rng(2))
    files = write_report(data, tmp_path / "rep", max_queries=2)
    expected = {"training", "step_profile", "sketch_vs_exact", "extrapolation", "difficulty", "query_0", "query_1"}
    assert set(files.figures) == expected
    md = files.markdown.read_text()
    page = files.html.read_text()
    for name, path in files.figures.items():
        _png_ok(path)
        assert f"({path.name})" in md, f"report.md does not show {path.name}"
        assert f'src="{path.name}"' in page, f"report.html does not show {path.name}"
    assert "query_2.png" not in md
    # Sudoku grids are printed as the task's own text, line by line.
    assert "1 3 | 4 2    1 3 | 4 2" in md
    summary = json.loads(files.summary_json.read_text())
    assert summary["sketch_vs_exact"]["pearson_trajectory"] > 0.9
    assert set(summary["late_step_vs_difficulty"]) == {"query", "train"}
    assert 0 <= summary["extrapolation"]["extra_step_share"] <= 1
    arrays = np.load(files.arrays)
    np.testing.assert_array_equal(arrays["trajectory"], data.trajectory)
    np.testing.assert_allclose(arrays["tracin"], data.trajectory.sum(2))


def test_write_report_parity_without_optional_parts(tmp_path):
    data = _synthetic(np.random.default_rng(3), with_difficulty=False)
    data.exact = data.extrapolation = data.training = None
    # One query puts almost all its influence in the first slot: that slot's mean share lies
    # above its 75% quantile (an error-bar drawing once failed on exactly this).
    data.trajectory[:, 0, :] = 1e-3
    data.trajectory[:, 0, 0] = 100.0
    prof = step_profile(data.trajectory)
    assert prof[:, 0].mean() > np.quantile(prof[:, 0], 0.75)
    files = write_report(data, tmp_path, max_queries=1)
    assert set(files.figures) == {"step_profile", "query_0"}
    for path in files.figures.values():
        _png_ok(path)
    md = files.markdown.read_text()
    assert "By query length" not in md  # a figure title, not text
    assert "00011 -> 1" in md or "-> " in md
    summary = json.loads(files.summary_json.read_text())
    assert "by_group" in summary["step_profile"]  # grouped by the queries' "length"


def test_import_does_not_pull_matplotlib():
    code = "import sys, sdi_core, sdi_core.app.report, sdi_core.app.cli_demo; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], f"importing sdi_core.app.report / cli_demo imported matplotlib/torch: {out}"
