"""A byte-level BPE tokenizer trained on the toy world's text, saved as an ordinary HF tokenizer.

Byte-level BPE (as GPT-2 and Llama 3 use) covers any input, so user text never fails to encode, and its
character offsets let `alignment.chat.encode_dialog` mask exactly the answer tokens. The chat markers
are ordinary text, as in Llama 2; only BOS/EOS/PAD/UNK are special tokens.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from alignment.chat import read_template, set_template
from alignment.runs import save_pretrained_atomic, save_tokenizer_files

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
# Tokens per whitespace word of a toy tokenizer (2,048 tokens) on toy-world text: 1.29 (pretraining corpus)
# to 1.49 (held-out prompts), measured; on real HH-RLHF answers it spends 2.43. Over the limit, the data is
# not toy-world text.
TOY_TOKENS_PER_WORD_LIMIT = 1.8


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train BPE on `texts`, save to `out_dir` with `save_pretrained`, and return the HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # The chat markup is seen in every dialog; train on it so each marker becomes a few tokens only.
    markup = [f"{BOS}[INST] <<SYS>>\n x \n<</SYS>>\n\n y [/INST] z {EOS}"] * 200
    tok.train_from_iterator(_chain(markup, texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", clean_up_tokenization_spaces=False,
    )
    # written whole or not at all: a run killed mid-save must not find a tokenizer with half its files
    save_pretrained_atomic(Path(out_dir), tokenizer=hf, chat_template=False)  # a base tokenizer: no chat format
    return hf


def _chain(*iterables):
    for it in iterables:
        yield from it


def is_toy_tokenizer(tokenizer) -> bool:
    """Whether `tokenizer` was made by `train_tokenizer`: its special tokens are exactly our four (a Llama-2
    tokenizer has no <pad>, SmolLM2's are ChatML's)."""
    return set(tokenizer.all_special_tokens) == {UNK, BOS, EOS, PAD}


def tokens_per_word(tokenizer, texts: list[str]) -> float:
    """Tokens per whitespace-separated word over `texts` (no special tokens)."""
    words = sum(len(t.split()) for t in texts)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return tokens / words if words else 0.0


def toy_tokenizer_warning(tokenizer, texts: list[str], sample: int = 500) -> str | None:
    """A one-line warning when the toy world's tokenizer meets text that is not toy-world text (measured on the
    first `sample` texts); None for any other tokenizer or for toy-world text."""
    if not is_toy_tokenizer(tokenizer):
        return None
    ratio = tokens_per_word(tokenizer, texts[:sample])
    if ratio <= TOY_TOKENS_PER_WORD_LIMIT:
        return None
    return (f"[data] warning: the toy-world tokenizer spends {ratio:.2f} tokens per word on this data (toy-world "
            f"text: 1.3-1.5, limit {TOY_TOKENS_PER_WORD_LIMIT}): this is not toy-world data; give a real model "
            "and its tokenizer (model.path, model.tokenizer)")


def load_tokenizer(path: str | Path, template: str | None = None):
    """Load any HF tokenizer offline (the tiny one or a Llama-2 one); pad falls back to EOS... never to BOS.

    The tokenizer carries the chat template its checkpoint was trained with (`chat_format.json`, see
    `alignment.chat`), or `template` (a recipe's `chat.template`) where none is stored; a recipe that names
    another template than the checkpoint's stored one is refused in one line.
    """
    from transformers import AutoTokenizer

    stored = read_template(path)
    if template is not None and stored is not None and template != stored:
        raise ValueError(f"chat.template: {path} was trained with {stored!r}, the recipe says {template!r}")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        # Llama-2's tokenizer ships without a pad token; padding is always masked, so UNK/EOS is safe.
        tok.pad_token = tok.unk_token or tok.eos_token
    if stored or template:
        set_template(tok, stored or template)
    return tok


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """A checkpoint's tokenizer written in place (not atomically): its files, the Jinja chat template that
    renders our encoding and the chat template choice (`alignment.runs.save_tokenizer_files`)."""
    save_tokenizer_files(tokenizer, Path(out_dir))
