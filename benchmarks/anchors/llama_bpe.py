"""Row 7 of the quality comparison: a Llama-architecture model over a byte-level BPE tokenizer.

Hugging Face `tokenizers` trains the byte-level BPE on the training split; Hugging Face
`transformers` provides `LlamaForCausalLM`. The model's size is picked so that its training FLOPs
per byte (per token / bytes per token) match a target, counted the way
synergy_dist/model/accounting.py counts them (2 x matmul parameters per token plus the causal
attention scores; training = 3 x forward). Its loss is turned into bits per byte as
total nats / (ln 2 * total UTF-8 bytes).

Standalone like the other anchors: nothing from synergy_dist is imported; `transformers` and
`tokenizers` are imported only when a function needs them (optional extra `anchors`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

SEPARATOR = "<|endoftext|>"  # the document separator / start token (plays the role of the byte models' EOD)


@dataclass
class LlamaSize:
    vocab_size: int = 8192  # BPE vocabulary including the separator
    hidden: int = 256  # model width
    layers: int = 4  # decoder layers
    heads: int = 8  # attention heads (head dim = hidden / heads); key/value heads = heads
    intermediate: int = 688  # SwiGLU hidden width
    tie_embeddings: bool = True  # the output head shares the input embedding (fewer parameters at a small width)


def swiglu_width(hidden: int) -> int:
    """8/3 x hidden rounded up to a multiple of 8 (the same rule as SynergyLM's MLPs)."""
    return 8 * math.ceil(8 / 3 * hidden / 8)


def size_for(hidden: int, layers: int, vocab_size: int, head_dim: int = 32) -> LlamaSize:
    return LlamaSize(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=hidden // head_dim,
                     intermediate=swiglu_width(hidden))


def param_count(size: LlamaSize) -> int:
    """Exact parameter count of LlamaForCausalLM with this size (no biases, RMSNorm weights included)."""
    d = size.hidden
    per_layer = 4 * d * d + 3 * d * size.intermediate + 2 * d
    embeddings = size.vocab_size * d * (1 if size.tie_embeddings else 2)
    return embeddings + size.layers * per_layer + d


def flops_per_token(size: LlamaSize, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token over windows of seq_len tokens (forward, or 3 x forward for training)."""
    d = size.hidden
    context = (seq_len + 1) / 2  # causal attention: the average number of keys a query sees
    per_layer = 2 * 4 * d * d + 2 * 2 * context * d + 2 * 3 * d * size.intermediate
    forward = size.layers * per_layer + 2 * d * size.vocab_size
    return 3 * forward if training else forward


def choose_size(target_flops_per_byte: float, bytes_per_token: float, seq_len: int, vocab_size: int,
                target_params: int, tolerance: float = 0.05) -> LlamaSize:
    """The size whose training FLOPs per byte are closest to the target; among those within `tolerance`
    of it, the one whose parameter count is closest to target_params."""
    candidates = [size_for(hidden, layers, vocab_size) for hidden in range(64, 513, 32) for layers in range(1, 13)]

    def flops_gap(size: LlamaSize) -> float:
        return abs(flops_per_token(size, seq_len) / bytes_per_token / target_flops_per_byte - 1)

    best_gap = min(flops_gap(s) for s in candidates)
    close = [s for s in candidates if flops_gap(s) <= max(tolerance, best_gap)]
    return min(close, key=lambda s: (abs(param_count(s) - target_params), flops_gap(s)))


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenisation, all 256 bytes in the alphabet) with SEPARATOR as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # optional dependency (anchors extra)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEPARATOR], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (a byte-level token is one character per byte); SEPARATOR counts 1,
    like the byte models' EOD."""
    lengths = [0] * tokenizer.get_vocab_size()
    for token, index in tokenizer.get_vocab().items():
        lengths[index] = 1 if token == SEPARATOR else len(token)
    return lengths


def build_model(size: LlamaSize, max_positions: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency (anchors extra), slow to import

    config = LlamaConfig(
        vocab_size=size.vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=max_positions, tie_word_embeddings=size.tie_embeddings, rms_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=0, pad_token_id=None, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def next_token_logits(model, input_ids):
    """(B, T, vocab) logits; the loss is computed by the caller so that labels align exactly like the byte rows'."""
    return model(input_ids=input_ids, use_cache=False).logits
