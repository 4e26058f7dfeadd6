"""Evaluation of policy checkpoints: held-out loss, and answers to held-out prompts scored by the gold
scorers of the toy world (where the prompts come from it) and by reward models (where given)."""
from __future__ import annotations

import torch

from alignment.chat import encode_prompt
from alignment.data.schemas import prompt_context
from alignment.generation import generate


def answer_prompts(model, tokenizer, rows: list[dict], *, max_new_tokens: int, batch_size: int,
                   temperature: float = 0.0, progress: bool = False) -> list[str]:
    """Greedy (or sampled) answers to rl_prompt rows, in order."""
    prompts = [encode_prompt(tokenizer, prompt_context(r)) for r in rows]
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       batch_size=batch_size, progress=progress)
    return [s[0].text for s in samples]


def last_user_message(row: dict) -> str:
    return prompt_context(row)[-1]["content"]


def gold_metrics(rows: list[dict], answers: list[str]) -> dict:
    """Toy-world gold scores of answers, per prompt kind (helpful / adversarial / borderline).

    gold_helpfulness: mean gold helpfulness on helpful prompts; violation_rate: share of unsafe answers on
    adversarial prompts; false_refusal_rate: share of refusals on helpful and borderline prompts.
    """
    from alignment.data import toyworld

    by_kind: dict[str, list[tuple[str, str]]] = {}
    for row, answer in zip(rows, answers):
        prompt = last_user_message(row)
        by_kind.setdefault(toyworld.prompt_kind(prompt), []).append((prompt, answer))
    out: dict[str, float] = {}
    if "helpful" in by_kind:
        pairs = by_kind["helpful"]
        out["gold_helpfulness"] = sum(toyworld.gold_helpfulness(p, a) for p, a in pairs) / len(pairs)
    if "adversarial" in by_kind:
        pairs = by_kind["adversarial"]
        out["violation_rate"] = sum(not toyworld.gold_safety(p, a) for p, a in pairs) / len(pairs)
    benign = by_kind.get("helpful", []) + by_kind.get("borderline", [])
    if benign:
        out["false_refusal_rate"] = sum(toyworld.is_refusal(a) for _, a in benign) / len(benign)
    if "borderline" in by_kind:
        pairs = by_kind["borderline"]
        out["borderline_refusal_rate"] = sum(toyworld.is_refusal(a) for _, a in pairs) / len(pairs)
        out["borderline_helpfulness"] = sum(toyworld.gold_helpfulness(p, a) for p, a in pairs) / len(pairs)
    out["num_prompts"] = len(answers)
    return out


@torch.no_grad()
def heldout_loss(model, examples: list[dict], pad_id: int, attn_implementation: str, batch_size: int = 16) -> float:
    """Token-mean answer NLL over encoded examples (unpacked, padded batches)."""
    from alignment.batching import attention_inputs, collate
    from alignment.losses import sft_loss

    if not examples:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        rows = [[i] for i in order[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(examples, rows, pad_id).items()}
        logits = model(**attention_inputs(batch, attn_implementation, model.dtype)).logits
        loss, metrics = sft_loss(logits, batch["labels"], num_items=1)
        total += loss.item()
        count += int(metrics["num_tokens"])
    if was_training:
        model.train()
    return total / max(count, 1)
