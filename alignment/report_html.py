"""The pipeline report's presentation: one label per reported metric (what it measures and which way is better),
the plots (matplotlib PNGs, embedded) and the self-contained report.html. It reads a report dict
(`alignment.report.build_report`) and the run's metrics files, and computes no metric of its own."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from alignment.judging import KINDS
from alignment.runs import read_metrics
from alignment.stages import STAGES, TrainingLoss

TABLE_KEYS = ("gold_helpfulness", "violation_rate", "false_refusal_rate", "helpful_rm", "safety_rm")

# Every metric the report shows, by its report.json / metrics.jsonl key: what it measures, and which way is
# better (↑ higher, ↓ lower) where one way is. The HTML table, the plots and the text table read it.
LABELS = {
    "gold_helpfulness": "gold helpfulness ↑",
    "violation_rate": "violation rate ↓",
    "false_refusal_rate": "false refusal rate ↓",
    "helpful_rm": "helpful RM score ↑",
    "safety_rm": "safety RM score ↑",
    "combined_rm": "combined RM score ↑",
    "violation": "violation (gold) ↓",
    "refusal": "refusal",  # right on adversarial prompts, a false refusal on the others
    "reward_combined": "combined RM reward of the rollouts ↑",
    "kl": "KL to the reference policy (nats per answer)",
    "accuracy": "accuracy ↑",
    "adherence": "share obeying the system instruction ↑",
    TrainingLoss.LM: "LM loss (token-mean NLL) ↓",
    TrainingLoss.RANKING: "ranking loss ↓",
    TrainingLoss.DPO: "DPO loss ↓",
}
DIRECTIONS = "↑ higher is better, ↓ lower is better"
# the training losses drawn one plot per kind (PPO's losses are in its own reward-and-KL plot)
LOSS_PLOTS = {TrainingLoss.LM: "LM loss per stage (pretraining and fine-tunes)",
              TrainingLoss.RANKING: "Ranking loss per reward model",
              TrainingLoss.DPO: "DPO loss per stage"}


def label(key: str) -> str:
    """The label of a metric key; an `eval_` key of a training run is its metric on that run's held-out prompts."""
    if key.startswith("eval_"):
        return f"{LABELS[key[len('eval_'):]]} (in-training eval)"
    return LABELS[key]


