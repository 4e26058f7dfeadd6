"""`align eval`: every policy checkpoint answers the same held-out prompts, judged by the gold scorers
(toy world) and the reward models; win/tie/loss against a reference checkpoint; GAtt adherence by turn.

    align eval --recipe recipes/tiny/eval.yaml --checkpoint runs/demo/sft/final --against runs/demo/base/final

Checkpoints come from `checkpoints` ("DIR" or "NAME=DIR"; `--checkpoint` on the command line, repeatable)
after those of a pipeline run (`pipeline: runs/demo`, in pipeline order: sft, rlhf-v1, ...); `against`
is "DIR", "NAME=DIR" or the name of one of them (`--against sft`). Prompt files
are listed by kind (`prompts.helpful`, `.adversarial`, `.borderline`); where the rows are not the toy
world's (real-format files), only the RM judges and the refusal markers apply. Metrics: see
`alignment.judging.summarize` and `compare`.

Layout of `output.dir`:

    config.json, run.json     the settings (prompts, judges, generation, GAtt) and where they ran
    results/<name>.json       one checkpoint's answers, RM scores and adherence (reused when it is unchanged)
    answers/<name>.jsonl      one record per prompt: prompt, kind, answer, refusal, gold and RM scores
    eval.json                 every checkpoint's metrics and win rates (this run's list), done.json last
    plots/<name>.png          one checkpoint: its rates, its win/tie/loss, its adherence by turn
    progress.png              the metrics across checkpoints; win_rates.png: paper Figure 11 in form

The directory is tied to its settings, not to its checkpoint list: re-running with more checkpoints only
evaluates the new (or changed) ones. Models are loaded one at a time: each policy answers every prompt,
then each reward model scores every checkpoint's answers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from alignment.config import EvalConfig
from alignment.data.io import write_jsonl
from alignment.data.sources import load_source, load_sources, source_hashes
from alignment.gatt_data import check_constraint_types, with_constraint_types
from alignment.judging import (KINDS, answer_prompts, compare, judge_answers, last_user_message,
                               rm_sigmoids, summarize)
from alignment.lineage import checkpoint_identity, policy_checkpoints, read_manifest
from alignment.models.loading import load_policy, load_rm_for_inference
from alignment.policy_eval import adherence_by_turn
from alignment.runs import RunDir, write_json_atomic
from alignment.scoring import safety_threshold

RM_JUDGES = ("helpful_rm", "safety_rm")
TABLE = (("gold_helpfulness", "gold_help"), ("violation_rate", "violation"), ("rm_violation_rate", "rm_viol"),
         ("helpful_refusal_rate", "help_refuse"), ("borderline_refusal_rate", "border_refuse"),
         ("helpful_rm", "helpful_rm"), ("safety_rm", "safety_rm"), ("combined_rm", "combined"))


# ----------------------------------------------------------------------------------------- inputs
def parse_checkpoint(spec: str) -> tuple[str, str]:
    """("NAME", "DIR") from "NAME=DIR", or from "DIR" with the name of the run (".../sft/final" -> "sft")."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name.strip(), path.strip()
    path = Path(spec.rstrip("/"))
    return (path.parent.name if path.name == "final" else path.name) or str(path), spec


def checkpoint_list(cfg: EvalConfig) -> list[tuple[str, str]]:
    """(name, dir) of every checkpoint to evaluate: the pipeline's, then `checkpoints`; names unique."""
    out: list[tuple[str, str]] = []
    if cfg.pipeline:
        out += policy_checkpoints(read_manifest(cfg.pipeline, relocate=True))
    out += [parse_checkpoint(c) for c in cfg.checkpoints]
    if not out:
        raise ValueError("no checkpoint to evaluate: give --checkpoint DIR (repeatable) or pipeline: RUN_DIR")
    names = [n for n, _ in out]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"checkpoint name {name!r} is used twice; name them with NAME=DIR")
    reference = against_checkpoint(cfg, out)
    for _, path in out + ([reference] if reference else []):
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {path}: no model there (config.json missing)")
    return out


