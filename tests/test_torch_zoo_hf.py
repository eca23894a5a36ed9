"""Hugging Face blocks built from configs with random weights (nothing downloaded), looped: exact or refused.

See tests/test_torch_zoo.py for the harness: the capture's exact features against the untied baseline.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")  # in the "test" extra
from torch import nn  # noqa: E402
from transformers import AlbertConfig, GPT2Config, LlamaConfig, LlamaModel  # noqa: E402
from transformers.models.albert.modeling_albert import AlbertModel  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding  # noqa: E402

from test_torch_zoo import D, TAU, V, _float64, assert_exact, token_batch  # noqa: E402,F401

transformers.logging.set_verbosity_error()


class GPT2Loop(nn.Module):
    """GPT-2's block looped, with learned positions."""

    def __init__(self, attn="eager"):
        super().__init__()
        torch.manual_seed(0)
        c = GPT2Config(n_embd=D, n_head=2, n_layer=1, n_positions=16, vocab_size=V, attn_pdrop=0, resid_pdrop=0,
                       embd_pdrop=0, bos_token_id=0, eos_token_id=0)
        c._attn_implementation = attn
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(16, D)
        self.block = GPT2Block(c)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        h = self.wte(x) + self.wpe(pos)
        for _ in range(TAU):
            h = self.block(h)
        return self.head(h)


class LlamaLoop(nn.Module):
    """Llama's decoder layer looped; rotary embeddings computed once, outside the loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        c = LlamaConfig(hidden_size=D, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                        vocab_size=V, max_position_embeddings=16, num_hidden_layers=1, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
        c._attn_implementation = "sdpa"
        self.emb = nn.Embedding(V, D)
        self.rot = LlamaRotaryEmbedding(c)
        self.block = LlamaDecoderLayer(c, 0)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        h = self.emb(x)
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        pe = self.rot(h, pos)
        for _ in range(TAU):
            h = self.block(h, position_embeddings=pe, position_ids=pos)
        return self.head(h)


class AlbertLoop(nn.Module):
    """ALBERT: one shared layer group that AlbertModel itself runs TAU times."""

    def __init__(self, chunk=0):
        super().__init__()
        torch.manual_seed(0)
        c = AlbertConfig(vocab_size=V, embedding_size=8, hidden_size=D, num_hidden_layers=TAU, num_hidden_groups=1,
                         num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0,
                         attention_probs_dropout_prob=0, max_position_embeddings=16, chunk_size_feed_forward=chunk,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
        c._attn_implementation = "eager"
        self.albert = AlbertModel(c, add_pooling_layer=False)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        return self.head(self.albert(input_ids=x).last_hidden_state)


class LlamaCk(LlamaLoop):
    """The Llama layer taken from a LlamaModel with gradient_checkpointing_enable() (\"off\": not enabled)."""

    def __init__(self, kw):
        super().__init__()
        lm = LlamaModel(self.block.self_attn.config)
        lm.layers[0].load_state_dict(self.block.state_dict())
        if kw != "off":
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        self.block = lm.layers[0]


CASES = {
    "gpt2_eager": lambda: GPT2Loop("eager"),  # Conv1D (x @ W + b), fused qkv split
    "gpt2_sdpa": lambda: GPT2Loop("sdpa"),
    "llama_sdpa": LlamaLoop,  # RMSNorm, rotary, grouped-query SDPA, gated MLP
    "albert_shared_group": lambda: AlbertLoop(0),  # one shared layer group, run TAU times by AlbertModel
    "albert_chunked_ffn": lambda: AlbertLoop(2),  # chunk_size_feed_forward > 0: the FFN in chunks of 2 tokens
}


def _loop(m):
    return m.albert.encoder.albert_layer_groups[0] if hasattr(m, "albert") else m.block


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("B,T", [(4, 6), (6, 6)], ids=["B!=T", "B==T"])
@pytest.mark.parametrize("name", list(CASES))
def test_hugging_face_blocks(name, B, T):
    m = CASES[name]()
    assert_exact(m, _loop(m), token_batch(B, T), groups={"coda": [m.head]})


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["default", "non_reentrant"])
def test_hugging_face_gradient_checkpointing(kwargs):
    m, plain = LlamaCk(kwargs), LlamaCk("off")
    plain.load_state_dict(m.state_dict())
    m.train()
    plain.train()  # checkpointing acts in train mode only (dropout is 0)
    assert m.block.gradient_checkpointing and not plain.block.gradient_checkpointing
    assert_exact(m, m.block, token_batch(4, 6), groups={"coda": [m.head]}, truth_model=plain, train_mode=True)
