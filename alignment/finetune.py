"""The fine-tune step every SFT-like stage shares (sft, pretrain, rejection sampling, GAtt, safety
distillation): dialogs encoded in the recipe's chat format, packed padding-free into rows with a
block-diagonal mask, and trained by the shared loop with `alignment.losses.sft_loss` normalised by the
trained tokens of the whole optimizer step.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from transformers import LlamaForCausalLM

from alignment.batching import attention_inputs, build_plan, collate, format_truncation, truncation_counts
from alignment.chat import IGNORE_INDEX, encode, truncate_example
from alignment.config import EvalSection, FineTuneSections, ModelSection, OutputSection, SFTConfig, SFTData
from alignment.distributed import is_main_process, world_size
from alignment.frozen import weight_share
from alignment.losses import chunked_sft_loss, sft_loss
from alignment.models.loading import load_causal_lm
from alignment.models.tokenizer import load_tokenizer, toy_tokenizer_warning
from alignment.runs import RunDir
from alignment.training import LoopConfig, train, zero3_init


def encode_dialogs(tokenizer, dialogs: list[dict], max_length: int, train_on: str = "all") -> tuple[list[dict], int]:
    """Encoded examples and the number dropped because truncation left no trained answer token."""
    examples, counts = encode_and_count_dialogs(tokenizer, dialogs, max_length, train_on)
    return examples, counts["dropped"]


def encode_and_count_dialogs(tokenizer, dialogs: list[dict], max_length: int,
                             train_on: str = "all") -> tuple[list[dict], dict]:
    """Encoded examples and counts: `truncated` dialogs longer than `max_length` (their end is cut,
    `alignment.chat.truncate_example`) of `rows`, and `dropped`, those left without a trained answer token."""
    examples, lengths, dropped = [], [], 0
    for row in dialogs:
        full = encode(tokenizer, row["messages"], train_on=train_on)
        lengths.append(len(full["input_ids"]))
        ex = truncate_example(full, max_length)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    return examples, {**truncation_counts(lengths, max_length), "dropped": dropped}


def lm_step_fn(examples: list[dict], pad_id: int, attn_implementation: str, answer_only_loss: bool = False):
    """The SFT micro-step: forward a packed micro-batch, summed answer NLL / the step's share of tokens.

    answer_only_loss (`train.answer_only_loss`) on a Llama whose LM head is a plain linear layer
    (`answer_only_head`): the head computes the loss itself from the hidden states of the answer positions
    (`chunked_sft_loss`); otherwise from the full logits. Both give the same loss up to float rounding, which
    is not bitwise: the toy recipes keep the full logits, so their figures stay as recorded."""

    def step(model, rows, scale):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(examples, rows, pad_id).items()}
        dtype = next(model.parameters()).dtype
        inputs = attention_inputs(batch, attn_implementation, dtype)
        head = answer_only_head(model) if answer_only_loss else None
        if head is None:
            loss, metrics = sft_loss(model(**inputs).logits, batch["labels"], num_items=scale)
        else:
            with head_computes_loss(head, batch["labels"], scale) as result:
                model(**inputs)
            loss, metrics = result["loss"], result["metrics"]
        return loss, {"loss_sum": loss.detach() * scale, "tokens": metrics["num_tokens"]}

    return step


def answer_only_head(model) -> torch.nn.Linear | None:
    """The LM head of `model` (through DDP, DeepSpeed and peft wrappers) where `chunked_sft_loss` may replace
    it: a Llama (its forward applies nothing after the head) whose head is a plain bias-free linear layer
    (not a LoRA layer) that ZeRO-3 does not partition (its gathered weight is released after the forward,
    and the chunks are recomputed in backward). None elsewhere: the full logits are computed."""
    inner = model
    while hasattr(inner, "module"):  # DDP, DeepSpeedEngine
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    if not isinstance(inner, LlamaForCausalLM):
        return None
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id"):
        return None
    return head


@contextlib.contextmanager
def head_computes_loss(head: torch.nn.Linear, labels: torch.Tensor, num_items):
    """Within the block, a forward of the model makes `head` return `chunked_sft_loss` of its input hidden
    states (and put the loss and metrics in the yielded dict) instead of the logits. The model is still
    called as a whole, so its wrappers' hooks (DDP, DeepSpeed) run as usual."""
    result: dict = {}

    def forward(hidden):
        result["loss"], result["metrics"] = chunked_sft_loss(hidden, head.weight, labels, num_items)
        return result["loss"]

    head.forward = forward
    try:
        yield result
    finally:
        del head.forward


