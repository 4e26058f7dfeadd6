"""Run directories: resolved config, git commit, input hashes, metrics, and atomic checkpoints.

Layout of a run directory:

    config.json        the resolved config (every default filled in) and its hash
    run.json           git commit, command line, input data hashes, library versions
    metrics.jsonl      one JSON object per logged step
    tb/                TensorBoard logs
    checkpoints/step-000100/   training state (model, optimizer, scheduler, RNG, data position)
    final/             the HF-native model (`save_pretrained`) and tokenizer
    done.json          written last: the stage finished; its config hash says with which config

A run directory that holds a finished run with another config is never overwritten unless asked; a run
that holds checkpoints with the same config resumes from the newest intact one.

Every directory made visible by `commit_dir` (checkpoints, `final/`) carries `MANIFEST.json`: the size and
SHA-256 of each of its files, written before the directory is renamed into place. The model card
(`README.md`, `alignment.model_card`) is written into `final/` when the run is done (it reports the run's
evaluation) and is not in the manifest. Resume checks the
newest checkpoint against it and, when a file is missing, short or changed (a torn write on a filesystem
that reorders, a bad disk, a hand edit), says so and falls back to the previous intact checkpoint.
A finished run whose `final/` (or any other committed output) no longer matches is not finished: it is
named and re-run, resuming from its newest intact checkpoint (`damaged_outputs`). A model directory a stage
reads is checked against its manifest before use (`verify_model_dir`).

`output.overwrite=true` over a run of another config moves the old run aside, whole, to the hidden sibling
`.<name>.replaced` (one rename) and deletes it only once the new run has committed something (its first
checkpoint, `final/`, or done.json). A failure before that puts the old run back byte for byte; a kill
leaves it there, and the next command on the directory puts it back (`settle_replaced`).

A full disk while writing (ENOSPC) stops the run in one line naming the directory, what was being written,
what it needs and what is free (`DiskSpaceError`); the temp directory of the write is removed, so nothing
half-written is visible.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alignment.chat import hf_chat_template, stop_token_id, write_template
from alignment.config import config_hash, to_dict
from alignment.data.io import file_sha256, write_jsonl
from alignment.faults import fault_point
from alignment.model_card import CARD_FILE, write_model_card
from alignment.stages import STAGES

CKPT_PREFIX = "step-"
# tokenizer_config.json keys that describe how this machine loaded the tokenizer, not the tokenizer
MACHINE_LOCAL_KEYS = ("local_files_only", "is_local", "name_or_path", "_commit_hash", "cache_dir")
COMPLETE_MARK = "COMPLETE"
MANIFEST = "MANIFEST.json"
REPLACED_SUFFIX = ".replaced"
MIB = 1024 ** 2
GIB = 1024 ** 3
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (another config finished there, ...)."""


class DiskSpaceError(RunDirError):
    """The output disk cannot hold what the run will write: before any work starts, or when a write hits a
    full disk (ENOSPC)."""


def _on_main_process() -> bool:
    # alignment.distributed.is_main_process, read here without importing torch (the pipeline imports runs)
    return os.environ.get("RANK", "0") == "0"


def format_size(n: float) -> str:
    """Bytes in the unit that fits (MiB under a GiB, KiB under a MiB): a small model never reads "0.00 GiB"."""
    if n < 1024:
        return f"{int(n)} bytes"
    if n < MIB:
        return f"{n / 1024:.1f} KiB"
    return f"{n / MIB:.1f} MiB" if n < GIB else f"{n / GIB:.2f} GiB"


def _free_bytes(path: Path) -> int:
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _tree_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, as an OSError or as the text of a writer's own error (safetensors: "os error 28", torch:
    "No space left on device")."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in DISK_FULL
    text = str(error)
    return any(mark in text for mark in ("No space left on device", "StorageFull", "os error 28",
                                         "Disk quota exceeded"))


