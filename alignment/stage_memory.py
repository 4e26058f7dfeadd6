"""The memory of one stage on one GPU, phase by phase: what sits on a GPU at the same time.

A stage's phases (e.g. PPO's generation: actor and critic model states, the actor's gathered weights under
ZeRO-3, the KV cache; scoring: the reward models; training: activations of actor and critic) are summed from
`alignment.memory`'s per-model figures. One planner per stage (`plan_sft`, `plan_rm`, ...), named by the
stage registry (`alignment.stages.STAGES`); `align plan` (`alignment.plan`) prints them and finds changes
that fit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignment.memory import (Activations, GiB, Head, ModelEstimate, ModelShape, activation_bytes, estimate,
                              kv_cache_bytes, layer_activation_bytes, num_params, resolve_shape)

REPO = Path(__file__).resolve().parents[1]
# CUDA context, NCCL buffers and allocator fragmentation: a rule of thumb, not a measurement.
RESERVED_BYTES = 2 * GiB
RESERVED = ("reserved: CUDA context, NCCL, allocator slack", RESERVED_BYTES)


# ----------------------------------------------------------------------------------------- the recipe's setup
@dataclass(frozen=True)
class ZeroSettings:
    """What memory reads from a DeepSpeed JSON."""

    path: str
    stage: int
    offload_optimizer: bool
    offload_params: bool
    bucket_bytes: int  # communication buffers on every GPU


# DeepSpeed's defaults for the keys a JSON may leave out
_DS_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                "overlap_comm": False}


def read_zero(path: str) -> ZeroSettings:
    """ZeRO stage, offload and bucket memory of a DeepSpeed JSON (a path as given, or from the repository root).

    Buckets hold 16-bit elements: ZeRO-1/2 keep the reduce and all-gather buckets, 4.5x each with
    overlap_comm (the transformers DeepSpeed guide: 5e8 each needs 9 GB); ZeRO-3 the reduce and prefetch
    buckets."""
    file = Path(path) if Path(path).is_file() else REPO / path
    if not file.is_file():
        raise ValueError(f"distributed.deepspeed: {path} not found (also looked in {REPO})")
    zero = json.loads(file.read_text()).get("zero_optimization", {})
    opts = {**_DS_DEFAULTS, **zero}
    stage = int(zero.get("stage", 0))
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    off_par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    if stage == 3:
        buckets = 2 * (opts["reduce_bucket_size"] + opts["stage3_prefetch_bucket_size"])
    else:
        buckets = 2 * (opts["reduce_bucket_size"] + opts["allgather_bucket_size"]) * (4.5 if opts["overlap_comm"] else 1)
    return ZeroSettings(str(path), stage, off_opt, off_par, int(buckets))


@dataclass(frozen=True)
class Setup:
    """The GPUs and how the recipe uses them."""

    gpus_per_node: int
    nodes: int
    zero: ZeroSettings | None  # None: no DeepSpeed
    weight_bytes: int  # of the trained models' weights (DeepSpeed casts them to bf16/fp16)
    act_bytes: int  # of activations and the KV cache
    prompt_tokens: int  # assumed prompt length for generation and PPO rows

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.nodes


def make_setup(cfg, gpus_per_node: int, nodes: int, prompt_tokens: int) -> Setup:
    """"auto" precision and dtype are planned as bf16: what they resolve to on GPUs that have it."""
    dist, fp32 = cfg.distributed, cfg.model.dtype == "float32"
    zero = read_zero(dist.deepspeed) if dist.deepspeed else None
    weight_bytes = 2 if (zero and dist.mixed_precision != "no") or not fp32 else 4
    act_bytes = 4 if fp32 and dist.mixed_precision == "no" else 2
    return Setup(gpus_per_node, nodes, zero, weight_bytes, act_bytes, prompt_tokens)


def _trained(setup: Setup, path: str, role: str, head: Head, lora=None, model: str | None = None) -> ModelEstimate:
    z = setup.zero
    lora_on = lora is not None and lora.enabled
    return estimate(resolve_shape(path, model), setup.num_gpus, z.stage if z else None, nodes=setup.nodes, head=head,
                    offload_optimizer=bool(z and z.offload_optimizer), offload_params=bool(z and z.offload_params),
                    lora_r=lora.r if lora_on else 0, lora_targets=tuple(lora.target_modules) if lora_on else (),
                    load_in_4bit=lora_on and lora.load_in_4bit, weight_bytes=setup.weight_bytes, role=role)


def _frozen(setup: Setup, path: str, role: str, head: Head, dtype: str, model: str | None = None, *,
            zero3: bool = False, offload: bool = False) -> ModelEstimate:
    """A frozen model: a full copy on every GPU, or with `zero3` partitioned over all of them (`reward.zero3`;
    with `offload` its partitions in CPU memory)."""
    return estimate(resolve_shape(path, model), setup.num_gpus, 3 if zero3 else None, nodes=setup.nodes, head=head,
                    trainable=False, offload_params=zero3 and offload, weight_bytes=4 if dtype == "float32" else 2,
                    role=role)


# ----------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Phase:
    """What is on one GPU at the same time during one phase of a stage: (label, bytes) items."""

    name: str
    items: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.items)


@dataclass(frozen=True)
class StagePlan:
    stage: str
    setup: Setup
    models: tuple[ModelEstimate, ...]
    phases: tuple[Phase, ...]
    cpu_per_node: int  # loading (whole copies, or ZeRO-3 shares: `_loading`) or offloaded states, whichever is more
    notes: tuple[str, ...] = ()

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)


def _states(m: ModelEstimate) -> tuple[str, int]:
    return f"{m.role} {m.shape}: model states", m.gpu


def _common(setup: Setup) -> list[tuple[str, int]]:
    items = [RESERVED]
    if setup.zero is not None:
        items.insert(0, (f"ZeRO-{setup.zero.stage} communication buckets", setup.zero.bucket_bytes))
    return items


def _frozen_label(m: ModelEstimate, what: str = "frozen weights") -> str:
    return f"{m.role} {m.shape}: {what}{' (ZeRO-3 share + one layer)' if m.buffer else ''}"


def _train_phase(setup: Setup, trained: list[ModelEstimate], acts: list[tuple[str, Activations]],
                 resident: list[ModelEstimate] = ()) -> Phase:
    items = [_states(m) for m in trained] + [(_frozen_label(m), m.gpu) for m in resident]
    items += [(label, a.total) for label, a in acts]
    return Phase("train", tuple(items + _common(setup)))


def _acts_label(role: str, rows: int, seq: int, checkpointing: bool) -> str:
    return f"{role} activations: {rows} x {seq} tokens, checkpointing {'on' if checkpointing else 'off'}"


def _finetune(cfg, setup: Setup, default: str | None, head: Head = Head.LM, role: str = "policy",
              rows: int | None = None) -> tuple[ModelEstimate, Phase]:
    """The shared loop's training phase: one trained model, a micro-batch of rows x train.max_length."""
    m = cfg.model
    policy = _trained(setup, m.path, role, head, m.lora, default)
    shape = resolve_shape(m.path, default)
    rows = rows or cfg.train.micro_batch_size
    acts = activation_bytes(shape, rows, cfg.train.max_length, checkpointing=m.gradient_checkpointing,
                            act_bytes=setup.act_bytes, attn=m.attn_implementation, head=head)
    label = _acts_label(role, rows, cfg.train.max_length, m.gradient_checkpointing)
    return policy, _train_phase(setup, [policy], [(label, acts)])


