"""The JSON Schemas in data_schemas/ and row validation: every rule, with the row and field it reports."""
import copy
import json
import pickle
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from alignment import chat
from alignment.data.schemas import (
    CORE_SCHEMAS,
    SCHEMA_DIR,
    SCHEMA_NAMES,
    DataValidationError,
    Problem,
    load_schema,
    pair_context,
    prompt_context,
    row_problems,
    validate_records,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"
USER = {"role": "user", "content": "Sort 3, 1, 2."}
ANSWER = {"role": "assistant", "content": "1, 2, 3"}

GOOD = {
    "sft_dialog": {"id": "s", "messages": [USER, ANSWER], "source": "test", "meta": {"seed": 1}},
    "preference_pair": {
        "id": "p", "prompt": "Sort 3, 1, 2.", "chosen": "1, 2, 3", "rejected": "3, 2, 1",
        "rating": "better", "kind": "helpfulness", "chosen_safe": True, "rejected_safe": True,
        "category": "both_safe", "source": "test", "meta": {},
    },
    "rl_prompt": {"id": "r", "context": [USER], "is_safety": False, "kind": "helpful", "meta": {"x": [1]}},
    "gatt_instruction": {
        "id": "g", "instruction": "Always answer in upper case.", "short": False,
        "constraints": [{"type": "upper_case", "value": ""}], "held_out": False,
    },
}


def with_changes(schema, **changes):
    """GOOD[schema] with fields set (value) or deleted (value None)."""
    row = copy.deepcopy(GOOD[schema])
    for key, value in changes.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    return row


def problems_of(row, schema, row_no=7):
    with pytest.raises(DataValidationError) as info:
        validate_records([(row_no, row)], schema, source="rows.jsonl")
    return info.value.problems


@pytest.mark.parametrize("schema", CORE_SCHEMAS)
def test_good_rows_pass_and_come_back_unchanged(schema):
    row = GOOD[schema]
    assert validate_records([(1, row)], schema, source="x") == [row]
    assert row_problems(row, schema) == []


@pytest.mark.parametrize("schema", CORE_SCHEMAS)
def test_fixture_files_are_valid(schema):
    lines = (FIXTURES / f"{schema}.jsonl").read_text().splitlines()
    rows = [(i, json.loads(line)) for i, line in enumerate(lines, start=1)]
    assert len(validate_records(rows, schema, source="fixture")) == len(lines) >= 2


def test_good_variants():
    system_dialog = {"id": "s", "messages": [{"role": "system", "content": ""}, USER, ANSWER, USER, ANSWER]}
    assert row_problems(system_dialog, "sft_dialog") == []  # an empty system prompt is allowed
    context = [{"role": "system", "content": "Be brief."}, USER, ANSWER, USER]
    pair = with_changes("preference_pair", prompt=None, context=context, chosen_safe=None, category=None)
    assert row_problems(pair, "preference_pair") == []
    unsafe_pair = with_changes("preference_pair", chosen_safe=False, rejected_safe=False, category="both_unsafe")
    assert row_problems(unsafe_pair, "preference_pair") == []
    for rating in ("significantly_better", "better", "slightly_better", "negligibly_better", "unsure"):
        assert row_problems(with_changes("preference_pair", rating=rating), "preference_pair") == []


BAD = [
    # (schema, row, field, words in the reason)
    ("sft_dialog", with_changes("sft_dialog", id=None), "id", "required field missing"),
    ("sft_dialog", with_changes("sft_dialog", id=3), "id", "expected string, got number"),
    ("sft_dialog", with_changes("sft_dialog", id=""), "id", "must not be empty"),
    ("sft_dialog", with_changes("sft_dialog", messages="hi"), "messages", "expected array, got string"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER]), "messages", "at least 2 item(s), got 1"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER, {"role": "bot", "content": "x"}]),
     "messages[1].role", "must be one of 'system', 'user', 'assistant'; got 'bot'"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER, USER]), "messages[1].role", "expected 'assistant'"),
    ("sft_dialog", with_changes("sft_dialog", messages=[ANSWER, USER]), "messages[0].role", "expected 'user'"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER, ANSWER, USER]), "messages[2].role",
     "must end with a 'assistant' turn"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER, {"role": "system", "content": "x"}, ANSWER]),
     "messages[1].role", "expected 'assistant'"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER, {"role": "assistant", "content": ""}]),
     "messages[1].content", "must not be empty or whitespace-only"),
    ("sft_dialog", with_changes("sft_dialog", messages=[{"role": "user", "content": " \n\t"}, ANSWER]),
     "messages[0].content", "must not be empty or whitespace-only"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER, {"role": "assistant", "content": None}]),
     "messages[1].content", "expected string, got null"),
    ("sft_dialog", with_changes("sft_dialog", messages=[USER, {"role": "assistant", "contents": "x"}]),
     "messages[1].contents", "did you mean 'content'?"),
    ("sft_dialog", with_changes("sft_dialog", mesages=[]), "mesages", "unknown field (did you mean 'messages'?)"),
    ("sft_dialog", with_changes("sft_dialog", meta=[]), "meta", "expected object, got array"),
    ("preference_pair", with_changes("preference_pair", context=[USER]), "prompt/context", "got both"),
    ("preference_pair", with_changes("preference_pair", prompt=None), "prompt/context", "got neither"),
    ("preference_pair", with_changes("preference_pair", rating="much_better"), "rating", "got 'much_better'"),
    ("preference_pair", with_changes("preference_pair", rating=None), "rating", "required field missing"),
    ("preference_pair", with_changes("preference_pair", chosen=""), "chosen", "must not be empty"),
    ("preference_pair", with_changes("preference_pair", rejected=" "), "rejected", "must not be empty"),
    ("preference_pair", with_changes("preference_pair", chosen_safe="yes"), "chosen_safe", "expected boolean"),
    ("preference_pair", with_changes("preference_pair", kind="harmless"), "kind", "got 'harmless'"),
    ("preference_pair", with_changes("preference_pair", category="unsafe"), "category", "got 'unsafe'"),
    ("preference_pair", with_changes("preference_pair", chosen_safe=False, rejected_safe=True, category=None),
     "chosen_safe", "chosen is unsafe but rejected is safe"),
    ("preference_pair", with_changes("preference_pair", rejected_safe=False), "category",
     "'both_safe' needs rejected_safe=True, got rejected_safe=False"),
    ("preference_pair", with_changes("preference_pair", chosen_safe=None, category="both_unsafe"), "category",
     "'both_unsafe' needs rejected_safe=False"),
    ("preference_pair", with_changes("preference_pair", prompt=None, context=[USER, ANSWER]),
     "context[1].role", "must end with a 'user' turn"),
    ("preference_pair", with_changes("preference_pair", prompt=None, context=[]), "context", "at least 1 item"),
    ("rl_prompt", with_changes("rl_prompt", is_safety=None), "is_safety", "required field missing"),
    ("rl_prompt", with_changes("rl_prompt", is_safety=1), "is_safety", "expected boolean, got number"),
    ("rl_prompt", with_changes("rl_prompt", prompt="hi"), "prompt/context", "got both"),
    ("rl_prompt", with_changes("rl_prompt", context=[USER, ANSWER]), "context[1].role", "'user' turn"),
    ("rl_prompt", with_changes("rl_prompt", context=[ANSWER]), "context[0].role", "expected 'user'"),
    ("rl_prompt", with_changes("rl_prompt", kind="evil"), "kind", "got 'evil'"),
    ("gatt_instruction", with_changes("gatt_instruction", constraints=[]), "constraints", "at least 1 item"),
    ("gatt_instruction", with_changes("gatt_instruction", constraints=[{"type": "upper_case"}]),
     "constraints[0].value", "required field missing"),
    ("gatt_instruction", with_changes("gatt_instruction", constraints=[{"type": "x", "value": "", "w": 1}]),
     "constraints[0].w", "unknown field"),
    ("gatt_instruction", with_changes("gatt_instruction", short=None), "short", "required field missing"),
    ("gatt_instruction", with_changes("gatt_instruction", held_out="no"), "held_out", "expected boolean"),
    ("gatt_instruction", with_changes("gatt_instruction", instruction=""), "instruction", "must not be empty"),
]


