"""`align gatt`: Ghost Attention data and fine-tuning (docs/method.md#ghost-attention; paper 3.3).

1. Dialogs: `sampling.num_dialogs` dialogs of `min_turns..max_turns` user turns drawn from `data.prompts`,
   each carrying one instruction of `data.instructions` (toy world: random combinations of checkable
   constraints, shortened half the time).
2. Sampling: the instruction is concatenated to every user message (in the system-prompt form the model
   knows, `alignment.gatt_data.attach_instruction`) and `model.path` (the latest RLHF model) answers turn
   by turn, each answer conditioned on the answers sampled before it. A dialog is
   kept only if every answer obeys the instruction (`toyworld.check_instruction`). With
   `samples_per_turn` k > 1 each turn draws k samples and takes the first that obeys (best of k by the
   checker): a tiny model obeys too rarely for whole dialogs to pass with one sample per turn. This is a
   rejection step the paper does not describe, but the kept data are still the model's own samples.
   `sampling.answers: rewrite` goes further and departs from the paper: an answer that breaks the
   instruction is rewritten by the toy world's `apply_instruction` so that it obeys (a fallback for
   models that almost never obey; the data are then partly written by a program, not sampled).
3. Training: the instruction is kept only in the first turn, as the system prompt; each kept dialog is one
   example with loss on every answer (`sampling.every_turn_examples`, the default; under a causal model the
   same losses as one example per turn cut after that turn's answer with `train_on="last"`, which is what
   `every_turn_examples: false` trains). Fine-tuning is `alignment.finetune.fine_tune`, on these
   dialogs and the `data.replay` dialogs (the data the model was last fine-tuned on, so that its answers
   without a system prompt do not drift).
4. Evaluation (Table 30): share of answers that still obey the instruction at turns 1, 2, 4, 6, 10, 20,
   before and after GAtt, on held-out dialogs with training-type instructions and on zero-shot
   instructions (held-out constraints); the instruction is given once as the system prompt and the
   model's own greedy answers are fed back as history.

Layout of `output.dir` (besides the RunDir files and the checkpoints of the fine-tune):

    samples.jsonl        every sampled dialog: instruction, status (complete/failed/cut), turns with obeys
    dialogs.jsonl        the training examples (sft_dialog rows, system prompt = instruction)
    sampling.json        counts: dialogs kept/failed/cut, answers rewritten, sampled obey rate per turn
    eval.json            {"before": {"1": rate, ...}, "after": {...}, "zero_shot": {"before", "after"}, ...}
    eval_dialogs.jsonl   the evaluation dialogs (model answers, obeys per turn)
    adherence.png        the Table 30 curves

Resume: finished sampling (sampling.json with this config's hash) is reused; the fine-tune resumes from
its checkpoints; a finished run (done.json) is not touched.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from alignment.chat import encode, template_of
from alignment.config import DataSource, GAttConfig, SFTConfig, SFTData
from alignment.data.io import file_sha256, load_records, write_jsonl
from alignment.data.sources import load_sources, source_hashes
from alignment.data.toyworld import apply_instruction, check_instruction, undo_instruction
from alignment.distributed import (agreed_max, ensure_process_group, is_main_process, main_process_does, wait_for,
                                   world_size)
from alignment.faults import fault_point
from alignment.finetune import fine_tune, sft_config_for
from alignment.gatt_data import (CHOOSERS, TABLE_30_TURNS, AnswerMode, DialogPlan, check_constraint_types,
                                 dialogs_reaching, gatt_train_on, plan_dialogs, play_dialogs, sampling_counts,
                                 system_token_positions, training_dialogs, with_constraint_types)
from alignment.losses import token_logprobs
from alignment.models.loading import check_model_paths, load_policy, model_paths
from alignment.policy_eval import adherence_by_turn, model_responder, user_messages
from alignment.runs import RunDir, write_json_atomic
from alignment.training import check_disk_before_sampling

EVAL_SETS = (("before", "instructions", "start"), ("after", "instructions", "final"),
             ("zero_shot_before", "zero_shot_instructions", "start"),
             ("zero_shot_after", "zero_shot_instructions", "final"))


def evaluate_gatt(cfg: GAttConfig, run: RunDir) -> dict:
    """Adherence by turn before (model.path) and after (final/) GAtt, on held-out dialogs with training
    instructions and with zero-shot ones; eval.json, eval_dialogs.jsonl and adherence.png in the run (written
    by the main process: with `sampling.zero3` every process evaluates alike with its share of the weights)."""
    e = cfg.eval
    prompts = user_messages(load_sources(e.prompts, "rl_prompt"))
    trained = with_constraint_types(load_sources(e.instructions, "gatt_instruction"), cfg.data.constraint_types)
    sets = {"instructions": trained[:e.max_instructions],
            "zero_shot_instructions": load_sources(e.zero_shot_instructions, "gatt_instruction")[:e.max_instructions]}
    checkpoints = {"start": cfg.model.path, "final": str(run.final_dir)}
    rates, reached, rows = {}, {}, []
    for ckpt in ("start", "final"):  # both instruction sets in one batch per turn
        wanted = {name: sets[which] for name, which, c in EVAL_SETS if c == ckpt and sets[which]}
        plans: dict[str, list[DialogPlan]] = {}
        rates.update(adherence_by_turn(checkpoints[ckpt], wanted, prompts, seed=e.seed, turns=e.turns,
                                       max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                       max_context=e.max_context, dtype=cfg.model.answer_dtype,
                                       attn_implementation=cfg.model.attn_implementation,
                                       partitioned=_partitioned(cfg), transcripts=plans))
        for name in wanted:
            reached[name] = dialogs_reaching(plans[name], e.turns)
            rows += [{"set": name, "checkpoint": checkpoints[ckpt], **p.to_row()} for p in plans[name]]
    result = {k: rates[k] for k in ("before", "after") if k in rates}
    zero_shot = {k[len("zero_shot_"):]: rates[k] for k in ("zero_shot_before", "zero_shot_after") if k in rates}
    if zero_shot:
        result["zero_shot"] = zero_shot
    result["dialogs_reaching_turn"] = reached
    result["constraint_types"] = sorted({c["type"] for row in sets["instructions"] for c in row["constraints"]})
    result["checkpoints"] = {"before": checkpoints["start"], "after": checkpoints["final"]}
    if is_main_process():
        write_jsonl(run.path / "eval_dialogs.jsonl", rows)
        write_json_atomic(run.path / "eval.json", result)
        plot_adherence(result, run.path / "adherence.png")
    return result


def _partitioned(cfg: GAttConfig) -> bool:
    """The policy partitioned with ZeRO-3 for sampling and evaluation (`sampling.zero3`, several processes)."""
    return cfg.sampling.zero3 and world_size() > 1


def plot_adherence(result: dict, path: Path) -> None:
    """Table 30 as curves: share of answers obeying at each turn, before and after GAtt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out dialogs, training instructions", result)]
    if "zero_shot" in result:
        panels.append(("zero-shot instructions (held-out constraints)", result["zero_shot"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, entry) in zip(axes[0], panels):
        for name, style in (("before", "o--"), ("after", "s-")):
            if name in entry:
                points = [(int(t), v) for t, v in entry[name].items() if v is not None]
                ax.plot([t for t, _ in points], [100 * v for _, v in points], style,
                        label=f"{name} GAtt")
        ax.set(xscale="log", xlabel="dialog turn", ylabel="% answers obeying the system instruction",
               title=title, ylim=(-5, 105))
        ax.set_xticks(TABLE_30_TURNS, [str(t) for t in TABLE_30_TURNS])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_adherence(result: dict) -> None:
    rows = [("before", result.get("before")), ("after", result.get("after"))]
    rows += [(f"zero-shot {k}", v) for k, v in result.get("zero_shot", {}).items()]
    turns = next((list(v) for _, v in rows if v), [])
    print("[gatt] instruction kept at turn (share of answers, Table 30)")
    print("  " + "".ljust(18) + "".join(f"t={t}".rjust(8) for t in turns))
    for name, entry in rows:
        if entry:
            print("  " + name.ljust(18) + "".join(("-" if entry[t] is None else f"{entry[t]:.2f}").rjust(8)
                                                  for t in turns))


# ----------------------------------------------------------------------------------------- sampling
def fix_answer(constraints: list, answer: str) -> str:
    """`answers: rewrite`: strip what the model half-applied, keep its first sentence, then apply the
    constraints (toy world). A real model's sampled answer is often cut at `max_new_tokens` mid-sentence;
    rewritten whole, it would teach "End: Bye." as a word after a cut-off clause, which no answer of the
    same length can reach; its first sentence is complete and leaves room for what the instruction adds."""
    return apply_instruction(constraints, first_sentence(undo_instruction(constraints, answer) or answer))


def first_sentence(text: str) -> str:
    """`text` up to its first sentence end (. ! ? followed by a space or the end) on its first non-empty
    line; the whole line where it has none."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    match = re.match(r"(.+?[.!?])(?=\s|$)", line)
    return match.group(1) if match else line


def sample_dialogs(cfg: GAttConfig, instructions: list[dict], prompts: list[str]) -> list[DialogPlan]:
    """Play the GAtt dialogs with the instruction on every user turn (see the module docstring)."""
    s = cfg.sampling
    plans = plan_dialogs(instructions, prompts, s.num_dialogs, s.min_turns, s.max_turns,
                         random.Random(f"gatt|{cfg.seed}"))
    synced = _partitioned(cfg)
    model, tokenizer = load_policy(cfg.model.path, cfg.model.answer_dtype, cfg.model.attn_implementation,
                                   cfg.chat.template, partitioned=synced)
    respond = model_responder(model, tokenizer, max_new_tokens=s.max_new_tokens, num_samples=s.samples_per_turn,
                              temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size, seed=cfg.seed,
                              synced=synced)
    mode = AnswerMode(s.answers)
    rewrite = mode is AnswerMode.REWRITE
    plain = model_responder(model, tokenizer, max_new_tokens=s.max_new_tokens, num_samples=1,
                            temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size,
                            seed=cfg.seed + 1, synced=synced) if rewrite else None
    return play_dialogs(plans, respond, every_turn=True, check=check_instruction, choose=CHOOSERS[mode],
                        fix=fix_answer if rewrite else None, respond_plain=plain, stop_on_failure=True,
                        template=template_of(tokenizer), desc="gatt sampling")


def gatt_sft_config(cfg: GAttConfig, dialogs_path: Path) -> SFTConfig:
    """The fine-tune of `model.path` on the GAtt dialogs and the `data.replay` dialogs (loss on the answers
    `gatt_train_on` says)."""
    train_on = gatt_train_on(cfg.sampling.every_turn_examples)
    train = [DataSource(path=str(dialogs_path)), *cfg.data.replay]
    return sft_config_for(cfg, SFTData(train=train, train_on=train_on))


def run_gatt(cfg: GAttConfig) -> dict:
    """`align gatt`: sample dialogs, keep those that obey, fine-tune, evaluate adherence by turn."""
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("gatt")
    if done is not None:
        return done
    check_model_paths(model_paths(cfg.model))  # a missing model stops the run before any data is read
    instructions = load_sources(cfg.data.instructions, "gatt_instruction")  # every input checked first
    kept = with_constraint_types(instructions, cfg.data.constraint_types)
    if not kept:
        raise ValueError(f"data.constraint_types {cfg.data.constraint_types}: none of the {len(instructions)} "
                         "instructions of data.instructions has only constraints of these types")
    instructions = kept
    prompts = user_messages(load_sources(cfg.data.prompts, "rl_prompt"))
    replay = load_sources(cfg.data.replay, "sft_dialog")
    check_constraint_types(instructions, "data.instructions")
    evaluated = [*cfg.eval.instructions, *cfg.eval.zero_shot_instructions, *cfg.eval.prompts] if cfg.eval.enabled else []
    if cfg.eval.enabled:
        for key in ("instructions", "zero_shot_instructions"):
            check_constraint_types(load_sources(getattr(cfg.eval, key), "gatt_instruction"), f"eval.{key}")
        load_sources(cfg.eval.prompts, "rl_prompt")
    inputs = source_hashes([*cfg.data.instructions, *cfg.data.prompts, *cfg.data.replay, *evaluated])
    run.prepare(inputs, is_main=is_main_process())  # refuses a directory of another config before sampling

    counts_path, dialogs_path = run.path / "sampling.json", run.path / "dialogs.jsonl"
    def sampled() -> bool:  # by this config: a file left by another config is redone, never read
        return counts_path.is_file() and json.loads(counts_path.read_text()).get("config_hash") == run.hash

    if not sampled():
        check_disk_before_sampling(run, cfg.model.path, cfg.output, "gatt")

    def sample() -> None:
        mode = cfg.sampling.answers
        if is_main_process():
            print(f"[gatt] sampling {cfg.sampling.num_dialogs} dialogs of {cfg.sampling.min_turns}-"
                  f"{cfg.sampling.max_turns} turns from {cfg.model.path} (answers: {mode}, "
                  f"k={cfg.sampling.samples_per_turn})" + (f", partitioned with ZeRO-3 over {world_size()} "
                                                           "processes" if _partitioned(cfg) else ""))
        plans = sample_dialogs(cfg, instructions, prompts)
        if not is_main_process():  # partitioned: every process played the same dialogs; the main one writes
            return
        fault_point("gatt.sampled")
        rows = training_dialogs(plans)
        write_jsonl(run.path / "samples.jsonl", [p.to_row() for p in plans])
        write_jsonl(dialogs_path, rows)
        counts = {**sampling_counts(plans), "examples": len(rows), "answers_mode": mode,
                  "config_hash": run.hash}
        write_json_atomic(counts_path, counts)  # last: marks the sampling finished
        print(f"[gatt] kept {counts['complete']} of {counts['dialogs']} dialogs ({counts['failed']} broke the "
              f"instruction, {counts['cut']} too long, {counts['rewritten']} answers rewritten): "
              f"{len(rows)} training examples")

    if _partitioned(cfg):  # every process samples with its share of the weights, in lock step
        ensure_process_group()
        if agreed_max(int(not sampled())):
            sample()
        wait_for(sampled, "the sampled dialogs", "gatt")
    else:
        main_process_does(sample, sampled, "the sampled dialogs")
    dialogs = load_records(dialogs_path, "sft_dialog")
    if not dialogs:
        raise ValueError(f"[gatt] no sampled dialog obeyed its instruction (see {counts_path}); raise "
                         "sampling.samples_per_turn, or set sampling.answers=rewrite (departs from the paper)")
    if replay and is_main_process():
        print(f"[gatt] fine-tuning on {len(dialogs)} GAtt examples and {len(replay)} replayed dialogs (data.replay)")
    summary = fine_tune(gatt_sft_config(cfg, dialogs_path), dialogs + replay, run,
                        {**inputs, str(dialogs_path): file_sha256(dialogs_path)}, desc="gatt")
    summary["sampling"] = json.loads(counts_path.read_text())
    if cfg.eval.enabled and (is_main_process() or _partitioned(cfg)):  # partitioned: every process evaluates
        summary["eval"] = evaluate_gatt(cfg, run)
    if is_main_process():
        if cfg.eval.enabled:
            print_adherence(summary["eval"])
        run.mark_done(summary)
    return summary


# ----------------------------------------------------------------------------------------- Figure 10
def turn_bounds(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """[start, end) token range of each (user, assistant) turn in `chat.encode(tokenizer, messages)`, a system
    prompt counted in the first turn: a turn ends where the dialog cut after its answer ends."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    bounds, start = [], 0
    for t in range(0, len(body), 2):
        end = len(encode(tokenizer, [*head, *body[:t + 2]])["input_ids"])
        bounds.append((start, end))
        start = end
    return bounds


def answer_logprobs_by_turn(model, tokenizer, messages: list[dict]) -> list[float]:
    """Mean log-probability per answer token (EOS included) of each turn's assistant answer, given the dialog
    before it, from one forward pass over the encoded dialog (`chat.encode`, every answer labelled). Computed
    with and without the system prompt, the difference per turn is how much the model's answers depend on it:
    what the attention mass of `system_attention` points at but does not measure."""
    import torch

    enc = encode(tokenizer, messages)
    device = next(model.parameters()).device
    labels = torch.tensor([enc["labels"]], device=device)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc["input_ids"]], device=device)).logits.float()
    logprobs, mask = token_logprobs(logits, labels)  # [1, T-1]: position j predicts token j + 1
    out = []
    for a, b in turn_bounds(tokenizer, messages):
        lp, m = logprobs[0, max(a - 1, 0):b - 1], mask[0, max(a - 1, 0):b - 1]
        out.append((lp.sum() / m.sum()).item())
    return out


