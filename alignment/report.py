"""The pipeline report: every policy checkpoint evaluated on the same held-out prompts, the reward models'
accuracy by rating, training curves; `report.json` and a self-contained `report.html` (plots embedded)."""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from pathlib import Path

import torch

from alignment.config import ModelSection, RMConfig, from_dict
from alignment.data.schemas import pair_context
from alignment.data.sources import load_sources
from alignment.judging import evaluate_checkpoint, on_policy_rm_check
from alignment.lineage import cached, checkpoint_identity, evaluation_fingerprint, policy_checkpoints, read_manifest
from alignment.models.loading import load_reward_model
from alignment.models.tokenizer import load_tokenizer
from alignment.runs import read_metrics, write_json_atomic
from alignment.scoring import reward_scores

TABLE_KEYS = ("gold_helpfulness", "violation_rate", "false_refusal_rate", "helpful_rm", "safety_rm")

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
    return {"test": test, "count": len(rows), "safety_rm": trained["accuracy"],
            "shorter_answer_wins": pair_accuracy(*shorter_answer_scores(rows)),
            "untrained_head": untrained["accuracy"], "untrained_head_model": rm_cfg.model.path,
            "paper_table7_anthropic_harmless": {k: v / 100 for k, v in PAPER_ANTHROPIC_HARMLESS.items()}}


def real_pairs_line(report: dict) -> str:
    """One sentence on reward_models.safety.real_pairs ("" when the report has none)."""
    r = report.get("reward_models", {}).get("safety", {}).get("real_pairs")
    if not r:
        return ""
    paper = ", ".join(f"{name} {acc:.3f}" for name, acc in r["paper_table7_anthropic_harmless"].items())
    return (f"safety RM on {r['count']} held-out real pairs ({r['test']}): accuracy {r['safety_rm']:.3f}; "
            f"the shorter answer wins {r['shorter_answer_wins']:.3f}; its starting model with an untrained "
            f"scalar head {r['untrained_head']:.3f}; paper Table 7 on Anthropic Harmless: {paper}")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict, manifest: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    stages = [(n, manifest["stages"][n]) for n in manifest["order"]
              if manifest["stages"].get(n, {}).get("status") == "done"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, entry in stages:
        metrics = [m for m in read_metrics(entry["dir"]) if "loss" in m]
        if metrics:
            ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Loss per stage", yscale="log")
    ax.legend(fontsize=8)
    plots["losses"] = _png(fig)
    plt.close(fig)

    ckpts = report["checkpoints"]
    if ckpts and "gold_helpfulness" in ckpts[0]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [c["name"] for c in ckpts]
        ax.plot(names, [c["gold_helpfulness"] for c in ckpts], "o-", label="gold helpfulness (higher is better)")
        ax.plot(names, [c["violation_rate"] for c in ckpts], "s-", label="violation rate (lower is better)")
        ax.plot(names, [c["false_refusal_rate"] for c in ckpts], "^-", label="false refusal rate")
        ax.set(ylim=(0, 1), title="Progress per checkpoint (paper Figure 11 in form)")
        ax.legend(fontsize=8)
        plots["progress"] = _png(fig)
        plt.close(fig)

    rms = report.get("reward_models", {})
    buckets = ("significantly_better", "better", "slightly_better", "negligibly_better")
    bars = [(f"{rm_name} RM on {test_name}", [(test["by_rating"].get(b) or {}).get("accuracy") or 0.0 for b in buckets])
            for rm_name, tests in rms.items() for test_name, test in tests.items()
            if isinstance(test, dict) and "by_rating" in test]
    if bars:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(bars)
        for k, (label, values) in enumerate(bars):
            ax.bar([i + k * width for i in range(len(buckets))], values, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(buckets))],
                      ["significantly", "better", "slightly", "negligibly"])
        ax.set(ylim=(0, 1), ylabel="accuracy", title="Reward model accuracy by rating (paper Tables 7-8)")
        ax.legend(fontsize=7)
        plots["rm_accuracy"] = _png(fig)
        plt.close(fig)

    if "gatt" in report:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key, style in (("before", "o--"), ("after", "s-")):
            turns = sorted(report["gatt"][key], key=int)
            ax.plot([int(t) for t in turns], [report["gatt"][key][t] for t in turns], style, label=f"{key} GAtt")
        ax.set(xlabel="dialog turn", ylabel="share obeying the system instruction", ylim=(0, 1),
               title="GAtt: instruction kept over the dialog (paper Table 30)")
        ax.legend(fontsize=8)
        plots["gatt_adherence"] = _png(fig)
        plt.close(fig)

    for name, entry in stages:
        if entry["stage"] == "ppo":
            metrics = read_metrics(entry["dir"])
            keys = [k for k in ("reward_combined", "kl", "eval_gold_helpfulness", "eval_violation_rate")
                    if any(k in m for m in metrics)]
            if keys:
                fig, ax = plt.subplots(figsize=(7, 3.5))
                for key in keys:
                    rows = [m for m in metrics if key in m]
                    ax.plot([m["step"] for m in rows], [m[key] for m in rows], "o-" if key.startswith("eval") else "-",
                            label=key)
                ax.set(xlabel="PPO iteration", title=f"{name}: reward and KL")
                ax.legend(fontsize=8)
                plots[f"{name}_dynamics"] = _png(fig)
                plt.close(fig)
    return plots