@pytest.mark.parametrize("schema,row,field,reason", BAD, ids=[f"{b[0]}:{b[2]}:{b[3][:24]}" for b in BAD])
def test_bad_row_names_row_field_and_reason(schema, row, field, reason):
    problems = problems_of(row, schema, row_no=7)
    assert {(p.file, p.row) for p in problems} == {("rows.jsonl", 7)}
    assert any(p.field == field and reason in p.reason for p in problems), problems
    with pytest.raises(DataValidationError) as info:
        validate_records([(1, GOOD[schema]), (7, row)], schema, source="rows.jsonl")
    assert f"rows.jsonl:7: {field}: " in str(info.value)


@pytest.mark.parametrize("schema", CORE_SCHEMAS)
def test_every_schema_rejects_non_objects_and_unknown_fields(schema):
    assert problems_of([GOOD[schema]], schema)[0][2:] == ("<row>", "expected a JSON object, got array")
    problem = problems_of(with_changes(schema, zzz=1), schema)[0]
    assert problem.field == "zzz" and "unknown field" in problem.reason


def test_a_row_with_several_problems_reports_each():
    row = {"messages": [USER, {"role": "bot", "content": "x"}], "extra": 1}
    fields = [p.field for p in problems_of(row, "sft_dialog")]
    assert fields == ["id", "extra", "messages[1].role"]


