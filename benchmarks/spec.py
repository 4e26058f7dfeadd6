"""What one benchmark run measures: model size, data per step, steps, lengths and the shared optimizer.

Ours and TRL's trainers get the same numbers from one `BenchSpec`: the same examples in the same order,
the same examples per optimizer step, the same number of optimizer steps, the same maximum lengths and
the same AdamW (lr, betas, eps, weight decay, clipping, constant schedule, fp32, no gradient
checkpointing).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    steps: int  # optimizer steps (RL: iterations); the first one is warm-up and is not timed
    batch: int  # examples (SFT: dialogs, RM: pairs, RL: sampled answers) per optimizer step
    max_length: int = 256  # tokens per example (SFT, RM) or per prompt (RL)


@dataclass(frozen=True)
class RLSpec(StageSpec):
    new_tokens: int = 32  # max new tokens per answer
    micro_batch: int = 8  # rows per forward/backward of the update
    # answers per prompt of TRL's trainers and of our rloo / grpo (K; at least two); our PPO answers batch prompts once
    generations: int = 2
    kl_beta: float = 0.05


@dataclass(frozen=True)
class BenchSpec:
    size: str = "bench"  # alignment.models.tiny.SIZES
    seed: int = 0
    threads: int = 1  # torch threads per measurement process (1: robust to other load on a shared machine)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    # TRL's own default is True; False (as ours) compares the same memory-saving choices on both sides
    trl_gradient_checkpointing: bool = False
    sft: StageSpec = field(default_factory=lambda: StageSpec(steps=6, batch=16))
    rm: StageSpec = field(default_factory=lambda: StageSpec(steps=6, batch=16))
    # offline DPO (benchmarks.dpo): pairs per step of the policy (chosen + rejected), the reference precomputed
    dpo: StageSpec = field(default_factory=lambda: StageSpec(steps=6, batch=16))
    rl: RLSpec = field(default_factory=lambda: RLSpec(steps=3, batch=16))
    # the same SFT and RM steps on SmolLM2-135M (`benchmarks.world`): a 49k vocabulary, ChatML
    sft_smollm2: StageSpec = field(default_factory=lambda: StageSpec(steps=3, batch=8, max_length=128))
    rm_smollm2: StageSpec = field(default_factory=lambda: StageSpec(steps=3, batch=8, max_length=128))

    def stage(self, name: str) -> StageSpec:
        """The spec of a stage by its name in `benchmarks.run` ("sft", "rm", "dpo", "rl", "sft-smollm2", "rm-smollm2");
        the RL rows "rloo" and "grpo" share "rl"'s (the same answers, tokens and steps as our PPO's row)."""
        return self.rl if name in ("rloo", "grpo") else getattr(self, name.replace("-", "_"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchSpec":
        data = dict(data)
        data["betas"] = tuple(data["betas"])
        for name in ("sft", "rm", "dpo", "sft_smollm2", "rm_smollm2"):
            if name in data:  # a spec written before a stage existed takes its default
                data[name] = StageSpec(**data[name])
        data["rl"] = RLSpec(**data["rl"])
        return cls(**data)


def step_groups(num_examples: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of each optimizer step: consecutive slices of one seeded permutation."""
    if batch * steps > num_examples:
        raise ValueError(f"{steps} steps x {batch} examples need {batch * steps} examples; the world has {num_examples}")
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    return [order[s * batch:(s + 1) * batch] for s in range(steps)]
