"""One optimizer step (one PPO iteration, one rejection-sampling round) of every stage that trains or samples, on a
randomly initialised LlamaForCausalLM with SmolLM2-135M's config and tokenizer (49,152 tokens, BOS/EOS/pad 1/2/2,
tied embeddings, ChatML template), through each stage's run function and a recipe loaded by the strict loader.

The stages chain as the pipeline does: SFT (ChatML, LoRA) -> RM from it -> collect, rejection sampling, PPO, GAtt,
safety distillation and eval on that policy and RM. `pretrain` is left out: it trains the toy world's own
tokenizer and a tiny Llama from scratch (TinyModelSection), which is no step of a real pretrained model.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml

from alignment.chat import IGNORE_INDEX, TEMPLATE_FILE, encode
from alignment.config import load_config
from alignment.data import toyworld
from alignment.runs import read_metrics

from conftest import SMOLLM2_DIR, write_jsonl

VOCAB = 49152
LOGGING = {"every_steps": 1, "progress": False, "tensorboard": False}
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
TIMES: dict[str, float] = {}  # each stage's wall time, printed at the end of the module (pytest -s)

DIALOGS = [
    {"id": "d0", "messages": [{"role": "system", "content": "Answer in few words."},
                              {"role": "user", "content": "What is two plus three?"},
                              {"role": "assistant", "content": "Five."}]},
    {"id": "d1", "messages": [{"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue, like the sky <|im_end|>."},
                              {"role": "user", "content": "Another one?"},
                              {"role": "assistant", "content": "Red."}]},
]


def write_recipe(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def timed(name: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    TIMES[name] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module", autouse=True)
def report_times():
    yield
    print("\n[smollm2 stages] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))


def assert_smollm2_checkpoint(path: Path, template: str, kind: str = "causal-lm"):
    """The checkpoint loads with plain transformers, keeps SmolLM2's vocabulary, special ids and tied
    embeddings, and carries the chat template it was trained with."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(tok) == VOCAB and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert json.loads((path / TEMPLATE_FILE).read_text()) == {"template": template}
    if kind == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        assert model.config.tie_word_embeddings
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        assert model.config.num_labels == 1 and model.config.pad_token_id == 2
    assert model.config.vocab_size == VOCAB and model.model.embed_tokens.weight.shape[0] == VOCAB
    return model


def changed_weights(model, base_dir: Path) -> list[str]:
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    state = model.state_dict()
    return [k for k, v in base.items() if k in state and not torch.equal(state[k], v)]


# ----------------------------------------------------------------------------------------- SFT
def sft_recipe(root: Path, base: Path, template: str) -> Path:
    train = write_jsonl(root / "sft.jsonl", DIALOGS)
    return write_recipe(root / "sft.yaml", {
        "model": {"path": str(base), "lora": LORA},
        "chat": {"template": template},
        "data": {"train": [{"path": str(train)}]},
        "train": {"epochs": 1, "max_steps": 1, "micro_batch_size": 2, "max_length": 64, "packing": False},
        "optim": {"lr": 1e-2},
        "logging": LOGGING,
        "output": {"dir": str(root / "run")},
    })


def hand_sft_loss(base: Path, template: str) -> float:
    """Masked cross-entropy over both dialogs' answer tokens, one token at a time, from the start model."""
    from transformers import AutoModelForCausalLM

    from alignment.models.tokenizer import load_tokenizer

    tok = load_tokenizer(base, template)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in DIALOGS:
            ex = encode(tok, row["messages"])
            logits = model(torch.tensor([ex["input_ids"]])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            for t in range(1, len(ex["input_ids"])):
                if ex["labels"][t] != IGNORE_INDEX:
                    nll -= logp[t - 1, ex["labels"][t]].item()
                    count += 1
    return nll / count


def run_sft_stage(root: Path, base: Path, template: str) -> Path:
    from alignment.config import SFTConfig
    from alignment.stages.sft import run_sft

    timed(f"sft-{template}", run_sft, load_config(SFTConfig, sft_recipe(root, base, template)))
    return root / "run"


@pytest.fixture(scope="module")
def sft_chatml(tmp_path_factory, smollm2_random_dir) -> Path:
    return run_sft_stage(tmp_path_factory.mktemp("sft_model"), smollm2_random_dir, "model")


def test_chatml_labels_are_the_answers_and_their_end_of_turn_only(smollm2_tokenizer):
    from alignment.chat import set_template

    tok = smollm2_tokenizer
    set_template(tok, "model")
    try:
        ex = encode(tok, DIALOGS[1]["messages"])
    finally:
        set_template(tok, "llama2")
    spans, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current) if current else None
    # typed "<|im_end|>" inside an answer stays text; each trained span ends with the real end-of-turn id 2
    assert [tok.decode(s) for s in spans] == ["Blue, like the sky <|im_end|>.<|im_end|>", "Red.<|im_end|>"]
    assert all(s[-1] == 2 and s.count(2) == 1 for s in spans)


@pytest.mark.parametrize("template", ["model", "llama2"])
def test_sft_one_step(tmp_path, smollm2_random_dir, sft_chatml, template):
    run = sft_chatml if template == "model" else run_sft_stage(tmp_path, smollm2_random_dir, template)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1]
    # the logged loss is the masked cross-entropy of the start model on the same two dialogs
    assert metrics[0]["loss"] == pytest.approx(hand_sft_loss(smollm2_random_dir, template), rel=1e-4)
    model = assert_smollm2_checkpoint(run / "final", template)
    changed = changed_weights(model, smollm2_random_dir)
    assert changed and all(".self_attn." in k for k in changed)  # LoRA on q/k/v/o only
