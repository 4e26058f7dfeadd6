"""Memory of one Llama on one GPU: parameters, ZeRO model states, activations, KV cache (pure functions).

Nothing is loaded or allocated; `alignment.plan` composes these figures into a recipe's phases.

Model states (`estimate`) follow DeepSpeed's own accounting (the estimators in
`deepspeed.runtime.zero.stage3` and `stage_1_and_2`, checked in tests/test_plan.py), with P parameters
trained in 16-bit mixed precision on N GPUs:

    ZeRO-1/2          2P (16-bit weights, replicated) + 18P / N (16-bit and fp32 gradients, fp32 master
                      weights, Adam moments: partitioned)
    ZeRO-3            18P / N (everything partitioned) + 4 x largest layer (gather buffer)
    offload_optimizer the 18P / N part lives in CPU memory (ZeRO-3 keeps its 2P / N of 16-bit weights)
    offload_param     ZeRO-3 weights in CPU memory too: the GPU holds the gather buffer only
    no DeepSpeed      weights, gradients and two Adam moments in the weights' dtype on every GPU

With LoRA only the adapters (T parameters) carry gradients and optimizer states; the frozen base keeps
its 16-bit weights (4-bit for QLoRA's linear layers), partitioned under ZeRO-3. Frozen models (PPO's
reference and reward models, rejection sampling's sampler and reward models) are full copies on every
GPU, as the stages load them. Activations and the KV cache: `activation_bytes`, `kv_cache_bytes`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

GiB = 2 ** 30


# ----------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a Llama: the numbers of its `config.json`."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_width(self) -> int:
        """Width of the key (and of the value) projection: fewer heads than queries under GQA (70B)."""
        return self.num_kv_heads * self.head_dim


# Llama-2 7B/13B/70B (the config.json files of meta-llama/Llama-2-*-hf): 70B shares 8 key/value heads
# among its 64 query heads (GQA).
LLAMA2 = {
    "llama2-7b": ModelShape("llama2-7b", 32000, 4096, 11008, 32, 32, 32),
    "llama2-13b": ModelShape("llama2-13b", 32000, 5120, 13824, 40, 40, 40),
    "llama2-70b": ModelShape("llama2-70b", 32000, 8192, 28672, 80, 64, 8),
}
_LLAMA2_NAME = re.compile(r"llama-?2-?(7|13|70)b", re.IGNORECASE)


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A shape from the fields of a Llama `config.json` (HF leaves the GQA and tying fields out when they
    take their defaults)."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
        raise ValueError(f"{name}: config.json has no {', '.join(missing)}; only Llama-style configs can be planned")
    heads = config["num_attention_heads"]
    optional = {"num_key_value_heads": heads, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    # an HF config.json leaves out (or writes null for) fields at their defaults: this is HF's file, not a recipe
    values = {k: default if k not in config or config[k] is None else config[k] for k, default in optional.items()}
    return ModelShape(name, config["vocab_size"], config["hidden_size"], config["intermediate_size"],
                      config["num_hidden_layers"], heads, values["num_key_value_heads"],
                      values["max_position_embeddings"], bool(values["tie_word_embeddings"]))


def resolve_shape(path: str, default: str | None = None) -> ModelShape:
    """The shape of the model at `path`: the `config.json` of a local directory, else a Llama-2 size named
    in the path (`meta-llama/Llama-2-70b-hf`, `runs/llama2-7b/sft/final`), so recipes can be planned before
    their checkpoints exist, else `default` (a name of LLAMA2)."""
    config = Path(path) / "config.json"
    if config.is_file():
        return shape_from_config(json.loads(config.read_text()), path)
    found = _LLAMA2_NAME.search(path)
    if found:
        return LLAMA2[f"llama2-{found.group(1)}b"]
    if default is not None:
        if default not in LLAMA2:
            raise ValueError(f"--model {default!r}: known shapes are {', '.join(LLAMA2)}")
        return LLAMA2[default]
    raise ValueError(f"cannot tell the shape of model {path!r}: give a local directory with a config.json, a path "
                     f"naming llama2-7b/13b/70b, or --model ({', '.join(LLAMA2)})")


class Head(str, Enum):
    """What sits on the transformer: the LM head, a reward model's scalar score, the critic's value head."""

    LM = "lm"  # LlamaForCausalLM: vocab x hidden, unless tied to the embeddings
    SCORE = "score"  # LlamaForSequenceClassification, one label: hidden, no bias
    VALUE = "value"  # LlamaForTokenClassification, one label: hidden + bias


def _layer_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of the linear layers of one decoder layer."""
    h, kv, i = shape.hidden_size, shape.kv_width, shape.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _head_params(shape: ModelShape, head: Head) -> int:
    if head is Head.LM:
        return 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
    return shape.hidden_size + (1 if head is Head.VALUE else 0)


