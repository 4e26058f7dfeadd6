"""Stage 3: rejection sampling, RLHF-V1..Vn in one run (docs/method.md#rejection-sampling; paper 3.2.3).

Every iteration n of `cfg.iterations` (K samples at temperature T):

1. sample K answers per RL prompt from the current policy (V1: `model.path`; Vn: V(n-1)'s fine-tuned
   checkpoint; or always `policy.sample_from`, a larger model whose samples the policy is distilled from),
2. score them with the reward model(s): the PPO reward `combine(sigmoid(Rh), sigmoid(Rs), is_safety)` or
   one RM (`reward.mode`),
3. keep the best answer per prompt: among this iteration's samples, or from iteration `best_of_all_from`
   on (the paper: V4) among the samples of every iteration so far. Older samples need no re-scoring:
   the reward models are fixed within a run (they are part of its config), so all scores are comparable,
4. fine-tune the policy on the kept answers (SFT loss on the answer, `alignment.finetune.fine_tune`) into
   `iterations/vN/`, and evaluate it on the held-out prompts (`sft.evaluate_policy`).

An iteration with `update: dpo` (RS+DPO, beyond the paper: later Llama releases) replaces step 4: from the
same candidates, one preference pair per prompt, its highest-scored answer chosen and its lowest rejected
(`alignment.sampling.select_pairs`; prompts whose samples all tie are skipped), written to
`iterations/vN/pairs.jsonl` and trained on with DPO (`alignment.dpo_training`, as `align dpo`: the recipe's `dpo` section,
reference = the iteration's start checkpoint, log-probs cached) into the same `iterations/vN/`, then
evaluated as an SFT iteration is.

Layout of `output.dir`:

    config.json, run.json, done.json      the whole run (RunDir)
    iterations/vN/samples/                the sample shards (`alignment.sampling.ShardStore`)
    iterations/vN/kept.jsonl              the kept answers as sft_dialog rows (what vN is fine-tuned on)
    iterations/vN/pairs.jsonl             update: dpo only, the (best, worst) preference_pair rows vN trains on
    iterations/vN/{config.json, checkpoints/, final/, eval.json, done.json}   vN's fine-tune (an SFT run)
    iterations/vN/report.json             best-of-K vs single-sample reward, gold metrics, samples/s, eval
    sweep/                                the temperature sweep (sweep.enabled=true), JSON and PNG

Resume: a killed run keeps every finished shard and samples only the missing chunks, each with a seed
that depends on (seed, iteration, chunk) only, so it draws what an uninterrupted run draws; a fine-tune
resumes from the shared loop's checkpoints; a finished iteration (done.json) is never touched again.

Generation runs on a plain HF model loaded from the sampler's checkpoint directory (full weights on one
device, KV cache, prompts sorted by length, the K samples of a prompt side by side in a batch). Under
ZeRO-3 training this is the paper's fix for slow generation: the weights are consolidated once per
generation round (they are the saved checkpoint), never gathered layer by layer per token. With several
processes each samples its own chunks (chunk i on rank i mod world) and they meet on the shard files.
A vLLM backend is not offered yet: every sample goes through `alignment.generation.generate`.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from pathlib import Path

import torch

from alignment.batching import format_truncation
from alignment.chat import encode_prompt
from alignment.config import (DataSource, DPOConfig, FineTuneSections, RejectionSamplingConfig, RMData, RSIteration,
                              RSSweepSection, SFTConfig, SFTData)
from alignment.data.io import file_sha256, write_jsonl
from alignment.data.schemas import prompt_context
from alignment.data.sources import load_sources, source_hashes
from alignment.distributed import (agreed_max, ensure_process_group, is_main_process, main_process_does, rank,
                                   wait_for, world_size)
from alignment.dpo_training import encode_pair_sets, evaluate_final_pairs, make_plan as dpo_plan, train_on_pairs
from alignment.faults import fault_point
from alignment.finetune import fine_tune, sft_config_for
from alignment.generation import VLLMSampler, generate_with, pick_backend
from alignment.judging import from_toyworld, gold_metrics
from alignment.models.loading import check_model_paths, load_policy, load_rm_for_inference, model_paths
from alignment.models.tokenizer import load_tokenizer
from alignment.policy_eval import evaluate_policy, print_eval_table
from alignment.runs import RunDir, write_json_atomic
from alignment.sampling import (REQUIRED_RMS, RewardMode, ShardStore, best_of_k_curves, candidate_iterations,
                                chunk_seed, powers_of_two, rating_for_score_gap, sample_reward, select_best,
                                select_pairs)
from alignment.scoring import describe_threshold, reward_scores, safety_threshold
from alignment.training import check_disk_before_sampling

DESC = "rejection-sampling"
PAIRS_FILE = "pairs.jsonl"  # an `update: dpo` iteration's preference pairs, in its iteration directory
STOP_AFTER_SHARD_ENV = "ALIGN_STOP_AFTER_SHARD"  # tests: die abruptly after this many shards are written


# ----------------------------------------------------------------------------------------- models
def load_sampler(path: str, cfg: RejectionSamplingConfig):
    """The policy that draws samples and its tokenizer: a plain HF causal LM (inference only), or a vLLM
    engine where `generation.backend` picks it."""
    template = cfg.chat.template if path == cfg.model.path else None  # other checkpoints carry their own
    if pick_backend(cfg.generation.backend, world_size()) == "vllm":
        if cfg.generation.zero3:
            raise ValueError("generation.zero3 partitions the hf sampler; vLLM shards with tensor parallelism: set "
                             "generation.backend hf, or generation.zero3 false")
        dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(cfg.model.answer_dtype, "auto")
        return VLLMSampler(path, dtype, cfg.generation.vllm_gpu_memory_utilization), load_tokenizer(path, template)

    return load_policy(path, cfg.model.answer_dtype, cfg.model.attn_implementation, template,
                       partitioned=_partitioned(cfg)[0])


def _partitioned(cfg: RejectionSamplingConfig) -> tuple[bool, bool]:
    """(sampler, RMs) partitioned with ZeRO-3: as the recipe says, where several processes run."""
    several = world_size() > 1
    return cfg.generation.zero3 and several, cfg.reward.zero3 and several


def load_reward_models(cfg: RejectionSamplingConfig) -> dict[str, tuple]:
    """{"helpful"|"safety": (model, tokenizer)} for the RMs `reward.mode` reads."""
    return {name: load_rm_for_inference(getattr(cfg.reward, f"{name}_rm"), cfg.reward.dtype,
                                        partitioned=_partitioned(cfg)[1])
            for name in REQUIRED_RMS[RewardMode(cfg.reward.mode)]}


def _release_memory() -> None:
    """Return the memory of models the caller just deleted (the next phase loads other models)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_answers(cfg: RejectionSamplingConfig, rms: dict, rows: list[dict], answers: list[str],
                  min_batches: int = 0) -> dict:
    """Raw RM scores, their sigmoids and the ranking score of (rows[i], answers[i]) pairs, as lists
    (`min_batches`: see `alignment.scoring.reward_scores`)."""
    contexts = [prompt_context(r) for r in rows]
    raw = {name: reward_scores(model, tok, contexts, answers, batch_size=cfg.reward.batch_size,
                               max_length=cfg.reward.max_length, min_batches=min_batches)
           for name, (model, tok) in rms.items()}
    is_safety = torch.tensor([bool(r["is_safety"]) for r in rows])
    score = sample_reward(cfg.reward.mode, raw.get("helpful"), raw.get("safety"), is_safety, safety_threshold(cfg.reward))
    out = {"score": score.tolist()}
    for name in ("helpful", "safety"):
        out[f"{name}_raw"] = raw[name].tolist() if name in raw else [None] * len(answers)
        out[name] = torch.sigmoid(raw[name]).tolist() if name in raw else [None] * len(answers)
    return out