@contextmanager
def disk_full_guard(where: Path, what: str, need: int | None, temp: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC/EDQUOT) while writing `temp` (a temp file or directory that becomes `what` in
    `where`) into a one-line DiskSpaceError, after removing `temp`: nothing half-written stays. `need`: the
    size of the whole write when known; else what was written before the disk filled is the floor."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        written = _tree_bytes(temp) if temp.exists() else 0
        shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink(missing_ok=True)
        need_text = format_size(need) if need is not None else f"more than {format_size(written)}"
        raise DiskSpaceError(f"no space left on {where} while writing {what}: needs {need_text}, "
                             f"{format_size(_free_bytes(where))} free") from None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    with disk_full_guard(path.parent, path.name, len(text.encode()), tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fault_point("io.json_written")
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _tree_files(path: Path) -> list[str]:
    """Relative paths of every file under `path` except the manifest and the completion mark."""
    out = []
    for root, _, files in os.walk(path):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel not in (MANIFEST, COMPLETE_MARK, CARD_FILE):
                out.append(rel)
    return sorted(out)


def write_manifest(path: Path, extra: dict | None = None) -> dict:
    """MANIFEST.json: size and SHA-256 of every file of the directory (read back from disk), and `extra`
    (e.g. the source a converted model came from)."""
    files = {rel: {"size": os.path.getsize(path / rel), "sha256": file_sha256(path / rel)}
             for rel in _tree_files(path)}
    manifest = {"format": 1, **(extra or {}), "files": files}
    write_json_atomic(path / MANIFEST, manifest)
    return manifest


def verify_dir(path: Path) -> list[str]:
    """What is wrong with a committed directory against its manifest ([] when intact; sizes first, so a
    short file is named without hashing everything)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"{MANIFEST} is missing"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"]
    problems = []
    for rel, want in files.items():
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{rel}: {file.stat().st_size} bytes, the manifest says {want['size']}")
    for rel in sorted(set(_tree_files(path)) - set(files)):
        problems.append(f"{rel}: not in the manifest")
    if problems:
        return problems
    for rel, want in files.items():
        got = file_sha256(path / rel)
        if got != want["sha256"]:
            problems.append(f"{rel}: SHA-256 {got[:12]}... differs from the manifest's {want['sha256'][:12]}...")
    return problems


def add_json_to_committed(path: Path, name: str, obj: Any) -> None:
    """Write `obj` as `name` into a committed directory (one with a manifest) and record that file's size and
    hash in the manifest, leaving every other entry as it was (nothing else is re-hashed)."""
    path = Path(path)
    write_json_atomic(path / name, obj)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][name] = {"size": os.path.getsize(path / name), "sha256": file_sha256(path / name)}
    write_json_atomic(path / MANIFEST, manifest)


def commit_dir(tmp: Path, final: Path, extra: dict | None = None) -> None:
    """Make a fully written directory visible under its final name: manifest, mark complete, fsync, rename."""
    fault_point("commit.files_written")
    with disk_full_guard(final.parent, final.name, None, tmp):
        write_manifest(tmp, extra)
        (tmp / COMPLETE_MARK).write_text(str(time.time()))
        _fsync_tree(tmp)
    fault_point("commit.synced")
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        fault_point("commit.swapping")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    fault_point("commit.renamed")


def save_pretrained_atomic(path: Path, model=None, tokenizer=None, state_dict: dict | None = None,
                           chat_template: bool = True) -> None:
    """An HF checkpoint (`model.save_pretrained`, safetensors, with `state_dict` when given, e.g. gathered
    from ZeRO-3 shards) and/or a tokenizer with its chat template choice (`alignment.chat.write_template`,
    off for a base tokenizer), written into a temp directory beside `path` and made visible by `commit_dir`
    (manifest, fsync, rename): a killed save never leaves a half-written model."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed attempt left
    tmp.mkdir(parents=True)
    need = model_bytes(model)[0] if model is not None else None
    with disk_full_guard(path.parent, f"{path.name} (save_pretrained)", need, tmp):
        if model is not None:
            if tokenizer is not None and chat_template:
                set_generation_ids(model, tokenizer)
            extra = {} if state_dict is None else {"state_dict": state_dict}
            model.save_pretrained(str(tmp), safe_serialization=True, **extra)
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp, chat_template)
    commit_dir(tmp, path)


def save_tokenizer_files(tokenizer, path: Path, chat_template: bool = True) -> None:
    """The one way a tokenizer is written. With `chat_template`: its Jinja chat template is the one that
    renders our encoding (`alignment.chat.hf_chat_template`, so plain `AutoTokenizer` users, TRL and vLLM
    format prompts as we trained) and the choice is stored (`chat_format.json`). tokenizer_config.json
    never keeps how this machine loaded it (MACHINE_LOCAL_KEYS). The tokenizer object is left unchanged."""
    own = tokenizer.chat_template
    if chat_template:
        tokenizer.chat_template = hf_chat_template(tokenizer)
    try:
        tokenizer.save_pretrained(str(path))
    finally:
        tokenizer.chat_template = own
    config = Path(path) / "tokenizer_config.json"
    if config.is_file():
        kept = {k: v for k, v in json.loads(config.read_text()).items() if k not in MACHINE_LOCAL_KEYS}
        config.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")
    if chat_template:
        write_template(path, tokenizer)


