"""The memory planner: model states against DeepSpeed's own estimators, parameter counts against HF models,
activations against tensors measured on a tiny Llama and a hand computation, the KV cache against HF's
cache, and `align plan` on the Llama-2 recipes."""
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from alignment.memory import (LLAMA2, GiB, Head, ModelShape, activation_bytes, estimate, kv_cache_bytes,
                              largest_layer_params, lora_params, num_params)

REPO = Path(__file__).resolve().parents[1]
SIZES = sorted(LLAMA2)


# ----------------------------------------------------------------------------------------- shapes
def _hf_config(shape: ModelShape, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       tie_word_embeddings=shape.tie_word_embeddings, **extra)


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_match_hf_models_built_on_the_meta_device(size):
    """Total and largest-layer parameters (DeepSpeed's `model_to_params` loop) of the three heads."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaForTokenClassification

    shape = LLAMA2[size]
    for cls, head in ((LlamaForCausalLM, Head.LM), (LlamaForSequenceClassification, Head.SCORE),
                      (LlamaForTokenClassification, Head.VALUE)):
        with torch.device("meta"):
            model = cls(_hf_config(shape, num_labels=1))
        assert num_params(shape, head) == sum(p.numel() for p in model.parameters()), (size, head)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        assert largest_layer_params(shape, head) == largest, (size, head)
    assert round(num_params(shape) / 1e9, 1) == {"llama2-7b": 6.7, "llama2-13b": 13.0, "llama2-70b": 69.0}[size]


# ----------------------------------------------------------------------------------------- DeepSpeed's estimators
def _deepspeed_table(fn, *args, **kwargs) -> dict:
    """Rows printed by a DeepSpeed `*_all_cold` estimator: {options: (cpu GiB, gpu GiB)}."""
    out = io.StringIO()
    with redirect_stdout(out):
        fn(*args, **kwargs)
    rows = {}
    for line in out.getvalue().splitlines():
        found = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if found:
            pairs = (o.strip().split("=") for o in found.group(3).split(","))  # values print as enums
            options = tuple(f"{k}={'none' if v == 'none' else 'cpu' if 'cpu' in v else v}" for k, v in pairs)
            rows[options] = (float(found.group(1)), float(found.group(2)))
    return rows


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gpus, nodes", [(8, 1), (32, 4), (1, 1)])
def test_zero3_model_states_agree_with_deepspeed(size, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)

    shape = LLAMA2[size]
    total, largest = num_params(shape), largest_layer_params(shape)
    table = _deepspeed_table(estimate_zero3_model_states_mem_needs_all_cold, total, largest,
                             num_gpus_per_node=gpus // nodes, num_nodes=nodes)
    for off_param, off_opt in ((True, True), (False, True), (False, False)):
        ours = estimate(shape, gpus, 3, nodes=nodes, offload_optimizer=off_opt, offload_params=off_param)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus // nodes, nodes, cpu_offload=off_opt,
                                                            cpu_offload_params=off_param, zero_init=True)
        assert ours.gpu == gpu
        if off_opt:
            assert ours.cpu_per_node == cpu
        key = (f"offload_param={'cpu' if off_param else 'none'}", f"offload_optimizer={'cpu' if off_opt else 'none'}",
               "zero_init=1")
        printed_cpu, printed_gpu = table[key]
        assert ours.gpu / GiB == pytest.approx(printed_gpu, abs=0.006)
        if off_opt:
            assert ours.cpu_per_node / GiB == pytest.approx(printed_cpu, abs=0.006)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gpus, nodes", [(8, 1), (32, 4), (1, 1)])
def test_zero2_model_states_agree_with_deepspeed(size, gpus, nodes):
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)

    shape = LLAMA2[size]
    total = num_params(shape)
    table = _deepspeed_table(estimate_zero2_model_states_mem_needs_all_cold, total, num_gpus_per_node=gpus // nodes,
                             num_nodes=nodes)
    for off_opt in (True, False):
        ours = estimate(shape, gpus, 2, nodes=nodes, offload_optimizer=off_opt)
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus // nodes, nodes, cpu_offload=off_opt)
        assert ours.gpu == gpu
        if off_opt:
            assert ours.cpu_per_node == cpu
        printed_cpu, printed_gpu = table[(f"offload_optimizer={'cpu' if off_opt else 'none'}",)]
        assert ours.gpu / GiB == pytest.approx(printed_gpu, abs=0.006)


def test_lora_qlora_and_frozen_copies_by_hand():
    shape = LLAMA2["llama2-7b"]
    p = 6_738_415_616
    assert num_params(shape) == p
    # r = 16 on q, k, v, o: 32 layers x 4 modules x 16 x (4096 + 4096)
    t = 32 * 4 * 16 * 8192
    assert lora_params(shape, 16, ("q_proj", "k_proj", "v_proj", "o_proj")) == t
    lora3 = estimate(shape, 8, 3, lora_r=16, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert (lora3.weights, lora3.states, lora3.buffer) == ((2 * p + 2 * t) // 8,
                                                           (2 * p + 2 * t + 16 * t) // 8 - (2 * p + 2 * t) // 8,
                                                           4 * 32000 * 4096)
    lora2 = estimate(shape, 8, 2, lora_r=16, lora_targets=("q_proj",))
    t_q = 32 * 16 * 8192
    assert (lora2.weights, lora2.states) == (2 * p + 2 * t_q, 18 * t_q // 8)
    # a reward model's LoRA also trains its score head (hidden, no bias)
    assert lora_params(shape, 8, ("v_proj",), Head.SCORE) == 32 * 8 * 8192 + 4096
    # QLoRA: the 224 linears in 4 bits (+ an fp32 absmax per 64), embeddings, norms and LM head in bf16
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    qlora = estimate(shape, 1, None, lora_r=16, lora_targets=("q_proj",), load_in_4bit=True)
    assert qlora.weights == linears // 2 + linears // 16 + 2 * (p - linears) + 2 * t_q
    big = LLAMA2["llama2-70b"]
    frozen = estimate(big, 8, None, trainable=False, role="reference")  # a full copy on every GPU
    assert (frozen.gpu, frozen.states, frozen.trainable) == (2 * num_params(big), 0, 0)
    shard = estimate(big, 8, 3, trainable=False, role="reference")  # partitioned: an eighth + one gathered layer
    assert (shard.weights, shard.buffer, shard.states) == (2 * num_params(big) // 8, 4 * 32000 * 8192, 0)
    plain = estimate(shape, 8, None, weight_bytes=4)  # no DeepSpeed, fp32: weights + grad + 2 Adam moments
    assert plain.gpu == 16 * p
    with pytest.raises(ValueError, match="not Llama linears"):
        lora_params(shape, 8, ("qkv",))
    with pytest.raises(ValueError, match="evenly"):
        estimate(shape, 10, 3, nodes=4)


# ----------------------------------------------------------------------------------------- activations, KV cache
def test_activations_of_7b_by_hand():
    """Llama-2-7B, one packed row of 4096 tokens, bf16, sdpa, written out term by term."""
    h, i, L, n, V, s = 4096, 11008, 32, 32, 32000, 4096
    norms = 2 * (4 + 2 * 2) * s * h  # fp32 input copy + normalised + output, twice
    attention = 2 * s * (2 * h + 2 * h) + 4 * s * n + 2 * s * s  # q k v out, log-sum-exp, the mask in bf16
    mlp = 4 * 2 * s * i
    layer = norms + attention + mlp
    final_norm = 8 * s * h
    logits = 2 * s * V
    full = activation_bytes(LLAMA2["llama2-7b"], 1, s, checkpointing=False)
    assert full.saved == L * layer + final_norm + logits
    assert full.transient == s * s + 2 * logits  # the bool mask input, two logit gradients
    ckpt = activation_bytes(LLAMA2["llama2-7b"], 1, s, checkpointing=True)
    assert ckpt.saved == L * 2 * s * h + final_norm + logits
    assert ckpt.transient == layer + s * s + 2 * logits
    assert 2.5 * GiB < ckpt.total < 2.7 * GiB and 24 * GiB < full.total < 25 * GiB
    # PPO keeps fp32 logits of the response only; flash attention keeps the GQA width and no mask
    ppo = activation_bytes(LLAMA2["llama2-70b"], 2, 1536, checkpointing=True, attn="flash_attention_2",
                           logit_positions=1025, logit_bytes=4)
    h70, kv70 = 8192, 8 * 128
    layer70 = 2 * 8 * 3072 * h70 + 2 * 3072 * (2 * h70 + 2 * kv70) + 4 * 3072 * 64 + 8 * 3072 * 28672
    assert ppo.saved == 80 * 2 * 3072 * h70 + 8 * 3072 * h70 + 4 * 2 * 1025 * V
    assert ppo.transient == layer70 + 2 * 4 * 2 * 1025 * V


def _saved_tensor_bytes(model, kwargs) -> int:
    """Bytes of the distinct storages autograd saves in one forward (weights excluded): the measurement."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(**kwargs).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), kwargs["input_ids"].reshape(-1))
    return sum(b for ptr, b in seen.items() if ptr not in params)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_match_tensors_saved_by_a_tiny_llama(attn, checkpointing):
    """A bf16 GQA Llama on a packed batch (two dialogs per row, block mask) as the SFT step feeds it."""
    from transformers import LlamaForCausalLM

    from alignment.batching import attention_inputs

    shape = ModelShape("tiny", 500, 128, 344, 2, 8, 2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_hf_config(shape, attn_implementation=attn)).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows, seq = 3, 200
    segments = torch.cat([torch.ones(seq // 2), torch.full((seq - seq // 2,), 2)]).long().repeat(rows, 1)
    positions = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)]).repeat(rows, 1)
    batch = {"input_ids": torch.randint(0, 500, (rows, seq)), "position_ids": positions, "segment_ids": segments}
    measured = _saved_tensor_bytes(model, attention_inputs(batch, attn, torch.bfloat16))
    planned = activation_bytes(shape, rows, seq, checkpointing=checkpointing, act_bytes=2, attn=attn).saved
    assert planned == pytest.approx(measured, rel=0.02)  # left out: t x 1 terms (RMSNorm's rsqrt), cos/sin


