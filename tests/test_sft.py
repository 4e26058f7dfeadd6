"""SFT invariants: batch x accumulation equivalence, packed == unpacked, resume == uninterrupted,
bad data stops before any compute and leaves an existing run untouched."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignment.batching import attention_inputs, collate, pack, pack_balanced
from alignment.chat import IGNORE_INDEX
from alignment.config import SFTConfig, load_config
from alignment.finetune import encode_dialogs
from alignment.runs import read_metrics
from alignment.stages.sft import run_sft

from conftest import make_dialogs, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def recipe(tmp_path, base, train_rows, name="r.yaml", **sections) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    raw = {
        "model": {"path": str(base)},
        "data": {"train": [{"path": str(train)}]},
        "train": {"epochs": 1, "micro_batch_size": 4, "max_length": 128, "packing": False},
        "optim": {"lr": 1e-3},
        "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def test_batch_times_accumulation_is_one_big_batch(tmp_path, nano_model_dir):
    rows = make_dialogs(32)
    a = recipe(tmp_path / "a", nano_model_dir, rows, train={"micro_batch_size": 4, "grad_accum": 1})
    b = recipe(tmp_path / "b", nano_model_dir, rows, train={"micro_batch_size": 2, "grad_accum": 2})
    run_sft(load_config(SFTConfig, a))
    run_sft(load_config(SFTConfig, b))
    la, lb = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert len(la) == len(lb) == 8
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    assert la[-1] < la[0]  # it learns


def test_packed_rows_give_the_unpacked_loss(tokenizer, nano_model_dir):
    from transformers import AutoModelForCausalLM

    from alignment.losses import sft_loss

    model = AutoModelForCausalLM.from_pretrained(nano_model_dir)
    examples, _ = encode_dialogs(tokenizer, make_dialogs(6), 128)
    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        packed = collate(examples, [[0, 1, 2], [3, 4, 5]], tokenizer.pad_token_id)
        unpacked = collate(examples, [[i] for i in range(6)], tokenizer.pad_token_id)
        lp, mp = sft_loss(model(**attention_inputs(packed, impl)).logits, packed["labels"])
        lu, mu = sft_loss(model(**attention_inputs(unpacked, impl)).logits, unpacked["labels"])
        assert int(mp["num_tokens"]) == int(mu["num_tokens"])
        assert lp.item() == pytest.approx(lu.item(), abs=1e-5), impl


def test_balanced_packing_places_every_example_once_within_the_row_length():
    import random

    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 30))]
        order = rng.sample(range(len(lengths)), len(lengths))
        min_rows = rng.randint(1, 3)
        rows = pack_balanced(lengths, order, 64, min_rows=min_rows)
        assert sorted(i for row in rows for i in row) == sorted(order)
        assert all(row and sum(lengths[i] for i in row) <= 64 for row in rows)
        assert len(rows) >= min(min_rows, len(order))
    # a step's dialogs: first fit leaves a short last row that the micro-batch pads to full width
    lengths = [170, 120, 80, 80, 60, 60, 50, 40, 40, 30, 30, 20]
    width = lambda rows: len(rows) * max(sum(lengths[i] for i in row) for row in rows)  # noqa: E731
    assert width(pack_balanced(lengths, list(range(12)), 256)) < width(pack(lengths, list(range(12)), 256))


def test_hand_computed_loss_on_two_examples(tokenizer, nano_model_dir):
    """The stage's loss equals -mean log softmax over answer tokens computed one token at a time."""
    from transformers import AutoModelForCausalLM

    from alignment.finetune import lm_step_fn

    model = AutoModelForCausalLM.from_pretrained(nano_model_dir)
    examples, _ = encode_dialogs(tokenizer, make_dialogs(2), 128)
    nll, count = 0.0, 0
    for ex in examples:
        logits = model(torch.tensor([ex["input_ids"]])).logits[0]
        for t in range(1, len(ex["input_ids"])):
            if ex["labels"][t] != IGNORE_INDEX:
                nll -= torch.log_softmax(logits[t - 1], -1)[ex["labels"][t]].item()
                count += 1
    loss, metrics = lm_step_fn(examples, tokenizer.pad_token_id, "sdpa")(model, [[0, 1]], count)
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)
    assert metrics["loss_sum"].item() == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("model_dir", ["nano_model_dir", "smollm2_random_dir"])
def test_the_answer_only_head_gives_the_full_logits_loss_and_gradients(request, model_dir):
    """On a Llama, the step's loss comes from the answer positions only (`chunked_sft_loss` inside the LM
    head, no [tokens, V] logits): the same loss and gradients as `sft_loss` on the full logits."""
    from transformers import AutoModelForCausalLM

    from alignment.finetune import answer_only_head, lm_step_fn
    from alignment.losses import sft_loss
    from alignment.models.tokenizer import load_tokenizer

    path = request.getfixturevalue(model_dir)
    tokenizer = load_tokenizer(path, template="model" if model_dir == "smollm2_random_dir" else None)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    assert answer_only_head(model) is model.lm_head
    examples, _ = encode_dialogs(tokenizer, make_dialogs(6), 128)
    rows = pack_balanced([len(e["input_ids"]) for e in examples], list(range(6)), 128)
    batch = collate(examples, rows, tokenizer.pad_token_id)
    full, _ = sft_loss(model(**attention_inputs(batch, "sdpa")).logits, batch["labels"], num_items=40)
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain, _ = lm_step_fn(examples, tokenizer.pad_token_id, "sdpa")(model, rows, 40)  # train.answer_only_loss off
    assert plain.item() == full.item()  # the very same computation: bitwise
    loss, _ = lm_step_fn(examples, tokenizer.pad_token_id, "sdpa", answer_only_loss=True)(model, rows, 40)
    loss.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(model.lm_head)  # the head is itself again after the step


