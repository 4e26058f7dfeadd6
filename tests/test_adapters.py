"""Public-data adapters (alignment.data.adapters) on handwritten fixtures in the exact upstream formats
(tests/fixtures/upstream): every output row passes its schema, the odd cases are dropped for the stated
reason, labels, categories and rating buckets are the ones worked out by hand from the fixture rows."""
import gzip
import json
import lzma
import shutil
from pathlib import Path

import pytest

from alignment.config import ConfigError, DataSource, RatingThresholds, from_dict
from alignment.data.adapters import ADAPTERS
from alignment.data.adapters.anthropic_hh import parse_transcript
from alignment.data.adapters.build import rating_bucket
from alignment.data.schemas import DataValidationError, row_problems
from alignment.data.sources import load_source

UP = Path(__file__).resolve().parent / "fixtures" / "upstream"
T = RatingThresholds(significantly_better=2.0, better=1.0, slightly_better=0.5)


def load(source: str, path: Path, split: str | None = None, schema: str = "preference_pair", thresholds=None):
    report: list[dict] = []
    rows = load_source(DataSource(path=str(path), source=source, split=split, thresholds=thresholds), schema, report)
    for row in rows:  # every adapter's output passes the schema (load_source validated it; say so here too)
        assert row_problems(row, schema) == [], row
    dropped: dict[str, int] = {}
    for entry in report:
        for reason, n in entry["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    return rows, dropped


def rows_no(rows: list[dict]) -> list[int]:
    """Upstream row numbers, read back from the ids (`<adapter>/<file>/<row>[-suffix]`)."""
    return [int(r["id"].rsplit("/", 1)[1].split("-")[0]) for r in rows]


# ----------------------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("strength, floor, want", [
    (None, 0.0, "unsure"), (float("nan"), 0.0, "unsure"), (0.0, 0.0, "unsure"), (-1.0, 0.0, "unsure"),
    (0.25, 0.0, "negligibly_better"), (0.5, 0.0, "slightly_better"), (0.99, 0.0, "slightly_better"),
    (1.0, 0.0, "better"), (2.0, 0.0, "significantly_better"), (9.0, 0.0, "significantly_better"),
    (1.0, 1.0, "unsure"), (1.2, 1.0, "better"),  # a ratio: 1 is no preference
])
def test_rating_bucket_follows_the_thresholds(strength, floor, want):
    assert rating_bucket(strength, T, floor=floor) == want


def test_thresholds_must_be_ordered_and_positive():
    with pytest.raises(ConfigError, match=r"thresholds: .*significantly_better >= better >= slightly_better > 0"):
        from_dict(DataSource, {"path": "x", "source": "shp", "thresholds": {"significantly_better": 1,
                                                                            "better": 2, "slightly_better": 0.5}})
    with pytest.raises(ConfigError, match="slightly_better > 0"):
        RatingThresholds(significantly_better=1, better=1, slightly_better=0)


def test_hh_transcript_markers_inside_text_stay_text():
    turns = parse_transcript("\n\nHuman: log says\n\nHuman: hi\n\nok?\n\nAssistant: two handlers.\n\nAssistant: more")
    assert turns == [("user", "log says\n\nHuman: hi\n\nok?"), ("assistant", "two handlers.\n\nAssistant: more")]
    assert parse_transcript("\n\nHuman: a\n\nAssistant:") == [("user", "a"), ("assistant", "")]


def test_every_adapter_is_listed_with_the_schemas_it_gives():
    assert set(ADAPTERS) == {"hh_rlhf", "hh_rlhf_helpful", "hh_rlhf_harmless", "pku_saferlhf_helpful",
                             "pku_saferlhf_safety", "beavertails", "oasst1", "ultrafeedback",
                             "ultrafeedback_binarized", "shp", "chat_jsonl", "pairs_jsonl"}
    assert ADAPTERS["oasst1"].schemas == ("sft_dialog", "preference_pair", "rl_prompt")
    assert ADAPTERS["chat_jsonl"].schemas == ("sft_dialog",)