def test_kv_cache_matches_hf_cache_and_hand_computation():
    from transformers import LlamaForCausalLM

    shape = ModelShape("tiny", 300, 64, 128, 3, 4, 2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_hf_config(shape)).to(torch.bfloat16).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 300, (5, 37)), use_cache=True).past_key_values
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv_cache_bytes(shape, 5, 37) == measured
    # 70B: 80 layers x 8 key/value heads x 128 dims, bf16: 320 KiB per token
    assert kv_cache_bytes(LLAMA2["llama2-70b"], 1, 1) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_cache_bytes(LLAMA2["llama2-7b"], 1, 1) == 2 * 32 * 32 * 128 * 2


# ----------------------------------------------------------------------------------------- recipes
def _plan(recipe: str, stage: str, gpus=8, nodes=1, *overrides):
    from alignment.config import load_config
    from alignment.pipeline_recipe import config_class
    from alignment.plan import plan_stage

    cfg = load_config(config_class(stage), REPO / recipe, list(overrides))
    return plan_stage(stage, cfg, gpus_per_node=gpus, nodes=nodes)


def test_stage_plans_hold_the_models_each_stage_loads():
    ppo = _plan("recipes/llama2-7b/ppo.yaml", "ppo")
    assert [m.role for m in ppo.models] == ["actor", "critic", "reference", "helpful RM", "safety RM"]
    assert [p.name for p in ppo.phases] == ["generate", "score", "reference", "train"]
    generate = dict(ppo.phases[0].items)
    assert generate["actor llama2-7b: weights gathered for generation"] == 2 * num_params(LLAMA2["llama2-7b"])
    assert generate["actor KV cache: 32 x 1536 tokens"] == kv_cache_bytes(LLAMA2["llama2-7b"], 32, 512 + 1024)
    assert not any("frozen" in label for label, _ in ppo.phases[-1].items)  # reward.offload: RMs wait on the CPU
    resident = _plan("recipes/llama2-7b/ppo.yaml", "ppo", 8, 1, "reward.offload=false")
    assert sum("frozen" in label for label, _ in resident.phases[-1].items) == 3
    lora = _plan("recipes/llama2-7b/ppo.yaml", "ppo", 8, 1, "model.lora.enabled=true")
    assert "reference" not in [m.role for m in lora.models]  # adapters off = the reference
    rs = _plan("recipes/llama2-7b/rejection_sampling.yaml", "rejection-sampling")
    assert [(m.role, m.shape) for m in rs.models] == [("sampler", "llama2-70b"), ("helpful RM", "llama2-70b"),
                                                      ("safety RM", "llama2-70b"), ("policy", "llama2-7b")]
    rm = _plan("recipes/llama2-7b/rm_helpful.yaml", "rm")
    assert rm.models[0].params == num_params(LLAMA2["llama2-7b"], Head.SCORE)
    assert "4 x 4096 tokens" in rm.phases[0].items[1][0]  # 2 pairs per micro-batch: chosen + rejected rows
    probe = _plan("recipes/llama2-7b/rm_helpful.yaml", "rm", 8, 1, "probe.enabled=true", "model.lora.enabled=false")
    assert [p.name for p in probe.phases] == ["features"] and not probe.models[0].trainable
    weights = 2 * num_params(LLAMA2["llama2-7b"], Head.SCORE)  # a bf16 full copy: no gradients, no Adam states
    assert probe.models[0].gpu == weights and dict(probe.phases[0].items)[
        "reward model (frozen, probe) llama2-7b: weights"] == weights
    assert probe.peak.total <= 80 * GiB  # a full copy on one GPU: more than ZeRO-3 training holds per GPU, still fits
    zero2 = _plan("recipes/llama2-7b/sft.yaml", "sft", 8, 1, "distributed.deepspeed=recipes/deepspeed/zero2.json")
    assert dict(zero2.phases[0].items)["ZeRO-2 communication buckets"] == 2 * (5e8 + 5e8) * 4.5


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_critic_free_plans_hold_no_critic_and_k_answers_per_prompt(algorithm):
    ppo = _plan("recipes/llama2-7b/ppo.yaml", "ppo")
    plan = _plan(f"recipes/llama2-7b/{algorithm}.yaml", "ppo")
    assert [m.role for m in plan.models] == ["actor", "reference", "helpful RM", "safety RM"]
    assert not any("critic" in label for p in plan.phases for label, _ in p.items)
    # 128 prompts x 4 answers on 8 GPUs: 64 rows per process, 32 at a time (rollout.batch_size) as PPO's 512 x 1
    assert "actor KV cache: 32 x 1536 tokens" in dict(plan.phases[0].items)
    critic = next(m for m in ppo.models if m.role == "critic")
    assert critic.gpu > 0 and plan.peak.total < ppo.peak.total  # the critic's model states and activations