def set_generation_ids(model, tokenizer) -> None:
    """A causal LM's generation config starts, stops and pads as we do: BOS, the end of an answer in its
    chat format (EOS, or the model template's end-of-turn token, listed before EOS where they differ) and
    the tokenizer's pad id."""
    config = getattr(model, "generation_config", None)
    if config is None or not model.can_generate():
        return
    stop, eos = stop_token_id(tokenizer), tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = stop if stop == eos else [stop, eos]
    config.pad_token_id = tokenizer.pad_token_id


def copy_dir_atomic(source: Path, path: Path) -> None:
    """A copy of the checkpoint directory `source` as `path`, committed like a save (its old manifest and
    completion mark are written anew; its model card is not copied: the run that owns `path` writes its own)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_full_guard(path.parent, f"{path.name} (a copy of {source})", _tree_bytes(source), tmp):
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(COMPLETE_MARK, MANIFEST, CARD_FILE))
    commit_dir(tmp, path)


def check_writable(path: Path) -> None:
    """RunDirError in one line when the output directory cannot be made or written (a read-only disk, a parent
    that is a file, no permission): found at start-up, not at the first checkpoint."""
    probe = path / f".write-probe{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"output.dir {path} cannot be written: {e.strerror or e}"
                          f"{f' ({e.filename})' if e.filename and str(e.filename) != str(probe) else ''}") from None


def replaced_path(path: Path) -> Path:
    """Where `output.overwrite` keeps the run it replaces until the new run commits something."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}{REPLACED_SUFFIX}")


def _committed_anything(path: Path) -> bool:
    """Whether the run in `path` committed an output (a checkpoint, final/, ... anywhere in it, or done.json)."""
    return path.is_dir() and ((path / "done.json").is_file() or next(path.rglob(COMPLETE_MARK), None) is not None)


def describe_outputs(path: str | Path) -> str:
    """The end-of-run line of a command that returned normally: where its model, evaluation, metrics and report
    are (only what exists)."""
    path = Path(path)
    parts = []
    for name, what in (("final", "model"), ("best", "best checkpoint")):
        if (path / name / "config.json").is_file():
            parts.append(f"{what} {path / name}")
    for name, what in (("eval.json", "evaluation"), ("report.html", "report"), ("metrics.jsonl", "metrics")):
        if (path / name).is_file():
            parts.append(f"{what} {path / name}")
    return "finished: " + ("; ".join(parts) if parts else f"outputs in {path}")


def settle_replaced(path: str | Path) -> None:
    """Finish an overwrite of `path`: once the new run committed something the replaced run is deleted; before
    that (a failure, or a kill during start-up) the new run's partial files go and the replaced run is put
    back as it was. Does nothing when no overwrite is pending, and on processes other than the main one."""
    path = Path(path)
    old = replaced_path(path)
    if not old.is_dir() or not _on_main_process():
        return
    if _committed_anything(path):
        shutil.rmtree(old, ignore_errors=True)
        return
    if path.exists():
        # hidden first (atomic), then deleted: a kill here leaves the new partial run invisible, never half-gone
        partial = path.absolute().with_name(f".{path.absolute().name}.partial{os.getpid()}")
        os.replace(path, partial)
        shutil.rmtree(partial, ignore_errors=True)
    os.replace(old, path)
    _fsync_dir(path.absolute().parent)
    print(f"[overwrite] {path}: the new run committed nothing; the run it was replacing is back", flush=True)


def damaged_outputs(path: str | Path) -> list[str]:
    """A line per committed output of a run directory (final/, best/, critic/, iterations/*/final/, ...; not
    checkpoints, which resume checks) that no longer matches its manifest: `final/model.safetensors: ...`."""
    root = Path(path)
    out = []
    for manifest in sorted(root.rglob(MANIFEST)) if root.is_dir() else []:
        outdir = manifest.parent
        rel = outdir.relative_to(root)
        if "checkpoints" in rel.parts or any(part.startswith(".") for part in rel.parts):
            continue
        problems = verify_dir(outdir)
        if problems:
            out.append(f"{rel}/{problems[0]}")
    return out


