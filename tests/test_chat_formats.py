"""Both chat formats (`chat.template: llama2 | model`) on the toy tokenizer and on SmolLM2's own tokenizer,
against an independent reference built from character offsets: render the whole dialog as text, find each
answer's character span, tokenize the whole text at once and label the tokens that overlap a span."""
import functools
import json
import random

import pytest
import torch

from alignment import chat
from alignment.chat import IGNORE_INDEX, LLAMA2_CHAT_TEMPLATE, encode, encode_dialog, encode_prompt, stop_token_id
from alignment.models.tokenizer import load_tokenizer, save_tokenizer

from conftest import SMOLLM2_DIR

WORDS = ("the cat sat on a mat , what is two plus three ? five . sort 3 1 2 : 1 2 3 Paris capital of France "
         "I can not help with that ! count letters in word ( ok ) \" quoted \" 42 - yes no").split()
TYPED = ["<|im_end|>", "</s>", "<s>", "[INST]", "[/INST]", "<|im_start|>", "<<SYS>>", "<|endoftext|>"]


def random_dialogs(n: int, seed: int, typed: bool = False) -> list[list[dict]]:
    """Dialogs of 1-4 answered turns (some ending with an open user turn), half with a system prompt;
    contents already stripped (both formats strip them). With `typed`, special-token text inside messages."""
    rng = random.Random(seed)

    def text():
        words = rng.choices(WORDS + (TYPED if typed else []), k=rng.randint(1, 12))
        return " ".join(words)

    dialogs = []
    for i in range(n):
        msgs = [{"role": "system", "content": text()}] if i % 2 == 0 else []
        for _ in range(rng.randint(1, 4)):
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        if i % 5 == 4:
            msgs.append({"role": "user", "content": text()})
        dialogs.append(msgs)
    return dialogs


@functools.lru_cache(maxsize=None)
def fresh(path, template):
    """A tokenizer of this module's own (the session fixtures are shared; choosing a template changes the
    object); never changed by a test."""
    return load_tokenizer(path, template)


def labels_from_spans(tok, text: str, spans: list[tuple[int, int]]) -> dict:
    """The reference: tokenize `text` whole (special-token text -> ids), label tokens overlapping a span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [t if any(b > s and a < e for s, e in spans) else IGNORE_INDEX for t, (a, b) in zip(ids, offsets)]
    return {"input_ids": ids, "labels": labels}


def trained(msgs: list[dict], train_on: str) -> list[int]:
    """Indices of the assistant messages that carry labels."""
    answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    return answers if train_on == "all" else (answers[-1:] if msgs[-1]["role"] == "assistant" else [])


def llama2_reference(tok, msgs: list[dict], train_on: str) -> dict:
    """format_dialog's text with the tokenizer's own BOS/EOS text; an answer's span runs from the end of
    its `[/INST]` to the end of its EOS (the space before and after the answer are the answer's)."""
    text = chat.format_dialog(msgs).replace(chat.BOS_TEXT, tok.bos_token).replace(chat.EOS_TEXT, tok.eos_token)
    spans, cursor, keep = [], 0, set(trained(msgs, train_on))
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        needle = f"{chat.E_INST} {m['content']} {tok.eos_token}"
        at = text.index(needle, cursor)
        cursor = at + len(needle)
        if k in keep:
            spans.append((at + len(chat.E_INST), cursor))
    return labels_from_spans(tok, text, spans)


def chatml_reference(tok, msgs: list[dict], train_on: str) -> dict:
    """The tokenizer's own template text (ChatML); an answer's span is its content and the `<|im_end|>`."""
    text = tok.apply_chat_template(msgs, tokenize=False)
    spans, cursor, keep = [], 0, set(trained(msgs, train_on))
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head, needle = "<|im_start|>assistant\n", f"<|im_start|>assistant\n{m['content']}<|im_end|>"
        at = text.index(needle, cursor)
        cursor = at + len(needle)
        if k in keep:
            spans.append((at + len(head), cursor))
    return labels_from_spans(tok, text, spans)


# ------------------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_llama2_format_matches_offset_reference_on_both_tokenizers(tokenizer_dir, train_on):
    for path in (tokenizer_dir, SMOLLM2_DIR):
        tok = fresh(path, "llama2")
        for msgs in random_dialogs(60, seed=1):
            assert encode(tok, msgs, train_on) == llama2_reference(tok, msgs, train_on), msgs


def test_llama2_format_uses_the_tokenizers_own_bos_eos():
    tok = fresh(SMOLLM2_DIR, "llama2")
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    assert tok.pad_token_id == 2
    enc = encode_dialog(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert enc["input_ids"][0] == 1 and enc["input_ids"][-1] == 2 and enc["labels"][-1] == 2
    assert stop_token_id(tok) == 2


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_model_template_matches_offset_reference_on_smollm2(train_on):
    tok = fresh(SMOLLM2_DIR, "model")
    for msgs in random_dialogs(60, seed=2):
        got = encode(tok, msgs, train_on)
        assert got == chatml_reference(tok, msgs, train_on), msgs
        # and the ids are exactly what HF's own tokenization of the template gives
        assert got["input_ids"] == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])


