"""Scoring (prompt, answer) pairs with a reward model: one encoding for training, sampling and PPO (and, with
answer-only labels, `encode_answer`, for DPO's log-probabilities of the same pairs).

A reward model reads the whole dialog in its chat format (`alignment.chat.encode`: the Llama-2 format or
the model's own template, as stored with the checkpoint), the answer closed by EOS, and its scalar
head's output at the last real token is the reward (`AutoModelForSequenceClassification` with one
label). Encoding lives here only, so the RM is trained and used on exactly the same token sequences.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import torch

from alignment.batching import attention_inputs, collate, pack_balanced
from alignment.chat import IGNORE_INDEX, encode
from alignment.rewards import check_reward_range


# Written beside a reward model by `align rm` (alignment.stages.reward_model.safety_switch_calibration): the
# safety switch's threshold calibrated on labelled test answers, read by `safety_threshold: calibrated`.
SAFETY_SWITCH_FILE = "safety_switch.json"


def safety_threshold(section, key: str = "reward") -> float:
    """The safety switch's threshold of a reward-judge config section (`RewardJudgeSection`): its number, or
    with `safety_threshold: calibrated` the one `align rm` calibrated for `safety_rm` (its safety_switch.json).
    ValueError in one line naming `key` when that cannot be read."""
    if not isinstance(section.safety_threshold, str):
        return section.safety_threshold
    if section.safety_rm is None:
        raise ValueError(f"{key}.safety_threshold: calibrated needs {key}.safety_rm (the threshold is read beside it)")
    return calibrated_switch(section.safety_rm, key)["threshold"]


@functools.lru_cache(maxsize=8)
def calibrated_switch(rm_path: str, key: str = "reward") -> dict:
    """`rm_path`'s safety_switch.json (threshold, precision, recall, ...), read once per process."""
    file = Path(rm_path) / SAFETY_SWITCH_FILE
    try:
        switch = json.loads(file.read_text())
        float(switch["threshold"])
    except FileNotFoundError:
        raise ValueError(f"{key}.safety_threshold: calibrated, but {file} does not exist: `align rm` writes it "
                         "when a test set has answers labelled chosen_safe/rejected_safe (or give a number)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}.safety_threshold: {file} is unreadable ({type(e).__name__}: {e})") from None
    return switch


def switch_text(switch: dict) -> str:
    """What a calibrated safety switch (a safety_switch.json) flags, in words: the RM stage's log and the report."""
    where = ", ".join(switch["test_sets"])
    if not switch["flagged"]:
        return (f"no threshold reaches precision {switch['target_precision']:.2f} on {switch['answers']} labelled "
                f"test answers ({where}); threshold 0 (the switch fires on safety-tagged prompts only)")
    return (f"sigmoid(safety RM) < {switch['threshold']:.3f} flags {switch['flagged']} of {switch['answers']} "
            f"labelled test answers ({where}), precision {switch['precision']:.3f}, recall {switch['recall']:.3f} "
            f"of the {switch['unsafe']} unsafe ones")


def describe_threshold(section, key: str = "reward") -> str:
    """One line for a stage's log: the threshold in use and, when calibrated, where it came from."""
    value = safety_threshold(section, key)
    if not isinstance(section.safety_threshold, str):
        return f"safety switch: sigmoid(safety RM) < {value:g} ({key}.safety_threshold)"
    sw = calibrated_switch(section.safety_rm, key)
    got = "-" if sw["precision"] is None else f"{sw['precision']:.2f}"
    recall = "-" if sw["recall"] is None else f"{sw['recall']:.2f}"
    return (f"safety switch: sigmoid(safety RM) < {value:.4f}, calibrated by `align rm` (precision {got}, recall "
            f"{recall} on {sw['answers']} labelled answers; {Path(section.safety_rm) / SAFETY_SWITCH_FILE})")


def encode_answer(tokenizer, context: list[dict], answer: str, max_length: int) -> dict:
    """`{"input_ids", "labels"}` of `context` (ending with a user turn) answered by `answer`, labels on the
    answer only (and the EOS or end-of-turn token that closes it), cut to the last `max_length` tokens so the
    answer is always kept. The first kept token is never a target (IGNORE_INDEX): after a cut it has no
    context within the sequence, and packed beside another sequence it must not be predicted from that one."""
    full = encode(tokenizer, [*context, {"role": "assistant", "content": answer}], train_on="last")
    ids, labels = full["input_ids"][-max_length:], full["labels"][-max_length:]
    return {"input_ids": ids, "labels": [IGNORE_INDEX, *labels[1:]]}


