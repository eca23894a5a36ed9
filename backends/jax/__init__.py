"""sdi_jax: the JAX backend of SDI (Step-Decomposed Influence).

Pure functions in, :class:`sdi_core.Features` out::

    import sdi_core, sdi_jax

    attr = sdi_jax.Attributor(loss_fn, loop=lambda p: p["block"], sketch=sdi_core.TensorSketch(4096, seed=0))
    train = attr.featurize(train_batches, checkpoints=[sdi_core.Checkpoint(params, eta=1e-3)])

``loss_fn(params, batch) -> [B]`` is traced to a jaxpr and the uses of the
selected leaves are found there (:mod:`sdi_jax.capture`); nothing is
rewritten by hand and ``jax.config`` is never touched.  The canonical looped
transformer lives in :mod:`sdi_jax.models`, the exact untied ``vmap(grad)``
baseline in :mod:`sdi_jax.baseline`.
"""

from .attributor import Attributor, named_leaves
from .capture import CapturePlan, leaf_names, loop_step

__all__ = ["Attributor", "CapturePlan", "leaf_names", "loop_step", "named_leaves"]
