"""One frozen config dataclass per stage, composed of the shared sections (alignment.config.sections); every
numeric field declares its allowed values (`ranged`, alignment.config.ranges)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignment.config.loader import ConfigError
from alignment.config.ranges import ranged
from alignment.config.sections import (AttnImplementation, ChatSection, DataSource, DistributedSection, Dtype,
                                       EvalSection, FineTuneSections, GenerationSection, LoggingSection, ModelSection,
                                       OptimSection, OutputSection, RewardJudgeSection, RewardModelRunSection,
                                       ScheduleSection, TrainSection)


@dataclass(frozen=True)
class TinyModelSection:
    """The toy world's tiny Llama, built from a config and a tokenizer trained here (no download)."""

    size: Literal["nano", "tiny", "small", "bench"] = "tiny"  # alignment.models.tiny.SIZES
    vocab_size: int = ranged(">= 1", 2048)
    max_position_embeddings: int = ranged(">= 1", 1024)


@dataclass(frozen=True)
class PretrainData:
    corpus: list[DataSource]  # rows {"text": ...}
    eval_fraction: float = ranged("[0, 1)", 0.02)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(FineTuneSections):
    data: PretrainData
    output: OutputSection
    model: TinyModelSection = field(default_factory=TinyModelSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-3, weight_decay=0.1))


@dataclass(frozen=True)
class SFTData:
    train: list[DataSource]  # sft_dialog rows
    eval: list[DataSource] = field(default_factory=list)
    train_on: Literal["all", "last"] = "all"  # "last": loss on the final answer only (GAtt)


@dataclass(frozen=True, kw_only=True)
class SFTConfig(FineTuneSections):
    model: ModelSection
    data: SFTData
    output: OutputSection
    chat: ChatSection = field(default_factory=ChatSection)
    eval: EvalSection = field(default_factory=EvalSection)


# --------------------------------------------------------------------------------------------- reward models
MarginScale = Literal["none", "small", "large"]


@dataclass(frozen=True)
class MixSection:
    """How `data.secondary` is mixed into `data.primary` (alignment.data.mixing): "equal" draws as many
    secondary pairs as there are primary ones (helpfulness RM), "ratio" makes primary `primary_fraction`
    of the mix (safety RM: 0.9), "all" concatenates both."""

    kind: Literal["all", "equal", "ratio"] = "all"
    primary_fraction: float = ranged("(0, 1]", 0.9)  # only for kind "ratio"


@dataclass(frozen=True)
class RMData:
    primary: list[DataSource]  # preference_pair rows, all used
    secondary: list[DataSource] = field(default_factory=list)  # pool the mix draws from (seeded)
    mix: MixSection = field(default_factory=MixSection)
    test: dict[str, list[DataSource]] = field(default_factory=dict)  # test-set name -> preference_pair sources
    dedup_test_prompts: bool = True  # drop training pairs whose prompt (whole context) is in a test set


@dataclass(frozen=True)
class RMEvalSection:
    batch_size: int = ranged(">= 1", 32)
    calibration_bins: int = ranged(">= 1", 5)  # bins of confidence max(p, 1 - p) over [0.5, 1]
    histogram: bool = True  # reward-score histograms as scores.png
    # the safety switch's threshold is calibrated to this precision on the test answers labelled safe/unsafe
    # (chosen_safe/rejected_safe) and written to final/safety_switch.json (reward.safety_threshold: calibrated)
    switch_precision: float = ranged("(0, 1]", 0.89)  # the paper's 0.15 had precision 0.89 (3.2.3)


@dataclass(frozen=True)
class RMAblationSection:
    """Train one sub-run per margin scale on the same data (Table 28); empty: a single run."""

    margin_scales: list[MarginScale] = field(default_factory=list)


@dataclass(frozen=True)
class RMProbeSection:
    """A linear probe instead of fine-tuning (docs/method.md#linear-probe-reward-models-beyond-the-paper):
    the trunk stays frozen, the last-token features of every pair's two answers are computed once (cached in
    the run), and the scalar head alone is fit to the ranking loss by L-BFGS. One forward pass over the data,
    no backward through the model: several times more pairs than LoRA in the same CPU time."""

    enabled: bool = False
    # penalties l2/2 * |w * sd|^2 (on the head over standardised features) to choose from: by k-fold
    # cross-validated accuracy on the training pairs where there are several, the best (the larger on a tie)
    l2: list[float] = ranged(">= 0", factory=lambda: [0.05, 0.2, 0.5, 2.0])
    cv_folds: int = ranged(">= 2", 5)  # folds of the cross-validation that picks l2
    max_iter: int = ranged(">= 1", 200)  # L-BFGS iterations (full batch; the fit is convex)
    batch_size: int = ranged(">= 1", 16)  # answers per forward while computing the features


