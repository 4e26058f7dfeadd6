"""DPO's machinery, shared by `align dpo` (alignment.stages.dpo) and rejection sampling's RS+DPO iterations
(alignment.stages.rejection_sampling, `update: dpo`): pairs encoded once (`encode_pairs`: the tokens the RMs
read, cut from the left, labels on the answer only), the reference's summed answer log-probabilities computed
once and cached in the run directory (`cached_reference`, `reference_logprobs.json`; with LoRA the model with
its adapters disabled is the reference, so no second model is held), one packed padding-free forward per
micro-batch (`answer_logprobs`), the step of the shared loop (`dpo_step_fn`, `alignment.losses.DPO_LOSSES`)
and the implicit-reward evaluation of held-out pairs (`evaluate_pairs`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from alignment.batching import attention_inputs, build_plan, collate, pack_balanced, truncation_counts
from alignment.config import DPOConfig
from alignment.data.schemas import RATINGS, pair_context
from alignment.distributed import is_main_process, local_device, main_process_does
from alignment.finetune import loop_config
from alignment.lineage import checkpoint_identity
from alignment.losses import DPO_LOSSES, DPOLoss, preference_margin, sequence_logprobs
from alignment.models.loading import load_causal_lm, load_policy
from alignment.models.tokenizer import load_tokenizer, toy_tokenizer_warning
from alignment.runs import RunDir, write_json_atomic
from alignment.scoring import encode_answer
from alignment.training import train

REFERENCE_FILE = "reference_logprobs.json"
SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------------------------------- data
def encode_pairs(tokenizer, pairs: list[dict], max_length: int, margin_scale: str) -> tuple[list[dict], dict]:
    """One example per pair: the chosen and the rejected answer (`encode_answer`, same context), its rating and
    margin; and the truncation counts (a pair is cut when either answer's sequence is longer than
    `max_length`: the start of its dialog goes)."""
    examples, lengths = [], []
    for row in pairs:
        context = pair_context(row)
        # one token more than kept tells whether the cut removed anything
        sides = {side: encode_answer(tokenizer, context, row[side], max_length + 1) for side in SIDES}
        lengths.append(max(len(s["input_ids"]) for s in sides.values()))
        examples.append({**{side: encode_answer(tokenizer, context, row[side], max_length) for side in SIDES},
                         "rating": row["rating"], "margin": preference_margin(row["rating"], margin_scale)})
    return examples, truncation_counts(lengths, max_length)


def make_plan(cfg: DPOConfig, examples: list[dict], world: int):
    """Length-grouped micro-batches of pairs, as the RMs plan them (a micro-batch's answers are packed for its
    forward, never the plan's rows); a pair's length is its longer answer."""
    lengths = [max(len(e[side]["input_ids"]) for side in SIDES) for e in examples]
    return build_plan(lengths, [1] * len(examples), seed=cfg.seed, epochs=cfg.train.epochs,
                      micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum, world=world,
                      packing=False, max_length=cfg.train.max_length, max_steps=cfg.train.max_steps)


# ----------------------------------------------------------------------------------------- log-probabilities
def answer_logprobs(model, sequences: list[dict], pad_id: int, attn_implementation: str = "sdpa") -> torch.Tensor:
    """Summed answer log-probabilities [N] of encoded `sequences` from ONE forward, packed padding-free into
    rows no longer than the longest (`sequence_logprobs`: each equals the sequence's value alone)."""
    lengths = [len(s["input_ids"]) for s in sequences]
    rows = pack_balanced(lengths, list(range(len(sequences))), max(lengths))
    batch = collate(sequences, rows, pad_id)
    owner = torch.zeros_like(batch["segment_ids"])
    for r, row in enumerate(rows):
        for k, i in enumerate(row, start=1):
            owner[r][batch["segment_ids"][r] == k] = i
    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in batch.items()}
    logits = model(**attention_inputs(batch, attn_implementation, param.dtype)).logits
    return sequence_logprobs(logits, batch["labels"], owner.to(param.device), len(sequences))


def pair_logprobs(model, examples: list[dict], indices: list[int], pad_id: int,
                  attn_implementation: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) summed answer log-probs of pairs `indices`, from one forward."""
    n = len(indices)
    both = answer_logprobs(model, [examples[i]["chosen"] for i in indices] + [examples[i]["rejected"] for i in indices],
                           pad_id, attn_implementation)
    return both[:n], both[n:]


def reference_model(model):
    """A context in which `model` is the reference: a peft model with its adapters disabled (the base model,
    no second copy), any other model as it is (before training it is the starting model)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def all_pair_logprobs(model, examples: list[dict], pad_id: int, batch_size: int,
                      attn_implementation: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) summed answer log-probs of `model` as it is over all pairs, `batch_size` pairs
    per forward."""
    parts = [pair_logprobs(model, examples, list(range(s, min(s + batch_size, len(examples)))), pad_id,
                           attn_implementation) for s in range(0, len(examples), batch_size)]
    return torch.cat([p[0] for p in parts]).float().cpu(), torch.cat([p[1] for p in parts]).float().cpu()


@torch.no_grad()
def reference_logprobs(model, sets: dict[str, list[dict]], pad_id: int, *, batch_size: int,
                       attn_implementation: str = "sdpa") -> dict[str, dict[str, list[float]]]:
    """{set: {"chosen": [...], "rejected": [...]}}: the reference's summed answer log-probs of every pair of each
    set (`reference_model`: a LoRA model's adapters off), in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = {}
    with reference_model(model):
        for name, examples in sets.items():
            chosen, rejected = all_pair_logprobs(model, examples, pad_id, batch_size, attn_implementation)
            out[name] = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
    model.train(was_training)
    return out


def reference_key(cfg: DPOConfig, sets: dict[str, list[dict]]) -> dict:
    """What the cached reference log-probs are valid for: the starting model's files, the encoded pairs and
    how they were computed."""
    path = Path(cfg.model.path)
    pairs = hashlib.sha256(json.dumps({name: [[e[s]["input_ids"] for s in SIDES] for e in examples]
                                       for name, examples in sets.items()}).encode()).hexdigest()
    return {"model": checkpoint_identity(str(path)) if path.is_dir() else {"id": cfg.model.path},
            "pairs": pairs, "dtype": cfg.model.dtype, "attn_implementation": cfg.model.attn_implementation,
            "lora": cfg.model.lora.enabled, "batch_size": cfg.dpo.batch_size, "device": local_device().type}


def cached_reference(run: RunDir, key: dict, compute) -> dict:
    """The reference log-probs from `run`'s cache file when it holds them for `key`; else the main process
    computes them (`compute()`) and writes the file atomically while the others wait. Every process reads
    the file, so a fresh and a resumed run train on the very same numbers."""
    path = run.path / REFERENCE_FILE

    def ready() -> bool:
        return path.is_file() and json.loads(path.read_text()).get("key") == key

    found = ready()
    main_process_does(lambda: write_json_atomic(path, {"key": key, "logprobs": compute()}), ready,
                      "the reference log-probs", "dpo")
    if is_main_process():
        print(f"[dpo] reference log-probs {'read from' if found else 'computed and written to'} {path}")
    return json.loads(path.read_text())["logprobs"]


# ----------------------------------------------------------------------------------------- the step
def dpo_step_fn(examples: list[dict], reference: dict[str, list[float]], pad_id: int, *, loss: str, beta: float,
                margins: bool, attn_implementation: str = "sdpa"):
    """The DPO micro-step: the loss of the micro-batch's pairs, summed, over the step's share of pairs."""
    loss_fn = DPO_LOSSES[DPOLoss(loss)]
    ref_chosen, ref_rejected = (torch.tensor(reference[side], dtype=torch.float32) for side in SIDES)

    def step(model, rows, scale):
        indices = [i for row in rows for i in row]
        chosen, rejected = pair_logprobs(model, examples, indices, pad_id, attn_implementation)
        index = torch.tensor(indices)
        margin = torch.tensor([examples[i]["margin"] for i in indices], device=chosen.device) if margins else None
        value, metrics = loss_fn(chosen, rejected, ref_chosen[index].to(chosen.device),
                                 ref_rejected[index].to(chosen.device), beta, margin)
        n = len(indices)
        loss_sum = value * n
        sums = {f"{k}_sum": v * n for k, v in metrics.items() if k != "loss"}
        return loss_sum / scale, {"loss_sum": loss_sum.detach(), **sums}

    return step


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_pairs(model, sets: dict[str, list[dict]], reference: dict[str, dict[str, list[float]]], pad_id: int,
                   *, loss: str, beta: float, margins: bool, batch_size: int,
                   attn_implementation: str = "sdpa") -> dict:
    """Per set: the held-out loss (the training loss on its pairs), and the implicit reward
    ``beta * log(pi / ref)``'s pair accuracy (a tie is wrong), overall and by rating, and its mean per side."""
    loss_fn = DPO_LOSSES[DPOLoss(loss)]
    model.eval()
    result = {}
    for name, examples in sets.items():
        policy = all_pair_logprobs(model, examples, pad_id, batch_size, attn_implementation)
        ref = [torch.tensor(reference[name][side], dtype=torch.float32) for side in SIDES]
        margin = torch.tensor([e["margin"] for e in examples]) if margins else None
        value, metrics = loss_fn(*policy, *ref, beta, margin)
        right = (beta * (policy[0] - ref[0]) > beta * (policy[1] - ref[1])).tolist()
        by_rating = {r: [ok for ok, e in zip(right, examples) if e["rating"] == r] for r in RATINGS}
        result[name] = {"count": len(examples), "loss": value.item(),
                        **{k: v.item() for k, v in metrics.items() if k != "loss"},
                        "by_rating": {r: {"accuracy": sum(v) / len(v) if v else None, "count": len(v)}
                                      for r, v in by_rating.items()}}
    return result


def print_pair_eval(result: dict) -> None:
    print("[dpo] held-out pairs: loss, implicit-reward accuracy (%), mean reward gap")
    for name, entry in result.items():
        print(f"  {name:<12} loss {entry['loss']:.4f}   accuracy {100 * entry['reward_accuracy']:.1f}   "
              f"margin {entry['reward_margin']:+.4f}   (n={entry['count']})")


def encode_pair_sets(cfg: DPOConfig, pairs: list[dict], tests: dict[str, list[dict]],
                     desc: str = "dpo") -> tuple:
    """(tokenizer, training examples, {test set: examples}, the training pairs' truncation counts): the
    starting model's tokenizer and every pair encoded (`encode_pairs`)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.chat.template)
    warning = toy_tokenizer_warning(tokenizer, [r[side] for r in pairs[:500] for side in SIDES])
    if warning and is_main_process():
        print(f"[{desc}] {warning}")
    examples, truncation = encode_pairs(tokenizer, pairs, cfg.train.max_length, cfg.dpo.margin_scale)
    test_examples = {name: encode_pairs(tokenizer, rows, cfg.train.max_length, cfg.dpo.margin_scale)[0]
                     for name, rows in tests.items()}
    return tokenizer, examples, test_examples, truncation


def train_on_pairs(cfg: DPOConfig, run: RunDir, tokenizer, examples: list[dict], test_examples: dict[str, list[dict]],
                   plan, desc: str = "dpo") -> tuple[dict, dict]:
    """DPO of `cfg.model` on the encoded pairs `examples` into `run` (prepared): the reference log-probs of
    the training and test pairs (`cached_reference`), then the shared loop (resume, checkpoints, final/).
    Returns (the loop's summary, the reference log-probs {"train" | "test/<name>": {"chosen", "rejected"}})."""
    torch.manual_seed(cfg.seed)  # LoRA adapters new to the checkpoint start the same in every run
    model = load_causal_lm(cfg.model)
    sets = {"train": examples, **{f"test/{name}": e for name, e in test_examples.items()}}

    def compute() -> dict:
        model.to(local_device())
        return reference_logprobs(model, sets, tokenizer.pad_token_id, batch_size=cfg.dpo.batch_size,
                                  attn_implementation=cfg.model.attn_implementation)

    reference = cached_reference(run, reference_key(cfg, sets), compute)
    step = dpo_step_fn(examples, reference["train"], tokenizer.pad_token_id, loss=cfg.dpo.loss, beta=cfg.dpo.beta,
                       margins=cfg.dpo.margin_scale != "none", attn_implementation=cfg.model.attn_implementation)
    summary = train(model=model, tokenizer=tokenizer, plan=plan, step_fn=step, cfg=loop_config(cfg), run=run,
                    desc=desc, unit="pairs", merge_lora=cfg.model.lora.merge_on_save)
    return summary, reference


def evaluate_final_pairs(cfg: DPOConfig, run: RunDir, sets: dict[str, list[dict]], reference: dict[str, dict],
                         pad_id: int) -> dict:
    """`evaluate_pairs` of `run`'s final model on encoded pair `sets` against their reference log-probs."""
    model, _ = load_policy(str(run.final_dir), cfg.model.dtype, cfg.model.attn_implementation)
    return evaluate_pairs(model, sets, reference, pad_id, loss=cfg.dpo.loss, beta=cfg.dpo.beta,
                          margins=cfg.dpo.margin_scale != "none", batch_size=cfg.dpo.batch_size,
                          attn_implementation=cfg.model.attn_implementation)
