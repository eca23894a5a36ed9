"""Third-party PyTorch models and published loop patterns: exact against the untied ground truth, or refused.

Each case is a small float64 looped model built from parts we did not write (``torch.nn`` layers, Hugging
Face blocks built from configs with random weights) or a loop pattern taken from published looped-model
code.  The capture's exact per-step features must equal :func:`sdi_torch.untied_baseline` (which shares no
code with the capture: the loop body untied into one weight copy per step, per-example gradients by
``torch.func``) to 1e-10, at batch sizes different from and equal to the sequence length.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import sdi_core  # noqa: E402
import sdi_torch  # noqa: E402
from sdi_core import SDIError  # noqa: E402
from sdi_torch.baseline import untied_baseline  # noqa: E402

V, D, TAU = 11, 16, 3
TOL = 1e-10


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def token_batch(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randint(0, V, (B, T), generator=g), "y": torch.randint(0, V, (B, T), generator=g)}


def token_loss(model, batch):
    logits = model(batch["x"])
    return F.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none").mean(1)


def assert_exact(model, loop, batch, loss_fn=token_loss, groups=None, truth_model=None, **kw):
    """Capture's exact features == untied baseline's, per group, checkpoint and step (relative to the scale)."""
    attr = sdi_torch.Attributor(model, loop, loss_fn, sdi_core.Exact(), groups=groups, progress=False, **kw)
    got = attr.featurize([batch])
    tm = truth_model or model
    tloop = loop if truth_model is None else _same_path(model, truth_model, loop)
    tgroups = groups if truth_model is None else {k: [_same_path(model, truth_model, m) for m in v]
                                                   for k, v in (groups or {}).items()}
    want = untied_baseline(tm, tloop, loss_fn, [batch], groups=tgroups)
    assert got.steps == want.steps, f"steps {got.steps} != {want.steps}"
    for g, w in want.data[0].items():
        a = got.data[0][g]
        scale = float(w.abs().max())
        assert scale > 0, f"group {g!r}: the ground truth is zero, the case tests nothing"
        err = float((a - w).abs().max()) / scale
        assert err <= TOL, f"group {g!r}: relative error {err:.3g} against the untied baseline"
    return got


def _same_path(src_model, dst_model, obj):
    """The module/parameter of ``dst_model`` at the path ``obj`` has in ``src_model``."""
    if isinstance(obj, (list, tuple)):
        return [_same_path(src_model, dst_model, o) for o in obj]
    for name, m in src_model.named_modules():
        if m is obj:
            return dst_model.get_submodule(name)
    for name, p in src_model.named_parameters():
        if p is obj:
            return dst_model.get_parameter(name)
    raise AssertionError("not found")


# --------------------------------------------------------------------------- torch.nn layers


class EncoderLoop(nn.Module):
    """``nn.TransformerEncoderLayer`` looped ``TAU`` times (sequence-first unless ``batch_first``)."""

    def __init__(self, batch_first, norm_first=False, checkpoint=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first = batch_first
        self.checkpoint = checkpoint
        self.emb = nn.Embedding(V, D)
        self.block = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=batch_first,
                                                norm_first=norm_first)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        h = self.emb(x)
        if not self.batch_first:
            h = h.transpose(0, 1)  # [T, B, D], PyTorch's default layout
        for _ in range(TAU):
            if self.checkpoint is None:
                h = self.block(h)
            else:
                h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.checkpoint)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("B,T", [(5, 6), (6, 6)], ids=["B!=T", "B==T"])
def test_transformer_encoder_layer(batch_first, norm_first, B, T):
    m = EncoderLoop(batch_first, norm_first)
    assert_exact(m, m.block, token_batch(B, T), groups={"prelude": [m.emb], "coda": [m.head]})


class DecoderLoop(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.block = nn.TransformerDecoderLayer(D, 2, 32, dropout=0.0)  # sequence-first
        self.head = nn.Linear(D, V)

    def forward(self, x):
        mem = self.emb(x).transpose(0, 1)
        h = mem
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        for _ in range(TAU):
            h = self.block(h, mem, tgt_mask=mask)
        return self.head(h.transpose(0, 1))


@pytest.mark.parametrize("B,T", [(4, 6), (6, 6)], ids=["B!=T", "B==T"])
def test_transformer_decoder_layer(B, T):
    m = DecoderLoop()
    assert_exact(m, m.block, token_batch(B, T), groups={"coda": [m.head]})


class SeqFirstFlatBody(nn.Module):
    """Sequence-first rows flattened to ``[T * B, d]`` before an ``nn.Linear``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h):  # h [T, B, D]
        T, B, d = h.shape
        return h + torch.tanh(self.lin(h.reshape(T * B, d))).view(T, B, d)


