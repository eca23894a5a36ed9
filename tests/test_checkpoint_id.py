"""sdi_core.checkpoint_id: equal weights, equal ids, in every backend; any change of a value changes it."""
from __future__ import annotations

import numpy as np
import pytest

import sdi_core
from sdi_core import Checkpoint, checkpoint_id
from sdi_core.reference.looped_transformer import LoopedConfig, init_weights

CFG = LoopedConfig(vocab_size=7, d_model=8, n_heads=2, tau=2, max_len=6)


def test_id_is_a_hash_of_values_names_and_orientation_free_matrices():
    w = init_weights(CFG, 0)
    ident = checkpoint_id(w)
    assert ident.startswith("weights:") and len(ident) == len("weights:") + 16
    assert checkpoint_id({k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}) != ident, \
        "rounding the values to float32 changes them, so it must change the id"
    w32 = {k: v.astype(np.float32) for k, v in w.items()}
    assert checkpoint_id(w32) == checkpoint_id({k: v.astype(np.float64) for k, v in w32.items()}), \
        "a float32 array and its exact float64 copy hold the same values"
    assert checkpoint_id({k: (v.T if v.ndim == 2 else v) for k, v in w.items()}) == ident, \
        "a kernel stored (d_in, d_out) is the same weight as its (d_out, d_in) transpose"
    changed = dict(w)
    name = "block.mlp.fc1.weight"
    changed[name] = w[name].copy()
    changed[name][1, 2] += 1e-12
    assert checkpoint_id(changed) != ident, "a change of one value must change the id"
    renamed = dict(w)
    renamed["other.name"] = renamed.pop(name)
    assert checkpoint_id(renamed) != ident, "names enter the id"
    assert checkpoint_id(dict(reversed(list(w.items())))) == ident, "the order of the mapping does not"


def test_same_weights_same_id_in_torch_jax_and_the_numpy_reference(jax_x64):
    torch = pytest.importorskip("torch")
    from sdi_jax import models as jm, named_leaves
    from sdi_torch.models import LoopedGPT

    w = init_weights(CFG, 1)
    model = LoopedGPT.from_numpy(CFG, w)
    params = jm.params_from_numpy(w, CFG)  # linear kernels stored (d_in, d_out)
    ids = {
        "numpy": checkpoint_id(w),
        "torch state_dict": checkpoint_id(model.state_dict()),
        "torch float32": checkpoint_id(LoopedGPT.from_numpy(CFG, {k: v.astype(np.float32).astype(np.float64)
                                                                for k, v in w.items()}, dtype=torch.float32)
                                       .state_dict()),
        "jax params": checkpoint_id(named_leaves(params)),
    }
    assert ids["numpy"] == ids["torch state_dict"] == ids["jax params"], ids
    assert ids["torch float32"] != ids["numpy"], "float32-rounded weights are different weights"


def test_unnamed_checkpoints_get_the_same_id_from_every_featurize(jax_x64):
    """The ids that both Attributors and both untied baselines record for the same weights agree."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    import sdi_jax
    import sdi_torch
    from sdi_jax import models as jm
    from sdi_jax.baseline import looped_untied_loss, untied_baseline
    from sdi_torch.models import LoopedGPT, per_example_loss

    w = init_weights(CFG, 2)
    tokens = np.random.default_rng(0).integers(0, 7, (2, 5))
    model = LoopedGPT.from_numpy(CFG, w).eval()
    sketch = sdi_core.TensorSketch(dim=16, seed=0)
    tb = {"tokens": torch.as_tensor(tokens), "targets": torch.as_tensor(np.roll(tokens, 1, 1))}
    attr = sdi_torch.Attributor(model, model.block, per_example_loss, sketch, progress=False)
    params = jm.params_from_numpy(w, CFG)
    jb = {k: jnp.asarray(np.asarray(v)) for k, v in tb.items()}
    j_attr = sdi_jax.Attributor(lambda p, b: jm.per_example_loss(p, b, CFG), loop=lambda p: p["block"],
                                sketch=sketch, progress=False)
    ids = {
        "torch, Checkpoint(state_dict)": attr.featurize([tb], [Checkpoint(model.state_dict())]).checkpoints[0].id,
        "torch, current weights": attr.featurize([tb]).checkpoints[0].id,
        "torch untied baseline": sdi_torch.untied_baseline(model, model.block, per_example_loss, [tb])
        .checkpoints[0].id,
        "jax, Checkpoint(params)": j_attr.featurize([jb], [Checkpoint(params)]).checkpoints[0].id,
        "jax untied baseline": untied_baseline(looped_untied_loss(CFG), lambda p: p["block"], [jb],
                                               checkpoints=[Checkpoint(params)], tau=CFG.tau,
                                               transposed=jm.is_linear_weight).checkpoints[0].id,
    }
    assert set(ids.values()) == {checkpoint_id(w)}, ids


def test_torch_and_jax_features_of_the_same_unnamed_weights_combine(jax_x64):
    """Train features from sdi_torch, query features from sdi_jax, both at Checkpoint(weights) without a name:
    same checkpoint id, layouts matched by name, and the trajectory equals the single-backend one."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    import sdi_jax
    import sdi_torch
    from sdi_jax import models as jm
    from sdi_torch.models import LoopedGPT, per_example_loss

    w = init_weights(CFG, 3)
    rng = np.random.default_rng(1)
    train_tokens, query_tokens = rng.integers(0, 7, (5, 6)), rng.integers(0, 7, (3, 6))
    sketch = sdi_core.TensorSketch(dim=32, seed=2)
    model = LoopedGPT.from_numpy(CFG, w).eval()
    t_attr = sdi_torch.Attributor(model, model.block, per_example_loss, sketch, progress=False)
    j_attr = sdi_jax.Attributor(lambda p, b: jm.per_example_loss(p, b, CFG), loop=lambda p: p["block"],
                                sketch=sketch, progress=False)

    def tb(tokens):
        return {"tokens": torch.as_tensor(tokens), "targets": torch.as_tensor(np.roll(tokens, 1, 1))}

    def jb(tokens):
        return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, 1, 1))}

    train = t_attr.featurize([tb(train_tokens)], [Checkpoint(model.state_dict(), eta=0.5)])
    query_t = t_attr.featurize([tb(query_tokens)], [Checkpoint(model.state_dict(), eta=0.5)])
    query_j = j_attr.featurize([jb(query_tokens)], [Checkpoint(jm.params_from_numpy(w, CFG), eta=0.5)])
    assert query_j.checkpoints == query_t.checkpoints
    want = np.asarray(sdi_core.influence(train.to_numpy(), query_t.to_numpy()).trajectory)
    got = np.asarray(sdi_core.influence(train.to_numpy(), query_j.to_numpy()).trajectory)
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max(), np.abs(got - want).max()
