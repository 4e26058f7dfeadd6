"""The one training loop every stage shares (pretrain, SFT, reward models, rejection sampling, GAtt, ...).

A stage hands over a model, a deterministic `StepPlan` and a `step_fn(model, micro_batch_rows, scale)`
that returns `(loss_to_backward, metrics)`; this module owns the rest: accelerate / DeepSpeed ZeRO,
AdamW, the learning-rate schedule, gradient accumulation, checkpoints, resume, logging and the final
HF-native save. Nothing here knows what the loss is.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.batching import StepPlan
from alignment.config import (DistributedSection, LoggingSection, OptimSection, OutputSection,
                              ScheduleSection, TrainSection)
from alignment.faults import fault_point
from alignment.runs import (GIB, OPTIMIZER_BYTES_PER_PARAM, MetricsLog, RunDir, check_disk_space, checkpoint_bytes,
                            commit_dir, model_bytes, save_pretrained_atomic, saved_model_size, write_json_atomic)


# Tests set ALIGN_STOP_AFTER_STEP to make a run die abruptly after that optimizer step.
_STOP_AFTER_STEP = int(os.environ.get("ALIGN_STOP_AFTER_STEP", "0"))


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the run stops and keeps its last good checkpoint."""


def check_loss(loss: torch.Tensor, where: str, run: RunDir, examples=None, what: str = "loss") -> None:
    """NonFiniteLossError, before the update, when `loss` (or another `what`) is NaN or infinite. `where`
    names the stage and step; `examples` (the micro-batch's example indices) name the batch."""
    if loss is None or bool(torch.isfinite(torch.as_tensor(loss).detach()).all()):
        return
    loss = torch.as_tensor(loss)
    batch = ""
    if examples is not None:
        flat = sorted(i for row in examples for i in (row if isinstance(row, (list, tuple)) else [row]))
        batch = f" (examples {flat[:20]}{' ...' if len(flat) > 20 else ''})"
    latest = run.latest_checkpoint()
    values = loss.detach().float().flatten()
    raise NonFiniteLossError(f"{where}{batch}: {what} is {values[~torch.isfinite(values)][0].item()}; stopped "
                             f"before the update; the last good checkpoint is {latest or 'none: the run would start over'}")


def check_disk_before_sampling(run: RunDir, model_path: str, output, desc: str) -> None:
    """For stages that sample before they train (rejection sampling, GAtt): stop before the sampling when
    the disk cannot hold the fine-tune of the saved model at `model_path` (sizes from its files)."""
    size = saved_model_size(model_path)
    if size is None:
        return
    weights, params = size
    need = weights + (weights + OPTIMIZER_BYTES_PER_PARAM * params if output.save_every_steps else 0)
    check_disk_space(run.path, need, f"[{desc}] the fine-tune of {params / 1e6:.1f}M parameters "
                                     f"({weights / GIB:.2f} GiB of weights), its checkpoint and final model")


def check_disk_for_run(run: RunDir, model, saves_checkpoints: bool, desc: str, saved_bytes: int | None = None) -> None:
    """Stop before any work when the output disk cannot hold one checkpoint of `model` and the models the
    run saves (`saved_bytes`; default: `model`'s weights once, the final model)."""
    weights, trainable = model_bytes(model)
    saved = weights if saved_bytes is None else saved_bytes
    need = saved + (checkpoint_bytes(model) if saves_checkpoints else 0)
    what = (f"one checkpoint ({trainable / 1e6:.1f}M trainable parameters, {weights / GIB:.2f} GiB of weights) and "
            f"the saved models" if saves_checkpoints else f"the saved models ({saved / GIB:.2f} GiB)")
    check_disk_space(run.path, need, f"[{desc}] {what}")


@dataclass(frozen=True)
class LoopConfig:
    """The shared sections a training stage passes to `train`."""

    optim: OptimSection
    schedule: ScheduleSection
    train: TrainSection
    distributed: DistributedSection
    logging: LoggingSection
    output: OutputSection
    seed: int


# ----------------------------------------------------------------------------------------- schedule
def warmup_steps(total: int, sched: ScheduleSection) -> int:
    return min(total, max(sched.min_warmup_steps, math.ceil(sched.warmup_ratio * total)))


