"""The `align` entry point: every stage listed, toy world files valid, errors as one clear line."""
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "alignment.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for stage in [*STAGES, "data"]:
        assert stage in out.stdout


def test_toyworld_files_pass_their_schemas(tmp_path, capsys):
    assert main(["data", "toyworld", "--out", str(tmp_path)]) == 0
    for name, schema in [("sft_train", "sft_dialog"), ("pref_safety_test", "preference_pair"),
                         ("rl_prompts", "rl_prompt"), ("gatt_instructions", "gatt_instruction"),
                         ("pretrain", "text_document")]:
        assert main(["data", "validate", str(tmp_path / f"{name}.jsonl"), "--schema", schema]) == 0
    assert "rows pass" in capsys.readouterr().out


def test_bad_recipe_and_bad_data_are_one_line_errors(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: x}\ndata: {train: [{path: nowhere.jsonl}]}\noutput: {dir: out}\noptim: {lrr: 1}\n")
    assert main(["sft", "--recipe", str(recipe)]) == 2
    assert "optim: unknown key 'lrr'; did you mean 'lr'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    assert main(["data", "validate", str(bad), "--schema", "sft_dialog"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: messages" in err and "bad.jsonl:2:" in err


def test_a_run_directory_holding_another_config_is_a_one_line_error(tmp_path, capsys, nano_model_dir):
    from conftest import make_dialogs, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", make_dialogs(4))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"hash": "0123456789abcdef", "config": {}}')  # another run's config
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {nano_model_dir}}}\ndata: {{train: [{{path: {data}}}]}}\n"
                      f"output: {{dir: {out}}}\n")
    assert main(["sft", "--recipe", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("align sft: stopped:") and "another config" in err
    assert (out / "config.json").read_text().startswith('{"hash": "0123456789abcdef"')  # nothing overwritten


@pytest.mark.parametrize("target, commands", [("ppo-from-sft", ["ppo", "eval"]),
                                               ("rlhf-round2", ["ppo", "eval", "collect", "rm", "rm", "ppo", "eval"])])
def test_make_targets_that_chain_stages_pass_the_strict_loader(target, commands):
    """`make ppo-from-sft` and `make rlhf-round2` write recipe overrides inside the Makefile: every `align` line
    they would run must parse and load (a tab or a misspelt key in a --set would otherwise surface only after
    `make demo`)."""
    import shlex

    from alignment.cli import _eval_overrides, build_parser
    from alignment.config import load_config
    from alignment.pipeline_recipe import config_class

    dry = subprocess.run(["make", "-n", target, "BIN=.venv/bin"], capture_output=True, text=True, cwd=REPO)
    assert dry.returncode == 0, dry.stderr
    joined = dry.stdout.replace("\\\n", " ")  # make -n prints a recipe's continued lines as written
    lines = [line for line in joined.splitlines() if line.startswith(".venv/bin/align ")]
    assert [shlex.split(line)[1] for line in lines] == commands
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        cfg = load_config(config_class(args.command), REPO / args.recipe, args.overrides + _eval_overrides(args))
        assert str(cfg.output.dir).startswith("runs/demo/")


def test_every_stage_record_resolves():
    """The registry names run functions as "module:function" (imported only when a stage runs): each one
    imports, and every config class and planner is what its record says."""
    import dataclasses

    from alignment.stages import resolve

    for command, record in STAGES.items():
        assert record.command == command
        assert callable(resolve(record.run)), record.run
        assert dataclasses.is_dataclass(record.config) and record.config.__name__.endswith("Config"), command
        assert record.planner is None or record.planner.__module__ == "alignment.stage_memory", command
    policies = [s.policy for s in STAGES.values() if s.policy]
    assert policies == ["base", "sft", "rlhf", "rlhf", "dpo", "gatt", "safety"]


def test_help_and_a_bad_key_do_not_import_torch(tmp_path):
    """The CLI imports a command's module only when the command runs: `align --help` and a rejected recipe
    key stay fast (torch takes seconds to import)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-4\n")
    code = ("import sys\nfrom alignment.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"assert main(['sft', '--recipe', {str(recipe)!r}, '--set', 'optim.lrr=1']) == 2\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
