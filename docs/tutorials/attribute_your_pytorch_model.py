"""Attribute your own PyTorch looped model, step by step.

Run it: ``python docs/tutorials/attribute_your_pytorch_model.py`` (seconds; needs ``pip install -e ".[torch]"``).

1. Write the model as usual; the loop is a module called once per step.
2. Write a per-example loss ``loss_fn(model, batch) -> [B]`` (not the batch mean).
3. ``sdi_torch.Attributor(model, loop=model.block, loss_fn=..., sketch=..., groups=...)``.
4. ``featurize`` the training and query batches at your checkpoints; ``sdi_core.influence`` scores them.
"""
import numpy as np
import torch
from torch import nn

import sdi_core
import sdi_torch

torch.manual_seed(0)
VOCAB, WIDTH, STEPS = 12, 16, 5


class Looped(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        for _ in range(STEPS):          # one call of self.block = one loop step
            h = h + self.block(h)
        return self.head(h)


def per_example_loss(model, batch):
    logits = model(batch["tokens"])
    return nn.functional.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none").mean(1)


def batches(n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, 6), generator=g)
    targets = torch.roll(tokens, 1, dims=1)
    return [{"tokens": tokens[i:i + size], "targets": targets[i:i + size]} for i in range(0, n, size)]


model = Looped().eval()
train, query = batches(32, 1), batches(4, 2)

# A few steps of training, keeping two checkpoints with the learning rate in force (TracIn's eta).
opt = torch.optim.SGD(model.parameters(), lr=0.1)
checkpoints = []
for step in range(1, 21):
    loss = per_example_loss(model, train[step % len(train)]).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step in (10, 20):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoints.append(sdi_core.Checkpoint(state, eta=0.1, step=step))

groups = {"embed": [model.embed], "head": [model.head]}    # parameters outside the loop: one slot each
attr = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss, groups=groups,
                            sketch=sdi_core.TensorSketch(dim=512, seed=0), progress=False)
f_train = attr.featurize(train, checkpoints, summed=True)  # the train side only needs the sum over steps
f_query = attr.featurize(query, checkpoints)                # per step: the query-step trajectory
res = sdi_core.influence(f_train, f_query)
print("slots:", res.query_slot_labels)
print("trajectory of the most influential train example on query 0:",
      np.round(res.trajectory[int(res.tracin[:, 0].argmax()), 0].numpy(), 4))

# Checks you can run on your own model.
# (a) Conservation: the steps sum to TracIn, for every sketch draw.
torch.testing.assert_close(res.trajectory.sum(-1), res.tracin, rtol=1e-4, atol=1e-6)
# (b) Exactness: with sdi_core.Exact() the features equal the untied baseline (one weight copy per step,
#     per-example gradients by torch.func), independent ground truth.
exact = sdi_torch.Attributor(model, loop=model.block, loss_fn=per_example_loss, groups=groups,
                             sketch=sdi_core.Exact(), progress=False).featurize(query, checkpoints)
base = sdi_torch.untied_baseline(model, model.block, per_example_loss, query, groups=groups, checkpoints=checkpoints)
for g in exact.data[0]:
    torch.testing.assert_close(exact.data[0][g], base.data[0][g], rtol=1e-4, atol=1e-6)
# (c) The model is left as it was: weights, hooks and mode restored.
assert not model.training and all(not m._forward_hooks for m in model.modules())
print("PyTorch tutorial: conservation and exactness hold.")