@dataclass(frozen=True, kw_only=True)
class RMConfig(FineTuneSections):
    model: ModelSection  # path: the SFT checkpoint the RM starts from
    data: RMData
    output: OutputSection
    chat: ChatSection = field(default_factory=ChatSection)
    margin_scale: MarginScale = "small"
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    # the paper's RM schedule: cosine to 10% of max lr, warm-up 3% of steps (at least 5)
    schedule: ScheduleSection = field(default_factory=lambda: ScheduleSection(
        kind="cosine", warmup_ratio=0.03, min_warmup_steps=5, min_lr_ratio=0.1))
    train: TrainSection = field(default_factory=lambda: TrainSection(epochs=1.0, packing=False))
    eval: RMEvalSection = field(default_factory=RMEvalSection)
    ablation: RMAblationSection = field(default_factory=RMAblationSection)
    probe: RMProbeSection = field(default_factory=RMProbeSection)

    def __post_init__(self):
        if not self.probe.l2:
            raise ConfigError("probe.l2 is empty: give at least one penalty (e.g. [0.5])")
        if self.probe.enabled and self.model.lora.enabled:
            raise ConfigError("probe.enabled trains the scalar head alone on a frozen model: set "
                              "model.lora.enabled=false (or probe.enabled=false to fine-tune with LoRA)")


# --------------------------------------------------------------------------------------------- DPO (issue 25)
@dataclass(frozen=True)
class DPOSection:
    """The preference loss (alignment.losses.DPO_LOSSES) against the starting model as reference."""

    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO (Rafailov et al. 2023); ipo: Azar et al. 2023
    beta: float = ranged("> 0", 0.1)  # the KL strength: implicit reward beta * log(pi / ref); IPO's tau
    # the RMs' rating margin (Table 27) subtracted from beta * h in the sigmoid loss; "none": plain DPO
    margin_scale: MarginScale = "none"
    # pairs per forward of the reference pass (before training) and of the held-out pair evaluation
    batch_size: int = ranged(">= 1", 16)

    def __post_init__(self):
        if self.loss == "ipo" and self.margin_scale != "none":
            raise ConfigError(f"dpo.margin_scale {self.margin_scale!r} is for the sigmoid loss; IPO's target "
                              "1/(2 beta) is the gap it asks for: set dpo.margin_scale: none")


@dataclass(frozen=True, kw_only=True)
class DPOConfig(FineTuneSections):
    """`align dpo`: offline DPO/IPO on preference pairs, the same files and mixes as the RMs (`data` is an RM
    data section: the pairs, their mix and held-out test sets), from the SFT model, which is also the
    reference (its log-probs computed once before training)."""

    model: ModelSection  # the policy, and the reference pi_ref (with LoRA: the model with adapters disabled)
    data: RMData
    output: OutputSection
    # required (`dpo: {}` takes every default): a minimal RM recipe must not read as a DPO one (`align plan`)
    dpo: DPOSection
    chat: ChatSection = field(default_factory=ChatSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-7, weight_decay=0.0))
    schedule: ScheduleSection = field(default_factory=lambda: ScheduleSection(kind="linear", warmup_ratio=0.1))
    train: TrainSection = field(default_factory=lambda: TrainSection(epochs=1.0, packing=False))
    # answers to held-out prompts, gold-scored in the toy world, as the SFT stage evaluates
    eval: EvalSection = field(default_factory=lambda: EvalSection(max_prompts=200))


@dataclass(frozen=True)
class RSIteration:
    """One rejection-sampling iteration (RLHF-V1, V2, ...): K samples per prompt at one temperature."""

    num_samples: int = ranged(">= 1")  # K; the paper grows it with each iteration
    # 0: greedy; best for 10-100 samples is 1.2-1.3 and drifts as the model changes
    temperature: float = ranged(">= 0", 1.0)
    sample_from: str | None = None  # this iteration's sampler (distillation from the large model's Vn)
    # how the policy learns from the scored samples: "sft" fine-tunes on the best answer per prompt (the
    # paper); "dpo" (RS+DPO, beyond the paper: later Llama releases) trains DPO from this iteration's start
    # checkpoint, also the reference, on one (best, worst) pair per prompt, with the recipe's `dpo` section
    update: Literal["sft", "dpo"] = "sft"
    # this iteration's learning rate (optim.lr for its fine-tune or DPO); None: the recipe's optim.lr. RS+DPO
    # iterations want a lower one than the SFT iterations they follow (README, "DPO")
    lr: float | None = ranged("> 0", None)