def verify_model_dir(path: str | Path, key: str = "model") -> None:
    """ValueError in one line when a model directory that carries a manifest (a stage's final/, best/, a
    checkpoint) no longer matches it: a damaged model is never trained on or evaluated."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return  # a model from elsewhere (hub cache, a user's directory): nothing recorded to check against
    problems = verify_dir(path)
    if problems:
        raise ValueError(f"{key}: {path} is damaged: {problems[0]}"
                         f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
                         "re-run the stage that wrote it")


class RunDir:
    """One stage's output directory (see the module docstring)."""

    def __init__(self, path: str | Path, cfg: Any, overwrite: bool = False):
        self.path = Path(path)
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.overwrite = overwrite
        settle_replaced(self.path)  # an overwrite a kill or failure interrupted: its old run comes back

    # ------------------------------------------------------------------ lifecycle
    @property
    def done_file(self) -> Path:
        return self.path / "done.json"

    def finished(self) -> bool:
        """True when this directory holds a finished run of this exact config."""
        if not self.done_file.is_file():
            return False
        return json.loads(self.done_file.read_text()).get("config_hash") == self.hash

    def finished_summary(self, stage: str) -> dict | None:
        """The saved summary when this exact config already finished here (and say so), else None. A finished
        run whose committed outputs (final/, ...) no longer match their manifests is named and not finished:
        done.json goes and the stage runs again, resuming from its newest intact checkpoint."""
        if not self.finished():
            return None
        damaged = damaged_outputs(self.path)
        if damaged:
            print(f"[{stage}] {self.path} finished, but {damaged[0]}; running the stage again", flush=True)
            if _on_main_process():
                self.done_file.unlink(missing_ok=True)
            return None
        print(f"[{stage}] {self.path} already holds this finished run (config {self.hash}); nothing to do")
        return json.loads(self.done_file.read_text())

    def prepare(self, inputs: dict[str, str] | None = None, is_main: bool = True) -> None:
        """Check the directory can take this run, then record config, commit and inputs.

        Called after the inputs were validated, so a run that fails on bad data leaves the directory
        exactly as it was.
        """
        old_cfg = self.path / "config.json"
        replace = False
        if old_cfg.is_file():
            old_hash = json.loads(old_cfg.read_text())["hash"]
            if old_hash != self.hash and not self.overwrite:
                raise RunDirError(
                    f"{self.path} holds a run with another config (hash {old_hash}, this one {self.hash}); "
                    "choose another output.dir or set output.overwrite=true")
            replace = old_hash != self.hash
        if not is_main:
            return
        check_writable(self.path)
        if replace:  # the old run stays whole beside it until the new run commits something
            fault_point("overwrite.moving_aside")
            os.replace(self.path, replaced_path(self.path))
            fault_point("overwrite.moved_aside")
            self.path.mkdir()
        write_json_atomic(old_cfg, {"hash": self.hash, "config": to_dict(self.cfg)})
        write_json_atomic(self.path / "run.json", {
            "git_commit": git_commit(), "argv": sys.argv, "inputs": inputs or {},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": library_versions()})

    def mark_done(self, summary: dict | None = None) -> None:
        """done.json, written last; first the model card of `final/` where the run saved a model there."""
        if (self.final_dir / "config.json").is_file():
            stage = next((s for s in STAGES.values() if isinstance(self.cfg, s.config)), None)
            write_model_card(self.final_dir, self.path, stage.command if stage else "unknown",
                             stage.help if stage else "")
        write_json_atomic(self.done_file, {"config_hash": self.hash, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           **(summary or {})})
        settle_replaced(self.path)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first; half-written ones (no COMPLETE mark) are ignored."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir()
                 if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / COMPLETE_MARK).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def resume_checkpoint(self, log=print) -> Path | None:
        """The newest checkpoint that matches its manifest; each damaged newer one is named with what is
        wrong and skipped (never loaded). None when there is none: the run starts from the beginning."""
        skipped = []
        for ckpt in reversed(self.checkpoints()):
            problems = verify_dir(ckpt)
            if not problems:
                if skipped:
                    log(f"[resume] using {ckpt.name}, the newest intact checkpoint")
                return ckpt
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            log(f"[resume] checkpoint {ckpt} is damaged and will not be loaded: {shown}")
            skipped.append(ckpt)
        if skipped:
            log("[resume] no intact checkpoint left: starting from the beginning")
        return None

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CKPT_PREFIX}{step:08d}"

    def prune_checkpoints(self, keep_last: int) -> None:
        for old in self.checkpoints()[:-keep_last] if keep_last > 0 else []:
            # hidden first (atomic), then deleted: a kill mid-delete never leaves a half-deleted step-N
            hidden = old.with_name(f".{old.name}.old{os.getpid()}")
            os.replace(old, hidden)
            fault_point("checkpoint.pruning")
            shutil.rmtree(hidden, ignore_errors=True)
        for pattern in (".tmp-*", f".{CKPT_PREFIX}*.old*"):  # leftovers of killed writes
            for tmp in self.checkpoints_dir.glob(pattern) if self.checkpoints_dir.is_dir() else []:
                shutil.rmtree(tmp, ignore_errors=True)

    @property
    def final_dir(self) -> Path:
        return self.path / "final"


