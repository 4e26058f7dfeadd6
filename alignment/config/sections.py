"""The shared config sections every stage config is composed of (model, data, optim, train, generation, reward
judges, ...), and the fine-tune group of the stages that train with the shared loop.

Every numeric field declares its allowed values (`ranged`, alignment.config.ranges), checked when a recipe
loads. A stage whose defaults differ from a section's (a greedy evaluation, the RM's learning rate) gives them in its
config's `default_factory`; a recipe that sets only some keys of such a section keeps the stage's values for the
others (alignment.config.loader.from_dict).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignment.config.loader import ConfigError
from alignment.config.ranges import ranged

# The paper's safety switch (3.2.3): Rc = Rs where sigmoid(Rs) is below it (precision 0.89, recall 0.55 on
# unsafe responses of the Meta Safety test set); alignment.rewards.combine and every reward judge default to it.
SAFETY_THRESHOLD = 0.15

Dtype = Literal["auto", "float32", "bfloat16", "float16"]  # "auto": bf16 on a GPU that has it, else fp32
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    r: int = ranged(">= 1", 16)
    alpha: int = ranged(">= 1", 32)
    dropout: float = ranged("[0, 1)", 0.05)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_on_save: bool = True  # save merged full weights (True) or the adapters only (False)
    load_in_4bit: bool = False  # QLoRA: needs bitsandbytes and a CUDA device


@dataclass(frozen=True)
class ModelSection:
    path: str  # a local directory or a hub id (loaded offline)
    tokenizer: str | None = None  # defaults to `path`
    dtype: Dtype = "auto"
    # The dtype of the copies a stage loads only to generate or score answers (rejection-sampling and GAtt
    # sampling, GAtt's adherence evaluation, safety distillation's answers, every stage's held-out answers);
    # the weights it trains stay in `dtype`. None: `dtype`. bfloat16 halves the bytes every decoding step
    # reads: on a CPU with AVX512-BF16 it generated 1.6x the tokens/s of float32 (SmolLM2-135M, 2 cores;
    # README "A real model"); on CPUs without it bfloat16 is emulated and slower.
    inference_dtype: Dtype | None = None
    gradient_checkpointing: bool = False
    attn_implementation: AttnImplementation = "sdpa"
    lora: LoraSection = field(default_factory=LoraSection)

    @property
    def answer_dtype(self) -> str:
        """The dtype copies that only generate or score are loaded in (`inference_dtype`, else `dtype`)."""
        return self.inference_dtype or self.dtype


@dataclass(frozen=True)
class RatingThresholds:
    """Rating buckets of a scored source (alignment.data.adapters): the smallest preference strength (score
    gap, SHP score ratio, ...) of each bucket; a strength above 0 (SHP: above 1) but under `slightly_better`
    is `negligibly_better`. Each source documents its scale and defaults (README, "Real data")."""

    significantly_better: float = ranged("> 0")
    better: float = ranged("> 0")
    slightly_better: float = ranged("> 0")

    def __post_init__(self):
        if not self.significantly_better >= self.better >= self.slightly_better > 0:  # also for the adapters' own
            raise ConfigError(f"thresholds must satisfy significantly_better >= better >= slightly_better > 0; got "
                              f"{self.significantly_better}, {self.better}, {self.slightly_better}")


@dataclass(frozen=True)
class HeldOutSide:
    """One side of `alignment.data.mixing.held_out_split` of a source's rows, cut by a hash of each prompt:
    the same `fraction` and `salt` with `side: train` in a training set and `side: held_out` in a test set
    never share a pair."""

    fraction: float = ranged("(0, 1)")
    side: Literal["train", "held_out"]
    salt: str = ""


@dataclass(frozen=True)
class DataSource:
    path: str
    source: str = "native"  # "native" = our schemas; public-dataset adapters add names (alignment.data.adapters)
    split: str | None = None  # a directory's split (its train.jsonl, test-*.parquet, ...); None for a file
    limit: int | None = ranged(">= 1", None)  # keep the first N rows (after validation and the held-out cut)
    thresholds: RatingThresholds | None = None  # scored sources only; None: the source's documented defaults
    held_out: HeldOutSide | None = None  # keep one side of a hash split of the rows by prompt


@dataclass(frozen=True)
class OptimSection:
    lr: float = ranged("> 0", 2e-5)
    weight_decay: float = ranged(">= 0", 0.1)
    betas: tuple[float, float] = ranged("[0, 1)", (0.9, 0.95))
    eps: float = ranged("> 0", 1e-8)
    grad_clip: float = ranged("> 0", 1.0)  # max global gradient norm (always clipped)


@dataclass(frozen=True)
class ScheduleSection:
    kind: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = ranged("[0, 1]", 0.03)
    min_warmup_steps: int = ranged(">= 0", 0)
    min_lr_ratio: float = ranged("[0, 1]", 0.0)  # cosine/linear decay ends at lr * min_lr_ratio


@dataclass(frozen=True)
class TrainSection:
    epochs: float = ranged("> 0", 1.0)
    # stop after this many optimizer steps (overrides epochs when smaller); None: epochs decide
    max_steps: int | None = ranged(">= 1", None)
    micro_batch_size: int = ranged(">= 1", 8)  # sequences per micro-batch (unpacked); rows per micro-batch (packed)
    grad_accum: int = ranged(">= 1", 1)
    max_length: int = ranged(">= 1", 512)  # tokens per sequence (and per packed row)
    packing: bool = True  # padding-free packing of several dialogs per row
    # LM stages: the loss from the answer positions only, chunked through the LM head, without the [tokens, V]
    # logits (losses.chunked_sft_loss: the same loss to float rounding; pays with a large vocabulary)
    answer_only_loss: bool = False


@dataclass(frozen=True)
class DistributedSection:
    deepspeed: str | None = None  # path to a DeepSpeed JSON (recipes/deepspeed/zero2.json, zero3.json, ...)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where the device supports it


@dataclass(frozen=True)
class LoggingSection:
    every_steps: int = ranged(">= 1", 10)
    tensorboard: bool = True
    progress: bool = True
    wandb: bool = False  # offline by default when on


@dataclass(frozen=True)
class OutputSection:
    dir: str
    save_every_steps: int = ranged(">= 0", 0)  # 0: only at the end
    keep_last: int = ranged(">= 0", 2)  # checkpoints kept; 0: all
    overwrite: bool = False  # a finished run directory is never overwritten unless this is set


@dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation at the end of a stage: loss on `data.eval`, and answers to held-out prompts."""

    prompts: list[DataSource] = field(default_factory=list)  # rl_prompt rows (toy world: gold-scored)
    max_prompts: int = ranged(">= 0", 200)  # 0: no held-out answers (the loss on data.eval only)
    max_new_tokens: int = ranged(">= 1", 64)
    batch_size: int = ranged(">= 1", 64)
    compare_base: bool = False  # also evaluate the starting checkpoint, for a before/after table