def test_smollm2_template_fixture():
    tok = load_tokenizer(SMOLLM2_DIR)
    assert "<|im_start|>" in tok.chat_template and len(tok) == 49152
    config = json.loads((SMOLLM2_DIR / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_model_template_labels_answer_and_end_of_turn_only():
    tok = fresh(SMOLLM2_DIR, "model")
    msgs = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "assistant"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "Paris."}]
    enc = encode(tok, msgs)
    runs, cur = [], []
    for t, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r) for r in runs] == ["assistant<|im_end|>", "Paris.<|im_end|>"]
    assert stop_token_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_llama2_jinja_template_reproduces_the_llama2_encoding(tokenizer_dir):
    """The Llama-2 format rendered by LLAMA2_CHAT_TEMPLATE through the `model` path gives the same ids and
    labels as encode_dialog (so a saved Llama-2-format checkpoint's chat template renders what it learnt)."""
    for path in (tokenizer_dir, SMOLLM2_DIR):
        tok = load_tokenizer(path, "model")
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
        for msgs in random_dialogs(40, seed=3, typed=True):
            for train_on in ("all", "last"):
                assert chat.encode_dialog_model(tok, msgs, train_on) == encode_dialog(tok, msgs, train_on), msgs
            if msgs[-1]["role"] == "user":
                assert encode_prompt(tok, msgs) == encode_dialog(tok, msgs)["input_ids"]


# ------------------------------------------------------------------------------ typed special-token text
@pytest.mark.parametrize("template", ["llama2", "model"])
def test_typed_special_token_text_stays_text(template):
    tok = fresh(SMOLLM2_DIR, template)
    for msgs in random_dialogs(40, seed=4, typed=True):
        plain = [{**m, "content": "x"} for m in msgs]  # the same dialog with no typed text: its special ids
        specials = set(tok.all_special_ids)
        count = lambda ids: sorted(t for t in ids if t in specials)  # noqa: E731
        assert count(encode(tok, msgs)["input_ids"]) == count(encode(tok, plain)["input_ids"])
        if msgs[-1]["role"] == "user":
            assert count(encode_prompt(tok, msgs)) == count(encode_prompt(tok, plain))
    msgs = [{"role": "user", "content": "say <|im_end|> and </s> [INST]"},
            {"role": "assistant", "content": "<|im_end|>"}]
    enc = encode(tok, msgs)
    assert "say <|im_end|> and </s> [INST]" in tok.decode(enc["input_ids"])
    labelled = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert labelled.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1  # the closing one, not the typed one


def test_typed_special_text_stays_text_on_toy_tokenizer(tokenizer_dir):
    tok = fresh(tokenizer_dir, "llama2")
    enc = encode(tok, [{"role": "user", "content": "a </s> <s> [INST] b"}, {"role": "assistant", "content": "</s>"}])
    assert enc["input_ids"].count(tok.eos_token_id) == 1 and enc["input_ids"].count(tok.bos_token_id) == 1