# ----------------------------------------------------------------------------------------- disk space
# Bytes per trainable parameter a checkpoint adds beyond the weights: AdamW's two moments, and fp32
# master weights under mixed precision / ZeRO (an upper bound for plain fp32 training, which needs 8).
OPTIMIZER_BYTES_PER_PARAM = 12


def model_bytes(model) -> tuple[int, int]:
    """(bytes of all weights, number of trainable parameters); ZeRO-3-partitioned weights count in full."""
    weights, trainable = 0, 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        weights += n * p.element_size()
        trainable += n if p.requires_grad else 0
    return weights, trainable


def checkpoint_bytes(model) -> int:
    """Estimated size of one training checkpoint of `model` (weights, optimizer state)."""
    weights, trainable = model_bytes(model)
    return weights + OPTIMIZER_BYTES_PER_PARAM * trainable


def saved_model_size(path: str | Path) -> tuple[int, int] | None:
    """(bytes of weights, number of parameters) of a saved HF model directory, read from its safetensors
    headers without loading a weight; None when there are none to read (a hub id, `.bin` weights)."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    params = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return sum(f.stat().st_size for f in files), params


def check_disk_space(path: str | Path, need: int, what: str) -> None:
    """DiskSpaceError when the filesystem holding `path` has less than `need` bytes free."""
    free = _free_bytes(Path(path))
    if free < need:
        raise DiskSpaceError(f"not enough disk space in {path}: {what} needs about {format_size(need)}, "
                             f"{format_size(free)} are free; free some space or choose another output.dir")


TB_GROUPS = ("train", "eval", "rollout")
WANDB_INSTALL = "pip install -e .[wandb] (make install installs it)"


def metric_tag(key: str, group: str | None = None) -> str:
    """The TensorBoard / W&B tag of a metrics.jsonl key: `<group>/<name>`, the group "eval" for keys named
    eval_* (the prefix dropped), else `group` (PPO's rollout statistics: "rollout"), else "train"."""
    if key.startswith("eval_"):
        return f"eval/{key[len('eval_'):]}"
    group = group or "train"
    if group not in TB_GROUPS:
        raise ValueError(f"metric group {group!r}: one of {', '.join(TB_GROUPS)}")
    return f"{group}/{key}"


class MetricsLog:
    """metrics.jsonl (append, flushed per line; flat keys), and the same scalars under grouped tags
    (`metric_tag`) in TensorBoard (`tb/`) and, with `wandb`, in a W&B run under `<run>/wandb/`, offline unless
    WANDB_MODE says otherwise. Written by the main process only."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True, resume_step: int = 0,
                 wandb: bool = False, config: dict | None = None, name: str | None = None):
        self.enabled = enabled
        self.file = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb_run = None
        if not enabled:
            return
        if self.file.is_file():  # a resumed run drops records past its checkpoint, so none is logged twice

            records, torn = _parse_lines(self.file.read_bytes())
            if torn:
                print(f"[resume] {self.file}: dropped {torn} torn line(s) left by a killed run")
            write_jsonl(self.file, [r for r in records if r.get("step", 0) <= resume_step])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None
        if wandb:
            self.wandb_run = _wandb_run(Path(run_dir), config, name)

    def log(self, record: dict, groups: dict[str, str] | None = None) -> None:
        """Append `record` (with its "step"); `groups` names the tag group of keys that are neither eval_*
        nor training metrics (e.g. {"kl": "rollout"})."""
        if not self.enabled:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {metric_tag(k, (groups or {}).get(k)): v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_run(run_dir: Path, config: dict | None, name: str | None):
    """A W&B run writing under `run_dir/wandb/`: offline unless WANDB_MODE is set (online needs `wandb login`);
    project from WANDB_PROJECT (default "alignment")."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"logging.wandb=true needs the wandb package; install it with: {WANDB_INSTALL}") from None
    return wandb.init(dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                      project=os.environ.get("WANDB_PROJECT", "alignment"), name=name, config=config)


def _parse_lines(data: bytes) -> tuple[list[dict], int]:
    """Records of an append-only JSONL log and the number of unreadable lines (a kill mid-write leaves
    at most the last one torn)."""
    records, torn = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            torn += 1
    return records, torn


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return _parse_lines(path.read_bytes())[0]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
