"""Markdown tables of `results.json`, written between markers into the READMEs."""
from __future__ import annotations

import re
from pathlib import Path

TARGETS = {"sft": 1.5, "rm": 1.5, "dpo": 1.5, "rl": 1.0, "rloo": 2.0, "grpo": 2.0, "sft-smollm2": 1.5, "rm-smollm2": 1.5}
# why an RL row compares no losses, in the table's words
NO_LOSS_CHECK = {"rl": "PPO vs RLOO", "rloo": "own samples", "grpo": "own samples"}
# what the split line calls each RL row's iteration
RL_NAMES = {"rl": "RL", "rloo": "RLOO", "grpo": "GRPO"}
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def results_table(results: dict) -> str:
    lines = ["| stage | unit | ours | TRL | ours / TRL | target | peak MiB ours | peak MiB TRL | same losses |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for stage, target in TARGETS.items():
        if stage not in results:
            continue
        e = results[stage]
        met = "met" if e["ratio"] >= target and e["ours_peak_mem_mb"] <= e["trl_peak_mem_mb"] else "not met"
        check = e["loss_check"]
        losses = (f"n/a ({NO_LOSS_CHECK[stage]})" if check["agree"] is None else
                  f"yes (max rel. diff {check['max_rel_diff']:.1e})" if check["agree"] else "NO")
        lines.append(f"| {stage} ({e['peer']}) | {e['unit']} | {_num(e['ours'])} | {_num(e['trl'])} | "
                     f"**{e['ratio']:.2f}** | {target} ({met}) | {e['ours_peak_mem_mb']:.0f} | "
                     f"{e['trl_peak_mem_mb']:.0f} | {losses} |")
    return "\n".join(lines)


def split_line(results: dict) -> str:
    lines = []
    for stage, name in RL_NAMES.items():
        if stage not in results:
            continue
        split = results[stage]["ours_split_seconds"]
        total = sum(split.values()) or 1.0
        parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in split.items())
        lines.append(f"Where our {name} iteration's time goes: {parts}.")
    return "\n".join(lines)


def padding_line(results: dict) -> str:
    parts = []
    for stage in ("sft", "rm", "dpo", "sft-smollm2", "rm-smollm2"):
        padded = results.get(stage, {}).get("padded_tokens", {})
        if {"ours", "trl"} <= set(padded):
            parts.append(f"{stage} ours {padded['ours']} vs TRL {padded['trl']}")
    return ("Tokens in the forward passes, padding included (same real tokens on both sides): " + "; ".join(parts)
            + ".") if parts else ""


def scaling_table(results: dict) -> str:
    rows = results.get("scaling") or []
    if not rows:
        return ""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    params = {r["size"]: r["params_m"] for r in rows}
    cell = {(r["size"], r["config"]): r for r in rows}
    lines = ["| model | parameters | " + " | ".join(f"{c} (s/step)" for c in configs) + " |",
             "|---|---:|" + "---:|" * len(configs)]
    for size in sizes:
        cells = []
        for c in configs:
            r = cell.get((size, c))
            cells.append("-" if r is None or r.get("step_seconds") is None else f"{r['step_seconds']:.2f}")
        lines.append(f"| {size} | {params[size]:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _commits(results: dict) -> str:
    """"commit X", or which rows each commit measured where the rows come from runs at several commits."""
    by_commit: dict[str, list[str]] = {}
    for stage in TARGETS:
        if stage in results:
            commit = results[stage].get("git_commit") or results["versions"]["git_commit"]
            by_commit.setdefault(commit, []).append(stage)
    if len(by_commit) <= 1:
        return f"commit {results['versions']['git_commit']}"
    return "rows measured at commit " + ", ".join(f"{c} ({', '.join(stages)})" for c, stages in by_commit.items())


def markdown(results: dict) -> str:
    m, v = results["machine"], results["versions"]
    threads = m["threads_per_process"]
    head = (f"CPU: {m['cpu']}, {m['cores']} cores, {threads} thread{'s' if threads != 1 else ''} per process "
            f"(load average {m['load_avg_1min_at_start']:.1f} at start); torch {v['torch']}, transformers "
            f"{v['transformers']}, trl {v['trl']}; model `{results['spec']['size']}`; {_commits(results)}; "
            f"{results['seconds']:.0f}s in all{' (the latest run)' if 'rows measured' in _commits(results) else ''}.")
    if any(stage.endswith("-smollm2") for stage in results if stage in TARGETS):
        small = results["spec"]["sft_smollm2"]
        head += (" The `-smollm2` rows train SmolLM2-135M (its config and tokenizer, ChatML, randomly initialised "
                 f"weights) for {small['steps']} steps of {small['batch']} dialogs / pairs of at most "
                 f"{small['max_length']} tokens.")
    parts = [head, "", results_table(results)]
    for line in (padding_line(results), split_line(results)):
        if line:
            parts += ["", line]
    if scaling_table(results):
        parts += ["", "Scaling: seconds per step of our SFT on the same 16 dialogs per step, one thread per process "
                  "(DeepSpeed ZeRO on gloo, CPU):", "", scaling_table(results)]
    return "\n".join(parts)


def update_readmes(results: dict, paths: list[Path]) -> None:
    """Replace the text between the markers in each README that has them."""
    block = f"{START}\n{markdown(results)}\n{END}"
    for path in paths:
        text = path.read_text()
        if START in text and END in text:
            path.write_text(re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S))