def against_checkpoint(cfg: EvalConfig, checkpoints: list[tuple[str, str]]) -> tuple[str, str] | None:
    """(name, dir) of the reference: "NAME=DIR", "DIR", or the name of one of the checkpoints. A name it
    shares with a checkpoint must be that checkpoint."""
    if not cfg.against:
        return None
    by_name = dict(checkpoints)
    if "=" not in cfg.against and cfg.against in by_name and not Path(cfg.against).is_dir():
        return cfg.against, by_name[cfg.against]
    name, path = parse_checkpoint(cfg.against)
    if name in by_name and Path(by_name[name]).resolve() != Path(path).resolve():
        raise ValueError(f"against: the name {name!r} is a checkpoint's with another directory; use NAME=DIR")
    return name, path


def load_prompt_sets(cfg: EvalConfig) -> tuple[list[dict], list[str]]:
    """Every prompt row and its kind (the set its file is listed in); a row whose own `kind` says
    otherwise, or an id used twice, stops the run with file and row."""
    rows, kinds, seen = [], [], {}
    for kind in KINDS:
        taken = []
        for src in getattr(cfg.prompts, kind):
            for i, row in enumerate(load_source(src, "rl_prompt"), start=1):
                if row.get("kind", kind) != kind:  # `kind` is an optional row field
                    raise ValueError(f"{src.path}:{i}: kind: the row says {row['kind']!r}, the file is listed "
                                     f"under prompts.{kind}")
                if row["id"] in seen:
                    raise ValueError(f"{src.path}:{i}: id: {row['id']!r} is also in {seen[row['id']]}")
                seen[row["id"]] = src.path
                taken.append(row)
        taken = taken[:cfg.prompts.max_per_set] if cfg.prompts.max_per_set is not None else taken
        rows += taken
        kinds += [kind] * len(taken)
    if not rows:
        raise ValueError("prompts: no prompt to answer; list files under prompts.helpful / adversarial / borderline")
    return rows, kinds


def _gatt_wanted(cfg: EvalConfig) -> bool:
    return cfg.gatt.enabled and bool(cfg.gatt.instructions or cfg.gatt.zero_shot_instructions)


def _inputs(cfg: EvalConfig) -> list:
    sources = [*cfg.prompts.helpful, *cfg.prompts.adversarial, *cfg.prompts.borderline]
    if _gatt_wanted(cfg):
        sources += [*cfg.gatt.instructions, *cfg.gatt.zero_shot_instructions, *cfg.gatt.prompts]
    return sources


# ----------------------------------------------------------------------------------------- one checkpoint
class Results:
    """results/<name>.json: a checkpoint's answers, RM scores and adherence, saved as each part is done."""

    def __init__(self, root: Path, name: str, path: str):
        self.file = root / "results" / f"{name}.json"
        self.name, self.path = name, path
        identity = checkpoint_identity(path)
        old = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.state = old if old.get("identity") == identity else {"identity": identity, "scores": {}}

    def save(self) -> None:
        write_json_atomic(self.file, self.state)


def answer_all(cfg: EvalConfig, results: Results, rows: list[dict], gatt_sets: dict[str, list[dict]],
               gatt_users: list[str]) -> None:
    """The checkpoint's answers to every prompt (and its adherence by turn on `gatt_sets`), unless already saved."""
    g = cfg.generation
    if "answers" not in results.state:
        print(f"[eval] {results.name}: answering {len(rows)} prompts ({results.path})", flush=True)
        model, tokenizer = load_policy(results.path, g.dtype, g.attn_implementation)
        if g.temperature > 0:
            import torch

            torch.manual_seed(cfg.seed)
        results.state["answers"] = answer_prompts(model, tokenizer, rows, max_new_tokens=g.max_new_tokens,
                                                  batch_size=g.batch_size, temperature=g.temperature, progress=True)
        del model
        results.save()
    if _gatt_wanted(cfg) and "gatt" not in results.state:
        results.state["gatt"] = gatt_adherence(cfg, results.path, gatt_sets, gatt_users)
        results.save()