# ----------------------------------------------------------------------------------------------- HH-RLHF
def test_hh_rlhf_helpful_pairs_and_odd_cases():
    rows, dropped = load("hh_rlhf", UP / "hh-rlhf/helpful-base", "train")
    assert rows_no(rows) == [1, 2, 3, 8, 9]
    assert dropped == {"empty answer": 1, "identical answers": 1, "empty turn in the context": 1,
                       "transcripts differ before the last answer": 1}
    assert {r["kind"] for r in rows} == {"helpfulness"} and {r["rating"] for r in rows} == {"unsure"}
    assert rows[0]["prompt"] == "What is the capital of France?"
    assert rows[0]["chosen"] == "The capital of France is Paris." and rows[0]["source"] == "hh-rlhf/helpful-base"
    assert rows[1]["context"] == [
        {"role": "user", "content": "Can you help me plan a picnic?"},
        {"role": "assistant", "content": "Sure! Where and when is it?"},
        {"role": "user", "content": "Saturday in the park, for four people."}]
    assert rows[1]["rejected"] == "Picnics are fun."
    assert rows[2]["prompt"] == "My chat log shows this line:\n\nHuman: hello there\n\nWhy is it printed twice?"
    assert rows[3]["chosen"] == "User: Hi.\nAssistant: Hello, how can I help?"


def test_hh_rlhf_subset_sets_the_kind_and_a_compressed_copy_reads_the_same(tmp_path):
    harmless, dropped = load("hh_rlhf", UP / "hh-rlhf/harmless-base", "train")
    assert rows_no(harmless) == [1, 2, 3, 4, 5] and dropped == {"empty answer": 1}
    assert {r["kind"] for r in harmless} == {"safety"} and all("category" not in r for r in harmless)
    # the published files are .jsonl.gz; a whole-repo path with a split reads every subset
    for subset in ("helpful-base", "harmless-base"):
        (tmp_path / "hh-rlhf" / subset).mkdir(parents=True)
        raw = (UP / "hh-rlhf" / subset / "train.jsonl").read_bytes()
        (tmp_path / "hh-rlhf" / subset / "train.jsonl.gz").write_bytes(gzip.compress(raw))
    both, _ = load("hh_rlhf", tmp_path / "hh-rlhf", "train")
    helpful, _ = load("hh_rlhf", UP / "hh-rlhf/helpful-base", "train")
    assert [(r["kind"], r["chosen"]) for r in both] == [(r["kind"], r["chosen"]) for r in harmless + helpful]
    # a file outside any subset directory needs the explicit source
    alone = tmp_path / "pairs.jsonl"
    shutil.copy(UP / "hh-rlhf/harmless-base/train.jsonl", alone)
    with pytest.raises(ValueError, match="use source hh_rlhf_helpful or hh_rlhf_harmless"):
        load("hh_rlhf", alone)
    forced, _ = load("hh_rlhf_harmless", alone)
    assert {r["kind"] for r in forced} == {"safety"} and len(forced) == 5


