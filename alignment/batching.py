"""Deterministic batch plans: packing, length grouping, and the data position a resumed run restarts from.

A plan is a pure function of (examples, seed, epoch): every process computes the same plan, takes its own
micro-batches, and knows the global number of trained tokens of each optimizer step without any
communication (that number normalises the loss so batch x accumulation x processes is one big batch).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from alignment.chat import IGNORE_INDEX



def truncation_counts(lengths: list[int], max_length: int) -> dict:
    """How many of the rows (encoded `lengths`) are longer than `max_length`, i.e. cut before training."""
    return {"rows": len(lengths), "truncated": sum(n > max_length for n in lengths), "max_length": max_length}


def format_truncation(what: str, counts: dict, side: str = "left") -> str:
    """The one line a stage prints when rows are cut: `side` is the end the tokens are removed from."""
    return (f"[data] {what}: {counts['truncated']} of {counts['rows']} rows longer than "
            f"max_length={counts['max_length']}, truncated from the {side}")

def pack(lengths: list[int], order: list[int], max_length: int) -> list[list[int]]:
    """Greedy first-fit of examples (visited in `order`) into rows of at most `max_length` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def pack_balanced(lengths: list[int], order: list[int], max_length: int, min_rows: int = 1) -> list[list[int]]:
    """A fixed set of examples in the fewest rows of at most `max_length` tokens (at least `min_rows`, e.g.
    one per process), filled evenly: longest first, each onto the least filled row. The rows of a
    micro-batch are padded to the longest, so even rows leave almost no padding where `pack`'s first fit
    would leave a short last row."""
    by_length = sorted(order, key=lambda i: -lengths[i])
    count = max(min(min_rows, len(by_length)), len(pack(lengths, by_length, max_length)))
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        load = [0] * count
        for i in by_length:
            r = min(range(count), key=load.__getitem__)
            if load[r] + lengths[i] > max_length:
                break
            rows[r].append(i)
            load[r] += lengths[i]
        else:
            return rows
        count += 1  # the least filled row had no room: one more row


def group_by_length(lengths: list[int], order: list[int], group_size: int, rng: random.Random,
                    window: int = 64) -> list[list[int]]:
    """Groups of `group_size` examples of similar lengths (little padding): sort within windows of the
    shuffled order, cut into groups, shuffle the groups. A group is one optimizer step's examples, so the
    same examples share a step whatever the micro-batch / accumulation split."""
    groups = []
    span = group_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        groups += [chunk[j:j + group_size] for j in range(0, len(chunk), group_size)]
    rng.shuffle(groups)
    return groups


@dataclass
class StepPlan:
    """Micro-batches (lists of rows; a row is a list of example indices) for every optimizer step."""

    steps: list[list[list[list[int]]]]  # step -> micro-batch -> row -> example indices
    items: list[int]  # trained items (label tokens, or pairs) of each step, over all processes

    def micro_batches(self, step: int, rank: int, world: int) -> list[list[list[int]]]:
        return self.steps[step][rank::world]


def build_plan(lengths: list[int], items_per_example: list[int], *, seed: int, epochs: float,
               micro_batch_size: int, grad_accum: int, world: int, packing: bool, max_length: int,
               max_steps: int | None = None) -> StepPlan:
    """Plan every optimizer step of a run: shuffle per epoch, pack or length-group, cut into steps.

    A step is `grad_accum * world` micro-batches; a trailing incomplete step of an epoch is dropped (and
    its examples come first in no later epoch: each epoch reshuffles everything).
    """
    if any(n > max_length for n in lengths):
        raise ValueError("examples longer than max_length must be truncated before planning")
    per_step = grad_accum * world
    steps, items = [], []
    for epoch in range(math.ceil(epochs)):
        rng = random.Random(seed * 100_003 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if epoch + 1 > epochs:  # a fractional last epoch
            order = order[:int(len(order) * (epochs - epoch))]
        if packing:
            rows = pack(lengths, order, max_length)
            micro = [[row] for row in rows] if micro_batch_size == 1 else [
                rows[j:j + micro_batch_size] for j in range(0, len(rows), micro_batch_size)]
        else:
            groups = group_by_length(lengths, order, micro_batch_size * per_step, rng)
            micro = [[[i] for i in g[j:j + micro_batch_size]] for g in groups
                     if len(g) == micro_batch_size * per_step for j in range(0, len(g), micro_batch_size)]
        usable = len(micro) - len(micro) % per_step
        for s in range(0, usable, per_step):
            step = micro[s:s + per_step]
            steps.append(step)
            items.append(sum(items_per_example[i] for mb in step for row in mb for i in row))
    if max_steps is not None:
        steps, items = steps[:max_steps], items[:max_steps]
    if not steps:
        raise ValueError(f"no full optimizer step: {len(lengths)} examples are too few for micro_batch_size="
                         f"{micro_batch_size} x grad_accum={grad_accum} x {world} processes")
    return StepPlan(steps, items)


def iteration_prompts(num_prompts: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """Prompt indices of an iteration: consecutive slices of a seeded permutation per pass over the set, so
    the data position is a function of the iteration number (what a resumed run restarts from)."""
    out, start = [], iteration * batch_size
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_prompts)
        order = list(range(num_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


def collate(examples: list[dict], rows: list[list[int]], pad_id: int, keys=("input_ids", "labels")) -> dict:
    """Tensors for a micro-batch: rows of concatenated examples, right-padded to the longest row.

    Returns input_ids/labels [B, T], position_ids [B, T] restarting at 0 for every example, segment_ids
    [B, T] (0 for padding, k for the k-th example of the row) from which `attention_inputs` builds the
    block-diagonal causal mask. Every example starts with BOS whose label is IGNORE_INDEX, so no token
    is ever trained to predict the next example's first token.
    """
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    out = {k: torch.full((len(rows), width), pad_id if k == "input_ids" else IGNORE_INDEX, dtype=torch.long)
           for k in keys}
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row, start=1):
            n = len(examples[i]["input_ids"])
            for key in keys:
                out[key][b, t:t + n] = torch.tensor(examples[i][key])
            position_ids[b, t:t + n] = torch.arange(n)
            segment_ids[b, t:t + n] = k
            t += n
    return {**out, "position_ids": position_ids, "segment_ids": segment_ids}


def attention_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype = torch.float32) -> dict:
    """Model kwargs so that no token attends across examples of a packed row, nor to padding.

    flash_attention_2 reads example boundaries from position_ids (varlen kernels, no mask); sdpa/eager get
    a 4-D block-diagonal causal mask [B, 1, T, T] (sdpa: boolean, True = may attend; eager: additive in
    `dtype`, since eager attention adds the mask to the scores).
    """
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if attn_implementation == "flash_attention_2":
        return kwargs
    seg = batch["segment_ids"]
    width = seg.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    mask = same & causal
    mask |= torch.eye(width, dtype=torch.bool, device=seg.device)  # padding rows attend to themselves (no NaN)
    mask = mask[:, None]
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill(~mask, torch.finfo(dtype).min)
    kwargs["attention_mask"] = mask
    return kwargs