def make_plan(cfg, examples: list[dict], world: int):
    lengths = [len(e["input_ids"]) for e in examples]
    items = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples]
    return build_plan(lengths, items, seed=cfg.seed, epochs=cfg.train.epochs,
                      micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum, world=world,
                      packing=cfg.train.packing, max_length=cfg.train.max_length, max_steps=cfg.train.max_steps)


def sft_config_for(cfg: FineTuneSections, data: SFTData, *, eval: EvalSection | None = None,
                   model: ModelSection | None = None, output: OutputSection | None = None) -> SFTConfig:
    """The SFT config a stage fine-tunes with: `data` (and, where given, another eval, model or output), and
    every other section (optim, schedule, train, distributed, logging, seed, chat) taken from the stage's `cfg`
    as it is, so a fine-tune inside rejection sampling, GAtt or safety distillation trains as its recipe says."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FineTuneSections)}
    return SFTConfig(**shared, data=data, chat=cfg.chat, model=model or cfg.model, output=output or cfg.output,
                     eval=eval if eval is not None else EvalSection())


def loop_config(cfg) -> LoopConfig:
    return LoopConfig(optim=cfg.optim, schedule=cfg.schedule, train=cfg.train, distributed=cfg.distributed,
                      logging=cfg.logging, output=cfg.output, seed=cfg.seed)


def fine_tune(cfg, dialogs: list[dict], run: RunDir, inputs: dict[str, str], desc: str = "sft") -> dict:
    """Fine-tune `cfg.model` on SFT dialogs into `run` (the machinery every SFT-like stage shares)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.chat.template)
    warning = toy_tokenizer_warning(tokenizer, [m["content"] for row in dialogs[:500] for m in row["messages"]])
    if warning and is_main_process():
        print(f"[{desc}] {warning}")
    examples, counts = encode_and_count_dialogs(tokenizer, dialogs, cfg.train.max_length, cfg.data.train_on)
    dropped = counts["dropped"]
    if not examples:
        raise ValueError(f"[{desc}] no training example left after truncation to {cfg.train.max_length} tokens")
    world = world_size()
    plan = make_plan(cfg, examples, world)
    run.prepare(inputs, is_main=is_main_process())
    if counts["truncated"] and is_main_process():
        print(format_truncation(f"{desc} dialogs", counts, side="right"))
    if dropped and is_main_process():
        print(f"[{desc}] dropped {dropped} of {len(dialogs)} dialogs: no answer token left within "
              f"train.max_length={cfg.train.max_length}")
    torch.manual_seed(cfg.seed)  # LoRA adapters new to the checkpoint start the same in every run
    with zero3_init(cfg.distributed, cfg.train, cfg.optim, cfg.model.lora.enabled) as partitioned:
        model = load_causal_lm(cfg.model)
    if partitioned and is_main_process():
        print(f"[{desc}] loaded partitioned with ZeRO-3 (deepspeed.zero.Init): {weight_share(model):.0%} of the "
              "weights on this process")
    step = lm_step_fn(examples, tokenizer.pad_token_id, cfg.model.attn_implementation, cfg.train.answer_only_loss)
    summary = train(model=model, tokenizer=tokenizer, plan=plan, step_fn=step, cfg=loop_config(cfg), run=run,
                    desc=desc, unit="tok", merge_lora=cfg.model.lora.merge_on_save)
    summary.update(examples=len(examples), dropped=dropped, truncation=counts)
    return summary
