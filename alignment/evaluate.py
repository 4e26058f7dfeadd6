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


def from_toyworld(rows: list[dict]) -> bool:
    """True when every row comes from the toy world, the only place gold scorers exist."""
    return bool(rows) and all(r.get("source") == "toyworld" for r in rows)  # `source` is an optional row field


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


def _load_rm(path: str):
    from transformers import AutoModelForSequenceClassification

    from alignment.models.tokenizer import load_tokenizer

    return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True), load_tokenizer(path)


@torch.no_grad()
def evaluate_checkpoint(policy_dir: str, prompts: list[dict], *, helpful_rm: str | None = None,
                        safety_rm: str | None = None, max_new_tokens: int = 64, batch_size: int = 64,
                        progress: bool = False) -> dict:
    """Greedy answers of one policy checkpoint to held-out prompts, scored by the gold scorers (toy world)
    and by the reward models (mean sigmoid score, and the combined score of LLAMA2_METHOD.md stage 3)."""
    from transformers import AutoModelForCausalLM

    from alignment.data.schemas import prompt_context
    from alignment.models.tokenizer import load_tokenizer
    from alignment.rewards import combine
    from alignment.scoring import reward_scores

    tokenizer = load_tokenizer(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, local_files_only=True)
    answers = answer_prompts(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress)
    del policy
    result: dict = gold_metrics(prompts, answers) if from_toyworld(prompts) else {}
    contexts = [prompt_context(r) for r in prompts]
    sig = {}
    for name, path in (("helpful_rm", helpful_rm), ("safety_rm", safety_rm)):
        if path:
            rm, rm_tok = _load_rm(path)
            sig[name] = torch.sigmoid(reward_scores(rm, rm_tok, contexts, answers, batch_size=batch_size))
            result[name] = sig[name].mean().item()
    if len(sig) == 2:
        is_safety = torch.tensor([bool(r["is_safety"]) for r in prompts])
        result["combined_rm"] = combine(sig["helpful_rm"], sig["safety_rm"], is_safety).mean().item()
    result["answer_length"] = sum(len(a.split()) for a in answers) / max(len(answers), 1)
    result["answers"] = answers
    return result
