"""One vocabulary across sdi_torch and sdi_jax: the same names and defaults for the same concepts."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import sdi_core  # noqa: E402
import sdi_jax  # noqa: E402
import sdi_torch  # noqa: E402
from sdi_core import Checkpoint  # noqa: E402

# Parameters that exist in one backend only, by nature of the framework, with why.
ONLY_TORCH = {
    "model": "a torch model holds its weights; a JAX loss takes them as an argument",
    "train_mode": "JAX has no train/eval mode",
    "batch_size": "torch's capture may need the batch size of a use that does not depend on the batch",
    "fast_path": "torch's native kernels",
    "chunk_size": "torch.func chunking of the untied baseline",
}
ONLY_JAX = {
    "batch_axes": "vmap-style example axes of the batch pytree",
    "order": "pytree leaves have no definition order",
    "jit": "jax.jit of the featurisation",
    "params": "the current weights of a pure loss (torch: the model's own)",
    "extra": "deprecated name of groups",
    "tau": "the untied loss's loop count is static in JAX",
    "transposed": "JAX kernels stored (d_in, d_out)",
}
DEPRECATED_TORCH_FEATURIZE = {"steps"}
# Same name, different default, with why.
DIFFERENT_DEFAULT = {
    "loop": "required in torch (positional, a module or parameters); sdi_jax also takes None: no loop group",
}


def _params(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def _compare(torch_fn, jax_fn, what: str, skip_torch=(), skip_jax=()) -> set:
    t, j = _params(torch_fn), _params(jax_fn)
    t = {k: v for k, v in t.items() if k not in ONLY_TORCH and k not in skip_torch}
    j = {k: v for k, v in j.items() if k not in ONLY_JAX and k not in skip_jax}
    assert set(t) == set(j), f"{what}: torch-only {sorted(set(t) - set(j))}, jax-only {sorted(set(j) - set(t))}"
    for k in t:
        if k in DIFFERENT_DEFAULT:
            continue
        assert t[k] == j[k], f"{what}({k}=...): default {t[k]!r} in sdi_torch, {j[k]!r} in sdi_jax"
    return set(t)


def test_attributor_constructors_share_names_and_defaults():
    shared = _compare(sdi_torch.Attributor.__init__, sdi_jax.Attributor.__init__, "Attributor")
    assert {"loop", "loss_fn", "sketch", "groups", "steps", "progress", "check_rows", "fallback"} <= shared, shared


def test_featurize_shares_names_and_defaults():
    shared = _compare(sdi_torch.Attributor.featurize, sdi_jax.Attributor.featurize, "Attributor.featurize",
                      skip_torch=DEPRECATED_TORCH_FEATURIZE)
    assert shared == {"batches", "checkpoints", "example_ids", "progress", "summed"}, shared
    assert _params(sdi_torch.Attributor.featurize)["checkpoints"] is None


def test_untied_baselines_share_the_name_and_arguments():
    shared = _compare(sdi_torch.untied_baseline, sdi_jax.untied_baseline, "untied_baseline",
                      skip_torch={"loss_fn"},
                      skip_jax={"untied_loss_fn", "example_ids"})  # torch's untied baseline numbers rows itself
    assert {"loop", "batches", "groups", "checkpoints", "summed"} <= shared, shared


# ----------------------------------------------------------------------------- behaviour behind the names


def _jax_toy():
    import jax.numpy as jnp

    params = {"block": {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)), dtype=jnp.float32)},
              "head": {"w": jnp.ones((3,), dtype=jnp.float32)}}

    def loss(p, batch):
        h = batch["x"]
        for _ in range(2):
            h = jnp.tanh(h @ p["block"]["w"])
        return (h @ p["head"]["w"] - batch["y"]) ** 2

    batch = {"x": np.ones((4, 3), np.float32), "y": np.zeros(4, np.float32)}
    return params, loss, batch


def test_jax_side_groups_checkpoints_default_and_meta():
    params, loss, batch = _jax_toy()
    kw = dict(loop=lambda p: p["block"], sketch=sdi_core.Exact(), progress=False, steps=2)
    attr = sdi_jax.Attributor(loss, groups={"coda": lambda p: p["head"]}, params=params, **kw)
    f = attr.featurize([batch])  # checkpoints=None: the Attributor's params, eta 1
    assert f.meta["backend"] == "jax" and f.checkpoints[0].eta == 1.0 and "coda" in f.data[0]
    g = attr.featurize([batch], [Checkpoint(params)])
    assert f.checkpoints[0].id == g.checkpoints[0].id
    np.testing.assert_array_equal(np.asarray(f.data[0]["loop"]), np.asarray(g.data[0]["loop"]))
    with pytest.warns(DeprecationWarning, match=r"extra=\.\.\.\) is deprecated"):
        old = sdi_jax.Attributor(loss, extra={"coda": lambda p: p["head"]}, **kw)
    np.testing.assert_array_equal(np.asarray(old.featurize([batch], [Checkpoint(params)]).data[0]["coda"]),
                                  np.asarray(g.data[0]["coda"]))
    with pytest.raises(sdi_core.SDIError, match="params"):
        sdi_jax.Attributor(loss, **kw).featurize([batch])
    assert sdi_jax.Attributor(loss, loop=lambda p: p["block"]).sketch == sdi_core.TensorSketch(dim=4096, seed=0)


def test_exact_features_is_the_deprecated_alias_of_untied_baseline():
    from sdi_core.reference.looped_transformer import LoopedConfig
    from sdi_jax import baseline, models

    cfg = LoopedConfig(vocab_size=5, d_model=4, n_heads=1, tau=2, max_len=4)
    params = models.init_params(cfg, seed=0)
    batch = {"tokens": np.arange(8).reshape(2, 4) % 5, "targets": np.ones((2, 4), np.int64)}
    ck = [Checkpoint(params)]
    new = sdi_jax.untied_baseline(baseline.looped_untied_loss(cfg), lambda p: p["block"], [batch], checkpoints=ck,
                                  tau=cfg.tau, transposed=models.is_linear_weight)
    with pytest.warns(DeprecationWarning, match="exact_features is deprecated"):
        old = sdi_jax.exact_features(baseline.looped_untied_loss(cfg), [batch], ck, loop=lambda p: p["block"],
                                     tau=cfg.tau, transposed=models.is_linear_weight)
    np.testing.assert_array_equal(np.asarray(new.data[0]["loop"]), np.asarray(old.data[0]["loop"]))
    with pytest.raises(sdi_core.SDIError, match="checkpoints="):
        sdi_jax.untied_baseline(baseline.looped_untied_loss(cfg), lambda p: p["block"], [batch], tau=cfg.tau)


def test_torch_meta_backend_and_one_load_checkpoint():
    from sdi_torch import train as train_mod

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))

    class Looped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = model[0], model[1]

        def forward(self, x):
            for _ in range(2):
                x = torch.tanh(self.body(x))
            return self.head(x)[:, 0]

    m = Looped().eval()
    attr = sdi_torch.Attributor(m, loop=m.body, loss_fn=lambda mm, b: (mm(b["x"]) - b["y"]) ** 2,
                                sketch=sdi_core.Exact(), progress=False, steps=2)
    f = attr.featurize([{"x": torch.ones(4, 3), "y": torch.zeros(4)}])
    assert f.meta["backend"] == "torch"
    assert sdi_torch.load_checkpoint.__module__ == "sdi_torch.attributor"
    assert hasattr(train_mod, "load_model") and "Deprecated" in train_mod.load_checkpoint.__doc__