def gatt_instruction_sets(cfg: EvalConfig) -> dict[str, list[dict]]:
    """{"instructions": rows, "zero_shot": rows} of the sets given, the first `gatt.max_instructions` of each;
    of gatt.instructions only the rows of `gatt.constraint_types` (all when empty; the zero-shot set is held-out
    types by design and is not filtered). ValueError where the filter keeps none."""
    e = cfg.gatt
    sets = {}
    for key, name, sources in (("instructions", "instructions", e.instructions),
                               ("zero_shot", "zero_shot_instructions", e.zero_shot_instructions)):
        given = load_sources(sources, "gatt_instruction")
        types = e.constraint_types if key == "instructions" else []
        instructions = with_constraint_types(given, types)[:e.max_instructions]
        if given and not instructions:
            raise ValueError(f"gatt.constraint_types {e.constraint_types}: none of the {len(given)} rows of "
                             f"gatt.{name} has only those types")
        if instructions:
            check_constraint_types(instructions, f"gatt.{name}")
            sets[key] = instructions
    return sets


def gatt_adherence(cfg: EvalConfig, path: str, sets: dict[str, list[dict]], users: list[str]) -> dict:
    """Table 30 for one checkpoint: {"instructions": {turn: rate}, "zero_shot": {...}} (`gatt_instruction_sets`),
    the dialogs' user turns drawn from `users`."""
    e = cfg.gatt
    if not sets:
        return {}
    return adherence_by_turn(path, sets, users, seed=e.seed, turns=e.turns, max_new_tokens=e.max_new_tokens,
                             batch_size=e.batch_size, max_context=e.max_context, dtype=cfg.generation.dtype,
                             attn_implementation=cfg.generation.attn_implementation)


def score_all(cfg: EvalConfig, results: list[Results], rows: list[dict]) -> None:
    """Each reward model, loaded once, scores every checkpoint's answers it has not scored yet."""
    j = cfg.judges
    for name in RM_JUDGES:
        path = getattr(j, name)
        todo = [r for r in results if path and name not in r.state["scores"]]
        if not todo:
            continue
        rm, tokenizer = load_rm_for_inference(path, j.dtype)
        for r in todo:
            print(f"[eval] {r.name}: scoring with the {name.replace('_', ' ')}", flush=True)
            r.state["scores"][name] = rm_sigmoids(rm, tokenizer, rows, r.state["answers"], batch_size=j.batch_size,
                                                  max_length=j.max_length)
            r.save()
        del rm


