"""`align export`: a trained policy checkpoint as a clean folder for the Hugging Face Hub, and with `--gguf` as
one GGUF file for llama.cpp / Ollama.

The folder holds what `from_pretrained` and the Hub need and nothing of the run: safetensors weights (LoRA
adapters folded in), config.json, generation_config.json, the tokenizer with its chat template, and the
checkpoint's model card and chat-format choice where it has them (no MANIFEST, no training state). It is
written beside `out` and renamed into place, so a failed export leaves no half-written folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from alignment.chat import TEMPLATE_FILE
from alignment.models.gguf_export import GGUF_TYPES, need_gguf, require_llama, write_gguf
from alignment.models.tokenizer import load_tokenizer

# Files a checkpoint may carry beside its weights that belong on the Hub too (the tokenizer's own files,
# chat_template.jinja included, are written by its save_pretrained).
CARRIED_FILES = ("README.md", TEMPLATE_FILE)
ADAPTER_CONFIG = "adapter_config.json"


def inspect_checkpoint(checkpoint: Path) -> dict:
    """What `checkpoint` holds, checked before any weight is read: {"adapter": bool, "config": dict (the model's
    config.json, the base model's for LoRA adapters)}. A missing directory, a training-state directory, a
    reward model or LoRA adapters of one stop here in one line."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
    adapter = (checkpoint / ADAPTER_CONFIG).is_file()
    if adapter:
        adapter_cfg = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
        if adapter_cfg.get("task_type") == "SEQ_CLS":
            raise ValueError(f"{checkpoint}: LoRA adapters of a reward model; export writes policies (causal LMs)")
        base = Path(adapter_cfg.get("base_model_name_or_path") or "")
        if not (base / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint}: its LoRA adapters name the base model {str(base)!r}, which is "
                                    "not a local checkpoint directory")
        config = json.loads((base / "config.json").read_text())
    elif (checkpoint / "config.json").is_file():
        config = json.loads((checkpoint / "config.json").read_text())
    else:
        raise FileNotFoundError(f"{checkpoint}: neither config.json nor {ADAPTER_CONFIG}; export a saved model "
                                "(a stage's final/ or best/), not a training-state checkpoint")
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{checkpoint}: a reward model ({', '.join(architectures)}); export writes policies "
                         "(causal LMs)")
    return {"adapter": adapter, "config": config}


def load_for_export(checkpoint: Path, adapter: bool):
    """The checkpoint as a plain causal LM in its saved dtype (LoRA adapters merged into the base weights)."""
    from transformers import AutoModelForCausalLM

    if adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(checkpoint), dtype="auto", local_files_only=True)
        return model.merge_and_unload().eval()
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype="auto", local_files_only=True).eval()


def gguf_dir(out: Path) -> Path:
    """Where `--gguf` writes: a folder of its own beside the Hub folder (as Hub "-GGUF" repositories are), since
    transformers reads a GGUF's tokenizer wrongly from a folder that also holds tokenizer files."""
    return out.with_name(f"{out.name}-gguf")


def export_checkpoint(checkpoint: str | Path, out: str | Path, gguf: str | None = None, overwrite: bool = False,
                      log=print) -> dict:
    """Write the Hub folder of `checkpoint` at `out` and, with `gguf` ("f32" or "f16"), the GGUF file
    `<out>-gguf/model-<gguf>.gguf`. Returns {"out", "files", "gguf"}."""
    checkpoint, out = Path(checkpoint), Path(out)
    if gguf is not None and gguf not in GGUF_TYPES:
        raise ValueError(f"--gguf {gguf}: choose one of {', '.join(GGUF_TYPES)}")
    if out.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; export into another directory")
    targets = [out] + ([gguf_dir(out)] if gguf is not None else [])
    for target in targets:
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise ValueError(f"{target} exists and is not empty; choose another --out or pass --overwrite")
    found = inspect_checkpoint(checkpoint)
    if gguf is not None:
        need_gguf()
        require_llama(found["config"].get("model_type"))  # before any weight is read
    model = load_for_export(checkpoint, found["adapter"])
    tokenizer = load_tokenizer(checkpoint)
    tmps = [t.with_name(f".tmp-{t.name}") for t in targets]
    for tmp in tmps:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmps[0]), safe_serialization=True)
        if not (tmps[0] / "generation_config.json").is_file():
            model.generation_config.save_pretrained(str(tmps[0]))
        tokenizer.save_pretrained(str(tmps[0]))
        for name in CARRIED_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmps[0] / name)
        if gguf is not None:
            write_gguf(tmps[1] / f"model-{gguf}.gguf", model, tokenizer, gguf, name=checkpoint.name)
        for tmp, target in zip(tmps, targets):
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    gguf_path = gguf_dir(out) / f"model-{gguf}.gguf" if gguf is not None else None
    log(f"export: {checkpoint} -> {out} ({'LoRA adapters merged; ' if found['adapter'] else ''}{', '.join(files)})"
        + (f" and {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)" if gguf_path else ""))
    return {"out": str(out), "files": files, "gguf": str(gguf_path) if gguf_path else None}
