"""`align <stage> --recipe FILE [--set a.b=value ...]`: one entry point for every stage of the pipeline."""
from __future__ import annotations

import argparse
import sys

STAGES = {
    # name: (config class: a name in alignment.config or "module:Class", "module:function", help)
    "pretrain": ("PretrainConfig", "alignment.stages.pretrain:run_pretrain",
                 "train the tiny base model (tokenizer + LlamaForCausalLM) on the toy corpus"),
    "sft": ("SFTConfig", "alignment.stages.sft:run_sft",
            "stage 1: supervised fine-tuning in the Llama-2 chat format"),
    "rm": ("RMConfig", "alignment.stages.reward_model:run_rm",
           "stage 2: a helpfulness or safety reward model (ranking loss with a margin), or a margin ablation"),
    "rejection-sampling": ("RejectionSamplingConfig", "alignment.stages.rejection_sampling:run_rejection_sampling",
                           "stage 3: rejection sampling RLHF-V1..Vn (K samples, best by RM, fine-tune on the best)"),
    "ppo": ("PPOConfig", "alignment.stages.ppo:run_ppo",
            "stage 3: PPO on the combined safety/helpfulness reward with a KL penalty, early stopping"),
    "gatt": ("GAttConfig", "alignment.stages.gatt:run_gatt",
             "Ghost Attention: multi-turn dialogs sampled with the instruction on every turn, fine-tuned with it "
             "as first-turn system prompt"),
    "pipeline": ("alignment.pipeline:PipelineConfig", "alignment.pipeline:run_pipeline",
                 "the whole recipe as one resumable run (stages, lineage manifest, report)"),
}


def config_class(stage: str) -> type:
    """The config dataclass of a stage command."""
    import alignment.config as config

    name = STAGES[stage][0]
    return _import(name) if ":" in name else getattr(config, name)


def _import(target: str):
    import importlib

    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="The Llama 2-Chat alignment pipeline, stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set optim.lr=1e-5 (repeatable)")
    data = sub.add_parser("data", help="make and inspect data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="<data-command>")
    toy = data_sub.add_parser("toyworld", help="write the toy world's data files (schema-valid JSONL)")
    toy.add_argument("--out", required=True, help="output directory")
    toy.add_argument("--seed", type=int, default=0)
    check = data_sub.add_parser("validate", help="check a data file against a schema (file:row: field: reason)")
    check.add_argument("path")
    check.add_argument("--schema", required=True,
                       choices=["sft_dialog", "preference_pair", "rl_prompt", "gatt_instruction", "text_document"])
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignment.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            return _data(args)
        _, target, _ = STAGES[args.command]
        from alignment.config import load_config

        cfg = load_config(config_class(args.command), args.recipe, args.overrides)
        _import(target)(cfg)
        return 0
    except (ConfigError, ValueError, FileNotFoundError) as e:
        from alignment.data.schemas import DataValidationError

        kind = "data error" if isinstance(e, DataValidationError) else "error"
        print(f"align {args.command}: {kind}: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, RuntimeError) as e:  # numeric guards (NaN/inf, KL), run directory, disk space
        from alignment.runs import RunDirError

        if not isinstance(e, (FloatingPointError, RunDirError)):
            raise
        print(f"align {args.command}: stopped: {e}", file=sys.stderr)
        return 3


def _data(args) -> int:
    if args.data_command == "toyworld":
        from alignment.data.toyworld import write_toyworld

        paths = write_toyworld(args.out, seed=args.seed)
        for name, path in paths.items():
            print(f"{name:28s} {path}")
        return 0
    if args.data_command == "validate":
        from alignment.data.io import load_records

        rows = load_records(args.path, args.schema)
        print(f"{args.path}: {len(rows)} rows pass {args.schema}")
        return 0
    raise AssertionError(args.data_command)


if __name__ == "__main__":
    sys.exit(main())
