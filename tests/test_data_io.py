"""Readers (JSONL, JSON, Parquet, datasets directories) with row numbers, atomic JSONL writing, hashing."""
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment.data.io import file_sha256, iter_records, load_records, write_jsonl
from alignment.data.schemas import SCHEMA_NAMES, DataValidationError, Problem

USER = {"role": "user", "content": "What is 2 + 2?"}
ANSWER = {"role": "assistant", "content": "4"}
DIALOGS = [
    {"id": "a", "messages": [USER, ANSWER]},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER], "meta": {"n": 1}},
]
PAIRS = [  # prompt in one row, context in the other: columnar files hold nulls for the missing one
    {"id": "p0", "prompt": "Sort 2, 1.", "chosen": "1, 2", "rejected": "2, 1", "rating": "better"},
    {"id": "p1", "context": [USER], "chosen": "4", "rejected": "5", "rating": "slightly_better",
     "kind": "helpfulness", "chosen_safe": True, "rejected_safe": True, "category": "both_safe"},
]


def columns(rows: list[dict]) -> dict[str, list]:
    """Column lists over the union of keys, null where a row lacks one (from_pylist/from_list keep only
    the first row's keys)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def error_of(path, schema="sft_dialog") -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        load_records(path, schema)
    return info.value


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "deep" / "er" / "sft.jsonl"
    assert write_jsonl(path, iter(DIALOGS)) == 2
    assert load_records(path, "sft_dialog") == DIALOGS
    assert list(iter_records(path)) == [(1, DIALOGS[0]), (2, DIALOGS[1])]


def test_jsonl_keeps_unicode_readable_and_rows_on_one_line(tmp_path):
    row = {"id": "u", "messages": [{"role": "user", "content": "caf\u00e9\nzw\u00f6lf \u2028 \u4f60\u597d"}, ANSWER]}
    path = tmp_path / "u.jsonl"
    write_jsonl(path, [row, row | {"id": "v"}])
    text = path.read_text(encoding="utf-8")
    assert "caf\u00e9" in text and "\u4f60" in text and len(text.splitlines()) == 2
    assert load_records(path, "sft_dialog")[0] == row


def test_blank_lines_are_skipped_but_counted(tmp_path):
    bad = json.dumps({"id": "c", "messages": [USER, USER]})
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(DIALOGS[0]), "", "   \t", json.dumps(DIALOGS[1]), "", bad])
    err = error_of(path)
    reason = "expected 'assistant' (after 'user'), got 'user'"
    assert err.problems == [Problem(str(path), 6, "messages[1].role", reason)]
    assert [n for n, _ in iter_records(path)] == [1, 4, 6]


def test_malformed_json_line_reports_line_and_json_error(tmp_path):
    lines = [json.dumps(DIALOGS[0]), '{"id": "b", "messages": [', json.dumps(DIALOGS[1])]
    path = write_lines(tmp_path / "d.jsonl", lines)
    err = error_of(path)
    assert [(p.row, p.field) for p in err.problems] == [(2, "<row>")]
    assert err.problems[0].reason.startswith("invalid JSON: Expecting value at column 26")
    assert str(err).startswith(f"{path}:2: <row>: invalid JSON")


def test_non_utf8_line_is_a_validation_error_not_a_decode_traceback(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(DIALOGS[0]), b'{"id": "\xff\xfe"}', json.dumps(DIALOGS[1])])
    err = error_of(path)
    assert err.problems == [Problem(str(path), 2, "<row>", "not valid UTF-8: byte 0xff at column 9")]
    with pytest.raises(DataValidationError, match=":2: <row>: not valid UTF-8"):
        list(iter_records(path))


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(DIALOGS[0]).encode() + b"\r\n")
    assert load_records(path, "sft_dialog") == [DIALOGS[0]]


@pytest.mark.parametrize("line,kind", [("[1, 2]", "array"), ('"text"', "string"), ("3", "number"), ("null", "null")])
def test_top_level_non_object_is_an_error(tmp_path, line, kind):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(DIALOGS[0]), line])
    assert error_of(path).problems == [Problem(str(path), 2, "<row>", f"expected a JSON object, got {kind}")]


def test_iter_records_yields_rows_up_to_the_first_unreadable_one(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(DIALOGS[0]), "nope", json.dumps(DIALOGS[1])])
    rows = iter_records(path)
    assert next(rows) == (1, DIALOGS[0])
    with pytest.raises(DataValidationError) as info:
        next(rows)
    assert info.value.problems[0][:3] == (str(path), 2, "<row>")


def test_unreadable_and_invalid_rows_are_reported_together(tmp_path):
    lines = [json.dumps(DIALOGS[0]), "{", json.dumps({"id": "x", "messages": [USER]}), b"\x80", "[]"]
    path = write_lines(tmp_path / "d.jsonl", lines)
    err = error_of(path)
    assert [(p.row, p.field) for p in err.problems] == [(2, "<row>"), (3, "messages"), (4, "<row>"), (5, "<row>")]
    assert err.total == 4 and len(str(err).splitlines()) == 4


def test_many_bad_rows_report_the_first_ten_and_count_the_rest(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [DIALOGS[0]] + [{"id": str(i), "messages": []} for i in range(25)])
    err = error_of(path)
    assert [p.row for p in err.problems] == list(range(2, 12))
    assert str(err).splitlines()[-1] == "... and 15 more"


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(DIALOGS + [{"id": "c", "messages": "hi"}, 5]))
    err = error_of(path)
    assert [(p.row, p.field) for p in err.problems] == [(3, "messages"), (4, "<row>")]
    path.write_text(json.dumps(DIALOGS))
    assert load_records(path, "sft_dialog") == DIALOGS


@pytest.mark.parametrize("text,reason", [
    ('{"id": "a"}', "expected a JSON list of objects, got object"),
    ('[{"id": "a"},\n  oops]', "invalid JSON: Expecting value at line 2 column 3"),
])
def test_json_file_level_problems(tmp_path, text, reason):
    path = tmp_path / "d.json"
    path.write_text(text)
    assert error_of(path).problems == [Problem(str(path), 0, "<file>", reason)]
    assert str(error_of(path)) == f"{path}: <file>: {reason}"


def test_parquet_round_trip_with_nulls_as_absent_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(columns(PAIRS)), path)
    assert load_records(path, "preference_pair") == PAIRS
    assert [n for n, _ in iter_records(path)] == [1, 2]


def test_parquet_bad_row_reports_its_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = PAIRS + [dict(PAIRS[0], id="p2", rating="best"), dict(PAIRS[0], id="p3")]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(columns(rows)), path, row_group_size=1)
    err = error_of(path, "preference_pair")
    assert [(p.row, p.field) for p in err.problems] == [(3, "rating")]
    assert f"{path}:3: rating: must be one of" in str(err)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("hello")
    problem = error_of(path).problems[0]
    assert (problem.row, problem.field) == (0, "<file>") and "not a readable Parquet file" in problem.reason


def test_datasets_directory_round_trip(tmp_path):
    import datasets

    path = tmp_path / "pairs_ds"
    datasets.Dataset.from_dict(columns(PAIRS)).save_to_disk(str(path))
    assert load_records(path, "preference_pair") == PAIRS
    bad = tmp_path / "bad_ds"
    datasets.Dataset.from_dict(columns(PAIRS + [dict(PAIRS[1], id="p2", chosen_safe=False)])).save_to_disk(str(bad))
    err = error_of(bad, "preference_pair")
    assert [(p.row, p.field) for p in err.problems] == [(3, "chosen_safe")]
    assert "chosen is unsafe but rejected is safe" in str(err)


def test_datasets_dict_and_plain_directories_are_clear_errors(tmp_path):
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns(DIALOGS))}).save_to_disk(str(dd))
    with pytest.raises(DataValidationError, match="DatasetDict: pass one split's directory"):
        load_records(dd, "sft_dialog")
    assert load_records(dd / "train", "sft_dialog") == DIALOGS
    with pytest.raises(DataValidationError, match="not one written by datasets.Dataset.save_to_disk"):
        iter_records(tmp_path / "dd" / "train" / "..")  # the DatasetDict root again, via iter_records
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataValidationError, match="no state.json"):
        load_records(tmp_path / "plain", "sft_dialog")


def test_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,messages\n")
    with pytest.raises(DataValidationError, match=r"unsupported file type '\.csv': expected \.jsonl, \.json"):
        load_records(path, "sft_dialog")
    missing = tmp_path / "nope.jsonl"
    for call in (lambda: load_records(missing, "sft_dialog"), lambda: iter_records(missing)):
        with pytest.raises(FileNotFoundError, match="nope.jsonl"):
            call()


def test_nothing_is_returned_unless_every_row_is_valid(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, DIALOGS + [{"id": "c"}])
    with pytest.raises(DataValidationError):
        load_records(path, "sft_dialog")


def test_write_jsonl_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    os.chmod(path, 0o640)
    write_jsonl(path, DIALOGS)
    assert [json.loads(line) for line in path.read_text().splitlines()] == DIALOGS
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize("bad_row", [{"x": object()}, {"x": math.nan}])
def test_write_jsonl_failure_keeps_the_old_file(tmp_path, bad_row):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, DIALOGS)
    before = path.read_bytes()

    def rows():
        yield DIALOGS[0]
        yield bad_row

    with pytest.raises((TypeError, ValueError)):
        write_jsonl(path, rows())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_file_sha256_of_files_and_directories(tmp_path):
    path = tmp_path / "d" / "a.jsonl"
    write_jsonl(path, DIALOGS)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.txt").write_text("b")
    first = file_sha256(tmp_path / "d")
    assert file_sha256(tmp_path / "d") == first
    (tmp_path / "d" / "sub" / "b.txt").write_text("c")
    changed = file_sha256(tmp_path / "d")
    assert changed != first
    (tmp_path / "d" / "sub" / "b.txt").rename(tmp_path / "d" / "sub" / "c.txt")
    assert file_sha256(tmp_path / "d") not in (first, changed)
    with pytest.raises(FileNotFoundError, match="missing"):
        file_sha256(tmp_path / "missing")


# Arbitrary JSON-ish values, and dialogs close enough to valid that the role checks run.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": st.text(max_size=4)})
    | json_values,
    max_size=5,
)
FIELDS = ["id", "messages", "prompt", "context", "chosen", "rejected", "rating", "kind", "chosen_safe",
          "rejected_safe", "category", "is_safety", "instruction", "short", "constraints", "held_out", "meta", "x"]
rows = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values | messages | st.sampled_from(["better", "unsure", "both_safe", "helpful", "", " "]),
    max_size=10,
)
lines = st.one_of(rows.map(lambda r: json.dumps(r).encode()), json_values.map(lambda v: json.dumps(v).encode()),
                  st.binary(max_size=12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, max_size=6), st.sampled_from(SCHEMA_NAMES))
def test_any_input_gives_rows_or_a_validation_error(file_lines, schema):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in file_lines))
        try:
            rows_read = load_records(path, schema)
        except DataValidationError as err:
            assert 1 <= len(err.problems) <= 10 and str(err)
            assert all(1 <= p.row <= len(file_lines) for p in err.problems)
        else:
            assert len(rows_read) <= len(file_lines)