def lr_at(step: int, total: int, base_lr: float, sched: ScheduleSection) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant/linear/cosine decay
    to `base_lr * min_lr_ratio` at the last step (the paper's RM schedule: cosine to 10% of max)."""
    warm = warmup_steps(total, sched)
    if step < warm:
        return base_lr * (step + 1) / warm
    if sched.kind == "constant":
        return base_lr
    progress = (step - warm) / max(1, total - warm - 1)
    progress = min(1.0, progress)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if sched.kind == "cosine" else 1.0 - progress
    return base_lr * (sched.min_lr_ratio + (1.0 - sched.min_lr_ratio) * shape)


# ----------------------------------------------------------------------------------------- accelerate
def resolve_mixed_precision(dist: DistributedSection) -> str:
    if dist.mixed_precision != "auto":
        return dist.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def deepspeed_config(path: str, train: TrainSection, optim: OptimSection, world: int, mixed: str) -> dict:
    """Read a DeepSpeed JSON and fill its "auto" values from the recipe (accelerate cannot infer them
    without a prepared DataLoader)."""
    ds_json = json.loads(Path(path).read_text())
    fill = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world,
        "gradient_clipping": optim.grad_clip,
    }
    for key, value in fill.items():
        if ds_json.get(key, "auto") == "auto":  # a user's DeepSpeed JSON: absent means "auto"
            ds_json[key] = value
    for key, on in (("bf16", mixed == "bf16"), ("fp16", mixed == "fp16")):
        section = ds_json.setdefault(key, {"enabled": False})
        if section.get("enabled") == "auto":
            section["enabled"] = on
    return ds_json


def deepspeed_json(dist: DistributedSection) -> str | None:
    """The DeepSpeed JSON of a run: the recipe's `distributed.deepspeed`. An `accelerate launch` config that
    names one (recipes/accelerate/) must name the same file, and stands in when the recipe names none."""
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if launcher == "none":
        return dist.deepspeed
    if dist.deepspeed and Path(dist.deepspeed).resolve() != Path(launcher).resolve():
        raise ValueError(f"the accelerate config names DeepSpeed config {launcher} but the recipe's "
                         f"distributed.deepspeed is {dist.deepspeed}: launch with the accelerate config of the same "
                         f"ZeRO stage, or --set distributed.deepspeed={launcher}")
    return dist.deepspeed or launcher


def make_accelerator(dist: DistributedSection, train: TrainSection, optim: OptimSection):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    mixed = resolve_mixed_precision(dist)
    plugin = None
    ds_json = deepspeed_json(dist)
    if ds_json:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # accelerate initialises DeepSpeed's process group only when told so before its state exists
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not torch.cuda.is_available():
            # On CPU accelerate finds no backend for DeepSpeed and would run each process alone; name gloo.
            from accelerate import PartialState

            PartialState(backend="gloo")
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(ds_json, train, optim, world, mixed))
    return Accelerator(gradient_accumulation_steps=train.grad_accum, mixed_precision=mixed,
                       deepspeed_plugin=plugin)


def make_optimizer(model, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norms, fused (one kernel for all parameters; on CUDA and,
    since torch 2.4, on CPU) where the parameters' device has it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cuda", "cpu"} and (devices != {"cpu"} or _fused_adamw_on_cpu())
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused)


def _fused_adamw_on_cpu() -> bool:
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 4)


# ----------------------------------------------------------------------------------------- the loop
StepFn = Callable[[torch.nn.Module, list, float], tuple[torch.Tensor, dict]]


