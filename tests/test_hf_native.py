"""Saved checkpoints are HF-native for people who use them outside this project: plain AutoTokenizer's
`apply_chat_template` renders exactly our encoding (BOS included), generation_config.json starts, stops and
pads as we do, tokenizer_config.json holds no machine-local flag, `README.md` is a Hub model card, and
`align chat` refuses a reward model or a run directory in one line."""
import json
import random

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from alignment import chat
from alignment.chat_session import ChatSession
from alignment.cli import main as align_main
from alignment.config import SFTConfig, load_config
from alignment.model_card import (CARD_FILE, POLICY, REWARD_MODEL, checkpoint_kind, flat_metrics, read_front_matter,
                                  write_model_card)
from alignment.models.tiny import build_tiny_llama
from alignment.models.tokenizer import load_tokenizer
from alignment.runs import MACHINE_LOCAL_KEYS, save_pretrained_atomic, verify_dir
from alignment.stages.sft import run_sft

from conftest import SMOLLM2_DIR, make_dialogs, write_jsonl

WORDS = "the cat sat on a mat , what is two plus three ? five . sort 3 1 2 Paris ( ok ) \" yes no 42".split()


def dialogs(n: int, seed: int) -> list[list[dict]]:
    """Dialogs of 1-3 answered turns, half with a system prompt, some ending with an open user turn; contents
    carry leading/trailing spaces and newlines (the encoders strip them; so must the saved template)."""
    rng = random.Random(seed)

    def text():
        pad = lambda: rng.choice(["", " ", "\n", "  \n "])  # noqa: E731
        return pad() + " ".join(rng.choices(WORDS, k=rng.randint(1, 10))) + pad()

    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": text()}] if i % 2 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        if i % 3 == 2:
            msgs.append({"role": "user", "content": text()})
        out.append(msgs)
    return out


def ids_of(rendered) -> list[int]:
    return list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)


@pytest.mark.parametrize("source,template", [("toy", "llama2"), ("smollm2", "llama2"), ("smollm2", "model")])
def test_the_saved_chat_template_renders_our_encoding_token_for_token(tmp_path, tokenizer_dir, source, template):
    ours = load_tokenizer(tokenizer_dir if source == "toy" else SMOLLM2_DIR, template)
    save_pretrained_atomic(tmp_path / "final", tokenizer=ours)
    plain = AutoTokenizer.from_pretrained(tmp_path / "final")  # what a TRL / vLLM / HF user loads
    for msgs in dialogs(40, seed=7):
        if msgs[-1]["role"] == "assistant":
            assert ids_of(plain.apply_chat_template(msgs, tokenize=True)) == chat.encode(ours, msgs)["input_ids"], msgs
            prompt = msgs[:-1]
        else:
            prompt = msgs
        got = ids_of(plain.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
        assert got == chat.encode_prompt(ours, prompt), prompt
        assert got[0] == plain.bos_token_id  # BOS included (the chat template adds it, the tokenizer does not)
    # loaded back by us, the tokenizer encodes alike, and saving it again changes nothing
    again = load_tokenizer(tmp_path / "final")
    msgs = dialogs(3, seed=8)[0]
    assert chat.encode(again, msgs) == chat.encode(ours, msgs)
    save_pretrained_atomic(tmp_path / "again", tokenizer=again)
    assert (tmp_path / "again" / "chat_template.jinja").read_text() == (tmp_path / "final" / "chat_template.jinja").read_text()


def test_saving_leaves_the_tokenizer_object_as_it_was(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)  # no stored choice: llama2, no Jinja template in memory
    save_pretrained_atomic(tmp_path / "final", tokenizer=tok)
    assert tok.chat_template is None
    assert AutoTokenizer.from_pretrained(tmp_path / "final").chat_template == chat.LLAMA2_CHAT_TEMPLATE


def test_tokenizer_config_holds_no_machine_local_flag_and_generation_config_has_our_ids(tmp_path, tokenizer):
    save_pretrained_atomic(tmp_path / "final", build_tiny_llama(tokenizer, "nano", seed=0), tokenizer)
    config = json.loads((tmp_path / "final" / "tokenizer_config.json").read_text())
    assert not set(config) & set(MACHINE_LOCAL_KEYS) and config["bos_token"] == "<s>"
    generation = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert verify_dir(tmp_path / "final") == []


def test_a_model_template_whose_end_of_turn_is_not_eos_stops_at_both(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, "model")  # the toy tokenizer with a template closing turns on <pad>
    tok.chat_template = ("{%- for m in messages -%}{{ bos_token + m['role'] + ': ' + m['content'] + pad_token }}"
                         "{%- endfor -%}{%- if add_generation_prompt -%}{{ bos_token + 'assistant: ' }}{%- endif -%}")
    save_pretrained_atomic(tmp_path / "final", build_tiny_llama(tok, "nano", seed=0), tok)
    generation = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.pad_token_id, tok.eos_token_id]


