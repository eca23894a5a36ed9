"""sdi_torch capture: exact factors and exact features against independent ground truth (float64).

- The PyTorch looped transformer's factor stream equals the NumPy reference's
  (hand-written backward) to 1e-10, use by use, in forward step order.
- With ``sdi_core.Exact()``, features, trajectories and TracIn equal the
  untied ``torch.func`` baseline (no capture involved) to 1e-10 on models
  that exercise every capture path: the looped transformer (prelude, coda,
  tied unembedding, early exit, input injection), a body that borrows
  another module's weight through ``F.linear``, GPT-2 ``Conv1D`` / ``addmm``,
  hand-written and built-in RMSNorm, ``x @ W`` and ``W @ x``, a derived
  scale ``x * (1 + w)``, ``nn.MultiheadAttention`` (self and cross attention,
  sliced ``in_proj_weight``), a step whose output never reaches the loss,
  and non-reentrant activation checkpointing.
- TensorSketch features equal the sketch of the exact gradients (linearity),
  for both outer-product routes.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import sdi_core  # noqa: E402
from sdi_core.reference import looped_transformer as lt  # noqa: E402
import sdi_torch  # noqa: E402
from sdi_torch.models import LoopedGPT, per_example_loss  # noqa: E402

TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small float64 ops are dominated by thread wake-ups on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------ toy models


class BorrowBody(nn.Module):
    """Loop body that calls ``F.linear`` with the weight of a module it does not own."""

    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d, bias=False)
        self.fc = nn.Linear(d, 2 * d)

    def forward(self, h, proj: nn.Linear):
        a, b = self.fc(self.ln(h)).chunk(2, dim=-1)
        return h + F.linear(torch.tanh(a) * torch.sigmoid(b), proj.weight, proj.bias)


class BorrowModel(nn.Module):
    def __init__(self, V=11, d=8, tau=3):
        super().__init__()
        self.tau = tau
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.body = BorrowBody(d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)

    def forward(self, tokens):
        h = self.emb(tokens)
        for _ in range(self.tau):
            h = self.body(h, self.proj)
        return self.head(h)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored (d_in, d_out), applied with addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class HandRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GPT2Body(nn.Module):
    """Conv1D MLP, two RMSNorms, a mixing matrix applied from the left, a derived gate ``x * (1 + g)``."""

    def __init__(self, d):
        super().__init__()
        self.norm1 = HandRMSNorm(d)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)
        self.c_fc = Conv1D(2 * d, d)
        self.c_proj = Conv1D(d, 2 * d)
        self.mix = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.read = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.gate = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, h):
        x = self.norm1(h)
        y = self.c_proj(F.gelu(self.c_fc(x)))
        z = (self.mix @ self.norm2(h).transpose(1, 2)).transpose(1, 2)  # W @ x
        return h + y * (1 + self.gate) + torch.tanh(z) @ self.read  # x @ W


class TiedGPT2(nn.Module):
    """Tied embedding/unembedding (``h @ emb.weight.T``), a learned positional table sliced per call."""

    def __init__(self, V=11, d=8, tau=3, max_len=8):
        super().__init__()
        self.tau = tau
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(0.3 * torch.randn(max_len, d))
        self.body = GPT2Body(d)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        for _ in range(self.tau):
            h = self.body(h)
        return h @ self.emb.weight.T


class MHABody(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.ln = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h, memory):
        T = h.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        a = self.ln(h)
        h = h + self.attn(a, a, a, attn_mask=causal, need_weights=False)[0]
        h = h + self.cross(h, memory, memory, need_weights=False)[0]  # q != k: sliced in_proj_weight
        return h + self.fc(torch.relu(self.ln2(h)))


class MHAModel(nn.Module):
    def __init__(self, V=11, d=8, tau=3):
        super().__init__()
        self.tau = tau
        self.emb = nn.Embedding(V, d)
        self.body = MHABody(d)
        self.head = nn.Linear(d, V)

    def forward(self, tokens):
        e = self.emb(tokens)
        h = e
        for _ in range(self.tau):
            h = self.body(h, e)
        return self.head(h)


class DiscardLast(nn.Module):
    """Runs tau + 1 steps, but the loss reads the state after step tau: the last step never reaches it."""

    def __init__(self, V=11, d=8, tau=3, checkpointed=False):
        super().__init__()
        self.tau, self.checkpointed = tau, checkpointed
        self.emb = nn.Embedding(V, d)
        self.body = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh())
        self.head = nn.Linear(d, V)

    def forward(self, tokens):
        h = self.emb(tokens)
        states = []
        for _ in range(self.tau + 1):
            if self.checkpointed:
                h = h + checkpoint(self.body, h, use_reentrant=False)
            else:
                h = h + self.body(h)
            states.append(h)
        return self.head(states[-2])


def token_loss(model, batch):
    logits = model(batch["tokens"])
    nll = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    return nll.view(batch["targets"].shape).mean(-1)


def token_batch(seed, B=4, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, V, (B, T), generator=g), "targets": torch.randint(0, V, (B, T), generator=g)}


def make_toy(name):
    torch.manual_seed(0)
    if name == "borrow":
        m = BorrowModel()
        return m.double().eval(), [m.body, m.proj], {"prelude": [m.emb], "coda": [m.head]}
    if name == "tied_gpt2":
        m = TiedGPT2()
        return m.double().eval(), m.body, {"prelude": [m.emb, m.pos]}
    if name == "mha":
        m = MHAModel()
        return m.double().eval(), m.body, {"prelude": [m.emb], "coda": [m.head]}
    if name == "discard_last":
        m = DiscardLast()
        return m.double().eval(), m.body, {"coda": [m.head]}
    if name == "checkpointed":
        m = DiscardLast(checkpointed=True)
        return m.double().eval(), m.body, {"prelude": [m.emb], "coda": [m.head]}
    raise KeyError(name)


TOYS = ["borrow", "tied_gpt2", "mha", "discard_last", "checkpointed"]


# ---------------------------------------------------------------------- the looped transformer

LT_CASES = {
    "plain": (dict(), {}),
    "prelude_coda_tied_injection": (dict(n_prelude=1, n_coda=1, tie_embeddings=True, input_injection=True), {}),
    "early_exit": (dict(n_coda=1), {"n_steps": np.array([3, 1, 0, 2])}),
    "early_exit_tied": (dict(tie_embeddings=True, input_injection=True), {"n_steps": np.array([0, 2, 3, 1])}),
}


def lt_case(name, seed=0, B=4, T=5):
    kw, extra = LT_CASES[name]
    config = lt.LoopedConfig(vocab_size=7, d_model=8, n_heads=2, tau=3, max_len=T + 1, **kw)
    weights = lt.init_weights(config, seed)
    rng = np.random.default_rng(seed + 100)
    targets = rng.integers(0, 7, (B, T))
    targets[0, :2] = lt.IGNORE_INDEX
    batch = {"tokens": rng.integers(0, 7, (B, T)), "targets": targets}
    if "n_steps" in extra:
        batch["n_steps"] = extra["n_steps"]
    return config, weights, batch


def lt_groups(model, config):
    groups = {"prelude": [model.tok_emb, model.pos_emb, *model.prelude]}
    groups["coda"] = [*model.coda, model.ln_f] + ([] if config.tie_embeddings else [model.head])
    return groups


def to_torch(batch):
    return {k: torch.as_tensor(v) for k, v in batch.items()}


@pytest.mark.parametrize("case", sorted(LT_CASES))
def test_factor_stream_equals_numpy_reference(case):
    config, weights, batch = lt_case(case)
    model = LoopedGPT.from_numpy(config, weights).eval()
    loss, uses, steps = sdi_torch.capture_factors(model, model.block, per_example_loss, to_torch(batch),
                                                  groups=lt_groups(model, config))
    ref_loss, ref_uses = lt.loss_and_factors(weights, config, batch)
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=0, atol=TOL)
    assert steps == {"prelude": 1, "loop": config.tau, "coda": 1}
    assert len(uses) == len(ref_uses), f"[{case}] {len(uses)} captured uses, reference has {len(ref_uses)}"
    assert [u.use_index for u in uses] == list(range(len(uses)))
    for got, want in zip(uses, ref_uses):
        where = f"[{case}] use {want.use_index} ({want.param}, step {want.step})"
        assert (got.param, got.step, got.kind) == (want.param, want.step, want.kind), where
        if want.activation is not None:
            np.testing.assert_allclose(got.activation.numpy(), np.asarray(want.activation), rtol=0, atol=TOL,
                                       err_msg=where)
        np.testing.assert_allclose(got.grad_output.numpy(), want.grad_output, rtol=0, atol=TOL, err_msg=where)


def _assert_same_features(got, want, what):
    assert got.steps == want.steps, f"{what}: steps {got.steps} != {want.steps}"
    assert got.layout.diff(want.layout) is None, what
    for k, (a, b) in enumerate(zip(got.data, want.data)):
        for g in b:
            scale = max(1.0, float(b[g].abs().max()))
            err = float((a[g] - b[g]).abs().max())
            assert err <= TOL * scale, f"{what}: checkpoint {k} group {g!r} differs by {err:.3g} (scale {scale:.3g})"


def _assert_same_influence(got_tr, got_q, want_tr, want_q, what):
    r1, r2 = sdi_core.influence(got_tr, got_q), sdi_core.influence(want_tr, want_q)
    scale = max(1.0, float(r2.trajectory.abs().max()))
    for attr in ("trajectory", "tracin", "train_trajectory"):
        a, b = getattr(r1, attr), getattr(r2, attr)
        assert a.shape == b.shape, f"{what}: {attr} shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        err = float((a - b).abs().max())
        assert err <= TOL * scale, f"{what}: {attr} differs from the untied baseline by {err:.3g}"
    cons = float((r1.trajectory.sum(-1) - r1.tracin).abs().max())
    assert cons <= TOL * scale, f"{what}: trajectory does not sum to TracIn ({cons:.3g})"


@pytest.mark.parametrize("case", sorted(LT_CASES))
def test_looped_transformer_exact_equals_untied_baseline(case):
    config, weights, batch = lt_case(case)
    model = LoopedGPT.from_numpy(config, weights).eval()
    groups = lt_groups(model, config)
    train = [to_torch(batch), to_torch(lt_case(case, seed=1)[2])]
    query = [to_torch(lt_case(case, seed=2)[2])]
    attr = sdi_torch.Attributor(model, model.block, per_example_loss, sdi_core.Exact(), groups=groups, progress=False)
    ftr, fq = attr.featurize(train), attr.featurize(query)
    btr = sdi_torch.untied_baseline(model, model.block, per_example_loss, train, groups=groups)
    bq = sdi_torch.untied_baseline(model, model.block, per_example_loss, query, groups=groups)
    _assert_same_features(ftr, btr, f"[{case}] train")
    _assert_same_influence(ftr, fq, btr, bq, f"[{case}]")
    if "n_steps" in batch:  # examples that exited early have zero features at the steps they skipped
        n_steps = batch["n_steps"]
        loop = ftr.data[0]["loop"][: len(n_steps)]
        skipped = [loop[b, n:] for b, n in enumerate(n_steps) if n < config.tau]
        assert skipped and all(float(x.abs().max()) == 0.0 for x in skipped)


def test_loop_given_as_parameters_equals_loop_module():
    config, weights, batch = lt_case("plain")
    model = LoopedGPT.from_numpy(config, weights).eval()
    loss = per_example_loss
    by_module = sdi_torch.Attributor(model, model.block, loss, sdi_core.Exact(), progress=False)
    by_params = sdi_torch.Attributor(model, list(model.block.parameters()), loss, sdi_core.Exact(), progress=False)
    by_names = sdi_torch.Attributor(model, [n for n, _ in model.named_parameters() if n.startswith("block.")], loss,
                                    sdi_core.Exact(), progress=False)
    want = by_module.featurize([to_torch(batch)])
    _assert_same_features(by_params.featurize([to_torch(batch)]), want, "loop=parameters")
    _assert_same_features(by_names.featurize([to_torch(batch)]), want, "loop=names")


@pytest.mark.parametrize("name", TOYS)
def test_toy_models_exact_equal_untied_baseline(name):
    model, loop, groups = make_toy(name)
    train = [token_batch(1), token_batch(2, B=3)]
    query = [token_batch(3)]
    attr = sdi_torch.Attributor(model, loop, token_loss, sdi_core.Exact(), groups=groups, progress=False)
    ftr, fq = attr.featurize(train), attr.featurize(query)
    if name == "checkpointed":  # torch.func cannot differentiate through checkpointing: same model, not checkpointed
        model.checkpointed = False
    btr = sdi_torch.untied_baseline(model, loop, token_loss, train, groups=groups)
    bq = sdi_torch.untied_baseline(model, loop, token_loss, query, groups=groups)
    _assert_same_features(ftr, btr, f"[{name}] train")
    _assert_same_influence(ftr, fq, btr, bq, f"[{name}]")
    assert float(ftr.data[0]["loop"].abs().max()) > 0, f"[{name}] all-zero loop features: the test would be vacuous"
    if name in ("discard_last", "checkpointed"):
        assert ftr.steps["loop"] == model.tau + 1
        assert float(ftr.data[0]["loop"][:, -1].abs().max()) == 0.0, "a step that never reaches the loss must be 0"
        assert float(ftr.data[0]["loop"][:, -2].abs().max()) > 0


@pytest.mark.parametrize("route", ["exact_hash", "fft"])
def test_sketched_features_equal_sketch_of_exact_gradients(route):
    """Linearity: TensorSketch features == the combined-hash CountSketch of the exact per-step gradients."""
    model, loop, groups = make_toy("tied_gpt2")
    batch = token_batch(5)
    sketch = sdi_core.TensorSketch(dim=32, seed=3, route=route)
    feats = sdi_torch.Attributor(model, loop, token_loss, sketch, groups=groups, progress=False).featurize([batch])
    grads, steps = sdi_torch.untied_gradients(model, loop, token_loss, batch, groups=groups)
    plan = sdi_core.SketchPlan(sketch, sdi_torch.resolve_selection(model, loop, groups).infos)
    n_sketched = 0
    for g in plan.layout.groups:
        for name, (lo, hi) in zip(g.params, g.offsets):
            spec = plan.spec(name)
            exact = grads[name].reshape(grads[name].shape[0], grads[name].shape[1], -1)
            want = exact if spec.mode == "exact" else sdi_core.countsketch(exact, spec.flat_table(), method="portable")
            n_sketched += spec.mode != "exact"
            got = feats.data[0][g.name][:, :, lo:hi]
            err = float((got - want).abs().max())
            assert err <= TOL * max(1.0, float(want.abs().max())), f"{name} ({spec.mode}, {route}) differs by {err:.3g}"
    assert n_sketched >= 5, "the test must exercise TensorSketch, not only exact storage"


def test_features_do_not_depend_on_batching():
    config, weights, batch = lt_case("early_exit")
    model = LoopedGPT.from_numpy(config, weights).eval()
    attr = sdi_torch.Attributor(model, model.block, per_example_loss, sdi_core.TensorSketch(64, seed=1),
                                groups=lt_groups(model, config), progress=False)
    tb = to_torch(batch)
    whole = attr.featurize([tb])
    split = attr.featurize([{k: v[:1] for k, v in tb.items()}, {k: v[1:] for k, v in tb.items()}])
    _assert_same_features(split, whole, "batch split")


@pytest.mark.parametrize("name", ["borrow", "tied_gpt2", "mha"])
def test_fast_path_equals_core_sketcher_on_toy_models(name):
    """Padding ids in the scattered embedding hash, swapped Conv1D factors, row slices of in_proj_weight."""
    model, loop, groups = make_toy(name)
    batches = [token_batch(7), token_batch(8, B=3)]
    sketch = sdi_core.TensorSketch(dim=32, seed=2, route="exact_hash")
    fast = sdi_torch.Attributor(model, loop, token_loss, sketch, groups=groups, progress=False).featurize(batches)
    core = sdi_torch.Attributor(model, loop, token_loss, sketch, groups=groups, progress=False,
                                fast_path=False).featurize(batches)
    for g in core.data[0]:
        want = core.data[0][g]
        err = float((fast.data[0][g] - want).abs().max())
        assert err <= TOL * max(1.0, float(want.abs().max())), f"[{name}] group {g!r}: fast path differs by {err:.3g}"
    assert any(int((b["tokens"] == 0).sum()) > 0 for b in batches), "the batches must contain padding ids"