# ------------------------------------------------------------------------------ prompts for generation
def test_prompts_are_the_training_prefix_in_both_formats():
    for template in ("llama2", "model"):
        tok = fresh(SMOLLM2_DIR, template)
        for msgs in random_dialogs(30, seed=5):
            if msgs[-1]["role"] != "assistant":
                continue
            prompt = encode_prompt(tok, msgs[:-1])
            full = encode(tok, msgs)
            assert full["input_ids"][:len(prompt)] == prompt
            assert full["labels"][len(prompt)] != IGNORE_INDEX  # the first answer token follows the prompt
            assert all(label == IGNORE_INDEX for label in full["labels"][:len(prompt)][-3:])


def test_model_prompt_ends_with_the_assistant_header():
    tok = fresh(SMOLLM2_DIR, "model")
    prompt = encode_prompt(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert tok.decode(prompt).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_model_template_needs_a_chat_template(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = None
    chat.set_template(tok, "model")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        encode(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="must be one of llama2, model"):
        chat.set_template(tok, "chatml")


# ------------------------------------------------------------------------------ the choice travels
def test_choice_round_trips_through_a_checkpoint_and_an_rm_scores_with_it(tmp_path, smollm2_random_dir):
    from transformers import AutoModelForSequenceClassification

    from alignment.scoring import encode_for_reward, reward_scores

    tok = load_tokenizer(smollm2_random_dir, "model")
    assert chat.template_of(tok) == "model"
    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(smollm2_random_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir)
    save_tokenizer(tok, rm_dir)
    assert json.loads((rm_dir / chat.TEMPLATE_FILE).read_text()) == {"template": "model"}

    loaded = load_tokenizer(rm_dir)  # no recipe value: the stored choice
    assert chat.template_of(loaded) == "model"
    context, answer = [{"role": "user", "content": "What is the capital of France?"}], "Paris."
    ids = encode_for_reward(loaded, context, answer, 1024)
    assert ids == chat.encode_dialog_model(loaded, [*context, {"role": "assistant", "content": answer}])["input_ids"]
    assert tok.decode(ids).startswith("<|im_start|>system\n")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    score = reward_scores(rm, loaded, [context], [answer])
    with torch.no_grad():
        want = rm(torch.tensor([ids])).logits[0, 0]
    assert score[0].item() == pytest.approx(want.item(), abs=1e-5)
    with pytest.raises(ValueError, match="was trained with 'model', the recipe says 'llama2'"):
        load_tokenizer(rm_dir, "llama2")


def test_llama2_checkpoint_carries_a_jinja_template_that_renders_it(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, "llama2")
    save_tokenizer(tok, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert chat.template_of(loaded) == "llama2" and loaded.chat_template == LLAMA2_CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one plus two"},
            {"role": "assistant", "content": "three"}]
    rendered = loaded.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert list(rendered) == encode_dialog(loaded, msgs)["input_ids"]


def test_no_stored_choice_reads_as_llama2(tokenizer_dir):
    assert chat.read_template(tokenizer_dir) is None
    assert chat.template_of(load_tokenizer(tokenizer_dir)) == "llama2"


def test_ppo_refuses_rms_of_another_template(tmp_path):
    from types import SimpleNamespace

    from alignment.stages.ppo import check_rm_templates

    for name, template in (("helpful", "model"), ("safety", "llama2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / chat.TEMPLATE_FILE).write_text(json.dumps({"template": template}))
    reward = SimpleNamespace(helpful_rm=str(tmp_path / "helpful"), safety_rm=str(tmp_path / "safety"))
    with pytest.raises(ValueError, match="reward.safety_rm: .* chat template 'llama2', the actor with 'model'"):
        check_rm_templates(SimpleNamespace(reward=reward), "model")
    (tmp_path / "safety" / chat.TEMPLATE_FILE).write_text(json.dumps({"template": "model"}))
    check_rm_templates(SimpleNamespace(reward=reward), "model")


def test_recipe_chat_template_section():
    from alignment.config import ConfigError, SFTConfig, load_config

    assert load_config(SFTConfig, "recipes/tiny/sft.yaml").chat.template is None  # unset: the stored one
    assert load_config(SFTConfig, "recipes/tiny/sft.yaml", ["chat.template=model"]).chat.template == "model"
    with pytest.raises(ConfigError, match="'chatml' is not one of 'llama2', 'model'"):
        load_config(SFTConfig, "recipes/tiny/sft.yaml", ["chat.template=chatml"])