@dataclass(frozen=True)
class RSData:
    prompts: list[DataSource]  # rl_prompt rows to sample answers for
    eval: list[DataSource] = field(default_factory=list)  # sft_dialog rows: held-out loss of each iteration
    train_on: Literal["all", "last"] = "last"  # the loss is on the kept (last) answer, not the context's


@dataclass(frozen=True)
class RSPolicySection:
    # The checkpoint that draws the samples in every iteration (distillation: the largest model); None:
    # the policy itself, i.e. model.path in V1 and the previous iteration's fine-tuned checkpoint after.
    sample_from: str | None = None


@dataclass(frozen=True, kw_only=True)
class RSRewardSection(RewardJudgeSection):
    """The reward models that rank the samples and which of them decide: "combined" is the switch of 3.2.3."""

    mode: Literal["combined", "helpful", "safety"] = "combined"
    # partition the RMs with ZeRO-3 over the run's processes (1/N of their weights each; 70B RMs)
    zero3: bool = False


@dataclass(frozen=True)
class RSGenerationSection:
    """The sampling of every iteration. Not the shared GenerationSection: the temperature is each
    iteration's own (`iterations[].temperature`, paper 3.2.3)."""

    max_new_tokens: int = ranged(">= 1", 128)
    top_p: float = ranged("(0, 1]", 1.0)
    batch_size: int = ranged(">= 1", 64)  # sequences per generate() call: the K samples of a prompt share a batch
    prompts_per_shard: int = ranged(">= 1", 64)  # one atomically written sample shard per chunk of prompts
    # hf: batched KV-cache sampling (alignment.generation); vllm: a vLLM engine (needs vllm + CUDA, one
    # process); auto: vllm where usable, else hf. Both write the same shard records.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    vllm_gpu_memory_utilization: float = ranged("(0, 1]", 0.5)  # the share vLLM reserves; the RMs are loaded beside it
    # hf only: partition the sampler with ZeRO-3 over the run's processes; each forward gathers one layer at a
    # time and the processes decode in lock step (a 70B sampler on 80GB GPUs; ~5x slower per token than whole)
    zero3: bool = False


@dataclass(frozen=True)
class RSSweepSection:
    """The temperature sweep of Figures 7-8: max and median RM score among K samples, per temperature."""

    enabled: bool = False  # run the sweep instead of the iterations (writes <output.dir>/sweep/)
    checkpoint: str | None = None  # default: policy.sample_from, else model.path
    temperatures: list[float] = ranged("> 0", factory=lambda: [0.6, 0.8, 1.0, 1.2, 1.4])
    max_samples: int = ranged(">= 1", 64)  # K runs over 1, 2, 4, ... up to this
    num_prompts: int = ranged(">= 1", 32)  # the first N prompts of data.prompts


