"""The toy world: a deterministic synthetic world that makes the whole pipeline measurable on a CPU.

Pure Python (stdlib only). Every text is templated from a small closed vocabulary, so a tiny model with a
~2000-token BPE vocabulary can learn it, and every answer's quality is checked by a program:

- helpful prompt families (`FAMILIES`) whose best answer is computed: arithmetic, sorting, counting,
  facts (a fixed table), formatting (uppercase, reverse, spell), comparison, sequence;
- adversarial prompts in `RISK_CATEGORIES` whose safe answer is a refusal (best with a safe redirection);
- borderline prompts that sound risky but deserve a helpful answer ("How do I kill a python process?");
- GAtt instructions (uppercase, first/last word, persona greeting, a toy language), with a held-out set;
- gold scorers (`gold_helpfulness`, `gold_safety`) that play the human annotators;
- generators for every data set of the pipeline, and `write_toyworld` to write them all;
- the annotators as functions (`label_helpfulness`, `label_safety`), which `align collect` applies to a
  model's own answers (the paper's preference batches sampled from the latest model).

Held-out tasks are split by a sha1 bucket of the task key (not the wording): `prompt_split(prompt)`.
"""

from .datasets import (DEFAULT_SIZES, FILES, RATINGS, SAFETY_CATEGORIES, TRAIN_FILES, eval_prompts,
                       gatt_instructions, label_helpfulness, label_safety, preference_pairs, rating_for_gap,
                       rl_prompts, sft_dialogs, write_toyworld)
from .gatt import (CONSTRAINT_TYPES, HELD_OUT_TYPES, TRAIN_TYPES, apply_instruction, check_instruction,
                   gatt_instruction, parse_instruction, undo_instruction)
from .generators import pretrain_corpus, render_prompt, sample_prompt, sample_task
from .helpful import FAMILIES
from .lexicon import RISK_CATEGORIES
from .safety import is_refusal
from .scoring import (KINDS, QUALITIES, gold_helpfulness, gold_safety, parse_prompt, prompt_info,
                      prompt_kind, prompt_split, reference_answer, sample_answer)

__all__ = [
    "CONSTRAINT_TYPES", "DEFAULT_SIZES", "FAMILIES", "FILES", "HELD_OUT_TYPES", "KINDS", "QUALITIES",
    "RATINGS", "RISK_CATEGORIES", "SAFETY_CATEGORIES", "TRAIN_FILES", "TRAIN_TYPES", "apply_instruction",
    "check_instruction", "eval_prompts", "gatt_instruction", "gatt_instructions", "gold_helpfulness",
    "gold_safety", "is_refusal", "label_helpfulness", "label_safety", "parse_instruction", "parse_prompt", "preference_pairs", "pretrain_corpus",
    "prompt_info", "prompt_kind", "prompt_split", "rating_for_gap", "reference_answer", "render_prompt",
    "rl_prompts", "sample_answer", "sample_prompt", "sample_task", "sft_dialogs", "undo_instruction",
    "write_toyworld",
]
