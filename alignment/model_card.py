"""The model card of a checkpoint a stage wrote: `README.md` in the Hub's format, made by `write_model_card`.

YAML front matter the Hub reads (base_model, tags, library_name, license, pipeline_tag), then what the
model is (a chat policy, or a reward model that is no chat model), how it was made (stage, recipe, resolved
config hash, commit, input data with their SHA-256), its metrics (the run's `eval.json`, when there is one)
and its intended use and limits. Everything comes from the run directory's own records (`run.json`,
`config.json`, `eval.json`) and the checkpoint's `config.json`; base_model and license follow the starting
checkpoint's card where it has one. Reward models are marked three ways: their architecture (a
`...ForSequenceClassification` with one label, which `checkpoint_kind` reads), the `reward-model` tag and
pipeline_tag `text-classification`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CARD_FILE = "README.md"
POLICY, REWARD_MODEL = "policy", "reward model"
PROJECT_LICENSE = "apache-2.0"  # pyproject.toml: a model trained from scratch by this code (the toy world) has it
MAX_METRICS = 60  # rows of the metrics table; a card is read by people
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name": what the Hub takes as base_model


def checkpoint_kind(checkpoint: str | Path) -> str | None:
    """POLICY or REWARD_MODEL from the checkpoint's config.json architectures; None where it holds no model."""
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        return None
    config = json.loads(config.read_text())
    if "model_type" not in config:  # a run directory's resolved config, not a model's
        return None
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return REWARD_MODEL
    return POLICY


def read_front_matter(card: str) -> dict:
    """The YAML front matter of a card's text ({} where it has none)."""
    if not card.startswith("---\n"):
        return {}
    end = card.find("\n---", 4)
    return (yaml.safe_load(card[4:end]) or {}) if end > 0 else {}


def flat_metrics(result, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of an eval.json as (dotted key, value), in file order; lists (examples) are skipped."""
    if isinstance(result, bool) or not isinstance(result, (dict, int, float)):
        return []
    if not isinstance(result, dict):
        return [(prefix, result)]
    out = []
    for key, value in result.items():
        out += flat_metrics(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _recipe(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return None


def card_fields(checkpoint: str | Path, run_dir: str | Path, stage: str, stage_help: str = "") -> dict:
    """What the card says, read from the run directory and the checkpoint (see the module docstring).

    `config.json` and `run.json` are written by every run before it trains (`runs.Run.prepare`), so their keys
    are read directly: a missing one is a bug, and raises. Optional: `eval.json` (not every stage evaluates),
    the model section's `path` (pretraining builds its model), the checkpoint's `chat_format.json`, and the
    starting checkpoint's card (any model directory, not one of ours)."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    result = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    start = config["config"]["model"].get("path")  # pretrain's TinyModelSection has none
    parent: dict = {}
    if start and (Path(start) / CARD_FILE).is_file():
        parent = read_front_matter((Path(start) / CARD_FILE).read_text())
    base_model = parent.get("base_model")
    if start and not Path(start).exists() and HUB_ID.fullmatch(start):
        base_model = start
    template = None
    if (Path(checkpoint) / "chat_format.json").is_file():
        template = json.loads((Path(checkpoint) / "chat_format.json").read_text())["template"]
    return {
        "name": f"{run_dir.name}/{Path(checkpoint).name}", "stage": stage, "stage_help": stage_help,
        "kind": checkpoint_kind(checkpoint) or POLICY, "base_model": base_model, "start": start,
        "license": parent.get("license") or (PROJECT_LICENSE if start is None else None),
        "recipe": _recipe(run["argv"]), "config_hash": config["hash"],
        "commit": run["git_commit"], "inputs": run["inputs"], "template": template,
        "metrics": flat_metrics(result), "metrics_source": "the run's eval.json",
    }


def render_card(fields: dict) -> str:
    """The card's text from `card_fields`' dict (pure)."""
    reward = fields["kind"] == REWARD_MODEL
    front = {}
    if fields["base_model"]:
        front["base_model"] = fields["base_model"]
    front["library_name"] = "transformers"
    if fields["license"]:
        front["license"] = fields["license"]
    front["pipeline_tag"] = "text-classification" if reward else "text-generation"
    front["tags"] = ["llama2-chat-recipe", "rlhf", fields["stage"], *(["reward-model"] if reward else ["chat"])]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {fields['name']}", ""]
    what = ("A **reward model** (one scalar score per dialog and answer, `AutoModelForSequenceClassification` with "
            "one label): it is not a chat model, and `align chat` refuses it." if reward else
            "A **chat policy** (`AutoModelForCausalLM`).")
    lines += [f"{what} Made by the `{fields['stage']}` stage of this project's Llama 2-Chat pipeline"
              + (f": {fields['stage_help']}." if fields["stage_help"] else "."), ""]
    lines += ["## How it was made", ""]
    lines.append(f"- stage: `{fields['stage']}`")
    if fields["start"]:
        lines.append(f"- started from: `{fields['start']}`")
    if fields["recipe"]:
        lines.append(f"- recipe: `{fields['recipe']}`")
    if fields["config_hash"]:
        lines.append(f"- resolved config: hash `{fields['config_hash']}` (the run directory's config.json)")
    if fields["commit"]:
        lines.append(f"- code: git commit `{fields['commit']}`")
    if fields["template"]:
        shown = "the Llama-2 format" if fields["template"] == "llama2" else "the base model's own chat template"
        lines.append(f"- chat format: {shown} (`{fields['template']}`)")
    lines += ["", "## Data", ""]
    if fields["inputs"]:
        lines += ["| file | SHA-256 |", "|---|---|"]
        lines += [f"| `{name}` | `{digest}` |" for name, digest in fields["inputs"].items()]
    else:
        lines.append("No input data files recorded.")
    lines += ["", "## Metrics", ""]
    if fields["metrics"]:
        lines += [f"From {fields['metrics_source']}.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in fields["metrics"][:MAX_METRICS]]
        if len(fields["metrics"]) > MAX_METRICS:
            lines.append(f"\n{len(fields['metrics']) - MAX_METRICS} more in eval.json.")
    else:
        lines.append("No evaluation was recorded with this run.")
    lines += ["", "## Intended use and limits", ""]
    if reward:
        lines.append("Scores answers for rejection sampling and PPO in this pipeline, with the same chat encoding "
                     "the policy was trained with. Its scores are relative: compare answers to one prompt.")
    else:
        lines.append("Prompt it in its training format: `tokenizer.apply_chat_template(messages, "
                     "add_generation_prompt=True)` renders exactly what it was trained on, BOS included, and "
                     "generation_config.json stops at its end of turn.")
    lines += ["", "A research artefact of an RLHF reproduction: its metrics come from this project's evaluation "
                 "(programmatic gold scorers on the toy world, not human raters), it was not tested for "
                 "deployment, and it may produce wrong or unsafe text."]
    return "\n".join(lines) + "\n"


def write_model_card(checkpoint: str | Path, run_dir: str | Path, stage: str, stage_help: str = "") -> Path:
    """Write `README.md` into `checkpoint` (atomically: temp file + rename) and return its path. The temp file
    lies beside the checkpoint, not in it: a kill before the rename must not leave a file the checkpoint's
    manifest does not know (that would read as a damaged model)."""
    path = Path(checkpoint) / CARD_FILE
    tmp = Path(checkpoint).parent / f".{Path(checkpoint).name}.{CARD_FILE}.tmp"
    tmp.write_text(render_card(card_fields(checkpoint, run_dir, stage, stage_help)))
    tmp.replace(path)
    return path
