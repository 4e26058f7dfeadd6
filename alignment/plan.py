"""`align plan`: per-GPU memory of every model a stage holds, phase by phase, and whether the recipe fits.

A stage's phases are what sits on one GPU at the same time (`plan_stage`): e.g. PPO's generation (actor
and critic model states, the actor's gathered weights under ZeRO-3, the KV cache), scoring (the reward
models), and training (activations of actor and critic). Each model's figures come from
`alignment.memory` (`estimate`: ZeRO model states as DeepSpeed's estimators count them; activations; KV
cache). When the peak does not fit, `suggest` re-plans the recipe with one change at a time (the
strict loader checks each) and reports which changes make it fit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from alignment.memory import (LLAMA2, Activations, GiB, Head, ModelEstimate, ModelShape, activation_bytes, estimate,
                              kv_cache_bytes, layer_activation_bytes, num_params, resolve_shape)

__all__ = ["estimate", "plan_stage", "suggest", "format_plan", "run_plan", "LLAMA2"]

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


def _frozen(setup: Setup, path: str, role: str, head: Head, dtype: str, model: str | None = None) -> ModelEstimate:
    return estimate(resolve_shape(path, model), setup.num_gpus, None, nodes=setup.nodes, head=head, trainable=False,
                    weight_bytes=4 if dtype == "float32" else 2, role=role)


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
    cpu_per_node: int  # loading (every process reads the full models) or offloaded states, whichever is more
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


def _train_phase(setup: Setup, trained: list[ModelEstimate], acts: list[tuple[str, Activations]],
                 resident: list[ModelEstimate] = ()) -> Phase:
    items = [_states(m) for m in trained] + [(f"{m.role} {m.shape}: frozen weights", m.gpu) for m in resident]
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
    """CPU bytes per node while models load: every process reads full copies (no zero.Init), one group of
    models loaded together at a time."""
    return setup.gpus_per_node * max(sum(m.weights if not m.trainable else setup.weight_bytes * m.params for m in g)
                                     for g in groups)


def _plan_sft(cfg, setup: Setup, default: str | None) -> StagePlan:
    policy, train = _finetune(cfg, setup, default)
    return StagePlan("sft", setup, (policy,), (train,), max(_loading(setup, [policy]), policy.cpu_per_node))


def _plan_rm(cfg, setup: Setup, default: str | None) -> StagePlan:
    # one forward scores the chosen and the rejected answers of micro_batch_size pairs: 2x the rows
    rm, train = _finetune(cfg, setup, default, Head.SCORE, "reward model", rows=2 * cfg.train.micro_batch_size)
    return StagePlan("rm", setup, (rm,), (train,), max(_loading(setup, [rm]), rm.cpu_per_node))


def _plan_rejection_sampling(cfg, setup: Setup, default: str | None) -> StagePlan:
    """Sampling (the sampler and the RMs as full copies on every GPU, K samples per prompt in a generation
    batch) and fine-tuning run one after the other; the sampler of the largest iteration counts."""
    samplers = [it.sample_from or cfg.policy.sample_from or cfg.model.path for it in cfg.iterations]
    sampler_path = max(samplers, key=lambda p: num_params(resolve_shape(p, default)))
    sampler = _frozen(setup, sampler_path, "sampler", Head.LM, cfg.model.dtype, default)
    rm_paths = {"combined": ("helpful", "safety"), "helpful": ("helpful",), "safety": ("safety",)}[cfg.reward.mode]
    rms = []
    for name in rm_paths:
        path = getattr(cfg.reward, name)
        if path is None:
            raise ValueError(f"reward.{name} is not set; reward.mode={cfg.reward.mode!r} needs it")
        rms.append(_frozen(setup, path, f"{name} RM", Head.SCORE, cfg.model.dtype, default))
    items = [(f"{m.role} {m.shape}: weights", m.gpu) for m in [sampler, *rms]]
    items += _generation_items(setup, resolve_shape(sampler_path, default), cfg.generation.batch_size,
                               cfg.generation.max_new_tokens, "sampler")
    rm_shape = resolve_shape(getattr(cfg.reward, rm_paths[0]), default)
    items.append((f"RM scoring: one layer's activations, {cfg.reward.batch_size} x {cfg.reward.max_length} tokens",
                  layer_activation_bytes(rm_shape, cfg.reward.batch_size, cfg.reward.max_length, act_bytes=setup.act_bytes)))
    sample = Phase("sample", tuple(items + [RESERVED]))
    policy, train = _finetune(cfg, setup, default)
    cpu = max(_loading(setup, [sampler, *rms], [policy]), policy.cpu_per_node)
    return StagePlan("rejection-sampling", setup, (sampler, *rms, policy), (sample, train), cpu)


def _plan_gatt(cfg, setup: Setup, default: str | None) -> StagePlan:
    """Dialog sampling and the adherence evaluation with the policy as a full copy (contexts up to
    train.max_length, and eval.max_context), then fine-tuning."""
    sampler = _frozen(setup, cfg.model.path, "sampler", Head.LM, cfg.model.dtype, default)
    shape = resolve_shape(cfg.model.path, default)

    def sampling(name: str, rows: int, seq: int) -> Phase:
        return Phase(name, ((f"sampler {sampler.shape}: weights", sampler.gpu),
                            (f"sampler KV cache: {rows} x {seq} tokens",
                             kv_cache_bytes(shape, rows, seq, act_bytes=setup.act_bytes)), RESERVED))

    policy, train = _finetune(cfg, setup, default)
    phases = [sampling("sample", cfg.sampling.batch_size, cfg.train.max_length), train]
    if cfg.eval.enabled:
        context = cfg.eval.max_context or shape.max_position_embeddings
        phases.append(sampling("eval", cfg.eval.batch_size, context))
    cpu = max(_loading(setup, [sampler], [policy]), policy.cpu_per_node)
    return StagePlan("gatt", setup, (sampler, policy), tuple(phases), cpu)


def _plan_ppo(cfg, setup: Setup, default: str | None) -> StagePlan:
    """Actor and critic in one ZeRO engine; reference and RMs frozen full copies on every GPU (on the CPU
    between their phases with reward.offload). Under ZeRO-3 generation gathers the actor's full weights.
    Rows are prompt_tokens + rollout.max_new_tokens long."""
    m, r = cfg.model, cfg.reward
    actor = _trained(setup, m.path, "actor", Head.LM, m.lora, default)
    critic_path = cfg.critic.path or r.helpful_rm
    critic = _trained(setup, critic_path, "critic", Head.VALUE, None, default)
    reference = None if m.lora.enabled else _frozen(setup, r.reference or m.path, "reference", Head.LM, r.dtype, default)
    helpful = _frozen(setup, r.helpful_rm, "helpful RM", Head.SCORE, r.dtype, default)
    safety = _frozen(setup, r.safety_rm, "safety RM", Head.SCORE, r.dtype, default)
    frozen = [x for x in (reference, helpful, safety) if x is not None]
    states = [_states(actor), _states(critic)]
    resident = [] if r.offload else frozen

    def weights(models):
        return [(f"{x.role} {x.shape}: frozen weights", x.gpu) for x in models]

    actor_shape, critic_shape = resolve_shape(m.path, default), resolve_shape(critic_path, default)
    gen = states + weights(resident)
    if setup.zero is not None and setup.zero.stage == 3:
        gen.append((f"actor {actor.shape}: weights gathered for generation", 2 * actor.params))
    # each process answers its share of the iteration's prompts, rollout.batch_size at a time
    rollout_rows = min(cfg.rollout.batch_size, max(1, cfg.ppo.batch_size // setup.num_gpus))
    gen += _generation_items(setup, actor_shape, rollout_rows, cfg.rollout.max_new_tokens, "actor")
    rm_shape = resolve_shape(r.helpful_rm, default)
    score = states + weights(resident if not r.offload else [helpful, safety])
    score.append((f"RM scoring: one layer's activations, {r.batch_size} x {r.max_length} tokens",
                  layer_activation_bytes(rm_shape, r.batch_size, r.max_length, act_bytes=setup.act_bytes)))
    phases = [Phase("generate", tuple(gen + _common(setup))), Phase("score", tuple(score + _common(setup)))]
    if reference is not None and r.offload:
        phases.append(Phase("reference", tuple(states + weights([reference]) + _common(setup))))
    rows, seq = cfg.ppo.micro_batch_size, setup.prompt_tokens + cfg.rollout.max_new_tokens
    acts = [(_acts_label("actor", rows, seq, m.gradient_checkpointing),
             activation_bytes(actor_shape, rows, seq, checkpointing=m.gradient_checkpointing, act_bytes=setup.act_bytes,
                              attn=m.attn_implementation, logit_positions=cfg.rollout.max_new_tokens + 1, logit_bytes=4)),
            (_acts_label("critic", rows, seq, cfg.critic.gradient_checkpointing),
             activation_bytes(critic_shape, rows, seq, checkpointing=cfg.critic.gradient_checkpointing,
                              act_bytes=setup.act_bytes, attn=m.attn_implementation, head=Head.VALUE))]
    phases.append(_train_phase(setup, [actor, critic], acts, resident))
    cpu = max(_loading(setup, [actor, critic, *frozen]), actor.cpu_per_node + critic.cpu_per_node
              + (setup.gpus_per_node * sum(x.gpu for x in frozen) if r.offload else 0))
    return StagePlan("ppo", setup, (actor, critic, *frozen), tuple(phases), cpu)


PLANNERS = {"sft": _plan_sft, "rm": _plan_rm, "rejection-sampling": _plan_rejection_sampling, "gatt": _plan_gatt,
            "ppo": _plan_ppo}


def plan_stage(stage: str, cfg, *, gpus_per_node: int, nodes: int = 1, prompt_tokens: int = 512,
               default_model: str | None = None) -> StagePlan:
    """Per-GPU memory of every phase of `stage` run from recipe `cfg`. A stage this planner does not know
    but whose recipe has `model` and `train` sections is planned as fine-tuning."""
    if stage not in PLANNERS and not (hasattr(cfg, "train") and hasattr(getattr(cfg, "model", None), "lora")):
        raise ValueError(f"no memory plan for stage {stage!r} (known: {', '.join(PLANNERS)}, and stages that "
                         "fine-tune a model.path with the shared loop)")
    setup = make_setup(cfg, gpus_per_node, nodes, prompt_tokens)
    if stage in PLANNERS:
        return PLANNERS[stage](cfg, setup, default_model)
    plan = _plan_sft(cfg, setup, default_model)
    return replace(plan, stage=stage, notes=(f"{stage}: planned as its fine-tuning phase only",))


# ----------------------------------------------------------------------------------------- what to change
@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]  # --set values, in the order they were applied
    nodes: int
    peak: int


def _halve(cfg, key: str, keep: str | None = None) -> list[str]:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value <= 1:
        return []
    out = [f"{key}={value // 2}"]
    if keep:  # keep the batch: grad_accum doubles where the micro-batch halves
        out.append(f"{keep}={getattr(getattr(cfg, section), keep.split('.')[1]) * 2}")
    return out


# stage -> its own memory settings, cheapest first
_STAGE_CANDIDATES = {
    "ppo": lambda cfg: [["critic.gradient_checkpointing=true"] if not cfg.critic.gradient_checkpointing else [],
                        ["reward.offload=true"] if not cfg.reward.offload else [],
                        _halve(cfg, "rollout.batch_size"), _halve(cfg, "reward.batch_size"),
                        _halve(cfg, "ppo.micro_batch_size")],
    "rejection-sampling": lambda cfg: [_halve(cfg, "generation.batch_size"), _halve(cfg, "reward.batch_size")],
    "gatt": lambda cfg: [_halve(cfg, "sampling.batch_size"), _halve(cfg, "eval.batch_size")],
}


def _candidates(stage: str, cfg) -> list[list[str]]:
    """Changes in the order they cost least: memory-only settings first, the method (LoRA) last."""
    out = []
    if not cfg.model.gradient_checkpointing:
        out.append(["model.gradient_checkpointing=true"])
    out += _STAGE_CANDIDATES[stage](cfg) if stage in _STAGE_CANDIDATES else []
    if hasattr(cfg, "train"):
        out.append(_halve(cfg, "train.micro_batch_size", keep="train.grad_accum"))
    zero = read_zero(cfg.distributed.deepspeed) if cfg.distributed.deepspeed else None
    if zero is None or zero.stage < 3:
        out.append(["distributed.deepspeed=recipes/deepspeed/zero3.json"])
    elif not zero.offload_optimizer:
        out.append(["distributed.deepspeed=recipes/deepspeed/zero3_offload.json"])
    if not cfg.model.lora.enabled:
        out.append(["model.lora.enabled=true"])
    return [c for c in out if c]


def suggest(stage: str, raw: dict, overrides: list[str], *, gpus_per_node: int, nodes: int, gpu_memory: int,
            prompt_tokens: int = 512, default_model: str | None = None, max_nodes: int = 64) -> list[Suggestion]:
    """Ways to make the recipe fit: changes applied one after another (each round the cheapest change that
    makes it fit, else the one that lowers the peak most) until it fits, and the fewest nodes that fit
    without changing the recipe."""
    from alignment.cli import config_class
    from alignment.config import apply_overrides, from_dict

    def excess(extra: list[str], n: int) -> tuple[int, int]:
        """(bytes over memory summed over phases, peak): a change must shrink every phase that is too big."""
        cfg = from_dict(config_class(stage), apply_overrides(raw, [*overrides, *extra]))
        plan = plan_stage(stage, cfg, gpus_per_node=gpus_per_node, nodes=n, prompt_tokens=prompt_tokens,
                          default_model=default_model)
        return sum(max(0, p.total - gpu_memory) for p in plan.phases), plan.peak.total

    out, applied, best = [], [], excess([], nodes)
    while best[0] > 0:
        cfg = from_dict(config_class(stage), apply_overrides(raw, [*overrides, *applied]))
        trials = [(excess([*applied, *change], nodes), change) for change in _candidates(stage, cfg)]
        fitting = [t for t in trials if t[0][0] == 0]
        lowest = min(trials, default=(best, None), key=lambda t: t[0])
        choice = fitting[0] if fitting else lowest
        if choice[1] is None or choice[0] >= best:
            break
        applied, best = [*applied, *choice[1]], choice[0]
    if applied and best[0] == 0:
        last = {o.split("=", 1)[0]: o for o in applied}  # a value halved several times: its last value
        out.append(Suggestion(tuple(last.values()), nodes, best[1]))
    for n in range(nodes + 1, max_nodes + 1):
        over, top = excess([], n)
        if over == 0:
            out.append(Suggestion((), n, top))
            break
    return out


# ----------------------------------------------------------------------------------------- output
def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def parse_memory(text: str) -> int:
    """'80GB', '80GiB' or '80': GiB. GPU memory is sold in GiB under the name GB (an "80GB" H100 shows
    79.6 GiB, a "141GB" H200 140.4 GiB)."""
    units = {"gib": GiB, "gb": GiB, "tib": 2 ** 40, "tb": 2 ** 40, "": GiB}
    value = text.strip().lower()
    unit = next(u for u in sorted(units, key=len, reverse=True) if value.endswith(u))
    try:
        return int(float(value[:len(value) - len(unit)]) * units[unit])
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r}: expected e.g. 80GB, 141GB or 80GiB") from None


def format_plan(plan: StagePlan, gpu_memory: int, recipe: str = "") -> str:
    s = plan.setup
    zero = f"DeepSpeed ZeRO-{s.zero.stage} ({s.zero.path})" if s.zero else "no DeepSpeed"
    if s.zero and (s.zero.offload_optimizer or s.zero.offload_params):
        zero += ", optimizer offload" + (" + parameter offload" if s.zero.offload_params else "")
    lines = [f"align plan: {recipe} ({plan.stage}) on {s.num_gpus} GPUs ({s.nodes} node(s) x {s.gpus_per_node}), "
             f"{_gib(gpu_memory)} GiB each",
             f"  {zero}; weights {8 * s.weight_bytes}-bit, activations {8 * s.act_bytes}-bit; "
             f"prompts assumed {s.prompt_tokens} tokens", "",
             f"  {'model (GiB per GPU)':<34}{'params':>9}{'trained':>9}{'weights':>9}{'grad+opt':>9}{'buffer':>8}"
             f"{'total':>8}"]
    for m in plan.models:
        lines.append(f"  {m.role + ' ' + m.shape:<34}{m.params / 1e9:>8.2f}B{m.trainable / 1e9:>8.2f}B"
                     f"{_gib(m.weights):>9}{_gib(m.states):>9}{_gib(m.buffer):>8}{_gib(m.gpu):>8}")
    for phase in plan.phases:
        lines += ["", f"  phase {phase.name}{'(GiB per GPU)':>60}"]
        lines += [f"    {label:<62}{_gib(b):>8}" for label, b in phase.items]
        lines.append(f"    {'total':<62}{_gib(phase.total):>8}")
    peak = plan.peak
    verdict = "fits" if peak.total <= gpu_memory else "DOES NOT FIT"
    lines += ["", f"  peak: phase {peak.name}, {_gib(peak.total)} of {_gib(gpu_memory)} GiB per GPU: {verdict}",
              f"  CPU memory per node: {_gib(plan.cpu_per_node)} GiB (every process loads full copies before ZeRO "
              f"partitions them; offloaded states)"]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_suggestions(plan: StagePlan, suggestions: list[Suggestion], gpu_memory: int) -> str:
    lines = ["  to fit:"]
    too_big = [m for m in plan.models if not m.trainable and m.gpu > gpu_memory]
    if too_big:
        names = ", ".join(f"{m.role} {m.shape} ({_gib(m.gpu)} GiB)" for m in too_big)
        lines.append(f"    the stage keeps full copies of its frozen models on every GPU and {names} alone "
                     "exceed(s) one GPU: point the recipe at smaller models, or shard them (not supported yet)")
    if not suggestions:
        lines.append("    no setting this planner knows makes it fit on this many GPUs")
    for sug in suggestions:
        verdict = "fits" if sug.peak <= gpu_memory else "still too large"
        if sug.overrides:
            sets = " ".join(f"--set {o}" for o in sug.overrides)
            lines.append(f"    {sets}  ->  {_gib(sug.peak)} GiB ({verdict})")
        if sug.nodes != plan.setup.nodes:
            lines.append(f"    or --nodes {sug.nodes} as the recipe is  ->  {_gib(sug.peak)} GiB ({verdict})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the command
def detect_stage(raw: dict, overrides: list[str]) -> str:
    """The stage command whose config class accepts the recipe (the strict loader tells them apart)."""
    from alignment.cli import STAGES, config_class
    from alignment.config import ConfigError, apply_overrides, from_dict

    matches = []
    for stage in STAGES:
        try:
            from_dict(config_class(stage), apply_overrides(raw, overrides))
            matches.append(stage)
        except ConfigError:
            continue
    if len(matches) != 1:
        found = ", ".join(matches) or "none"
        raise ValueError(f"cannot tell which stage the recipe is for (matches: {found}); give --stage")
    return matches[0]


def run_plan(args) -> int:
    """`align plan`: print the plan of a stage recipe (or of every stage of a pipeline recipe); exit 1 when
    some phase does not fit."""

    from alignment.cli import config_class
    from alignment.config import apply_overrides, from_dict, load_config, read_recipe

    gpu_memory = parse_memory(args.gpu_memory)
    if not Path(args.recipe).is_file():
        raise ValueError(f"recipe not found: {args.recipe}")
    raw = read_recipe(args.recipe)
    stage = args.stage or detect_stage(raw, args.overrides)
    kwargs = {"gpus_per_node": args.gpus, "nodes": args.nodes, "prompt_tokens": args.prompt_tokens,
              "default_model": args.model}
    if stage == "pipeline":
        return _plan_pipeline(load_config(config_class("pipeline"), args.recipe, args.overrides), gpu_memory, kwargs)
    cfg = from_dict(config_class(stage), apply_overrides(raw, args.overrides))
    plan = plan_stage(stage, cfg, **kwargs)
    print(format_plan(plan, gpu_memory, args.recipe))
    if plan.peak.total <= gpu_memory:
        return 0
    print(format_suggestions(plan, suggest(stage, raw, args.overrides, gpu_memory=gpu_memory, **kwargs), gpu_memory))
    return 1


def _plan_pipeline(cfg, gpu_memory: int, kwargs: dict) -> int:
    """One line per stage of a pipeline recipe: its peak phase and whether it fits."""
    from alignment.cli import config_class
    from alignment.config import load_config
    from alignment.pipeline import plan_pipeline

    print(f"align plan: pipeline {cfg.output.dir} on {kwargs['gpus_per_node'] * kwargs['nodes']} GPUs "
          f"({kwargs['nodes']} node(s) x {kwargs['gpus_per_node']}), {_gib(gpu_memory)} GiB each")
    print(f"  {'stage':<22}{'command':<20}{'peak phase':<12}{'GiB/GPU':>8}  verdict")
    worst = 0
    for item in plan_pipeline(cfg):
        spec = item["spec"]
        stage_cfg = load_config(config_class(spec.stage), spec.recipe, item["overrides"])
        plan = plan_stage(spec.stage, stage_cfg, **kwargs)
        worst = max(worst, plan.peak.total)
        verdict = "fits" if plan.peak.total <= gpu_memory else "DOES NOT FIT"
        print(f"  {spec.name:<22}{spec.stage:<20}{plan.peak.name:<12}{_gib(plan.peak.total):>8}  {verdict}")
    print("  details and what to change: align plan --recipe <stage recipe> with the same --gpus/--nodes")
    return 0 if worst <= gpu_memory else 1