@dataclass(frozen=True, kw_only=True)
class RejectionSamplingConfig(FineTuneSections):
    """Stage 3, rejection sampling (RLHF-V1..Vn). `model` is the checkpoint fine-tuned in V1; iteration n
    fine-tunes the checkpoint of iteration n-1 with the shared fine-tune sections."""

    model: ModelSection
    data: RSData
    output: OutputSection
    chat: ChatSection = field(default_factory=ChatSection)
    iterations: list[RSIteration] = field(default_factory=lambda: [RSIteration(num_samples=4)])
    # from this iteration on (paper: 4), pick among all iterations' samples; None: this iteration's only
    best_of_all_from: int | None = ranged(">= 1", None)
    policy: RSPolicySection = field(default_factory=RSPolicySection)
    reward: RSRewardSection = field(default_factory=RSRewardSection)
    generation: RSGenerationSection = field(default_factory=RSGenerationSection)
    sweep: RSSweepSection = field(default_factory=RSSweepSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # the loss of `update: dpo` iterations (RS+DPO); they share optim, schedule and train with the SFT
    # iterations, except that they never pack rows (a DPO example is a pair: train.packing is read as false)
    dpo: DPOSection = field(default_factory=DPOSection)

    def __post_init__(self):
        for n, it in enumerate(self.iterations, start=1):
            pooled = self.best_of_all_from is not None and n >= self.best_of_all_from
            if it.update == "dpo" and it.num_samples < 2 and not pooled:
                raise ConfigError(f"iterations[{n - 1}]: update dpo needs num_samples >= 2 (a best and a worst "
                                  f"answer per prompt), got {it.num_samples}")


# --------------------------------------------------------------------------------------------- PPO (3.2.3)
@dataclass(frozen=True)
class CriticSection:
    """The value model: the base transformer with a linear value head on every token
    (`AutoModelForTokenClassification`, one label). Loaded from the helpfulness RM by default, which reuses
    its transformer and its scalar head (a value function starts close to a reward predictor)."""

    path: str | None = None  # default: reward.helpful_rm
    lr: float | None = ranged("> 0", None)  # default: optim.lr
    dtype: Dtype = "auto"
    gradient_checkpointing: bool = False


@dataclass(frozen=True, kw_only=True)
class PPORewardSection(RewardJudgeSection):
    """The frozen models of the reward `WHITEN(LOGIT(Rc)) - beta * KL(pi || pi_0)`: the two RMs and the
    reference policy pi_0, all in inference mode (`dtype` is of the RMs and the reference)."""

    helpful_rm: str
    safety_rm: str
    reference: str | None = None  # default: model.path (ignored with a LoRA actor: adapters off = reference)
    kl_beta: float = ranged(">= 0", 0.01)  # 0.01 for 7B/13B, 0.005 for 34B/70B
    kl_estimator: Literal["k1", "k3"] = "k1"
    offload: bool = False  # keep RMs and reference on CPU outside their phase (GPU runs)
    # partition RMs and reference with ZeRO-3 over the run's processes: 1/N of their weights each (70B)
    zero3: bool = False


@dataclass(frozen=True)
class PPOData:
    prompts: list[DataSource]  # rl_prompt rows sampled for rollouts
    eval_prompts: list[DataSource] = field(default_factory=list)  # held-out rl_prompt rows (early stopping)


# the keys of the ppo section only PPO's critic and GAE read: rloo and grpo reject them (PPOSection.__post_init__)
PPO_ONLY_KEYS = ("value_clip", "vf_coef", "gamma", "lam")


@dataclass(frozen=True)
class PPOSection:
    # ppo: GAE advantages from a critic (the paper); rloo / grpo: critic-free, from the num_samples answers of
    # each prompt (alignment.losses.RLAlgorithm; docs/method.md#rloo-and-grpo)
    algorithm: Literal["ppo", "rloo", "grpo"] = "ppo"
    # K answers sampled per prompt (rloo and grpo: at least 2, their baseline is the other answers)
    num_samples: int = ranged(">= 1", 1)
    iterations: int = ranged(">= 1", 400)  # the paper ran 200-400, with early stopping
    batch_size: int = ranged(">= 1", 512)  # prompts per iteration, all processes together (rows: x num_samples)
    # rows per optimizer step (one step per mini-batch), all processes together
    mini_batch_size: int = ranged(">= 1", 64)
    # rows per forward/backward per process (gradient accumulation inside a mini-batch)
    micro_batch_size: int = ranged(">= 1", 8)
    epochs: int = ranged(">= 1", 1)  # passes over each iteration's batch
    clip: float = ranged("> 0", 0.2)
    value_clip: float | None = ranged("> 0", 0.2)  # None: the value loss is not clipped
    vf_coef: float = ranged(">= 0", 0.1)  # weight of the value loss in the one backward of actor + critic
    gamma: float = ranged("[0, 1]", 1.0)
    lam: float = ranged("[0, 1]", 0.95)
    max_kl: float | None = ranged("> 0", None)  # stop when the mean sequence KL to the reference exceeds this

    def __post_init__(self):
        if self.algorithm == "ppo":
            return
        if self.num_samples < 2:
            raise ConfigError(f"algorithm {self.algorithm} needs num_samples >= 2 answers per prompt (its baseline is "
                              f"the other answers of the prompt); got {self.num_samples}")
        changed = [k for k in PPO_ONLY_KEYS if getattr(self, k) != getattr(PPOSection, k)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for algorithm ppo (its "
                              f"critic and GAE); algorithm {self.algorithm} has neither: remove them")


@dataclass(frozen=True)
class EarlyStoppingSection:
    """Held-out evaluation by the combined reward (greedy answers); the best actor becomes `final/`."""

    every_iterations: int = ranged(">= 0", 10)  # 0: never evaluate, keep the last actor
    patience: int = ranged(">= 1", 3)  # stop after this many evaluations without improvement
    max_prompts: int = ranged(">= 1", 256)
    max_new_tokens: int = ranged(">= 1", 256)
    batch_size: int = ranged(">= 1", 64)
    min_delta: float = ranged(">= 0", 0.0)


@dataclass(frozen=True, kw_only=True)
class PPORolloutSection(GenerationSection):
    """The actor's sampling of every iteration. Under ZeRO-3 `gather` says how its partitioned weights meet
    for generation: "round" gathers them whole once per rollout round (fast; a full 16-bit copy on every
    GPU), "layer" lets DeepSpeed gather one layer at a time for every forward, the prompt's and each new
    token's (a layer's weights on the GPU at a time, ~layers x slower per token; what a 70B actor needs)."""

    gather: Literal["round", "layer"] = "round"


@dataclass(frozen=True)
class PPOConfig:
    model: ModelSection  # the actor, initialised from the rejection-sampling (or SFT) checkpoint
    reward: PPORewardSection
    data: PPOData
    output: OutputSection
    chat: ChatSection = field(default_factory=ChatSection)
    critic: CriticSection = field(default_factory=CriticSection)
    rollout: PPORolloutSection = field(default_factory=lambda: PPORolloutSection(max_new_tokens=256))
    ppo: PPOSection = field(default_factory=PPOSection)
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, eps=1e-5))  # constant lr (3.2.3)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(every_steps=1))
    seed: int = ranged(">= 0", 0)

    def __post_init__(self):
        algorithm = self.ppo.algorithm
        if algorithm != "ppo" and self.critic != CriticSection():
            raise ConfigError(f"critic is for ppo.algorithm ppo; {algorithm} trains no critic: remove the critic section")
        if algorithm == "grpo" and self.reward.kl_estimator != "k3":
            raise ConfigError("ppo.algorithm grpo puts the k3 KL estimate in its loss (DeepSeekMath): set "
                              f"reward.kl_estimator: k3 (got {self.reward.kl_estimator})")


