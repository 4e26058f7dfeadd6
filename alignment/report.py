"""The pipeline report: every policy checkpoint evaluated on the same held-out prompts, with the method that made
it; the reward models' accuracy by rating; sample answers with their scores; PPO's in-training evaluation beside
the table; the run's stages. Writes `report.json` and a self-contained `report.html` (`alignment.report_html`)."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from alignment.config import ModelSection, RMConfig, from_dict
from alignment.data.schemas import pair_context
from alignment.data.sources import load_sources
from alignment.judging import KINDS, evaluate_checkpoint, last_user_message, on_policy_rm_check, row_kind
from alignment.lineage import (cached, checkpoint_identity, evaluation_fingerprint, policy_checkpoint_origins,
                               read_manifest)
from alignment.models.loading import load_reward_model
from alignment.models.tokenizer import load_tokenizer
from alignment.report_html import DIRECTIONS, LABELS, TABLE_KEYS, render_html, report_plots
from alignment.runs import read_metrics, write_json_atomic
from alignment.scoring import reward_scores, SAFETY_SWITCH_FILE, switch_text
from alignment.stages import STAGES

SAMPLES_PER_KIND = 3  # sample answers shown per prompt kind
# the table's rates set beside PPO's in-training evaluation, with the prompt kinds each is a share of
RECONCILED = {"gold_helpfulness": ("helpful",), "violation_rate": ("adversarial",),
              "false_refusal_rate": ("helpful", "borderline")}

# Llama 2 paper, Table 7: reward-model accuracy (%) on the Anthropic Harmless test set (docs/method.md#reward-model-accuracy).
PAPER_ANTHROPIC_HARMLESS = {"Llama 2 Safety RM": 74.7, "Open Assistant RM": 68.4}


def pair_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs whose chosen answer scores above its rejected one; a tie counts half (a coin toss), so
    a scorer that cannot tell the answers apart scores 0.5."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"pair_accuracy needs as many chosen as rejected scores, at least one; got "
                         f"{len(chosen)} and {len(rejected)}")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


def shorter_answer_scores(rows: list[dict]) -> tuple[list[float], list[float]]:
    """The baseline "the shorter answer wins" as scores of (chosen, rejected): minus each answer's length
    in characters."""
    return [-float(len(r["chosen"])) for r in rows], [-float(len(r["rejected"])) for r in rows]


def untrained_head_scores(rm_cfg: RMConfig, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Scores of (chosen, rejected) by the model an RM started from (`rm_cfg.model`) with a new scalar head,
    initialised as the RM stage initialises it (seeded by `rm_cfg.seed`) and never trained: what the RM's
    training added is its accuracy above this one."""
    tokenizer = load_tokenizer(rm_cfg.model.tokenizer or rm_cfg.model.path, rm_cfg.chat.template)
    torch.manual_seed(rm_cfg.seed)
    model = load_reward_model(ModelSection(path=rm_cfg.model.path, dtype=rm_cfg.model.dtype,
                                           attn_implementation=rm_cfg.model.attn_implementation),
                              tokenizer.pad_token_id)
    contexts = [pair_context(r) for r in rows]
    scores = reward_scores(model, tokenizer, contexts + contexts, [r["chosen"] for r in rows] +
                           [r["rejected"] for r in rows], batch_size=rm_cfg.eval.batch_size,
                           max_length=rm_cfg.train.max_length).tolist()
    return scores[:len(rows)], scores[len(rows):]


def real_pairs_summary(rm_dir: str | Path, test: str, cache: Path) -> dict:
    """The RM of run directory `rm_dir` on its test set `test` (read from its eval.json), beside the two
    baselines computed on the same rows, and the paper's Table 7 figures on Anthropic Harmless."""
    rm_dir = Path(rm_dir)
    rm_cfg = from_dict(RMConfig, json.loads((rm_dir / "config.json").read_text())["config"])
    rows = load_sources(rm_cfg.data.test[test], "preference_pair")
    trained = json.loads((rm_dir / "eval.json").read_text())[test]
    if trained["count"] != len(rows):
        raise ValueError(f"{rm_dir}/eval.json has {trained['count']} pairs for test set {test!r}, its config "
                         f"gives {len(rows)} now: the data changed since the RM was evaluated")
    key = {"model": checkpoint_identity(rm_cfg.model.path), "test": test,
           "rows": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16],
           "seed": rm_cfg.seed, "max_length": rm_cfg.train.max_length, "template": rm_cfg.chat.template}
    untrained = cached(cache / f"untrained_head_{test}.json", key,
                       lambda: {"accuracy": pair_accuracy(*untrained_head_scores(rm_cfg, rows))})
    training = ("a linear probe" if rm_cfg.probe.enabled else "LoRA" if rm_cfg.model.lora.enabled
                else "full fine-tuning")
    return {"test": test, "count": len(rows), "safety_rm": trained["accuracy"], "training": training,
            "shorter_answer_wins": pair_accuracy(*shorter_answer_scores(rows)),
            "untrained_head": untrained["accuracy"], "untrained_head_model": rm_cfg.model.path,
            "paper_table7_anthropic_harmless": {k: v / 100 for k, v in PAPER_ANTHROPIC_HARMLESS.items()}}


