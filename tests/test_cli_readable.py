"""A CLI that explains itself: --show-config lists every key with its default, range and meaning; the run header
and the end-of-run line are readable; `make help` names every target (issue 27, CLI)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.cli import build_parser, main
from alignment.config import load_config, to_dict
from alignment.config.describe import describe_config, field_docs
from alignment.config.sections import OptimSection
from alignment.pipeline_recipe import config_class
from alignment.runs import describe_outputs
from alignment.stages import STAGES
from alignment.training import describe_setup

REPO = Path(__file__).resolve().parents[1]
TINY = {s.command: REPO / "recipes" / "tiny" / f"{s.command.replace('-', '_')}.yaml" for s in STAGES.values()}
TINY["rm"] = REPO / "recipes" / "tiny" / "rm_helpful.yaml"
TINY["pipeline"] = REPO / "recipes" / "tiny" / "pipeline.yaml"


def _leaf_keys(d: dict, prefix: str = "") -> list[tuple[str, int]]:
    """(key, depth) of every key of a config dict, in order, the way describe_config nests them."""
    out = []
    for key, value in d.items():
        out.append((key, prefix.count(".")))
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and \
                not key.startswith(("test", "thresholds")):
            out.extend(_leaf_keys(value, prefix + key + "."))
    return out


@pytest.mark.parametrize("command", sorted(TINY))
def test_show_config_lists_every_key_of_every_stage_and_exits_before_running(command, capsys, tmp_path):
    recipe = TINY[command]
    assert recipe.is_file(), recipe
    # output.dir under tmp: a --show-config that ran the stage would write there
    out_dir = tmp_path / "never-written"
    assert main([command, "--recipe", str(recipe), "--set", f"output.dir={out_dir}", "--show-config"]) == 0
    text = capsys.readouterr().out
    assert not out_dir.exists()
    cfg = load_config(config_class(command), recipe, [f"output.dir={out_dir}"])
    lines = text.splitlines()
    keys = [(m[2], len(m[1]) // 2) for line in lines if (m := re.match(r"^( *)([A-Za-z_0-9]+):", line))]
    expected = [(f.name, 0) for f in dataclasses.fields(cfg)]
    assert [k for k in keys if k[1] == 0] == expected
    # every nested section's keys, at the depth of their section
    flat = {(name, depth) for name, depth in keys}
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                assert (f.name, 1) in flat, f"{section.name}.{f.name} missing"
    # the output dir shows the value given with --set
    assert f"dir: {out_dir}" in text


def test_show_config_marks_overrides_with_their_default_range_and_meaning(tmp_path):
    cfg = load_config(config_class("sft"), TINY["sft"], ["optim.lr=0.00042", "optim.grad_clip=0.5"])
    text = describe_config(cfg)
    lr = next(line for line in text.splitlines() if line.strip().startswith("lr:"))
    assert lr.split("#")[0].split(":")[1].strip() == "0.00042"
    assert float(re.search(r"\* default (\S+);", lr)[1]) == OptimSection().lr
    assert "> 0" in lr
    clip = next(line for line in text.splitlines() if line.strip().startswith("grad_clip:"))
    assert "0.5" in clip and field_docs(OptimSection)["grad_clip"] in clip
    # a key left at its default carries no mark
    eps = next(line for line in text.splitlines() if line.strip().startswith("eps:"))
    assert "*" not in eps
    # a required key says so, an enumerated one lists its set
    assert re.search(r"^  path: .*# required", text, re.M)
    assert re.search(r"^  dtype: \S+  # .*one of auto, float32, bfloat16, float16", text, re.M)


def test_field_docs_come_from_the_comments_beside_and_above_fields():
    @dataclasses.dataclass
    class Example:
        # the first line above
        # and its second line
        above: int = 1
        beside: int = 2  # written beside it
        bare: int = 3

    docs = field_docs(Example)
    assert docs == {"above": "the first line above and its second line", "beside": "written beside it"}


def test_stage_help_points_at_show_config_and_names_the_recipe_sections():
    help_text = build_parser()._subparsers._group_actions[0].choices["ppo"].format_help()
    assert "--show-config" in help_text
    listed = re.findall(r"[a-z_]+", help_text.split("recipe sections:")[1].split(".")[0])
    assert listed == [f.name for f in dataclasses.fields(config_class("ppo"))] and "rollout" in listed


def test_run_header_reads_as_words():
    assert describe_setup(1, "NO", "no", None, "cpu") == "1 process on cpu, fp32"
    assert describe_setup(2, "MULTI_CPU", "no", None, "cpu") == "2 processes, gloo data parallel, fp32"
    assert describe_setup(8, "DEEPSPEED", "bf16", 3, "cuda:0") == "8 processes, DeepSpeed ZeRO-3, bf16"
    assert describe_setup(4, "MULTI_GPU", "fp16", None, "cuda:0") == "4 processes, DDP, fp16"


def test_end_of_run_line_names_the_model_and_what_else_exists(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    assert describe_outputs(run) == f"finished: outputs in {run}"  # final/ without a model is not named
    (run / "final" / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    (run / "done.json").write_text(json.dumps({"config_hash": "x"}))
    line = describe_outputs(run)
    assert line == f"finished: model {run / 'final'}; metrics {run / 'metrics.jsonl'}"
    (run / "eval.json").write_text("{}")
    assert f"evaluation {run / 'eval.json'}" in describe_outputs(run)


def test_make_help_names_every_target():
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY: (.+)$", makefile, re.M)[1].split()
    out = subprocess.run(["make", "-s", "help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    words = set(re.findall(r"[a-z][a-z0-9-]*", out.stdout))
    assert [t for t in phony if t not in words and t != "help"] == []


def test_stage_run_ends_with_where_the_model_is(tmp_path, capsys, nano_model_dir):
    """A 1-step SFT run on the nano model prints its readable header and ends with the path of its model."""
    from conftest import make_dialogs, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", make_dialogs(4))
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {nano_model_dir}}}\ndata: {{train: [{{path: {data}}}]}}\n"
                      f"output: {{dir: {out}}}\ntrain: {{max_steps: 1, micro_batch_size: 2}}\n"
                      f"logging: {{progress: false, tensorboard: false}}\n")
    capsys.readouterr()
    assert main(["sft", "--recipe", str(recipe)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("1 process on cpu, fp32" in line for line in lines)
    assert lines[-1] == (f"align sft: finished: model {out / 'final'}; evaluation {out / 'eval.json'}; "
                         f"metrics {out / 'metrics.jsonl'}")


def test_third_party_progress_bars_are_off_unless_asked_for(tmp_path):
    """`align` turns off the bars of transformers' loads and saves (ours stay); the user can turn them back on."""
    from conftest import make_dialogs, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", make_dialogs(4))
    script = ("import sys; from alignment.cli import main; main(sys.argv[1:]); "
              "import transformers.utils.logging as l; print('bars', l.is_progress_bar_enabled())")
    args = [sys.executable, "-c", script, "data", "validate", str(data), "--schema", "sft_dialog"]
    plain = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    off = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=plain)
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip().splitlines()[-1] == "bars False"
    on = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**plain, "HF_HUB_DISABLE_PROGRESS_BARS": "0"})
    assert on.stdout.strip().splitlines()[-1] == "bars True"


