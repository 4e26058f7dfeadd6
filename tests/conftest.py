"""Shared fixtures: a tokenizer and a nano Llama built in the test session (no download, seconds)."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

WORDS = ("the cat dog sun moon red blue green one two three four five six seven plus minus is what "
         "answer sort these numbers count letters in word capital of city sorry I cannot help with that").split()


def make_dialogs(n: int, seed: int = 0, multi_turn_every: int = 4) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = 2 if i % multi_turn_every == 0 else 1
        messages = []
        if i % 5 == 0:
            messages.append({"role": "system", "content": "answer in few words"})
        for _ in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))})
        rows.append({"id": f"d{i}", "messages": messages, "source": "test"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _session_in_use(directory: Path) -> bool:
    """Whether a running pytest holds `directory` (pytest writes its pid to `.lock` and removes it at exit)."""
    try:
        os.kill(int((directory / ".lock").read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@pytest.fixture(scope="session", autouse=True)
def _no_stale_test_directories(tmp_path_factory):
    """Remove the base directories that finished pytest sessions left beside this one (pytest-of-USER/pytest-N),
    before any test writes. pyproject's retention settings keep nothing that passed, but directories kept under
    older settings or by failed sessions hold GBs of real-model checkpoints and filled a small CI disk. A
    directory of a session still running (its .lock names a live pid) is left alone; --basetemp is left alone."""
    base = tmp_path_factory.getbasetemp()
    if not base.parent.name.startswith("pytest-of-"):
        return
    for old in base.parent.glob("pytest-[0-9]*"):
        if old != base and old.is_dir() and not old.is_symlink() and not _session_in_use(old):
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from alignment.models.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    texts = [" ".join(random.Random(i).choices(WORDS, k=20)) for i in range(300)]
    train_tokenizer(texts, 400, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from alignment.models.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def nano_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved nano LlamaForCausalLM (~0.2M parameters) with its tokenizer: a stand-in base checkpoint."""
    from alignment.models.tiny import build_tiny_llama

    out = tmp_path_factory.mktemp("nano_base")
    build_tiny_llama(tokenizer, "nano", seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def nano_reward_model(nano_model_dir: Path, tokenizer, out: Path, seed: int, std: float = 0.5) -> Path:
    """A saved nano reward model (seq-cls, one label) whose random score head gives sigmoid scores spread
    around 0.5 (not saturated), so comparisons of two answers' scores are decided by real margins."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(nano_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0.0, std)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


SMOLLM2_DIR = Path(__file__).parent / "fixtures" / "smollm2"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer (ChatML template; BOS <|im_start|> 1, EOS/pad <|im_end|> 2)."""
    from alignment.models.tokenizer import load_tokenizer

    return load_tokenizer(SMOLLM2_DIR)


@pytest.fixture(scope="session")
def smollm2_random_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A randomly initialised LlamaForCausalLM with SmolLM2-135M's config (seeded), saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("smollm2_random")
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(SMOLLM2_DIR)).save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def headless_chromium():
    """(page, errors): a page of the system's headless Chromium, driven by Playwright, and the console errors
    and uncaught exceptions it reports. Skips the test where Playwright or Chromium is missing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    browser_path = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if browser_path is None:
        pytest.skip("no Chromium on this machine: `make install-browser` installs Debian's chromium")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page, errors
        finally:
            browser.close()

