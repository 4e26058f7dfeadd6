"""A byte-level BPE tokenizer trained on the toy world's text, saved as an ordinary HF tokenizer.

Byte-level BPE (as GPT-2 and Llama 3 use) covers any input, so user text never fails to encode, and its
character offsets let `alignment.chat.encode_dialog` mask exactly the answer tokens. The chat markers
are ordinary text, as in Llama 2; only BOS/EOS/PAD/UNK are special tokens.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from alignment.chat import read_template, set_template, write_template
from alignment.runs import save_pretrained_atomic

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]


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
    """The one way a checkpoint's tokenizer is written: its files plus the chat template choice."""
    tokenizer.save_pretrained(str(out_dir))
    write_template(out_dir, tokenizer)
