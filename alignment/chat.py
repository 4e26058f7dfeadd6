"""Chat formats: the Llama-2 format (docs/method.md#chat-format; Meta's reference `chat_completion`)
on any tokenizer's own BOS/EOS, or the model's own chat template (`chat.template: llama2 | model`).

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {answer_1} </s><s>[INST] {user_2} [/INST]

Every (user, assistant) pair is its own sequence: BOS + "[INST] {user} [/INST] {answer} " + EOS; a final,
unanswered user turn is BOS + "[INST] {user} [/INST]" with no EOS. A system prompt is folded into the first
user message. BOS/EOS are token ids added here, never parsed out of text: a user who types "</s>" gets the
characters "</s>", not an end of sequence.

The `model` template renders with the tokenizer's own Jinja chat template (ChatML for SmolLM2); labels come
from character positions in the rendered text (where each answer's generation prompt ends, where its
content ends, the end-of-turn token after it). In both formats a message's text
never becomes a special token id. The choice travels with every checkpoint (`chat_format.json`, written
and read by `alignment.models.tokenizer`) and rides on the loaded tokenizer, so `encode`, `encode_prompt`
and `stop_token_id` encode a model's inputs the way it was trained.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TEMPLATES = ("llama2", "model")
TEMPLATE_FILE = "chat_format.json"  # {"template": "llama2" | "model"} beside a checkpoint's weights
_TEMPLATE_ATTR = "alignment_chat_template"  # where a loaded tokenizer carries its checkpoint's choice
# The Llama-2 format as a Jinja chat template (BOS/EOS = the tokenizer's own): a tokenizer that encodes in
# the Llama-2 format carries it, so `apply_chat_template` on a saved checkpoint renders what we trained on.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] | trim -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{%- set content = m['content'] | trim -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content -%}{%- endif -%}"
    "{{- bos_token + '[INST] ' + content + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + (m['content'] | trim) + ' ' + eos_token -}}{%- endif -%}{%- endfor -%}"
)


def validate_roles(messages: list[dict], final: Literal["assistant", "user", "any"] = "any") -> None:
    """Raise ValueError unless roles are: optional system first, then user/assistant alternating from user.

    `final` says which role must come last: "assistant" for training dialogs, "user" for prompts to answer.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("dialog has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]: needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content: must be a string")
    start = 1 if messages[0]["role"] == "system" else 0
    turns = messages[start:]
    if not turns:
        raise ValueError("dialog has a system message but no user turn")
    for i, m in enumerate(turns, start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "first message" if i == 0 else f"after {messages[i - 1]['role']!r}"
            raise ValueError(f"messages[{i}].role: expected {expected!r} ({where}), got {m['role']!r}")
    if final != "any" and turns[-1]["role"] != final:
        raise ValueError(f"messages[{len(messages) - 1}].role: dialog must end with a {final!r} turn")


def _turns(messages: list[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """(user, answer) pairs with the system prompt folded into the first user message, plus a final open user turn."""
    validate_roles(messages)
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    users = [m["content"].strip() for m in turns[0::2]]
    answers = [m["content"].strip() for m in turns[1::2]]
    if system is not None:
        users[0] = B_SYS + system + E_SYS + users[0]
    pairs = list(zip(users, answers))
    open_user = users[-1] if len(users) > len(answers) else None
    return pairs, open_user


def _pair_text(user: str, answer: str) -> tuple[str, int]:
    """Text of one answered turn (without BOS/EOS) and the index where the answer part starts."""
    prompt = f"{B_INST} {user} {E_INST}"
    return f"{prompt} {answer} ", len(prompt)


def format_dialog(messages: list[dict]) -> str:
    """The Llama-2 text of a dialog with BOS/EOS shown as `<s>`/`</s>` (for reading, logging and tests)."""
    pairs, open_user = _turns(messages)
    text = "".join(f"{BOS_TEXT}{_pair_text(u, a)[0]}{EOS_TEXT}" for u, a in pairs)
    if open_user is not None:
        text += f"{BOS_TEXT}{B_INST} {open_user} {E_INST}"
    return text


def _encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, never turning special-token text into special ids."""
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_dialog(tokenizer, messages: list[dict], train_on: Literal["all", "last"] = "all") -> dict:
    """Token ids and labels of a dialog in the Llama-2 format.

    Each answered pair is tokenized as one string, exactly as the reference does, and the answer's
    tokens are found by their character offsets, so training sees the same token boundaries as
    `[INST] ... [/INST]` followed by generation. `labels` equal `input_ids` on answer tokens and on the
    EOS that closes each answer, and IGNORE_INDEX elsewhere; `train_on="last"` keeps only the final answer
    (GAtt: zero loss on every previous turn, assistant messages included). A final open user turn is
    encoded with BOS and no EOS and never trained on.
    """
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    pairs, open_user = _turns(messages)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("tokenizer needs bos_token_id and eos_token_id")
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (user, answer) in enumerate(pairs):
        text, answer_start = _pair_text(user, answer)
        ids, offsets = _encode_text(tokenizer, text)
        train = train_on == "all" or (k == len(pairs) - 1 and open_user is None)
        input_ids += [bos] + ids + [eos]
        labels.append(IGNORE_INDEX)
        labels += [t if train and start >= answer_start else IGNORE_INDEX for t, (start, _) in zip(ids, offsets)]
        labels.append(eos if train else IGNORE_INDEX)
    if open_user is not None:
        ids, _ = _encode_text(tokenizer, f"{B_INST} {open_user} {E_INST}")
        input_ids += [bos] + ids
        labels += [IGNORE_INDEX] * (len(ids) + 1)
    return {"input_ids": input_ids, "labels": labels}


# ------------------------------------------------------------------------------ the model's own template
def _check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"chat template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return template


def _special_pattern(tokenizer) -> re.Pattern:
    """A regex matching the tokenizer's special tokens as text (longest first)."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True) if t))


def _render(tokenizer, messages: list[dict], generation: bool) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of `messages` (contents stripped) and each message's content span in it.

    The template is rendered once with a placeholder per content, so each span is found by position and
    never by searching for the text (a content "user" must not match the header "user"), and once with
    the contents, which must give the same text.
    """
    contents = [m["content"].strip() for m in messages]
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    layout = _template_text(tokenizer, [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)],
                            generation)
    pieces = re.split("(\ue000\\d+\ue001)", layout)
    if sorted(pieces[1::2]) != sorted(marks):
        raise ValueError("the tokenizer's chat template must show each message's content exactly once")
    text, spans = "", [(0, 0)] * len(messages)
    for k, piece in enumerate(pieces):
        if k % 2:
            i = marks.index(piece)
            spans[i] = (len(text), len(text) + len(contents[i]))
            piece = contents[i]
        text += piece
    if text != _template_text(tokenizer, [{"role": m["role"], "content": c} for m, c in zip(messages, contents)],
                              generation):
        raise ValueError("the tokenizer's chat template changes the text of messages; it cannot give exact labels")
    return text, spans


def _template_text(tokenizer, messages: list[dict], generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat.template 'model' needs a tokenizer with a chat_template; this one has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _encode_rendered(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Token ids, character offsets and is-template-special flags of rendered text: the template's special
    tokens (outside every content span) become their ids; everything between them, message text included,
    is tokenized as plain text, as a tokenizer splits on special tokens before anything else."""
    inside = lambda a, b: any(s <= a and b <= e for s, e in spans)  # noqa: E731
    cuts = [m for m in _special_pattern(tokenizer).finditer(text) if not inside(m.start(), m.end())]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    special: list[bool] = []
    pos = 0
    for m in [*cuts, None]:
        end = m.start() if m is not None else len(text)
        if end > pos:
            piece_ids, piece_offsets = _encode_text(tokenizer, text[pos:end])
            ids += piece_ids
            offsets += [(pos + a, pos + b) for a, b in piece_offsets]
            special += [False] * len(piece_ids)
        if m is not None:
            ids.append(tokenizer.convert_tokens_to_ids(m.group()))
            offsets.append((m.start(), m.end()))
            special.append(True)
            pos = m.end()
    return ids, offsets, special


def encode_dialog_model(tokenizer, messages: list[dict], train_on: Literal["all", "last"] = "all") -> dict:
    """Token ids and labels of a dialog rendered by the tokenizer's own chat template.

    `labels` equal `input_ids` on what the model generates for each trained answer, and IGNORE_INDEX
    elsewhere, as `encode_dialog` does: from the end of the generation prompt (the dialog before the answer
    rendered with `add_generation_prompt`; where that text is not a prefix of the dialog's, from the answer's
    first character) through the first special token after the answer (its end of turn: `<|im_end|>` in
    ChatML, EOS in the Llama-2 template). A token that straddles the start is labelled.
    """
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    validate_roles(messages)
    text, spans = _render(tokenizer, messages, generation=False)
    ids, offsets, special = _encode_rendered(tokenizer, text, spans)
    answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        answers = answers[-1:] if messages[-1]["role"] == "assistant" else []
    labels = [IGNORE_INDEX] * len(ids)
    for k in answers:
        start, end = spans[k]
        prompt = _template_text(tokenizer, [{"role": m["role"], "content": m["content"].strip()} for m in messages[:k]],
                                generation=True)
        if text.startswith(prompt) and len(prompt) <= start:
            start = len(prompt)
        first = next(j for j, (a, b) in enumerate(offsets) if b > start)
        stop = next((j for j in range(first, len(ids)) if special[j] and offsets[j][0] >= end), None)
        if stop is None:
            raise ValueError("the tokenizer's chat template puts no special token (end of turn) after an answer")
        labels[first:stop + 1] = ids[first:stop + 1]
    return {"input_ids": ids, "labels": labels}


def model_content_span(tokenizer, messages: list[dict], index: int) -> tuple[int, int]:
    """[start, end) of the tokens of `messages[index]`'s content in `encode_dialog_model`'s input_ids."""
    validate_roles(messages)
    text, spans = _render(tokenizer, messages, generation=False)
    _, offsets, _ = _encode_rendered(tokenizer, text, spans)
    start, end = spans[index]
    inside = [j for j, (a, b) in enumerate(offsets) if b > start and a < end]
    if not inside:
        raise ValueError(f"messages[{index}] has no token")
    return inside[0], inside[-1] + 1


# ------------------------------------------------------------------------------ one entry per template
_ENCODERS = {"llama2": encode_dialog, "model": encode_dialog_model}


def template_of(tokenizer) -> str:
    """The chat template a loaded tokenizer's model was trained with ("llama2" where none was stored)."""
    return getattr(tokenizer, _TEMPLATE_ATTR, None) or "llama2"


# Prepended to a `model` template when a checkpoint is saved: every message's content stripped, as the encoders
# strip it, so `apply_chat_template` of the saved tokenizer renders what `encode` gives for any messages.
TRIM_CONTENTS_JINJA = (
    "{%- set trimmed = namespace(messages=[]) -%}{%- for m in messages -%}"
    "{%- set trimmed.messages = trimmed.messages + [{'role': m['role'], 'content': m['content'] | trim}] -%}"
    "{%- endfor -%}{%- set messages = trimmed.messages -%}"
)


def hf_chat_template(tokenizer) -> str:
    """The Jinja chat template a saved checkpoint's tokenizer carries, which renders exactly what `encode`
    and (with `add_generation_prompt=True`) `encode_prompt` give, BOS included: LLAMA2_CHAT_TEMPLATE, or the
    tokenizer's own template behind TRIM_CONTENTS_JINJA. Typed special-token text in a message is the one
    difference: a Jinja template renders text, and the tokenizer then reads "</s>" as EOS."""
    if template_of(tokenizer) == "llama2":
        return LLAMA2_CHAT_TEMPLATE
    own = getattr(tokenizer, "chat_template", None)
    if not isinstance(own, str) or not own:
        raise ValueError("chat.template 'model' needs a tokenizer with one chat_template string; this one has none")
    return own if own.startswith(TRIM_CONTENTS_JINJA) else TRIM_CONTENTS_JINJA + own


def set_template(tokenizer, template: str) -> None:
    """Make `tokenizer` encode with `template` from now on (and save it with the tokenizer); with "llama2"
    its Jinja chat template becomes LLAMA2_CHAT_TEMPLATE, which renders exactly that format."""
    setattr(tokenizer, _TEMPLATE_ATTR, _check_template(template))
    if template == "llama2":
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE


def encode(tokenizer, messages: list[dict], train_on: Literal["all", "last"] = "all") -> dict:
    """`{"input_ids", "labels"}` of a dialog in the tokenizer's chat template (`template_of`)."""
    return _ENCODERS[template_of(tokenizer)](tokenizer, messages, train_on=train_on)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a dialog that ends with a user turn, ready for generation of the next answer: the
    Llama-2 format up to the final `[/INST]`, or the chat template with its assistant header."""
    validate_roles(messages, final="user")
    if template_of(tokenizer) == "llama2":
        return encode_dialog(tokenizer, messages)["input_ids"]
    text, spans = _render(tokenizer, messages, generation=True)
    return _encode_rendered(tokenizer, text, spans)[0]


def stop_token_id(tokenizer) -> int:
    """The token that ends an answer in generation: EOS in the Llama-2 format, the end-of-turn token of the
    model's chat template (the first special token after an answer) in the `model` format."""
    if template_of(tokenizer) == "llama2":
        return tokenizer.eos_token_id
    enc = encode_dialog_model(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}])
    return [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX][-1]


def read_template(checkpoint: str | Path) -> str | None:
    """The chat template stored with a checkpoint, None where none is (a base or imported model)."""
    path = Path(checkpoint) / TEMPLATE_FILE
    if not path.is_file():
        return None
    return _check_template(json.loads(path.read_text())["template"])


def write_template(checkpoint: str | Path, tokenizer) -> None:
    """Store the tokenizer's chat template choice beside a checkpoint's weights."""
    (Path(checkpoint) / TEMPLATE_FILE).write_text(json.dumps({"template": template_of(tokenizer)}) + "\n")


def truncate_example(example: dict, max_length: int) -> dict | None:
    """Cut an encoded example to `max_length` tokens; None when no trained answer token survives.

    Callers count the Nones and report them: a dialog cut before its answer is dropped, never trained as
    an answer-less example.
    """
    ids, labels = example["input_ids"][:max_length], example["labels"][:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}
