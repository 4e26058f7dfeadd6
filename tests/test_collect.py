"""`align collect`: the toy world's annotators judge the model's own answers (pure labelling checked against
the gold scorers by hand-picked answers; a nano-model run end to end)."""
import json

from alignment.data import toyworld
from alignment.data.schemas import row_problems
from alignment.stages.collect import label_pairs

from conftest import write_jsonl


def _problems(rows):
    return [p for r in rows for p in row_problems(r, "preference_pair")]


def _row(prompt, is_safety, rid="p1"):
    return {"id": rid, "prompt": prompt, "is_safety": is_safety, "source": "toyworld"}


def test_the_gold_better_answer_is_chosen_and_rated_by_the_gap():
    prompt = "Which is greater, 41 or 50?"
    right, wrong = "50 is greater than 41.", "41 is greater than 50."
    assert toyworld.gold_helpfulness(prompt, right) - toyworld.gold_helpfulness(prompt, wrong) > 0.45
    for seed in range(5):  # annotator noise (std 0.04) never flips a gap this large
        helpful, safety = label_pairs([_row(prompt, False)], [(wrong, right)], seed)
        assert safety == []  # not a safety prompt
        assert (helpful[0]["chosen"], helpful[0]["rejected"]) == (right, wrong)
        assert helpful[0]["rating"] == "significantly_better" and helpful[0]["kind"] == "helpfulness"


def test_identical_or_empty_answers_make_no_pair():
    prompt = "Which is greater, 41 or 50?"
    rows = [_row(prompt, False, "a"), _row(prompt, False, "b")]
    assert label_pairs(rows, [("same", "same"), ("", "50 is greater than 41.")], 0) == ([], [])


def test_safety_pairs_carry_gold_labels_and_the_category():
    prompt = toyworld.eval_prompts(0, 1, "adversarial")[0]["prompt"]
    import random

    rng = random.Random(0)
    safe = toyworld.sample_answer(rng, prompt, "best")
    unsafe = toyworld.sample_answer(rng, prompt, "unsafe")
    assert toyworld.gold_safety(prompt, safe) and not toyworld.gold_safety(prompt, unsafe)
    helpful, safety = label_pairs([_row(prompt, True)], [(unsafe, safe)], 0)
    assert len(helpful) == 1 and len(safety) == 1
    pair = safety[0]
    assert (pair["chosen"], pair["rejected"]) == (safe, unsafe)
    assert (pair["chosen_safe"], pair["rejected_safe"], pair["category"]) == (True, False, "only_chosen_safe")
    assert _problems(helpful + safety) == []


def test_align_collect_end_to_end_on_nano(tmp_path, nano_model_dir):
    from alignment.cli import main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", toyworld.rl_prompts(0, 24, purpose="collect"))
    recipe = tmp_path / "collect.yaml"
    recipe.write_text(f"model: {{path: {nano_model_dir}}}\ndata: {{prompts: [{{path: {prompts}}}]}}\n"
                      f"output: {{dir: {tmp_path / 'run'}}}\ngeneration: {{max_new_tokens: 8}}\n")
    assert main(["collect", "--recipe", str(recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "done.json").read_text())
    helpful = [json.loads(line) for line in (run / "helpful.jsonl").read_text().splitlines()]
    safety = [json.loads(line) for line in (run / "safety.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and summary["helpful_pairs"] == len(helpful) > 0
    assert _problems(helpful + safety) == []
    for pair in helpful:  # the annotator's choice follows the gold scores up to its noise
        gap = toyworld.gold_helpfulness(pair["prompt"], pair["chosen"]) - toyworld.gold_helpfulness(pair["prompt"], pair["rejected"])
        assert gap > -0.2

    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "x", "prompt": "hi", "is_safety": False, "source": "web"}])
    recipe.write_text(recipe.read_text().replace(str(prompts), str(other)).replace(str(run), str(tmp_path / "r2")))
    assert main(["collect", "--recipe", str(recipe)]) == 2  # only the toy world's prompts can be labelled
    assert not (tmp_path / "r2" / "config.json").exists()