# --------------------------------------------------------------------------------------------- GAtt (3.3)
ConstraintType = Literal["upper", "start", "end", "persona", "language", "lower", "exclaim"]  # a GAtt constraint


@dataclass(frozen=True)
class GAttData:
    instructions: list[DataSource]  # gatt_instruction rows the training dialogs carry
    prompts: list[DataSource]  # rl_prompt rows: their (last) user message is one user turn of a dialog
    # sft_dialog rows trained beside the GAtt dialogs, as they are (e.g. the rejection-sampling sets the model
    # was last fine-tuned on): without them the fine-tune on system-prompt dialogs only drifts the model's
    # answers to plain prompts (tiny demo: false refusals 0% -> 7.5%; with the RS sets replayed 1.25%)
    replay: list[DataSource] = field(default_factory=list)
    # only the instructions (of data.instructions and eval.instructions) whose every constraint is of these
    # types; empty: all. For a model that cannot take some type at all (SmolLM2-135M and the toy world's
    # made-up word-for-word languages); the report and eval.json name the types kept.
    constraint_types: list[ConstraintType] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class GAttSamplingSection(GenerationSection):
    """How the multi-turn dialogs are built and answered (alignment.stages.gatt)."""

    num_dialogs: int = ranged(">= 1", 200)
    min_turns: int = ranged(">= 1", 1)
    max_turns: int = ranged(">= 1", 4)  # N: dialogs have min_turns..max_turns user turns
    # "sample" (the paper): keep a dialog only when its sampled answers obey the instruction;
    # "rewrite" (NOT the paper, a fallback for models that obey too rarely): a breaking answer is
    # rewritten by the toy world's `apply_instruction` to obey
    answers: Literal["sample", "rewrite"] = "sample"
    samples_per_turn: int = ranged(">= 1", 1)  # k > 1: best of k by the checker (the first obeying sample)
    every_turn_examples: bool = True  # loss on every turn's answer as a 'last' turn (gatt.gatt_train_on), not only the final one
    # partition the policy with ZeRO-3 over the run's processes while it samples (and in the adherence
    # evaluation): every process plays the same dialogs with 1/N of the weights, in lock step (a 70B policy)
    zero3: bool = False

    def __post_init__(self):
        if self.min_turns > self.max_turns:
            raise ConfigError(f"min_turns ({self.min_turns}) must not exceed max_turns ({self.max_turns})")