@dataclass(frozen=True, kw_only=True)
class GenerationSection:
    """Sampling settings of one generate() pass (alignment.generation). Stages extend it with their own keys."""

    max_new_tokens: int = ranged(">= 1", 128)
    temperature: float = ranged(">= 0", 1.0)  # 0: greedy
    top_p: float = ranged("(0, 1]", 1.0)
    batch_size: int = ranged(">= 1", 64)  # sequences per generate call (per process)


@dataclass(frozen=True, kw_only=True)
class RewardModelRunSection:
    """How frozen reward models (HF seq-cls dirs, one label) are run: scoring batch, input length, dtype."""

    batch_size: int = ranged(">= 1", 32)  # RM scoring batch
    max_length: int = ranged(">= 1", 1024)  # RM input tokens (left-truncated, the answer is kept)
    dtype: Dtype = "auto"


@dataclass(frozen=True, kw_only=True)
class RewardJudgeSection(RewardModelRunSection):
    """The helpfulness and safety RMs that judge answers, combined by the safety switch of 3.2.3:
    Rc = Rs if is_safety or sigmoid(Rs) < safety_threshold else Rh (alignment.rewards.combine)."""

    helpful_rm: str | None = None
    safety_rm: str | None = None
    # sigmoid(Rs) below it switches to the safety RM; calibrated: the threshold `align rm` wrote beside safety_rm
    # (its safety_switch.json: the paper's precision 0.89 on the labelled test answers)
    safety_threshold: float | Literal["calibrated"] = ranged("[0, 1]", SAFETY_THRESHOLD)


@dataclass(frozen=True, kw_only=True)
class FineTuneSections:
    """The sections of a stage that fine-tunes a model with the shared loop (alignment.training); a stage
    config extends it (its own defaults: a field given again with another default_factory)."""

    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    seed: int = ranged(">= 0", 0)


@dataclass(frozen=True)
class ChatSection:
    """How dialogs become tokens (alignment.chat): "llama2" (the Llama-2 format with the tokenizer's own
    BOS/EOS) or "model" (the tokenizer's own chat template). Unset: the template stored with the checkpoint
    in `model.path`, "llama2" where none is; a checkpoint's stored template always wins, and naming another
    one is an error. The choice is stored with every checkpoint the stage writes."""

    template: Literal["llama2", "model"] | None = None
