"""ALiBi (Press et al., "Train Short, Test Long", ICLR 2022) as a pure function on the GPT."""

from __future__ import annotations

from torch import nn

from smalti.models.gpt import GPT, CausalSelfAttention, alibi_causal_bias


def apply_alibi(model: nn.Module, max_sequence_length: int | None = None) -> int:
    """Replace learned positions with linear attention biases; returns the attention layers changed.

    The position embedding is removed (its parameter disappears from the
    model), and every attention layer adds ``-slope * distance`` to its
    scores, which lets the model run on sequences longer than it trained on,
    up to ``max_sequence_length`` (default: the model's block size).
    """
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    if not gpts:
        raise ValueError("ALiBi applies to the GPT model only")
    count = 0
    for gpt in gpts:
        length = max_sequence_length or gpt.config.block_size
        if gpt.pos_emb is not None:
            gpt.pos_emb = None
        for attention in gpt.modules():
            if isinstance(attention, CausalSelfAttention) and not attention.alibi:
                attention.alibi = True
                attention.register_buffer("alibi_bias", alibi_causal_bias(attention.n_head, length), persistent=False)
                count += 1
    return count
