"""Reward-model data mixes (alignment.data.mixing): ratios hold within rounding, draws are seeded."""
import pytest

from alignment.data.mixing import count_by, mix_rows


def rows(n: int, kind: str) -> list[dict]:
    return [{"id": f"{kind}-{i}", "kind": kind} for i in range(n)]


@pytest.mark.parametrize("n_primary, n_secondary", [(300, 1000), (7, 7), (1000, 5000)])
def test_equal_mix_keeps_all_primary_and_draws_as_many_secondary(n_primary, n_secondary):
    helpful, safety = rows(n_primary, "helpfulness"), rows(n_secondary, "safety")
    mixed, report = mix_rows(helpful, safety, "equal", seed=0)
    assert mixed[:n_primary] == helpful
    assert count_by(mixed, "kind") == {"helpfulness": n_primary, "safety": n_primary}
    assert len({r["id"] for r in mixed}) == len(mixed)  # drawn without replacement
    assert report["counts"] == {"primary": n_primary, "secondary_available": n_secondary,
                                "secondary_drawn": n_primary, "total": 2 * n_primary}
    assert report["ids"]["secondary"] == [r["id"] for r in mixed[n_primary:]]


@pytest.mark.parametrize("n_primary, fraction", [(3000, 0.9), (1001, 0.9), (50, 0.75), (13, 0.5), (10, 1.0)])
def test_ratio_mix_holds_within_rounding(n_primary, fraction):
    safety, helpful = rows(n_primary, "safety"), rows(5000, "helpfulness")
    mixed, report = mix_rows(safety, helpful, "ratio", seed=1, primary_fraction=fraction)
    drawn = len(mixed) - n_primary
    exact = n_primary * (1 - fraction) / fraction
    assert abs(drawn - exact) <= 0.5
    assert abs(n_primary / len(mixed) - fraction) <= 1 / len(mixed)
    assert report["primary_fraction"] == pytest.approx(n_primary / len(mixed))


def test_mixes_are_seeded():
    primary, secondary = rows(100, "a"), rows(1000, "b")
    first, _ = mix_rows(primary, secondary, "equal", seed=7)
    again, _ = mix_rows(primary, secondary, "equal", seed=7)
    other, _ = mix_rows(primary, secondary, "equal", seed=8)
    assert first == again
    assert first != other
    # uniform over the pool: the draw is not just its head
    assert max(int(r["id"].split("-")[1]) for r in first[100:]) > 500


def test_all_mix_concatenates_and_too_small_pools_are_refused():
    mixed, report = mix_rows(rows(3, "a"), rows(4, "b"), "all", seed=0)
    assert [r["id"] for r in mixed] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2", "b-3"]
    with pytest.raises(ValueError, match="needs 10 secondary rows but only 4"):
        mix_rows(rows(10, "a"), rows(4, "b"), "equal", seed=0)
    with pytest.raises(ValueError, match="primary_fraction must be in"):
        mix_rows(rows(10, "a"), rows(4, "b"), "ratio", seed=0, primary_fraction=0.0)
    with pytest.raises(ValueError):
        mix_rows(rows(1, "a"), rows(1, "b"), "half", seed=0)


def test_prompt_key_is_the_whole_context_case_and_space_insensitive():
    from alignment.data.mixing import prompt_key

    assert prompt_key({"prompt": "What  is\n2+2?"}) == prompt_key({"prompt": "what is 2+2? "})
    assert prompt_key({"prompt": "hi"}) == prompt_key({"context": [{"role": "user", "content": "Hi"}]})
    two_turns = {"context": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "what is 2+2?"}]}
    assert prompt_key(two_turns) != prompt_key({"prompt": "what is 2+2?"})


def test_train_rows_whose_prompt_is_in_a_test_set_are_dropped():
    from alignment.data.mixing import drop_test_prompts

    train = [{"id": "a", "prompt": "Capital of France?"}, {"id": "b", "prompt": "2 + 2?"},
             {"id": "c", "prompt": "capital of  france?"}, {"id": "d", "prompt": "Name a color."}]
    tests = {"helpful": [{"id": "t1", "prompt": "Capital of France?"}], "safety": [{"id": "t2", "prompt": "Name a COLOR."}],
             "other": [{"id": "t3", "prompt": "Unrelated"}]}
    kept, report = drop_test_prompts(train, tests)
    assert [r["id"] for r in kept] == ["b"]
    assert report == {"removed": 3, "by_test": {"helpful": 2, "safety": 1, "other": 0}, "ids": ["a", "c", "d"]}
    assert drop_test_prompts(train, {}) == (train, {"removed": 0, "by_test": {}, "ids": []})