def _generation_items(setup: Setup, shape: ModelShape, rows: int, new_tokens: int, role: str) -> list:
    seq = setup.prompt_tokens + new_tokens
    return [(f"{role} KV cache: {rows} x {seq} tokens", kv_cache_bytes(shape, rows, seq, act_bytes=setup.act_bytes)),
             (f"{role} prefill: one layer's activations, {rows} x {setup.prompt_tokens} tokens",
              layer_activation_bytes(shape, rows, setup.prompt_tokens, act_bytes=setup.act_bytes))]


def _loading(setup: Setup, *groups: list[ModelEstimate]) -> int:
    """CPU bytes per node while models load, one group of models loaded together at a time: a whole copy per
    process, except under ZeRO-3 (trained without LoRA: `training.zero3_init`; frozen and partitioned:
    `alignment.frozen.load_partitioned`), where each process builds its share only (`deepspeed.zero.Init`)."""
    def per_node(m: ModelEstimate) -> int:
        whole = m.full_weights if not m.trainable else setup.weight_bytes * m.params
        partitioned = m.buffer > 0 and m.trainable in (0, m.params)  # ZeRO-3, no LoRA adapters
        return whole // setup.nodes if partitioned else setup.gpus_per_node * whole

    return max(sum(per_node(m) for m in g) for g in groups)


