"""Bad input, property-based: a valid toy-world row of every schema, broken one way (a missing field, a wrong
type, an empty string, an invalid role or role order, an empty or a huge dialog, non-UTF-8 bytes, a lone
surrogate, NaN, a truncated line, absurd nesting, control tokens in text) and hidden among valid rows.

Every file either loads (the break was harmless: then the encoders still keep text and control ids apart)
or fails with `file:row: field: reason` naming exactly the broken row; no other exception ever escapes.
Through the command line, every stage answers such a file with exit code 2 and that message, and leaves
the finished run already in its output directory byte for byte as it was."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment.chat import encode_dialog, encode_prompt
from alignment.data.io import load_records
from alignment.data.schemas import DataValidationError, prompt_context
from alignment.scoring import encode_for_reward
from alignment.stages.pretrain import encode_documents

REPO = Path(__file__).resolve().parents[1]
FILES = {"sft_dialog": "sft_train.jsonl", "preference_pair": "pref_safety_train.jsonl", "rl_prompt": "rl_prompts.jsonl",
         "gatt_instruction": "gatt_instructions.jsonl", "text_document": "pretrain.jsonl"}
REQUIRED = {name: json.loads((REPO / "data_schemas" / f"{name}.json").read_text())["required"] for name in FILES}
CONTROL = ["</s>", "<s>", "<pad>", "<unk>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "\x00", "\x1b[31m", "\u2028",
           "\ufeff", "\r", "\t"]
PROBLEM = re.compile(r"^(?P<file>.+?):(?P<row>\d+): (?P<field>\S[^:]*): (?P<reason>.+)$")


def _toy_rows() -> dict[str, list[dict]]:
    from alignment.data.toyworld import write_toyworld

    sizes = {"pretrain": 12, "sft_train": 30, "pref_safety_train": 12, "rl_prompts": 12, "gatt_instructions": 8}
    with tempfile.TemporaryDirectory() as tmp:
        write_toyworld(tmp, seed=3, sizes={k: sizes.get(k, 1) for k in (
            "pretrain", "sft_train", "sft_eval", "pref_helpful_train", "pref_helpful_test", "pref_safety_train",
            "pref_safety_test", "rl_prompts", "eval_helpful", "eval_adversarial", "eval_borderline",
            "gatt_instructions", "gatt_heldout_instructions")})
        return {name: load_records(Path(tmp) / file, name) for name, file in FILES.items()}


ROWS = _toy_rows()


# ----------------------------------------------------------------------------------------- breaking a row
def _strings(value, path=()):
    """(path, string) of every string inside a row, keys excluded."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, (*path, i))


def _set(row, path, value):
    target = row
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def _dialog_key(schema: str, row: dict) -> str | None:
    return "messages" if schema == "sft_dialog" else ("context" if "context" in row else None)


