"""The one training engine every stage shares (pretrain, SFT, reward models, rejection sampling, GAtt, PPO).

A stage hands over a model, a deterministic `StepPlan` and a `step_fn(model, micro_batch_rows, scale)`
that returns `(loss_to_backward, metrics)`; `train` owns the rest: accelerate / DeepSpeed ZeRO, AdamW,
the learning-rate schedule, gradient accumulation, checkpoints, resume, logging and the final HF-native
save. PPO, whose step is a rollout followed by several optimizer steps, drives the same `Engine` (the
micro-step, resume, metrics, progress bar, checkpoints and stop hook `train` is built from) with its own
iterations. Nothing here knows what the loss is.
"""
from __future__ import annotations

import contextlib
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
                              ScheduleSection, TrainSection, to_dict)
from alignment.distributed import ensure_process_group
from alignment.faults import fault_point
from alignment.frozen import zero3_loading
from alignment.runs import (OPTIMIZER_BYTES_PER_PARAM, MetricsLog, RunDir, check_disk_space, checkpoint_bytes,
                            commit_dir, disk_full_guard, format_size, model_bytes, save_pretrained_atomic,
                            saved_model_size, settle_replaced, write_json_atomic)
from alignment.stage_memory import read_zero


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
    the disk cannot hold the fine-tune of the saved model at `model_path` (sizes from its files): its final
    model and, when it saves checkpoints, `keep_last` of them plus the one being written."""
    size = saved_model_size(model_path)
    if size is None:
        return
    weights, params = size
    held = output.keep_last + 1 if output.save_every_steps else 0
    need = weights + held * (weights + OPTIMIZER_BYTES_PER_PARAM * params)
    check_disk_space(run.path, need, f"[{desc}] the fine-tune of {params / 1e6:.1f}M parameters "
                                     f"({format_size(weights)} of weights), {held} checkpoint(s) and its final model")


def checkpoints_held(output: OutputSection, total: int) -> int:
    """The most checkpoints on disk at once in a run of `total` steps: the `keep_last` kept ones plus the one
    being written (pruning comes after the new one is complete); all of them when keep_last is 0."""
    saves = (total - 1) // output.save_every_steps if output.save_every_steps else 0
    return min(output.keep_last + 1, saves) if output.keep_last > 0 else saves


def check_disk_for_run(run: RunDir, model, checkpoints: int, desc: str, saved_bytes: int | None = None) -> None:
    """Stop before any work when the output disk cannot hold `checkpoints` checkpoints of `model` at once
    (`checkpoints_held`) and the models the run saves (`saved_bytes`; default: `model`'s weights once, the
    final model)."""
    weights, trainable = model_bytes(model)
    saved = weights if saved_bytes is None else saved_bytes
    need = saved + checkpoints * checkpoint_bytes(model)
    what = (f"{checkpoints} checkpoint(s) at once ({trainable / 1e6:.1f}M trainable parameters, {format_size(weights)} "
            f"of weights) and the saved models" if checkpoints else f"the saved models ({format_size(saved)})")
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


@contextlib.contextmanager
def zero3_init(dist: DistributedSection, train: TrainSection, optim: OptimSection, lora: bool = False):
    """Models loaded inside are partitioned as they are built (`deepspeed.zero.Init` through transformers) when
    the run trains under ZeRO-3 on several processes, so no process holds a whole copy while loading (70B: 128
    GiB less CPU memory per process); elsewhere, and for LoRA (whose adapters peft adds after loading), nothing.
    The engine then takes the partitioned model as it is. Yields whether it partitions."""
    ds_json = deepspeed_json(dist)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if lora or world == 1 or not ds_json or read_zero(ds_json).stage != 3:
        yield False
        return
    ensure_process_group()
    with zero3_loading(deepspeed_config(ds_json, train, optim, world, resolve_mixed_precision(dist))):
        yield True


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
    # Several processes without CUDA and without DeepSpeed: accelerate reads them as MULTI_CPU (gloo) only when
    # told cpu=True; otherwise each process would train alone on the same output directory.
    cpu = plugin is None and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(gradient_accumulation_steps=train.grad_accum, mixed_precision=mixed,
                       deepspeed_plugin=plugin, cpu=cpu)


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


# ----------------------------------------------------------------------------------------- the engine
ENGINE_NAMES = {"NO": None, "MULTI_CPU": "gloo data parallel", "MULTI_GPU": "DDP", "FSDP": "FSDP",
                "DEEPSPEED": "DeepSpeed"}


def describe_setup(processes: int, distributed_type: str, mixed_precision: str, zero_stage: int | None,
                   device: str) -> str:
    """A readable run header: process count, engine (none for a single process) and precision ("no" mixed
    precision is fp32)."""
    parts = [f"{processes} process{'es' if processes != 1 else ''}" + (f" on {device}" if processes == 1 else "")]
    engine = ENGINE_NAMES.get(distributed_type, distributed_type.lower())
    if zero_stage is not None:
        engine = f"DeepSpeed ZeRO-{zero_stage}"
    if engine:
        parts.append(engine)
    parts.append("fp32" if mixed_precision in ("no", None) else mixed_precision)
    return ", ".join(parts)


class Engine:
    """An accelerate-prepared model and optimizer and the run they write to: the micro-step, resume, metrics,
    progress bar, checkpoints and stop hook of every training loop (`train` below, PPO's iterations).
    Made by `start_engine`."""

    def __init__(self, accelerator, model, optimizer, run: RunDir, desc: str, optim: OptimSection,
                 logging: LoggingSection, output: OutputSection):
        self.accelerator, self.model, self.optimizer, self.run, self.desc = accelerator, model, optimizer, run, desc
        self.optim, self.logging, self.output = optim, logging, output
        self.log: MetricsLog | None = None
        self.bar = None
        self.grad_norms: list[float] = []  # of the optimizer steps since `take_grad_norm`

    def setup(self) -> str:
        """What the stage runs on, for its first line: "1 process on cpu, fp32" or "8 processes, DeepSpeed
        ZeRO-3, bf16" (`describe_setup`)."""
        acc = self.accelerator
        plugin = acc.state.deepspeed_plugin
        return describe_setup(acc.num_processes, acc.distributed_type.name, acc.mixed_precision,
                              plugin.zero_stage if plugin is not None else None, str(acc.device))

    def resume(self, key: str, total: int) -> dict | None:
        """Load the newest intact checkpoint (model, optimizer, RNG) and return its loop state (`state.json`,
        whose `key` counts the steps done), or None on a fresh start."""
        latest = self.run.resume_checkpoint(self.accelerator.print)
        if latest is None:
            return None
        self.accelerator.load_state(str(latest))
        state = json.loads((latest / "state.json").read_text())
        self.accelerator.print(f"[{self.desc}] resuming from {latest} ({key} {state[key]}/{total})")
        return state

    def open_progress(self, total: int, start: int, resume_step: int) -> None:
        """metrics.jsonl (records past `resume_step` dropped) and the progress bar, on the main process."""
        from tqdm.auto import tqdm

        main = self.accelerator.is_main_process
        self.log = MetricsLog(self.run.path, self.logging.tensorboard, enabled=main, resume_step=resume_step,
                              wandb=self.logging.wandb, name=self.desc,
                              config=to_dict(self.run.cfg) if self.logging.wandb else None)
        self.bar = tqdm(total=total, initial=start, desc=self.desc, dynamic_ncols=True,
                        disable=not (main and self.logging.progress))

    def micro_step(self, compute: Callable[[], tuple[torch.Tensor, dict]], where: str, examples=None,
                   site: str = "train.backward", norm_where: str | None = None) -> dict:
        """One micro-batch under gradient accumulation: `compute()` gives (loss, metrics); the loss is checked
        before backward (under DeepSpeed the update happens inside backward), gradients are clipped and the
        optimizer steps when the accumulation is complete. Returns the metrics."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss, metrics = compute()
            check_loss(loss, where, self.run, examples)
            acc.backward(loss)
            fault_point(site)
            if acc.sync_gradients and acc.distributed_type.name != "DEEPSPEED":
                norm = acc.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
                check_loss(norm, norm_where or where, self.run, what="the gradient norm")
                self.grad_norms.append(float(norm))
            elif acc.sync_gradients:  # DeepSpeed clipped and stepped inside backward
                norm = self.model.get_global_grad_norm()
                if norm is not None:
                    self.grad_norms.append(float(norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def take_grad_norm(self) -> dict:
        """{"grad_norm": mean norm before clipping over the optimizer steps since the last call} (empty when
        there were none), and a fresh start."""
        norms, self.grad_norms = self.grad_norms, []
        return {"grad_norm": sum(norms) / len(norms)} if norms else {}

    def reduce(self, values: dict, reduction: str = "sum") -> dict:
        """Scalars (tensors or numbers) summed or averaged over all processes, as floats."""
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=self.accelerator.device)
                               for k in keys])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction=reduction)
        return dict(zip(keys, stacked.tolist()))

    def log_due(self, done: int, total: int) -> bool:
        return done % self.logging.every_steps == 0 or done == total

    def end_step(self, done: int, total: int, state: dict | None = None) -> None:
        """After step `done`: advance the bar, save a checkpoint when due (with the loop's `state`), and die
        here when a test asked for it (ALIGN_STOP_AFTER_STEP)."""
        self.bar.update(1)
        every = self.output.save_every_steps
        if every and done % every == 0 and done < total:
            need = checkpoint_bytes(self.accelerator.unwrap_model(self.model))
            save_checkpoint(self.accelerator, self.run, done, self.output.keep_last, state, need=need)
        if done == _STOP_AFTER_STEP:  # fault injection for tests: die like a killed process, no cleanup
            os._exit(99)

    def close(self) -> None:
        self.bar.close()
        self.log.close()


def start_engine(model, optimizer_for: Callable[[torch.nn.Module], torch.optim.Optimizer], *, run: RunDir, desc: str,
                 distributed: DistributedSection, train: TrainSection, optim: OptimSection, logging: LoggingSection,
                 output: OutputSection, seed: int) -> Engine:
    """The accelerator (DeepSpeed from the recipe or the launcher), the seed, `optimizer_for(model)`, and
    both prepared together."""
    accelerator = make_accelerator(distributed, train, optim)
    torch.manual_seed(seed)
    optimizer = optimizer_for(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Engine(accelerator, model, optimizer, run, desc, optim, logging, output)


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
    total = len(plan.steps)
    check_disk_for_run(run, model, checkpoints_held(cfg.output, total), desc)
    engine = start_engine(model, lambda m: make_optimizer(m, cfg.optim), run=run, desc=desc,
                          distributed=cfg.distributed, train=cfg.train, optim=cfg.optim, logging=cfg.logging,
                          output=cfg.output, seed=cfg.seed)
    accelerator, model, optimizer = engine.accelerator, engine.model, engine.optimizer
    world, rank = accelerator.num_processes, accelerator.process_index
    accelerator.print(f"[{desc}] {total} steps on {engine.setup()}")

    state = engine.resume("step", total)
    start = state["step"] if state is not None else 0
    engine.open_progress(total, start, resume_step=start)

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
            metrics = engine.micro_step(lambda: step_fn(model, rows, scale),
                                        f"[{desc}] step {step + 1}/{total}, micro-batch {i}", rows,
                                        norm_where=f"[{desc}] step {step + 1}/{total}")
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        items_done += plan.items[step]
        done = step + 1
        fault_point("train.step")
        grad_norm = engine.take_grad_norm()
        if engine.log_due(done, total):
            last = _step_metrics(engine.reduce(sums), plan.items[step])
            if not math.isfinite(last["loss"]):
                raise NonFiniteLossError(f"[{desc}] step {done}: loss is {last['loss']}; the last good checkpoint "
                                         f"is {run.latest_checkpoint()}")
            rate = items_done / max(1e-9, time.perf_counter() - t0)
            last.update(step=done, lr=lr, **grad_norm, **{f"{unit}_per_s": rate})
            engine.log.log(last)
            engine.bar.set_postfix(loss=f"{last['loss']:.4f}", **{f"{unit}/s": f"{rate:.0f}"})
        engine.end_step(done, total)
    engine.close()
    save_final(accelerator, model, tokenizer, run, merge_lora=merge_lora)
    leave_zero3()
    elapsed = time.perf_counter() - t0
    return {"steps": total, "resumed_from": start, "final": last, f"{unit}_per_s": items_done / max(elapsed, 1e-9),
            "seconds": elapsed}


def _step_metrics(totals: dict, step_items: int) -> dict:
    """Step metrics from the sums over all processes: "x_sum" becomes "x", the mean over the step's trained
    items (tokens or pairs); other entries (counts) stay sums."""
    out = {}
    for k, v in totals.items():
        if k.endswith("_sum"):
            out[k[:-4]] = v / max(step_items, 1)
        else:
            out[k] = v
    out["items"] = step_items
    return out


def leave_zero3() -> None:
    """After training, models loaded for evaluation (on the main process only) must not be partitioned
    by the ZeRO-3 context that accelerate registered with transformers."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def save_checkpoint(accelerator, run: RunDir, step: int, keep_last: int, state: dict | None = None,
                    need: int | None = None) -> None:
    """Full training state (model, optimizer, RNG; ZeRO shards per rank) plus the loop's own `state`
    (`state.json`, with at least the step), written to a temp directory and renamed when complete. A full
    disk stops the run in one line (`need`: the checkpoint's estimated size) and leaves no temp directory.
    The first checkpoint of an `output.overwrite` run releases the run it replaces."""
    final = run.checkpoint_path(step)
    tmp = final.with_name(f".tmp-{final.name}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed attempt left
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with disk_full_guard(final.parent, f"checkpoint {final.name}", need, tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    fault_point("checkpoint.state_saved")
    if accelerator.is_main_process:
        write_json_atomic(tmp / "state.json", {"step": step, **(state or {})})
        commit_dir(tmp, final)
        settle_replaced(run.path)
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
