#!/usr/bin/env bash
# GPU smoke test: every stage of the tiny pipeline (toy world data, pretrain, SFT, both reward models,
# rejection sampling, PPO, GAtt) on CUDA, one process per GPU (torchrun), bf16, DeepSpeed ZeRO from
# recipes/deepspeed/, with short runs. Then, where vLLM is installed, the SFT checkpoint answers the
# held-out prompts with vLLM and with our HF generation (alignment.generation) for a tokens/s comparison.
# Figures (seconds, peak GPU memory sampled by nvidia-smi, throughput, final losses, align plan's peak
# for the same recipe) go to benchmarks/gpu_smoke.json; run directories to runs/gpu_smoke/.
#
#   make gpu-smoke                        # or: scripts/gpu_smoke.sh
#   ZERO=zero2 NPROC=2 scripts/gpu_smoke.sh
#   scripts/gpu_smoke.sh --cpu-rehearsal  # the same steps on CPU (2 gloo processes, fp32) to check the
#                                         # script itself; writes runs/gpu_smoke/rehearsal.json, no figures
# Exits non-zero when no CUDA device is visible, or when any step fails (the JSON says which).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ZERO=${ZERO:-zero3}
OUT=${OUT:-runs/gpu_smoke}
REHEARSAL=0
[ "${1:-}" = "--cpu-rehearsal" ] && REHEARSAL=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ "$REHEARSAL" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: ERROR: no CUDA device is visible (torch.cuda.is_available() is False in $PY)." >&2
    echo "gpu_smoke: run this on a GPU machine with the CUDA build of torch (make install there), or use" >&2
    echo "gpu_smoke: --cpu-rehearsal to check the script's steps on CPU." >&2
    exit 3
  fi
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  # a power of two up to 8: the tiny PPO recipe's mini-batch of 16 rows splits evenly over the processes
  NPROC=${NPROC:-$(for n in 8 4 2 1; do [ "$GPUS" -ge $n ] && echo $n && break; done)}
  PRECISION=bf16; DTYPE=bfloat16; RESULT=benchmarks/gpu_smoke.json
else
  NPROC=${NPROC:-2}; PRECISION="'no'"; DTYPE=float32; RESULT=$OUT/rehearsal.json  # quoted: YAML reads no as false