def _run_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _run_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _run_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("runs/") else []


def test_every_input_of_a_single_stage_recipe_names_the_make_target_that_writes_it(monkeypatch):
    """After `make demo`, `make ppo` alone finds no runs/tiny/...: its error must say which target writes each
    input. Every runs/ path a single-stage recipe reads is under the output of some make target's recipe."""
    from alignment.producers import made_by, producers

    monkeypatch.chdir(REPO)
    targets = {target: recipe for _, target, recipe in producers()}
    assert {"data", "pretrain", "sft", "rm-helpful", "rm-safety", "ppo", "demo"} <= set(targets)
    for target, recipe in targets.items():
        if not recipe or target.startswith("demo"):
            continue
        d = to_dict(load_config(config_class(STAGES_BY_RECIPE[Path(recipe).stem]), REPO / recipe, []))
        inputs = [p for key, v in d.items() if key != "output" for p in _run_paths(v)]
        for path in inputs:
            hint = made_by(path)
            assert hint.startswith(" (made by `make "), (recipe, path)
            producer = re.search(r"`make ([a-z-]+)`", hint)[1]
            assert producer != target, (recipe, path)  # never its own output


STAGES_BY_RECIPE = {"pretrain": "pretrain", "sft": "sft", "collect": "collect", "rm_helpful": "rm", "rm_safety": "rm",
                    "rejection_sampling": "rejection-sampling", "ppo": "ppo", "rloo": "ppo", "grpo": "ppo",
                    "dpo": "dpo", "gatt": "gatt",
                    "safety_distill": "safety-distill", "eval": "eval"}


def test_a_missing_input_says_which_command_makes_it(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    rc = main(["sft", "--recipe", "recipes/tiny/sft.yaml", "--set", f"output.dir={tmp_path / 'run'}",
               "--set", "model.path=runs/tiny/base/no-such-final"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("align sft: error: model.path: runs/tiny/base/no-such-final does not exist")
    assert err.endswith("(made by `make pretrain` (recipes/tiny/pretrain.yaml); `make demo` writes its own copy "
                        "under runs/demo/ instead)")
    assert not (tmp_path / "run").exists()
