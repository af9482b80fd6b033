"""launch/*: each script's printed command, and a real 2-rank run through every launcher that
can start ranks on one machine (torchrun, the deepspeed launcher, MPICH's mpiexec; Slurm's srun
through a local stand-in that sets the variables srun sets)."""

import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys

import pytest

from blade_mega.engine.parallel import discover_process
from blade_mega.testing import free_port
from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")
VENV_BIN = os.path.dirname(sys.executable)
RUN_TIMEOUT = 300

# Only exactly 2 ranks can run this: 1 rank cannot hold TP=2, and with more the data-parallel
# size exceeds 1 so a global batch of one micro-batch no longer divides. A run that finishes
# therefore proves the launcher started 2 ranks that found each other.
TWO_RANKS_ONLY = ["--model-size", "tiny", "--seq-length", "32", "--tensor-model-parallel-size", "2",
                  "--global-batch-size", "2", "--micro-batch-size", "2", "--train-iters", "2",
                  "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0",
                  "--no-progress"]


def launcher_env(**extra) -> dict:
    """This environment without any launcher's rank variables, with the venv's tools on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_LOCAL"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_script(script: str, args, env: dict, timeout: float = RUN_TIMEOUT, cwd=None):
    # Its own session, so that a hang kills the launcher's ranks too (killing the launcher alone
    # leaves them holding the pipes), and the failure shows what the run printed before it hung.
    job = subprocess.Popen([os.path.join(LAUNCH, script), *args], env=env, cwd=cwd or REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"{script} did not finish in {timeout:.0f} s; it printed:\n"
                    f"{stdout[-2000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def data_flags(demo_data) -> list[str]:
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix]


def assert_trained_two_steps(result, log_file: str) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    with open(log_file) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train)


def unused_port(low: int, high: int) -> int:
    while True:
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


# -- rank discovery ---------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, ("torchrun/deepspeed", 3, 8, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}, ("slurm", 5, 16, 5)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, ("mpich", 1, 2, 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, ("openmpi", 2, 4, 0)),
    ({}, ("single", 0, 1, 0)),
])
def test_discover_process_reads_each_launchers_variables(env, expected):
    info = discover_process(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == expected


def test_mpich_sets_the_variables_discover_process_reads():
    result = subprocess.run(["mpiexec", "-n", "2", "env"], env=launcher_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ranks = sorted(line for line in lines if line.startswith("PMI_RANK="))
    assert ranks == ["PMI_RANK=0", "PMI_RANK=1"]
    assert lines.count("PMI_SIZE=2") == 2
    assert sorted(line for line in lines if line.startswith("MPI_LOCALRANKID=")) == \
        ["MPI_LOCALRANKID=0", "MPI_LOCALRANKID=1"]


# -- printed commands -------------------------------------------------------------------------

def test_torchrun_prints_single_and_multi_node_commands():
    single = run_script("torchrun.sh", ["--train-iters", "3"],
                        launcher_env(DRY_RUN="1", NPROC_PER_NODE="4"), timeout=30)
    assert single.returncode == 0, single.stderr
    assert shlex.split(single.stdout) == [
        "torchrun", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", "29500",
        "-m", "blade_mega.pretrain", "--train-iters", "3"]
    multi = run_script("torchrun.sh", ["--data-path", "a b"], launcher_env(
        DRY_RUN="1", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29600",
        NPROC_PER_NODE="8"), timeout=30)
    words = shlex.split(multi.stdout)
    assert words[:11] == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node",
                          "8", "--master_addr", "node0", "--master_port", "29600"]
    assert words[-2:] == ["--data-path", "a b"]  # flags reach pretrain intact


def test_torchrun_multi_node_without_master_addr_is_an_error():
    result = run_script("torchrun.sh", [], launcher_env(DRY_RUN="1", NNODES="2"), timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("error: NNODES=2 needs MASTER_ADDR")


def test_deepspeed_prints_single_node_and_hostfile_commands(tmp_path):
    single = run_script("deepspeed.sh", ["--train-iters", "3"],
                        launcher_env(DRY_RUN="1", NUM_ACCELERATORS="2"), timeout=30)
    assert shlex.split(single.stdout) == [
        "deepspeed", "--master_port", "29500", "--no_local_rank", "--num_accelerators", "2",
        "--module", "blade_mega.pretrain", "--train-iters", "3"]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    multi = run_script("deepspeed.sh", ["--train-iters", "3"], launcher_env(
        DRY_RUN="1", HOSTFILE=str(hostfile), NUM_NODES="2", MASTER_ADDR="node0"), timeout=30)
    assert shlex.split(multi.stdout) == [
        "deepspeed", "--master_port", "29500", "--no_local_rank", "--hostfile", str(hostfile),
        "--num_nodes", "2", "--master_addr", "node0", "--module", "blade_mega.pretrain",
        "--train-iters", "3"]
    missing = run_script("deepspeed.sh", [], launcher_env(DRY_RUN="1", HOSTFILE=str(tmp_path / "x")),
                         timeout=30)
    assert missing.returncode == 2 and missing.stderr.startswith("error: HOSTFILE=")


def test_mpiexec_exports_the_rendezvous_to_every_node(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode7:8\nnode8:8\n")
    result = run_script("mpiexec.sh", ["--train-iters", "3"], launcher_env(
        DRY_RUN="1", NP="16", PPN="8", HOSTFILE=str(hostfile)), timeout=30)
    assert shlex.split(result.stdout) == [
        "mpiexec", "-n", "16", "-genv", "MASTER_ADDR", "node7", "-genv", "MASTER_PORT", "29500",
        "-f", str(hostfile), "-ppn", "8", "python", "-m", "blade_mega.pretrain",
        "--train-iters", "3"]
    no_np = run_script("mpiexec.sh", [], launcher_env(DRY_RUN="1"), timeout=30)
    assert no_np.returncode == 2 and no_np.stderr.startswith("error: set NP")


def fake_slurm_bin(directory, first_host: str) -> str:
    """Stand-ins for scontrol (expands our node list) and srun (SLURM_NTASKS local tasks with
    the rank variables srun gives each task)."""
    os.makedirs(directory, exist_ok=True)
    scontrol = os.path.join(directory, "scontrol")
    with open(scontrol, "w") as f:
        f.write(f'#!/bin/sh\n[ "$*" = "show hostnames $SLURM_JOB_NODELIST" ] || exit 1\n'
                f'echo {first_host}\necho other-node\n')
    srun = os.path.join(directory, "srun")
    with open(srun, "w") as f:
        f.write('#!/usr/bin/env bash\n'
                'while [[ "$1" == --* ]]; do shift; done\n'
                'pids=()\n'
                'for ((i = 0; i < SLURM_NTASKS; i++)); do\n'
                '    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)\n'
                'done\n'
                'status=0\n'
                'for pid in "${pids[@]}"; do wait "$pid" || status=$?; done\n'
                'exit $status\n')
    for path in (scontrol, srun):
        os.chmod(path, 0o755)
    return directory


def test_slurm_prints_srun_with_rendezvous_from_the_allocation(tmp_path):
    fake = fake_slurm_bin(str(tmp_path / "bin"), "gpu-a17")
    env = launcher_env(DRY_RUN="1", SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu-a[17-18]")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    result = run_script("slurm.sbatch", ["--train-iters", "3"], env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "MASTER_ADDR=gpu-a17", "MASTER_PORT=13456",  # first node; 10000 + job id % 20000
        "srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "python", "-m", "blade_mega.pretrain",
        "--train-iters", "3"]


def test_slurm_outside_an_allocation_is_an_error():
    result = run_script("slurm.sbatch", [], launcher_env(DRY_RUN="1"), timeout=30)
    assert result.returncode != 0 and "run this with sbatch" in result.stderr


# -- real 2-rank runs -------------------------------------------------------------------------

@pytest.mark.parametrize("script, env_vars, in_tmp", [
    ("torchrun.sh", {"NPROC_PER_NODE": "2"}, False),
    # The deepspeed launcher reads ./.deepspeed_env if present: run it from an empty directory.
    ("deepspeed.sh", {"NUM_ACCELERATORS": "2"}, True),
    # No torchrun variables reach the ranks (launcher_env drops them): they rank themselves
    # from MPICH's PMI_RANK/PMI_SIZE.
    ("mpiexec.sh", {"NP": "2"}, False),
], ids=["torchrun", "deepspeed", "mpiexec"])
def test_launcher_trains_on_two_ranks(demo_data, tmp_path, script, env_vars, in_tmp):
    log = str(tmp_path / "log.jsonl")
    env = launcher_env(**env_vars, MASTER_PORT=str(free_port()))
    result = run_script(script, [*data_flags(demo_data), *TWO_RANKS_ONLY, "--log-file", log],
                        env, cwd=str(tmp_path) if in_tmp else None)
    assert_trained_two_steps(result, log)


def test_slurm_job_trains_on_two_tasks(demo_data, tmp_path):
    fake = fake_slurm_bin(str(tmp_path / "bin"), "localhost")
    port = unused_port(10000, 30000)
    log = str(tmp_path / "log.jsonl")
    env = launcher_env(SLURM_JOB_ID=str(port - 10000), SLURM_JOB_NODELIST="localhost",
                       SLURM_NTASKS="2")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    result = run_script("slurm.sbatch", [*data_flags(demo_data), *TWO_RANKS_ONLY,
                                         "--log-file", log], env)
    assert_trained_two_steps(result, log)
