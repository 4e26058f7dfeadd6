"""Ghost Attention: instruction placement, last-answer-only labels, adherence counted per turn with a
hand-written responder, sampling that keeps only obeying dialogs, and a tiny `align gatt` run."""
import json
from pathlib import Path

import pytest
import yaml

from alignment.chat import IGNORE_INDEX, encode_dialog, format_dialog
from alignment.data.toyworld import check_instruction
from alignment.gatt_data import (AnswerMode, CHOOSERS, DialogPlan, adherence_rates, attach_instruction,
                                 dialogs_reaching, measure_adherence, play_dialogs, sampling_counts, gatt_train_on,
                                 system_token_positions, training_dialogs)

from conftest import write_jsonl
from pngcheck import assert_plot

UPPER = {"id": "i-upper", "instruction": "Always answer in uppercase letters.", "short": False,
         "constraints": [{"type": "upper", "value": ""}], "held_out": False}
NAPOLEON = {"id": "i-nap", "instruction": "Figure: Napoleon.", "short": True,
            "constraints": [{"type": "persona", "value": "Napoleon"}], "held_out": False}
DIALOG = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"},
          {"role": "user", "content": "sort these numbers"}]


# ------------------------------------------------------------------------------------- attach_instruction
def test_every_turn_concatenates_the_instruction_to_each_user_message():
    out = attach_instruction(DIALOG, "Style: upper.", every_turn=True)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"] == "Style: upper." and out[1]["content"] == "what is two plus two"
    assert out[2]["content"] == "four"
    assert out[3]["content"] == "<<SYS>>\nStyle: upper.\n<</SYS>>\n\nsort these numbers"
    assert DIALOG[0]["content"] == "what is two plus two"  # a copy: the input is untouched
    # every turn renders the instruction the way the first turn renders its system prompt
    text = format_dialog([*out, {"role": "assistant", "content": "ok"}])
    assert text.count("[INST] <<SYS>>\nStyle: upper.\n<</SYS>>\n\n") == 2


def test_every_turn_merges_with_an_existing_system_prompt():
    out = attach_instruction([{"role": "system", "content": "Be brief."}, *DIALOG], "End: Done.", every_turn=True)
    assert out[0] == {"role": "system", "content": "Be brief. End: Done."}
    assert out[3]["content"] == "<<SYS>>\nEnd: Done.\n<</SYS>>\n\nsort these numbers"
    assert sum(m["role"] == "system" for m in out) == 1


def test_every_turn_under_a_model_template_carries_no_llama2_markup():
    out = attach_instruction(DIALOG, "Style: upper.", every_turn=True, template="model")
    assert out[0]["content"] == "Style: upper." and out[1]["content"] == "what is two plus two"
    assert out[3]["content"] == "Style: upper.\n\nsort these numbers"
    assert not any("<<SYS>>" in m["content"] or "[INST]" in m["content"] for m in out)
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        attach_instruction(DIALOG, "Style: upper.", every_turn=True, template="chatml")


def test_first_turn_only_makes_the_instruction_the_system_prompt():
    out = attach_instruction(DIALOG, "Figure: Napoleon.", every_turn=False)
    assert out[0] == {"role": "system", "content": "Figure: Napoleon."}
    assert out[1:] == DIALOG  # user messages carry no instruction
    merged = attach_instruction([{"role": "system", "content": "Be brief."}, *DIALOG], "Figure: Napoleon.",
                                every_turn=False)
    assert merged[0] == {"role": "system", "content": "Be brief. Figure: Napoleon."}
    assert sum(m["role"] == "system" for m in merged) == 1 and merged[1:] == DIALOG
    with pytest.raises(ValueError, match="empty"):
        attach_instruction(DIALOG, "  ", every_turn=False)


# ------------------------------------------------------------------------------------- training examples
def _complete_plan(instruction, answers):
    plan = DialogPlan(instruction, [f"question {i} sort these numbers" for i in range(len(answers))])
    plan.turns = [{"user": u, "answer": a, "obeys": True, "rewritten": False, "tried": 1}
                  for u, a in zip(plan.users, answers)]
    plan.status = "complete"
    return plan


