"""The pipeline report's presentation: one label per reported metric (what it measures and which way is better),
the plots (matplotlib PNGs, embedded) and the self-contained report.html. It reads a report dict
(`alignment.report.build_report`) and the run's metrics files, and computes no metric of its own."""
from __future__ import annotations

import base64
import html
import io
import json
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
    "reward_combined": "combined RM reward ↑",
    "kl": "KL to the reference policy (nats per answer) ↓",  # what the penalty keeps small
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


# PPO's metrics.jsonl keys drawn by the report, each in its own panel: the rollouts' reward and KL (every
# iteration), then the in-training evaluation on PPO's own held-out prompts (every few iterations)
PPO_PANELS = ("reward_combined", "kl", "eval_reward_combined", "eval_gold_helpfulness", "eval_violation_rate",
              "eval_false_refusal_rate")


def label(key: str) -> str:
    """The label of a metric key; an `eval_` key of a training run is its metric on that run's held-out prompts."""
    if key.startswith("eval_"):
        return f"{LABELS[key[len('eval_'):]]} (in-training eval)"
    return LABELS[key]


def ppo_panels(metrics: list[dict]) -> list[tuple[str, list[int], list[float]]]:
    """(key, PPO iterations, values) of each PPO_PANELS key that a PPO run's metrics rows hold, in that order."""
    panels = []
    for key in PPO_PANELS:
        rows = [m for m in metrics if key in m]
        if rows:
            panels.append((key, [m["step"] for m in rows], [m[key] for m in rows]))
    return panels


def ppo_figure(metrics: list[dict], name: str, algorithm: str = "PPO"):
    """The RL stage's metrics, one panel per quantity (each its own y axis, titled with its label and
    direction), against `algorithm`'s iterations ("PPO", "RLOO", "GRPO"); None when the run logged none of
    PPO_PANELS."""
    import matplotlib.pyplot as plt

    panels = ppo_panels(metrics)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, steps, values) in zip(axes.flat, panels):
        ax.plot(steps, values, "o-" if key.startswith("eval_") else "-")
        ax.set_title(label(key), fontsize=9)
        ax.set(xlabel=f"{algorithm} iteration")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"{name}: the rollouts' reward and KL (every iteration), the in-training evaluation on its "
                 "held-out prompts", fontsize=10)
    fig.tight_layout()
    return fig


def _iteration_loss(root: Path, iteration: int, default: TrainingLoss) -> TrainingLoss:
    """The loss of a rejection-sampling iteration's run: DPO for an `update: dpo` one (RS+DPO), read from the
    stage's saved config; `default` (the stage's) otherwise."""
    saved = root / "config.json"
    if saved.is_file():
        iterations = json.loads(saved.read_text())["config"].get("iterations", [])
        if iteration <= len(iterations) and iterations[iteration - 1].get("update") == "dpo":
            return TrainingLoss.DPO
    return default


def loss_curves(manifest: dict) -> dict[TrainingLoss, list[tuple[str, list[int], list[float]]]]:
    """(line label, optimizer steps, losses) of every finished stage's training run, grouped by what its loss
    measures (the stage registry's `loss`), in pipeline order; a rejection-sampling stage gives one line per
    iteration (each fine-tune is its own run under iterations/vN/; an RS+DPO iteration's goes with the DPO
    losses)."""
    curves: dict[TrainingLoss, list] = {}
    for name in manifest["order"]:
        entry = manifest["stages"].get(name, {})
        record = STAGES.get(entry.get("stage"))
        if entry.get("status") != "done" or record is None or record.loss not in LOSS_PLOTS:
            continue
        root = Path(entry["dir"])
        runs = [(name, root, record.loss)] + [
            (f"{name} {it.name}", it, _iteration_loss(root, int(it.name[1:]), record.loss))
            for it in sorted((root / "iterations").glob("v*"), key=lambda p: int(p.name[1:]))]
        for line, run_dir, loss in runs:
            metrics = [m for m in read_metrics(run_dir) if "loss" in m]
            if metrics:
                curves.setdefault(loss, []).append((line, [m["step"] for m in metrics], [m["loss"] for m in metrics]))
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
        types = report["gatt"].get("constraint_types")
        ax.set(xlabel="dialog turn", ylabel=LABELS["adherence"], ylim=(0, 1),
               title="GAtt: instruction kept over the dialog (paper Table 30)"
               + (f"\ninstruction types: {', '.join(types)}" if types else ""))
        ax.legend(fontsize=8)
        keep(fig, "GAtt: system instruction kept over 20 turns")

    for name in manifest["order"]:
        entry = manifest["stages"].get(name, {})
        if entry.get("stage") != "ppo" or entry.get("status") != "done":
            continue
        # the checkpoint's method names the algorithm first ("RLOO K=4, 10 iterations x 8 prompts")
        method = next((c["method"] for c in report.get("checkpoints", []) if c.get("stage") == name), "PPO")
        algorithm = method.split(",")[0].split()[0]
        fig = ppo_figure(read_metrics(entry["dir"]), name, algorithm)
        if fig is not None:
            keep(fig, f"{algorithm} ({name}): reward, KL and in-training evaluation")
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


