"""`align dpo`: offline DPO or IPO on the reward models' preference pairs (docs/method.md#offline-dpo-beyond-the-paper;
Rafailov et al. 2023, Azar et al. 2023; issue 25), a policy stage beside rejection sampling and PPO that needs
no reward model.

The data section is the RMs' (`RMData`: the same `preference_pair` files, mixes and held-out test sets), mixed
by `alignment.data.mixing.mix_rm_data`. Every answer is encoded once with `alignment.scoring.encode_answer`:
the tokens the RMs read, cut from the left, with labels on the answer only.

The reference pi_ref is the starting model. Its summed answer log-probabilities of every training and test
pair are computed once, before training, by the loaded model itself (with LoRA: with its adapters disabled,
which is the base model), and written atomically to `reference_logprobs.json` in the run directory, keyed
by the model's files and the encoded pairs; a resumed run reads them back. No second model is ever held.

A micro-batch's chosen and rejected answers go through one forward, packed padding-free (block-diagonal
mask, `alignment.batching`); `alignment.losses.DPO_LOSSES[dpo.loss]` gives the loss, with per-pair rating
margins (`preference_margin`) when `dpo.margin_scale` is set. The shared loop (`alignment.training.train`)
does ZeRO, resume, checkpoints and logging; one plan item is one pair, so a step's loss is the mean over its
pairs. At the end: per test set, the final model's held-out loss and implicit-reward pair accuracy (overall
and by rating); with `eval.prompts`, its answers gold-scored as after SFT (`alignment.policy_eval`). The
machinery (encoding, cached reference, step, pair evaluation) is `alignment.dpo_training`, shared with the
rejection-sampling stage's RS+DPO iterations.
"""
from __future__ import annotations

from alignment.batching import format_truncation
from alignment.config import DPOConfig, SFTData
from alignment.data.mixing import mix_rm_data
from alignment.data.sources import load_preference_data, load_sources, source_hashes
from alignment.distributed import is_main_process, world_size
from alignment.dpo_training import encode_pair_sets, evaluate_final_pairs, make_plan, print_pair_eval, train_on_pairs
from alignment.finetune import sft_config_for
from alignment.models.loading import check_model_paths, model_paths
from alignment.policy_eval import evaluate_policy, print_eval_table
from alignment.runs import RunDir, write_json_atomic


# ----------------------------------------------------------------------------------------- the stage
def run_dpo(cfg: DPOConfig) -> dict:
    """`align dpo`: validate data, mix, encode, reference log-probs (cached), train (resuming from
    checkpoints), evaluate, mark done."""
    if cfg.train.packing:
        raise ValueError("train.packing must be false for DPO: each example is a chosen/rejected pair (a micro-batch's "
                         "answers are packed for its forward anyway)")
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("dpo")
    if done is not None:
        return done
    check_model_paths(model_paths(cfg.model))  # a missing model stops the run before any data is read
    primary, secondary, tests = load_preference_data(cfg.data)
    prompts = load_sources(cfg.eval.prompts, "rl_prompt")[:cfg.eval.max_prompts]
    pairs, mix = mix_rm_data(cfg, primary, secondary, tests)
    inputs = source_hashes([*cfg.data.primary, *cfg.data.secondary, *(s for v in cfg.data.test.values() for s in v),
                            *cfg.eval.prompts])

    tokenizer, examples, test_examples, truncation = encode_pair_sets(cfg, pairs, tests)
    plan = make_plan(cfg, examples, world_size())
    run.prepare(inputs, is_main=is_main_process())
    if is_main_process():
        if truncation["truncated"]:
            print(format_truncation("dpo pairs", truncation, side="left"))
        write_json_atomic(run.path / "mix.json", mix)
        print(f"[dpo] {len(pairs)} pairs ({mix['kind']} mix); loss {cfg.dpo.loss}, beta {cfg.dpo.beta}, margin "
              f"{cfg.dpo.margin_scale}; {len(plan.steps)} steps")

    summary, reference = train_on_pairs(cfg, run, tokenizer, examples, test_examples, plan, desc="dpo")
    summary.update(pairs=len(pairs), loss=cfg.dpo.loss, beta=cfg.dpo.beta, truncation=truncation)
    if is_main_process():
        summary["eval"] = evaluate_dpo(cfg, run, test_examples, reference, prompts, tokenizer.pad_token_id)
        write_json_atomic(run.path / "eval.json", summary["eval"])
        run.mark_done(summary)
    return summary


def evaluate_dpo(cfg: DPOConfig, run: RunDir, test_examples: dict[str, list[dict]], reference: dict,
                 prompts: list[dict], pad_id: int) -> dict:
    """The final model on the held-out pairs (`evaluate_pairs`) and, with prompts, its answers gold-scored
    (`evaluate_policy`, with the starting model beside it when eval.compare_base)."""
    result: dict = {}
    if prompts:
        sft_cfg = sft_config_for(cfg, SFTData(train=[]), eval=cfg.eval)
        result.update(evaluate_policy(sft_cfg, run, [], prompts))
        print_eval_table("dpo", result, ("gold_helpfulness", "violation_rate", "false_refusal_rate"))
    if test_examples:
        result["pairs"] = evaluate_final_pairs(cfg, run, test_examples,
                                               {name: reference[f"test/{name}"] for name in test_examples}, pad_id)
        print_pair_eval(result["pairs"])
    return result
