"""Defects met on real data (issue 22, item 4), each caught: silent truncation, the toy tokenizer on real text,
a missing model, a Git LFS pointer, an unknown source, UltraFeedback-binarized and SHP scales, `data stats --set`,
`data validate --source`."""
import json
from pathlib import Path

import pytest
from conftest import make_dialogs, write_jsonl

from alignment.batching import format_truncation, truncation_counts
from alignment.chat import encode, encode_prompt
from alignment.cli import main
from alignment.config import DataSource
from alignment.data.schemas import DataValidationError, pair_context, prompt_context
from alignment.data.stats import run_stats
from alignment.scoring import encode_for_reward

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "tests" / "fixtures" / "upstream"
HH = UP / "hh-rlhf" / "harmless-base" / "train.jsonl"
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


def hh_pairs() -> list[dict]:
    from alignment.data.sources import load_source

    return load_source(DataSource(path=str(HH), source="hh_rlhf"), "preference_pair")


# ---------------------------------------------------------------------------------- 1. truncation counted
def test_truncation_counts_and_line():
    counts = truncation_counts([3, 8, 9, 8, 20], 8)
    assert counts == {"rows": 5, "truncated": 2, "max_length": 8}
    assert format_truncation("rm pairs", counts) == (
        "[data] rm pairs: 2 of 5 rows longer than max_length=8, truncated from the left")