def test_wrong_format_is_a_file_row_error_and_split_mistakes_are_named(tmp_path):
    with pytest.raises(DataValidationError) as e:
        load("hh_rlhf_helpful", UP / "PKU-SafeRLHF/data/Alpaca-7B/train.jsonl")
    assert "Alpaca-7B/train.jsonl:1: chosen: required field missing" in str(e.value)
    assert e.value.total == 8
    broken = tmp_path / "broken.jsonl.xz"
    broken.write_bytes(lzma.compress(b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": 3}\nnot json\n'))
    with pytest.raises(DataValidationError) as e:
        load("hh_rlhf_helpful", broken)
    assert [(p.row, p.field) for p in e.value.problems] == [(1, "rejected"), (2, "<row>")]
    with pytest.raises(ValueError, match="does not start with split 'test'"):
        load("hh_rlhf", UP / "hh-rlhf/helpful-base/train.jsonl", "test")
    with pytest.raises(ValueError, match="give `split`"):
        load("hh_rlhf", UP / "hh-rlhf/helpful-base")
    with pytest.raises(FileNotFoundError, match="no files of split 'validation'"):
        load("hh_rlhf", UP / "hh-rlhf/helpful-base", "validation")
    with pytest.raises(ValueError, match="gives sft_dialog rows, not preference_pair"):
        load("chat_jsonl", UP / "plain/chat.jsonl")
    with pytest.raises(ValueError, match="has no scores: `thresholds` does not apply"):
        load("hh_rlhf", UP / "hh-rlhf/helpful-base", "train", thresholds=T)
    with pytest.raises(ValueError, match="`split` and `thresholds` are for public-data adapters"):
        load("native", UP / "plain/pairs.jsonl", "train")


# ----------------------------------------------------------------------------------------------- PKU, BeaverTails
def test_pku_saferlhf_helpfulness_pairs_exclude_unsafe_over_safe():
    rows, dropped = load("pku_saferlhf_helpful", UP / "PKU-SafeRLHF/data", "train")
    assert rows_no(rows) == [1, 3, 4, 5, 8]
    assert dropped == {"chosen unsafe, rejected safe (excluded: a safer answer is always preferred)": 1,
                       "identical answers": 1, "empty answer": 1}
    assert [r["category"] for r in rows] == ["both_safe", "both_unsafe", "only_chosen_safe", "only_chosen_safe",
                                             "both_unsafe"]
    assert {r["kind"] for r in rows} == {"helpfulness"} and {r["rating"] for r in rows} == {"unsure"}
    assert rows[3]["chosen"].startswith("It's safest not to drive")  # better_response_id 1
    assert rows[1]["meta"]["severity_level"] == {"chosen": 3, "rejected": 1}
    assert rows[1]["meta"]["harm_category"]["chosen"] == ["Cybercrime", "Privacy Violation"]


def test_pku_saferlhf_safety_pairs_rated_by_severity_gap():
    rows, dropped = load("pku_saferlhf_safety", UP / "PKU-SafeRLHF/data", "train")
    assert rows_no(rows) == [1, 2, 3, 4, 8]
    assert dropped == {"safer answer labelled unsafe, the other safe (contradictory labels)": 1,
                       "identical answers": 1, "empty answer": 1}
    assert [r["rating"] for r in rows] == ["unsure", "better", "better", "significantly_better", "unsure"]
    assert [r["category"] for r in rows] == ["both_safe", "only_chosen_safe", "both_unsafe", "only_chosen_safe",
                                             "both_unsafe"]
    assert [(r["chosen_safe"], r["rejected_safe"]) for r in rows][1] == (True, False)
    assert rows[1]["chosen"].startswith("Talk to your neighbor")
    lenient = RatingThresholds(significantly_better=2, better=1, slightly_better=0.5)
    rated, _ = load("pku_saferlhf_safety", UP / "PKU-SafeRLHF/data", "train", thresholds=lenient)
    assert [r["rating"] for r in rated] == ["unsure", "significantly_better", "significantly_better",
                                            "significantly_better", "unsure"]


def test_pku_saferlhf_v0_has_no_severity():
    path = UP / "PKU-SafeRLHF-v0/round0/train.jsonl"
    safety, _ = load("pku_saferlhf_safety", path)
    assert [(r["rating"], r["category"]) for r in safety] == [
        ("unsure", "only_chosen_safe"), ("unsure", "both_safe"), ("unsure", "only_chosen_safe")]
    helpful, dropped = load("pku_saferlhf_helpful", path)
    assert rows_no(helpful) == [1, 2] and len(dropped) == 1


def test_beavertails_pairs_safe_and_unsafe_answers_to_one_prompt():
    rows, dropped = load("beavertails", UP / "BeaverTails/round0/30k", "train")
    assert rows_no(rows) == [1, 3, 7]
    assert dropped == {"answer to a prompt without both a safe and an unsafe answer": 3, "empty answer": 1}
    assert [r["chosen"] for r in rows][:2] == ["I can't help with shoplifting. Many stores offer assistance "
                                              "programs if money is tight."] * 2
    assert rows[1]["rejected"] == "Wear a baggy coat and walk out calmly."
    assert {(r["kind"], r["category"], r["rating"]) for r in rows} == {("safety", "only_chosen_safe", "unsure")}
    assert rows[2]["meta"]["harm_category"]["rejected"] == ["discrimination,stereotype,injustice",
                                                            "hate_speech,offensive_language"]
    with pytest.raises(DataValidationError, match="train.jsonl:1: response: a pair of answers .* use pku_saferlhf"):
        load("beavertails", UP / "PKU-SafeRLHF-v0/round0/train.jsonl")


# ----------------------------------------------------------------------------------------------- oasst1
def test_oasst1_best_ranked_dialogs_and_ranked_sibling_pairs():
    trees = UP / "oasst1/2023-04-12_oasst_ready.trees.jsonl"
    dialogs, dropped = load("oasst1", trees, schema="sft_dialog")
    assert dropped == {"tree not ready for export": 1, "deleted message": 1, "message failed review": 1,
                       "empty message": 1}
    assert [[m["content"][:22] for m in d["messages"]] for d in dialogs] == [
        ["Can you explain what a", "A black hole is a plac", "How do they form?", "Most form when a very "],
        ["¿Cuál es el río más la", "El río más largo de Su"],
        ["Write a haiku about ra", "Soft rain on the roof\n"]]
    pairs, _ = load("oasst1", trees)
    assert [(r["chosen"][:12], r["rejected"][:12], r["rating"]) for r in pairs] == [
        ("A black hole", "It's a regio", "better"),                  # quality 0.9 - 0.55
        ("A black hole", "Black holes ", "significantly_better"),    # 0.9 - 0.1
        ("It's a regio", "Black holes ", "better"),                  # 0.55 - 0.1
        ("Most form wh", "They form fr", "better"),                  # 0.85 - 0.4
        ("Soft rain on", "Rain falls d", "unsure")]                  # no quality labels
    assert len(pairs[3]["context"]) == 3 and pairs[3]["context"][-1]["content"] == "How do they form?"


def test_oasst1_flat_messages_give_what_the_trees_give(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def content(rows):
        return [{k: v for k, v in r.items() if k not in ("id", "meta")} for r in rows]

    trees = UP / "oasst1/2023-04-12_oasst_ready.trees.jsonl"
    flat = UP / "oasst1/messages"
    for schema in ("sft_dialog", "preference_pair"):
        assert content(load("oasst1", flat, "train", schema)[0]) == content(load("oasst1", trees, schema=schema)[0])
    # the Hugging Face layout: the same messages as data/train-*.parquet
    records = [json.loads(line) for line in (flat / "train.jsonl").read_text().splitlines()]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data/train-00000-of-00001-0123abcd.parquet")
    from_parquet, dropped = load("oasst1", tmp_path, "train")
    assert content(from_parquet) == content(load("oasst1", trees)[0])
    assert dropped["parent message not in the file"] == 1 and dropped["message of a tree not ready for export"] == 2
    prompts, _ = load("oasst1", tmp_path, "train", schema="rl_prompt")
    assert [p.get("prompt", "(context)")[:14] for p in prompts] == ["Can you explai", "(context)", "Write a haiku "]


# ----------------------------------------------------------------------------------------------- UltraFeedback
def test_ultrafeedback_fine_grained_best_vs_lower_scored():
    rows, dropped = load("ultrafeedback", UP / "UltraFeedback/truthful_qa.jsonl")
    assert [r["id"].rsplit("/", 1)[1] for r in rows] == ["1-0-1", "1-0-2", "1-0-3", "2-0-2", "2-0-3", "3-0-1"]
    # gaps 1, 3.25, 4; 2.75 (vicuna: N/A skipped, mean of 3, 1, 2), 3.25 (NaN score: mean of the ratings); 2.75
    assert [r["rating"] for r in rows] == ["better"] + ["significantly_better"] * 5
    assert rows[3]["meta"]["scores"] == [4.75, 2.0] and rows[4]["meta"]["scores"] == [4.75, 1.5]
    assert dropped == {"completion tied with the best": 1, "completion without an answer or a score": 1,
                       "fewer than two scored completions": 1}
    strict = RatingThresholds(significantly_better=3.5, better=3.0, slightly_better=1.5)
    rated, _ = load("ultrafeedback", UP / "UltraFeedback/truthful_qa.jsonl", thresholds=strict)
    assert [r["rating"] for r in rated] == ["negligibly_better", "better", "significantly_better",
                                            "slightly_better", "better", "slightly_better"]


def test_ultrafeedback_binarized_pairs_and_dialogs(tmp_path):
    rows, dropped = load("ultrafeedback_binarized", UP / "ultrafeedback_binarized", "train_prefs")
    assert [r["rating"] for r in rows] == ["significantly_better", "better", "slightly_better", "negligibly_better"]
    assert dropped == {"tie or reversed scores": 1, "empty answer": 1}
    assert rows[1] | {"meta": None} == {
        "id": "ultrafeedback_binarized/ultrafeedback_binarized/train_prefs/2", "prompt": "Convert 5 kilometers to miles.",
        "chosen": "5 kilometers is about 3.11 miles.", "rejected": "5 kilometers is 8 miles.", "rating": "better",
        "kind": "helpfulness", "source": "ultrafeedback-binarized", "meta": None}
    # as `load_dataset(...).save_to_disk(dir)` leaves it: a DatasetDict directory, one sub-directory per split
    import datasets

    records = [json.loads(line) for line in (UP / "ultrafeedback_binarized/train_prefs.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "uf"))
    saved, _ = load("ultrafeedback_binarized", tmp_path / "uf", "train_prefs")
    assert [(r["prompt"], r["rating"]) for r in saved] == [(r["prompt"], r["rating"]) for r in rows]
    dialogs, dropped = load("ultrafeedback_binarized", UP / "ultrafeedback_binarized", "train_sft", "sft_dialog")
    assert [d["messages"][1]["content"] for d in dialogs] == [
        "The ephemeral beauty of cherry blossoms draws crowds each spring.", "2, 3 and 5."]
    assert dropped == {"empty answer": 1}


# ----------------------------------------------------------------------------------------------- SHP, plain
def test_shp_preferred_comment_and_ratio_buckets():
    rows, dropped = load("shp", UP / "SHP", "train")
    assert [r["id"] for r in rows] == ["shp/SHP/askscience/train/1", "shp/SHP/askscience/train/2",
                                       "shp/SHP/askscience/train/4", "shp/SHP/legaladvice/train/1",
                                       "shp/SHP/legaladvice/train/2"]
    # ratios 52/4 = 13, 31/7 = 4.4 (B preferred), 9/4 = 2.25, 66/11 = 6, 15/7 = 2.1
    assert [r["rating"] for r in rows] == ["significantly_better", "better", "negligibly_better", "better",
                                           "negligibly_better"]
    assert rows[1]["chosen"].startswith("A vaccine introduces") and rows[1]["rejected"].startswith("They show")
    assert dropped == {"deleted or removed comment": 1, "empty post": 1}


def test_plain_chat_and_pair_jsonl():
    dialogs, dropped = load("chat_jsonl", UP / "plain/chat.jsonl", schema="sft_dialog")
    assert [d["id"] for d in dialogs] == ["chat_jsonl/plain/chat/1", "chat-sys", "chat_jsonl/plain/chat/3",
                                          "chat_jsonl/plain/chat/4"]
    assert dialogs[1]["source"] == "handwritten" and dialogs[1]["meta"] == {"category": "geography"}
    assert dialogs[2]["messages"][0] == {"role": "user", "content": "Translate 'cat' to German."}
    assert dropped == {"dialog does not end with an answer": 1, "empty turn": 1}
    pairs, dropped = load("pairs_jsonl", UP / "plain/pairs.jsonl")
    assert [(p["rating"], "prompt" in p) for p in pairs] == [
        ("better", True), ("unsure", False), ("significantly_better", True), ("significantly_better", True)]
    assert pairs[1]["context"][0] == {"role": "system", "content": "Answer kindly."}
    assert pairs[2]["prompt"] == "Is 17 prime?" and pairs[2]["meta"] == {"annotator": "rater-3"}
    assert pairs[3]["id"] == "pair-safe" and pairs[3]["category"] == "only_chosen_safe"
    assert dropped == {"tie or reversed scores": 1, "identical answers": 1}


def test_rl_prompts_from_pairs_are_distinct_with_their_safety_flag():
    prompts, _ = load("hh_rlhf", UP / "hh-rlhf", "test", schema="rl_prompt")
    assert [(p["prompt"], p["is_safety"], p["kind"]) for p in prompts] == [
        ("How do I steal a bike?", True, "adversarial"), ("Help me lie to my boss.", True, "adversarial"),
        ("What is the capital of France?", False, "helpful"), ("What is 7 times 8?", False, "helpful"),
        ("Name a primary color.", False, "helpful"), ("Suggest a weekend hobby.", False, "helpful"),
        ("How many days are in a leap year?", False, "helpful")]
    pku, _ = load("pku_saferlhf_safety", UP / "PKU-SafeRLHF/data", "train", schema="rl_prompt")
    assert len(pku) == 5 and all(p["is_safety"] for p in pku)
