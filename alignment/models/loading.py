"""Loading policies and reward models from a local directory or hub id (offline), with LoRA by option."""
from __future__ import annotations

from pathlib import Path

import torch

from alignment.config import ModelSection
from alignment.distributed import local_device
from alignment.frozen import load_partitioned
from alignment.models.tokenizer import load_tokenizer
from alignment.producers import made_by
from alignment.runs import verify_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """"auto" is bf16 on a GPU that has it and fp32 elsewhere (CPU bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def model_available(path: str, filename: str = "config.json") -> bool:
    """Whether `path` loads offline: a local file or directory, or a hub id whose `filename` is in the local
    Hugging Face cache (every load here passes local_files_only=True)."""
    if Path(path).exists():
        return True
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(path, filename), str)
    except HFValidationError:  # not a hub id at all (a path such as runs/sft/final)
        return False


def check_model_paths(paths: dict[str, str | None], hint: str = "") -> None:
    """Stop in one line, naming the recipe key and the path, when a model (or tokenizer) of a recipe is neither
    a local directory nor a cached hub id, or is a directory we wrote (final/, best/, a checkpoint) that no
    longer matches its manifest: called before any data is loaded. `paths`: key -> path or None."""
    for key, path in paths.items():
        filename = "tokenizer_config.json" if key.endswith("tokenizer") else "config.json"
        if path is not None and not model_available(path, filename):
            raise FileNotFoundError(f"{key}: {path} does not exist (neither a local directory nor a hub id in the "
                                    f"local Hugging Face cache){made_by(path) or hint}")
        if path is not None and Path(path).is_dir():
            verify_model_dir(path, key)


def model_paths(section: ModelSection, key: str = "model") -> dict[str, str | None]:
    """The paths of a model section to check: `<key>.path` and `<key>.tokenizer`."""
    return {f"{key}.path": section.path, f"{key}.tokenizer": section.tokenizer}


def _common_kwargs(section: ModelSection) -> dict:
    kwargs = {"dtype": resolve_dtype(section.dtype), "attn_implementation": section.attn_implementation,
              "local_files_only": True}
    if section.lora.enabled and section.lora.load_in_4bit:
        if not torch.cuda.is_available():
            raise RuntimeError("model.lora.load_in_4bit (QLoRA) needs a CUDA device and bitsandbytes")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return kwargs


def _finish(model, section: ModelSection, task_type: str):
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if section.lora.enabled:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if section.lora.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=section.gradient_checkpointing)
        lora = LoraConfig(r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
                          target_modules=list(section.lora.target_modules), task_type=task_type,
                          modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
        model = get_peft_model(model, lora)
    return model


def load_causal_lm(section: ModelSection):
    """A `AutoModelForCausalLM` ready to train (grad checkpointing / LoRA as the section says)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(section.path, **_common_kwargs(section))
    return _finish(model, section, "CAUSAL_LM")


def load_reward_model(section: ModelSection, pad_token_id: int):
    """A scalar-head `AutoModelForSequenceClassification` (num_labels=1) initialised from a chat model:
    the transformer is loaded from the checkpoint and the LM head is replaced by a new linear `score`."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(section.path, num_labels=1, **_common_kwargs(section))
    model.config.pad_token_id = pad_token_id
    return _finish(model, section, "SEQ_CLS")


def merge_lora_for_save(model):
    """Fold LoRA adapters into the base weights (for an HF-native full checkpoint)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_policy(path: str, dtype: str = "auto", attn_implementation: str = "sdpa", template: str | None = None,
                partitioned: bool = False):
    """A causal LM for inference on this process's device, and its tokenizer (chat template: the one stored
    with `path`, else `template`, see `load_tokenizer`). `partitioned`: loaded as a ZeRO-3 inference engine
    over the run's processes (`alignment.frozen.load_partitioned`; its forwards are collectives)."""
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), local_files_only=True,
                                                    attn_implementation=attn_implementation)

    tokenizer = load_tokenizer(path, template)
    if partitioned:
        return load_partitioned(load, path, resolve_dtype(dtype)), tokenizer
    return load().to(local_device()).eval(), tokenizer


def load_rm_for_inference(path: str, dtype: str = "auto", device=None, partitioned: bool = False):
    """A reward model (HF seq-cls, one label) for inference on `device` (default: this process's device), with
    its tokenizer (and the tokenizer's pad id where the model's config has none); `partitioned` as `load_policy`."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path)

    def load():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=resolve_dtype(dtype),
                                                                   local_files_only=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    if partitioned:
        return load_partitioned(load, path, resolve_dtype(dtype)), tokenizer
    return load().to(device or local_device()).eval(), tokenizer
