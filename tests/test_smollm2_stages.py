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
import shutil
import time
from collections.abc import Iterator
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
    assert ("<|im_start|>" in tok.chat_template) == (template == "model")  # ChatML, or the Llama-2 format's
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
def sft_chatml(tmp_path_factory, smollm2_random_dir) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("sft_model")
    yield run_sft_stage(root, smollm2_random_dir, "model")
    shutil.rmtree(root, ignore_errors=True)  # ~0.5 GB of weights: not kept past this module


def test_chatml_labels_are_the_answers_and_their_end_of_turn_only():
    from alignment.models.tokenizer import load_tokenizer

    tok = load_tokenizer(SMOLLM2_DIR, "model")  # not the session's tokenizer: the random model is saved with it
    ex = encode(tok, DIALOGS[1]["messages"])
    spans, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
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


# ----------------------------------------------------------------------------------------- reward model
PAIRS = [
    {"id": "q0", "prompt": "What is two plus three?", "chosen": "Five.", "rejected": "Seven, I think.",
     "rating": "significantly_better", "kind": "helpfulness"},
    {"id": "q1", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "rating": "slightly_better",
     "kind": "helpfulness"},
]


def plain_rm_score(model, tok, prompt: str, answer: str) -> float:
    """The score plain transformers gives one unpadded (prompt, answer) in the model's own chat template."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


@pytest.fixture(scope="module")
def rm_chatml(tmp_path_factory, sft_chatml) -> Iterator[Path]:
    from alignment.config import RMConfig
    from alignment.stages.reward_model import run_rm

    root = tmp_path_factory.mktemp("rm_model")
    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    recipe = write_recipe(root / "rm.yaml", {
        "model": {"path": str(sft_chatml / "final"), "lora": LORA},
        "chat": {"template": "model"},
        "data": {"primary": [{"path": str(pairs)}], "test": {"helpful": [{"path": str(pairs)}]},
                 "dedup_test_prompts": False},
        "train": {"epochs": 1, "max_steps": 1, "micro_batch_size": 2, "max_length": 64, "packing": False},
        "optim": {"lr": 1e-2},
        "eval": {"histogram": False},
        "logging": LOGGING,
        "output": {"dir": str(root / "run")},
    })
    timed("rm", run_rm, load_config(RMConfig, recipe))
    yield root / "run"
    shutil.rmtree(root, ignore_errors=True)


def test_rm_one_step(rm_chatml, sft_chatml):
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.losses import preference_margin

    start = sft_chatml / "final"
    tok = AutoTokenizer.from_pretrained(start, local_files_only=True)
    torch.manual_seed(0)  # the run's seed: the same new scalar head
    model = AutoModelForSequenceClassification.from_pretrained(start, num_labels=1, local_files_only=True)
    model.config.pad_token_id = tok.pad_token_id
    diffs = torch.tensor([plain_rm_score(model, tok, r["prompt"], r["chosen"])
                          - plain_rm_score(model, tok, r["prompt"], r["rejected"])
                          - preference_margin(r["rating"], "small") for r in PAIRS])
    metrics = read_metrics(rm_chatml)
    assert [m["step"] for m in metrics] == [1]
    assert metrics[0]["loss"] == pytest.approx(-F.logsigmoid(diffs).mean().item(), rel=1e-4)

    final = assert_smollm2_checkpoint(rm_chatml / "final", "model", kind="seq-cls")
    assert changed_weights(final, start)  # the merged adapters moved the transformer
    # the stage's evaluation scores what plain transformers scores on the saved RM
    plain = [torch.sigmoid(torch.tensor(plain_rm_score(final, tok, r["prompt"], r[side]))).item()
             for side in ("chosen", "rejected") for r in PAIRS]
    means = json.loads((rm_chatml / "eval.json").read_text())["helpful"]["sigmoid_mean"]
    assert means["chosen"] == pytest.approx(sum(plain[:2]) / 2, abs=1e-5)
    assert means["rejected"] == pytest.approx(sum(plain[2:]) / 2, abs=1e-5)


@pytest.mark.parametrize("template", ["llama2", "model"])
def test_inference_scores_are_read_where_training_reads_them(smollm2_random_dir, template):
    """SmolLM2's pad is its EOS: HF's seq-cls pooling (last token that is not pad) would skip the answer's
    EOS that the Llama-2 format ends with; `reward_scores` must read the token `packed_scores` trains on."""
    from transformers import AutoModelForSequenceClassification

    from alignment.models.tokenizer import load_tokenizer
    from alignment.scoring import encode_for_reward, packed_scores, reward_scores

    tok = load_tokenizer(smollm2_random_dir, template)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(smollm2_random_dir, num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    contexts = [[{"role": "user", "content": r["prompt"]}] for r in PAIRS]
    answers = [r["chosen"] for r in PAIRS]
    served = reward_scores(model, tok, contexts, answers, max_length=64)
    with torch.no_grad():
        trained = packed_scores(model, [encode_for_reward(tok, c, a, 64) for c, a in zip(contexts, answers)],
                                tok.pad_token_id)
    assert served.tolist() == pytest.approx(trained.tolist(), abs=1e-4)


# ----------------------------------------------------------------------------------------- policy stages
def toy_prompts(root: Path, n: int, **kwargs) -> Path:
    return write_jsonl(root / "prompts.jsonl", toyworld.rl_prompts(0, n, **kwargs))


def judges(rm: Path) -> dict:
    return {"helpful_rm": str(rm / "final"), "safety_rm": str(rm / "final"), "max_length": 64}


def test_collect_two_answers_per_prompt(tmp_path, sft_chatml):
    from alignment.config import CollectConfig
    from alignment.data.schemas import row_problems
    from alignment.stages.collect import run_collect

    recipe = write_recipe(tmp_path / "collect.yaml", {
        "model": {"path": str(sft_chatml / "final")},
        "data": {"prompts": [{"path": str(toy_prompts(tmp_path, 3, purpose="collect"))}]},
        "generation": {"max_new_tokens": 4, "batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    })
    timed("collect", run_collect, load_config(CollectConfig, recipe))
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["answers"]) == 2 for s in samples)
    for s in samples:  # decoded text: no special token leaks into an answer
        assert not any(t in a for a in s["answers"] for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    pairs = [json.loads(line) for name in ("helpful.jsonl", "safety.jsonl")
             for line in (tmp_path / "run" / name).read_text().splitlines()]
    assert [p for r in pairs for p in row_problems(r, "preference_pair")] == []


def test_rejection_sampling_one_round(tmp_path, sft_chatml, rm_chatml):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.config import RejectionSamplingConfig
    from alignment.stages.rejection_sampling import run_rejection_sampling

    prompts = toyworld.rl_prompts(0, 2)
    recipe = write_recipe(tmp_path / "rs.yaml", {
        "model": {"path": str(sft_chatml / "final"), "lora": LORA},
        "data": {"prompts": [{"path": str(write_jsonl(tmp_path / "prompts.jsonl", prompts))}]},
        "iterations": [{"num_samples": 2, "temperature": 1.0}],
        "reward": {**judges(rm_chatml), "mode": "combined"},
        "generation": {"max_new_tokens": 4, "batch_size": 8, "backend": "hf"},
        "train": {"epochs": 1, "max_steps": 1, "micro_batch_size": 2, "max_length": 64, "packing": False},
        "optim": {"lr": 1e-2},
        "logging": LOGGING,
        "output": {"dir": str(tmp_path / "run")},
    })
    timed("rejection-sampling", run_rejection_sampling, load_config(RejectionSamplingConfig, recipe))
    it = tmp_path / "run" / "iterations" / "v1"
    records = [json.loads(line) for shard in sorted((it / "samples").glob("shard-*.jsonl"))
               for line in shard.read_text().splitlines()]
    assert len(records) == 4
    kept = [json.loads(line) for line in (it / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 2
    # the recorded helpfulness score of each sample is plain transformers' score on the saved RM
    rm_tok = AutoTokenizer.from_pretrained(rm_chatml / "final", local_files_only=True)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_chatml / "final", local_files_only=True)
    text = {r["id"]: r["prompt"] for r in prompts}
    for r in records[:2]:
        assert r["helpful_raw"] == pytest.approx(plain_rm_score(rm, rm_tok, text[r["prompt_id"]], r["text"]),
                                                 abs=1e-4)
    loss = read_metrics(it)[0]["loss"]
    assert math.isfinite(loss) and 0 < loss < 20
    model = assert_smollm2_checkpoint(it / "final", "model")
    assert changed_weights(model, sft_chatml / "final")


def test_ppo_one_iteration(tmp_path, sft_chatml, rm_chatml):
    from alignment.config import PPOConfig
    from alignment.stages.ppo import run_ppo

    recipe = write_recipe(tmp_path / "ppo.yaml", {
        "model": {"path": str(sft_chatml / "final"), "lora": LORA},
        "reward": {**judges(rm_chatml), "kl_beta": 0.05},
        "data": {"prompts": [{"path": str(toy_prompts(tmp_path, 2))}]},
        "rollout": {"max_new_tokens": 4, "batch_size": 8},
        "ppo": {"iterations": 1, "batch_size": 2, "mini_batch_size": 2, "micro_batch_size": 2},
        "early_stopping": {"every_iterations": 0},
        "optim": {"lr": 1e-2},
        "logging": LOGGING,
        "output": {"dir": str(tmp_path / "run")},
    })
    timed("ppo", run_ppo, load_config(PPOConfig, recipe))
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 1
    assert all(math.isfinite(metrics[0][k]) for k in ("policy_loss", "value_loss"))
    model = assert_smollm2_checkpoint(tmp_path / "run" / "final", "model")
    assert changed_weights(model, sft_chatml / "final")


def test_gatt_one_step(tmp_path, sft_chatml):
    from alignment.config import GAttConfig
    from alignment.stages.gatt import run_gatt

    recipe = write_recipe(tmp_path / "gatt.yaml", {
        "model": {"path": str(sft_chatml / "final"), "lora": LORA},
        "data": {"instructions": [{"path": str(write_jsonl(tmp_path / "i.jsonl", toyworld.gatt_instructions(0, 2)))}],
                 "prompts": [{"path": str(toy_prompts(tmp_path, 4))}]},
        # a random model never obeys: its breaking answers are rewritten to obey
        "sampling": {"num_dialogs": 2, "min_turns": 1, "max_turns": 2, "answers": "rewrite", "max_new_tokens": 4,
                     "batch_size": 8},
        "eval": {"enabled": False},
        "train": {"epochs": 1, "max_steps": 1, "micro_batch_size": 2, "max_length": 64, "packing": False},
        "optim": {"lr": 1e-2},
        "logging": LOGGING,
        "output": {"dir": str(tmp_path / "run")},
    })
    timed("gatt", run_gatt, load_config(GAttConfig, recipe))
    rows = [json.loads(line) for line in (tmp_path / "run" / "dialogs.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][0]["role"] == "system" for r in rows)
    loss = read_metrics(tmp_path / "run")[0]["loss"]
    assert math.isfinite(loss) and 0 < loss < 20
    model = assert_smollm2_checkpoint(tmp_path / "run" / "final", "model")
    assert changed_weights(model, sft_chatml / "final")


def test_safety_distill_one_step(tmp_path, sft_chatml, rm_chatml):
    from alignment.config import SafetyDistillConfig
    from alignment.stages.safety_distill import run_safety_distill

    adversarial = [r for r in toyworld.rl_prompts(0, 30) if toyworld.prompt_kind(r["prompt"]) == "adversarial"][:2]
    recipe = write_recipe(tmp_path / "sd.yaml", {
        "model": {"path": str(sft_chatml / "final"), "lora": LORA},
        "data": {"prompts": [{"path": str(write_jsonl(tmp_path / "prompts.jsonl", adversarial))}]},
        # a random RM prefers either answer by chance: keep every distilled answer, so the step always runs
        "judge": {"safety_rm": str(rm_chatml / "final"), "max_length": 64, "min_gain": -1.0},
        "generation": {"max_new_tokens": 4, "batch_size": 8},
        "train": {"epochs": 1, "max_steps": 1, "micro_batch_size": 2, "max_length": 64, "packing": False},
        "optim": {"lr": 1e-2},
        "logging": LOGGING,
        "output": {"dir": str(tmp_path / "run")},
    })
    timed("safety-distill", run_safety_distill, load_config(SafetyDistillConfig, recipe))
    kept = [json.loads(line) for line in (tmp_path / "run" / "kept.jsonl").read_text().splitlines()]
    assert [k["messages"][0]["content"] for k in kept] == [r["prompt"] for r in adversarial]  # no preprompt
    loss = read_metrics(tmp_path / "run")[0]["loss"]
    assert math.isfinite(loss) and 0 < loss < 20
    model = assert_smollm2_checkpoint(tmp_path / "run" / "final", "model")
    assert changed_weights(model, sft_chatml / "final")


def test_eval_one_checkpoint(tmp_path, sft_chatml, rm_chatml):
    from alignment.config import EvalConfig
    from alignment.stages.evaluation import run_eval

    files = {kind: [{"path": str(write_jsonl(tmp_path / f"{kind}.jsonl", toyworld.eval_prompts(0, 2, kind)))}]
             for kind in ("helpful", "adversarial")}
    recipe = write_recipe(tmp_path / "eval.yaml", {
        "prompts": files,
        "checkpoints": [f"sft={sft_chatml / 'final'}"],
        "judges": judges(rm_chatml),
        "generation": {"max_new_tokens": 4, "batch_size": 8},
        "gatt": {"instructions": [{"path": str(write_jsonl(tmp_path / "i.jsonl", toyworld.gatt_instructions(0, 1)))}],
                 "turns": [1, 2], "max_new_tokens": 4, "max_instructions": 1},
        "output": {"dir": str(tmp_path / "out")},
    })
    timed("eval", run_eval, load_config(EvalConfig, recipe))
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    (entry,) = result["checkpoints"]
    assert entry["name"] == "sft" and entry["num_prompts"] == 4
    assert set(entry["gatt"]["instructions"]) == {"1", "2"}
    # each answer's helpfulness-RM score is the sigmoid of plain transformers' score on the saved RM
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_tok = AutoTokenizer.from_pretrained(rm_chatml / "final", local_files_only=True)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_chatml / "final", local_files_only=True)
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers" / "sft.jsonl").read_text().splitlines()]
    plain = [torch.sigmoid(torch.tensor(plain_rm_score(rm, rm_tok, a["prompt"], a["answer"]))).item() for a in answers]
    assert [a["helpful_rm"] for a in answers] == pytest.approx(plain, abs=1e-5)
    assert entry["helpful_rm"] == pytest.approx(sum(plain) / len(plain), abs=1e-5)
