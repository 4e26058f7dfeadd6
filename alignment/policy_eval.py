"""A fine-tuned policy measured: held-out loss and gold-scored answers (`evaluate_policy`, the table the
SFT-like stages print), and GAtt's Table 30 adherence of a checkpoint turn by turn (`adherence_by_turn`,
answers from `model_responder`). Shared by the stages that fine-tune, `align gatt` and `align eval`.
"""
from __future__ import annotations

from typing import Sequence

from alignment.chat import encode_prompt
from alignment.data.schemas import prompt_context
from alignment.data.toyworld import check_instruction
from alignment.finetune import encode_dialogs
from alignment.gatt_data import TABLE_30_TURNS, DialogPlan, Respond, measure_adherence_sets
from alignment.generation import generate
from alignment.judging import answer_prompts, from_toyworld, gold_metrics, heldout_loss, last_user_message
from alignment.models.loading import load_policy, resolve_dtype
from alignment.models.tokenizer import load_tokenizer
from alignment.runs import RunDir, write_json_atomic


def evaluate_policy(cfg, run: RunDir, eval_dialogs: list[dict], prompts: list[dict]) -> dict:
    """Held-out loss and gold-scored answers of the final model (and of the starting one, by option), loaded
    in `model.answer_dtype`."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(run.final_dir)
    result: dict = {}
    checkpoints = [("final", str(run.final_dir))]
    if cfg.eval.compare_base:
        checkpoints.append(("start", cfg.model.path))
    examples, _ = encode_dialogs(tokenizer, eval_dialogs, cfg.train.max_length, cfg.data.train_on)
    for name, path in checkpoints:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=resolve_dtype(cfg.model.answer_dtype),
                                                     attn_implementation=cfg.model.attn_implementation)
        entry = {}
        if examples:
            entry["heldout_loss"] = heldout_loss(model, examples, tokenizer.pad_token_id, cfg.model.attn_implementation)
        if prompts:
            answers = answer_prompts(model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                     batch_size=cfg.eval.batch_size, progress=cfg.logging.progress)
            if from_toyworld(prompts):
                entry.update(gold_metrics(prompts, answers))
            entry["examples"] = [{"prompt": last_user_message(r), "answer": a} for r, a in zip(prompts[:5], answers)]
        result[name] = entry
    write_json_atomic(run.path / "eval.json", result)
    return result


def print_eval_table(stage: str, result: dict, keys: tuple[str, ...] = ("heldout_loss", "gold_helpfulness",
                                                                       "violation_rate", "false_refusal_rate")) -> None:
    widths = [max(20, len(k) + 2) for k in keys]
    print(f"[{stage}] evaluation")
    print("  " + "checkpoint".ljust(12) + "".join(k.rjust(w) for k, w in zip(keys, widths)))
    for name, entry in result.items():
        cells = "".join((f"{entry[k]:.4f}" if k in entry else "-").rjust(w) for k, w in zip(keys, widths))
        print("  " + name.ljust(12) + cells)


def model_responder(model, tokenizer, *, max_new_tokens: int, num_samples: int = 1, temperature: float = 0.0,
                    top_p: float = 1.0, batch_size: int = 64, max_context: int | None = None,
                    seed: int = 0, synced: bool = False) -> Respond:
    """A `Respond` from a causal LM: `num_samples` answers per context (temperature 0: greedy), None for a
    context whose prompt plus `max_new_tokens` exceeds `max_context` (default: the model's positions).
    `synced`: a ZeRO-3-partitioned model whose every process answers the same contexts in lock step."""
    limit = max_context or model.config.max_position_embeddings
    calls = [0]

    def respond(contexts: list[list[dict]]) -> list[list[str] | None]:
        prompts = [encode_prompt(tokenizer, c) for c in contexts]
        fits = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= limit]
        out: list[list[str] | None] = [None] * len(contexts)
        if fits:
            samples = generate(model, tokenizer, [prompts[i] for i in fits], max_new_tokens=max_new_tokens,
                               num_samples=num_samples, temperature=temperature, top_p=top_p,
                               batch_size=batch_size, seed=seed * 100_003 + calls[0], synced=synced)
            for i, per_prompt in zip(fits, samples):
                out[i] = [s.text for s in per_prompt]
        calls[0] += 1  # each turn draws with its own seed
        return out

    return respond


# ----------------------------------------------------------------------------------------- evaluation
def user_messages(rows: list[dict]) -> list[str]:
    """The user message each rl_prompt row asks (its last user turn)."""
    return [prompt_context(r)[-1]["content"] for r in rows]


def adherence_by_turn(model_dir: str, instruction_sets: dict[str, list[dict]], prompts: list[str], *,
                      seed: int = 0, turns: Sequence[int] = TABLE_30_TURNS, max_new_tokens: int = 32,
                      batch_size: int = 64, max_context: int | None = None, dtype: str = "auto",
                      attn_implementation: str = "sdpa", partitioned: bool = False,
                      transcripts: dict[str, list[DialogPlan]] | None = None) -> dict[str, dict[str, float | None]]:
    """Table 30 for one checkpoint and each instruction set: {set: {"1": share of answers obeying at turn 1,
    ..., "20": ...}}.

    One dialog per instruction (gatt_instruction rows) with max(turns) user turns drawn from `prompts`
    with `seed` (the same dialogs for every checkpoint, and for a set whether or not other sets are
    measured beside it); the instruction is the system prompt of the first turn only and the model's greedy
    answers are its history. The sets' dialogs are played together (one batch per turn). A dialog whose
    context outgrows `max_context` stops there and leaves the later turns' denominators (see
    `dialogs_reaching`). The played dialogs are stored in `transcripts[set]` when given. `partitioned`: the
    checkpoint loaded with ZeRO-3 over the run's processes, every one of which calls this alike.
    """
    model, tokenizer = load_policy(model_dir, dtype, attn_implementation, partitioned=partitioned)
    respond = model_responder(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              max_context=max_context, synced=partitioned)
    rates, plans = measure_adherence_sets(respond, instruction_sets, prompts, check=check_instruction,
                                          seed=seed, turns=turns)
    if transcripts is not None:
        transcripts.update(plans)
    return rates