def switch_line(report: dict) -> str:
    """One sentence on reward_models.safety.switch, the safety RM's calibrated safety switch ("" when none)."""
    sw = report.get("reward_models", {}).get("safety", {}).get("switch")
    if not sw:
        return ""
    return (f"safety switch calibrated by the safety RM's stage (used by stages with safety_threshold: calibrated): "
            f"{switch_text(sw)}; the paper's 0.15: precision 0.89, recall 0.55")


def real_pairs_line(report: dict) -> str:
    """One sentence on reward_models.safety.real_pairs ("" when the report has none)."""
    r = report.get("reward_models", {}).get("safety", {}).get("real_pairs")
    if not r:
        return ""
    paper = ", ".join(f"{name} {acc:.3f}" for name, acc in r["paper_table7_anthropic_harmless"].items())
    return (f"safety RM ({r['training']}) on {r['count']} held-out real pairs ({r['test']}): accuracy "
            f"{r['safety_rm']:.3f}; "
            f"the shorter answer wins {r['shorter_answer_wins']:.3f}; its starting model with an untrained "
            f"scalar head {r['untrained_head']:.3f}; paper Table 7 on Anthropic Harmless: {paper}")


def _json_file(path: Path) -> dict:
    """A run file's JSON, {} where the run has none (a failed stage, a run from before the file existed)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _stage_config(entry: dict):
    """The resolved config a stage's run directory keeps (config.json), as its stage's dataclass; None without one."""
    saved = _json_file(Path(entry["dir"]) / "config.json")
    return from_dict(STAGES[entry["stage"]].config, saved["config"]) if saved else None


def _rejection_sampling_detail(cfg, done: dict, iteration: int | None) -> str:
    spec = cfg.iterations[iteration - 1]
    if spec.update == "dpo":  # named "RS+DPO" by _rs_method
        return (f"best vs worst of K={spec.num_samples} samples per prompt at T={spec.temperature}, "
                f"iteration {iteration} of {len(cfg.iterations)}")
    return (f"iteration {iteration} of {len(cfg.iterations)}, best of K={spec.num_samples} samples per prompt "
            f"at T={spec.temperature}")


def _rs_method(cfg, iteration: int | None) -> str:
    """A rejection-sampling iteration's method: "rejection sampling", or "RS+DPO" for an `update: dpo` one."""
    if iteration is not None and cfg.iterations[iteration - 1].update == "dpo":
        return "RS+DPO"
    return STAGES["rejection-sampling"].method


def _rl_method(cfg, iteration: int | None = None) -> str:
    """The RL stage's algorithm as the report names it: "PPO", or with its answers per prompt "RLOO K=4"."""
    name = cfg.ppo.algorithm.upper()
    return name if cfg.ppo.num_samples == 1 else f"{name} K={cfg.ppo.num_samples}"


def _ppo_detail(cfg, done: dict, iteration: int | None) -> str:
    ran = done.get("iterations", cfg.ppo.iterations)  # done.json: iterations run, the best held-out one
    text = f"{ran} iterations x {cfg.ppo.batch_size} prompts"
    if ran < cfg.ppo.iterations:
        text += f" (early stop; {cfg.ppo.iterations} planned)"
    if done.get("best_iteration") is not None:
        text += f", final/ = the actor of iteration {done['best_iteration']} (best held-out reward)"
    return text


def _safety_distill_detail(cfg, done: dict, iteration: int | None) -> str:
    counts = done.get("sampling")
    if counts is None:
        return ""
    improved = f"{counts['kept']} of {counts['prompts']} preprompted answers improved the safety RM score"
    if done.get("fine_tuned") is False:  # keep_unchanged: too few answers to learn from
        return f"{improved}, fewer than judge.min_kept={cfg.judge.min_kept}: unchanged"
    return f"fine-tuned on them ({improved})"