def test_training_dialogs_have_the_system_prompt_once_and_last_labels_only_on_the_final_answer(tokenizer):
    answers = ["AS NAPOLEON, ONE", "AS NAPOLEON, TWO THREE", "AS NAPOLEON, FOUR"]
    failed = _complete_plan(UPPER, ["x"])
    failed.status = "failed"
    rows = training_dialogs([_complete_plan(NAPOLEON, answers), failed])
    assert len(rows) == 1 and rows[0]["meta"]["turns"] == 3  # one row per dialog, the failed dialog dropped
    msgs = rows[0]["messages"]
    assert msgs[0] == {"role": "system", "content": "Figure: Napoleon."}
    assert all("Napoleon" not in m["content"] for m in msgs if m["role"] == "user")
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == answers
    enc = encode_dialog(tokenizer, msgs, train_on=gatt_train_on(False))
    trained = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == answers[-1]  # earlier answers are input, without loss


def test_every_turn_labels_equal_one_last_turn_example_per_turn(tokenizer, nano_model_dir):
    """gatt_train_on(True): the full dialog with loss on every answer has, token for token, the losses of the
    T examples "cut after turn n, loss on the last answer" (the paper's form applied to every turn)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nano_model_dir).eval()
    answers = ["AS NAPOLEON, ONE", "AS NAPOLEON, TWO THREE", "AS NAPOLEON, FOUR FIVE SIX"]
    msgs = training_dialogs([_complete_plan(NAPOLEON, answers)])[0]["messages"]

    def token_losses(enc):
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:].clamp(min=0), reduction="none")
        return nll[labels[0, 1:] != IGNORE_INDEX]

    full = token_losses(encode_dialog(tokenizer, msgs, train_on=gatt_train_on(True)))
    cuts = torch.cat([token_losses(encode_dialog(tokenizer, msgs[:1 + 2 * n], train_on="last"))
                      for n in range(1, len(answers) + 1)])
    assert len(full) == len(cuts) and len(full) > len(answers)
    torch.testing.assert_close(full, cuts, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_system", [True, False])
def test_answer_logprobs_by_turn_equal_each_answer_scored_alone_after_its_dialog(tokenizer, nano_model_dir, with_system):
    """Each turn's mean answer log-prob from one pass over the whole dialog equals that answer scored on the
    dialog cut after it (labels on its answer only, cross-entropy by hand), with or without a system prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignment.stages.gatt import answer_logprobs_by_turn, turn_bounds

    model = AutoModelForCausalLM.from_pretrained(nano_model_dir).eval()
    answers = ["AS NAPOLEON, ONE", "AS NAPOLEON, TWO THREE", "AS NAPOLEON, FOUR FIVE SIX"]
    msgs = training_dialogs([_complete_plan(NAPOLEON, answers)])[0]["messages"]
    msgs = msgs if with_system else msgs[1:]
    head = 1 if with_system else 0

    def alone(n: int) -> float:
        enc = encode_dialog(tokenizer, msgs[:head + 2 * n], train_on="last")
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:].clamp(min=0), reduction="none")
        return -nll[labels[0, 1:] != IGNORE_INDEX].mean().item()

    got = answer_logprobs_by_turn(model, tokenizer, msgs)
    assert got == pytest.approx([alone(n) for n in range(1, len(answers) + 1)], abs=1e-5)
    bounds = turn_bounds(tokenizer, msgs)
    assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1][1] == len(encode_dialog(tokenizer, msgs)["input_ids"])


@pytest.mark.parametrize("every_turn, expected", [(False, "last"), (True, "all")])
def test_the_stage_fine_tunes_with_the_labels_every_turn_examples_says(tmp_path, every_turn, expected):
    from alignment.config import from_dict, GAttConfig
    from alignment.stages.gatt import gatt_sft_config

    cfg = from_dict(GAttConfig, {"model": {"path": "m"}, "output": {"dir": str(tmp_path)},
                                 "sampling": {"every_turn_examples": every_turn},
                                 "data": {"instructions": [{"path": "i"}], "prompts": [{"path": "p"}]}})
    assert gatt_sft_config(cfg, tmp_path / "dialogs.jsonl").data.train_on == expected


