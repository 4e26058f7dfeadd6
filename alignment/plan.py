"""`align plan`: per-GPU memory of every model a stage holds, phase by phase, and whether the recipe fits.

A stage's phases are what sits on one GPU at the same time (`plan_stage`): e.g. PPO's generation (actor
and critic model states, the actor's gathered weights under ZeRO-3, the KV cache), scoring (the reward
models), and training (activations of actor and critic). Each model's figures come from
`alignment.memory` (`estimate`: ZeRO model states as DeepSpeed's estimators count them; activations; KV
cache). When the peak does not fit, `suggest` re-plans the recipe with one change at a time (the
strict loader checks each) and reports which changes make it fit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from alignment.config import ConfigError, apply_overrides, from_dict, load_config, read_recipe
from alignment.memory import LLAMA2, GiB, estimate
from alignment.pipeline_recipe import config_class, plan_pipeline
from alignment.stage_memory import StagePlan, make_setup, plan_sft, read_zero
from alignment.stages import STAGES

__all__ = ["estimate", "plan_stage", "suggest", "format_plan", "run_plan", "LLAMA2"]


def plan_stage(stage: str, cfg, *, gpus_per_node: int, nodes: int = 1, prompt_tokens: int = 512,
               default_model: str | None = None) -> StagePlan:
    """Per-GPU memory of every phase of `stage` run from recipe `cfg`. A stage this planner does not know
    but whose recipe has `model` and `train` sections is planned as fine-tuning."""
    planner = STAGES[stage].planner if stage in STAGES else None
    if planner is None and not (hasattr(cfg, "train") and hasattr(getattr(cfg, "model", None), "lora")):
        planned = ", ".join(s.command for s in STAGES.values() if s.planner)
        raise ValueError(f"no memory plan for stage {stage!r} (known: {planned}, and stages that "
                         "fine-tune a model.path with the shared loop)")
    setup = make_setup(cfg, gpus_per_node, nodes, prompt_tokens)
    if planner is not None:
        return planner(cfg, setup, default_model)
    plan = plan_sft(cfg, setup, default_model)
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
    "ppo": lambda cfg: [["critic.gradient_checkpointing=true"]
                        if cfg.ppo.algorithm == "ppo" and not cfg.critic.gradient_checkpointing else [],
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
              f"  CPU memory per node: {_gib(plan.cpu_per_node)} GiB (loading: a whole copy per process, a share "
              f"under ZeRO-3; offloaded states)"]
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
    matches = []
    for stage in [*STAGES, "pipeline"]:
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
    gpu_memory = parse_memory(args.gpu_memory)
    if not Path(args.recipe).is_file():
        raise ValueError(f"recipe not found: {args.recipe}")
    raw = read_recipe(args.recipe)
    stage = args.stage or detect_stage(raw, args.overrides)
    kwargs = {"gpus_per_node": args.gpus, "nodes": args.nodes or 1, "prompt_tokens": args.prompt_tokens,
              "default_model": args.model}
    if stage == "pipeline":
        return _plan_pipeline(load_config(config_class("pipeline"), args.recipe, args.overrides), gpu_memory, kwargs,
                              args.recipe, per_stage_nodes=args.nodes is None)
    cfg = load_config(config_class(stage), args.recipe, args.overrides)  # errors name the recipe line or --set
    plan = plan_stage(stage, cfg, **kwargs)
    print(format_plan(plan, gpu_memory, args.recipe))
    if plan.peak.total <= gpu_memory:
        return 0
    print(format_suggestions(plan, suggest(stage, raw, args.overrides, gpu_memory=gpu_memory, **kwargs), gpu_memory))
    return 1


def smallest_fit(stage: str, cfg, gpu_memory: int, kwargs: dict, max_nodes: int = 64) -> int | None:
    """The fewest nodes (of `kwargs['gpus_per_node']` GPUs) on which every phase of the stage fits, up to
    `max_nodes`; None when none does (a full copy per GPU that no node count shrinks)."""
    for n in range(1, max_nodes + 1):
        if plan_stage(stage, cfg, **{**kwargs, "nodes": n}).peak.total <= gpu_memory:
            return n
    return None


def _plan_pipeline(cfg, gpu_memory: int, kwargs: dict, recipe: str, per_stage_nodes: bool = False) -> int:
    """One line per stage of a pipeline recipe: its peak phase on its nodes (the recipe's `nodes`, what
    `--launcher slurm` asks for, with `per_stage_nodes`; else --nodes), whether it fits, and the fewest nodes on
    which it fits (`smallest_fit`)."""
    where = (f"{kwargs['gpus_per_node']} GPUs per node, each stage on its recipe's `nodes`" if per_stage_nodes else
             f"{kwargs['gpus_per_node'] * kwargs['nodes']} GPUs ({kwargs['nodes']} node(s) x {kwargs['gpus_per_node']})")
    print(f"align plan: pipeline {cfg.output.dir} on {where}, {_gib(gpu_memory)} GiB each")
    print(f"  {'stage':<22}{'command':<20}{'nodes':>5}  {'peak phase':<12}{'GiB/GPU':>8}  {'verdict':<14}{'fits from':>10}")
    worst = 0
    for item in plan_pipeline(cfg, recipe=recipe):
        spec = item["spec"]
        stage_cfg = load_config(config_class(spec.stage), spec.recipe, item["overrides"])
        nodes = spec.nodes if per_stage_nodes else kwargs["nodes"]
        plan = plan_stage(spec.stage, stage_cfg, **{**kwargs, "nodes": nodes})
        worst = max(worst, plan.peak.total)
        verdict = "fits" if plan.peak.total <= gpu_memory else "DOES NOT FIT"
        least = smallest_fit(spec.stage, stage_cfg, gpu_memory, kwargs)
        fits_from = "none <= 64" if least is None else f"{least} node{'s' if least > 1 else ''}"
        print(f"  {spec.name:<22}{spec.stage:<20}{nodes:>5}  {plan.peak.name:<12}{_gib(plan.peak.total):>8}  "
              f"{verdict:<14}{fits_from:>10}")
    print("  fits from: the fewest nodes of this size on which the stage fits (set a stage's `nodes` in the recipe;"
          " align pipeline --sbatch / --launcher hostfile launch them)")
    print("  details and what to change: align plan --recipe <stage recipe> with the same --gpus/--nodes")
    return 0 if worst <= gpu_memory else 1