# ----------------------------------------------------------------------------------------- sampling
def sample_chunk(cfg, sampler, tokenizer, rms, rows: list[dict], *, iteration: int, num_samples: int,
                 temperature: float, seed: int, lock_step: bool = False) -> list[dict]:
    """K samples for each row of one chunk, scored: the records of one shard (prompt order, then k).

    `lock_step` (partitioned sampler or RMs, whose forwards are collectives): generation decodes in step with
    the other processes, and a short chunk (the last) makes as many generate and scoring batches as a full
    one, the extra ones on throwaway input; the samples are those of the same chunk sampled alone."""
    prompts = [encode_prompt(tokenizer, prompt_context(r)) for r in rows]
    jobs = cfg.generation.prompts_per_shard * num_samples
    lock = {"synced": True, "min_batches": math.ceil(jobs / cfg.generation.batch_size)} if lock_step else {}
    samples = generate_with(sampler, tokenizer, prompts, max_new_tokens=cfg.generation.max_new_tokens,
                       num_samples=num_samples, temperature=temperature, top_p=cfg.generation.top_p,
                       batch_size=cfg.generation.batch_size, seed=seed, **lock)
    flat = [(rows[i], s) for i, per_prompt in enumerate(samples) for s in per_prompt]
    fault_point("sampling.generated")
    scores = score_answers(cfg, rms, [r for r, _ in flat], [s.text for _, s in flat],
                           min_batches=math.ceil(jobs / cfg.reward.batch_size) if lock_step else 0)
    records = []
    for j, (row, s) in enumerate(flat):
        records.append({
            "prompt_id": row["id"], "iteration": iteration, "sample_index": s.sample_index, "text": s.text,
            "token_count": len(s.token_ids), "finished": s.finished, "temperature": temperature,
            **{key: scores[key][j] for key in ("helpful_raw", "helpful", "safety_raw", "safety", "score")}})
    return records