@st.composite
def broken_line(draw, schema: str, source: dict) -> tuple[bytes, bool]:
    """A JSONL line from valid row `source` of `schema`, broken, and whether it must be rejected (False: it
    may load)."""
    row = json.loads(json.dumps(source))
    kind = draw(st.sampled_from(["drop", "type", "empty", "role", "order", "no_dialog", "huge_dialog", "bytes",
                                 "surrogate", "nan", "truncate", "nesting", "control"]))
    dialog = _dialog_key(schema, row)
    if kind in ("role", "order", "no_dialog", "huge_dialog") and dialog is None:
        kind = "drop"
    must_fail = True
    if kind == "drop":
        del row[draw(st.sampled_from(REQUIRED[schema]))]
    elif kind == "type":
        key = draw(st.sampled_from(sorted(row)))
        kinds = {str: "a", bool: True, int: 3, float: 0.5, list: [1], dict: {"x": 1}, type(None): None}
        row[key] = draw(st.sampled_from([v for t, v in kinds.items() if not isinstance(row[key], t) and
                                         not (isinstance(row[key], (int, float)) and t in (int, float))]))
    elif kind == "empty":
        path, _ = draw(st.sampled_from(list(_strings(row))))
        _set(row, path, draw(st.sampled_from(["", " ", "\n\t "])))
        must_fail = False  # some strings (a system prompt, a source) may be empty
    elif kind == "role":
        i = draw(st.integers(0, len(row[dialog]) - 1))
        row[dialog][i]["role"] = draw(st.sampled_from(["bot", "User", "", "tool", "assistant "]))
    elif kind == "order":
        turns = row[dialog]
        i = draw(st.integers(0, len(turns) - 1))
        turns[i]["role"] = {"user": "assistant", "assistant": "user", "system": "assistant"}[turns[i]["role"]]
    elif kind == "no_dialog":
        row[dialog] = []
    elif kind == "huge_dialog":
        start = [m for m in row[dialog] if m["role"] == "system"]
        pairs = [{"role": "user", "content": f"question {i}"} if i % 2 == 0 else
                 {"role": "assistant", "content": f"answer {i}"} for i in range(draw(st.integers(200, 2000)))]
        row[dialog] = start + (pairs if dialog == "messages" else pairs[:-1] if len(pairs) % 2 == 0 else pairs)
        if dialog == "messages" and len(pairs) % 2:
            row[dialog] = start + pairs[:-1]
        must_fail = False
    elif kind == "control":
        path, text = draw(st.sampled_from(list(_strings(row))))
        _set(row, path, text + draw(st.sampled_from(CONTROL)) + draw(st.sampled_from(CONTROL)) + "x")
        must_fail = False  # text may hold any characters; they must stay text
    line = json.dumps(row, ensure_ascii=False).encode()
    if kind == "bytes":
        pos = draw(st.integers(0, len(line)))
        line = line[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc"])) + line[pos:]
    elif kind == "surrogate":
        path, text = draw(st.sampled_from(list(_strings(row))))
        _set(row, path, text + "\ud800")
        line = json.dumps(row).encode()  # ASCII escapes: valid JSON text, not valid Unicode
    elif kind == "nan":
        row["meta"] = {"score": float(draw(st.sampled_from(["nan", "inf", "-inf"])))}
        line = json.dumps(row).encode()
    elif kind == "truncate":
        line = line[:draw(st.integers(1, len(line) - 1))]
    elif kind == "nesting":
        row["meta"] = {"deep": "x"}
        line = json.dumps(row).encode().replace(b'"x"', b"[" * 100_000 + b"]" * 100_000)
    return line, must_fail


@st.composite
def broken_file(draw, schema: str) -> tuple[list[bytes], int, bool]:
    """Valid lines with one broken line among them: (lines, its 1-based row, must it be rejected)."""
    picked = draw(st.lists(st.integers(0, len(ROWS[schema]) - 1), min_size=1, max_size=5, unique=True))
    good = [json.dumps(ROWS[schema][i], ensure_ascii=False).encode() for i in picked[1:]]  # distinct ids
    bad, must_fail = draw(broken_line(schema, ROWS[schema][picked[0]]))
    at = draw(st.integers(0, len(good)))
    return [*good[:at], bad, *good[at:]], at + 1, must_fail


def _write(tmp: Path, lines: list[bytes]) -> Path:
    path = tmp / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _check_problems(err: DataValidationError, path: Path, row: int) -> None:
    assert err.problems, "an error without a problem"
    for line in str(err).splitlines():
        m = PROBLEM.match(line)
        assert m, f"not 'file:row: field: reason': {line!r}"
        assert m["file"] == str(path) and int(m["row"]) == row, line
    assert {p.row for p in err.problems} == {row}


def _encoders_keep_text_apart(schema: str, rows: list[dict], tokenizer) -> None:
    """Whatever the text holds, BOS/EOS appear only where the format puts them, and PAD/UNK never."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    banned = {tokenizer.pad_token_id, tokenizer.unk_token_id}
    for row in rows:
        if schema == "sft_dialog":
            turns = [m for m in row["messages"] if m["role"] == "assistant"]
            ids = encode_dialog(tokenizer, row["messages"])["input_ids"]
            assert ids.count(bos) == ids.count(eos) == len(turns)
        elif schema == "preference_pair":
            ids = encode_for_reward(tokenizer, prompt_context(row), row["chosen"], 10 ** 6)
            assert ids.count(eos) == ids.count(bos) == sum(m["role"] == "user" for m in prompt_context(row))
        elif schema == "rl_prompt":
            ids = encode_prompt(tokenizer, prompt_context(row))
            assert ids.count(bos) == sum(m["role"] == "user" for m in prompt_context(row))
            assert ids.count(eos) == ids.count(bos) - 1
        elif schema == "text_document":
            pieces = encode_documents(tokenizer, [row["text"]], 10 ** 6)
            ids = pieces[0]["input_ids"] if pieces else []
            assert ids.count(bos) == ids.count(eos) == (1 if pieces else 0) and ids[:1] in ([bos], [])
        else:
            continue
        assert not banned & set(ids)


@pytest.mark.parametrize("schema", sorted(FILES))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_a_broken_row_is_named_or_harmless(schema, data, tokenizer):
    lines, row, must_fail = data.draw(broken_file(schema))
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), lines)
        try:
            rows = load_records(path, schema)
        except DataValidationError as err:
            _check_problems(err, path, row)
        else:
            assert not must_fail, f"accepted: {lines[row - 1][:300]!r}"
            _encoders_keep_text_apart(schema, rows, tokenizer)


# ----------------------------------------------------------------------------------------- through the CLI
STAGE_INPUTS = {  # stage: (recipe, the data key read first, its schema)
    "pretrain": ("pretrain.yaml", "data.corpus", "text_document"),
    "sft": ("sft.yaml", "data.train", "sft_dialog"),
    "rm": ("rm_helpful.yaml", "data.primary", "preference_pair"),
    "rejection-sampling": ("rejection_sampling.yaml", "data.prompts", "rl_prompt"),
    "ppo": ("ppo.yaml", "data.prompts", "rl_prompt"),
    "gatt": ("gatt.yaml", "data.instructions", "gatt_instruction"),
}
# Each stage's models, set to a checkpoint that exists: a missing model stops a stage before its data is read.
MODEL_KEYS = {"pretrain": (), "ppo": ("model.path", "reward.helpful_rm", "reward.safety_rm")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, nano_model_dir) -> Path:
    """A real finished SFT run: the outputs a failed command must leave alone."""
    from alignment.config import SFTConfig, load_config
    from alignment.stages.sft import run_sft

    from test_sft import recipe

    root = tmp_path_factory.mktemp("finished")
    run_sft(load_config(SFTConfig, recipe(root, nano_model_dir, ROWS["sft_dialog"][:8])))
    return root / "run"


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", sorted(STAGE_INPUTS))
def test_every_stage_stops_on_a_broken_file_and_keeps_the_finished_run(stage, finished_run, nano_model_dir, tmp_path,
                                                                       capsys):
    from alignment.cli import main

    recipe, key, schema = STAGE_INPUTS[stage]
    models = [arg for k in MODEL_KEYS.get(stage, ("model.path",)) for arg in ("--set", f"{k}={nano_model_dir}")]
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                    HealthCheck.function_scoped_fixture])
    @given(case=broken_file(schema).filter(lambda c: c[2]))
    def check(case):
        lines, row, _ = case
        path = _write(tmp_path, lines)
        rc = main([stage, "--recipe", str(REPO / "recipes" / "tiny" / recipe), "--set", f"{key}=[{{path: {path}}}]",
                   "--set", f"output.dir={out}", *models])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, err[-5:]
        assert err[0].startswith(f"align {stage}: data error: {path}:{row}: "), err
        assert all(PROBLEM.match(line) for line in [err[0].split("data error: ", 1)[1], *err[1:]]), err

    check()
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------------------- bad hyper-parameters
# Issue #26: values that trained "successfully" (a negative learning rate, a negative clip, a ratio of 3), or
# failed only after the model loaded (ZeroDivisionError, "range() arg 3 must not be zero"), or inside torch.
NONSENSE = [
    ("schedule.min_lr_ratio=-3", "schedule.min_lr_ratio: -3 is out of range; allowed: [0, 1]"),
    ("optim.grad_clip=-1", "optim.grad_clip: -1 is out of range; allowed: > 0"),
    ("train.max_steps=-5", "train.max_steps: -5 is out of range; allowed: >= 1, or null"),
    ("optim.lr=0", "optim.lr: 0 is out of range; allowed: > 0"),
    ("optim.lr=-1", "optim.lr: -1 is out of range; allowed: > 0"),
    ("optim.lr=.inf", "optim.lr: inf is not a finite number; allowed: > 0"),
    ("schedule.warmup_ratio=2", "schedule.warmup_ratio: 2 is out of range; allowed: [0, 1]"),
    ("optim.weight_decay=-5", "optim.weight_decay: -5 is out of range; allowed: >= 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]: 1.0 is out of range; allowed: [0, 1)"),
    ("output.save_every_steps=-1", "output.save_every_steps: -1 is out of range; allowed: >= 0"),
    ("train.grad_accum=0", "train.grad_accum: 0 is out of range; allowed: >= 1"),
    ("train.micro_batch_size=0", "train.micro_batch_size: 0 is out of range; allowed: >= 1"),
    ("train.epochs=-1", "train.epochs: -1 is out of range; allowed: > 0"),
    # issue #27: a misspelt --set key is the override's fault, not the recipe file's
    ("optim.lrr=1e-4", "optim: unknown key 'lrr'; did you mean 'lr'? Valid keys: betas, eps, grad_clip, lr, "
                       "weight_decay"),
]


@pytest.mark.parametrize("item, message", NONSENSE)
def test_a_nonsense_hyper_parameter_is_one_line_before_anything_is_touched(item, message, finished_run, tmp_path,
                                                                            capsys):
    from alignment.cli import main

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    rc = main(["sft", "--recipe", str(REPO / "recipes" / "tiny" / "sft.yaml"), "--set", f"output.dir={out}",
               "--set", item])
    assert rc == 2
    assert capsys.readouterr().err == f"align sft: error: --set {item}: {message}\n"
    assert _snapshot(out) == before


def test_a_nonsense_value_in_the_recipe_names_its_file_and_line(tmp_path, capsys):
    from alignment.cli import main

    recipe = tmp_path / "sft.yaml"
    recipe.write_text((REPO / "recipes" / "tiny" / "sft.yaml").read_text().replace("grad_accum: 1", "grad_accum: 0"))
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "grad_accum: 0" in text)
    assert main(["sft", "--recipe", str(recipe), "--set", f"output.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == (f"align sft: error: {recipe}:{line}: train.grad_accum: 0 is out of range; "
                                       "allowed: >= 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.yaml"]