def _reward_model_summary(entry: dict) -> dict:
    path = Path(entry["dir"]) / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def build_report(root: str | Path, *, prompts: list[dict], helpful_rm_stage: str | None = None,
                 safety_rm_stage: str | None = None, max_new_tokens: int = 64, batch_size: int = 64,
                 rm_check=None, base: str | None = None, real_pairs_test: str | None = None) -> dict:
    """Evaluate every policy checkpoint of a pipeline run and write report.json and report.html.

    `rm_check` (pipeline.RMCheckSection) with a policy stage adds reward_models.helpful.on_policy: how the
    helpfulness RM ranks that model's own samples against gold (`evaluate.on_policy_rm_check`). `base`: a
    model directory evaluated first as "base" (the model a real-model pipeline starts from).
    `real_pairs_test` adds reward_models.safety.real_pairs (`real_pairs_summary`)."""
    root = Path(root)
    cache = root / "report_cache"
    manifest = read_manifest(root)
    stage_dir = {n: e["dir"] for n, e in manifest["stages"].items() if e.get("status") == "done"}
    helpful_rm = str(Path(stage_dir[helpful_rm_stage]) / "final") if helpful_rm_stage in stage_dir else None
    safety_rm = str(Path(stage_dir[safety_rm_stage]) / "final") if safety_rm_stage in stage_dir else None
    fingerprint = evaluation_fingerprint(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    judges = {k: checkpoint_identity(p) if p else None for k, p in (("helpful_rm", helpful_rm), ("safety_rm", safety_rm))}

    def evaluate(path: str) -> dict:
        result = evaluate_checkpoint(path, prompts, helpful_rm=helpful_rm, safety_rm=safety_rm,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size)
        return {**result, "answers": result["answers"][:8]}

    checkpoints, samples = [], {}
    for name, path in ([("base", base)] if base else []) + policy_checkpoints(manifest):
        key = {"policy": checkpoint_identity(path), **judges, **fingerprint}
        result = dict(cached(cache / f"{name}.json", key, lambda: evaluate(path)))
        samples[name] = result.pop("answers")
        checkpoints.append({"name": name, "path": path, **result})
        print(f"[report] evaluated {name}", flush=True)
    report = {
        "checkpoints": checkpoints,
        "reward_models": {k: _reward_model_summary(manifest["stages"][s])
                          for k, s in (("helpful", helpful_rm_stage), ("safety", safety_rm_stage)) if s in stage_dir},
        "stages": {n: {"stage": e["stage"], "seconds": e.get("seconds"), "dir": e["dir"]}
                   for n, e in manifest["stages"].items()},
        "num_prompts": len(prompts),
        "sample_answers": {"prompts": [p.get("prompt", "") for p in prompts[:8]], "answers": samples},
    }
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
    for name in manifest["order"]:
        entry = manifest["stages"].get(name, {})
        eval_path = Path(entry.get("dir", "")) / "eval.json"
        if entry.get("stage") == "gatt" and entry.get("status") == "done" and eval_path.is_file():
            gatt = json.loads(eval_path.read_text())
            report["gatt"] = {"before": gatt["before"], "after": gatt["after"]}
    write_json_atomic(root / "report.json", report)
    (root / "report.html").write_text(render_html(report, _plots(report, manifest)))
    return report


def table(report: dict) -> str:
    """The checkpoints as a fixed-width text table (printed at the end of `make demo`)."""
    keys = [k for k in TABLE_KEYS if any(k in c for c in report["checkpoints"])]
    lines = ["checkpoint".ljust(12) + "".join(k.rjust(20) for k in keys)]
    for c in report["checkpoints"]:
        lines.append(c["name"].ljust(12) + "".join((f"{c[k]:.3f}" if k in c else "-").rjust(20) for k in keys))
    return "\n".join(lines)


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


def render_html(report: dict, plots: dict[str, str]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in c for c in report["checkpoints"])]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = "".join(
        "<tr><td>" + html.escape(c["name"]) + "</td>" + "".join(
            f"<td>{c[k]:.3f}</td>" if k in c else "<td>-</td>" for k in keys) + "</tr>"
        for c in report["checkpoints"])
    images = "".join(f'<h2>{html.escape(name)}</h2><img src="data:image/png;base64,{data}"/>'
                     for name, data in plots.items())
    line = on_policy_line(report)
    check = f"<p>The {html.escape(line)}: what rejection sampling and PPO can gain from this RM.</p>" if line else ""
    real = real_pairs_line(report)
    check += f"<p>The {html.escape(real)}.</p>" if real else ""
    samples = ""
    for name, answers in report["sample_answers"]["answers"].items():
        items = "".join(f"<li><b>{html.escape(p)}</b><br>{html.escape(a)}</li>"
                        for p, a in zip(report["sample_answers"]["prompts"], answers))
        samples += f"<h3>{html.escape(name)}</h3><ul>{items}</ul>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>alignment pipeline report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>Llama 2-Chat recipe: pipeline report</h1>
<p>Every checkpoint answers the same {report['num_prompts']} held-out prompts (greedy); gold scores come from
the toy world's scorers, RM scores are mean sigmoid scores of the pipeline's reward models.</p>
<table><tr><th>checkpoint</th>{head}</tr>{rows}</table>{check}{images}<h2>Sample answers</h2>{samples}</body></html>"""