# ------------------------------------------------------------------------------------- adherence per turn
def _fake_respond(obey_until: dict, seen: list, cut_after: dict | None = None):
    """Obeys (upper case) while the turn number <= obey_until[system prompt]; records every context."""

    def respond(contexts):
        out = []
        for ctx in contexts:
            seen.append(ctx)
            system = ctx[0]["content"]
            turn = sum(m["role"] == "user" for m in ctx)
            if cut_after and turn > cut_after.get(system, 10**9):
                out.append(None)
            else:
                out.append(["AS NAPOLEON, FINE" if turn <= obey_until[system] else "as napoleon, fine"])
        return out

    return respond


def test_adherence_is_counted_per_turn_on_hand_made_dialogs():
    # UPPER obeys up to turn 3, the Napoleon+upper instruction up to turn 10: shares are hand-computed
    both = {**NAPOLEON, "id": "i-both", "instruction": "Figure: Napoleon. Style: upper.",
            "constraints": NAPOLEON["constraints"] + UPPER["constraints"]}
    seen = []
    respond = _fake_respond({UPPER["instruction"]: 3, both["instruction"]: 10}, seen)
    rates, plans = measure_adherence(respond, [UPPER, both], ["q one", "q two", "q three"], check=check_instruction)
    assert rates == {"1": 1.0, "2": 1.0, "4": 0.5, "6": 0.5, "10": 0.5, "20": 0.0}
    assert all(len(p.turns) == 20 for p in plans)
    # evaluation: the instruction once, as the system prompt; the model's own answers as history
    last = [c for c in seen if c[0]["content"] == UPPER["instruction"]][-1]
    assert sum(m["role"] == "system" for m in last) == 1 and len(last) == 1 + 2 * 19 + 1
    assert all(UPPER["instruction"] not in m["content"] for m in last[1:])
    assert [m["content"] for m in last if m["role"] == "assistant"][2:4] == ["AS NAPOLEON, FINE", "as napoleon, fine"]


def test_sets_measured_together_get_the_dialogs_and_rates_they_get_alone_in_one_batch_per_turn():
    from alignment.gatt_data import measure_adherence_sets

    both = {**NAPOLEON, "id": "i-both", "instruction": "Figure: Napoleon. Style: upper.",
            "constraints": NAPOLEON["constraints"] + UPPER["constraints"]}
    obey = {UPPER["instruction"]: 3, both["instruction"]: 10, NAPOLEON["instruction"]: 0}
    users = ["q one", "q two", "q three", "q four"]
    alone = {name: measure_adherence(_fake_respond(obey, []), s, users, check=check_instruction, seed=3)
             for name, s in (("a", [UPPER, both]), ("b", [NAPOLEON]))}
    calls = []

    def counting(contexts):
        calls.append(len(contexts))
        return _fake_respond(obey, [])(contexts)

    rates, plans = measure_adherence_sets(counting, {"a": [UPPER, both], "b": [NAPOLEON]}, users,
                                          check=check_instruction, seed=3)
    assert rates == {name: r for name, (r, _) in alone.items()}
    assert rates["a"] == {"1": 1.0, "2": 1.0, "4": 0.5, "6": 0.5, "10": 0.5, "20": 0.0}
    assert rates["b"] == {t: 1.0 for t in ("1", "2", "4", "6", "10", "20")}  # lower case obeys the persona
    for name, (_, ps) in alone.items():
        assert [p.to_row() for p in plans[name]] == [p.to_row() for p in ps]
    assert calls == [3] * 20  # every turn of the three dialogs is one call