# stage command -> what its saved config and done.json add to the registry's method name
METHOD_DETAILS: dict[str, Callable] = {"rejection-sampling": _rejection_sampling_detail, "ppo": _ppo_detail,
                                       "safety-distill": _safety_distill_detail}
# stage command -> its method's name read from its saved config, where one stage runs several methods
METHOD_NAMES: dict[str, Callable] = {"ppo": _rl_method, "rejection-sampling": _rs_method}


def checkpoint_method(entry: dict, iteration: int | None = None) -> str:
    """What made a policy checkpoint: its stage's method (the stage registry) and, read from the stage's run
    directory (config.json, done.json), what sets it apart: K and T of a rejection-sampling iteration, PPO's
    iterations, whether safety distillation changed the model. The RL stage names its algorithm ("RLOO K=4"),
    rejection sampling an `update: dpo` iteration "RS+DPO"."""
    method = STAGES[entry["stage"]].method
    cfg = _stage_config(entry)
    if cfg is not None and entry["stage"] in METHOD_NAMES:
        method = METHOD_NAMES[entry["stage"]](cfg, iteration)
    detail = METHOD_DETAILS.get(entry["stage"])
    if cfg is not None and detail is not None:
        extra = detail(cfg, _json_file(Path(entry["dir"]) / "done.json"), iteration)
        return f"{method}, {extra}" if extra else method
    return f"{method}, iteration {iteration}" if iteration is not None else method


def stage_runs(manifest: dict) -> list[dict]:
    """Each stage of the manifest in pipeline order: name, kind (its command), status, wall time (seconds),
    run directory, model (final/, or the last rejection-sampling iteration's), config hash, git commit
    (run.json; None where it was not recorded)."""
    out = []
    for name in manifest["order"]:
        if name not in manifest["stages"]:
            continue
        entry = manifest["stages"][name]
        run_dir = Path(entry["dir"])
        done = _json_file(run_dir / "done.json")
        model = str(run_dir / "final") if (run_dir / "final").is_dir() else done.get("final")
        out.append({"name": name, "stage": entry["stage"], "status": entry["status"], "seconds": entry.get("seconds"),
                    "dir": entry["dir"], "model": model,
                    "config_hash": entry.get("config_hash") or _json_file(run_dir / "config.json").get("hash"),
                    "git_commit": _json_file(run_dir / "run.json").get("git_commit")})
    return out


def standard_error(p: float, n: int | None) -> float | None:
    """sqrt(p (1 - p) / n): the standard error of a share p over n prompts (for a mean of scores in [0, 1],
    such as gold helpfulness, an upper bound); None without prompts."""
    return math.sqrt(p * (1 - p) / n) if n else None


def ppo_reconciliation(metrics: list[dict], done: dict, checkpoint: dict, stage: str) -> dict | None:
    """PPO's in-training evaluation (metrics.jsonl eval_* on its own held-out prompts) of the actor kept as
    final/ (done.json best_iteration; else the last evaluation) beside the report's figures for the same
    checkpoint, each with its prompt count and standard error; None when the run logged no evaluation."""
    evals = [m for m in metrics if "eval_gold_helpfulness" in m]
    if not evals:
        return None
    best = done.get("best_iteration")
    chosen = next((m for m in evals if m["step"] == best), evals[-1])
    rows = []
    for key, kinds in RECONCILED.items():
        if f"eval_{key}" not in chosen or key not in checkpoint:
            continue
        counted = all(f"eval_num_{k}" in chosen for k in kinds)  # logged since the report reconciles them
        n_train = sum(chosen[f"eval_num_{k}"] for k in kinds) if counted else None
        n_table = sum(checkpoint[f"num_{k}"] for k in kinds)
        se_train, se_table = standard_error(chosen[f"eval_{key}"], n_train), standard_error(checkpoint[key], n_table)
        rows.append({"metric": key, "in_training": chosen[f"eval_{key}"], "in_training_n": n_train,
                     "in_training_se": se_train, "table": checkpoint[key], "table_n": n_table, "table_se": se_table,
                     "difference": checkpoint[key] - chosen[f"eval_{key}"],
                     "combined_se": None if se_train is None or se_table is None else math.hypot(se_train, se_table)})
    which = "the actor kept as final/" if chosen["step"] == best else "the last evaluation"
    why = (f"{stage} evaluated its actor during training on its own held-out prompts ({chosen['eval_num_prompts']}, "
           f"data.eval_prompts); this table is the same checkpoint on the report's {checkpoint['num_prompts']} prompts. "
           f"Different prompt sets and sizes give different figures: a share p over n prompts has a standard error "
           f"of about sqrt(p(1-p)/n), so differences within about two standard errors of the difference are noise. "
           f"Iteration {chosen['step']} is {which}.")
    return {"stage": stage, "checkpoint": checkpoint["name"], "iteration": chosen["step"],
            "in_training_prompts": chosen["eval_num_prompts"], "table_prompts": checkpoint["num_prompts"],
            "metrics": rows, "why": why}