def train(*, model, tokenizer, plan: StepPlan, step_fn: StepFn, cfg: LoopConfig, run: RunDir,
          desc: str = "train", unit: str = "tok", merge_lora: bool = True) -> dict:
    """Run (or resume) every step of `plan`; save the final model under `run.final_dir`.

    `step_fn(model, rows, scale)` gets one micro-batch (rows of example indices) and `scale`, the number to
    divide its summed loss by so that the micro-batch losses of all processes and accumulation steps add
    up to the mean over the whole optimizer step; it returns (loss to backward, metrics as detached sums
    over the micro-batch: "loss_sum" and any "x_sum", reported as means over the step's items).
    Returns a summary (steps, final metrics, throughput).
    """
    from tqdm.auto import tqdm

    total = len(plan.steps)
    check_disk_for_run(run, model, bool(cfg.output.save_every_steps) and cfg.output.save_every_steps < total, desc)
    accelerator = make_accelerator(cfg.distributed, cfg.train, cfg.optim)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    engine = accelerator.distributed_type.name.lower()
    if accelerator.state.deepspeed_plugin is not None:
        engine += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    accelerator.print(f"[{desc}] {total} steps on {world} process(es), {engine}, {accelerator.mixed_precision} precision")

    start = 0
    latest = run.resume_checkpoint(accelerator.print)
    if latest is not None:
        accelerator.load_state(str(latest))
        start = json.loads((latest / "state.json").read_text())["step"]
        accelerator.print(f"[{desc}] resuming from {latest} (step {start}/{total})")
    log = MetricsLog(run.path, cfg.logging.tensorboard, enabled=accelerator.is_main_process, resume_step=start)
    bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
               disable=not (accelerator.is_main_process and cfg.logging.progress))

    model.train()
    last: dict = {}
    t0, items_done = time.perf_counter(), 0
    for step in range(start, total):
        lr = lr_at(step, total, cfg.optim.lr, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scale = plan.items[step] / (cfg.train.grad_accum * world)
        sums: dict[str, torch.Tensor] = {}
        for i, rows in enumerate(plan.micro_batches(step, rank, world)):
            with accelerator.accumulate(model):
                loss, metrics = step_fn(model, rows, scale)
                # before backward: under DeepSpeed the update happens inside backward
                check_loss(loss, f"[{desc}] step {step + 1}/{total}, micro-batch {i}", run, rows)
                accelerator.backward(loss)
                fault_point("train.backward")
                if accelerator.sync_gradients and accelerator.distributed_type.name != "DEEPSPEED":
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    check_loss(norm, f"[{desc}] step {step + 1}/{total}", run, what="the gradient norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        items_done += plan.items[step]
        bar.update(1)
        done = step + 1
        fault_point("train.step")
        if done % cfg.logging.every_steps == 0 or done == total:
            last = _reduce_metrics(accelerator, sums, plan.items[step])
            if not math.isfinite(last["loss"]):
                raise NonFiniteLossError(f"[{desc}] step {done}: loss is {last['loss']}; the last good checkpoint "
                                         f"is {run.latest_checkpoint()}")
            rate = items_done / max(1e-9, time.perf_counter() - t0)
            last.update(step=done, lr=lr, **{f"{unit}_per_s": rate})
            log.log(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", **{f"{unit}/s": f"{rate:.0f}"})
        if cfg.output.save_every_steps and done % cfg.output.save_every_steps == 0 and done < total:
            save_checkpoint(accelerator, run, done, cfg.output.keep_last)
        if done == _STOP_AFTER_STEP:  # fault injection for tests: die like a killed process, no cleanup
            os._exit(99)
    bar.close()
    log.close()
    save_final(accelerator, model, tokenizer, run, merge_lora=merge_lora)
    _leave_zero3()
    elapsed = time.perf_counter() - t0
    return {"steps": total, "resumed_from": start, "final": last, f"{unit}_per_s": items_done / max(elapsed, 1e-9),
            "seconds": elapsed}


def _reduce_metrics(accelerator, sums: dict, step_items: int) -> dict:
    """Step metrics over all processes. Step functions report sums: "x_sum" becomes "x", the mean over the
    step's trained items (tokens or pairs); other entries (counts) are summed."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k] for k in keys]).to(accelerator.device)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="sum")
    out = {}
    for k, v in zip(keys, stacked.tolist()):
        if k.endswith("_sum"):
            out[k[:-4]] = v / max(step_items, 1)
        else:
            out[k] = v
    out["items"] = step_items
    return out


def _leave_zero3() -> None:
    """After training, models loaded for evaluation (on the main process only) must not be partitioned
    by the ZeRO-3 context that accelerate registered with transformers."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def save_checkpoint(accelerator, run: RunDir, step: int, keep_last: int, state: dict | None = None) -> None:
    """Full training state (model, optimizer, RNG; ZeRO shards per rank) plus the loop's own `state`
    (`state.json`, with at least the step), written to a temp directory and renamed when complete."""
    final = run.checkpoint_path(step)
    tmp = final.with_name(f".tmp-{final.name}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed attempt left
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    fault_point("checkpoint.state_saved")
    if accelerator.is_main_process:
        write_json_atomic(tmp / "state.json", {"step": step, **(state or {})})
        commit_dir(tmp, final)
        run.prune_checkpoints(keep_last)
    accelerator.wait_for_everyone()


def save_final(accelerator, model, tokenizer, run: RunDir, merge_lora: bool = True) -> None:
    """The HF-native model (`save_pretrained`, gathered from ZeRO-3 shards) and tokenizer, atomically.

    A LoRA model is saved with its adapters folded into the base weights (a plain checkpoint every stage
    and tool can load) or, with `merge_lora=False`, as peft adapters only.
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if hasattr(unwrapped, "merge_and_unload") and merge_lora:
            unwrapped.load_state_dict(state_dict)
            save_pretrained_atomic(run.final_dir, unwrapped.merge_and_unload(), tokenizer)
        else:
            save_pretrained_atomic(run.final_dir, unwrapped, tokenizer, state_dict=state_dict)
    accelerator.wait_for_everyone()