def test_dialogs_cut_by_the_context_leave_the_later_denominators():
    seen = []
    respond = _fake_respond({UPPER["instruction"]: 20, NAPOLEON["instruction"]: 20}, seen,
                            cut_after={NAPOLEON["instruction"]: 5})
    rates, plans = measure_adherence(respond, [UPPER, NAPOLEON], ["q"], check=check_instruction)
    assert rates == {"1": 1.0, "2": 1.0, "4": 1.0, "6": 1.0, "10": 1.0, "20": 1.0}
    assert dialogs_reaching(plans) == {"1": 2, "2": 2, "4": 2, "6": 1, "10": 1, "20": 1}
    assert {p.instruction["id"]: p.status for p in plans} == {"i-upper": "complete", "i-nap": "cut"}
    assert adherence_rates(plans, [21]) == {"21": None}


# ------------------------------------------------------------------------------------- sampling
def test_sampling_attaches_the_instruction_everywhere_and_keeps_only_obeying_dialogs():
    from alignment.stages.gatt import fix_answer

    seen = []

    def respond(contexts):  # k = 2 candidates: obeying on the second try for turns 1-2, never at turn 3
        seen.extend(contexts)
        out = []
        for ctx in contexts:
            turn = sum(m["role"] == "user" for m in ctx)
            out.append(["plain answer", "PLAIN ANSWER"] if turn <= 2 else ["plain answer", "still plain"])
        return out

    def plans():
        return [DialogPlan(UPPER, ["q1", "q2"]), DialogPlan(UPPER, ["q1", "q2", "q3"])]

    played = play_dialogs(plans(), respond, every_turn=True, check=check_instruction,
                          choose=CHOOSERS[AnswerMode.SAMPLE], stop_on_failure=True)
    assert [p.status for p in played] == ["complete", "failed"]
    for ctx in seen:  # the instruction is on every turn: system prompt of the first, prefix of the others
        assert ctx[0] == {"role": "system", "content": UPPER["instruction"]}
        assert all(m["content"].startswith(f"<<SYS>>\n{UPPER['instruction']}") for m in ctx[2:] if m["role"] == "user")
    assert played[0].turns[1]["tried"] == 2 and played[0].turns[1]["answer"] == "PLAIN ANSWER"
    rows = training_dialogs(played)
    assert len(rows) == 1  # the complete dialog only, every answer obeying
    assert all(check_instruction(UPPER["constraints"], m["content"]) for m in rows[0]["messages"]
               if m["role"] == "assistant")
    counts = sampling_counts(played)
    assert (counts["complete"], counts["failed"], counts["rewritten"]) == (1, 1, 0)
    assert counts["sampled_obey_rate_by_turn"] == {"1": 1.0, "2": 1.0, "3": 0.0}

    rewritten = play_dialogs(plans(), respond, every_turn=True, check=check_instruction,
                             choose=CHOOSERS[AnswerMode.REWRITE], fix=fix_answer, stop_on_failure=True)
    assert [p.status for p in rewritten] == ["complete", "complete"]
    assert rewritten[1].turns[2] == {"user": "q3", "answer": "PLAIN ANSWER", "obeys": True, "rewritten": True,
                                     "tried": 2}

    asked_plain = []

    def respond_plain(contexts):  # the model's answer without any instruction
        asked_plain.extend(contexts)
        return [["the answer to q3"] for _ in contexts]

    from_plain = play_dialogs(plans(), respond, every_turn=True, check=check_instruction,
                              choose=CHOOSERS[AnswerMode.REWRITE], fix=fix_answer, respond_plain=respond_plain,
                              stop_on_failure=True)
    assert from_plain[1].turns[2]["answer"] == "THE ANSWER TO Q3" and from_plain[1].turns[2]["rewritten"]
    assert from_plain[1].turns[1]["answer"] == "PLAIN ANSWER"  # an obeying sample is kept as sampled
    assert len(asked_plain) == 1  # only the broken turn asks, with the dialog and no instruction at all
    turns = from_plain[1].turns
    assert asked_plain[0] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": turns[0]["answer"]},
                              {"role": "user", "content": "q2"}, {"role": "assistant", "content": turns[1]["answer"]},
                              {"role": "user", "content": "q3"}]
    assert all("<<SYS>>" not in m["content"] and m["role"] != "system" for m in asked_plain[0])


