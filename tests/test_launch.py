"""Cluster launchers of `align pipeline` (alignment.launch): hostfiles, the srun/torchrun command inside a Slurm
allocation, the sbatch chain, one stage with --only, and a hostfile run on 2 local gloo processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment.launch import Host, hostfile_commands, read_hostfile, slurm_command

from test_pipeline import write_recipe

REPO = Path(__file__).resolve().parents[1]


def _align(*args, cwd=REPO, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


def test_hostfile_lines_and_their_errors(tmp_path):
    good = tmp_path / "hosts"
    good.write_text("# two nodes\nworker-1 slots=8\n\nworker-2   slots = 4  # the small one\n")
    assert read_hostfile(good) == [Host("worker-1", 8), Host("worker-2", 4)]
    for text, reason in [("worker-1 slots=8\nworker-2 gpus=4\n", ":2: expected '<host> slots=<n>'"),
                         ("worker-1 slots=0\n", ":1: expected"), ("a slots=1\na slots=2\n", ":2: host 'a' is listed twice"),
                         ("# nothing\n", "no hosts")]:
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(ValueError, match=reason):
            read_hostfile(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_hostfile(tmp_path / "missing")


def test_hostfile_commands_rank_each_host_and_ssh_to_the_remote_ones(tmp_path):
    hosts = [Host("node-a", 8), Host("node-b", 8), Host("node-c", 8)]
    cmds = hostfile_commands("sft", "recipes/tiny/sft.yaml", ["optim.lr=1e-4"], nodes=2, processes=8, hosts=hosts,
                             cwd=tmp_path)
    assert len(cmds) == 2 and all(c[:2] == ["ssh", f"node-{x}"] for c, x in zip(cmds, "ab"))
    for rank, c in enumerate(cmds):
        remote = c[2]
        assert remote.startswith(f"cd {tmp_path} && ")
        for part in ("--nnodes=2", "--nproc_per_node=8", f"--node_rank={rank}", "--master_addr=node-a",
                     "-m alignment.cli sft --recipe recipes/tiny/sft.yaml --set optim.lr=1e-4"):
            assert part in remote
    local = hostfile_commands("rm", "r.yaml", [], nodes=1, processes=2, hosts=[Host("localhost", 2)], cwd=tmp_path)
    assert local[0][0] == sys.executable and "--master_addr=127.0.0.1" in local[0]
    with pytest.raises(ValueError, match="asks for 3 nodes and the hostfile lists 2"):
        hostfile_commands("sft", "r.yaml", [], nodes=3, processes=1, hosts=hosts[:2], cwd=tmp_path)
    with pytest.raises(ValueError, match="asks for 8 processes per node and node-b has 4 slots"):
        hostfile_commands("sft", "r.yaml", [], nodes=2, processes=8, hosts=[Host("node-a", 8), Host("node-b", 4)],
                          cwd=tmp_path)


def test_slurm_command_starts_one_torchrun_per_node_with_c10d_rendezvous():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "MASTER_ADDR": "gpu-017", "MASTER_PORT": "29600"}
    cmd = slurm_command("ppo", "recipes/llama2-70b/ppo.yaml", ["reward.zero3=true"], nodes=4, processes=8, env=env)
    assert cmd[:5] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable]
    for part in ("--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-017:29600",
                 "--rdzv_id=4242"):
        assert part in cmd
    assert cmd[-6:] == ["alignment.cli", "ppo", "--recipe", "recipes/llama2-70b/ppo.yaml", "--set", "reward.zero3=true"]
    with pytest.raises(ValueError, match="inside a Slurm allocation"):
        slurm_command("ppo", "r.yaml", [], nodes=1, processes=1, env={})
    with pytest.raises(ValueError, match="asks for 8 nodes and this allocation has 4"):
        slurm_command("ppo", "r.yaml", [], nodes=8, processes=8, env=env)


def _two_node_recipe(tmp_path: Path) -> Path:
    path = write_recipe(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["stages"][1].update(nodes=2, processes=4)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sbatch_writes_one_chained_job_per_stage(tmp_path):
    recipe = _two_node_recipe(tmp_path)
    out = tmp_path / "jobs"
    done = _align("pipeline", "--recipe", str(recipe), "--sbatch", str(out), "--partition", "gpu", "--time", "02:00:00",
                  "--gpus-per-node", "4")
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.glob("*.sbatch"))
    assert names == ["01-base.sbatch", "02-sft.sbatch"]  # write_recipe disables the report
    sft = (out / "02-sft.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00", f"cd {REPO}",
                 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                 f"pipeline --recipe {recipe} --only sft --launcher slurm"):
        assert line in sft
    assert "#SBATCH --nodes=1" in (out / "01-base.sbatch").read_text()
    submit = (out / "submit.sh").read_text()
    assert submit.index("01-base.sbatch") < submit.index("02-sft.sbatch")
    assert submit.count("--dependency=afterok:$dep") == 2 and submit.count("dep=$id") == 2
    assert not (tmp_path / "demo" / "manifest.json").exists()  # nothing ran
    assert (tmp_path / "demo" / "logs").is_dir()  # where the jobs' --output goes: sbatch would not create it
    # --submit without sbatch on PATH: one line, the scripts still written
    nosb = _align("pipeline", "--recipe", str(recipe), "--sbatch", str(out), "--submit", env={"PATH": "/nonexistent"})
    assert nosb.returncode == 2 and "sbatch is not on PATH" in nosb.stderr and len(nosb.stderr.splitlines()) == 1


def test_a_multi_node_stage_needs_a_cluster_launcher_and_only_checks_upstream(tmp_path):
    recipe = _two_node_recipe(tmp_path)
    local = _align("pipeline", "--recipe", str(recipe))
    assert local.returncode == 2 and "stage sft asks for nodes: 2: run it with --launcher slurm" in local.stderr
    assert not (tmp_path / "demo").exists()  # before any compute
    early = _align("pipeline", "--recipe", str(recipe), "--only", "sft", "--launcher", "slurm")
    assert early.returncode == 2 and "--only sft: it reads from base" in early.stderr
    unknown = _align("pipeline", "--recipe", str(recipe), "--only", "sfft")
    assert unknown.returncode == 2 and "--only sfft: no such stage (stages: base, sft)" in unknown.stderr
    outside = _align("pipeline", "--recipe", str(recipe), "--only", "base", "--launcher", "slurm",
                     env={"SLURM_JOB_ID": ""})
    assert outside.returncode != 0


def test_hostfile_pipeline_runs_a_stage_on_two_local_gloo_processes(tmp_path):
    """What --print-commands prints, run: the base stage alone, then sft on 2 processes of localhost."""
    recipe = write_recipe(tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][1]["processes"] = 2
    recipe.write_text(yaml.safe_dump(raw))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    printed = _align("pipeline", "--recipe", str(recipe), "--launcher", "hostfile", "--hostfile", str(hostfile),
                     "--print-commands")
    assert printed.returncode == 0, printed.stderr
    commands = [line for line in printed.stdout.splitlines() if line.startswith("align pipeline")]
    assert [c.split("--only ")[1].split()[0] for c in commands] == ["base", "sft"]
    assert "--nproc_per_node=2" in printed.stdout and "ssh" not in printed.stdout
    for command in commands:
        done = _align(*command.split()[1:])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert [manifest["stages"][n]["status"] for n in ("base", "sft")] == ["done", "done"]
    log = (tmp_path / "demo" / "logs" / "sft.log").read_text()
    assert "2 processes, gloo data parallel" in log
