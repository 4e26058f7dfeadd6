"""Ghost Attention (GAtt, docs/method.md#ghost-attention; paper 3.3): the pure parts.

An instruction given once at the start of a dialog must still be obeyed at turn 20. GAtt builds its
fine-tuning data in three steps, each a function here (the stage `alignment.stages.gatt` runs them
with a model):

1. sampling: the instruction is attached to **every** user turn (`attach_instruction(...,
   every_turn=True)`) and the latest model answers turn by turn, each answer conditioned on the answers
   sampled before it (`play_dialogs`); dialogs whose answers break the instruction are dropped;
2. training: the instruction stays only in the first turn, as the system prompt (`every_turn=False`),
   and the loss is zero on every previous turn, assistant messages included (`train_on="last"`); with
   `every_turn_examples` every turn is also trained as a "last" turn, which is the full dialog with loss
   on every answer (`training_dialogs`, `gatt_train_on`);
3. evaluation (Table 30): the instruction is given once as the system prompt, the model's own answers
   are fed back as history, and `adherence_rates` is the share of answers that still obey at turns
   1, 2, 4, 6, 10, 20.

Models enter only through `Respond`, a function from contexts to candidate answers, so the dialog logic
and the counting are tested with a hand-written responder.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from alignment.chat import B_INST, B_SYS, E_SYS, model_content_span, template_of
from alignment.data.toyworld import CONSTRAINT_TYPES

TABLE_30_TURNS = (1, 2, 4, 6, 10, 20)

# contexts (message lists ending with a user turn) -> candidate answers per context, or None for a
# context the model cannot take (too long): that dialog stops there.
Respond = Callable[[list[list[dict]]], list[list[str] | None]]
Check = Callable[[list, str], bool]  # (constraints, answer) -> obeys


def attach_instruction(messages: list[dict], instruction: str, every_turn: bool,
                       template: str = "llama2") -> list[dict]:
    """A copy of `messages` carrying `instruction`.

    every_turn=False (training, evaluation): the instruction is the system prompt of the first turn; an
    existing system prompt is kept and the instruction follows it, "{system} {instruction}".
    every_turn=True (sampling): the same, and the instruction is also concatenated in front of every later
    user message in the form a system prompt takes in the chat format ("<<SYS>>\n{instruction}\n<</SYS>>
    \n\n{user}"), so every turn reads like the single-turn dialogs with a system instruction the model
    learnt to obey in SFT (chat.py folds the first turn's system prompt into its user message the same way).
    template="model" (a tokenizer's own chat template, e.g. ChatML, which has no such markers): the later
    user messages read "{instruction}\n\n{user}" instead, so no Llama-2 markup leaks into another format.
    """
    instruction = instruction.strip()
    if not instruction:
        raise ValueError("instruction is empty")
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content'].strip()} {instruction}"
    else:
        out.insert(0, {"role": "system", "content": instruction})
    if every_turn:
        users = [m for m in out if m["role"] == "user"]
        for m in users[1:]:
            if template == "model":
                m["content"] = f"{instruction}\n\n{m['content'].strip()}"
            elif template == "llama2":
                m["content"] = f"{B_SYS}{instruction}{E_SYS}{m['content'].strip()}"
            else:
                raise ValueError(f"unknown chat template {template!r}; known: llama2, model")
    return out


# ------------------------------------------------------------------------------------- choosing answers
class AnswerMode(str, enum.Enum):
    """How a sampled turn becomes the dialog's answer (recipe key `sampling.answers`)."""

    SAMPLE = "sample"  # the paper: the first of the k samples that obeys; none obeys -> the dialog is dropped
    REWRITE = "rewrite"  # NOT the paper: a sample that breaks the instruction is rewritten to obey it


@dataclass(frozen=True)
class Choice:
    answer: str
    obeys: bool
    rewritten: bool = False
    tried: int = 1  # candidates looked at


def first_obeying(constraints: list, candidates: Sequence[str], check: Check, fix=None) -> Choice:
    """Best of k by the checker: the first candidate that obeys, else the first candidate (failing)."""
    for i, answer in enumerate(candidates):
        if check(constraints, answer):
            return Choice(answer, True, tried=i + 1)
    return Choice(candidates[0], False, tried=len(candidates))


def first_candidate(constraints: list, candidates: Sequence[str], check: Check, fix=None) -> Choice:
    """Evaluation: the model's (single, greedy) answer as it is."""
    return Choice(candidates[0], check(constraints, candidates[0]))


CHOOSERS = {AnswerMode.SAMPLE: first_obeying, AnswerMode.REWRITE: first_obeying}  # REWRITE: play_dialogs fixes


# ------------------------------------------------------------------------------------- dialogs
@dataclass
class DialogPlan:
    """One dialog to play: its instruction (a gatt_instruction row) and its user turns."""

    instruction: dict
    users: list[str]
    turns: list[dict] = field(default_factory=list)  # {"user", "answer", "obeys", "rewritten", "tried"}
    status: str = "open"  # open -> complete | failed (an answer broke the instruction) | cut (context too long)

    def history(self) -> list[dict]:
        """The dialog so far without any instruction, ending with the next user message."""
        messages = []
        for t in self.turns:
            messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["answer"]}]
        messages.append({"role": "user", "content": self.users[len(self.turns)]})
        return messages

    def to_row(self) -> dict:
        return {"instruction": self.instruction, "status": self.status, "turns": self.turns}


def plan_dialogs(instructions: list[dict], prompts: list[str], num_dialogs: int, min_turns: int, max_turns: int,
                 rng: random.Random) -> list[DialogPlan]:
    """`num_dialogs` dialogs, instructions taken in a shuffled round-robin, each with a random number of
    turns in [min_turns, max_turns] whose user prompts are distinct where the pool allows."""
    if not instructions or not prompts:
        raise ValueError("GAtt needs at least one instruction and one user prompt")
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    order = list(range(len(instructions)))
    plans = []
    for i in range(num_dialogs):
        if i % len(order) == 0:
            rng.shuffle(order)
        n = rng.randint(min_turns, max_turns)
        users = rng.sample(prompts, n) if n <= len(prompts) else [rng.choice(prompts) for _ in range(n)]
        plans.append(DialogPlan(instructions[order[i % len(order)]], users))
    return plans


def play_dialogs(plans: list[DialogPlan], respond: Respond, *, every_turn: bool, check: Check,
                 choose=first_candidate, fix=None, respond_plain: Respond | None = None,
                 stop_on_failure: bool, template: str = "llama2", desc: str = "dialogs") -> list[DialogPlan]:
    """Play all dialogs turn by turn, in place: at each turn every open dialog asks `respond` for the next
    answer given its own history (so each answer conditions on the answers chosen before it), with the
    instruction attached as `every_turn` says; `choose` picks the answer among the candidates.

    fix (`answers: rewrite`, not the paper): an answer that breaks the instruction is rewritten by
    `fix(constraints, answer)`. The answer rewritten is the model's answer to the dialog without any
    instruction (`respond_plain`, one batch per turn for the dialogs that need it), so the content stays the
    model's own and only the form is the program's; without `respond_plain`, the first candidate.
    stop_on_failure=True (sampling): a dialog whose answer breaks the instruction stops, status "failed".
    stop_on_failure=False (evaluation): the answer is kept as history and the dialog goes on.
    A dialog `respond` cannot answer (None: the context does not fit) stops with status "cut".
    template: the policy's chat template (`chat.template_of`), the form the every-turn instruction takes.
    desc: the progress bar's label (one tick a turn: later turns re-read longer dialogs, so they take longer).
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=max((len(p.users) for p in plans), default=0), desc=desc, unit="turn", dynamic_ncols=True)
    for t in range(bar.total):
        live = [p for p in plans if p.status == "open" and len(p.users) > t]
        if not live:
            break
        bar.set_postfix(open=len(live))
        contexts = [attach_instruction(p.history(), p.instruction["instruction"], every_turn, template)
                    for p in live]
        chosen = []
        for plan, candidates in zip(live, respond(contexts)):
            if candidates is None:
                plan.status = "cut"
                continue
            chosen.append((plan, choose(plan.instruction["constraints"], candidates, check, fix)))
        if fix is not None:
            broken = [i for i, (_, c) in enumerate(chosen) if not c.obeys]
            plain = respond_plain([chosen[i][0].history() for i in broken]) if respond_plain and broken else []
            for k, i in enumerate(broken):
                plan, c = chosen[i]
                source = plain[k][0] if plain and plain[k] else c.answer
                answer = fix(plan.instruction["constraints"], source)
                chosen[i] = (plan, Choice(answer, check(plan.instruction["constraints"], answer), rewritten=True,
                                          tried=c.tried))
        for plan, c in chosen:
            plan.turns.append({"user": plan.users[t], "answer": c.answer, "obeys": c.obeys,
                               "rewritten": c.rewritten, "tried": c.tried})
            if not c.obeys and stop_on_failure:
                plan.status = "failed"
            elif len(plan.turns) == len(plan.users):
                plan.status = "complete"
        bar.update()
    bar.close()
    return plans


def training_dialogs(plans: list[DialogPlan], prefix: str = "gatt") -> list[dict]:
    """sft_dialog rows from the complete dialogs, one per dialog: the instruction as system prompt of the
    first turn only, user messages without it. Encode them with `gatt_train_on(every_turn_examples)`."""
    rows = []
    for d, plan in enumerate(plans):
        if plan.status != "complete":
            continue
        messages = []
        for t in plan.turns:
            messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["answer"]}]
        rows.append({"id": f"{prefix}-{d:06d}", "source": "gatt",
                     "messages": attach_instruction(messages, plan.instruction["instruction"], every_turn=False),
                     "meta": {"instruction_id": plan.instruction["id"], "turns": len(plan.turns)}})
    return rows


def gatt_train_on(every_turn_examples: bool) -> str:
    """Which answers of a GAtt dialog carry loss.

    False: "last", the paper's form: loss on the final answer only, zero on every earlier turn.
    True: "all". This is the paper's form applied to every turn: the T examples "dialog cut after turn n,
    loss on its last answer" (n = 1..T) put loss on every answer exactly once, each conditioned on the same
    prefix (the instruction as system prompt, the earlier turns without it) as in the full dialog, so under
    a causal model their losses are those of the full dialog with loss on all answers (tested), at one
    forward pass per dialog instead of T.
    """
    return "all" if every_turn_examples else "last"


# ------------------------------------------------------------------------------------- evaluation
def eval_plans(instructions: list[dict], prompts: list[str], num_turns: int, seed: int) -> list[DialogPlan]:
    """One dialog of `num_turns` user turns per instruction, user prompts drawn with `seed`."""
    rng = random.Random(f"gatt-eval|{seed}")
    return plan_dialogs(instructions, prompts, len(instructions), num_turns, num_turns, rng)


def adherence_rates(plans: list[DialogPlan], turns: Sequence[int] = TABLE_30_TURNS) -> dict[str, float | None]:
    """Share of the answers at turn t (1-based) that obey the instruction, among the dialogs that reached
    turn t; None where none did."""
    out: dict[str, float | None] = {}
    for t in turns:
        answers = [p.turns[t - 1]["obeys"] for p in plans if len(p.turns) >= t]
        out[str(t)] = sum(answers) / len(answers) if answers else None
    return out


def dialogs_reaching(plans: list[DialogPlan], turns: Sequence[int] = TABLE_30_TURNS) -> dict[str, int]:
    return {str(t): sum(len(p.turns) >= t for p in plans) for t in turns}


def measure_adherence(respond: Respond, instructions: list[dict], prompts: list[str], *, check: Check,
                      seed: int = 0, turns: Sequence[int] = TABLE_30_TURNS) -> tuple[dict, list[DialogPlan]]:
    """Table 30 for one responder: play one dialog per instruction up to max(turns) with the instruction
    given once as the system prompt and the responder's own answers as history; the adherence per turn
    and the played dialogs."""
    rates, plans = measure_adherence_sets(respond, {"": instructions}, prompts, check=check, seed=seed,
                                          turns=turns)
    return rates[""], plans[""]


def measure_adherence_sets(respond: Respond, instruction_sets: dict[str, list[dict]], prompts: list[str], *,
                           check: Check, seed: int = 0, turns: Sequence[int] = TABLE_30_TURNS
                           ) -> tuple[dict[str, dict], dict[str, list[DialogPlan]]]:
    """`measure_adherence` for several instruction sets at once: each set's dialogs are the ones it would
    get alone (`eval_plans` with the same seed), and all are played together, so every turn is one batch
    for the responder. Rates and played dialogs by set name."""
    plans = {name: eval_plans(instructions, prompts, max(turns), seed)
             for name, instructions in instruction_sets.items()}
    play_dialogs([p for ps in plans.values() for p in ps], respond, every_turn=False, check=check,
                 stop_on_failure=False, desc="gatt eval")
    return {name: adherence_rates(ps, turns) for name, ps in plans.items()}, plans


def sampling_counts(plans: list[DialogPlan]) -> dict:
    """What sampling kept: dialogs by status, answers rewritten, and the pass rate at each turn."""
    by_turn: dict[str, list[int]] = {}
    for p in plans:
        for t, turn in enumerate(p.turns, start=1):
            by_turn.setdefault(str(t), []).append(int(turn["obeys"] and not turn["rewritten"]))
    return {"dialogs": len(plans), **{s: sum(p.status == s for p in plans) for s in ("complete", "failed", "cut")},
            "answers": sum(len(p.turns) for p in plans),
            "rewritten": sum(t["rewritten"] for p in plans for t in p.turns),
            "sampled_obey_rate_by_turn": {t: sum(v) / len(v) for t, v in by_turn.items()}}


def system_token_positions(tokenizer, messages: list[dict]) -> tuple[int, int]:
    """[start, end) of the system prompt's tokens in `chat.encode(tokenizer, messages)["input_ids"]`
    (the Figure 10 attention plots read the attention paid to these positions)."""
    if not messages or messages[0]["role"] != "system":
        raise ValueError("dialog has no system prompt")
    if template_of(tokenizer) == "model":
        return model_content_span(tokenizer, messages, 0)
    system = messages[0]["content"].strip()
    first_user = messages[1]["content"].strip() if len(messages) > 1 else ""
    # the first turn's text as chat.encode_dialog tokenizes it, up to the end of the first user message
    text = f"{B_INST} {B_SYS}{system}{E_SYS}{first_user}"
    lo = len(f"{B_INST} {B_SYS}")
    offsets = tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                        return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a >= lo and b <= lo + len(system) and b > a]
    if not inside:
        raise ValueError("no token of the system prompt found")
    return 1 + inside[0], 2 + inside[-1]  # 1: the BOS of the first turn


def with_constraint_types(instructions: list[dict], types: Sequence[str]) -> list[dict]:
    """The instructions whose every constraint is of one of `types` (`data.constraint_types`); all of them
    when `types` is empty."""
    if not types:
        return list(instructions)
    return [row for row in instructions if all(c["type"] in types for c in row["constraints"])]


def check_constraint_types(instructions: list[dict], where: str) -> None:
    """Stop before any compute when an instruction has a constraint the checker does not know."""
    for i, row in enumerate(instructions):
        for c in row["constraints"]:
            if c["type"] not in CONSTRAINT_TYPES:
                raise ValueError(f"{where}[{i}] ({row['id']}): constraint type {c['type']!r} cannot be checked; "
                                 f"known: {', '.join(CONSTRAINT_TYPES)}")