# ------------------------------------------------------------------------------------- align gatt
def _toy_inputs(tmp_path):
    instructions = [UPPER, NAPOLEON, {"id": "i-end", "instruction": "End: Done.", "short": True,
                                      "constraints": [{"type": "end", "value": "Done"}], "held_out": False}]
    zero_shot = [{"id": "i-exc", "instruction": "Punct: exclaim.", "short": True,
                  "constraints": [{"type": "exclaim", "value": ""}], "held_out": True}]
    prompts = [{"id": f"p{i}", "prompt": p, "is_safety": False} for i, p in
               enumerate(["what is two plus three", "sort these numbers one five two", "count letters in cat"])]
    return (write_jsonl(tmp_path / "instr.jsonl", instructions), write_jsonl(tmp_path / "zs.jsonl", zero_shot),
            write_jsonl(tmp_path / "prompts.jsonl", prompts))


def _recipe(tmp_path, model_dir, answers):
    instr, zs, prompts = _toy_inputs(tmp_path)
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"instructions": [{"path": str(instr)}], "prompts": [{"path": str(prompts)}]},
        "sampling": {"num_dialogs": 4, "min_turns": 1, "max_turns": 3, "answers": answers,
                     "samples_per_turn": 1, "max_new_tokens": 6, "batch_size": 16},
        "eval": {"instructions": [{"path": str(instr)}], "zero_shot_instructions": [{"path": str(zs)}],
                 "prompts": [{"path": str(prompts)}], "turns": [1, 2, 4], "max_new_tokens": 6,
                 "max_instructions": 2},
        "train": {"epochs": 1, "micro_batch_size": 4, "max_length": 256},
        "optim": {"lr": 1e-3},
        "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "gatt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_align_gatt_runs_end_to_end_on_nano_in_rewrite_mode(tmp_path, nano_model_dir):
    from alignment.cli import main

    assert main(["gatt", "--recipe", str(_recipe(tmp_path, nano_model_dir, "rewrite"))]) == 0
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").is_file() and (run / "done.json").is_file()
    counts = json.loads((run / "sampling.json").read_text())
    assert counts["dialogs"] == 4 and counts["answers_mode"] == "rewrite" and counts["complete"] >= 1
    rows = [json.loads(line) for line in (run / "dialogs.jsonl").read_text().splitlines()]
    assert len(rows) == counts["examples"] >= counts["complete"]
    constraints = {json.loads(line)["instruction"]: json.loads(line)["constraints"]
                   for line in (tmp_path / "instr.jsonl").read_text().splitlines()}
    for row in rows:  # the instruction is the system prompt, and every trained answer obeys it
        assert row["messages"][0]["role"] == "system"
        assert check_instruction(constraints[row["messages"][0]["content"]], row["messages"][-1]["content"])
    result = json.loads((run / "eval.json").read_text())
    for entry in (result["before"], result["after"], result["zero_shot"]["before"], result["zero_shot"]["after"]):
        assert set(entry) == {"1", "2", "4"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in entry.values())
    assert_plot(run / "adherence.png", series=2)  # before and after GAtt
    evaluated = [json.loads(line) for line in (run / "eval_dialogs.jsonl").read_text().splitlines()]
    assert {r["set"] for r in evaluated} == {"before", "after", "zero_shot_before", "zero_shot_after"}


def test_align_gatt_stops_when_no_sampled_dialog_obeys(tmp_path, nano_model_dir, capsys):
    """The paper's mode keeps only obeying samples: an untrained model gives none, and the run says so."""
    from alignment.cli import main

    assert main(["gatt", "--recipe", str(_recipe(tmp_path, nano_model_dir, "sample")),
                 "--set", "eval.enabled=false"]) == 2
    assert "no sampled dialog obeyed" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "sampling.json").read_text())["complete"] == 0
    assert not (tmp_path / "run" / "final").exists()


