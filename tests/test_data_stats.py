"""`align data stats`: percentiles and agreement computed by hand, and the command on the public-data fixtures."""
import json
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.data.stats import annotator_agreement, data_stats, length_summary, percentile

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "tests" / "fixtures" / "upstream"


def test_nearest_rank_percentiles():
    values = list(range(1, 11))  # 1..10
    assert [percentile(values, p) for p in (10, 50, 90, 95, 99, 100)] == [1, 5, 9, 10, 10, 10]
    assert percentile([7], 50) == 7
    assert length_summary([3, 1, 2, 10]) == {"count": 4, "mean": 4.0, "p50": 2, "p90": 10, "p95": 10, "p99": 10,
                                             "max": 10}
    assert length_summary([]) == {"count": 0}
    with pytest.raises(ValueError):
        percentile([], 50)


def pair(prompt, chosen, rejected, annotator, rating="better"):
    return {"id": f"{prompt}-{annotator}-{chosen}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "rating": rating, "meta": {"annotator": annotator}}


def test_annotator_agreement_counted_by_hand():
    rows = [
        # item 1: three annotators; a and b agree (same rating), c disagrees -> pairs ab, ac, bc: 1 of 3 agree
        pair("p1", "x", "y", "a"), pair("p1", "x", "y", "b"), pair("p1", "y", "x", "c"),
        # item 2: two annotators agree on the answer, not on the rating
        pair("p2", "u", "v", "a", "better"), pair("p2", "u", "v", "c", "slightly_better"),
        # item 3: judged once; a second judgement by the same annotator does not count
        pair("p3", "m", "n", "b"), pair("p3", "n", "m", "b"),
    ]
    assert annotator_agreement(rows) == {"judgements": 7, "annotators": 3, "items_judged_twice_or_more": 2,
                                         "annotator_pairs": 4, "preference_agreement": 2 / 4,
                                         "rating_agreement": 1 / 4}
    assert annotator_agreement([{k: v for k, v in r.items() if k != "meta"} for r in rows]) is None


def test_pair_stats_count_sources_ratings_categories():
    rows = [{"id": "1", "prompt": "a b", "chosen": "c", "rejected": "d e f", "rating": "better", "kind": "safety",
             "category": "both_safe", "source": "s1"},
            {"id": "2", "prompt": "a", "chosen": "c d", "rejected": "e", "rating": "unsure", "source": "s2"}]
    stats = data_stats(rows, "preference_pair")
    assert stats["by_source"] == {"s1": 1, "s2": 1} and stats["by_kind"] == {"-": 1, "safety": 1}
    assert stats["by_rating"] == {"significantly_better": 0, "better": 1, "slightly_better": 0,
                                  "negligibly_better": 0, "unsure": 1}
    assert stats["by_category"] == {"-": 1, "both_safe": 1}
    assert stats["lengths"]["rejected"]["max"] == 3 and stats["lengths"]["prompt"]["p50"] == 1


def test_align_data_stats_on_fixtures(tmp_path, capsys):
    out = tmp_path / "stats.json"
    assert main(["data", "stats", str(UP / "PKU-SafeRLHF/data"), "--source", "pku_saferlhf_safety", "--split", "train",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dropped 3" in text and "rating: significantly_better 1, better 2, slightly_better 0" in text
    assert "category: both_safe 1, both_unsafe 2, only_chosen_safe 2" in text
    stats = json.loads(out.read_text())
    section = next(iter(stats["sections"].values()))
    assert section["rows"] == 5 and section["by_source"] == {"pku-saferlhf": 5}
    assert set(section["lengths"]) == {"prompt", "chosen", "rejected"}

    assert main(["data", "stats", str(UP / "plain/pairs.jsonl"), "--source", "pairs_jsonl"]) == 0
    assert "annotators: 1 over 1 judgements" in capsys.readouterr().out
    assert main(["data", "stats", str(UP / "oasst1/2023-04-12_oasst_ready.trees.jsonl"), "--source", "oasst1",
                 "--schema", "sft_dialog"]) == 0
    assert "turns: 1 2, 2 1" in capsys.readouterr().out


def test_align_data_stats_on_a_mixed_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "mix.json"
    assert main(["data", "stats", "--recipe", "recipes/tiny/rm_fixture_mix.yaml", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "== mix equal: 13 primary + 13 of 20 secondary = 26 pairs" in text
    assert "dropped for a prompt in a test set: 1 primary, 0 secondary" in text
    result = json.loads(out.read_text())
    assert set(result["sections"]) == {"train (mixed)", "test helpful", "test safety"}
    kinds = result["sections"]["train (mixed)"]["by_kind"]  # 13 helpful + 13 drawn from safety, SHP and oasst1
    assert sum(kinds.values()) == 26 and kinds["helpfulness"] >= 13 and set(kinds) == {"helpfulness", "safety"}
    assert main(["data", "stats"]) == 2
    assert "give data paths or --recipe" in capsys.readouterr().err
