"""The tiny Llama: the real `LlamaForCausalLM` architecture at a size a 2-core CPU trains in minutes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinySize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


# "tiny" is the demo/test model; "bench" has a few tens of millions of parameters so compute dominates overhead.
SIZES = {
    "nano": TinySize(64, 2, 4, 2, 192),
    "tiny": TinySize(192, 4, 6, 2, 512),
    "small": TinySize(384, 6, 6, 2, 1024),
    "bench": TinySize(512, 8, 8, 4, 1536),
}


def tiny_llama_config(vocab_size: int, size: str = "tiny", max_position_embeddings: int = 2048, tokenizer=None):
    """A `LlamaConfig` of one of SIZES, with special token ids taken from `tokenizer` when given."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        **ids,
    )


def build_tiny_llama(tokenizer, size: str = "tiny", seed: int = 0):
    """A freshly initialised tiny `LlamaForCausalLM` for `tokenizer` (deterministic given `seed`)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), size, tokenizer=tokenizer))