def test_llama2_sft_and_rm_fit_where_the_readme_says():
    gpu = 80 * GiB
    for size, nodes in (("7b", 1), ("13b", 1), ("70b", 4)):
        assert _plan(f"recipes/llama2-{size}/sft.yaml", "sft", 8, nodes).peak.total <= gpu
        assert _plan(f"recipes/llama2-{size}/rm_helpful.yaml", "rm", 8, nodes).peak.total <= gpu
    assert _plan("recipes/llama2-70b/sft.yaml", "sft", 8, 1).peak.total > gpu  # 18 bytes x 69B / 8 GPUs
    assert _plan("recipes/llama2-7b/ppo.yaml", "ppo").peak.total <= gpu


def _align(*argv) -> tuple[int, str]:
    from alignment.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_align_plan_prints_the_plan_and_says_whether_it_fits(capsys):
    code, text = _align("plan", "--recipe", str(REPO / "recipes/llama2-7b/sft.yaml"), "--gpus", "8")
    assert code == 0, text
    assert "(sft) on 8 GPUs" in text and "DeepSpeed ZeRO-3" in text and ": fits" in text
    assert re.search(r"policy llama2-7b\s+6\.74B\s+6\.74B", text)
    # 13B PPO on one node: too big; the planner finds a change that fits, checked by the strict loader
    code, text = _align("plan", "--recipe", str(REPO / "recipes/llama2-13b/ppo.yaml"), "--gpus", "8")
    assert code == 1 and "DOES NOT FIT" in text
    suggestion = re.search(r"--set (\S+)\s+->\s+([\d.]+) GiB \(fits\)", text)
    assert suggestion, text
    fixed = _plan("recipes/llama2-13b/ppo.yaml", "ppo", 8, 1, suggestion.group(1))
    assert fixed.peak.total <= 80 * GiB and f"{fixed.peak.total / GiB:.1f}" == suggestion.group(2)
    # 70B PPO: as full copies the frozen models cannot fit one GPU whatever the ZeRO setting; partitioned
    # (the recipe's reward.zero3, rollout.gather layer) every phase fits on 6 nodes, not on 5
    code, text = _align("plan", "--recipe", str(REPO / "recipes/llama2-70b/ppo.yaml"), "--gpus", "8", "--nodes", "4",
                        "--set", "reward.zero3=false")
    assert code == 1 and "alone exceed(s) one GPU" in text
    assert _align("plan", "--recipe", str(REPO / "recipes/llama2-70b/ppo.yaml"), "--gpus", "8", "--nodes", "6")[0] == 0
    assert _align("plan", "--recipe", str(REPO / "recipes/llama2-70b/ppo.yaml"), "--gpus", "8", "--nodes", "5")[0] == 1
    code, text = _align("plan", "--recipe", str(REPO / "recipes/llama2-7b/pipeline.yaml"), "--gpus", "8")
    assert [line.split()[0] for line in text.splitlines()[2:8]] == ["sft", "rm_helpful", "rm_safety",
                                                                     "rejection_sampling", "ppo", "gatt"]
    assert _align("plan", "--recipe", str(REPO / "recipes/llama2-7b/sft.yaml"), "--gpus", "8",
                  "--gpu-memory", "lots")[0] == 2
    assert "--gpu-memory 'lots'" in capsys.readouterr().err
    assert _align("plan", "--recipe", str(REPO / "recipes/tiny/pretrain.yaml"), "--gpus", "1")[0] == 2
    assert "no memory plan for stage 'pretrain'" in capsys.readouterr().err


