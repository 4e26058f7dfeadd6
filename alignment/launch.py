"""How `align pipeline` starts a stage's processes: on this machine, inside a Slurm allocation, or on the
hosts of a DeepSpeed-style hostfile (issue 24). The stage itself never changes: it is always
`python -m alignment.cli <stage> --recipe R --set ...`, run by torchrun when it has more than one process;
the pipeline driver around it (lineage, manifest, resume, report: `alignment.pipeline`) is the same for
every launcher. A recipe stage asks for `nodes` (default 1) and `processes` per node.

- local: one node; `processes` > 1 runs under torchrun on 127.0.0.1.
- slurm: inside an allocation (`sbatch`), `srun` starts one torchrun per node, and they meet by c10d
  rendezvous on the allocation's first node (`MASTER_ADDR`, exported by the job script). `write_sbatch`
  writes one job script per stage, chained by `--dependency=afterok`, and a last job that writes the report:
  each runs `align pipeline --recipe R --only NAME --launcher slurm` (one stage, its lineage checked).
- hostfile: the hosts of a DeepSpeed hostfile (`worker-1 slots=8`), the first `nodes` of them, one torchrun per
  host with a static rendezvous on the first (`--node_rank` i); `localhost` runs here, every other host over ssh
  in the same directory. `hostfile_commands` prints what a run starts, stage by stage.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

LAUNCHERS = ("local", "slurm", "hostfile")
MASTER_PORT = 29531
LOCAL_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def read_hostfile(path: str | Path) -> list[Host]:
    """The hosts of a DeepSpeed hostfile: `<host> slots=<n>` per line, `#` comments and blank lines ignored.
    A bad line is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--hostfile {path}: not found")
    hosts: list[Host] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise ValueError(f"{path}:{number}: expected '<host> slots=<n>' with n >= 1, got {raw.strip()!r}")
        if any(h.name == match.group(1) for h in hosts):
            raise ValueError(f"{path}:{number}: host {match.group(1)!r} is listed twice")
        hosts.append(Host(match.group(1), int(match.group(2))))
    if not hosts:
        raise ValueError(f"{path}: no hosts (lines '<host> slots=<n>')")
    return hosts


def stage_args(stage: str, recipe: str, overrides: list[str]) -> list[str]:
    """The stage's own command line after the interpreter: `-m alignment.cli <stage> --recipe R --set ...`."""
    args = ["-m", "alignment.cli", stage, "--recipe", recipe]
    for o in overrides:
        args += ["--set", o]
    return args


def torchrun(nnodes: int, nproc: int, rendezvous: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            *rendezvous]


def local_command(stage: str, recipe: str, overrides: list[str], processes: int) -> list[str]:
    args = stage_args(stage, recipe, overrides)
    if processes > 1:
        return [*torchrun(1, processes, ["--master_addr=127.0.0.1", f"--master_port={MASTER_PORT}"]), *args]
    return [sys.executable, *args]