def loss_curves(manifest: dict) -> dict[TrainingLoss, list[tuple[str, list[int], list[float]]]]:
    """(line label, optimizer steps, losses) of every finished stage's training run, grouped by what its loss
    measures (the stage registry's `loss`), in pipeline order; a rejection-sampling stage gives one line per
    iteration (each fine-tune is its own run under iterations/vN/)."""
    curves: dict[TrainingLoss, list] = {}
    for name in manifest["order"]:
        entry = manifest["stages"].get(name, {})
        record = STAGES.get(entry.get("stage"))
        if entry.get("status") != "done" or record is None or record.loss not in LOSS_PLOTS:
            continue
        root = Path(entry["dir"])
        runs = [(name, root)] + [(f"{name} {it.name}", it) for it in
                                 sorted((root / "iterations").glob("v*"), key=lambda p: int(p.name[1:]))]
        for line, run_dir in runs:
            metrics = [m for m in read_metrics(run_dir) if "loss" in m]
            if metrics:
                curves.setdefault(record.loss, []).append((line, [m["step"] for m in metrics],
                                                           [m["loss"] for m in metrics]))
    return curves


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def report_plots(report: dict, manifest: dict) -> list[tuple[str, str]]:
    """(heading, base64 PNG) of every plot the report has data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []

    def keep(fig, heading: str) -> None:
        plots.append((heading, _png(fig)))
        plt.close(fig)

    for kind, lines in loss_curves(manifest).items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for line, steps, losses in lines:
            ax.plot(steps, losses, label=line)
        ax.set(xlabel="optimizer step (of each run)", ylabel=LABELS[kind], title=LOSS_PLOTS[kind],
               yscale="log" if kind == TrainingLoss.LM else "linear")
        ax.legend(fontsize=8)
        keep(fig, LOSS_PLOTS[kind])

    ckpts = report["checkpoints"]
    if ckpts and "gold_helpfulness" in ckpts[0]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [c["name"] for c in ckpts]
        for key, style in (("gold_helpfulness", "o-"), ("violation_rate", "s-"), ("false_refusal_rate", "^-")):
            ax.plot(names, [c[key] for c in ckpts], style, label=LABELS[key])
        ax.set(ylim=(0, 1), ylabel="share of answers / mean score", title="Progress per checkpoint (paper Figure 11 in form)")
        ax.legend(fontsize=8)
        keep(fig, "Progress per checkpoint")

    buckets = ("significantly_better", "better", "slightly_better", "negligibly_better")
    bars = [(f"{rm_name} RM on {test_name}", [(test["by_rating"].get(b) or {}).get("accuracy") or 0.0 for b in buckets])
            for rm_name, tests in report.get("reward_models", {}).items() for test_name, test in tests.items()
            if isinstance(test, dict) and "by_rating" in test]
    if bars:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(bars)
        for k, (line, values) in enumerate(bars):
            ax.bar([i + k * width for i in range(len(buckets))], values, width, label=line)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(buckets))],
                      ["significantly better", "better", "slightly better", "negligibly better"])
        ax.set(ylim=(0, 1), ylabel=LABELS["accuracy"], xlabel="annotators' rating of the pair",
               title="Reward model accuracy by rating (paper Tables 7-8)")
        ax.legend(fontsize=7)
        keep(fig, "Reward model accuracy by rating")

    if "gatt" in report:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key, style in (("before", "o--"), ("after", "s-")):
            turns = sorted(report["gatt"][key], key=int)
            ax.plot([int(t) for t in turns], [report["gatt"][key][t] for t in turns], style, label=f"{key} GAtt")
        ax.set(xlabel="dialog turn", ylabel=LABELS["adherence"], ylim=(0, 1),
               title="GAtt: instruction kept over the dialog (paper Table 30)")
        ax.legend(fontsize=8)
        keep(fig, "GAtt: system instruction kept over 20 turns")

    for name in manifest["order"]:
        entry = manifest["stages"].get(name, {})
        if entry.get("stage") != "ppo" or entry.get("status") != "done":
            continue
        metrics = read_metrics(entry["dir"])
        keys = [k for k in ("reward_combined", "kl", "eval_gold_helpfulness", "eval_violation_rate")
                if any(k in m for m in metrics)]
        if keys:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for key in keys:
                rows = [m for m in metrics if key in m]
                ax.plot([m["step"] for m in rows], [m[key] for m in rows], "o-" if key.startswith("eval") else "-",
                        label=label(key))
            ax.set(xlabel="PPO iteration", title=f"{name}: reward, KL and in-training evaluation")
            ax.legend(fontsize=8)
            keep(fig, f"PPO ({name}): reward and KL")
    return plots


# ----------------------------------------------------------------------------------------- HTML
def _e(value) -> str:
    return html.escape(str(value))


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _checkpoint_table(report: dict) -> str:
    keys = [k for k in TABLE_KEYS if any(k in c for c in report["checkpoints"])]
    head = "".join(f"<th>{_e(LABELS[k])}</th>" for k in keys)
    rows = "".join(
        f"<tr><td>{_e(c['name'])}</td><td class=text>{_e(c['method'])}</td>"
        + "".join(f"<td>{_num(c.get(k))}</td>" for k in keys)
        + f"<td>{c['num_prompts']} ({' / '.join(str(c[f'num_{k}']) for k in KINDS)})</td></tr>"
        for c in report["checkpoints"])
    return (f'<table id="checkpoints"><tr><th>checkpoint</th><th>method</th>{head}'
            f"<th>prompts ({' / '.join(KINDS)})</th></tr>{rows}</table><p>{_e(DIRECTIONS)}.</p>")


def _reconciliation(rec: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(LABELS[m['metric']])}</td><td>{_num(m['in_training'])}</td><td>{m['in_training_n'] or '-'}</td>"
        f"<td>{_num(m['in_training_se'])}</td><td>{_num(m['table'])}</td><td>{m['table_n']}</td>"
        f"<td>{_num(m['table_se'])}</td><td>{_num(m['difference'])}</td><td>{_num(m['combined_se'])}</td></tr>"
        for m in rec["metrics"])
    return (f"<h3>{_e(rec['checkpoint'])} ({_e(rec['stage'])}): in-training evaluation and this table</h3>"
            f"<p>{_e(rec['why'])}</p><table><tr><th>metric</th><th>in training (iteration {rec['iteration']})</th>"
            "<th>n</th><th>SE</th><th>this table</th><th>n</th><th>SE</th><th>difference</th><th>SE of the difference</th>"
            f"</tr>{rows}</table>")


def _samples(report: dict) -> str:
    prompts = report["sample_answers"]["prompts"]
    answers = report["sample_answers"]["answers"]
    fields = ("gold_helpfulness", "violation", "refusal", "helpful_rm", "safety_rm")
    head = "<tr><th>checkpoint</th><th>answer</th>" + "".join(f"<th>{_e(LABELS[f])}</th>" for f in fields) + "</tr>"
    out = ""
    for kind in KINDS:
        shown = [(i, p) for i, p in enumerate(prompts) if p["kind"] == kind]
        if shown:
            out += f"<h3>{_e(kind)} prompts</h3>"
        for i, prompt in shown:
            rows = ""
            for name, records in answers.items():
                r = records[i]
                cells = {"gold_helpfulness": _num(r.get("gold_helpfulness")), "helpful_rm": _num(r.get("helpful_rm")),
                         "safety_rm": _num(r.get("safety_rm")), "refusal": "yes" if r["refusal"] else "no",
                         "violation": "-" if "gold_safe" not in r else "no" if r["gold_safe"] else "yes"}
                rows += (f"<tr><td>{_e(name)}</td><td class=text>{_e(r['answer'])}</td>"
                         + "".join(f"<td>{cells[f]}</td>" for f in fields) + "</tr>")
            out += f"<p><b>{_e(prompt['prompt'])}</b></p><table>{head}{rows}</table>"
    return out


def _stages(report: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(s['name'])}</td><td>{_e(s['stage'])}</td><td>{_e(s['status'])}</td><td>{_minutes(s['seconds'])}</td>"
        f"<td class=text>{_e(s['dir'])}</td><td class=text>{_e(s['model'] or '-')}</td>"
        f"<td>{_e(s['config_hash'] or '-')}</td><td>{_e(s['git_commit'] or '-')}</td></tr>"
        for s in report["stages"])
    return ('<table id="stages"><tr><th>stage</th><th>kind</th><th>status</th><th>wall time</th><th>run directory</th>'
            f"<th>model</th><th>config hash</th><th>git commit</th></tr>{rows}</table>")


def render_html(report: dict, plots: list[tuple[str, str]], lines: list[str]) -> str:
    """report.html: the checkpoint table, `lines` (one-sentence findings), the PPO reconciliation, the plots,
    sample answers with their scores, and the run's stages."""
    found = "".join(f"<p>The {_e(line)}.</p>" for line in lines)
    recs = report.get("ppo_reconciliation", [])
    reconciliation = "<h2>PPO: in-training evaluation beside this table</h2>" + "".join(map(_reconciliation, recs)) if recs else ""
    images = "".join(f'<h2>{_e(heading)}</h2><img alt="{_e(heading)}" src="data:image/png;base64,{data}"/>'
                     for heading, data in plots)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>alignment pipeline report</title>
<link rel="icon" href="data:,"><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td.text{{text-align:left;max-width:420px;word-break:break-word}}img{{max-width:100%}}</style></head><body>
<h1>Llama 2-Chat recipe: pipeline report</h1>
<p>Every checkpoint answers the same {report['num_prompts']} held-out prompts (greedy, at most
{report['max_new_tokens']} new tokens); gold scores come from the toy world's scorers, RM scores are mean sigmoid
scores of the pipeline's reward models. {_e(DIRECTIONS)}.</p>
<h2>Checkpoints</h2>{_checkpoint_table(report)}{found}{reconciliation}{images}
<h2>Sample answers</h2><p>The first prompts of each kind, each checkpoint's answer and its scores.</p>{_samples(report)}
<h2>Run</h2>{_stages(report)}</body></html>"""