def _chunks(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def sample_iteration(cfg: RejectionSamplingConfig, iteration: int, sampler_path: str, rows: list[dict],
                     store: ShardStore) -> dict:
    """Write every missing shard of one iteration (this process's chunks), then mark the samples done."""
    from tqdm.auto import tqdm

    spec = cfg.iterations[iteration - 1]
    chunks = _chunks(rows, cfg.generation.prompts_per_shard)
    me, world = rank(), world_size()
    todo = [i for i in range(len(chunks)) if i % world == me and not store.has_shard(i)]
    stop_after = int(os.environ.get(STOP_AFTER_SHARD_ENV, "0"))
    samples = tokens = 0
    t0 = time.perf_counter()
    lock_step = any(_partitioned(cfg))
    rounds = len(todo)
    if lock_step:  # partitioned models: every process loads them and runs as many chunks as the busiest one
        ensure_process_group()
        rounds = agreed_max(len(todo))
    if rounds:
        sampler, tokenizer = load_sampler(sampler_path, cfg)
        rms = load_reward_models(cfg)
        if lock_step and is_main_process():
            which = " and ".join(w for w, on in zip(("sampler", "reward models"), _partitioned(cfg)) if on)
            print(f"[{DESC}] v{iteration}: {which} partitioned with ZeRO-3 over {world} processes, in lock step",
                  flush=True)
        bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc=f"sample v{iteration}", unit="shard",
                   dynamic_ncols=True, disable=not (cfg.logging.progress and is_main_process()))
        for written, index in enumerate(todo + [None] * (rounds - len(todo)), start=1):
            if index is None:  # nothing left here: keep the others company with a chunk whose records are dropped
                sample_chunk(cfg, sampler, tokenizer, rms, chunks[0], iteration=iteration,
                             num_samples=spec.num_samples, temperature=spec.temperature, seed=0, lock_step=True)
                continue
            records = sample_chunk(cfg, sampler, tokenizer, rms, chunks[index], iteration=iteration,
                                   num_samples=spec.num_samples, temperature=spec.temperature,
                                   seed=chunk_seed(cfg.seed, iteration, index), lock_step=lock_step)
            fault_point("sampling.scored")
            store.write_shard(index, records)
            fault_point("sampling.shard_written")
            samples += len(records)
            tokens += sum(r["token_count"] for r in records)
            bar.update(1)
            bar.set_postfix(samples_per_s=f"{samples / (time.perf_counter() - t0):.1f}")
            if written == stop_after:  # fault injection for tests: die like a killed process, no cleanup
                os._exit(99)
        bar.close()
        del sampler, rms
        _release_memory()
    seconds = time.perf_counter() - t0
    if is_main_process():
        wait_for(lambda: all(store.has_shard(i) for i in range(len(chunks))), "every rank's shards", DESC)
        records = store.read()
        store.mark_done({
            "shards": len(chunks), "samples": len(records), "shards_sampled_by_this_session": len(todo),
            "seconds": seconds, "samples_per_s": samples / seconds if samples else None,
            "tokens_per_s": tokens / seconds if samples else None,
            "finished_rate": sum(r["finished"] for r in records) / max(len(records), 1)})
    else:
        wait_for(store.done, "the main process to close the samples", DESC)
    return store.summary()


