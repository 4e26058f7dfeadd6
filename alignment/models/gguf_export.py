"""A Llama-architecture causal LM and its byte-level BPE tokenizer written as one GGUF file (f32 or f16) that
llama.cpp and Ollama run: llama.cpp's tensor names and metadata keys (through the `gguf` package's own tables)
and its layout of the query and key projections.

llama.cpp computes rotary embeddings on interleaved pairs of each head's dimensions, HF-Llama on its two
halves, so llama.cpp's converter permutes the rows of `q_proj` and `k_proj` (`permute_rotary`); every GGUF
reader for Llama (transformers' included) undoes it. Norm weights stay f32 in an f16 file, as llama.cpp writes
them. `alignment.models.gguf_import` is the other direction.
"""
from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np

GGUF_TYPES = ("f32", "f16")
INSTALL_GGUF = "make install-real (or: pip install gguf==0.19.0)"


class GGUFExportError(ValueError):
    """A model or tokenizer the GGUF writer cannot express; the message says what and why."""


def need_gguf() -> None:
    """Stop in one line, naming the install command, when the `gguf` package is missing."""
    if find_spec("gguf") is None:
        raise GGUFExportError(f"the package gguf (to write GGUF files) is not installed; install it with: "
                              f"{INSTALL_GGUF}")


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF-Llama's q/k projection rows (out = n_head * head_dim, per head the two rotary halves) reordered to
    llama.cpp's interleaved pairs: per head, rows (0, d/2, 1, d/2+1, ...). `n_head` is the number of heads of
    this projection (key/value heads for k_proj). The inverse of transformers' `_reverse_permute_weights`."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def require_llama(model_type: str | None) -> None:
    if model_type != "llama":
        raise GGUFExportError(f"the checkpoint is a {model_type!r} model, not a Llama architecture; GGUF export "
                              "writes Llama models only")


def llama_metadata(config) -> dict:
    """The `llama.*` hyper-parameters of a LlamaConfig, checked for what llama.cpp's llama graph computes."""
    require_llama(getattr(config, "model_type", None))
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope_type {rope['rope_type']!r} (rope scaling) is not exported; only plain RoPE is")
    if config.attention_bias or config.mlp_bias:
        raise GGUFExportError("attention_bias / mlp_bias are set; llama.cpp's Llama graph has no such biases")
    if config.hidden_act != "silu":
        raise GGUFExportError(f"hidden_act {config.hidden_act!r}: llama.cpp's Llama graph uses silu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
            "head_count": config.num_attention_heads, "head_count_kv": config.num_key_value_heads,
            "rope_dimension_count": head_dim, "rope_freq_base": float(rope.get("rope_theta", 10000.0)),
            "layer_norm_rms_eps": float(config.rms_norm_eps), "vocab_size": config.vocab_size}


def bpe_vocab(tokenizer, vocab_size: int) -> dict:
    """`tokenizer.ggml.*` of a byte-level BPE tokenizer (tokens in the byte-to-unicode spelling, as llama.cpp's
    `gpt2` model reads them): tokens by id (padded to `vocab_size` with unused `[PADi]`), their types (special
    added tokens CONTROL, other added tokens USER_DEFINED), merges in rank order, the special ids, the
    pre-tokenizer name, whether BOS is added, and the chat template."""
    import json

    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise GGUFExportError(f"the tokenizer is a {model.get('type')} model without a byte-level pre-tokenizer; "
                              "GGUF export writes byte-level BPE tokenizers (GPT-2 / SmolLM2 style) only")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) != len(vocab) or sorted(by_id) != list(range(len(by_id))):
        raise GGUFExportError("the tokenizer's ids are not contiguous from 0; GGUF stores tokens by position")
    if len(by_id) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(by_id)} tokens but the model's vocab_size is {vocab_size}")
    added = {a["content"]: a["special"] for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(TokenType.UNUSED)
        elif token in added:
            types.append(TokenType.CONTROL if added[token] else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_name(spec["pre_tokenizer"]),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id, "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None}


def _byte_level(pre: dict | None) -> bool:
    if pre is None:
        return False
    parts = pre.get("pretokenizers", [pre]) if pre["type"] == "Sequence" else [pre]
    return any(p["type"] == "ByteLevel" for p in parts)


def _pre_name(pre: dict) -> str:
    """llama.cpp's pre-tokenizer name: `smollm` when digits are split one by one before the GPT-2 byte-level
    split (SmolLM2's tokenizer), else `gpt2`; other splits are refused rather than tokenized differently."""
    parts = pre.get("pretokenizers", [pre]) if pre["type"] == "Sequence" else [pre]
    kinds = [p["type"] for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise GGUFExportError(f"the tokenizer's pre-tokenizer {kinds} has no llama.cpp equivalent here "
                          "(known: GPT-2 byte-level, SmolLM2's digits + byte-level)")


def llama_tensors(state_dict: dict, config, dtype: str) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, array) for every weight of a LlamaForCausalLM state dict: q/k rows permuted, 2-D
    weights in `dtype` ("f32" or "f16"), 1-D norm weights in f32; no `output.weight` with tied embeddings
    (llama.cpp then reads `token_embd.weight`)."""
    import torch
    from gguf import MODEL_ARCH, get_tensor_name_map

    if dtype not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF tensor type {dtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer llama.cpp recomputes from rope_freq_base
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"tensor {hf_name} has no llama.cpp name; is this a plain LlamaForCausalLM?")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = permute_rotary(array, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = permute_rotary(array, config.num_key_value_heads)
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        out.append((name, np.ascontiguousarray(array)))
    return out


def write_gguf(path: str | Path, model, tokenizer, dtype: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a LlamaForCausalLM) and `tokenizer` as a GGUF file at `path`; returns the path."""
    need_gguf()
    from gguf import GGUFWriter, LlamaFileType

    config = model.config
    meta = llama_metadata(config)
    vocab = bpe_vocab(tokenizer, config.vocab_size)
    tensors = llama_tensors(model.state_dict(), config, dtype)
    path = Path(path)
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name(name or path.stem)
    writer.add_file_type(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(meta["vocab_size"])
    writer.add_context_length(meta["context_length"])
    writer.add_embedding_length(meta["embedding_length"])
    writer.add_block_count(meta["block_count"])
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(meta["head_count"])
    writer.add_head_count_kv(meta["head_count_kv"])
    writer.add_rope_dimension_count(meta["rope_dimension_count"])
    writer.add_rope_freq_base(meta["rope_freq_base"])
    writer.add_layer_norm_rms_eps(meta["layer_norm_rms_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])  # no scores: a BPE vocabulary is ordered by its merges (as llama.cpp's converter writes it)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