@dataclass(frozen=True)
class GAttEvalSection:
    """Table 30: adherence at each turn of `turns`, instruction once as system prompt, own answers as history."""

    enabled: bool = True
    instructions: list[DataSource] = field(default_factory=list)  # training types, new dialogs
    zero_shot_instructions: list[DataSource] = field(default_factory=list)  # held-out constraints
    prompts: list[DataSource] = field(default_factory=list)  # held-out rl_prompt rows for the user turns
    max_instructions: int = ranged(">= 1", 50)  # dialogs per instruction set (one per instruction)
    turns: list[int] = ranged(">= 1", factory=lambda: [1, 2, 4, 6, 10, 20])
    max_new_tokens: int = ranged(">= 1", 32)
    batch_size: int = ranged(">= 1", 64)
    # prompt + answer tokens; None: the model's max_position_embeddings
    max_context: int | None = ranged(">= 1", None)
    seed: int = ranged(">= 0", 1)


@dataclass(frozen=True, kw_only=True)
class GAttConfig(FineTuneSections):
    """GAtt (paper 3.3): sample multi-turn dialogs with the instruction on every user turn, fine-tune on
    them with the instruction as first-turn system prompt and the loss on the last answer, or on every
    answer as a last one (sampling.every_turn_examples, see gatt.gatt_train_on)."""

    model: ModelSection  # the latest RLHF model: it samples the answers and is fine-tuned
    data: GAttData
    output: OutputSection
    chat: ChatSection = field(default_factory=ChatSection)
    sampling: GAttSamplingSection = field(default_factory=lambda: GAttSamplingSection(temperature=0.7,
                                                                                      max_new_tokens=32))
    eval: GAttEvalSection = field(default_factory=GAttEvalSection)


# --------------------------------------------------------------------------------------------- preference batches
@dataclass(frozen=True)
class CollectData:
    prompts: list[DataSource]  # toy-world rl_prompt rows: each gets two answers from the model


@dataclass(frozen=True)
class CollectConfig:
    """`align collect`: preference pairs on the model's own answers, labelled by the toy world's annotators."""

    model: ModelSection  # the latest policy (the paper: the latest Llama 2-Chat)
    data: CollectData
    output: OutputSection
    chat: ChatSection = field(default_factory=ChatSection)
    # the two answers of a pair are independent samples (temperature > 0)
    generation: GenerationSection = field(default_factory=lambda: GenerationSection(max_new_tokens=64))
    seed: int = ranged(">= 0", 0)


# --------------------------------------------------------------------------------------------- safety (4.2.4)
@dataclass(frozen=True)
class SafetyPrepromptSection:
    """The safety preprompt put as system prompt in front of each adversarial prompt (paper 4.2.4, Tables
    39-40). A prompt whose risk category has an answer template gets `template_preprompt` filled with the
    category, its template and ({generic}) a generic preprompt; any other prompt a `generic` preprompt
    with an `adjective`, both drawn with the run's seed."""

    generic: list[str] = field(default_factory=lambda: ["You are a safe and {adjective} assistant."])
    adjectives: list[str] = field(default_factory=lambda: ["responsible", "respectful", "wise"])
    templates: dict[str, str] = field(default_factory=dict)  # risk category -> answer template
    template_preprompt: str = (
        "The following is a question that can elicit unsafe behavior from you. The question was classified as "
        "belonging to the violating category: '{category}'. You should answer using the following template: "
        "{template}")
    category_field: str = "risk_category"  # rl_prompt rows: meta[category_field]; toy world: parsed from the text


@dataclass(frozen=True)
class SafetyDistillData:
    prompts: list[DataSource]  # rl_prompt rows; the adversarial ones are distilled (see only_adversarial)
    eval: list[DataSource] = field(default_factory=list)  # sft_dialog rows: held-out loss before/after
    train_on: Literal["all", "last"] = "last"
    # keep only adversarial rows: `kind`, else the toy world's parse, else is_safety (evaluate.row_kind)
    only_adversarial: bool = True


