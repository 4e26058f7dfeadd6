"""The Llama-2 chat format (docs/method.md#chat-format; Meta's reference `chat_completion`).

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {answer_1} </s><s>[INST] {user_2} [/INST]

Every (user, assistant) pair is its own sequence: BOS + "[INST] {user} [/INST] {answer} " + EOS; a final,
unanswered user turn is BOS + "[INST] {user} [/INST]" with no EOS. A system prompt is folded into the first
user message. BOS/EOS are token ids added here, never parsed out of text: a user who types "</s>" gets the
characters "</s>", not an end of sequence.
"""
from __future__ import annotations

from typing import Literal

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


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


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a dialog that ends with a user turn, ready for generation of the next answer."""
    validate_roles(messages, final="user")
    return encode_dialog(tokenizer, messages)["input_ids"]


def truncate_example(example: dict, max_length: int) -> dict | None:
    """Cut an encoded example to `max_length` tokens; None when no trained answer token survives.

    Callers count the Nones and report them: a dialog cut before its answer is dropped, never trained as
    an answer-less example.
    """
    ids, labels = example["input_ids"][:max_length], example["labels"][:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}