def slurm_command(stage: str, recipe: str, overrides: list[str], *, nodes: int, processes: int,
                  env: dict | None = None) -> list[str]:
    """`srun` one torchrun per node of the allocation, c10d rendezvous at $MASTER_ADDR (the job script exports
    the first node). Outside an allocation, or in one with fewer nodes than the stage asks, a one-line error."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        raise ValueError("--launcher slurm runs inside a Slurm allocation (no SLURM_JOB_ID here): submit the "
                         "scripts of `align pipeline --recipe R --sbatch DIR`")
    have = int(env.get("SLURM_NNODES", "1"))
    if have < nodes:
        raise ValueError(f"the stage asks for {nodes} nodes and this allocation has {have} (SLURM_NNODES)")
    master = env.get("MASTER_ADDR")
    if not master:
        raise ValueError("MASTER_ADDR is not set: the job script exports the allocation's first node")
    rendezvous = ["--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{env.get('MASTER_PORT', MASTER_PORT)}",
                  f"--rdzv_id={env['SLURM_JOB_ID']}"]
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *torchrun(nodes, processes, rendezvous), *stage_args(stage, recipe, overrides)]


def hostfile_commands(stage: str, recipe: str, overrides: list[str], *, nodes: int, processes: int,
                      hosts: list[Host], cwd: str | Path) -> list[list[str]]:
    """One command per host for the first `nodes` hosts: torchrun with node rank i and the first host as
    master; on `localhost` as it is, on any other host through ssh in `cwd`."""
    if nodes > len(hosts):
        raise ValueError(f"the stage asks for {nodes} nodes and the hostfile lists {len(hosts)} hosts")
    used = hosts[:nodes]
    short = [h.name for h in used if h.slots < processes]
    if short:
        raise ValueError(f"the stage asks for {processes} processes per node and {short[0]} has "
                         f"{next(h.slots for h in used if h.name == short[0])} slots")
    # the rendezvous host as every host reaches it: this machine's name when it is the first of several
    if all(h.name in LOCAL_HOSTS for h in used):
        master = "127.0.0.1"
    else:
        master = socket.getfqdn() if used[0].name in LOCAL_HOSTS else used[0].name
    commands = []
    for rank, host in enumerate(used):
        rendezvous = [f"--node_rank={rank}", f"--master_addr={master}", f"--master_port={MASTER_PORT}"]
        command = [*torchrun(nodes, processes, rendezvous), *stage_args(stage, recipe, overrides)]
        if host.name not in LOCAL_HOSTS:
            command = ["ssh", host.name, f"cd {shlex.quote(str(cwd))} && {shlex.join(command)}"]
        commands.append(command)
    return commands


# ----------------------------------------------------------------------------------------- Slurm job scripts
@dataclass(frozen=True)
class SlurmOptions:
    gpus_per_node: int = 8
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # sbatch --time, e.g. 24:00:00


def _sbatch_script(job: str, nodes: int, processes: int, opts: SlurmOptions, log: Path, cwd: Path,
                   command: list[str]) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --output={log}"]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    lines += [f"#SBATCH --{key}={value}" for key, value in
              (("partition", opts.partition), ("account", opts.account), ("time", opts.time)) if value]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(cwd))}",
              'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              f"export MASTER_PORT={MASTER_PORT}",
              f"# {nodes} node(s) x {processes} process(es): the pipeline driver runs here and starts the stage "
              "with srun + torchrun (alignment.launch.slurm_command)",
              shlex.join(command), ""]
    return "\n".join(lines)


def write_sbatch(planned: list[dict], recipe: str, root: Path, out: Path, opts: SlurmOptions,
                 *, report: bool = True) -> list[Path]:
    """One job script per stage (`NN-<name>.sbatch`, as many nodes as the stage asks), one for the report
    (one node), and `submit.sh`, which submits them in order, each after the previous one succeeded
    (`--dependency=afterok`), and prints the job ids. Returns the scripts in order."""
    out.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd().resolve()
    logs = (root / "logs").resolve()
    logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the directory of --output
    name = root.name
    scripts = []
    driver = [sys.executable, "-m", "alignment.cli", "pipeline", "--recipe", recipe]
    for i, p in enumerate(planned, start=1):
        spec = p["spec"]
        path = out / f"{i:02d}-{spec.name}.sbatch"
        path.write_text(_sbatch_script(f"align-{name}-{spec.name}", spec.nodes, spec.processes, opts,
                                       logs / f"{spec.name}.slurm-%j.log", cwd,
                                       [*driver, "--only", spec.name, "--launcher", "slurm"]))
        scripts.append(path)
    if report:
        path = out / f"{len(planned) + 1:02d}-report.sbatch"
        path.write_text(_sbatch_script(f"align-{name}-report", 1, 1, opts, logs / "report.slurm-%j.log", cwd, driver))
        scripts.append(path)
    submit = ["#!/bin/bash", "# Submit the pipeline's jobs in order, each after the previous one succeeded.",
              "set -euo pipefail", f"cd {shlex.quote(str(out.resolve()))}", "dep=\"\""]
    for path in scripts:
        submit += [f'id=$(sbatch --parsable ${{dep:+--dependency=afterok:$dep}} {shlex.quote(path.name)})',
                   f'echo "{path.stem}: job $id"', "dep=$id"]
    (out / "submit.sh").write_text("\n".join(submit) + "\n")
    (out / "submit.sh").chmod(0o755)
    for path in scripts:
        path.chmod(0o755)
    return scripts