def system_attention(model, tokenizer, messages: list[dict]) -> dict:
    """Attention paid to the system prompt's tokens over a whole dialog (paper Figure 10, in form).

    One forward pass over the encoded dialog (`chat.encode`, every turn) with `output_attentions=True`
    (the model must use attn_implementation="eager"). For query position q, layer l and head h,
    mass[l, h, q] = sum over system-prompt keys k of softmax attention a[l, h, q, k]. Returns
      "max_per_token": [T] max over layers and heads (the paper's "maximum activations across the
                       network"), 0 before the system prompt ends;
      "per_turn": [turns] mean of max_per_token over each turn's tokens (the paper bins neighbouring tokens);
      "layer_by_turn": [L, turns] mean over heads and the turn's tokens, per layer;
      "turn_bounds": [(start, end)] token range of each turn; "system": (start, end).
    """
    import torch

    ids = encode(tokenizer, messages)["input_ids"]
    s, e = system_token_positions(tokenizer, messages)
    bounds = turn_bounds(tokenizer, messages)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), output_attentions=True)
    if out.attentions is None or out.attentions[0] is None:
        raise ValueError("the model returned no attentions: load it with attn_implementation='eager'")
    mass = torch.stack([a[0, :, :, s:e].sum(-1) for a in out.attentions]).float().cpu()  # [L, H, T]
    mass[:, :, :e] = 0.0  # the system prompt itself and what precedes it
    max_per_token = mass.amax(dim=(0, 1))
    per_turn = [max_per_token[max(a, e):b].mean().item() for a, b in bounds]
    layer_by_turn = [[mass[layer, :, max(a, e):b].mean().item() for a, b in bounds] for layer in range(mass.shape[0])]
    return {"max_per_token": max_per_token.tolist(), "per_turn": per_turn, "layer_by_turn": layer_by_turn,
            "turn_bounds": bounds, "system": (s, e)}