def test_unknown_constraint_types_stop_before_any_compute(tmp_path, nano_model_dir, capsys):
    from alignment.cli import main

    path = _recipe(tmp_path, nano_model_dir, "sample")
    write_jsonl(tmp_path / "instr.jsonl", [{**UPPER, "constraints": [{"type": "haiku", "value": ""}]}])
    assert main(["gatt", "--recipe", str(path)]) == 2
    assert "constraint type 'haiku' cannot be checked" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_constraint_types_keep_only_instructions_of_those_types_in_training_and_evaluation(tmp_path, nano_model_dir):
    from alignment.cli import main

    path = _recipe(tmp_path, nano_model_dir, "rewrite")
    assert main(["gatt", "--recipe", str(path), "--set", "data.constraint_types=[end]"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "dialogs.jsonl").read_text().splitlines()]
    assert rows and {r["messages"][0]["content"] for r in rows} == {"End: Done."}  # UPPER and NAPOLEON left out
    evaluated = [json.loads(line) for line in (run / "eval_dialogs.jsonl").read_text().splitlines()]
    assert {r["instruction"]["id"] for r in evaluated if r["set"] in ("before", "after")} == {"i-end"}
    assert {r["instruction"]["id"] for r in evaluated if r["set"].startswith("zero_shot")} == {"i-exc"}  # not filtered
    assert json.loads((run / "eval.json").read_text())["constraint_types"] == ["end"]


def test_constraint_types_that_leave_no_instruction_stop_before_any_compute(tmp_path, nano_model_dir, capsys):
    from alignment.cli import main

    path = _recipe(tmp_path, nano_model_dir, "rewrite")
    assert main(["gatt", "--recipe", str(path), "--set", "data.constraint_types=[language]"]) == 2
    assert "data.constraint_types ['language']: none of the 3 instructions" in capsys.readouterr().err
    assert main(["gatt", "--recipe", str(path), "--set", "data.constraint_types=[haiku]"]) == 2
    assert "data.constraint_types" in capsys.readouterr().err


def test_replayed_dialogs_are_trained_beside_the_gatt_dialogs_and_checked_first(tmp_path, nano_model_dir, capsys):
    from alignment.cli import main

    replay = [{"id": f"r{i}", "messages": [{"role": "user", "content": "What does a cat say?"},
                                           {"role": "assistant", "content": "A cat says meow."}]} for i in range(3)]
    write_jsonl(tmp_path / "replay.jsonl", [*replay[:2], {"id": "bad", "messages": [{"role": "user", "content": "hi"}]}])
    recipe = str(_recipe(tmp_path, nano_model_dir, "rewrite"))
    replay_set = ["--set", f"data.replay=[{{path: {tmp_path / 'replay.jsonl'}}}]", "--set", "eval.enabled=false"]
    assert main(["gatt", "--recipe", recipe, *replay_set]) == 2
    assert "replay.jsonl:3: messages" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing sampled before every input was checked

    write_jsonl(tmp_path / "replay.jsonl", replay)
    assert main(["gatt", "--recipe", recipe, *replay_set]) == 0
    run = tmp_path / "run"
    gatt_examples = json.loads((run / "sampling.json").read_text())["examples"]
    assert json.loads((run / "done.json").read_text())["examples"] == gatt_examples + len(replay)
    assert f"{gatt_examples} GAtt examples and 3 replayed dialogs" in capsys.readouterr().out


def test_a_rewritten_answer_keeps_the_models_first_sentence_so_it_ends_as_told():
    from alignment.stages.gatt import first_sentence, fix_answer

    end_bye = [{"type": "end", "value": "Bye"}]
    cut = "The capital is Paris. It has many museums, and the Louvre is the one that"  # cut at max_new_tokens
    assert fix_answer(end_bye, cut) == "The capital is Paris. Bye."
    assert check_instruction(end_bye, fix_answer(end_bye, cut))
    assert first_sentence("\n\nWhat? No.\nSecond line.") == "What?"
    assert first_sentence("3.5 is more than 3. Yes") == "3.5 is more than 3."  # a decimal point is no end
    assert first_sentence("no end at all") == "no end at all"
    assert fix_answer(end_bye, "As Darwin, seven. Bye.") == "As Darwin, seven. Bye."  # undo, cut, redo