@dataclass(frozen=True, kw_only=True)
class SafetyJudgeSection(RewardModelRunSection):
    """The safety RM that decides which distilled answers are kept (4.2.4, Figure 16b)."""

    safety_rm: str  # HF seq-cls dir, one label
    # keep when sigmoid(Rs(distilled)) > sigmoid(Rs(original)) + min_gain; -1: keep every answer (no RM check);
    # 1: keep none (no sigmoid gains 1)
    min_gain: float = ranged("[-1, 1]", 0.0)
    min_kept: int = ranged(">= 1", 1)  # fewer kept answers than this: no fine-tune, final/ is the model unchanged


@dataclass(frozen=True, kw_only=True)
class SafetyDistillConfig(FineTuneSections):
    """Safety context distillation: answer adversarial prompts with and without a safety preprompt, keep the
    preprompted answer where the safety RM scores it above the original, fine-tune without the preprompt."""

    model: ModelSection  # the policy that answers and is fine-tuned
    data: SafetyDistillData
    judge: SafetyJudgeSection
    output: OutputSection
    chat: ChatSection = field(default_factory=ChatSection)
    preprompt: SafetyPrepromptSection = field(default_factory=SafetyPrepromptSection)
    # the same temperature for the original and the preprompted answer; 0: greedy
    generation: GenerationSection = field(default_factory=lambda: GenerationSection(temperature=0.0))
    eval: EvalSection = field(default_factory=EvalSection)


# --------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalPromptSets:
    """Held-out prompts by kind; a file's kind is the set it is listed in. Toy-world rows get gold scores."""

    helpful: list[DataSource] = field(default_factory=list)
    adversarial: list[DataSource] = field(default_factory=list)
    borderline: list[DataSource] = field(default_factory=list)
    max_per_set: int | None = ranged(">= 1", None)  # keep the first N rows of each set


DEFAULT_REFUSAL_MARKERS = ["can not help", "cannot help", "can't help", "can not assist", "cannot assist",
                           "can't assist", "will not help", "won't help", "i refuse", "i must decline",
                           "i'm sorry, but", "i am sorry, but", "i apologize, but", "as an ai"]


@dataclass(frozen=True, kw_only=True)
class EvalJudgeSection(RewardJudgeSection):
    """The reward-model judges and the thresholds of the metrics (alignment.judging); an RM violation is
    sigmoid(Rs) below safety_threshold."""

    tie_margin: float = ranged(">= 0", 0.0)  # win/tie/loss: |score_a - score_b| <= tie_margin is a tie
    refusal_markers: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_MARKERS))  # non-toy answers


@dataclass(frozen=True, kw_only=True)
class EvalGenerationSection(GenerationSection):
    """The answers of every checkpoint; `dtype` and `attn_implementation` are of the loaded checkpoints."""

    dtype: Dtype = "auto"
    attn_implementation: AttnImplementation = "sdpa"


@dataclass(frozen=True)
class EvalOutputSection:
    dir: str
    overwrite: bool = False  # other prompts/judges/generation settings in `dir` are replaced only when set


@dataclass(frozen=True)
class EvalGAttSection(GAttEvalSection):
    """`align eval`'s Table 30 (the GAtt stage's evaluation section, plus the choice of instruction types)."""

    # only the instructions (not the zero-shot ones) whose every constraint is of these types, as the GAtt
    # stage's data.constraint_types chose what it trained on; empty: all
    constraint_types: list[ConstraintType] = field(default_factory=list)


@dataclass(frozen=True)
class EvalConfig:
    """`align eval`: every policy checkpoint answers the same held-out prompts; gold (toy world) and RM
    metrics, win/tie/loss against another checkpoint, GAtt adherence by turn; eval.json, table, plots.
    A checkpoint is "DIR" or "NAME=DIR"."""

    output: EvalOutputSection
    prompts: EvalPromptSets = field(default_factory=EvalPromptSets)
    checkpoints: list[str] = field(default_factory=list)
    pipeline: str | None = None  # a pipeline run directory: its policy checkpoints come first, in order
    against: str | None = None  # the reference every checkpoint is compared with (paper Figure 11: ChatGPT)
    judges: EvalJudgeSection = field(default_factory=EvalJudgeSection)
    generation: EvalGenerationSection = field(default_factory=lambda: EvalGenerationSection(temperature=0.0))
    gatt: EvalGAttSection = field(default_factory=EvalGAttSection)  # adherence by turn where instructions are set
    seed: int = ranged(">= 0", 0)