def plan_sft(cfg, setup: Setup, default: str | None) -> StagePlan:
    policy, train = _finetune(cfg, setup, default)
    return StagePlan("sft", setup, (policy,), (train,), max(_loading(setup, [policy]), policy.cpu_per_node))


def plan_rm(cfg, setup: Setup, default: str | None) -> StagePlan:
    """The fine-tuning planner with a scalar head, a micro-batch's chosen and rejected answers in one forward;
    or, with `probe.enabled`, the frozen model on the main process (a full copy, no optimizer states, no
    gradients) computing features probe.batch_size answers per forward, and their cache in CPU memory."""
    if cfg.probe.enabled:
        rm = _frozen(setup, cfg.model.path, "reward model (frozen, probe)", Head.SCORE, cfg.model.dtype, default)
        shape = resolve_shape(cfg.model.path, default)
        rows = cfg.probe.batch_size
        features = Phase("features", ((f"{rm.role} {rm.shape}: weights", rm.gpu),
                                      (f"forward: one layer's activations, {rows} x {cfg.train.max_length} tokens",
                                       layer_activation_bytes(shape, rows, cfg.train.max_length,
                                                              act_bytes=setup.act_bytes)), RESERVED))
        return StagePlan("rm", setup, (rm,), (features,), _loading(setup, [rm]),
                         notes=("probe: the head is fit on the main process from cached features "
                                "(2 x pairs x hidden floats in CPU memory); other processes wait",))
    rm, train = _finetune(cfg, setup, default, Head.SCORE, "reward model", rows=2 * cfg.train.micro_batch_size)
    return StagePlan("rm", setup, (rm,), (train,), max(_loading(setup, [rm]), rm.cpu_per_node))


def plan_dpo(cfg, setup: Setup, default: str | None) -> StagePlan:
    """The fine-tuning planner plus the reference: before training, the starting model itself (a full copy on
    the main process's GPU, before the ZeRO engine; with LoRA, its adapters off) computes the reference
    log-probs of every pair, dpo.batch_size pairs (2x the rows) per forward without gradients; the training
    phase holds no second model. One forward per micro-batch holds its chosen and rejected answers: 2x rows."""
    reference = _frozen(setup, cfg.model.path, "reference (the starting model)", Head.LM, cfg.model.dtype, default)
    shape = resolve_shape(cfg.model.path, default)
    rows = 2 * cfg.dpo.batch_size
    ref = Phase("reference", ((f"{reference.role} {reference.shape}: weights", reference.gpu),
                              (f"reference forward: one layer's activations and the logits, {rows} x "
                               f"{cfg.train.max_length} tokens",
                               layer_activation_bytes(shape, rows, cfg.train.max_length, act_bytes=setup.act_bytes)
                               + rows * cfg.train.max_length * shape.vocab_size * setup.act_bytes), RESERVED))
    policy, train = _finetune(cfg, setup, default, rows=2 * cfg.train.micro_batch_size)
    # the policy loads whole on every process (it computes the reference before the engine partitions it)
    cpu = max(setup.gpus_per_node * setup.weight_bytes * policy.params, policy.cpu_per_node)
    return StagePlan("dpo", setup, (reference, policy), (ref, train), cpu)


