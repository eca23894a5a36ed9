"""Attribute an Equinox looped model with sdi_jax (plain JAX works the same way: any params pytree).

Run it: ``python docs/tutorials/attribute_an_equinox_model.py`` (seconds; needs ``pip install -e ".[jax]" equinox``).

sdi_jax takes a pure loss ``loss_fn(params, batch) -> [B]`` over a pytree. An Equinox model is a pytree:
split it into its arrays (the params) and the rest with ``eqx.partition``, and select the loop body with a
function of the params (``lambda p: p.block``). The loss is traced to a jaxpr and every use of the selected
leaves is found there, one perturbation per loop iteration; nothing in the model is rewritten.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import sdi_core
import sdi_jax

VOCAB, WIDTH, STEPS = 10, 16, 4


class Looped(eqx.Module):
    embed: eqx.nn.Embedding
    block: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=k1)
        self.block = eqx.nn.Linear(WIDTH, WIDTH, key=k2)
        self.head = eqx.nn.Linear(WIDTH, VOCAB, key=k3)

    def __call__(self, token):                      # one example, one token: Equinox's style
        h = self.embed(token)
        for _ in range(STEPS):                      # the loop: the block's weights are shared by the steps
            h = h + jnp.tanh(self.block(h))
        return self.head(h)


model = Looped(jax.random.PRNGKey(0))
params, static = eqx.partition(model, eqx.is_array)


def loss_fn(params, batch):
    m = eqx.combine(params, static)
    logits = jax.vmap(m)(batch["tokens"])           # [B, VOCAB]
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, batch["targets"][:, None], axis=1)[:, 0]   # [B]: one loss per example


def batches(n, seed, size=8):
    g = np.random.default_rng(seed)
    tokens = g.integers(0, VOCAB, size=n)
    return [{"tokens": tokens[i:i + size], "targets": (tokens[i:i + size] + 1) % VOCAB} for i in range(0, n, size)]


train, query = batches(32, 1), batches(4, 2)
attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p.block, groups={"embed": lambda p: p.embed, "head": lambda p: p.head},
                          sketch=sdi_core.TensorSketch(dim=64, seed=0), steps=STEPS, params=params, progress=False)
print(attr.capture_plan(params, train[0]).describe())
ckpts = [sdi_core.Checkpoint(params, eta=0.1)]
res = sdi_core.influence(attr.featurize(train, ckpts, summed=True), attr.featurize(query, ckpts))
print("slots:", res.query_slot_labels)
assert res.query_slot_labels[:STEPS] == [f"loop[{s}]" for s in range(STEPS)]
# Conservation: the loop steps and the side groups sum to TracIn.
np.testing.assert_allclose(np.asarray(res.trajectory).sum(-1), np.asarray(res.tracin), rtol=1e-4, atol=1e-6)

# Exactness against autodiff: with Exact() the loop features summed over the steps are the gradient of each
# example's loss with respect to the shared block weights (equation (1) of "SDI from scratch").
exact = sdi_jax.Attributor(loss_fn, loop=lambda p: p.block, sketch=sdi_core.Exact(), steps=STEPS, params=params,
                           progress=False).featurize(query[:1])
grads = jax.vmap(jax.grad(lambda p, t, y: loss_fn(p, {"tokens": t[None], "targets": y[None]})[0]),
                 in_axes=(None, 0, 0))(params, query[0]["tokens"], query[0]["targets"])
names = list(exact.layout.group("loop").params)
flat = {n: v for n, v in zip(names, [grads.block.weight, grads.block.bias])}
got = np.asarray(exact.data[0]["loop"]).sum(axis=1)             # [B, numel of the block]
want = np.concatenate([np.asarray(flat[n]).reshape(4, -1) for n in names], axis=1)
np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
print("Equinox tutorial: conservation and exactness hold.")
