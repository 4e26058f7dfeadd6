"""Where frozen models sit: the reference policy and the reward models a stage only runs forward.

Two placements:
- full copies on every process (the default): on the device, or with `offload` on the CPU outside the phase
  that uses them (`FrozenPlacement`);
- partitioned with DeepSpeed ZeRO-3 across the run's processes (recipe key `reward.zero3`; `partition` a
  loaded model, or `load_partitioned`, which builds it under `deepspeed.zero.Init` so no process ever holds a
  whole copy): each process keeps 1/N of every large weight; a forward all-gathers one layer at a time and
  frees it after, so a 70B reference or reward model costs 140 GB / N per GPU plus one layer, not 140 GB
  (OpenRLHF does the same for its reference and reward models: `deepspeed.initialize` with a stage-3 config
  and no optimizer). The scores and log-probs are those of the full model; every process must then run the
  same number of forwards (a forward is a collective), which `equal_share` makes hold for uneven work.
"""
from __future__ import annotations

import contextlib
import math

import torch


def zero3_inference_config(dtype: torch.dtype, hidden_size: int, *, offload: bool = False) -> dict:
    """DeepSpeed JSON for a frozen ZeRO-3 model: no optimizer, no gradients. Weights under 10 x hidden
    elements (norms, biases) stay whole on every process, as transformers' "auto" value; `offload` keeps the
    partitions in CPU memory (GPU runs) and streams each layer in for its forward."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_prefetch_bucket_size": 10 * hidden_size * hidden_size}
    if offload and torch.cuda.is_available():
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def partition(model: torch.nn.Module, *, offload: bool = False) -> torch.nn.Module:
    """`model` (frozen, eval mode) partitioned over the run's processes by a ZeRO-3 inference engine, and
    returned itself: DeepSpeed's hooks on its modules gather each layer's weights for its forward and free them
    after, so it is called (and `generate`s, and has its HF `config`) as before. Needs the process group."""
    import deepspeed

    dtype = next(model.parameters()).dtype
    hidden = getattr(model.config, "hidden_size", 1024)
    engine, *_ = deepspeed.initialize(model=model, config=zero3_inference_config(dtype, hidden, offload=offload))
    engine.eval()
    object.__setattr__(model, "_zero3_engine", engine)  # kept alive with the model (not a submodule)
    return model


@contextlib.contextmanager
def zero3_loading(config: dict):
    """Inside, transformers' `from_pretrained` builds models under `deepspeed.zero.Init` with `config`: each
    weight is partitioned as it is made and filled from the checkpoint one module at a time, so a process
    never holds a whole copy. The ZeRO-3 context a training engine registered (accelerate's, for the actor)
    is put back after."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    deepspeed.init_distributed()  # DeepSpeed's view of the process group (made by torchrun's env or already)
    previous = hf_deepspeed._hf_deepspeed_config_weak_ref
    context = HfDeepSpeedConfig(config)  # registers itself (a weak reference: keep it alive meanwhile)
    try:
        yield context
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


def load_partitioned(load, path: str, dtype: torch.dtype, *, offload: bool = False) -> torch.nn.Module:
    """`load()` (a `from_pretrained` of the checkpoint at `path`) run under ZeRO-3 initialisation, then made
    an inference engine (`partition`): no process ever holds the whole model, not even while loading."""
    from transformers import AutoConfig

    hidden = getattr(AutoConfig.from_pretrained(path, local_files_only=True), "hidden_size", 1024)
    config = zero3_inference_config(dtype, hidden, offload=offload)
    with zero3_loading(config):
        model = load()
    model.eval().requires_grad_(False)
    return partition(model, offload=offload)


def is_partitioned(model: torch.nn.Module | None) -> bool:
    return model is not None and any(hasattr(p, "ds_tensor") for p in model.parameters())


def resident_numel(model: torch.nn.Module) -> int:
    """Parameter elements this process holds now: its ZeRO-3 partitions plus whatever is gathered or
    kept whole (persistent small weights); for a plain model, every element."""
    total = 0
    for p in model.parameters():
        total += p.data.numel()
        part = getattr(p, "ds_tensor", None)
        if part is not None:
            total += part.numel()
    return total


def weight_share(*models: torch.nn.Module) -> float:
    """The share of `models`' parameter elements this process holds (`resident_numel` over their full size):
    1.0 for whole copies, about 1/N partitioned over N processes."""
    total = sum(getattr(p, "ds_numel", p.numel()) for m in models for p in m.parameters())
    return sum(resident_numel(m) for m in models) / max(total, 1)


def equal_share(count: int, world: int) -> int:
    """Rows every process scores when `count` rows are dealt round-robin over `world` processes and the
    short ones pad: ceil(count / world)."""
    return math.ceil(count / world) if count else 0


class FrozenPlacement:
    """Puts full-copy frozen models on the device, for good or (with `offload`) only while a phase uses them.
    Partitioned models are left where DeepSpeed put them."""

    def __init__(self, models: list[torch.nn.Module], device, offload: bool):
        self.device, self.offload = device, offload and device.type != "cpu"
        self.models = [m for m in models if not is_partitioned(m)]
        for m in self.models:
            m.to("cpu" if self.offload else device)

    @contextlib.contextmanager
    def active(self, *models):
        moved = [m for m in models if m is not None and any(m is x for x in self.models)] if self.offload else []
        for m in moved:
            m.to(self.device)
        try:
            yield
        finally:
            for m in moved:
                m.to("cpu")
            if moved:
                torch.cuda.empty_cache()