def test_several_bad_rows_are_all_reported_in_order():
    rows = [(1, GOOD["rl_prompt"])]
    rows += [(n, with_changes("rl_prompt", id=f"r{n}", is_safety="no")) for n in (3, 4, 9)]
    with pytest.raises(DataValidationError) as info:
        validate_records(rows, "rl_prompt", source="prompts.jsonl")
    err = info.value
    assert [(p.row, p.field) for p in err.problems] == [(3, "is_safety"), (4, "is_safety"), (9, "is_safety")]
    assert err.total == 3
    assert str(err).splitlines() == [
        "prompts.jsonl:3: is_safety: expected boolean, got string",
        "prompts.jsonl:4: is_safety: expected boolean, got string",
        "prompts.jsonl:9: is_safety: expected boolean, got string",
    ]


def test_first_problems_are_kept_and_the_rest_counted():
    rows = [(n, {"id": f"x{n}"}) for n in range(1, 31)]  # each misses `messages`
    with pytest.raises(DataValidationError) as info:
        validate_records(rows, "sft_dialog", source="f.jsonl")
    err = info.value
    assert [p.row for p in err.problems] == list(range(1, 11))
    assert err.total == 30
    lines = str(err).splitlines()
    assert lines[0] == "f.jsonl:1: messages: required field missing"
    assert len(lines) == 11 and lines[-1] == "... and 20 more"

    with pytest.raises(DataValidationError) as info:
        validate_records(rows, "sft_dialog", source="f.jsonl", max_errors=3)
    assert len(info.value.problems) == 3 and str(info.value).endswith("... and 27 more")


def test_duplicate_ids_are_rejected():
    rows = [(1, GOOD["sft_dialog"]), (2, with_changes("sft_dialog", id="other")), (5, GOOD["sft_dialog"])]
    problem = problems_of_rows(rows, "sft_dialog")[0]
    assert problem == Problem("rows.jsonl", 5, "id", "duplicate id 's' (first at row 1)")


def problems_of_rows(rows, schema):
    with pytest.raises(DataValidationError) as info:
        validate_records(rows, schema, source="rows.jsonl")
    return info.value.problems


def test_error_is_a_value_error_that_pickles():
    err = DataValidationError([("a.jsonl", 2, "id", "required field missing")], total=4)
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and back.total == 4 and str(back) == str(err)
    assert str(err) == "a.jsonl:2: id: required field missing\n... and 3 more"
    assert str(DataValidationError([("a.json", 0, "<file>", "invalid JSON")])) == "a.json: <file>: invalid JSON"


def test_unknown_schema_name_fails_before_reading():
    def never():
        raise AssertionError("records were read")
        yield

    with pytest.raises(ValueError, match="unknown schema 'sft'"):
        validate_records(never(), "sft", source="x")


def test_prompt_and_pair_context():
    assert prompt_context({"id": "r", "prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    context = [{"role": "system", "content": "s"}, USER]
    row = {"id": "p", "context": context}
    got = pair_context(row)
    assert got == context
    got.append(ANSWER)
    got[0]["content"] = "changed"
    assert row["context"] == [{"role": "system", "content": "s"}, USER]  # a copy, not the row's list
    for bad in ({"id": "x"}, {"id": "x", "prompt": "a", "context": [USER]}):
        with pytest.raises(ValueError, match="exactly one of 'prompt' or 'context'"):
            prompt_context(bad)


def test_schema_files_are_valid_draft_2020_12_and_closed():
    ids = set()
    for name in SCHEMA_NAMES:
        schema = load_schema(name)
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["title"] == name and schema["additionalProperties"] is False
        assert schema["properties"]["meta"] == {"type": "object"}
        ids.add(schema["$id"])
    assert len(ids) == len(SCHEMA_NAMES)
    assert set(CORE_SCHEMAS) <= set(SCHEMA_NAMES) == {p.stem for p in SCHEMA_DIR.glob("*.json")}


def test_schema_roles_match_the_chat_format():
    message = load_schema("sft_dialog")["$defs"]["message"]
    assert tuple(message["properties"]["role"]["enum"]) == chat.ROLES


def test_a_schema_without_required_id_skips_the_duplicate_check(tmp_path, monkeypatch):
    import alignment.data.schemas as schemas

    (tmp_path / "note.json").write_text(json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://alignment.invalid/t/note.json",
        "type": "object", "required": ["text"], "additionalProperties": False,
        "properties": {"id": {"type": "string"}, "text": {"type": "string"}},
    }))
    monkeypatch.setattr(schemas, "SCHEMA_DIR", tmp_path)
    monkeypatch.setattr(schemas, "SCHEMA_NAMES", ("note",))
    schemas.load_schema.cache_clear()
    schemas._validator.cache_clear()
    try:
        rows = [{"text": "a"}, {"text": "b"}]
        assert validate_records(enumerate(rows, start=1), "note", source="n") == rows
        assert problems_of({"text": 3}, "note")[0][2:] == ("text", "expected string, got number")
    finally:
        schemas.load_schema.cache_clear()  # the real schemas load again once monkeypatch restores the dir
        schemas._validator.cache_clear()
