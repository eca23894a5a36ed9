"""sdi_core.driver.featurize: the one featurize loop (checkpoints x batches, padding, ids, errors, sessions)."""
from __future__ import annotations

import numpy as np
import pytest

from sdi_core import Checkpoint, CheckpointInfo, Exact, ParamInfo, SDIError, SketchPlan
from sdi_core.driver import BatchFeatures, featurize

PLAN = SketchPlan(Exact(), [ParamInfo("w", (2,)), ParamInfo("h", (3,), group="coda")])


class Session:
    """A session whose batch ``{"x": [B], "steps": S}`` gives features ``x * (step + 1) * weight``."""

    def __init__(self, fail_at=None, error=SDIError):
        self.events, self.fail_at, self.error = [], fail_at, error
        self.weight = 1.0

    def __enter__(self):
        self.events.append("enter")
        return self

    def __exit__(self, *exc):
        self.events.append("exit")

    def load(self, ck):
        self.weight = 1.0 if ck is None else float(ck.source)
        return CheckpointInfo(f"w={self.weight}" if ck is None or ck.name is None else ck.name, 1.0, None)

    def run(self, batch, *, summed):
        self.events.append(("run", self.weight))
        if self.fail_at is not None and batch["x"][0] == self.fail_at:
            raise self.error("the batch is bad")
        x, s = np.asarray(batch["x"], float), int(batch["steps"])
        loop = x[:, None, None] * self.weight * (np.arange(s) + 1.0)[None, :, None] * np.ones((1, 1, 2))
        coda = np.ones((len(x), 1, 3)) * self.weight
        if summed:
            loop = loop.sum(axis=1, keepdims=True)
        return BatchFeatures({"loop": loop, "coda": coda}, {"loop": s, "coda": 1}, PLAN.layout)

    def meta(self):
        return {"backend": "fake"}


def _batches():
    return [{"x": [1.0, 2.0], "steps": 2}, {"x": [3.0], "steps": 3}]


def test_steps_are_padded_and_checkpoints_looped():
    s = Session()
    f = featurize(s, iter(_batches()), [Checkpoint(2.0, eta=0.5, name="a"), Checkpoint(3.0)], progress=False,
                  meta={"extra": 1})
    assert s.events == ["enter", ("run", 2.0), ("run", 2.0), ("run", 3.0), ("run", 3.0), "exit"], \
        "an iterator of batches must be listed and re-run at every checkpoint"
    assert f.steps == {"loop": 3, "coda": 1} and f.data[0]["loop"].shape == (3, 3, 2)
    np.testing.assert_array_equal(f.data[0]["loop"][:2, 2], 0.0)  # padded step
    np.testing.assert_allclose(f.data[1]["loop"][2, :, 0], [9.0, 18.0, 27.0])
    assert [c.id for c in f.checkpoints] == ["a", "w=3.0"] and f.meta == {"backend": "fake", "extra": 1}
    np.testing.assert_array_equal(f.example_ids, [0, 1, 2])
    padded = featurize(Session(), _batches(), steps={"loop": 5}, example_ids=[7, 8, 9], progress=False)
    assert padded.steps["loop"] == 5 and list(padded.example_ids) == [7, 8, 9]
    assert featurize(Session(), _batches(), steps=4, progress=False).steps["loop"] == 4
    assert featurize(Session(), _batches(), progress=False, default_ids=False).example_ids is None
    with pytest.raises(SDIError, match=r"steps=2.*ran 3 steps of group 'loop'"):
        featurize(Session(), _batches(), steps=2, progress=False)
    with pytest.raises(SDIError, match=r"example_ids has shape \(2,\).*3 examples"):
        featurize(Session(), _batches(), example_ids=[1, 2], progress=False)


def test_summed_and_a_single_mapping_batch():
    f = featurize(Session(), {"x": [1.0], "steps": 3}, summed=True, progress=False)
    assert f.summed and f.data[0]["loop"].shape == (1, 1, 2) and f.steps["loop"] == 3
    np.testing.assert_allclose(f.data[0]["loop"][0, 0], [6.0, 6.0])


def test_errors_get_batch_and_checkpoint_context_by_chaining():
    s = Session(fail_at=3.0)
    with pytest.raises(SDIError, match=r"^Batch 1 \(checkpoint 'c'\): the batch is bad$") as info:
        featurize(s, _batches(), [Checkpoint(1.0, name="c")], progress=False)
    assert isinstance(info.value.__cause__, SDIError) and str(info.value.__cause__) == "the batch is bad"
    assert s.events[-1] == "exit", "the session must be left (weights restored) on error"
    other = Session(fail_at=3.0, error=RuntimeError)
    with pytest.raises(RuntimeError, match="the batch is bad") as info:
        featurize(other, _batches(), progress=False)
    notes = getattr(info.value, "__notes__", None)
    if notes is not None:  # Python >= 3.11
        assert any("Batch 1" in n for n in notes), notes


def test_layout_change_between_batches_and_empty_inputs_are_refused():
    class Changing(Session):
        def run(self, batch, *, summed):
            bf = super().run(batch, summed=summed)
            if batch["x"][0] == 3.0:
                other = SketchPlan(Exact(), [ParamInfo("w", (2,)), ParamInfo("h", (3,), group="coda"),
                                             ParamInfo("z", (1,), group="coda")])
                bf.layout = other.layout
            return bf

    with pytest.raises(SDIError, match="different feature layout"):
        featurize(Changing(), _batches(), progress=False)
    with pytest.raises(SDIError, match="no batches"):
        featurize(Session(), [], progress=False)
    with pytest.raises(SDIError, match="checkpoints is empty"):
        featurize(Session(), _batches(), [], progress=False)


def test_progress_bar_goes_to_stderr(capsys):
    featurize(Session(), _batches(), progress=True, desc="my batches")
    assert "my batches" in capsys.readouterr().err
    featurize(Session(), _batches(), progress=False)
    assert capsys.readouterr().err == ""