def test_a_lora_head_keeps_the_full_logits(nano_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.finetune import answer_only_head

    model = AutoModelForCausalLM.from_pretrained(nano_model_dir)
    attention_only = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert answer_only_head(attention_only) is model.lm_head
    model = AutoModelForCausalLM.from_pretrained(nano_model_dir)
    with_head = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert answer_only_head(with_head) is None


def _run_cli(recipe_path, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "alignment.cli", "sft", "--recipe", str(recipe_path), *extra],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def test_killed_run_resumes_with_identical_losses(tmp_path, nano_model_dir):
    rows = make_dialogs(48)
    full = recipe(tmp_path / "full", nano_model_dir, rows, train={"packing": True, "micro_batch_size": 2})
    run_sft(load_config(SFTConfig, full))
    reference = losses(tmp_path / "full" / "run")

    part = recipe(tmp_path / "part", nano_model_dir, rows, train={"packing": True, "micro_batch_size": 2},
                  output={"save_every_steps": 2})
    # stop the run right after its step-4 checkpoint, as a kill would, then resume it from the CLI
    import os
    env = {**os.environ, "ALIGN_STOP_AFTER_STEP": "4"}
    killed = _run_cli(part, env=env)
    assert killed.returncode != 0, killed.stderr[-2000:]
    run_dir = tmp_path / "part" / "run"
    assert not (run_dir / "done.json").exists()
    assert [m["step"] for m in read_metrics(run_dir)][-1] >= 4
    resumed = _run_cli(part)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert losses(run_dir) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, len(reference) + 1))


def test_bad_data_fails_before_training_and_keeps_the_run(tmp_path, nano_model_dir):
    good = recipe(tmp_path, nano_model_dir, make_dialogs(16))
    run_sft(load_config(SFTConfig, good))
    run_dir = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}

    bad_rows = make_dialogs(16)
    bad_rows[6]["messages"][1]["role"] = "user"
    del bad_rows[9]["messages"]
    write_jsonl(tmp_path / "train.jsonl", bad_rows)
    result = _run_cli(good, "--set", "optim.lr=2e-3")
    assert result.returncode == 2
    assert "train.jsonl:7: messages[1].role" in result.stderr
    assert "train.jsonl:10: messages" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_finished_run_with_another_config_is_not_overwritten(tmp_path, nano_model_dir):
    path = recipe(tmp_path, nano_model_dir, make_dialogs(16))
    run_sft(load_config(SFTConfig, path))
    result = _run_cli(path, "--set", "optim.lr=5e-4")
    assert result.returncode != 0
    assert "holds a run with another config" in result.stderr
    again = _run_cli(path)  # the same config: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.parametrize("merge", [True, False])
def test_lora_with_gradient_checkpointing_saves_merged_or_adapters(tmp_path, nano_model_dir, merge):
    from transformers import AutoModelForCausalLM

    path = recipe(tmp_path, nano_model_dir, make_dialogs(16),
                  model={"gradient_checkpointing": True,
                         "lora": {"enabled": True, "r": 4, "alpha": 8, "merge_on_save": merge}})
    run_sft(load_config(SFTConfig, path))
    final = tmp_path / "run" / "final"
    if merge:
        assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(final)
        base = AutoModelForCausalLM.from_pretrained(nano_model_dir)
        changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
        assert changed and all(("proj" in k) for k in changed)  # only LoRA target weights moved
    else:
        assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()


def test_a_lora_run_is_the_same_run_to_run(tmp_path, nano_model_dir):
    """The adapters' random initialisation is part of the run's seed: two runs of one LoRA recipe, with the
    global RNG left in different states before them, log the same losses and save the same adapters (the real
    model's LoRA runs differed from step 1 before the seed was set ahead of get_peft_model)."""
    from safetensors.torch import load_file

    path = recipe(tmp_path, nano_model_dir, make_dialogs(16),
                  model={"lora": {"enabled": True, "r": 4, "alpha": 8, "merge_on_save": False}},
                  logging={"every_steps": 1, "progress": False, "tensorboard": False})
    saved = []
    for i in (1, 2):
        torch.manual_seed(1000 + i)  # whatever ran before in the process
        run_sft(load_config(SFTConfig, path, [f"output.dir={tmp_path / f'run{i}'}"]))
        saved.append(load_file(tmp_path / f"run{i}" / "final" / "adapter_model.safetensors"))
    assert losses(tmp_path / "run1") == losses(tmp_path / "run2")
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    grads = [[m["grad_norm"] for m in read_metrics(tmp_path / f"run{i}")] for i in (1, 2)]
    assert grads[0] == grads[1]
