"""A looped model of your own, ready for `sdi featurize --model my_looped_model:train_split`."""
import torch
from torch import nn

from sdi_core.app.user_model import UserModel

VOCAB, WIDTH, STEPS, LENGTH = 10, 16, 4, 8


class Looped(nn.Module):
    """Embed, apply one shared block STEPS times, read out: the block's weights are tied across steps."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.GELU())
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        for _ in range(STEPS):
            h = h + self.block(h)
        return self.head(h)


def per_example_loss(model, batch):
    """Mean cross-entropy of each example (one loss per row, not the batch mean)."""
    logits = model(batch["tokens"])
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
    return nll.mean(dim=1)


def _model():
    torch.manual_seed(0)
    return Looped().eval()


def _batches(n, seed, batch_size=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    targets = torch.roll(tokens, shifts=1, dims=1)  # predict the previous token
    return [{"tokens": tokens[i:i + batch_size], "targets": targets[i:i + batch_size],
             "ids": torch.arange(i, min(n, i + batch_size))} for i in range(0, n, batch_size)]


def train_split():
    model = _model()
    return UserModel(model=model, loss_fn=per_example_loss, loop=model.block, batches=_batches(64, seed=1),
                     groups={"embed": [model.embed], "head": [model.head]})


def query_split():
    model = _model()
    return UserModel(model=model, loss_fn=per_example_loss, loop=model.block, batches=_batches(8, seed=2),
                     groups={"embed": [model.embed], "head": [model.head]})