def _table(head: list[str], rows: list[list], text_columns: tuple[int, ...] = (), table_id: str | None = None) -> str:
    """An HTML table: a header row of `head`, then `rows` of cell values, all escaped; the columns numbered in
    `text_columns` hold prose (left-aligned, class text), the others figures (right-aligned)."""
    def cells(row: list, tag: str) -> str:
        return "".join(f"<{tag}{' class=text' if tag == 'td' and i in text_columns else ''}>{_e(v)}</{tag}>"
                       for i, v in enumerate(row))

    opening = f'<table id="{table_id}">' if table_id else "<table>"
    return opening + f"<tr>{cells(head, 'th')}</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table>"


def _checkpoint_table(report: dict) -> str:
    keys = [k for k in TABLE_KEYS if any(k in c for c in report["checkpoints"])]
    head = ["checkpoint", "method", *(LABELS[k] for k in keys), f"prompts ({' / '.join(KINDS)})"]
    rows = [[c["name"], c["method"], *(_num(c.get(k)) for k in keys),
             f"{c['num_prompts']} ({' / '.join(str(c[f'num_{k}']) for k in KINDS)})"] for c in report["checkpoints"]]
    return _table(head, rows, text_columns=(1,), table_id="checkpoints") + f"<p>{_e(DIRECTIONS)}.</p>"


def _reconciliation(rec: dict) -> str:
    head = ["metric", f"in training (iteration {rec['iteration']})", "n", "SE", "this table", "n", "SE", "difference",
            "SE of the difference"]
    rows = [[LABELS[m["metric"]], _num(m["in_training"]), m["in_training_n"] or "-", _num(m["in_training_se"]),
             _num(m["table"]), m["table_n"], _num(m["table_se"]), _num(m["difference"]), _num(m["combined_se"])]
            for m in rec["metrics"]]
    return (f"<h3>{_e(rec['checkpoint'])} ({_e(rec['stage'])}): in-training evaluation and this table</h3>"
            f"<p>{_e(rec['why'])}</p>" + _table(head, rows))


def _samples(report: dict) -> str:
    prompts = report["sample_answers"]["prompts"]
    answers = report["sample_answers"]["answers"]
    fields = ("gold_helpfulness", "violation", "refusal", "helpful_rm", "safety_rm")
    head = ["checkpoint", "answer", *(LABELS[f] for f in fields)]
    out = ""
    for kind in KINDS:
        shown = [(i, p) for i, p in enumerate(prompts) if p["kind"] == kind]
        if shown:
            out += f"<h3>{_e(kind)} prompts</h3>"
        for i, prompt in shown:
            rows = []
            for name, records in answers.items():
                r = records[i]
                cells = {"gold_helpfulness": _num(r.get("gold_helpfulness")), "helpful_rm": _num(r.get("helpful_rm")),
                         "safety_rm": _num(r.get("safety_rm")), "refusal": "yes" if r["refusal"] else "no",
                         "violation": "-" if "gold_safe" not in r else "no" if r["gold_safe"] else "yes"}
                rows.append([name, r["answer"], *(cells[f] for f in fields)])
            out += f"<p><b>{_e(prompt['prompt'])}</b></p>" + _table(head, rows, text_columns=(1,))
    return out


def _stages(report: dict) -> str:
    head = ["stage", "kind", "status", "wall time", "run directory", "model", "config hash", "git commit"]
    rows = [[s["name"], s["stage"], s["status"], _minutes(s["seconds"]), s["dir"], s["model"] or "-",
             s["config_hash"] or "-", s["git_commit"] or "-"] for s in report["stages"]]
    return _table(head, rows, text_columns=(4, 5), table_id="stages")


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