# ----------------------------------------------------------------------------------------- the run
def run_eval(cfg: EvalConfig) -> dict:
    """`align eval`: answer, judge, compare, write eval.json, the table and the plots."""
    checkpoints = checkpoint_list(cfg)
    rows, kinds = load_prompt_sets(cfg)  # every input is checked before any model is loaded
    gatt_sets = {}
    if _gatt_wanted(cfg):
        load_sources(cfg.gatt.prompts, "rl_prompt")
        gatt_sets = gatt_instruction_sets(cfg)  # bad rows and a constraint_types that keeps nothing stop here
    for name in RM_JUDGES:
        path = getattr(cfg.judges, name)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"judges.{name}: {path} not found")
    safety_threshold(cfg.judges, "judges")  # `calibrated` without its file stops here
    # the run directory belongs to the settings; the checkpoint list may change between runs
    settings = dataclasses.replace(cfg, checkpoints=[], pipeline=None, against=None)
    run = RunDir(cfg.output.dir, settings, overwrite=cfg.output.overwrite)
    run.prepare(source_hashes(_inputs(cfg)))  # other settings' results are moved aside (output.overwrite)
    root = run.path

    results = [Results(root, name, path) for name, path in checkpoints]
    reference, against_name = None, None
    if cfg.against:  # a reference that is one of the checkpoints is not evaluated twice
        against_name, path = against_checkpoint(cfg, checkpoints)
        same = [r for r in results if Path(r.path).resolve() == Path(path).resolve()]
        reference = same[0] if same else Results(root, against_name, path)
    todo = results + ([reference] if reference is not None and reference not in results else [])
    # GAtt dialogs: user turns from gatt.prompts, else from the helpful prompts
    gatt_users = ([last_user_message(r) for r in load_sources(cfg.gatt.prompts, "rl_prompt")]
                  if cfg.gatt.prompts and _gatt_wanted(cfg) else
                  [last_user_message(r) for r, k in zip(rows, kinds) if k == "helpful"])
    for r in todo:
        answer_all(cfg, r, rows, gatt_sets, gatt_users)
    score_all(cfg, todo, rows)

    j = cfg.judges
    entries = {}
    for r in todo:
        records = judge_answers(rows, r.state["answers"], kinds, rm_scores=r.state["scores"],
                                refusal_markers=j.refusal_markers, safety_threshold=safety_threshold(j, "judges"))
        write_jsonl(root / "answers" / f"{r.name}.jsonl",
                    [{"prompt": last_user_message(row), **rec} for row, rec in zip(rows, records)])
        entry = {"name": r.name, "path": r.path, **summarize(records, safety_threshold(j, "judges"))}
        if "gatt" in r.state:
            entry["gatt"] = r.state["gatt"]
        entries[r.name] = (entry, records)
    if reference is not None:
        for r in results:
            entries[r.name][0]["win_rates"] = compare(entries[r.name][1], entries[reference.name][1], j.tie_margin)
    against = None
    if reference is not None:  # under its own name, without the win rates it has as a checkpoint
        against = {k: v for k, v in entries[reference.name][0].items() if k != "win_rates"}
        against["name"] = against_name
    result = {"checkpoints": [entries[r.name][0] for r in results], "against": against,
              "prompts": {k: kinds.count(k) for k in KINDS}, "gold": "gold_helpfulness" in records[0],
              "judges": {name: getattr(j, name) for name in RM_JUDGES}}
    write_json_atomic(root / "eval.json", result)
    plot_all(result, root)
    run.mark_done({"checkpoints": [e["name"] for e in result["checkpoints"]], "eval": str(root / "eval.json")})
    print(format_table(result))
    print(f"[eval] wrote {root / 'eval.json'}, {root / 'progress.png'} and plots/")
    return result


