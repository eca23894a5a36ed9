"""SDI from scratch, on the NumPy reference looped transformer (no framework).

Run it: ``python docs/tutorials/sdi_from_scratch.py`` (seconds). Every claim
below is checked with an ``assert``; the maths is in the comments beside the
code that computes it.

A looped model applies one block ``F`` with shared weights ``w`` for ``tau``
steps. Untie it: call ``w^(s)`` the copy used at step ``s``. The per-step
gradient of example ``z`` is ``phi_s(z) = dl(z)/dw^(s)``, and

    sum_s phi_s(z) = grad_w l(z)                          (1)

because the tied weight is the sum of its copies' contributions.
"""
import numpy as np

import sdi_core
from sdi_core.reference import brute_force
from sdi_core.reference import looped_transformer as ref

cfg = ref.LoopedConfig(vocab_size=8, d_model=8, n_heads=2, tau=3, max_len=6)
weights = ref.init_weights(cfg, seed=0)
rng = np.random.default_rng(0)


def data(n, seed):
    g = np.random.default_rng(seed)
    tokens = g.integers(0, cfg.vocab_size, size=(n, cfg.max_len))
    return {"tokens": tokens, "targets": np.roll(tokens, 1, axis=1)}


train, query = data(6, 1), data(3, 2)

# --- 1. One use's factors. The hand-written backward pass records, for every use of a weight, the input
# activation a_u and the gradient of the example's loss with respect to the use's output g_u. For a linear
# use y = a W^T at step s, the per-example gradient of that use is sum_u g_u a_u^T (u: token positions).
loss, uses = ref.loss_and_factors(weights, cfg, train, select=["block.mlp.fc1.weight"])
first = uses[0]
print(f"use 0: {first.param} at loop step {first.step}, kind {first.kind}, "
      f"activation {first.activation.shape}, grad_output {first.grad_output.shape}")
assert [u.step for u in uses] == [0, 1, 2], "one use per loop step, in forward order"
outer = np.einsum("bto,bti->boi", first.grad_output, first.activation)      # [B, d_out, d_in]

# --- 2. The per-step gradient phi_s is the sum of the uses at step s; (1) says they add up to the gradient.
phi = ref.per_step_gradients(weights, cfg, train, select=["block.mlp.fc1.weight"])["block.mlp.fc1.weight"]
assert phi.shape == (6, cfg.tau, 4 * cfg.d_model, cfg.d_model)
np.testing.assert_allclose(phi[:, 0], outer, rtol=1e-12, atol=1e-14)
full = ref.full_gradients(weights, cfg, train, select=["block.mlp.fc1.weight"])["block.mlp.fc1.weight"]
np.testing.assert_allclose(phi.sum(axis=1), full, rtol=1e-10, atol=1e-14)   # equation (1)

# --- 3. TensorSketch of an outer product, without forming it. With CountSketches CS_out (hash h_o, sign s_o)
# and CS_in (h_i, s_i) into m buckets,  TS(g a^T) = irfft(rfft(CS_out g) * rfft(CS_in a)),  which equals the
# CountSketch of vec(g a^T) with hash (h_o(i) + h_i(j)) mod m and sign s_o(i) s_i(j): an exact identity.
m = 16
plan = sdi_core.SketchPlan(sdi_core.TensorSketch(dim=m, seed=0), ref.param_infos(cfg, ["loop"]))
spec = plan.spec("block.mlp.fc1.weight")
g, a = first.grad_output[0, 0], first.activation[0, 0]                       # one token of one example
by_fft = brute_force.tensorsketch_by_fft(g, a, spec.h_rows, spec.s_rows, spec.h_cols, spec.s_cols, m)
by_definition = brute_force.tensorsketch_by_definition(np.outer(g, a), spec.h_rows, spec.s_rows, spec.h_cols,
                                                       spec.s_cols, m)
np.testing.assert_allclose(by_fft, by_definition, rtol=1e-10, atol=1e-12)

# --- 4. The trajectory. With checkpoints k and learning-rate weights eta_k,
#   I(i, j, t) = sum_k eta_k <sum_s phi_s(w_k; z_i), phi_t(w_k; z_j)>
# is how much training example i moved query j's loss through loop step t. Exact features (no sketch) first.
ckpts = [sdi_core.Checkpoint(weights, eta=0.1, name="k0"),
         sdi_core.Checkpoint(ref.init_weights(cfg, seed=1), eta=0.05, name="k1")]


def featurize(sketch, batch):
    from sdi_core.app.numpy_backend import ReferenceModel, featurize as run

    return run(ReferenceModel(cfg, weights), sketch, batch, ckpts, groups=("loop",))


exact = sdi_core.influence(featurize(sdi_core.Exact(), train), featurize(sdi_core.Exact(), query))
print("exact trajectory of train 0 on query 0 over the loop steps:", np.round(exact.trajectory[0, 0], 5))

# --- 5. The sum over steps is TracIn: sum_t I(i, j, t) = sum_k eta_k <grad l(w_k; z_i), grad l(w_k; z_j)>.
tracin = np.zeros((6, 3))
for ck in ckpts:
    gi = ref.full_gradients(ck.source, cfg, train, select=[p.name for p in ref.param_infos(cfg, ["loop"])])
    gj = ref.full_gradients(ck.source, cfg, query, select=list(gi))
    tracin += ck.eta * sum(gi[n].reshape(6, -1) @ gj[n].reshape(3, -1).T for n in gi)
np.testing.assert_allclose(exact.trajectory.sum(-1), tracin, rtol=1e-9, atol=1e-12)
np.testing.assert_allclose(exact.tracin, tracin, rtol=1e-9, atol=1e-12)

# The sketch is linear, so the same conservation holds for every sketch draw, and the sketched trajectory
# estimates the exact one without bias.
sketched = sdi_core.influence(featurize(sdi_core.TensorSketch(dim=256, seed=0), train),
                              featurize(sdi_core.TensorSketch(dim=256, seed=0), query))
np.testing.assert_allclose(sketched.trajectory.sum(-1), sketched.tracin, rtol=1e-9, atol=1e-12)
r = np.corrcoef(sketched.trajectory.ravel(), exact.trajectory.ravel())[0, 1]
print(f"sketch (dim 256) vs exact: Pearson {r:.3f}")
assert r > 0.9
print("SDI from scratch: every identity holds.")
