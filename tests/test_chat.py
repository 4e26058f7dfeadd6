"""The Llama-2 chat format against hand-written strings, and label masks decoded back to the answers."""
import pytest

from alignment.chat import IGNORE_INDEX, encode_dialog, encode_prompt, format_dialog, truncate_example, validate_roles

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


def test_format_with_system_and_open_turn():
    msgs = [S("S"), U("U1"), A("A1"), U("U2")]
    assert format_dialog(msgs) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]"


def test_format_without_system_multi_turn():
    msgs = [U("hi"), A("hello"), U("sort 3 1"), A("1 3")]
    assert format_dialog(msgs) == "<s>[INST] hi [/INST] hello </s><s>[INST] sort 3 1 [/INST] 1 3 </s>"


def test_format_strips_whitespace():
    msgs = [S("  be brief \n"), U("\n  two plus two? "), A("  four\n\n")]
    assert format_dialog(msgs) == "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\ntwo plus two? [/INST] four </s>"


def test_single_open_turn():
    assert format_dialog([U("q")]) == "<s>[INST] q [/INST]"


@pytest.mark.parametrize("msgs, reason", [
    ([A("a")], "expected 'user'"),
    ([U("a"), U("b")], "expected 'assistant'"),
    ([S("s"), S("t"), U("u")], "expected 'user'"),
    ([U("a"), {"role": "robot", "content": "x"}], "robot"),
    ([U("a"), A("b"), S("late system")], "expected 'user'"),
    ([], "no messages"),
    ([S("only system")], "no user turn"),
])
def test_bad_roles_raise(msgs, reason):
    with pytest.raises(ValueError, match=reason):
        validate_roles(msgs)


def test_final_role_checked():
    with pytest.raises(ValueError, match="must end with a 'assistant'"):
        validate_roles([U("a")], final="assistant")
    with pytest.raises(ValueError, match="must end with a 'user'"):
        validate_roles([U("a"), A("b")], final="user")


def _trained_spans(tok, enc):
    """Decode maximal runs of labelled tokens."""
    spans, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def test_labels_are_exactly_the_answers_and_eos(tokenizer):
    msgs = [S("answer in few words"), U("what is one plus two"), A("three"), U("sort five four"), A("four five")]
    enc = encode_dialog(tokenizer, msgs)
    spans = _trained_spans(tokenizer, enc)
    assert len(spans) == 2
    for span, answer in zip(spans, ["three", "four five"]):
        assert span[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(span[:-1]) == f" {answer} "
    # every pair starts with BOS; the full text decodes to the reference format
    assert enc["input_ids"].count(tokenizer.bos_token_id) == 2
    assert tokenizer.decode(enc["input_ids"]) == format_dialog(msgs)


def test_train_on_last_keeps_only_final_answer(tokenizer):
    msgs = [U("one"), A("two"), U("three"), A("four"), U("five"), A("six")]
    spans = _trained_spans(tokenizer, encode_dialog(tokenizer, msgs, train_on="last"))
    assert [tokenizer.decode(s[:-1]) for s in spans] == [" six "]


def test_user_typed_special_text_is_not_eos(tokenizer):
    enc = encode_dialog(tokenizer, [U("the </s> <s> cat"), A("dog")])
    assert enc["input_ids"].count(tokenizer.eos_token_id) == 1
    assert enc["input_ids"].count(tokenizer.bos_token_id) == 1
    assert "</s> <s> cat" in tokenizer.decode(enc["input_ids"])


def test_prompt_encoding_is_prefix_of_training_encoding(tokenizer):
    """Generation sees the same tokens as training up to [/INST]."""
    msgs = [U("what is two plus three"), A("five")]
    prompt = encode_prompt(tokenizer, msgs[:1])
    full = encode_dialog(tokenizer, msgs)["input_ids"]
    assert full[:len(prompt)] == prompt
    assert encode_dialog(tokenizer, msgs)["labels"][len(prompt)] != IGNORE_INDEX


def test_truncation_drops_answerless_examples(tokenizer):
    enc = encode_dialog(tokenizer, [U("the cat " * 30), A("dog")])
    assert truncate_example(enc, 10) is None
    kept = truncate_example(enc, len(enc["input_ids"]) - 1)
    assert kept is not None and len(kept["input_ids"]) == len(enc["input_ids"]) - 1