def plan_rejection_sampling(cfg, setup: Setup, default: str | None) -> StagePlan:
    """Sampling (the sampler and the RMs as full copies on every GPU, or partitioned over all GPUs with
    generation.zero3 / reward.zero3; K samples per prompt in a generation batch) and fine-tuning run one after
    the other; the sampler of the largest iteration counts. An RS+DPO
    iteration (`update: dpo`) trains on pairs: a micro-batch's forward holds 2x its rows (as `plan_dpo`; its
    reference pass, the start model without gradients, is not planned as a phase of its own)."""
    samplers = [it.sample_from or cfg.policy.sample_from or cfg.model.path for it in cfg.iterations]
    sampler_path = max(samplers, key=lambda p: num_params(resolve_shape(p, default)))
    sampler = _frozen(setup, sampler_path, "sampler", Head.LM, cfg.model.dtype, default, zero3=cfg.generation.zero3)
    rm_paths = {"combined": ("helpful", "safety"), "helpful": ("helpful",), "safety": ("safety",)}[cfg.reward.mode]
    rms = []
    for name in rm_paths:
        path = getattr(cfg.reward, f"{name}_rm")
        if path is None:
            raise ValueError(f"reward.{name}_rm is not set; reward.mode={cfg.reward.mode!r} needs it")
        rms.append(_frozen(setup, path, f"{name} RM", Head.SCORE, cfg.reward.dtype, default, zero3=cfg.reward.zero3))
    items = [(_frozen_label(m, "weights"), m.gpu) for m in [sampler, *rms]]
    items += _generation_items(setup, resolve_shape(sampler_path, default), cfg.generation.batch_size,
                               cfg.generation.max_new_tokens, "sampler")
    rm_shape = resolve_shape(getattr(cfg.reward, f"{rm_paths[0]}_rm"), default)
    items.append((f"RM scoring: one layer's activations, {cfg.reward.batch_size} x {cfg.reward.max_length} tokens",
                  layer_activation_bytes(rm_shape, cfg.reward.batch_size, cfg.reward.max_length, act_bytes=setup.act_bytes)))
    sample = Phase("sample", tuple(items + [RESERVED]))
    pairs = any(it.update == "dpo" for it in cfg.iterations)
    policy, train = _finetune(cfg, setup, default, rows=2 * cfg.train.micro_batch_size if pairs else None)
    cpu = max(_loading(setup, [sampler, *rms], [policy]), policy.cpu_per_node)
    return StagePlan("rejection-sampling", setup, (sampler, *rms, policy), (sample, train), cpu)


def plan_gatt(cfg, setup: Setup, default: str | None) -> StagePlan:
    """Dialog sampling and the adherence evaluation with the policy as a full copy, or partitioned over all
    GPUs with sampling.zero3 (contexts up to train.max_length, and eval.max_context), then fine-tuning."""
    sampler = _frozen(setup, cfg.model.path, "sampler", Head.LM, cfg.model.dtype, default, zero3=cfg.sampling.zero3)
    shape = resolve_shape(cfg.model.path, default)

    def sampling(name: str, rows: int, seq: int) -> Phase:
        return Phase(name, ((_frozen_label(sampler, "weights"), sampler.gpu),
                            (f"sampler KV cache: {rows} x {seq} tokens",
                             kv_cache_bytes(shape, rows, seq, act_bytes=setup.act_bytes)), RESERVED))

    policy, train = _finetune(cfg, setup, default)
    phases = [sampling("sample", cfg.sampling.batch_size, cfg.train.max_length), train]
    if cfg.eval.enabled:
        context = cfg.eval.max_context or shape.max_position_embeddings
        phases.append(sampling("eval", cfg.eval.batch_size, context))
    cpu = max(_loading(setup, [sampler], [policy]), policy.cpu_per_node)
    return StagePlan("gatt", setup, (sampler, policy), tuple(phases), cpu)


