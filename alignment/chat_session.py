"""`align chat --checkpoint DIR`: talk to any checkpoint in the Llama-2 chat format, in a terminal or a notebook.

`ChatSession` keeps the multi-turn history and the system prompt, encodes them with `alignment.chat`
(the same encoding the stages train on), and samples the next answer with the KV cache, streaming the
text as it is produced. The terminal loop adds commands:

    /reset            forget the dialog (the system prompt stays)
    /system TEXT      set the system prompt (empty: none) and start over
    /temp X  /top_p X  /max N   sampling settings
    /history          print the dialog so far
    /quit             leave (so does Ctrl-D)

In a notebook: `ChatSession.from_checkpoint("runs/demo/ppo/final").say("Hello")` returns the answer.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from alignment.chat import encode_prompt, stop_token_id
from alignment.model_card import REWARD_MODEL, checkpoint_kind
from alignment.models import loading as models_loading


@dataclass
class SamplingSettings:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def load_policy(checkpoint: str | Path):
    """(model, tokenizer) of a finished policy checkpoint directory, offline, in eval mode. A run directory
    (its model is in final/), a reward model and a directory that holds no model are each one clear error
    (the shared loader also takes hub ids)."""
    path = Path(checkpoint)
    kind = checkpoint_kind(path)
    if kind is None and checkpoint_kind(path / "final") is not None:
        raise FileNotFoundError(f"{path} is a run directory; its model is in {path / 'final'}")
    if kind is None:
        raise FileNotFoundError(f"{path}: not a model checkpoint (no model config.json); give a stage's final/ "
                                "directory")
    if kind == REWARD_MODEL:
        raise ValueError(f"{path} is a reward model (it scores answers, it does not chat); give a policy's final/")
    return models_loading.load_policy(str(path))


class _TextStream:
    """A `generate` streamer that decodes the growing answer and hands each new piece of text to `emit`.

    Decoding the whole answer each time (not token by token) keeps multi-byte characters whole."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.stop = stop_token_id(tokenizer)
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids += [t for t in value.reshape(-1).tolist() if t != self.stop]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            self.emit(text[len(self.shown):])
            self.shown = text

    def end(self) -> None:
        pass


@dataclass
class ChatSession:
    """A dialog with one model: history, optional system prompt and sampling settings."""

    model: object
    tokenizer: object
    system: str | None = None
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    history: list[dict] = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, system: str | None = None, **settings) -> "ChatSession":
        model, tokenizer = load_policy(checkpoint)
        return cls(model, tokenizer, system=system or None, settings=SamplingSettings(**settings))

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = (text or "").strip() or None
        self.reset()

    @torch.no_grad()
    def say(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """Add a user turn, sample the answer (streamed to `stream` piece by piece), keep both in the history."""
        if not text.strip():
            raise ValueError("empty message")
        self.settings.check()
        messages = self.messages() + [{"role": "user", "content": text}]
        ids = torch.tensor([encode_prompt(self.tokenizer, messages)], device=self.model.device)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + self.settings.max_new_tokens > limit:
            raise ValueError(f"the dialog is {ids.shape[1]} tokens; with max_new_tokens={self.settings.max_new_tokens} "
                             f"it exceeds the model's {limit} positions: /reset or lower /max")
        if self.seed is not None:
            torch.manual_seed(self.seed)
        kwargs = dict(max_new_tokens=self.settings.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=stop_token_id(self.tokenizer), use_cache=True,
                      do_sample=self.settings.temperature > 0)
        if kwargs["do_sample"]:
            kwargs.update(temperature=self.settings.temperature, top_p=self.settings.top_p, top_k=0)
        if stream is not None:
            kwargs["streamer"] = _TextStream(self.tokenizer, stream)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, ids.shape[1]:].tolist()
        stop = stop_token_id(self.tokenizer)
        if stop in new:
            new = new[:new.index(stop)]
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


HELP = __doc__.split("commands:")[1].split("In a notebook")[0].rstrip()


def handle_command(session: ChatSession, line: str, out=sys.stdout) -> bool:
    """Apply one `/command` line; False when the user asked to quit."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    setters = {"temp": ("temperature", float), "top_p": ("top_p", float), "max": ("max_new_tokens", int)}
    if name in ("quit", "exit"):
        return False
    if name == "reset":
        session.reset()
        print("(dialog reset)", file=out)
    elif name == "system":
        session.set_system(arg)
        print(f"(system prompt {'set' if session.system else 'cleared'}; dialog reset)", file=out)
    elif name in setters:
        attr, kind = setters[name]
        try:
            value = kind(arg)
        except ValueError:
            print(f"/{name} needs a {kind.__name__}, got {arg!r}", file=out)
            return True
        old = getattr(session.settings, attr)
        setattr(session.settings, attr, value)
        try:
            session.settings.check()
            print(f"({attr} = {value})", file=out)
        except ValueError as e:
            setattr(session.settings, attr, old)
            print(str(e), file=out)
    elif name == "history":
        for m in session.messages():
            print(f"[{m['role']}] {m['content']}", file=out)
    elif name == "help":
        print(f"commands:{HELP}", file=out)
    else:
        print(f"unknown command /{name}; commands:{HELP}", file=out)
    return True


def repl(session: ChatSession, read: Callable[[str], str] = input, out=sys.stdout) -> None:
    """The terminal loop: read a line, answer it with streamed text, until /quit or end of input."""
    print(f"Chatting (system prompt: {session.system!r}). /help for commands, /quit to leave.", file=out)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(session, line, out):
                return
            continue
        print("model> ", end="", file=out, flush=True)
        try:
            session.say(line, stream=lambda piece: print(piece, end="", file=out, flush=True))
        except ValueError as e:
            print(f"\n({e})", file=out)
            continue
        print(file=out)