def test_sft_and_rm_encodings_count_the_rows_they_cut(tokenizer):
    from alignment.finetune import encode_and_count_dialogs, encode_dialogs
    from alignment.stages.reward_model import encode_and_count_pairs, encode_pairs

    dialogs = make_dialogs(24)
    full = [len(encode(tokenizer, d["messages"])["input_ids"]) for d in dialogs]
    limit = sorted(full)[len(full) // 2]  # about half the dialogs are longer
    examples, counts = encode_and_count_dialogs(tokenizer, dialogs, limit)
    assert counts["truncated"] == sum(n > limit for n in full) > 0
    assert counts["rows"] == 24 and examples == encode_dialogs(tokenizer, dialogs, limit)[0]

    pairs = hh_pairs()
    longest = [max(len(encode_for_reward(tokenizer, pair_context(p), p[s], 10 ** 6)) for s in ("chosen", "rejected"))
               for p in pairs]
    limit = sorted(longest)[len(longest) // 2]
    examples, counts = encode_and_count_pairs(tokenizer, pairs, limit, "none")
    assert counts == {"rows": len(pairs), "truncated": sum(n > limit for n in longest), "max_length": limit}
    assert counts["truncated"] > 0
    assert examples == encode_pairs(tokenizer, pairs, limit, "none")  # the same ids as before the count
    assert max(len(e["chosen"]) for e in examples) == limit


def test_ppo_counts_prompts_longer_than_the_rm_input(tokenizer):
    from alignment.data.adapters.build import prompts_from_pairs
    from alignment.stages.ppo import prompt_truncation

    prompts = prompts_from_pairs(hh_pairs())
    lengths = [len(encode_prompt(tokenizer, prompt_context(r))) for r in prompts]
    limit = sorted(lengths)[len(lengths) // 2]
    assert prompt_truncation(tokenizer, prompts, limit) == truncation_counts(lengths, limit)
    assert 0 < truncation_counts(lengths, limit)["truncated"] < len(prompts)


def sft_recipe(tmp_path: Path, model: str, train: Path, max_length: int = 512) -> Path:
    recipe = {"model": {"path": model, "dtype": "float32"}, "data": {"train": [{"path": str(train)}]},
              "train": {"max_length": max_length, "max_steps": 1, "micro_batch_size": 4},
              "eval": {"max_prompts": 0}, "logging": {"progress": False},
              "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "sft.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_sft_run_prints_and_records_its_truncated_dialogs(tmp_path, nano_model_dir, tokenizer, capsys):
    from alignment.config import SFTConfig, load_config
    from alignment.stages.sft import run_sft

    dialogs = make_dialogs(12)
    full = [len(encode(tokenizer, d["messages"])["input_ids"]) for d in dialogs]
    limit = sorted(full)[len(full) // 2]
    cut = sum(n > limit for n in full)
    train = write_jsonl(tmp_path / "train.jsonl", dialogs)
    summary = run_sft(load_config(SFTConfig, sft_recipe(tmp_path, str(nano_model_dir), train, limit)))
    out = capsys.readouterr().out
    assert f"[data] sft dialogs: {cut} of 12 rows longer than max_length={limit}, truncated from the right" in out
    assert summary["truncation"]["truncated"] == cut
    assert json.loads((tmp_path / "run" / "done.json").read_text())["truncation"]["truncated"] == cut


def test_data_stats_reports_rows_over_max_length(tokenizer_dir, tokenizer, capsys):
    pairs = hh_pairs()
    longest = [max(len(encode_for_reward(tokenizer, pair_context(p), p[s], 10 ** 6)) for s in ("chosen", "rejected"))
               for p in pairs]
    limit = sorted(longest)[len(longest) // 2]
    expected = sum(n > limit for n in longest)
    assert main(["data", "stats", "--source", "hh_rlhf", str(HH), "--tokenizer", str(tokenizer_dir),
                 "--max-length", str(limit)]) == 0
    assert f"over max_length={limit}: {expected} of {len(pairs)} rows" in capsys.readouterr().out
    result = run_stats([str(HH)], source="hh_rlhf", tokenizer=str(tokenizer_dir), max_length=limit)
    assert next(iter(result["sections"].values()))["over_max_length"]["truncated"] == expected
    assert main(["data", "stats", "--source", "hh_rlhf", str(HH), "--max-length", "8"]) == 2
    assert "--max-length counts tokens: give --tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- 2. toy tokenizer, real text
@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
    from alignment.data.toyworld import pretrain_corpus
    from alignment.models.tokenizer import train_tokenizer

    return train_tokenizer(pretrain_corpus(0, 2000), 2048, tmp_path_factory.mktemp("toy_tokenizer"))


def test_toy_tokenizer_warns_on_real_text_only(toy_tokenizer, tokenizer_dir):
    from alignment.data.toyworld import pretrain_corpus
    from alignment.models.tokenizer import is_toy_tokenizer, load_tokenizer, toy_tokenizer_warning

    real = [p[s] for p in hh_pairs() for s in ("chosen", "rejected")]
    toy = pretrain_corpus(1, 200)  # other documents than the tokenizer saw
    assert is_toy_tokenizer(toy_tokenizer)
    assert toy_tokenizer_warning(toy_tokenizer, toy) is None
    warning = toy_tokenizer_warning(toy_tokenizer, real)
    assert warning is not None and "not toy-world data" in warning and "\n" not in warning
    other = load_tokenizer(tokenizer_dir)  # a tokenizer with a ChatML-like special token is not the toy one
    other.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    assert not is_toy_tokenizer(other) and toy_tokenizer_warning(other, real) is None


# ---------------------------------------------------------------------------------- 3. missing model.path
def test_missing_model_path_fails_in_one_line_before_the_data(tmp_path, capsys):
    bad_data = tmp_path / "train.jsonl"
    bad_data.write_text("not json\n")  # read first, this would be a data error
    missing = tmp_path / "no-such-model"
    assert main(["sft", "--recipe", str(sft_recipe(tmp_path, str(missing), bad_data))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"align sft: error: model.path: {missing} does not exist (neither a local directory nor a hub "
                   "id in the local Hugging Face cache)")
    rm = tmp_path / "rm.yaml"
    rm.write_text(json.dumps({"model": {"path": "runs/no-such/final"}, "data": {"primary": [{"path": str(bad_data)}]},
                              "output": {"dir": str(tmp_path / "rm")}}))
    assert main(["rm", "--recipe", str(rm)]) == 2
    assert "model.path: runs/no-such/final does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- 4. Git LFS pointer
def test_git_lfs_pointer_is_named_as_one(tmp_path, capsys):
    from alignment.data.io import load_records

    native = tmp_path / "sft.jsonl"
    native.write_text(LFS_POINTER)
    with pytest.raises(DataValidationError, match="a Git LFS pointer, not the data: run git lfs pull"):
        load_records(native, "sft_dialog")
    upstream = tmp_path / "harmless-base" / "train.jsonl.gz"  # a pointer left where the compressed file should be
    upstream.parent.mkdir()
    upstream.write_text(LFS_POINTER)
    assert main(["data", "stats", "--source", "hh_rlhf", str(upstream)]) == 2
    err = capsys.readouterr().err
    assert f"{upstream}: <file>: a Git LFS pointer, not the data: run git lfs pull" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------- 5. unknown --source
def test_unknown_source_is_a_one_line_error_listing_the_sources(capsys):
    from alignment.data.adapters import ADAPTERS

    assert main(["data", "stats", "--source", "hh-rlhf", str(HH)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data source 'hh-rlhf' is unknown; known sources: native, " in err
    assert all(name in err for name in ADAPTERS)


# ---------------------------------------------------------------------------------- 6-7. score scales
def test_ultrafeedback_binarized_thresholds_are_on_its_1_to_10_scale():
    from alignment.config import RatingThresholds
    from alignment.data.adapters import ADAPTERS

    assert ADAPTERS["ultrafeedback_binarized"].thresholds == RatingThresholds(4.0, 2.0, 1.0)
    assert ADAPTERS["ultrafeedback"].thresholds == RatingThresholds(2.0, 1.0, 0.5)  # fine-grained: 1-5
    # the fixture holds 1-10 scores: gaps 6.5, 2.5, 1.5, 0.5
    assert [r["rating"] for r in _binarized()] == ["significantly_better", "better", "slightly_better",
                                                   "negligibly_better"]


def _binarized() -> list[dict]:
    from alignment.data.sources import load_source

    return load_source(DataSource(path=str(UP / "ultrafeedback_binarized"), source="ultrafeedback_binarized",
                                  split="train_prefs"), "preference_pair")


def test_shp_docs_say_score_ratio_at_least_one_and_the_adapter_agrees(tmp_path):
    from alignment.data.adapters import shp
    from alignment.data.sources import load_source

    readme = (REPO / "README.md").read_text()
    assert "always >= 2" not in readme and "SHP's `score_ratio`, always >= 1" in readme
    assert "ratio >= 2" not in shp.__doc__ and "`score_ratio` is >= 1" in shp.__doc__
    row = {"post_id": "p", "domain": "askscience_train", "history": "Why is the sky blue?", "labels": 1,
           "human_ref_A": "Rayleigh scattering.", "human_ref_B": "It reflects the sea.", "score_A": 3,
           "score_B": 2, "score_ratio": 1.5}
    path = write_jsonl(tmp_path / "askscience" / "train.json", [row])
    [pair] = load_source(DataSource(path=str(path), source="shp"), "preference_pair")
    assert pair["rating"] == "negligibly_better"  # a ratio of 1.5 is a real, weak preference


# ---------------------------------------------------------------------------------- 8. data stats --set
def test_data_stats_recipe_takes_strict_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = "recipes/tiny/rm_fixture_mix.yaml"
    assert main(["data", "stats", "--recipe", recipe, "--set", "data.dedup_test_prompts=false"]) == 0
    out = capsys.readouterr().out
    assert "== mix equal: 14 primary" in out and "dropped for a prompt in a test set" not in out
    assert main(["data", "stats", "--recipe", recipe, "--set", "data.dedup_test_prompt=false"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'dedup_test_prompt'" in err and "dedup_test_prompts" in err
    assert main(["data", "stats", str(HH), "--source", "hh_rlhf", "--set", "seed=1"]) == 2
    assert "--set overrides a recipe's values: give --recipe" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- 9. data validate --source
def test_data_validate_reads_an_upstream_file_through_its_adapter(tmp_path, capsys):
    assert main(["data", "validate", "--source", "hh_rlhf", str(HH)]) == 0
    assert f"{HH}: {len(hh_pairs())} rows pass preference_pair through the hh_rlhf adapter" in capsys.readouterr().out
    assert main(["data", "validate", "--source", "hh_rlhf", "--schema", "rl_prompt", str(HH)]) == 0
    bad = write_jsonl(tmp_path / "train.jsonl", [json.loads(HH.read_text().splitlines()[0]),
                                                         {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello."}])
    assert main(["data", "validate", "--source", "hh_rlhf_harmless", str(bad)]) == 2
    assert f"{bad}:2: rejected: required field missing" in capsys.readouterr().err
    assert main(["data", "validate", str(bad)]) == 2
    assert "--schema is required for a native file" in capsys.readouterr().err
