"""Batched sampling with the KV cache: left padding, prompts sorted by length, K samples per prompt.

This is the generation every stage uses (SFT/RLHF evaluation, rejection sampling, PPO rollouts, GAtt);
vLLM can replace it where installed on a GPU (imported lazily by the stages that offer it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignment.chat import stop_token_id


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
             progress: bool = False, synced: bool = False, min_batches: int = 0) -> list[list[Sample]]:
    """`num_samples` answers for each prompt (token ids from `alignment.chat.encode_prompt`).

    temperature 0 is greedy. Prompts are sorted by length so a batch holds similar lengths (little
    padding) and the K samples of a prompt are generated side by side in one batch where they fit.
    Results come back in the prompts' order. With `seed`, sampling is reproducible on one device.
    `synced`: every rank runs the same decoding steps until all ranks are done (HF's `synced_gpus`), for a
    ZeRO-3 model whose forwards are collectives; every rank must then make the same number of batches.
    Unset, HF decides (on under a ZeRO-3 context with several processes). `min_batches`: at least this many
    generate calls, the extra ones a throwaway one-token prompt (so processes with fewer prompts keep step).
    """
    from tqdm.auto import tqdm

    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, stop = tokenizer.pad_token_id, stop_token_id(tokenizer)
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
                      eos_token_id=stop, use_cache=True, synced_gpus=True if synced else None)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = out[:, width:].tolist()
        for b, (i, k) in enumerate(chunk):
            toks = new[b]
            finished = stop in toks
            if finished:
                toks = toks[:toks.index(stop)]
            toks = [t for t in toks if t != pad]
            results[i][k] = Sample(i, k, toks, tokenizer.decode(toks, skip_special_tokens=True).strip(), finished)
    for _ in range(min_batches - math.ceil(len(jobs) / batch_size)):
        one = torch.full((1, 1), stop, dtype=torch.long, device=device)
        model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=pad, eos_token_id=stop, use_cache=True,
                       synced_gpus=True if synced else None)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- vLLM backend
BACKENDS = ("auto", "hf", "vllm")


def vllm_usable() -> bool:
    """vLLM is installed and a CUDA device is present (checked without importing vLLM)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def pick_backend(requested: str, world_size: int = 1) -> str:
    """"hf" or "vllm" for a sampling phase. "auto" takes vLLM when it is usable in a one-process run (with
    several processes each would start its own engine on a GPU ZeRO already holds: use "hf" there)."""
    if requested not in BACKENDS:
        raise ValueError(f"generation.backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "hf":
        return "hf"
    usable = vllm_usable()
    if requested == "vllm":
        if not usable:
            raise ValueError("generation.backend=vllm needs the vllm package and a CUDA device; use auto or hf")
        if world_size > 1:
            raise ValueError(f"generation.backend=vllm runs in one process; this run has {world_size} (use hf)")
        return "vllm"
    return "vllm" if usable and world_size == 1 else "hf"


class VLLMSampler:
    """A vLLM engine over a checkpoint directory, answering `generate`'s calls with the same `Sample`s.

    Prompts go in as token ids (our `alignment.chat` encoding, never vLLM's chat template) and answers are decoded
    with our tokenizer, so shards written from either backend read the same."""

    def __init__(self, path: str, dtype: str = "auto", gpu_memory_utilization: float = 0.5, max_model_len: int | None = None):
        from vllm import LLM  # imported here: vLLM is optional

        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, enable_prefix_caching=True)

    def generate(self, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, **_) -> list[list[Sample]]:
        from vllm import SamplingParams

        params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, seed=seed, stop_token_ids=[stop_token_id(tokenizer)],
                                skip_special_tokens=True)
        stop = stop_token_id(tokenizer)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results = []
        for i, out in enumerate(outputs):
            per_prompt = []
            for k, completion in enumerate(out.outputs):
                toks = [t for t in completion.token_ids if t != stop]
                per_prompt.append(Sample(i, k, toks, tokenizer.decode(toks, skip_special_tokens=True).strip(),
                                         completion.finish_reason == "stop"))
            results.append(per_prompt)
        return results


def generate_with(sampler, tokenizer, prompts: list[list[int]], **kwargs) -> list[list[Sample]]:
    """`generate` on an HF model, or the same call answered by a `VLLMSampler`."""
    if isinstance(sampler, VLLMSampler):
        return sampler.generate(tokenizer, prompts, **kwargs)
    return generate(sampler, tokenizer, prompts, **kwargs)