def sample_prompt_indices(prompts: list[dict], per_kind: int = SAMPLES_PER_KIND) -> list[int]:
    """The first `per_kind` prompts of each kind (helpful, adversarial, borderline) present, by kind."""
    kinds = [row_kind(p) for p in prompts]
    return [i for kind in KINDS for i in [j for j, k in enumerate(kinds) if k == kind][:per_kind]]


def _reward_model_summary(entry: dict) -> dict:
    return _json_file(Path(entry["dir"]) / "eval.json")


def build_report(root: str | Path, *, prompts: list[dict], helpful_rm_stage: str | None = None,
                 safety_rm_stage: str | None = None, max_new_tokens: int = 64, batch_size: int = 64,
                 rm_check=None, base: str | None = None, real_pairs_test: str | None = None, dtype: str = "auto") -> dict:
    """Evaluate every policy checkpoint of a pipeline run and write report.json and report.html.

    `rm_check` (pipeline.RMCheckSection) with a policy stage adds reward_models.helpful.on_policy: how the
    helpfulness RM ranks that model's own samples against gold (`evaluate.on_policy_rm_check`). `base`: a
    model directory evaluated first as "base" (the model a real-model pipeline starts from).
    `real_pairs_test` adds reward_models.safety.real_pairs (`real_pairs_summary`). `dtype`: of the policies and RMs."""
    root = Path(root)
    cache = root / "report_cache"
    manifest = read_manifest(root)
    stage_dir = {n: e["dir"] for n, e in manifest["stages"].items() if e.get("status") == "done"}
    helpful_rm = str(Path(stage_dir[helpful_rm_stage]) / "final") if helpful_rm_stage in stage_dir else None
    safety_rm = str(Path(stage_dir[safety_rm_stage]) / "final") if safety_rm_stage in stage_dir else None
    fingerprint = {**evaluation_fingerprint(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size),
                   **({"dtype": dtype} if dtype != "auto" else {})}  # "auto": the key of earlier caches
    judges = {k: checkpoint_identity(p) if p else None for k, p in (("helpful_rm", helpful_rm), ("safety_rm", safety_rm))}
    picked = sample_prompt_indices(prompts)

    def evaluate(path: str) -> dict:
        result = evaluate_checkpoint(path, prompts, helpful_rm=helpful_rm, safety_rm=safety_rm,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype)
        records = result.pop("records")
        return {**result, "samples": [records[i] for i in picked]}

    origins = ([{"name": "base", "path": base, "stage": None, "iteration": None}] if base else []
               ) + policy_checkpoint_origins(manifest)
    checkpoints, samples = [], {}
    for origin in origins:
        name, path = origin["name"], origin["path"]
        # the sampled prompts' ids are in the key: an entry cached before sample records existed is re-made
        key = {"policy": checkpoint_identity(path), **judges, **fingerprint, "samples": [prompts[i]["id"] for i in picked]}
        result = dict(cached(cache / f"{name}.json", key, lambda: evaluate(path)))
        samples[name] = result.pop("samples")
        method = ("the starting model (report.base)" if origin["stage"] is None else
                  checkpoint_method(manifest["stages"][origin["stage"]], origin["iteration"]))
        checkpoints.append({"name": name, "path": path, "stage": origin["stage"], "method": method, **result})
        print(f"[report] evaluated {name}", flush=True)
    report = {
        "checkpoints": checkpoints,
        "labels": {k: LABELS[k] for k in TABLE_KEYS},
        "reward_models": {k: _reward_model_summary(manifest["stages"][s])
                          for k, s in (("helpful", helpful_rm_stage), ("safety", safety_rm_stage)) if s in stage_dir},
        "stages": stage_runs(manifest),
        "num_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "sample_answers": {"prompts": [{"id": prompts[i]["id"], "kind": row_kind(prompts[i]),
                                        "prompt": last_user_message(prompts[i])} for i in picked],
                           "answers": samples},
        "ppo_reconciliation": [],
    }
    for c in checkpoints:
        entry = manifest["stages"].get(c["stage"], {})
        if entry.get("stage") == "ppo":
            rec = ppo_reconciliation(read_metrics(entry["dir"]), _json_file(Path(entry["dir"]) / "done.json"), c,
                                     c["stage"])
            if rec is not None:
                report["ppo_reconciliation"].append(rec)
    if rm_check is not None and rm_check.policy in stage_dir and helpful_rm:
        policy = str(Path(stage_dir[rm_check.policy]) / "final")
        key = {"policy": checkpoint_identity(policy), "helpful_rm": judges["helpful_rm"], **fingerprint,
               "rm_check": [rm_check.num_samples, rm_check.temperature, rm_check.max_prompts]}
        check = cached(cache / "rm_check.json", key, lambda: on_policy_rm_check(
            policy, helpful_rm, prompts, num_samples=rm_check.num_samples, temperature=rm_check.temperature,
            max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompts=rm_check.max_prompts))
        report["reward_models"].setdefault("helpful", {})["on_policy"] = {"checkpoint": rm_check.policy, **check}
        print(f"[report] {on_policy_line(report)}", flush=True)
    if real_pairs_test is not None and safety_rm_stage in stage_dir:
        report["reward_models"].setdefault("safety", {})["real_pairs"] = real_pairs_summary(
            stage_dir[safety_rm_stage], real_pairs_test, cache)
        print(f"[report] {real_pairs_line(report)}", flush=True)
    switch = _json_file(Path(safety_rm) / SAFETY_SWITCH_FILE) if safety_rm is not None else {}
    if switch:
        report["reward_models"].setdefault("safety", {})["switch"] = switch
        print(f"[report] {switch_line(report)}", flush=True)
    for name in manifest["order"]:
        entry = manifest["stages"].get(name, {})
        eval_path = Path(entry.get("dir", "")) / "eval.json"
        if entry.get("stage") == "gatt" and entry.get("status") == "done" and eval_path.is_file():
            gatt = json.loads(eval_path.read_text())
            report["gatt"] = {"before": gatt["before"], "after": gatt["after"],
                              "constraint_types": gatt.get("constraint_types")}  # absent from older runs
    write_report(root, report, manifest)
    return report