# ----------------------------------------------------------------------------------------- reports
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sample_report(rows: list[dict], records: list[dict], kept: dict[str, dict], iteration: int) -> dict:
    """Mean best-of-K vs mean single-sample reward of this iteration's samples, and (toy world) the gold
    metrics of the kept answers vs of one sample per prompt (sample 0)."""
    own = [r for r in records if r["iteration"] == iteration]
    own_best = select_best(own)
    report = {
        "mean_single_sample_reward": _mean([r["score"] for r in own]),
        "mean_best_of_k_reward": _mean([r["score"] for r in own_best.values()]),
        "mean_kept_reward": _mean([r["score"] for r in kept.values()]),
        "kept": len(kept), "prompts_without_answer": len(rows) - len(kept),
        "kept_from_iteration": {f"v{n}": sum(r["iteration"] == n for r in kept.values())
                                for n in sorted({r["iteration"] for r in kept.values()})},
    }
    if from_toyworld(rows):
        first = {r["prompt_id"]: r["text"] for r in own if r["sample_index"] == 0}
        kept_rows = [r for r in rows if r["id"] in kept]
        report["gold_kept"] = gold_metrics(kept_rows, [kept[r["id"]]["text"] for r in kept_rows])
        report["gold_single_sample"] = gold_metrics(rows, [first[r["id"]] for r in rows])
    return report


def _iteration_name(rep: dict) -> str:
    """"v2", or "v3 dpo" for an RS+DPO iteration."""
    return f"v{rep['iteration']}" + (" dpo" if rep.get("update") == "dpo" else "")


def _cells(values: list, width: int = 11) -> str:
    return "".join(("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)).rjust(width)
                   for v in values)


def print_summary(reports: list[dict]) -> None:
    """Two tables: what each iteration's sampling harvested, and the held-out evaluation of each checkpoint."""
    print("[rejection-sampling] samples (reward: the ranking score; gold: toy-world scorers on the kept answers)")
    cols = ["K", "T", "single", "best-of-K", "kept", "gold_help", "violation", "samples/s"]
    print("  " + "iter".ljust(8) + "".join(c.rjust(11) for c in cols))
    for rep in reports:
        s, gold = rep["samples"], rep["samples"].get("gold_kept", {})
        print("  " + _iteration_name(rep).ljust(8) + _cells([
            rep["num_samples"], rep["temperature"], s["mean_single_sample_reward"], s["mean_best_of_k_reward"],
            s["mean_kept_reward"], gold.get("gold_helpfulness"), gold.get("violation_rate"),
            rep["sampling"]["samples_per_s"]]))
    keys = ["heldout_loss", "gold_helpfulness", "violation_rate", "false_refusal_rate"]
    rows = [("start", reports[0]["eval"]["start"])] if "start" in reports[0]["eval"] else []
    rows += [(_iteration_name(rep), rep["eval"]["final"]) for rep in reports]
    print("[rejection-sampling] held-out evaluation (start: the checkpoint v1 was fine-tuned from)")
    print("  " + "model".ljust(8) + "".join(k.rjust(20) for k in keys))
    for name, entry in rows:
        print("  " + name.ljust(8) + _cells([entry.get(k) for k in keys], 20))


# ----------------------------------------------------------------------------------------- iterations
def with_iteration_lr(cfg: RejectionSamplingConfig, spec: RSIteration) -> RejectionSamplingConfig:
    """`cfg` with the iteration's own learning rate (`iterations[n].lr`) in optim, where it sets one."""
    if spec.lr is None:
        return cfg
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=spec.lr))