def num_params(shape: ModelShape, head: Head = Head.LM) -> int:
    """Parameters of the HF model: embeddings, L x (7 linears + 2 norms), final norm, head."""
    h = shape.hidden_size
    layer = sum(a * b for a, b in _layer_linears(shape).values()) + 2 * h
    return shape.vocab_size * h + shape.num_layers * layer + h + _head_params(shape, head)


def linear_params(shape: ModelShape) -> int:
    """Parameters of the decoder layers' linear layers (what QLoRA quantizes)."""
    return shape.num_layers * sum(a * b for a, b in _layer_linears(shape).values())


def largest_layer_params(shape: ModelShape, head: Head = Head.LM) -> int:
    """Most parameters held directly by one module (DeepSpeed's `largest_layer_params`): the embedding."""
    return max(shape.vocab_size * shape.hidden_size, _head_params(shape, head),
               *(a * b for a, b in _layer_linears(shape).values()))


def lora_params(shape: ModelShape, r: int, target_modules: list[str] | tuple[str, ...], head: Head = Head.LM) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted linear per layer; a reward model also trains
    its score head (`modules_to_save`, see alignment.models.loading)."""
    linears = _layer_linears(shape)
    unknown = sorted(set(target_modules) - set(linears))
    if unknown:
        raise ValueError(f"model.lora.target_modules: {unknown} are not Llama linears ({', '.join(linears)})")
    adapters = shape.num_layers * sum(r * sum(linears[m]) for m in target_modules)
    return adapters + (_head_params(shape, head) if head is not Head.LM else 0)


# ----------------------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class ModelEstimate:
    """Bytes of one model on each GPU (and the CPU memory its offloaded states need per node)."""

    role: str
    shape: str
    params: int
    trainable: int
    weights: int  # 16-bit (or dtype) weights on the GPU
    states: int  # gradients + optimizer states on the GPU
    buffer: int  # ZeRO-3's gather buffer for the largest layer
    cpu_per_node: int  # offloaded optimizer states / weights, per node
    full_weights: int = 0  # one whole copy of the frozen weights (what a process reads while loading)

    @property
    def gpu(self) -> int:
        return self.weights + self.states + self.buffer


def estimate(model: ModelShape, num_gpus: int, zero_stage: int | None, *, nodes: int = 1, head: Head = Head.LM,
             trainable: bool = True, offload_optimizer: bool = False, offload_params: bool = False,
             lora_r: int = 0, lora_targets: tuple[str, ...] = (), load_in_4bit: bool = False,
             weight_bytes: int = 2, role: str = "policy") -> ModelEstimate:
    """Bytes per GPU of one model (see the module docstring for the formulas).

    `zero_stage` None means no DeepSpeed (every GPU holds everything, torch AdamW in the weights' dtype);
    0-3 are DeepSpeed's stages. `trainable=False` is a frozen inference copy: weights only, on every GPU, or
    with `zero_stage` 3 partitioned over the GPUs (`alignment.frozen`; in CPU memory with `offload_params`).
    `num_gpus` counts all GPUs of all `nodes`. CPU memory follows DeepSpeed's estimators (models loaded
    under zero.Init, 1.5x buffer factor).
    """
    if num_gpus < 1 or nodes < 1 or num_gpus % nodes:
        raise ValueError(f"{num_gpus} GPUs cannot be spread evenly over {nodes} node(s)")
    p = num_params(model, head)
    if load_in_4bit:  # NF4 linears: half a byte each plus one fp32 absmax per block of 64; the rest 16-bit
        weights_total = linear_params(model) // 2 + linear_params(model) // 16 + 2 * (p - linear_params(model))
    else:
        weights_total = weight_bytes * p
    t = lora_params(model, lora_r, lora_targets, head) if lora_r else p
    if not trainable:
        if zero_stage == 3:  # a frozen model partitioned over the GPUs: its share, one gathered layer at a time
            # = DeepSpeed's estimate_zero3_model_states_mem_needs with the optimizer offloaded (parameters only)
            weights, cpu = (0, weights_total // nodes) if offload_params else (weights_total // num_gpus, 0)
            return ModelEstimate(role, model.name, p, 0, weights, 0, 4 * largest_layer_params(model, head), cpu,
                                 weights_total)
        return ModelEstimate(role, model.name, p, 0, weights_total, 0, 0, 0, weights_total)
    # per trained parameter: 16-bit and fp32 gradients, fp32 master weights, Adam moments (DeepSpeed's
    # mixed precision); in fp32 there is no second copy: gradient and two moments
    mixed = weight_bytes < 4
    n, buffer, cpu = num_gpus, 0, 0
    if lora_r:
        weights_total += weight_bytes * t  # adapters live beside the base weights
    weights = weights_total
    if zero_stage is None:
        states = 3 * weight_bytes * t  # gradient + two Adam moments in the weights' dtype
    elif zero_stage in (0, 1, 2):
        n = 1 if zero_stage == 0 else n
        states = 0 if offload_optimizer else (18 if mixed else 12) * t // n
        if offload_optimizer:
            cpu = t * max(4 * num_gpus, 16) * 3 // 2  # deepspeed: estimate_zero2_model_states_mem_needs
    elif zero_stage == 3:
        buffer = 4 * largest_layer_params(model, head)
        weights = 0 if offload_params else weights_total // n
        # one floor over weights + states, as DeepSpeed's int(18 * P / N)
        states = 0 if offload_optimizer else (weights_total + (16 if mixed else 12) * t) // n - weights_total // n
        if offload_optimizer:  # deepspeed: estimate_zero3_model_states_mem_needs with zero_init
            cpu = t * (18 if offload_params else 16) * 3 // (2 * nodes)
    else:
        raise ValueError(f"ZeRO stage {zero_stage} does not exist (0, 1, 2 or 3)")
    return ModelEstimate(role, model.name, p, t, weights, states, buffer, cpu)


# ----------------------------------------------------------------------------------------- activations
def layer_activation_bytes(shape: ModelShape, rows: int, seq: int, *, act_bytes: int = 2,
                           attn: str = "sdpa") -> int:
    """Bytes one HF Llama decoder layer saves for the backward, for `rows` sequences of `seq` tokens.

    With t = rows x seq tokens, a = `act_bytes`, hidden h, intermediate i, n query heads:
        2 RMSNorms   2 x (4 + 2a) t h    each: an fp32 copy of its input, the normalised input, the output
        attention    a t (2h + 2k)       q, k, v as the kernel gets them and its output (= o_proj's input);
                                         k = h for sdpa/eager (HF repeats the key/value heads when a mask is
                                         given, as in our packed batches), the GQA width for flash_attention_2
          sdpa       4 t n + a rows seq^2     log-sum-exp, and the boolean mask converted to the query dtype
          flash      4 t n                    log-sum-exp (no mask: packed rows go by position ids)
          eager      (4 + a) rows n seq^2     softmax probabilities in fp32 and their copy (fp32: one)
        MLP          4 a t i             gate and up outputs, SiLU(gate), down_proj's input
    Terms of t x 1 (RMSNorm's rsqrt) are left out.
    """
    h, i, t, n = shape.hidden_size, shape.intermediate_size, rows * seq, shape.num_heads
    k = shape.kv_width if attn == "flash_attention_2" else h
    total = 2 * (4 + 2 * act_bytes) * t * h + act_bytes * t * (2 * h + 2 * k) + 4 * act_bytes * t * i
    if attn == "eager":
        total += (4 + (act_bytes if act_bytes < 4 else 0)) * rows * n * seq * seq
    else:
        total += 4 * t * n + (act_bytes * rows * seq * seq if attn == "sdpa" else 0)
    return total


@dataclass(frozen=True)
class Activations:
    saved: int  # what autograd keeps from the forward until the backward
    transient: int  # alive only during the backward: logit gradients, a recomputed layer, the mask input

    @property
    def total(self) -> int:
        return self.saved + self.transient


def activation_bytes(shape: ModelShape, rows: int, seq: int, *, checkpointing: bool, act_bytes: int = 2,
                     attn: str = "sdpa", head: Head = Head.LM, logit_positions: int | None = None,
                     logit_bytes: int | None = None) -> Activations:
    """Activations of one forward + backward of `rows` x `seq` tokens (a micro-batch).

    saved: without checkpointing every layer keeps `layer_activation_bytes`; with it (HF, one checkpoint
    per decoder layer) a layer keeps only its input, a t h. Once per model: the final RMSNorm,
    (4 + 2a) t h, and for an LM head the log-softmax of the positions that reach the head (`logit_positions`
    per row, all by default; PPO keeps the response only), `logit_bytes` x rows x positions x vocab
    (`logit_bytes` = a, or 4 where the stage upcasts the logits, as PPO does).
    transient: the two logit gradients of the backward's first step (2x the log-softmax), with checkpointing
    the one layer being recomputed, and the packed batch's block mask (rows x seq^2: bool for sdpa, a bytes
    for eager).
    """
    layer = layer_activation_bytes(shape, rows, seq, act_bytes=act_bytes, attn=attn)
    t, h = rows * seq, shape.hidden_size
    saved = shape.num_layers * (act_bytes * t * h if checkpointing else layer) + (4 + 2 * act_bytes) * t * h
    transient = layer if checkpointing else 0
    transient += {"sdpa": rows * seq * seq, "eager": act_bytes * rows * seq * seq}.get(attn, 0)
    if head is Head.LM:
        logits = (logit_bytes or act_bytes) * rows * (seq if logit_positions is None else logit_positions) \
            * shape.vocab_size
        saved += logits
        transient += 2 * logits
    return Activations(saved, transient)


def kv_cache_bytes(shape: ModelShape, rows: int, seq: int, *, act_bytes: int = 2) -> int:
    """HF's KV cache for `rows` sequences of `seq` tokens: keys and values of every layer,
    2 x L x rows x n_kv x seq x head_dim x a (70B's 8 key/value heads make its cache 8x smaller per head)."""
    return 2 * shape.num_layers * rows * shape.num_kv_heads * seq * shape.head_dim * act_bytes
