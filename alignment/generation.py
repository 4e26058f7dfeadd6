"""Batched sampling with the KV cache: left padding, prompts sorted by length, K samples per prompt.

This is the generation every stage uses (SFT/RLHF evaluation, rejection sampling, PPO rollouts, GAtt);
vLLM can replace it where installed on a GPU (imported lazily by the stages that offer it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    sample_index: int
    token_ids: list[int]  # generated tokens, without the prompt, up to and excluding EOS
    text: str
    finished: bool  # ended with EOS (not cut by max_new_tokens)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32, seed: int | None = None,
             progress: bool = False) -> list[list[Sample]]:
    """`num_samples` answers for each prompt (token ids from `alignment.chat.encode_prompt`).

    temperature 0 is greedy. Prompts are sorted by length so a batch holds similar lengths (little
    padding) and the K samples of a prompt are generated side by side in one batch where they fit.
    Results come back in the prompts' order. With `seed`, sampling is reproducible on one device.
    """
    from tqdm.auto import tqdm

    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    jobs = [(i, k) for i in order for k in range(num_samples)]
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    do_sample = temperature > 0
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = jobs[start:start + batch_size]
        width = max(len(prompts[i]) for i, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, (i, _) in enumerate(chunk):
            p = prompts[i]
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad,
                      eos_token_id=tokenizer.eos_token_id, use_cache=True)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = out[:, width:].tolist()
        for b, (i, k) in enumerate(chunk):
            toks = new[b]
            finished = tokenizer.eos_token_id in toks
            if finished:
                toks = toks[:toks.index(tokenizer.eos_token_id)]
            toks = [t for t in toks if t != pad]
            results[i][k] = Sample(i, k, toks, tokenizer.decode(toks, skip_special_tokens=True).strip(), finished)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]