def iteration_sft_config(cfg: RejectionSamplingConfig, iteration: int, start: str, kept_path: Path) -> SFTConfig:
    """The SFT run of iteration n: `start` fine-tuned on its kept answers with the recipe's SFT sections."""
    data = SFTData(train=[DataSource(path=str(kept_path))], eval=cfg.data.eval, train_on=cfg.data.train_on)
    return sft_config_for(cfg, data, model=dataclasses.replace(cfg.model, path=start),
                          output=dataclasses.replace(cfg.output, dir=str(kept_path.parent)),
                          eval=dataclasses.replace(cfg.eval, compare_base=cfg.eval.compare_base and iteration == 1))


def kept_dialogs(rows: list[dict], kept: dict[str, dict], iteration: int) -> list[dict]:
    """sft_dialog rows: each prompt's context answered by its kept sample (prompts in file order)."""
    out = []
    for row in rows:
        if row["id"] in kept:
            best = kept[row["id"]]
            out.append({"id": f"rs-v{iteration}-{row['id']}", "source": "rejection_sampling",
                        "messages": [*prompt_context(row), {"role": "assistant", "content": best["text"]}],
                        "meta": {"iteration": best["iteration"], "sample_index": best["sample_index"],
                                 "score": best["score"]}})
    return out


def iteration_dpo_config(cfg: RejectionSamplingConfig, sft_cfg: SFTConfig, pairs_path: Path) -> DPOConfig:
    """The DPO run of an `update: dpo` iteration: the SFT iteration's start model, output and eval (`sft_cfg`)
    trained on its pairs with the recipe's `dpo` section and shared fine-tune sections, except train.packing,
    always false here (a DPO example is a pair; a micro-batch's answers are packed for its forward anyway)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FineTuneSections)}
    shared["train"] = dataclasses.replace(cfg.train, packing=False)
    return DPOConfig(**shared, model=sft_cfg.model, data=RMData(primary=[DataSource(path=str(pairs_path))]),
                     output=sft_cfg.output, dpo=cfg.dpo, chat=cfg.chat, eval=sft_cfg.eval)


def _sample_ref(record: dict) -> dict:
    return {"iteration": record["iteration"], "sample_index": record["sample_index"], "score": record["score"]}


def preference_rows(rows: list[dict], pairs: dict[str, tuple[dict, dict]], iteration: int) -> list[dict]:
    """preference_pair rows (prompts in file order): each prompt's context, its best sample chosen and its worst
    rejected (`select_pairs`), rated by their score gap (`rating_for_score_gap`)."""
    out = []
    for row in rows:
        if row["id"] in pairs:
            best, worst = pairs[row["id"]]
            where = {"prompt": row["prompt"]} if "prompt" in row else {"context": row["context"]}
            out.append({"id": f"rsdpo-v{iteration}-{row['id']}", **where, "chosen": best["text"],
                        "rejected": worst["text"], "rating": rating_for_score_gap(best["score"] - worst["score"]),
                        "kind": "safety" if row["is_safety"] else "helpfulness", "source": "rejection_sampling",
                        "meta": {"prompt_id": row["id"], "chosen": _sample_ref(best), "rejected": _sample_ref(worst)}})
    return out


def dpo_update(cfg: RejectionSamplingConfig, dpo_cfg: DPOConfig, run: RunDir, iteration: int, rows: list[dict],
               records: list[dict]) -> dict:
    """RS+DPO's update of iteration `iteration`: (best, worst) pairs of the candidate `records` written to
    pairs.jsonl (and read back through the preference_pair schema), DPO from the start checkpoint into `run`,
    the final model's implicit-reward accuracy on those pairs. Returns the DPO summary for report.json."""
    desc = f"rs-v{iteration}"
    pairs_path = run.path / PAIRS_FILE
    chosen, skipped = select_pairs(records)
    pair_rows = preference_rows(rows, chosen, iteration)
    if not pair_rows:
        raise ValueError(f"[{desc}] no preference pair to train DPO on: every prompt's samples scored alike or "
                         f"were fewer than 2 ({skipped}); sample more (num_samples) or at a higher temperature")
    main_process_does(lambda: write_jsonl(pairs_path, pair_rows), pairs_path.is_file, "the preference pairs", DESC)
    pairs = load_sources(dpo_cfg.data.primary, "preference_pair")  # the rows DPO trains on, checked
    tokenizer, examples, _, truncation = encode_pair_sets(dpo_cfg, pairs, {}, desc)
    plan = dpo_plan(dpo_cfg, examples, world_size())
    run.prepare({str(pairs_path): file_sha256(pairs_path)}, is_main=is_main_process())
    if is_main_process():
        if truncation["truncated"]:
            print(format_truncation(f"{desc} pairs", truncation, side="left"))
        print(f"[{desc}] RS+DPO: {len(pairs)} (best, worst) pairs, {sum(skipped.values())} prompts skipped "
              f"({skipped}); loss {cfg.dpo.loss}, beta {cfg.dpo.beta}; {len(plan.steps)} steps")
    summary, reference = train_on_pairs(dpo_cfg, run, tokenizer, examples, {}, plan, desc=desc)
    result = {"pairs": len(pairs), "skipped": skipped, "loss": cfg.dpo.loss, "beta": cfg.dpo.beta,
              "margin_scale": cfg.dpo.margin_scale, "truncation": truncation,
              "mean_score_gap": _mean([r["meta"]["chosen"]["score"] - r["meta"]["rejected"]["score"] for r in pairs]),
              "train": summary}
    if is_main_process():
        result["train_pairs"] = evaluate_final_pairs(dpo_cfg, run, {"train": examples}, {"train": reference["train"]},
                                                     tokenizer.pad_token_id)["train"]
    return result


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / "iterations" / f"v{iteration}"


