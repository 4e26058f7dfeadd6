"""Stage 1: supervised fine-tuning in the recipe's chat format (docs/method.md#supervised-fine-tuning).

Dialogs are encoded with `alignment.chat.encode` (the Llama-2 format or the model's own template; loss on
every assistant answer, or on the last one only), packed padding-free into rows with a block-diagonal mask,
and trained by the shared loop with `alignment.losses.sft_loss` normalised by the trained tokens of the
whole optimizer step. Rejection sampling, GAtt and safety distillation fine-tune through the same
`alignment.finetune.fine_tune`.
"""
from __future__ import annotations

from alignment.config import SFTConfig
from alignment.data.sources import load_sources, source_hashes
from alignment.finetune import fine_tune, is_main_process
from alignment.models.loading import check_model_paths, model_paths
from alignment.policy_eval import evaluate_policy, print_eval_table
from alignment.runs import RunDir


def run_sft(cfg: SFTConfig) -> dict:
    """`align sft`: validate data, fine-tune (resuming if the run has checkpoints), evaluate, mark done."""
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("sft")
    if done is not None:
        return done
    check_model_paths(model_paths(cfg.model))  # a missing model stops the run before any data is read
    dialogs = load_sources(cfg.data.train, "sft_dialog")  # every input is checked before any compute
    eval_dialogs = load_sources(cfg.data.eval, "sft_dialog")
    prompts = load_sources(cfg.eval.prompts, "rl_prompt")[:cfg.eval.max_prompts]
    inputs = source_hashes([*cfg.data.train, *cfg.data.eval, *cfg.eval.prompts])
    summary = fine_tune(cfg, dialogs, run, inputs, desc="sft")
    if is_main_process():
        summary["eval"] = evaluate_policy(cfg, run, eval_dialogs, prompts)
        run.mark_done(summary)
        print_eval_table("sft", summary["eval"])
    return summary
