"""sdi_torch.Attributor: checkpoints, no side effects, dtypes, progress, and errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import sdi_core  # noqa: E402
from sdi_core import Checkpoint, SDIError  # noqa: E402
from sdi_core.reference import looped_transformer as lt  # noqa: E402
import sdi_torch  # noqa: E402
from sdi_torch.models import LoopedGPT, per_example_loss  # noqa: E402

TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_model(seed=0, dtype=torch.float64, **kw):
    config = lt.LoopedConfig(vocab_size=7, d_model=8, n_heads=2, tau=3, max_len=6, **kw)
    return LoopedGPT.from_numpy(config, lt.init_weights(config, seed), dtype=dtype).eval()


def make_batch(seed, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 7, (B, T), generator=g), "targets": torch.randint(0, 7, (B, T), generator=g)}


def attributor(model, sketch=None, **kw):
    kw.setdefault("progress", False)
    return sdi_torch.Attributor(model, model.block, per_example_loss, sketch or sdi_core.Exact(), **kw)


def max_err(a, b) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------ fast path


@pytest.mark.parametrize("route", ["auto", "exact_hash", "fft"])
def test_fast_path_equals_core_sketcher(route):
    """The torch fast-path sketcher against the core's portable StreamingSketcher (float64)."""
    model = make_model(n_prelude=1, n_coda=1, tie_embeddings=True)
    groups = {"prelude": [model.tok_emb, model.pos_emb], "coda": [model.ln_f, model.coda]}
    sketch = sdi_core.TensorSketch(dim=32, seed=4, route=route)
    batches = [make_batch(1), make_batch(2, B=3)]
    fast = attributor(model, sketch, groups=groups).featurize(batches)
    core = attributor(model, sketch, groups=groups, fast_path=False).featurize(batches)
    for g in core.data[0]:
        err = max_err(fast.data[0][g], core.data[0][g])
        assert err <= TOL * max(1.0, float(core.data[0][g].abs().max())), f"group {g}, route {route}: {err:.3g}"
    assert float(fast.data[0]["prelude"].abs().max()) > 0