def run_iteration(cfg: RejectionSamplingConfig, root: Path, iteration: int, rows: list[dict],
                  eval_dialogs: list[dict], eval_prompts: list[dict]) -> dict:
    """Sample, keep the best, fine-tune and evaluate iteration `iteration` (1-based), resuming where it stopped."""
    spec = cfg.iterations[iteration - 1]
    it_dir = iteration_dir(root, iteration)
    start = cfg.model.path if iteration == 1 else str(iteration_dir(root, iteration - 1) / "final")
    sampler = spec.sample_from or cfg.policy.sample_from or start
    kept_path = it_dir / "kept.jsonl"
    it_cfg = with_iteration_lr(cfg, spec)
    sft_cfg = iteration_sft_config(it_cfg, iteration, start, kept_path)  # also what a dpo iteration is evaluated by
    dpo_cfg = iteration_dpo_config(it_cfg, sft_cfg, it_dir / PAIRS_FILE) if spec.update == "dpo" else None
    run = RunDir(it_dir, dpo_cfg or sft_cfg, overwrite=cfg.output.overwrite)
    if run.finished_summary(f"rs-v{iteration}") is not None:  # a damaged final/ is named and re-made
        return json.loads((it_dir / "report.json").read_text())

    store = ShardStore(it_dir / "samples")
    if not store.done():
        check_disk_before_sampling(run, start, cfg.output, f"rs-v{iteration}")
        if is_main_process():
            store.check_meta({"sampled_by": sampler, "num_samples": spec.num_samples,
                              "temperature": spec.temperature, "seed": cfg.seed,
                              "generation": dataclasses.asdict(cfg.generation),
                              "reward": dataclasses.asdict(cfg.reward), "prompt_ids": [r["id"] for r in rows]})
            store.remove_temp_files()
        else:
            wait_for(lambda: (store.path / "meta.json").is_file(), "the sample store", DESC)
        print(f"[rejection-sampling] v{iteration}: {spec.num_samples} samples x {len(rows)} prompts at "
              f"T={spec.temperature} from {sampler}")
        sampling = sample_iteration(cfg, iteration, sampler, rows, store)
    else:
        sampling = store.summary()

    records = [r for n in sorted(candidate_iterations(iteration, cfg.best_of_all_from))
               for r in ShardStore(iteration_dir(root, n) / "samples").read()]
    kept = select_best(records)
    dialogs = kept_dialogs(rows, kept, iteration)
    main_process_does(lambda: write_jsonl(kept_path, dialogs), kept_path.is_file, "the kept answers", DESC)
    report = {"iteration": iteration, "num_samples": spec.num_samples, "temperature": spec.temperature,
              "update": spec.update, "sampled_by": sampler, "fine_tuned_from": start,
              "candidate_iterations": sorted(candidate_iterations(iteration, cfg.best_of_all_from)),
              "prompts": len(rows), "sampling": sampling, "samples": sample_report(rows, records, kept, iteration)}
    if dpo_cfg is not None:
        report["dpo"] = dpo_update(cfg, dpo_cfg, run, iteration, rows, records)
    else:
        report["fine_tune"] = fine_tune(sft_cfg, dialogs, run, {str(kept_path): file_sha256(kept_path)},
                                        desc=f"rs-v{iteration}")
    if is_main_process():
        report["eval"] = evaluate_policy(sft_cfg, run, eval_dialogs, eval_prompts)
        write_json_atomic(it_dir / "report.json", report)
        run.mark_done({"report": str(it_dir / "report.json")})
        print_eval_table(f"rs-v{iteration}", report["eval"])
    return report


