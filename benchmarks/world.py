"""The benchmark world: toy-world data, a tokenizer trained on it, and freshly initialised tiny Llamas.

Everything is built here from a seed (no download) and cached under the bench directory, so ours and
TRL's trainers read the very same files. A policy of each size is a `LlamaForCausalLM`; its reward model
is the same transformer with a new scalar head (`AutoModelForSequenceClassification`, one label), as
`alignment.models.loading.load_reward_model` builds an RM from an SFT checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

# Enough rows for every benchmark's steps; small, so writing the world takes seconds.
DATA_SIZES = {"pretrain": 2000, "sft_train": 800, "sft_eval": 10, "pref_helpful_train": 800,
              "pref_helpful_test": 10, "pref_safety_train": 10, "pref_safety_test": 10, "rl_prompts": 400,
              "eval_helpful": 10, "eval_adversarial": 10, "eval_borderline": 10, "gatt_instructions": 10,
              "gatt_heldout_instructions": 10}
VOCAB_SIZE = 2048
SMOLLM2_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "smollm2"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class World:
    """Paths of the benchmark world under `root` (built on demand by `prepare`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def policy(self, size: str) -> Path:
        return self.root / f"policy-{size}"

    def reward_model(self, size: str) -> Path:
        return self.root / f"rm-{size}"

    @property
    def smollm2_policy(self) -> Path:
        return self.root / "policy-smollm2"

    @property
    def smollm2_reward_model(self) -> Path:
        return self.root / "rm-smollm2"

    def stage_policy(self, stage: str, size: str) -> Path:
        """The policy a benchmark stage trains: SmolLM2 for the `-smollm2` stages, else the tiny `size`."""
        return self.smollm2_policy if stage.endswith("-smollm2") else self.policy(size)

    def stage_reward_model(self, stage: str, size: str) -> Path:
        return self.smollm2_reward_model if stage.endswith("-smollm2") else self.reward_model(size)

    def sft_dialogs(self) -> list[dict]:
        return read_jsonl(self.data / "sft_train.jsonl")

    def preference_pairs(self) -> list[dict]:
        return read_jsonl(self.data / "pref_helpful_train.jsonl")

    def rl_prompts(self) -> list[dict]:
        return read_jsonl(self.data / "rl_prompts.jsonl")

    def prepare(self, sizes: list[str], seed: int = 0) -> "World":
        """Write whatever is missing: data, tokenizer, and a policy and RM of every size."""
        from alignment.data.toyworld import write_toyworld
        from alignment.models.tokenizer import load_tokenizer, train_tokenizer

        if not (self.data / "manifest.json").is_file():
            write_toyworld(str(self.data), seed=seed, sizes=DATA_SIZES)
        if not (self.tokenizer / "tokenizer.json").is_file():
            texts = [r["text"] for r in read_jsonl(self.data / "pretrain.jsonl")]
            train_tokenizer(texts, VOCAB_SIZE, self.tokenizer)
        tokenizer = load_tokenizer(self.tokenizer)
        for size in sizes:
            self._build_models(tokenizer, size, seed)
        return self

    def prepare_smollm2(self, seed: int = 0) -> "World":
        """A SmolLM2-135M policy and RM: SmolLM2's config and tokenizer (tests/fixtures/smollm2, ChatML as the
        chat format), weights initialised from `seed` (throughput does not depend on the weights)."""
        import torch
        from transformers import AutoConfig, LlamaForCausalLM

        from alignment.models.tokenizer import load_tokenizer, save_tokenizer
        from alignment.runs import commit_dir

        policy = self.smollm2_policy
        if not (policy / "config.json").is_file():
            tokenizer = load_tokenizer(SMOLLM2_FIXTURE, template="model")
            torch.manual_seed(seed)
            tmp = policy.with_name(f".tmp-{policy.name}")
            LlamaForCausalLM(AutoConfig.from_pretrained(SMOLLM2_FIXTURE)).save_pretrained(tmp)
            save_tokenizer(tokenizer, tmp)
            commit_dir(tmp, policy)
        self._build_reward_model(policy, self.smollm2_reward_model, seed)
        return self

    def _build_models(self, tokenizer, size: str, seed: int) -> None:
        from alignment.models.tiny import build_tiny_llama
        from alignment.runs import commit_dir

        policy, rm = self.policy(size), self.reward_model(size)
        if not (policy / "config.json").is_file():
            tmp = policy.with_name(f".tmp-{policy.name}")
            build_tiny_llama(tokenizer, size, seed=seed).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            commit_dir(tmp, policy)
        self._build_reward_model(policy, rm, seed)

    def _build_reward_model(self, policy: Path, rm: Path, seed: int) -> None:
        """The policy's transformer with a new scalar head (no LM head), and the policy's tokenizer."""
        import torch
        from transformers import AutoModelForSequenceClassification

        from alignment.models.tokenizer import load_tokenizer, save_tokenizer
        from alignment.runs import commit_dir

        if not (rm / "config.json").is_file():
            tokenizer = load_tokenizer(policy)
            torch.manual_seed(seed + 1)  # the scalar head's initialisation
            model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, local_files_only=True)
            model.config.pad_token_id = tokenizer.pad_token_id
            tmp = rm.with_name(f".tmp-{rm.name}")
            model.save_pretrained(tmp)
            save_tokenizer(tokenizer, tmp)
            commit_dir(tmp, rm)