@pytest.mark.parametrize("route", ["auto", "exact_hash", "fft"])
def test_summed_features_equal_per_step_features_summed(route):
    """featurize(summed=True) (step-summed gradients hashed once) equals the per-step features summed, and the
    untied baseline summed; the routes are recorded in meta."""
    model = make_model(n_prelude=1, n_coda=1)
    groups = {"prelude": [model.tok_emb, model.pos_emb], "coda": [model.ln_f, model.coda]}
    sketch = sdi_core.TensorSketch(dim=32, seed=4, route=route)
    batches = [make_batch(1), make_batch(2, B=3)]
    attr = attributor(model, sketch, groups=groups)
    per_step, summed = attr.featurize(batches), attr.featurize(batches, summed=True)
    assert summed.summed and summed.steps == per_step.steps
    for g, arr in per_step.sum_steps().data[0].items():
        err = max_err(summed.data[0][g], arr)
        assert err <= TOL * max(1.0, float(arr.abs().max())), f"group {g}, route {route}: {err:.3g}"
    routes = summed.meta["routes"]
    assert routes["block.mlp.fc1.weight"]["source"] == ("forced" if route != "auto" else routes[
        "block.mlp.fc1.weight"]["source"]) and routes["block.mlp.fc1.weight"]["route"] in ("fft", "exact_hash")
    exact = sdi_torch.untied_baseline(model, model.block, per_example_loss, batches, groups=groups, summed=True)
    want = attributor(model, groups=groups).featurize(batches).sum_steps()
    for g, arr in want.data[0].items():
        assert max_err(exact.data[0][g], arr) <= TOL * max(1.0, float(arr.abs().max())), g


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoints_from_files_and_state_dicts(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd1 = make_model(seed=1).state_dict()
    sd2 = make_model(seed=2).state_dict()
    path = tmp_path / "ckpt_100.pt"
    torch.save({"state_dict": sd1, "lr": 0.01, "step": 100}, path)
    ckpts = [Checkpoint(str(path)), Checkpoint(sd2, eta=0.5), Checkpoint(sd1, eta=2.0, name="again")]
    train, query = [make_batch(1), make_batch(2)], [make_batch(3)]
    attr = attributor(model)
    ftr, fq = attr.featurize(train, checkpoints=ckpts), attr.featurize(iter(query), checkpoints=ckpts)
    by_content = attr.featurize(train, checkpoints=[Checkpoint(sd1, eta=1.0)]).checkpoints[0].id
    assert ftr.checkpoints[0].id == by_content and ftr.checkpoints[2].id == "again"  # a file: by its content
    assert ftr.checkpoints[1].id.startswith("weights:")
    assert [c.eta for c in ftr.checkpoints] == [0.01, 0.5, 2.0] and ftr.checkpoints[0].step == 100
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"weights not restored after featurize: {k}"
    # eta-weighted sum over checkpoints, each checkpoint alone featurised at its own weights
    res = sdi_core.influence(ftr, fq).trajectory
    parts = []
    for ck, eta in zip(ckpts, (0.01, 0.5, 2.0)):
        single = Checkpoint(ck.source, eta=1.0, name="x")
        parts.append(eta * sdi_core.influence(attr.featurize(train, checkpoints=[single]),
                                              attr.featurize(query, checkpoints=[single])).trajectory)
    assert max_err(res, sum(parts)) <= TOL * float(res.abs().max())
    # and against the untied baseline at the same checkpoints
    btr = sdi_torch.untied_baseline(model, model.block, per_example_loss, train, checkpoints=ckpts)
    bq = sdi_torch.untied_baseline(model, model.block, per_example_loss, query, checkpoints=ckpts)
    want = sdi_core.influence(btr, bq).trajectory
    assert max_err(res, want) <= TOL * float(want.abs().max())


def test_current_weights_id_and_eta():
    model = make_model()
    f1 = attributor(model).featurize([make_batch(1)])
    f2 = attributor(model).featurize([make_batch(2)])
    assert f1.checkpoints == f2.checkpoints and f1.checkpoints[0].eta == 1.0
    other = attributor(make_model(seed=5)).featurize([make_batch(1)])
    assert other.checkpoints[0].id != f1.checkpoints[0].id


def test_checkpoint_with_wrong_keys_is_an_error_and_leaves_weights(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(make_model(seed=1).state_dict())
    bad["extra.weight"] = bad.pop("head.weight")
    with pytest.raises(SDIError, match=r"missing keys \['head.weight'\].*unexpected keys \['extra.weight'\]"):
        attributor(model).featurize([make_batch(1)], checkpoints=[Checkpoint(make_model(seed=1).state_dict()),
                                                                   Checkpoint(bad)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(SDIError, match="does not exist"):
        attributor(model).featurize([make_batch(1)], checkpoints=[Checkpoint(str(tmp_path / "nope.pt"))])
    shaped = dict(model.state_dict())
    shaped["head.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(SDIError, match="head.weight.*shape"):
        attributor(model).featurize([make_batch(1)], checkpoints=[Checkpoint(shaped)])


def test_train_and_query_must_agree_on_sketch_and_checkpoints():
    model = make_model()
    batch = make_batch(1)
    a = attributor(model, sdi_core.TensorSketch(32, seed=0)).featurize([batch])
    b = attributor(model, sdi_core.TensorSketch(32, seed=1)).featurize([batch])
    with pytest.raises(SDIError, match="sketch differs"):
        sdi_core.influence(a, b)
    c = attributor(model, sdi_core.TensorSketch(32, seed=0)).featurize(
        [batch], checkpoints=[Checkpoint(model.state_dict(), name="other")])
    with pytest.raises(SDIError, match="different checkpoints"):
        sdi_core.influence(a, c)


# ----------------------------------------------------------------------------- side effects


def _probe(model):
    return (
        [(n, p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        [(type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
         for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        torch._C._len_torch_function_stack(),
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
    )


def _same(p1, p2):
    (a1, m1, s1, *r1), (a2, m2, s2, *r2) = p1, p2
    assert m1 == m2 and r1 == r2
    for (n, rg, g), (n2, rg2, g2) in zip(a1, a2):
        assert (n, rg) == (n2, rg2), f"requires_grad of {n} changed"
        assert (g is None) == (g2 is None) and (g is None or torch.equal(g, g2)), f".grad of {n} changed"
    assert all(torch.equal(v, s2[k]) for k, v in s1.items())


def test_no_side_effects_on_success_and_on_error():
    model = make_model()
    model.block.ln1.weight.requires_grad_(False)  # a frozen parameter stays frozen
    model.head.weight.grad = torch.ones_like(model.head.weight)  # existing grads are left alone
    model.block.train()  # mixed modes are restored module by module
    before = _probe(model)
    with pytest.warns(UserWarning, match="train mode"):
        attributor(model, sdi_core.TensorSketch(32)).featurize([make_batch(1)])
    _same(before, _probe(model))

    def exploding(m, batch):
        m(batch["tokens"])
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdi_torch.Attributor(model, model.block, exploding, progress=False).featurize([make_batch(1)])
    _same(before, _probe(model))
    with pytest.raises(SDIError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdi_torch.Attributor(model, model.block, lambda m, b: per_example_loss(m, b).mean(),
                             progress=False).featurize([make_batch(1)], checkpoints=[Checkpoint(make_model(3).state_dict())])
    _same(before, _probe(model))


class DropoutBody(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.5)

    def forward(self, h):
        return h + self.drop(torch.tanh(self.fc(h)))


class DropoutModel(nn.Module):
    def __init__(self, V=7, d=8, tau=2):
        super().__init__()
        self.tau = tau
        self.emb = nn.Embedding(V, d)
        self.body = DropoutBody(d)
        self.head = nn.Linear(d, V)

    def forward(self, tokens):
        h = self.emb(tokens)
        for _ in range(self.tau):
            h = self.body(h)
        return self.head(h)


def _token_loss(model, batch):
    logits = model(batch["tokens"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none").view(
        batch["targets"].shape).mean(-1)


def test_train_mode_warns_and_uses_eval_unless_told():
    torch.manual_seed(0)
    model = DropoutModel().double().train()
    batch = make_batch(1)
    with pytest.warns(UserWarning, match="eval mode"):
        f_train = sdi_torch.Attributor(model, model.body, _token_loss, sdi_core.Exact(), progress=False).featurize([batch])
    assert model.training and model.body.drop.training
    model.eval()
    f_eval = sdi_torch.Attributor(model, model.body, _token_loss, sdi_core.Exact(), progress=False).featurize([batch])
    assert max_err(f_train.data[0]["loop"], f_eval.data[0]["loop"]) == 0.0
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(1)
        f_drop = sdi_torch.Attributor(model, model.body, _token_loss, sdi_core.Exact(), train_mode=True,
                                      progress=False).featurize([batch])
    assert max_err(f_drop.data[0]["loop"], f_eval.data[0]["loop"]) > 1e-6, "train_mode=True must keep dropout on"


# ------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_low_precision_models_accumulate_in_float32(dtype, tol):
    ref_model = make_model()
    low = make_model(dtype=dtype)
    batch = make_batch(1)
    sketch = sdi_core.TensorSketch(dim=32, seed=0)
    want = attributor(ref_model, sketch).featurize([batch])
    got = attributor(low, sketch).featurize([batch])
    for g in want.data[0]:
        x, y = got.data[0][g], want.data[0][g]
        assert x.dtype == torch.float32, f"{dtype} features must accumulate in float32, got {x.dtype}"
        rel = float(torch.linalg.norm(x.double() - y) / torch.linalg.norm(y))
        assert rel <= tol, f"{dtype}: relative error {rel:.3g} of group {g!r} exceeds {tol}"
    assert all(p.dtype == dtype for p in low.parameters())


# ------------------------------------------------------------------------------ options


def test_steps_padding_example_ids_and_progress(capsys):
    model = make_model()
    attr = attributor(model, progress=True, steps=5)
    f = attr.featurize([make_batch(1), make_batch(2)], example_ids=range(100, 108))
    assert f.steps["loop"] == 5 and f.data[0]["loop"].shape[:2] == (8, 5)
    assert float(f.data[0]["loop"][:, 3:].abs().max()) == 0.0
    assert list(f.example_ids) == list(range(100, 108))
    assert "batches" in capsys.readouterr().err
    attr.featurize([make_batch(1)], progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(SDIError, match="steps=2"):
        attributor(model, steps=2).featurize([make_batch(1)])
    with pytest.raises(SDIError, match="steps=0"):
        attributor(model, steps=0)


def test_featurize_steps_is_deprecated_and_still_pads():
    model = make_model()
    with pytest.warns(DeprecationWarning, match=r"featurize\(steps=\.\.\.\) is deprecated"):
        f = attributor(model).featurize([make_batch(1)], steps=5)
    assert f.steps["loop"] == 5


def test_import_is_light():
    code = "import sys, sdi_torch; print('torch' in sys.modules, 'sdi_torch.capture' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], f"import sdi_torch imported {out}"


# ---------------------------------------------------------------------------------- bad input


def test_loss_of_wrong_shape():
    model = make_model()
    with pytest.raises(SDIError, match=r"shape \(B,\).*scalar"):
        sdi_torch.Attributor(model, model.block, lambda m, b: per_example_loss(m, b).mean(),
                             progress=False).featurize([make_batch(1)])

    def per_token(m, b):
        return F.cross_entropy(m(b["tokens"]).transpose(1, 2), b["targets"], reduction="none")

    with pytest.raises(SDIError, match=r"got shape \(4, 5\).*Reduce every axis"):
        sdi_torch.Attributor(model, model.block, per_token, progress=False).featurize([make_batch(1)])
    with pytest.raises(SDIError, match="callable"):
        sdi_torch.Attributor(model, model.block, None)


def test_nan_loss_names_the_batch_and_nan_gradient_names_the_parameter():
    model = make_model()

    def nan_loss(m, b):
        loss = per_example_loss(m, b)
        return loss * b["scale"]

    good, bad = make_batch(1), make_batch(2)
    good["scale"] = torch.ones(4, dtype=torch.float64)
    bad["scale"] = torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(SDIError, match=r"Batch 1 .*NaN or inf for examples \[1\]"):
        sdi_torch.Attributor(model, model.block, nan_loss, progress=False).featurize([good, bad])

    def nan_grad(m, b):  # finite loss, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
        logits = m(b["tokens"])
        return per_example_loss(m, b) + 0.0 * (logits - logits.detach()).abs().sqrt().sum((1, 2))

    with pytest.raises(SDIError, match=r"Batch 0 .*Non-finite.*parameter 'block\.[\w.]+' at step"):
        sdi_torch.Attributor(model, model.block, nan_grad, sdi_core.TensorSketch(32), progress=False).featurize([good])


class Borrowing(nn.Module):
    """The loop body's weight is also used outside the loop; an extra module is never called."""

    def __init__(self, d=8, V=7, tau=2, einsum=False):
        super().__init__()
        self.tau, self.einsum = tau, einsum
        self.emb = nn.Embedding(V, d)
        self.body = nn.Linear(d, d)
        self.unused = nn.Linear(d, d)
        self.head = nn.Linear(d, V)

    def forward(self, tokens):
        h = self.emb(tokens)
        for _ in range(self.tau):
            if self.einsum == "linear":
                h = h + F.linear(h, self.body.weight)
            elif self.einsum:
                h = h + torch.einsum("btd,ed->bte", h, self.body.weight)
            else:
                h = h + torch.tanh(self.body(h))
        return self.head(h + F.linear(h, self.body.weight))


def test_bad_loop_selections():
    model = Borrowing().double().eval()
    batch = make_batch(1)
    with pytest.raises(SDIError, match="outside every call of the loop module"):
        sdi_torch.Attributor(model, model.body, _token_loss, progress=False).featurize([batch])
    with pytest.raises(SDIError, match="never called"):
        sdi_torch.Attributor(model, model.unused, _token_loss, progress=False).featurize([batch])
    with pytest.raises(SDIError, match=r"used different numbers of times.*'emb.weight': 1"):
        sdi_torch.Attributor(model, [model.body.weight, model.emb.weight], _token_loss,
                             progress=False).featurize([batch])
    with pytest.warns(UserWarning, match=r"\['unused.weight', 'unused.bias'\] are never used"):
        got = sdi_torch.Attributor(model, model.body.weight, _token_loss,
                                   groups={"coda": [model.head, model.unused]}, progress=False).featurize([batch])
    assert got.meta["coverage"].unused == ["unused.weight", "unused.bias"]
    assert "unused.weight: NEVER USED" in got.meta["coverage"].describe()
    with pytest.raises(SDIError, match="not a submodule"):
        sdi_torch.Attributor(model, nn.Linear(2, 2), _token_loss)
    with pytest.raises(SDIError, match="no submodule or parameter named 'blok'"):
        sdi_torch.Attributor(model, "blok", _token_loss)
    with pytest.raises(SDIError, match="in group 'loop' and in group 'coda'"):
        sdi_torch.Attributor(model, model.body, _token_loss, groups={"coda": [model.body.weight]})
    with pytest.raises(SDIError, match="reserved"):
        sdi_torch.Attributor(model, model.body, _token_loss, groups={"loop": [model.head]})
    # parameters as the loop: the 3 uses of body.weight (2 steps + readout) are 3 steps, consistent with body.bias?
    with pytest.raises(SDIError, match="different numbers of times"):
        sdi_torch.Attributor(model, [model.body.weight, model.body.bias], _token_loss,
                             progress=False).featurize([batch])


def test_einsum_linear_map_is_a_linear_use_equal_to_the_matmul_form():
    model = Borrowing(einsum=True).double().eval()
    plain = Borrowing(einsum="linear").double().eval()  # the same map through F.linear
    plain.load_state_dict(model.state_dict())
    got = [sdi_torch.Attributor(m, [m.body.weight], _token_loss, sdi_core.Exact(), progress=False,
                                fallback="error").featurize([make_batch(1)]) for m in (model, plain)]
    assert got[0].meta["coverage"].uses["body.weight"] == got[1].meta["coverage"].uses["body.weight"]
    assert max_err(got[0].data[0]["loop"], got[1].data[0]["loop"]) <= 1e-12


class Ckpt(nn.Module):
    def __init__(self, reentrant, d=8, V=7):
        super().__init__()
        self.reentrant = reentrant
        self.emb = nn.Embedding(V, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, V)

    def forward(self, tokens):
        h = self.emb(tokens)
        for _ in range(2):
            h = h + checkpoint(self.body, h, use_reentrant=self.reentrant)
        return self.head(h)


def test_reentrant_checkpointing_is_a_clear_error():
    model = Ckpt(reentrant=True).double().eval()
    with pytest.raises(SDIError, match="use_reentrant=False"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdi_torch.Attributor(model, model.body, _token_loss, groups={"prelude": [model.emb]},
                             progress=False).featurize([make_batch(1)])
    assert all(p.requires_grad for p in model.parameters())


def test_view_made_before_featurize_is_caught():
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Borrowing()
            self.cached = None

        def forward(self, tokens):
            if self.cached is None:
                self.cached = self.inner.head.weight.t()  # made once, outside the capture
            h = self.inner.emb(tokens)
            for _ in range(2):
                h = h + torch.tanh(self.inner.body(h))
            return h @ self.cached + F.linear(h, self.inner.head.weight)  # also used directly: not "unused"

    model = Cached().double().eval()
    model(make_batch(0)["tokens"])
    with pytest.raises(SDIError, match=r"'inner.head.weight' received a gradient through a path the capture did not"):
        sdi_torch.Attributor(model, model.inner.body, _token_loss, groups={"coda": [model.inner.head.weight]},
                             progress=False).featurize([make_batch(1)])
    assert model.inner.head.weight.grad is None


def test_activation_modified_in_place_after_its_use_is_an_error():
    class InPlace(Borrowing):
        def forward(self, tokens):
            h = self.emb(tokens)
            for _ in range(self.tau):
                a = torch.tanh(h)
                y = self.body(a)
                a.mul_(2.0)  # the activation of the use above changes after the use
                h = h + y + a
            return self.head(h)

    model = InPlace().double().eval()
    with pytest.raises(SDIError, match=r"input of 'linear' \(a use of parameter 'body.weight' at step 1\) was modified"):
        sdi_torch.Attributor(model, model.body, _token_loss, progress=False).featurize([make_batch(1)])


@pytest.mark.parametrize("how", ["setitem", "copy_", "inplace"])
def test_writes_from_or_into_a_selected_parameter_are_errors(how):
    class Writes(Borrowing):
        def forward(self, tokens):
            h = self.emb(tokens)
            for _ in range(self.tau):
                h = h + torch.tanh(self.body(h))
            w = torch.zeros_like(self.head.weight)
            if how == "setitem":
                w[:] = self.head.weight  # the copy carries head.weight's gradient
            elif how == "copy_":
                w.copy_(self.head.weight)
            else:
                self.head.weight.mul_(1.0)
            return F.linear(h, w if how != "inplace" else self.head.weight) + 0 * self.head.bias

    model = Writes().double().eval()
    before = model.head.weight.detach().clone()
    with pytest.raises(SDIError, match=r"Parameter 'head.weight'.*(__setitem__|copy_|mul_)"):
        sdi_torch.Attributor(model, model.body, _token_loss, groups={"coda": [model.head]},
                             progress=False).featurize([make_batch(1)])
    assert torch.equal(model.head.weight.detach(), before)


def test_harmless_uses_of_a_parameter_pass_and_change_nothing():
    class Harmless(Borrowing):
        def forward(self, tokens):
            w = self.body.weight
            assert w.shape == (8, 8) and w.dim() == 2 and w.grad is None
            flags = (w == 0).any() | torch.isnan(w).any()  # comparisons carry no gradient
            scratch = torch.zeros_like(w)
            with torch.no_grad():
                self.norm_seen = float(w.norm())  # logging under no_grad
            h = self.emb(tokens) + 0 * scratch.sum() + flags.to(w.dtype)
            for _ in range(self.tau):
                h = h + torch.tanh(self.body(h))
            return self.head(h)

    class Plain(Borrowing):
        def forward(self, tokens):
            h = self.emb(tokens)
            for _ in range(self.tau):
                h = h + torch.tanh(self.body(h))
            return self.head(h)

    torch.manual_seed(0)
    model = Harmless().double().eval()
    plain = Plain().double().eval()
    plain.load_state_dict(model.state_dict())
    got = sdi_torch.Attributor(model, model.body, _token_loss, progress=False).featurize([make_batch(1)])
    want = sdi_torch.Attributor(plain, plain.body, _token_loss, progress=False).featurize([make_batch(1)])
    assert max_err(got.data[0]["loop"], want.data[0]["loop"]) == 0.0
    assert model.norm_seen > 0


def test_current_weights_id_follows_in_place_updates():
    model = make_model()
    attr = attributor(model)
    first = attr.featurize([make_batch(1)]).checkpoints[0].id
    assert attr.featurize([make_batch(2)]).checkpoints[0].id == first
    with torch.no_grad():
        model.block.attn.q.weight.add_(1e-3)  # what an optimizer step does
    changed = attr.featurize([make_batch(1)]).checkpoints[0].id
    assert changed != first
    model.load_state_dict(make_model().state_dict())  # back to the first weights
    assert attr.featurize([make_batch(1)]).checkpoints[0].id == first