def _check_inputs(cfg: RejectionSamplingConfig, rows: list[dict]) -> None:
    """Everything that can be checked before any compute and that the config loader has not (value ranges:
    alignment.config.ranges; the data rows themselves: `load_sources`)."""
    if not cfg.iterations:
        raise ValueError("iterations: at least one iteration is needed")
    for name in REQUIRED_RMS[RewardMode(cfg.reward.mode)]:
        path = getattr(cfg.reward, f"{name}_rm")
        if path is None:
            raise ValueError(f"reward.{name}_rm: a reward model directory is required for reward.mode={cfg.reward.mode}")
        if not Path(path).exists():
            raise FileNotFoundError(f"reward.{name}_rm: {path} not found")
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row["id"] in seen:
            raise ValueError(f"data.prompts: prompt id {row['id']!r} appears twice (rows {seen[row['id']] + 1} and "
                             f"{i + 1} of the concatenated files); ids key the samples")
        seen[row["id"]] = i


def run_rejection_sampling(cfg: RejectionSamplingConfig) -> dict:
    """`align rejection-sampling`: every iteration of the recipe, resuming where a killed run stopped
    (or the temperature sweep alone, with `sweep.enabled`)."""
    if not cfg.sweep.enabled:  # the sweep samples from its own checkpoint
        check_model_paths(model_paths(cfg.model))  # a missing model stops the run before any data is read
    rows = load_sources(cfg.data.prompts, "rl_prompt")  # every input is checked before any compute
    eval_dialogs = load_sources(cfg.data.eval, "sft_dialog")
    eval_prompts = load_sources(cfg.eval.prompts, "rl_prompt")[:cfg.eval.max_prompts]
    _check_inputs(cfg, rows)

    pick_backend(cfg.generation.backend, world_size())  # fails here, before any compute
    switch = describe_threshold(cfg.reward)  # `calibrated` without its file stops here too
    if cfg.reward.mode != "helpful" and is_main_process():
        print(f"[rejection-sampling] {switch}")
    if cfg.sweep.enabled:
        return run_sweep(cfg, rows)
    # The sweep section is a separate tool: switching it does not make this another run.
    root = RunDir(cfg.output.dir, dataclasses.replace(cfg, sweep=RSSweepSection()), overwrite=cfg.output.overwrite)
    done = root.finished_summary("rejection-sampling")
    if done is not None:
        return done
    # output.overwrite with another config moves the whole old run aside, its iterations included
    root.prepare(source_hashes([*cfg.data.prompts, *cfg.data.eval, *cfg.eval.prompts]), is_main=is_main_process())
    reports = [run_iteration(cfg, root.path, n, rows, eval_dialogs, eval_prompts)
               for n in range(1, len(cfg.iterations) + 1)]
    summary = {"iterations": [str(iteration_dir(root.path, n) / "report.json") for n in range(1, len(reports) + 1)],
               "final": str(iteration_dir(root.path, len(reports)) / "final")}
    if is_main_process():
        root.mark_done(summary)
        print_summary(reports)
    return {**summary, "reports": reports}