fi
DS=recipes/deepspeed/$ZERO.json
[ -f "$DS" ] || { echo "gpu_smoke: ERROR: $DS not found (ZERO=zero2, zero3 or zero3_offload)" >&2; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT" "$(dirname "$RESULT")"
DATA=$OUT/data
STEPS=$OUT/steps.jsonl
COMMON=(--set "distributed.deepspeed=$DS" --set "distributed.mixed_precision=$PRECISION"
        --set logging.progress=false --set logging.tensorboard=false)
echo "gpu_smoke: $NPROC process(es), $ZERO, precision $PRECISION, into $OUT"

# [NP=n] run NAME STAGE RECIPE [--set ...]: one stage under torchrun with NP (default NPROC) processes;
# appends its seconds, exit code and peak GPU memory (MiB, max over GPUs, nvidia-smi every 0.5 s) to
# $STEPS. A failed stage is recorded, not fatal.
run() {
  local name=$1 stage=$2 recipe=$3; shift 3
  local log=$OUT/$name.log mem=$OUT/$name.mem sampler="" start end code=0
  if [ "$REHEARSAL" = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem" &
    sampler=$!
  fi
  start=$(date +%s%N)
  "$PY" -m torch.distributed.run --nproc_per_node="${NP:-$NPROC}" --master_addr=127.0.0.1 --master_port=$((29600 + RANDOM % 300)) \
    -m alignment.cli "$stage" --recipe "$recipe" --set "output.dir=$OUT/$name" "${COMMON[@]}" "$@" > "$log" 2>&1 || code=$?
  end=$(date +%s%N)
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null || true
  local peak=null
  [ -s "$mem" ] && peak=$(sort -n "$mem" | tail -1)
  printf '{"name": "%s", "stage": "%s", "recipe": "%s", "processes": %d, "exit": %d, "seconds": %s, "peak_gpu_mib": %s}\n' \
    "$name" "$stage" "$recipe" "${NP:-$NPROC}" "$code" "$(awk "BEGIN {print ($end - $start) / 1e9}")" "$peak" >> "$STEPS"
  if [ "$code" = 0 ]; then echo "gpu_smoke: $name done"; else echo "gpu_smoke: $name FAILED (exit $code), see $log" >&2; tail -20 "$log" >&2; fi
}

"$PY" -m alignment.cli data toyworld --out "$DATA" > "$OUT/data.log"
# pretrain trains its tokenizer and plans its steps for one process (alignment/stages/pretrain.py)
NP=1 run base pretrain recipes/tiny/pretrain.yaml --set "data.corpus=[{path: $DATA/pretrain.jsonl, limit: 4000}]" \
  --set train.max_steps=30
run sft sft recipes/tiny/sft.yaml --set "model.path=$OUT/base/final" --set "model.dtype=$DTYPE" \
  --set "data.train=[{path: $DATA/sft_train.jsonl}]" --set "data.eval=[{path: $DATA/sft_eval.jsonl, limit: 200}]" \
  --set "eval.prompts=[{path: $DATA/eval_helpful.jsonl, limit: 64}]" --set train.max_steps=40
for kind in helpful safety; do
  other=$([ $kind = helpful ] && echo safety || echo helpful)
  run rm_$kind rm recipes/tiny/rm_$kind.yaml --set "model.path=$OUT/sft/final" --set "model.dtype=$DTYPE" \
    --set "data.primary=[{path: $DATA/pref_${kind}_train.jsonl, limit: 512}]" \
    --set "data.secondary=[{path: $DATA/pref_${other}_train.jsonl}]" \
    --set "data.test={helpful: [{path: $DATA/pref_helpful_test.jsonl, limit: 128}], safety: [{path: $DATA/pref_safety_test.jsonl, limit: 128}]}" \
    --set train.max_steps=20
done
run rejection_sampling rejection-sampling recipes/tiny/rejection_sampling.yaml --set "model.path=$OUT/sft/final" \
  --set "model.dtype=$DTYPE" --set "data.prompts=[{path: $DATA/rl_prompts.jsonl, limit: 128}]" \
  --set "data.eval=[{path: $DATA/sft_eval.jsonl, limit: 100}]" --set "iterations=[{num_samples: 4}]" \
  --set best_of_all_from=null --set "reward.helpful_rm=$OUT/rm_helpful/final" --set "reward.safety_rm=$OUT/rm_safety/final" \
  --set "eval.prompts=[]" --set train.max_steps=10
run ppo ppo recipes/tiny/ppo.yaml --set "model.path=$OUT/rejection_sampling/iterations/v1/final" \
  --set "model.dtype=$DTYPE" --set "critic.dtype=$DTYPE" --set "reward.dtype=$DTYPE" \
  --set "reward.helpful_rm=$OUT/rm_helpful/final" --set "reward.safety_rm=$OUT/rm_safety/final" \
  --set "data.prompts=[{path: $DATA/rl_prompts.jsonl}]" --set "data.eval_prompts=[{path: $DATA/eval_helpful.jsonl, limit: 32}]" \
  --set ppo.iterations=2 --set ppo.micro_batch_size=1 --set early_stopping.every_iterations=2
run gatt gatt recipes/tiny/gatt.yaml --set "model.path=$OUT/ppo/final" --set "model.dtype=$DTYPE" \
  --set "data.instructions=[{path: $DATA/gatt_instructions.jsonl}]" --set "data.prompts=[{path: $DATA/rl_prompts.jsonl}]" \
  --set sampling.num_dialogs=32 --set "eval.instructions=[{path: $DATA/gatt_instructions.jsonl}]" \
  --set "eval.zero_shot_instructions=[{path: $DATA/gatt_heldout_instructions.jsonl}]" \
  --set "eval.prompts=[{path: $DATA/eval_helpful.jsonl}]" --set eval.max_instructions=8 --set "eval.turns=[1, 2, 4]" \
  --set train.max_steps=10

# Assemble the figures: the steps, each run's throughput and last loss, align plan's peak for the same
# recipe and overrides on this GPU, and vLLM vs HF generation where vLLM is installed.
"$PY" - "$OUT" "$STEPS" "$RESULT" "$NPROC" "$ZERO" "$REHEARSAL" <<'EOF'
import json, platform, subprocess, sys, time
from pathlib import Path

out, steps_path, result_path, nproc, zero, rehearsal = sys.argv[1:]
rehearsal = rehearsal == "1"
steps = [json.loads(line) for line in Path(steps_path).read_text().splitlines()]
import torch

for step in steps:
    run = Path(out) / step["name"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
    done = json.loads((run / "done.json").read_text()) if (run / "done.json").is_file() else {}
    last = next((m for m in reversed(metrics) if "loss" in m or "policy_loss" in m), {})
    step["final"] = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    step["done"] = (run / "done.json").is_file()
    step["throughput"] = {k: v for k, v in done.items() if isinstance(v, (int, float)) and k.endswith("_per_s")}

figures = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "rehearsal_on_cpu": rehearsal, "processes": int(nproc),
           "zero": zero, "torch": torch.__version__, "python": platform.python_version(), "steps": steps}
if torch.cuda.is_available():
    figures["gpu"] = torch.cuda.get_device_name(0)
    figures["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
try:
    import deepspeed
    figures["deepspeed"] = deepspeed.__version__
except ImportError:
    pass

try:
    import vllm  # noqa: F401  (optional engine)
    have_vllm = not rehearsal
except ImportError:
    have_vllm = False
figures["vllm"] = {"installed": have_vllm}
if have_vllm and (Path(out) / "sft" / "final").is_dir():
    code = r'''
import json, sys, time, torch
from vllm import LLM, SamplingParams
from alignment.chat import encode_prompt
from alignment.data.io import load_records
from alignment.data.schemas import prompt_context
from alignment.generation import generate
from alignment.models.tokenizer import load_tokenizer
from transformers import AutoModelForCausalLM
model_dir, data = sys.argv[1], sys.argv[2]
tok = load_tokenizer(model_dir)
prompts = [encode_prompt(tok, prompt_context(r)) for r in load_records(f"{data}/eval_helpful.jsonl", "rl_prompt")[:512]]
llm = LLM(model=model_dir, dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=True)
params = SamplingParams(temperature=0.0, max_tokens=64)
t0 = time.perf_counter()
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
v_s = time.perf_counter() - t0
v_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
t0 = time.perf_counter()
samples = generate(hf, tok, prompts, max_new_tokens=64, temperature=0.0, batch_size=128)
h_s = time.perf_counter() - t0
h_tokens = sum(len(s[0].token_ids) for s in samples)
same = sum(list(o.outputs[0].token_ids)[:len(s[0].token_ids)] == s[0].token_ids for o, s in zip(outs, samples))
print(json.dumps({"prompts": len(prompts), "vllm_tokens_per_s": v_tokens / v_s, "hf_tokens_per_s": h_tokens / h_s,
                  "greedy_answers_identical": same}))
'''
    proc = subprocess.run([sys.executable, "-c", code, str(Path(out) / "sft" / "final"), str(Path(out) / "data")],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        figures["vllm"].update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        figures["vllm"].update(error=proc.stderr[-2000:])

for step in steps:  # what align plan says for the run's resolved config on this GPU
    resolved = Path(out) / step["name"] / "config.json"
    if not resolved.is_file():
        continue
    recipe = Path(out) / step["name"] / "plan_recipe.json"
    recipe.write_text(json.dumps(json.loads(resolved.read_text())["config"]))
    memory = [f"--gpu-memory={figures['gpu_memory_gib']}GiB"] if "gpu_memory_gib" in figures else []
    plan = subprocess.run([sys.executable, "-m", "alignment.cli", "plan", "--recipe", str(recipe), "--stage",
                           step["stage"], "--gpus", nproc, *memory], capture_output=True, text=True)
    peak = [line for line in plan.stdout.splitlines() if line.strip().startswith("peak:")]
    step["align_plan_peak"] = peak[0].strip() if peak else (plan.stderr.strip().splitlines() or ["?"])[-1]

Path(result_path).write_text(json.dumps(figures, indent=2) + "\n")
failed = [s["name"] for s in steps if s["exit"] != 0] + (["vllm"] if "error" in figures["vllm"] else [])
print(f"gpu_smoke: figures in {result_path}")
if failed:
    print(f"gpu_smoke: FAILED steps: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)
EOF