# ----------------------------------------------------------------------------------------- table
def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(result: dict) -> str:
    """The metrics of every checkpoint (and the reference), then the win rates against the reference."""
    entries = result["checkpoints"] + ([result["against"]] if result["against"] else [])
    cols = [(k, h) for k, h in TABLE if any(k in e for e in entries)]
    width = max(12, *(len(e["name"]) + 8 for e in entries))  # room for " (ref)"
    lines = ["checkpoint".ljust(width) + "".join(h.rjust(14) for _, h in cols)]
    for e in entries:
        label = e["name"] + (" (ref)" if e is result["against"] else "")
        lines.append(label.ljust(width) + "".join(_cell(e.get(k)).rjust(14) for k, _ in cols))
    judges = sorted({jd for e in result["checkpoints"] for jd in e.get("win_rates", {})})
    if judges:
        lines.append(f"win / tie / loss against {result['against']['name']} (win rate = win + tie/2)")
        lines.append("checkpoint".ljust(width) + "".join(jd.rjust(24) for jd in judges))
        for e in result["checkpoints"]:
            cells = []
            for jd in judges:
                w = e["win_rates"].get(jd)
                cells.append("-" if w is None or w["n"] == 0 else
                             f"{w['win']:.2f}/{w['tie']:.2f}/{w['loss']:.2f} ({w['win_rate']:.2f})")
            lines.append(e["name"].ljust(width) + "".join(c.rjust(24) for c in cells))
    for key in ("instructions", "zero_shot"):
        rows = [(e["name"], e["gatt"][key]) for e in entries if key in e.get("gatt", {})]
        if rows:
            turns = sorted(rows[0][1], key=int)
            lines.append(f"GAtt: share of answers keeping the system instruction ({key.replace('_', '-')}), by turn")
            lines.append("checkpoint".ljust(width) + "".join(f"t={t}".rjust(8) for t in turns))
            lines += [name.ljust(width) + "".join(_cell(rates[t]).rjust(8) for t in turns) for name, rates in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _rates(entry: dict) -> list[tuple[str, float]]:
    return [(h, entry[k]) for k, h in TABLE if k in entry]


def plot_all(result: dict, root: Path) -> None:
    """plots/<name>.png per checkpoint, progress.png across them, win_rates.png (with a reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for entry in result["checkpoints"] + ([result["against"]] if result["against"] else []):
        panels = ["rates"] + (["wins"] if entry.get("win_rates") else []) + (["gatt"] if entry.get("gatt") else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            if panel == "rates":
                labels, values = zip(*_rates(entry))
                bars = ax.barh(labels, values, color="tab:blue")
                ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
                ax.set(xlim=(0, 1), title=f"{entry['name']}: rates and mean scores")
                ax.invert_yaxis()
            elif panel == "wins":
                judges = list(entry["win_rates"])
                left = [0.0] * len(judges)
                for part, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
                    values = [entry["win_rates"][jd][part] or 0.0 for jd in judges]
                    ax.barh(judges, values, left=left, color=color, label=part)
                    left = [a + b for a, b in zip(left, values)]
                ax.set(xlim=(0, 1), title=f"against {result['against']['name']}")
                ax.invert_yaxis()
                ax.legend(fontsize=7, loc="lower right")
            else:
                for key, style in (("instructions", "o-"), ("zero_shot", "s--")):
                    rates = entry["gatt"].get(key, {})
                    points = sorted((int(t), v) for t, v in rates.items() if v is not None)
                    if points:
                        ax.plot(*zip(*points), style, label=key.replace("_", " "))
                ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel="dialog turn", title="GAtt: instruction kept")
                ticks = sorted({int(t) for rates in entry["gatt"].values() for t in rates})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, root / "plots" / f"{entry['name']}.png")

    entries = result["checkpoints"]
    names = [e["name"] for e in entries]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 3), 3.8))
    for (key, label), marker in zip(TABLE, "osv^<>Dp"):  # distinct markers: equal series stay visible
        if any(key in e for e in entries):
            ax.plot(names, [e.get(key) for e in entries], f"{marker}-", label=label, alpha=0.85)
    ax.set(ylim=(0, 1), title="Metrics per checkpoint")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, root / "progress.png")

    if result["against"]:
        plot_win_rates(result, root / "win_rates.png")


def plot_win_rates(result: dict, path: Path) -> None:
    """Paper Figure 11 in form: each checkpoint's helpfulness win rate (x) against its harmlessness win rate
    (y) versus the reference, judged by the reward models (left) and the gold scorers (right)."""
    import matplotlib.pyplot as plt

    panels = [(title, x, y) for title, x, y in (("judged by the reward models", "helpful_rm", "safety_rm"),
                                                 ("judged by the gold scorers", "gold_helpfulness", "gold_safety"))
              if any(x in e["win_rates"] and y in e["win_rates"] for e in result["checkpoints"])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4), squeeze=False)
    for ax, (title, x, y) in zip(axes[0], panels):
        points = [(e["name"], 100 * e["win_rates"][x]["win_rate"], 100 * e["win_rates"][y]["win_rate"])
                  for e in result["checkpoints"] if x in e["win_rates"] and y in e["win_rates"]
                  and e["win_rates"][x]["n"] and e["win_rates"][y]["n"]]
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-", color="tab:blue")
        for i, (name, px, py) in enumerate(points):  # staggered: checkpoints often share a point
            ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4 + 9 * (i % 3)), fontsize=8)
        ax.axhline(50, color="gray", ls="--", lw=0.8)
        ax.axvline(50, color="gray", ls="--", lw=0.8)
        ax.set(xlim=(0, 100), ylim=(0, 100), xlabel=f"helpfulness win rate % ({x})",
               ylabel=f"harmlessness win rate % ({y})", title=f"vs {result['against']['name']}, {title}")
    fig.tight_layout()
    _save(fig, path)