def sft_run(tmp_path, nano_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", make_dialogs(8))
    held_out = write_jsonl(tmp_path / "eval.jsonl", make_dialogs(4, seed=1))
    raw = {"model": {"path": str(nano_model_dir)},
           "data": {"train": [{"path": str(train)}], "eval": [{"path": str(held_out)}]},
           "train": {"epochs": 1, "micro_batch_size": 4, "max_length": 128, "packing": False},
           "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
           "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run_sft(load_config(SFTConfig, tmp_path / "r.yaml"))
    return tmp_path / "run"


def test_a_finished_stage_leaves_an_hf_native_final_with_its_model_card(tmp_path, nano_model_dir, capsys):
    run = sft_run(tmp_path, nano_model_dir)
    final = run / "final"
    card = (final / CARD_FILE).read_text()
    front = read_front_matter(card)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert "sft" in front["tags"] and "reward-model" not in front["tags"]
    assert "base_model" not in front  # started from a local checkpoint without a card
    inputs = json.loads((run / "run.json").read_text())["inputs"]
    assert inputs and all(f"`{digest}`" in card for digest in inputs.values())
    assert f"`{json.loads((run / 'config.json').read_text())['hash']}`" in card
    eval_result = json.loads((run / "eval.json").read_text())
    assert flat_metrics(eval_result) and f"| {flat_metrics(eval_result)[0][0]} |" in card
    assert verify_dir(final) == []  # the card, written when the run is done, is not part of the manifest
    assert AutoTokenizer.from_pretrained(final).chat_template == chat.LLAMA2_CHAT_TEMPLATE
    assert checkpoint_kind(final) == POLICY and checkpoint_kind(run) is None
    # a run directory given as a checkpoint points at its final/, in one line
    with pytest.raises(FileNotFoundError, match=r"is a run directory; its model is in .*final"):
        ChatSession.from_checkpoint(run)
    capsys.readouterr()
    assert align_main(["chat", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(str(final))


def _run_records(run, model: dict, argv: list[str] | None = None, inputs: dict | None = None) -> None:
    """config.json and run.json as `runs.Run.prepare` writes them (the keys the card reads)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"hash": "h1", "config": {"model": model}}))
    (run / "run.json").write_text(json.dumps({"git_commit": None, "argv": argv or ["align", "sft"], "inputs": inputs or {},
                                              "started": "2026-12-03T12:00:00", "versions": {}}))


def test_a_reward_model_is_marked_and_refused_by_chat(tmp_path, nano_model_dir, tokenizer, capsys):
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(nano_model_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    final = tmp_path / "rm" / "final"
    save_pretrained_atomic(final, rm, tokenizer)
    assert not (final / "generation_config.json").exists()
    _run_records(tmp_path / "rm", {"path": "runs/demo/sft/final"}, ["align", "rm", "--recipe", "rm.yaml"],
                 {"pairs.jsonl": "ab12"})
    (tmp_path / "rm" / "eval.json").write_text(json.dumps({"test": {"accuracy": 0.75, "count": 8}}))
    card = write_model_card(final, tmp_path / "rm", "rm").read_text()
    front = read_front_matter(card)
    assert front["pipeline_tag"] == "text-classification" and "reward-model" in front["tags"]
    assert "| test.accuracy | 0.75 |" in card and "`rm.yaml`" in card and "`ab12`" in card
    assert checkpoint_kind(final) == REWARD_MODEL
    with pytest.raises(ValueError, match="is a reward model"):
        ChatSession.from_checkpoint(final)
    assert align_main(["chat", "--checkpoint", str(final)]) == 2
    assert "is a reward model" in capsys.readouterr().err


def test_base_model_and_license_follow_the_starting_checkpoints_card(tmp_path):
    start = tmp_path / "imported"
    start.mkdir()
    (start / CARD_FILE).write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: apache-2.0\n---\n")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    AutoConfig.from_pretrained(SMOLLM2_DIR).save_pretrained(run / "final")
    _run_records(run, {"path": str(start)})
    front = read_front_matter(write_model_card(run / "final", run, "sft").read_text())
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    _run_records(run, {"path": "meta-llama/Llama-2-7b-hf"})
    front = read_front_matter(write_model_card(run / "final", run, "sft").read_text())
    assert front["base_model"] == "meta-llama/Llama-2-7b-hf" and "license" not in front
    _run_records(run, {"path": "runs/demo/pretrain/final"})
    assert "base_model" not in read_front_matter(write_model_card(run / "final", run, "sft").read_text())
    _run_records(run, {"size": "tiny"})  # pretraining: no starting checkpoint, the project's licence
    front = read_front_matter(write_model_card(run / "final", run, "pretrain").read_text())
    assert "base_model" not in front and front["license"] == "apache-2.0"


def test_a_card_of_a_run_missing_a_recorded_key_raises(tmp_path):
    """config.json and run.json are ours, written before any training: a key missing from them is a bug."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    AutoConfig.from_pretrained(SMOLLM2_DIR).save_pretrained(run / "final")
    _run_records(run, {"path": "m"})
    record = json.loads((run / "run.json").read_text())
    del record["inputs"]
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(KeyError, match="inputs"):
        write_model_card(run / "final", run, "sft")
    (run / "run.json").unlink()
    with pytest.raises(FileNotFoundError):
        write_model_card(run / "final", run, "sft")
    assert not (run / "final" / CARD_FILE).exists()


def test_the_smollm2_import_card_names_its_hub_model_and_license():
    from alignment.models.gguf_import import import_card

    card = import_card("SmolLM2-135M-Instruct.Q4_1.gguf", "cafe01", 3e-6)
    front = read_front_matter(card)
    assert (front["base_model"], front["license"], front["pipeline_tag"]) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "text-generation")
    assert "| max_abs_logit_diff | 3e-06 |" in card and "`cafe01`" in card