def encode_for_reward(tokenizer, context: list[dict], answer: str, max_length: int) -> list[int]:
    """Token ids of `context` (ending with a user turn) answered by `answer`, cut to the last
    `max_length` tokens so the answer (and the EOS the score is read at) is always kept (`encode_answer`)."""
    return encode_answer(tokenizer, context, answer, max_length)["input_ids"]


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [N, T] of right-padded sequences."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward [N] read at each row's last real token (right padding), whatever the pad id is.

    A model with a scalar head named "score" is read at every position and indexed by the mask: HF's own
    pooling takes the last token that is not `pad_token_id`, which skips the answer's EOS where pad is EOS
    (SmolLM2: both `<|im_end|>`), so it would score another token than training does (`packed_scores`)."""
    last = attention_mask.sum(dim=1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if any(name.rsplit(".", 1)[-1] == "score" for name, _ in model.named_modules()):
        with _scalar_head_outputs(model) as captured:
            model(input_ids=input_ids, attention_mask=attention_mask)
        return captured["scores"][rows, last, 0]
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() == 2:  # a stand-in that pools itself
        return logits[:, 0]
    return logits[rows, last, 0]


@contextlib.contextmanager
def _scalar_head_outputs(model):
    """Capture the scalar head's output ("scores", ``[B, T, 1]``) and input ("inputs", ``[B, T, hidden]``)
    at every position during a forward of a sequence-classification model, which itself returns only the
    value at each row's last non-pad token.
    The head is the outermost module named "score" (also through peft, DeepSpeed and DDP wrappers)."""
    head = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "score"), None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no scalar head named 'score'")
    captured: dict[str, torch.Tensor] = {}
    def keep(_module, inputs, out):
        captured["inputs"], captured["scores"] = inputs[0], out

    handle = head.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def packed_scores(model, sequences: list[list[int]], pad_id: int, attn_implementation: str = "sdpa") -> torch.Tensor:
    """Scalar rewards [N] of `sequences` from ONE forward over rows packed padding-free.

    The sequences are packed evenly into rows no longer than the longest of them (so the forward never
    holds more tokens, nor attends over longer rows, than right padding would), with a block-diagonal
    causal mask and positions restarting at 0 for each sequence (`alignment.batching`): every score equals
    the one the sequence gets alone. Each is read at its last token (the EOS of the answer), as
    `last_token_scores` reads it on right-padded rows.
    """
    return _packed_head(model, sequences, pad_id, attn_implementation)[1]


def packed_features(model, sequences: list[list[int]], pad_id: int, attn_implementation: str = "sdpa") -> torch.Tensor:
    """What the scalar head reads [N, hidden] for each of `sequences` (the final hidden state at its last
    token), from one packed forward as `packed_scores`: the head's score is a linear function of it."""
    return _packed_head(model, sequences, pad_id, attn_implementation)[0]


def _packed_head(model, sequences: list[list[int]], pad_id: int, attn_implementation: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(head input [N, hidden], score [N]) of each sequence at its last token, from one packed forward."""
    lengths = [len(s) for s in sequences]
    rows = pack_balanced(lengths, list(range(len(sequences))), max(lengths))
    batch = collate([{"input_ids": s} for s in sequences], rows, pad_id, keys=("input_ids",))
    row_of, end_of = torch.empty(len(sequences), dtype=torch.long), torch.empty(len(sequences), dtype=torch.long)
    for r, row in enumerate(rows):
        end = 0
        for i in row:
            end += lengths[i]
            row_of[i], end_of[i] = r, end - 1
    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in batch.items()}
    with _scalar_head_outputs(model) as captured:
        model(**attention_inputs(batch, attn_implementation, param.dtype))
    at = (row_of.to(param.device), end_of.to(param.device))
    return captured["inputs"][at], captured["scores"][at][:, 0]


@torch.no_grad()
def reward_scores(model, tokenizer, contexts: list[list[dict]], answers: list[str], *, batch_size: int = 32,
                  max_length: int = 1024, min_batches: int = 0) -> torch.Tensor:
    """Raw (pre-sigmoid) scores [N] of each (context, answer), batched by similar length. `min_batches`: at least
    this many forwards, the extra ones of a throwaway row (a ZeRO-3-partitioned RM's forward is a collective:
    every process must make as many)."""
    seqs = [encode_for_reward(tokenizer, c, a, max_length) for c, a in zip(contexts, answers)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores = torch.empty(len(seqs))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_right([seqs[i] for i in idx], tokenizer.pad_token_id)
        scores[idx] = last_token_scores(model, ids.to(device), mask.to(device)).float().cpu()
    for _ in range(min_batches - math.ceil(len(order) / batch_size)):
        ids, mask = pad_right([[tokenizer.pad_token_id]], tokenizer.pad_token_id)
        last_token_scores(model, ids.to(device), mask.to(device))
    if was_training:
        model.train()
    check_reward_range(scores, lambda i: f"prompt {_preview(contexts[i][-1]['content'])}, answer {_preview(answers[i])}")
    return scores


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")