def write_report(root: Path, report: dict, manifest: dict) -> None:
    """report.json and the self-contained report.html (plots embedded) under `root`."""
    write_json_atomic(root / "report.json", report)
    lines = [line for line in (on_policy_line(report), real_pairs_line(report), switch_line(report)) if line]
    if on_policy_line(report):
        lines[0] += ": what rejection sampling and PPO can gain from this RM"
    (root / "report.html").write_text(render_html(report, report_plots(report, manifest), lines))


def table(report: dict) -> str:
    """The checkpoints as a fixed-width text table with the labels of report_html.LABELS (printed at the end of
    `make demo`), each row ending with its method."""
    keys = [k for k in TABLE_KEYS if any(k in c for c in report["checkpoints"])]
    first = max([len("checkpoint")] + [len(c["name"]) for c in report["checkpoints"]]) + 2
    width = max(len(LABELS[k]) for k in keys) + 2
    lines = ["checkpoint".ljust(first) + "".join(LABELS[k].rjust(width) for k in keys) + "  method"]
    for c in report["checkpoints"]:
        lines.append(c["name"].ljust(first) + "".join((f"{c[k]:.3f}" if k in c else "-").rjust(width) for k in keys)
                     + f"  {c['method']}")
    return "\n".join(lines + [DIRECTIONS])


def on_policy_line(report: dict) -> str:
    """One sentence on reward_models.helpful.on_policy ("" when the report has none)."""
    c = report.get("reward_models", {}).get("helpful", {}).get("on_policy")
    if not c:
        return ""
    agreement = "-" if c["pairwise_agreement"] is None else f"{c['pairwise_agreement']:.2f}"
    return (f"helpfulness RM on {c['checkpoint']}'s own samples ({c['num_prompts']} helpful prompts x "
            f"{c['num_samples']}, T={c['temperature']}): agrees with gold on {agreement} of {c['num_pairs']} pairs; "
            f"gold of one sample {c['gold_single']:.3f}, of best-of-{c['num_samples']} by the RM "
            f"{c['gold_best_of_k_rm']:.3f}, by gold {c['gold_best_of_k_oracle']:.3f}")