class SeqFirstFlat(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.block = SeqFirstFlatBody()
        self.head = nn.Linear(D, V)

    def forward(self, x):
        h = self.emb(x).permute(1, 0, 2)
        for _ in range(TAU):
            h = self.block(h)
        return self.head(h.permute(1, 0, 2))


@pytest.mark.parametrize("B,T", [(4, 6), (6, 6)], ids=["B!=T", "B==T"])
def test_sequence_first_rows_flattened_before_linear(B, T):
    m = SeqFirstFlat()
    assert_exact(m, m.block, token_batch(B, T))


# --------------------------------------------------------------------------- loop patterns


class Body(nn.Module):
    """A pre-norm residual MLP step."""

    def __init__(self, cast=False):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(2 * D, D)
        self.cast = cast

    def forward(self, h):
        z = self.ln(h)
        if self.cast:  # a weight cast before use, as mixed-precision code writes it
            z = F.linear(z, self.fc.weight.to(z.dtype), self.fc.bias.to(z.dtype))
        else:
            z = self.fc(z)
        return h + self.proj(F.gelu(z))


class PatternModel(nn.Module):
    def __init__(self, pattern, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.pattern = pattern
        self.emb = nn.Embedding(V, D)
        self.block = Body(cast=pattern == "cast")
        self.head = nn.Linear(D, V)
        if pattern == "adaln":
            self.cond = nn.Linear(D, 2 * D)  # [B, d] conditioning inside the step: no token axis

    def forward(self, x):
        h = self.emb(x)
        outs = []
        for s in range(TAU):
            if self.pattern == "no_grad_prefix" and s == 0:
                with torch.no_grad():  # a gradient-free warm-up step (Huginn's truncated backprop)
                    h = self.block(h)
                continue
            if self.pattern == "checkpoint":
                h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
            elif self.pattern == "adaln":
                h = self.block(h)
                scale, shift = self.cond(h.mean(1)).chunk(2, dim=-1)  # [B, d]
                h = h * (1 + scale[:, None, :]) + shift[:, None, :]
            else:
                h = self.block(h)
            outs.append(h)
        if self.pattern == "readout_every_step":
            return torch.stack([self.head(o) for o in outs], 0)  # [S, B, T, V]
        return self.head(h)


def readout_loss(model, batch):
    logits = model(batch["x"])  # [S, B, T, V]: the loss over every step's readout
    y = batch["y"].unsqueeze(0).expand(logits.shape[0], -1, -1)
    return F.cross_entropy(logits.permute(0, 3, 1, 2), y, reduction="none").mean((0, 2))


@pytest.mark.parametrize("B,T", [(4, 6), (6, 6)], ids=["B!=T", "B==T"])
@pytest.mark.parametrize("pattern", ["cast", "adaln", "no_grad_prefix", "readout_every_step"])
def test_loop_patterns(pattern, B, T):
    m = PatternModel(pattern)
    loop = [m.block, m.cond] if pattern == "adaln" else m.block
    loss = readout_loss if pattern == "readout_every_step" else token_loss
    got = assert_exact(m, loop, token_batch(B, T), loss_fn=loss, groups={"coda": [m.head]})
    if pattern == "no_grad_prefix":  # the gradient-free step is a step, with zero features
        assert float(got.data[0]["loop"][:, 0].abs().max()) == 0.0


def test_activation_checkpointing_gives_the_answer_without_it():
    # torch.func cannot differentiate through checkpoint's saved-tensor hooks, so the ground truth is the
    # same model without checkpointing: checkpointing changes memory, never the gradient.
    m = PatternModel("checkpoint")
    plain = PatternModel("plain")
    plain.load_state_dict(m.state_dict())
    assert_exact(m, m.block, token_batch(4, 6), groups={"coda": [m.head]}, truth_model=plain)


@pytest.mark.parametrize("B,T", [(5, 6), (6, 6)], ids=["B!=T", "B==T"])
def test_checkpointed_sequence_first_encoder_layer(B, T):
    m = EncoderLoop(batch_first=False, checkpoint=False)
    plain = EncoderLoop(batch_first=False)
    plain.load_state_dict(m.state_dict())
    assert_exact(m, m.block, token_batch(B, T), groups={"coda": [m.head]}, truth_model=plain)


def test_reentrant_checkpointing_is_refused_with_the_fix():
    m = EncoderLoop(batch_first=True, checkpoint=True)
    attr = sdi_torch.Attributor(m, m.block, token_loss, sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError, match="use_reentrant=False"):
        attr.featurize([token_batch(4, 6)])


class TwoModules(nn.Module):
    """One parameter shared by two distinct modules used as successive steps (weights tied by assignment)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.a = Body()
        self.b = Body()
        self.b.fc.weight = self.a.fc.weight  # tied
        self.head = nn.Linear(D, V)

    def forward(self, x):
        h = self.emb(x)
        for _ in range(2):
            h = self.b(self.a(h))
        return self.head(h)


def test_parameter_shared_by_two_modules_used_as_successive_steps():
    m = TwoModules()
    # The tied weight is the loop: its k-th use is step k (4 steps), and the ground truth unties it per use.
    got = sdi_torch.Attributor(m, [m.a.fc.weight], token_loss, sdi_core.Exact(), progress=False).featurize(
        [token_batch(4, 6)])
    assert got.steps["loop"] == 4
    # Independent check: per-use untying by hand, per-example gradients by torch.func.
    from torch.func import functional_call, grad, vmap

    w = m.a.fc.weight.detach()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss_one(copies, x, y):
        it = iter(copies)

        def fc(mod, z):
            return F.linear(z, next(it), mod.fc.bias)

        def body(mod, h):
            return h + mod.proj(F.gelu(fc(mod, mod.ln(h))))

        h = F.embedding(x, params["emb.weight"])
        with torch.nn.utils.stateless._reparametrize_module(m, params):
            for _ in range(2):
                h = body(m.b, body(m.a, h))
            logits = m.head(h)
        return F.cross_entropy(logits[None].transpose(1, 2), y[None], reduction="none").mean()

    b = token_batch(4, 6)
    copies = [w.clone() for _ in range(4)]
    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(copies, b["x"], b["y"])
    want = torch.stack([p.reshape(4, -1) for p in per], 1)
    err = float((got.data[0]["loop"] - want).abs().max() / want.abs().max())
    assert err <= TOL, err


# --------------------------------------------------------------------------- refusals


class MixingBody(nn.Module):
    """Centres over the batch before a Linear: examples mixed, so per-example gradients are undefined."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h):
        return h + self.lin(h - h.mean(0, keepdim=True))


class MixingModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.block = MixingBody()
        self.head = nn.Linear(D, V)

    def forward(self, x):
        h = self.emb(x)
        for _ in range(TAU):
            h = self.block(h)
        return self.head(h)


@pytest.mark.parametrize("B,T", [(4, 6), (6, 6)], ids=["B!=T", "B==T"])
def test_mixing_the_examples_is_refused_naming_parameter_step_op_and_fix(B, T):
    m = MixingModel()
    attr = sdi_torch.Attributor(m, m.block, token_loss, sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError) as info:
        attr.featurize([token_batch(B, T)])
    msg = str(info.value)
    for part in ("'block.lin.weight'", "step 0", "'mean'", "example axis", "Fix:"):
        assert part in msg, (part, msg)


def test_a_loss_normalised_by_a_batch_wide_count_is_refused():
    m = PatternModel("plain")

    def bad(model, batch):
        tok = F.cross_entropy(model(batch["x"]).transpose(1, 2), batch["y"], reduction="none")
        return tok.sum(1) / (tok > 0).sum()

    attr = sdi_torch.Attributor(m, m.block, bad, sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError, match="mask.sum"):
        attr.featurize([token_batch(4, 6)])


def item_normalised_loss(model, batch):
    tok = F.cross_entropy(model(batch["x"]).transpose(1, 2), batch["y"], reduction="none")
    # a batch-wide count through a Python number: no tensor trail to follow, only the row check sees it
    return tok.sum(1) / float((batch["x"] > 2).sum())


def test_row_check_catches_what_no_trail_shows_and_can_be_turned_off():
    m = PatternModel("plain").eval()
    b = token_batch(4, 6)
    attr = sdi_torch.Attributor(m, m.block, item_normalised_loss, sdi_core.Exact(), progress=False)
    with pytest.raises(SDIError, match=r"check_rows: example 0 of a batch of 4 .*batch-level reduction"):
        attr.featurize([b])
    off = sdi_torch.Attributor(m, m.block, item_normalised_loss, sdi_core.Exact(), progress=False,
                               check_rows=False)
    assert off.featurize([b]).n_examples == 4


class BNBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(D)

    def forward(self, h):
        return h + self.bn(self.lin(h).transpose(1, 2)).transpose(1, 2)


def test_batch_norm_in_train_mode_is_refused():
    m = PatternModel("plain")
    m.block = BNBody()
    # In train mode the tracker sees batch statistics mixing the examples; the capture refuses at the use
    # that reads them (the next step's Linear).
    loop = [m.block.lin.weight, m.block.lin.bias]
    attr = sdi_torch.Attributor(m, loop, token_loss, sdi_core.Exact(), progress=False, train_mode=True)
    with pytest.raises(SDIError, match="batch norm in train mode"):
        attr.featurize([token_batch(4, 6)])
    m.eval()  # running statistics: rows independent, exact
    got = sdi_torch.Attributor(m, loop, token_loss, sdi_core.Exact(), progress=False).featurize([token_batch(4, 6)])
    assert got.steps["loop"] == TAU


# --------------------------------------------------------------------------- uses without a factor form


class OddUsesBody(nn.Module):
    """Selected weights used through einsum, batch norm's affine and a division."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(D, D) / D ** 0.5)
        self.s = nn.Parameter(torch.rand(D) + 0.5)
        self.bn = nn.BatchNorm1d(D)

    def forward(self, h):
        if self.how == "einsum_linear":  # a linear map written as einsum: captured as a linear use
            z = torch.einsum("btd,ed->bte", h, self.w)
        elif self.how == "einsum_seq_first":
            z = torch.einsum("tbd,de->bte", h.transpose(0, 1), self.w)
        elif self.how == "einsum_bilinear":  # no factor form: the exact per-example gradient
            z = torch.einsum("btd,de,bte->bt", h, self.w, h)[..., None] * h
        elif self.how == "divide":
            z = h / self.s
        else:  # batch norm in eval mode with its affine weight and bias
            z = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return h + torch.tanh(z)


@pytest.mark.parametrize("B,T", [(4, 6), (6, 6)], ids=["B!=T", "B==T"])
@pytest.mark.parametrize("how", ["einsum_linear", "einsum_seq_first", "einsum_bilinear", "divide", "batch_norm"])
def test_uses_without_a_factor_form_are_exact(how, B, T):
    m = PatternModel("plain")
    m.block = OddUsesBody(how)
    m.eval()
    batch = token_batch(B, T)
    assert_exact(m, m.block, batch)  # fallback="dense", the default
    strict = sdi_torch.Attributor(m, m.block, token_loss, sdi_core.Exact(), progress=False, fallback="error")
    if how in ("einsum_linear", "einsum_seq_first"):
        strict.featurize([batch])  # captured as linear uses: no fallback involved
    else:
        with pytest.raises(SDIError, match="does not understand"):
            strict.featurize([batch])


# --------------------------------------------------------------------------- coverage report


def test_coverage_report_counts_uses_kinds_and_steps_with_gradient():
    m = PatternModel("no_grad_prefix")
    m.block = OddUsesBody("divide")
    m.eval()
    got = sdi_torch.Attributor(m, m.block, token_loss, sdi_core.Exact(), progress=False,
                               groups={"prelude": [m.emb], "coda": [m.head]}).featurize([token_batch(4, 6)])
    cov = got.meta["coverage"]
    assert cov.steps_run == {"prelude": 1, "loop": TAU, "coda": 1}
    assert cov.steps_with_grad == {"prelude": 1, "loop": TAU - 1, "coda": 1}  # step 0 ran under no_grad
    assert cov.uses["block.s"] == {1: {"dense": 1}, 2: {"dense": 1}}  # x / s: the exact fallback
    assert cov.uses["emb.weight"] == {0: {"embedding": 1}}
    assert cov.uses["head.weight"] == {0: {"linear": 1}} and cov.uses["head.bias"] == {0: {"bias": 1}}
    assert cov.unused == ["block.w", "block.bn.weight", "block.bn.bias"]  # "divide" uses s only
    text = cov.describe()
    assert "group 'loop': 3 step slot(s) run, 2 with gradient" in text
    assert "block.s: dense x2; steps 1-2; 1 use(s) per step" in text
    assert sdi_core.Coverage.from_dict(cov.to_dict()) == cov