# ----------------------------------------------------------------------------------------- the sweep
def run_sweep(cfg: RejectionSamplingConfig, rows: list[dict]) -> dict:
    """Figures 7-8: for the first `sweep.num_prompts` prompts, `sweep.max_samples` samples per temperature;
    the mean (over prompts) max and median reward among the first K, K = 1, 2, 4, ... Writes
    `<output.dir>/sweep/sweep.json` and `sweep.png`; the main process only."""
    if not is_main_process():
        return {}
    sweep = cfg.sweep
    checkpoint = sweep.checkpoint or cfg.policy.sample_from or cfg.model.path
    rows = rows[:sweep.num_prompts]
    ks = powers_of_two(sweep.max_samples)
    sampler, tokenizer = load_sampler(checkpoint, cfg)
    rms = load_reward_models(cfg)
    result = {"checkpoint": checkpoint, "prompts": len(rows), "ks": ks, "reward_mode": cfg.reward.mode,
              "temperatures": list(sweep.temperatures), "max": {}, "median": {}, "best_temperature": {}}
    for t_index, temperature in enumerate(sweep.temperatures):
        records = sample_chunk(cfg, sampler, tokenizer, rms, rows, iteration=0, num_samples=sweep.max_samples,
                               temperature=temperature, seed=chunk_seed(cfg.seed, 0, t_index))
        scores = torch.tensor([r["score"] for r in records]).view(len(rows), sweep.max_samples)
        curves = best_of_k_curves(scores, ks)
        result["max"][str(temperature)] = curves["max"]
        result["median"][str(temperature)] = curves["median"]
        print(f"[rejection-sampling sweep] T={temperature}: max@K " +
              " ".join(f"{k}:{v:.3f}" for k, v in zip(ks, curves["max"])))
    for j, k in enumerate(ks):
        result["best_temperature"][str(k)] = max(sweep.temperatures, key=lambda t: result["max"][str(t)][j])
    del sampler, rms
    _release_memory()
    out = Path(cfg.output.dir) / "sweep"
    write_json_atomic(out / "sweep.json", result)
    plot_sweep(result, out / "sweep.png")
    print(f"[rejection-sampling sweep] wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return result


def plot_sweep(result: dict, path: Path) -> None:
    """Max (left) and median (right) reward among K samples against K, one line per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, stat in zip(axes, ("max", "median")):
        for temperature in result["temperatures"]:
            ax.plot(result["ks"], result[stat][str(temperature)], marker="o", label=f"T={temperature}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of samples K")
        ax.set_title(f"{stat} reward among K samples")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"reward ({result['reward_mode']})")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
