"""`align chat`: the session encodes the dialog like the stages do, streams, and obeys its commands."""
from __future__ import annotations

import io

import pytest

from alignment.chat import encode_prompt
from alignment.chat_session import ChatSession, handle_command, repl
from alignment.generation import generate


@pytest.fixture
def session(nano_model_dir):
    s = ChatSession.from_checkpoint(nano_model_dir, temperature=0, max_new_tokens=10)
    return s


def test_greedy_answers_equal_batched_generation_of_the_same_dialog(session):
    first = session.say("red green blue")
    history = [{"role": "user", "content": "red green blue"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "one more"}]
    session.set_system("be brief")
    assert session.history == [] and session.system == "be brief"
    session.history = history[:2]
    second = session.say("one more")
    dialog = [{"role": "system", "content": "be brief"}] + history
    want = generate(session.model, session.tokenizer, [encode_prompt(session.tokenizer, dialog)],
                    max_new_tokens=10, temperature=0)[0][0].text
    assert second == want
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]


def test_streamed_pieces_make_up_the_answer(session):
    pieces: list[str] = []
    answer = session.say("red green", stream=pieces.append)
    assert "".join(pieces).strip() == answer


def test_commands_change_settings_and_reject_bad_values(session):
    out = io.StringIO()
    session.say("hello there")
    assert handle_command(session, "/temp 0.9", out) and session.settings.temperature == 0.9
    assert handle_command(session, "/top_p 2", out) and session.settings.top_p == 0.9  # refused, unchanged
    assert "top_p must be" in out.getvalue()
    assert handle_command(session, "/max many", out) and "needs a int" in out.getvalue()
    assert handle_command(session, "/reset", out) and session.history == []
    assert handle_command(session, "/bogus", out) and "unknown command /bogus" in out.getvalue()
    assert handle_command(session, "/quit", out) is False


def test_the_terminal_loop_answers_until_quit(session):
    lines = iter(["/system speak softly", "green red", "", "/history", "/quit", "never read"])
    out = io.StringIO()
    repl(session, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "model> " in text and "[system] speak softly" in text and "[user] green red" in text
    assert next(lines) == "never read"


def test_a_dialog_longer_than_the_model_is_refused_with_advice(session):
    session.settings.max_new_tokens = session.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="/reset or lower /max"):
        session.say("red")
    assert session.history == []


def test_not_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
        ChatSession.from_checkpoint(tmp_path)