def test_shapes_come_from_config_json_or_the_path(tmp_path):
    from alignment.memory import resolve_shape

    (tmp_path / "config.json").write_text('{"vocab_size": 2048, "hidden_size": 192, "intermediate_size": 512, '
                                          '"num_hidden_layers": 4, "num_attention_heads": 6, '
                                          '"num_key_value_heads": 2, "tie_word_embeddings": true}')
    tiny = resolve_shape(str(tmp_path))
    assert (tiny.num_kv_heads, tiny.tie_word_embeddings, num_params(tiny, Head.LM)) == (2, True, num_params(
        ModelShape("t", 2048, 192, 512, 4, 6, 2, tie_word_embeddings=True)))
    assert resolve_shape("meta-llama/Llama-2-70b-chat-hf") == LLAMA2["llama2-70b"]
    assert resolve_shape("runs/llama2-13b/sft/final") == LLAMA2["llama2-13b"]
    assert resolve_shape("my/model", "llama2-7b") == LLAMA2["llama2-7b"]
    with pytest.raises(ValueError, match="cannot tell the shape"):
        resolve_shape("my/model")
    (tmp_path / "config.json").write_text('{"vocab_size": 2048, "d_model": 192}')
    with pytest.raises(ValueError, match="no hidden_size, intermediate_size, num_hidden_layers, num_attention_heads"):
        resolve_shape(str(tmp_path))


def test_readme_plan_outputs_are_what_align_plan_prints(monkeypatch):
    """The outputs pasted in README "Running the Llama-2 recipes" stay current."""
    import shlex

    monkeypatch.chdir(REPO)
    blocks = re.findall(r"^```\w*\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)
    pasted = [chunk for block in blocks for chunk in re.split(r"\n(?=\$ )", block) if chunk.startswith("$ align plan")]
    assert len(pasted) == 4
    for chunk in pasted:
        command, _, expected = chunk.partition("\n")
        code, text = _align(*shlex.split(command)[2:])
        assert text.rstrip("\n") == expected.rstrip("\n"), command
