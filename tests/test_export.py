"""`align export`: the Hub folder (LoRA merged, no run files) and the GGUF file, read back by transformers' own
GGUF loader: the same logits and token ids as the checkpoint."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.cli import main
from alignment.models import gguf_export
from alignment.models.gguf_export import permute_rotary

from conftest import SMOLLM2_DIR, nano_reward_model

PROMPTS = ("the cat sat on the mat 12345", "<s>[INST] hello there [/INST] a short answer </s>")
RUN_FILES = {"MANIFEST.json", "COMPLETE", "state.json"}


def gguf_file(out: Path, kind: str) -> Path:
    return out.with_name(f"{out.name}-gguf") / f"model-{kind}.gguf"


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_same_model(source_dir, gguf_path: Path, prompts, atol: float):
    from transformers import AutoModelForCausalLM

    from alignment.models.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(source_dir)
    gguf_model, gguf_tokenizer = load_gguf(gguf_path)
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        assert gguf_tokenizer(prompt)["input_ids"] == ids, prompt
        torch.testing.assert_close(logits(gguf_model, ids), logits(model, ids), atol=atol, rtol=0)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert (gguf_tokenizer.bos_token_id, gguf_tokenizer.eos_token_id) == (tokenizer.bos_token_id,
                                                                          tokenizer.eos_token_id)


def test_the_rotary_permutation_is_undone_by_transformers_gguf_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    q, k = np.random.default_rng(0).normal(size=(2, 4 * 8, 32))  # 4 heads of head_dim 8; k: 2 KV heads of 16 rows
    assert np.array_equal(reader._reverse_permute_weights(permute_rotary(q, 4), 4, 4), q)
    assert np.array_equal(reader._reverse_permute_weights(permute_rotary(k, 2), 4, 2), k)
    assert not np.array_equal(permute_rotary(q, 4), q)
    # per head, the first rows are the two halves' first dimensions, interleaved
    assert np.array_equal(permute_rotary(q, 4)[:2], q[[0, 4]])


def test_export_writes_a_clean_hub_folder_and_an_f32_gguf_with_the_same_logits(tmp_path, nano_model_dir):
    out, source = tmp_path / "export", tmp_path / "final"
    shutil.copytree(nano_model_dir, source)
    (source / "README.md").write_text("# nano\n")  # a model card, carried over
    assert main(["export", "--checkpoint", str(source), "--out", str(out), "--gguf", "f32"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert not files & RUN_FILES and not any(f.endswith(".gguf") for f in files)
    assert {p.name for p in gguf_file(out, "f32").parent.iterdir()} == {"model-f32.gguf"}
    assert not list(tmp_path.glob(".tmp-*"))
    assert_same_model(out, gguf_file(out, "f32"), PROMPTS, atol=1e-5)

    from gguf import GGUFReader

    fields = GGUFReader(gguf_file(out, "f32")).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    config = json.loads((out / "config.json").read_text())
    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == config["num_hidden_layers"]
    assert value("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert value("llama.context_length") == config["max_position_embeddings"]
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt2"
    assert len(value("tokenizer.ggml.tokens")) == config["vocab_size"]


def test_an_f16_gguf_is_close_and_half_the_size(tmp_path, nano_model_dir):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(nano_model_dir), "--out", str(out), "--gguf"]) == 0
    assert_same_model(out, gguf_file(out, "f16"), PROMPTS[:1], atol=2e-3)
    f32 = gguf_export.write_gguf(tmp_path / "f32.gguf", *_plain(out), "f32")
    assert (gguf_file(out, "f16")).stat().st_size < 0.6 * f32.stat().st_size


def _plain(path):
    from transformers import AutoModelForCausalLM

    from alignment.models.tokenizer import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)


def test_lora_adapters_are_merged_into_the_exported_weights(tmp_path, nano_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(nano_model_dir).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an effect
            torch.nn.init.normal_(p, std=0.5)
    adapters = tmp_path / "adapters"
    peft_model.save_pretrained(adapters)
    tokenizer.save_pretrained(adapters)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    expected = logits(peft_model.eval(), ids)
    assert not torch.allclose(expected, logits(AutoModelForCausalLM.from_pretrained(nano_model_dir), ids))

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(adapters), "--out", str(out), "--gguf", "f32"]) == 0
    assert not (out / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_gguf(gguf_file(out, "f32"))[0], ids), expected, atol=1e-5, rtol=0)


def test_a_smollm2_tokenizer_and_model_round_trip_through_gguf(tmp_path, smollm2_tokenizer):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(SMOLLM2_DIR, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    source = tmp_path / "smollm2_small"
    LlamaForCausalLM(config).save_pretrained(source)
    smollm2_tokenizer.save_pretrained(source)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(source), "--out", str(out), "--gguf", "f32"]) == 0
    from gguf import GGUFReader

    # the fixture's tokenizer came out of SmolLM2's GGUF, where its digit split was already lost: GPT-2's split
    assert GGUFReader(gguf_file(out, "f32")).fields["tokenizer.ggml.pre"].contents() == "gpt2"
    prompts = ("What is the capital of France? 12345",
               "<|im_start|>user\nSort these numbers: 3, 1, 2<|im_end|>\n<|im_start|>assistant\n")
    assert_same_model(out, gguf_file(out, "f32"), prompts, atol=1e-5)


def test_the_pre_tokenizer_name_follows_the_split():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert gguf_export._pre_name(byte_level) == "gpt2"
    assert gguf_export._pre_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    with pytest.raises(gguf_export.GGUFExportError, match="no llama.cpp equivalent"):
        gguf_export._pre_name({"type": "Sequence", "pretokenizers": [{"type": "Metaspace"}, byte_level]})


def _error(capsys, argv) -> str:
    capsys.readouterr()  # what the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_reward_model_is_refused_in_one_line(tmp_path, nano_model_dir, tokenizer, capsys):
    rm = nano_reward_model(nano_model_dir, tokenizer, tmp_path / "rm", seed=0)
    err = _error(capsys, ["export", "--checkpoint", str(rm), "--out", str(tmp_path / "out")])
    assert "a reward model" in err and not (tmp_path / "out").exists()


def test_gguf_refuses_a_model_that_is_not_llama(tmp_path, tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    err = _error(capsys, ["export", "--checkpoint", str(source), "--out", str(tmp_path / "out"), "--gguf"])
    assert "not a Llama architecture" in err and not (tmp_path / "out").exists()


def test_a_missing_gguf_package_names_the_install_command(tmp_path, nano_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(gguf_export, "find_spec", lambda name: None)
    err = _error(capsys, ["export", "--checkpoint", str(nano_model_dir), "--out", str(tmp_path / "out"), "--gguf"])
    assert "gguf" in err and "make install-real" in err and not (tmp_path / "out").exists()


def test_a_training_state_directory_or_a_full_out_is_refused(tmp_path, nano_model_dir, capsys):
    state = tmp_path / "checkpoint-2"
    state.mkdir()
    (state / "state.json").write_text("{}")
    assert "training-state" in _error(capsys, ["export", "--checkpoint", str(state), "--out", str(tmp_path / "o")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    err = _error(capsys, ["export", "--checkpoint", str(nano_model_dir), "--out", str(tmp_path / "full")])
    assert "--overwrite" in err and (tmp_path / "full" / "keep.txt").is_file()