def plan_ppo(cfg, setup: Setup, default: str | None) -> StagePlan:
    """Actor and critic in one ZeRO engine (the actor alone for the critic-free ppo.algorithm rloo and grpo);
    reference and RMs frozen full copies on every GPU (on the CPU between their phases with reward.offload),
    or with reward.zero3 partitioned over all GPUs (`alignment.frozen`). Under ZeRO-3 generation gathers the
    actor's full weights (rollout.gather "round") or one layer at a time. Rows are prompt_tokens +
    rollout.max_new_tokens long; each process answers its prompts ppo.num_samples times."""
    m, r = cfg.model, cfg.reward
    actor = _trained(setup, m.path, "actor", Head.LM, m.lora, default)
    has_critic = cfg.ppo.algorithm == "ppo"
    critic_path = cfg.critic.path or r.helpful_rm
    critic = _trained(setup, critic_path, "critic", Head.VALUE, None, default) if has_critic else None
    trained = [actor, critic] if has_critic else [actor]
    sharded = {"zero3": r.zero3, "offload": r.offload}
    reference = None if m.lora.enabled else _frozen(setup, r.reference or m.path, "reference", Head.LM, r.dtype,
                                                    default, **sharded)
    helpful = _frozen(setup, r.helpful_rm, "helpful RM", Head.SCORE, r.dtype, default, **sharded)
    safety = _frozen(setup, r.safety_rm, "safety RM", Head.SCORE, r.dtype, default, **sharded)
    frozen = [x for x in (reference, helpful, safety) if x is not None]
    states = [_states(x) for x in trained]
    # partitioned (reward.zero3) they stay on the GPUs throughout, their share and one gathered layer each
    # (offload: the share in CPU memory); full copies with reward.offload visit the GPU only in their phase
    resident = frozen if r.zero3 or not r.offload else []

    def weights(models):
        return [(_frozen_label(x), x.gpu) for x in models]

    actor_shape = resolve_shape(m.path, default)
    gen = states + weights(resident)
    if setup.zero is not None and setup.zero.stage == 3 and cfg.rollout.gather == "round":
        gen.append((f"actor {actor.shape}: weights gathered for generation", 2 * actor.params))
    # rollout.gather "layer": one layer at a time, DeepSpeed's gather buffer in the actor's model states
    # each process answers its share of the iteration's prompts, rollout.batch_size at a time
    rollout_rows = min(cfg.rollout.batch_size, max(1, cfg.ppo.batch_size // setup.num_gpus) * cfg.ppo.num_samples)
    gen += _generation_items(setup, actor_shape, rollout_rows, cfg.rollout.max_new_tokens, "actor")
    rm_shape = resolve_shape(r.helpful_rm, default)
    score = states + weights(resident if resident else [helpful, safety])
    score.append((f"RM scoring: one layer's activations, {r.batch_size} x {r.max_length} tokens",
                  layer_activation_bytes(rm_shape, r.batch_size, r.max_length, act_bytes=setup.act_bytes)))
    phases = [Phase("generate", tuple(gen + _common(setup))), Phase("score", tuple(score + _common(setup)))]
    if reference is not None and not resident:
        phases.append(Phase("reference", tuple(states + weights([reference]) + _common(setup))))
    rows, seq = cfg.ppo.micro_batch_size, setup.prompt_tokens + cfg.rollout.max_new_tokens
    acts = [(_acts_label("actor", rows, seq, m.gradient_checkpointing),
             activation_bytes(actor_shape, rows, seq, checkpointing=m.gradient_checkpointing, act_bytes=setup.act_bytes,
                              attn=m.attn_implementation, logit_positions=cfg.rollout.max_new_tokens + 1, logit_bytes=4))]
    if has_critic:
        acts.append((_acts_label("critic", rows, seq, cfg.critic.gradient_checkpointing),
                     activation_bytes(resolve_shape(critic_path, default), rows, seq,
                                      checkpointing=cfg.critic.gradient_checkpointing, act_bytes=setup.act_bytes,
                                      attn=m.attn_implementation, head=Head.VALUE)))
    phases.append(_train_phase(setup, trained, acts, resident))
    offloaded = sum(x.cpu_per_node for x in frozen) if r.zero3 else setup.gpus_per_node * sum(x.gpu for x in frozen)
    cpu = max(_loading(setup, [*trained, *frozen]), sum(x.cpu_per_node for x in trained) + (offloaded if r.offload else 0))
    return StagePlan("ppo", setup, (*trained, *frozen), tuple(phases), cpu)
