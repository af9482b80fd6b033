"""Faults during real runs: a rank killed mid-run, a torn or corrupted checkpoint, a full disk,
non-finite losses.  The job must end (never hang), and nothing saved before the fault is lost.

Jobs are real launches (torchrun, the deepspeed launcher, plain python) of ``blade_mega.pretrain``
as subprocesses; a killed rank is found by scanning /proc for the launcher's descendants.
"""

import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from blade_mega.train import checkpoint
from blade_mega.prepare.preprocess import preprocess
from blade_mega.errors import UserError, run_cli
from blade_mega.testing import free_port

BIN = os.path.dirname(sys.executable)
HANG_LIMIT_S = 240  # far above any healthy exit: reaching it means the job hung


def train_flags(demo_data, workdir: str, *extra: str) -> list[str]:
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            "--model-size", "tiny", "--seq-length", "64", "--global-batch-size", "8",
            "--micro-batch-size", "2", "--train-iters", "400", "--log-interval", "1",
            "--eval-interval", "0", "--no-progress", "--lr-warmup-iters", "2",
            "--log-file", os.path.join(workdir, "log.jsonl"), *extra]


def torchrun(ranks: int = 2) -> list[str]:
    return [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks),
            "--master_port", str(free_port()), "-m", "blade_mega.pretrain"]


def torchrun_with_rank_logs(log_dir: str, ranks: int = 2) -> list[str]:
    """torchrun with each rank's stderr in its own file (see ``rank_stderr``).  The agent polls
    every 10 s instead of 0.1 s: when a rank dies, it SIGTERMs the survivors on its next poll, and
    a survivor must first reach its next collective and print its error line (3 s was once too
    short on 2 busy cores: the agent's poll came 1 s after the kill)."""
    launcher = torchrun(ranks)
    launcher[1:1] = ["--log-dir", log_dir, "--redirects", "2", "--monitor-interval", "10"]
    return launcher


def rank_stderr(log_dir: str, rank: int) -> str:
    [path] = glob.glob(os.path.join(log_dir, "*", "attempt_0", str(rank), "stderr.log"))
    with open(path) as f:
        return f.read()


def assert_collective_failure_line(stderr: str, rank: int, *reasons: str) -> None:
    """The run ended with run_cli's one line for a failed collective, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert last.startswith(f"error: rank {rank}: a collective failed ("), stderr[-3000:]
    assert any(reason in last for reason in reasons), last
    assert last.endswith("then resume from the last checkpoint (--load); BLADE_DEBUG=1 prints "
                         "the traceback"), last


def deepspeed_launcher(ranks: int = 2) -> list[str]:
    # --no_local_rank: our parser takes the rank from the environment (as launch/deepspeed.sh).
    return [os.path.join(BIN, "deepspeed"), "--num_accelerators", str(ranks), "--master_port",
            str(free_port()), "--no_local_rank", "--module", "blade_mega.pretrain"]


def single_process() -> list[str]:
    return [sys.executable, "-m", "blade_mega.pretrain"]


def env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], file_limit: int = 0) -> subprocess.CompletedProcess:
    def limit_file_size():  # a file-size limit: writes past it fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))

    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=HANG_LIMIT_S,
                          preexec_fn=limit_file_size if file_limit else None)


def read_log(path: str) -> list[dict]:
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:  # the line being written right now
                    pass
    return records


def train_losses(records: list[dict]) -> dict:
    return {r["iteration"]: (r["loss"], r["block_crcs"]) for r in records if r["kind"] == "train"}


def worker_pids(root: int) -> dict[int, int]:
    """{rank: pid} of the pretrain workers below process ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"blade_mega.pretrain" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"RANK" in variables:
            found[int(variables[b"RANK"])] = pid
    return found


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_rank_mid_run(launcher: list[str], flags: list[str], log_path: str, after_iteration: int,
                      rank: int = 1, sig=signal.SIGKILL, kill_once_alone: bool = False) -> dict:
    """Start the job, wait until the log shows ``after_iteration``, send ``sig`` to one rank.
    ``kill_once_alone``: SIGKILL that rank as soon as all the others have exited (for SIGSTOP:
    what the launchers do 30 s later).
    Returns the exit status, seconds from the signal to the job's exit, and the log so far."""
    job = subprocess.Popen(launcher + flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=env(), start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_LIMIT_S
        while max(train_losses(read_log(log_path)), default=0) < after_iteration:
            assert job.poll() is None, job.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job never reached the kill point"
            time.sleep(0.05)
        ranks = worker_pids(job.pid)
        assert sorted(ranks) == list(range(len(ranks))) and rank in ranks, ranks
        os.kill(ranks[rank], sig)
        signalled = time.monotonic()
        while kill_once_alone and any(running(pid) for r, pid in ranks.items() if r != rank):
            assert time.monotonic() < signalled + HANG_LIMIT_S, "the other ranks never exited"
            time.sleep(0.1)
        if kill_once_alone:
            os.kill(ranks[rank], signal.SIGKILL)
        output = job.communicate(timeout=HANG_LIMIT_S)[0].decode()
        return {"returncode": job.returncode, "exit_s": time.monotonic() - signalled,
                "output": output, "ranks": ranks, "log": read_log(log_path)}
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def assert_job_gone(outcome: dict) -> None:
    assert outcome["returncode"] != 0
    time.sleep(0.5)
    survivors = [pid for pid in outcome["ranks"].values() if running(pid)]
    assert not survivors, outcome["output"][-3000:]


def latest_tag(save_dir: str) -> str:
    with open(os.path.join(save_dir, checkpoint.LATEST)) as f:
        return f.read().strip()


def flip_middle_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- a rank killed mid-run ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_under_torchrun(demo_data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("killed_torchrun"))
    save = os.path.join(workdir, "ckpt")
    flags = train_flags(demo_data, workdir, "--save", save, "--save-interval", "5",
                        "--keep-checkpoints", "3")
    rank_logs = os.path.join(workdir, "rank_logs")
    outcome = kill_rank_mid_run(torchrun_with_rank_logs(rank_logs), flags,
                                os.path.join(workdir, "log.jsonl"), 12)
    return {**outcome, "save": save, "workdir": workdir,
            "survivor_stderr": rank_stderr(rank_logs, 0)}


def test_sigkilled_rank_ends_the_torchrun_job(killed_under_torchrun):
    assert_job_gone(killed_under_torchrun)
    assert "SIGKILL" in killed_under_torchrun["output"]  # torchrun names the dead worker
    # The survivor's all-reduce fails (gloo sees the socket close or reset) and it prints the one
    # line, unless it is ended first: in two full CI runs on 2 cores the job ended 1-1.5 s after
    # the kill with only the survivor's banner (cause not found; alone the test always printed
    # it), so here the line is checked only when the survivor got to print
    # (test_hung_rank_... and the GLOO_* unit tests below check it always).
    survivor = killed_under_torchrun["survivor_stderr"]
    assert "Traceback" not in survivor, survivor[-3000:]
    if "error:" in survivor:
        assert_collective_failure_line(survivor, 0, "Connection closed by peer",
                                       "Connection reset by peer")


def test_hung_rank_ends_the_job_with_one_error_line(demo_data, tmp_path):
    # SIGSTOP: rank 1 is alive but silent, so rank 0's collective times out after 6 s.
    flags = train_flags(demo_data, str(tmp_path), "--distributed-timeout-minutes", "0.1")
    rank_logs = str(tmp_path / "rank_logs")
    outcome = kill_rank_mid_run(torchrun_with_rank_logs(rank_logs), flags,
                                str(tmp_path / "log.jsonl"), 3, sig=signal.SIGSTOP,
                                kill_once_alone=True)
    assert_job_gone(outcome)
    stderr = rank_stderr(rank_logs, 0)
    assert_collective_failure_line(stderr, 0, "Timed out waiting")
    # the heartbeats name the silent rank, and the flag that would have waited longer
    assert "rank 1 stopped answering (no heartbeat for " in stderr
    assert "raise --distributed-timeout-minutes (now 0.1) if it was only slow" in stderr


# gloo's messages as torch 2.13 raises them (RuntimeError), from the two runs above.
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                "Timed out waiting 6000ms for recv operation to complete")
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:3761: Connection reset by peer. This is typically caused by a remote "
              "worker hanging or bugs in the application. Check the logs of the remote worker "
              "before reporting an error. GLHF!")


def raising(err: BaseException):
    def main_fn():
        raise err
    return main_fn


def cli_stderr_on(err: BaseException, capsys) -> str:
    """What ``run_cli`` prints when its main raises ``err``; it must exit with status 2."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(err))
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("message, reason", [
    (GLOO_TIMEOUT, "Timed out waiting 6000ms for recv operation to complete"),
    (GLOO_RESET, "Read error [127.0.0.1]:3761: Connection reset by peer"),
])
def test_run_cli_turns_a_failed_collective_into_one_line(monkeypatch, capsys, message, reason):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("BLADE_DEBUG", raising=False)
    stderr = cli_stderr_on(RuntimeError(message), capsys)
    assert stderr.count("\n") == 1
    assert_collective_failure_line(stderr, 1, f"({reason})")
    assert "another rank died or stopped responding" in stderr  # no heartbeats to tell who


@pytest.mark.parametrize("err", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
    RuntimeError("Timed out"),  # not from gloo
    RuntimeError("[../third_party/gloo/gloo/allreduce.cc:12] Gloo mismatched sizes"),  # a bug
    OSError("[../third_party/gloo/gloo/transport/tcp/pair.cc:1] Connection reset by peer"),
])
def test_run_cli_lets_other_errors_through(monkeypatch, err):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(type(err)) as raised:
        run_cli(raising(err))
    assert raised.value is err


def test_blade_debug_keeps_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("BLADE_DEBUG", "1")
    monkeypatch.delenv("RANK", raising=False)
    stderr = cli_stderr_on(RuntimeError(GLOO_TIMEOUT), capsys)
    assert "Traceback" in stderr and GLOO_TIMEOUT in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: a collective failed (Timed out")


def test_resume_after_kill_continues_with_the_uninterrupted_losses(killed_under_torchrun,
                                                                   demo_data, tmp_path):
    save = killed_under_torchrun["save"]
    tag = latest_tag(save)
    assert checkpoint.check_complete(os.path.join(save, tag)) is None
    start = int(tag.split("_")[1])
    before_kill = train_losses(killed_under_torchrun["log"])
    result = run(torchrun() + train_flags(demo_data, str(tmp_path), "--load", save,
                                          "--exit-interval", str(start + 4)))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = train_losses(read_log(str(tmp_path / "log.jsonl")))
    assert min(resumed) == start + 1
    overlap = sorted(set(resumed) & set(before_kill))
    assert overlap, (sorted(resumed), sorted(before_kill))
    assert {i: resumed[i] for i in overlap} == {i: before_kill[i] for i in overlap}


def test_sigkilled_rank_ends_the_deepspeed_launcher_job_and_a_corrupt_latest_falls_back(
        demo_data, tmp_path):
    save = str(tmp_path / "ckpt")
    flags = train_flags(demo_data, str(tmp_path), "--save", save, "--save-interval", "5",
                        "--keep-checkpoints", "3")
    outcome = kill_rank_mid_run(deepspeed_launcher(), flags, str(tmp_path / "log.jsonl"), 12)
    assert_job_gone(outcome)
    tag = latest_tag(save)
    previous = checkpoint.tag_for(int(tag.split("_")[1]) - 5)
    damaged = os.path.join(save, tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    flip_middle_byte(damaged)  # same size: only the checksum can tell
    resume_dir = tmp_path / "resume"
    result = run(torchrun() + train_flags(demo_data, str(resume_dir), "--load", save,
                                          "--exit-interval", str(int(tag.split("_")[1]))))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if "skipped broken" in line]
    assert len(warnings) == 1 and damaged in warnings[0] and f"loading {previous}" in warnings[0]
    resumed = train_losses(read_log(str(resume_dir / "log.jsonl")))
    before_kill = train_losses(outcome["log"])
    assert min(resumed) == int(previous.split("_")[1]) + 1
    assert {i: resumed[i] for i in resumed} == {i: before_kill[i] for i in resumed}


# -- damaged checkpoints: what a kill during a save, or later damage, leaves behind ----------------

@pytest.fixture
def two_checkpoints(killed_under_torchrun, tmp_path):
    """A copy of the killed run's checkpoints (iter_0000005 and the latest)."""
    save = str(tmp_path / "ckpt")
    shutil.copytree(killed_under_torchrun["save"], save)
    return save, latest_tag(save)


def test_save_killed_before_its_manifest_is_never_loaded(two_checkpoints):
    save, tag = two_checkpoints
    torn = os.path.join(save, checkpoint.tag_for(999))
    shutil.copytree(os.path.join(save, tag), torn)
    os.remove(os.path.join(torn, checkpoint.MANIFEST))  # killed after the files, before manifest
    assert checkpoint.find_loadable(save)[0] == tag
    checkpoint._prune(save, os.path.basename(torn), keep=1)  # a torn save does not count
    assert checkpoint.check_complete(os.path.join(save, tag)) is None


@pytest.mark.parametrize("damage, problem", [
    (lambda path: os.truncate(path, os.path.getsize(path) // 2), "truncated or changed"),
    (flip_middle_byte, "CRC-32"),
])
def test_damaged_latest_names_the_file_and_falls_back(two_checkpoints, capsys, damage, problem):
    save, tag = two_checkpoints
    damaged = os.path.join(save, tag, "mp_rank_00_model_states.pt")
    damage(damaged)
    assert checkpoint.check_complete(os.path.join(save, tag)).startswith(damaged)
    loaded, _ = checkpoint.find_loadable(save)
    assert loaded < tag
    warning = capsys.readouterr().out
    assert damaged in warning and problem in warning


def test_no_intact_checkpoint_is_one_clear_error(two_checkpoints):
    save, _ = two_checkpoints
    for tag in (t for t in os.listdir(save) if t.startswith("iter_")):
        flip_middle_byte(os.path.join(save, tag, "run_state_rank00000.pt"))
    with pytest.raises(UserError, match=r"no complete checkpoint in .*run_state_rank00000\.pt"):
        checkpoint.find_loadable(save)


# -- a full disk -----------------------------------------------------------------------------

def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(demo_data, tmp_path):
    save = str(tmp_path / "ckpt")
    first = run(single_process() + train_flags(demo_data, str(tmp_path), "--save", save,
                                               "--exit-interval", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {name: open(os.path.join(save, "iter_0000002", name), "rb").read()
              for name in os.listdir(os.path.join(save, "iter_0000002"))}
    # Checkpoint files are > 1 MB; logs and small files still fit.
    full = run(single_process() + train_flags(demo_data, str(tmp_path), "--load", save, "--save",
                                              save, "--exit-interval", "4"), file_limit=10**6)
    assert full.returncode == 2, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "iter_0000004: cannot write the checkpoint (" in errors[0]
    assert "File too large" in errors[0] or "disk full or file too large" in errors[0]
    assert latest_tag(save) == "iter_0000002"
    assert checkpoint.find_loadable(save)[0] == "iter_0000002"
    assert before == {name: open(os.path.join(save, "iter_0000002", name), "rb").read()
                      for name in before}


def test_disk_full_during_preprocessing_leaves_earlier_outputs_intact(demo_data, tmp_path):
    prefix = str(tmp_path / "pool")
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "tools",
                                        "preprocess_data.py"),
           "--input", os.path.join(demo_data.corpus_dir, "target.jsonl"), "--output-prefix",
           prefix, "--tokenizer-model", demo_data.tokenizer_model, "--append-eod",
           "--no-progress"]
    preprocess([os.path.join(demo_data.corpus_dir, "target.jsonl")], prefix,
               demo_data.tokenizer_model, append_eod=True, show_progress=False)
    outputs = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    full = run(cmd, file_limit=4096)
    assert full.returncode == 2
    assert full.stderr.startswith("error: cannot write") and "File too large" in full.stderr
    assert full.stderr.count("\n") == 1
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == outputs


# -- non-finite losses -----------------------------------------------------------------------

def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return True  # non-tensor metadata (paths, versions) may differ


@pytest.mark.parametrize("zero", [
    [],  # the default stage (1)
    # ZeRO-2 reduces each gradient from a backward hook as it is computed: the dropped steps'
    # gradients must not reach its buffers or the saved optimizer state either.
    ["--zero-stage", "2", "--micro-batch-size", "4"],
], ids=["zero1", "zero2"])
def test_nonfinite_losses_stop_with_the_last_good_state_saved(demo_data, tmp_path, zero):
    # lr 1e30: the first step is finite and throws the weights to ~1e30; every later loss is NaN.
    absurd = ["--lr", "1e30", "--lr-warmup-iters", "1", "--global-batch-size", "4", *zero]
    bad_dir, good_dir = tmp_path / "bad", tmp_path / "good"
    bad = run(single_process() + train_flags(demo_data, str(bad_dir), "--save",
                                             str(bad_dir / "ckpt"), "--max-bad-steps", "3",
                                             *absurd))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "error: 3 consecutive non-finite losses at iteration 1")
    log = read_log(str(bad_dir / "log.jsonl"))
    assert [r["consecutive"] for r in log if r["kind"] == "bad_step"] == [1, 2, 3]
    assert [r["iteration"] for r in log if r["kind"] == "checkpoint"] == [1]
    # The same run stopped cleanly after its one good step: the saved states must be identical.
    good = run(single_process() + train_flags(demo_data, str(good_dir), "--save",
                                              str(good_dir / "ckpt"), "--exit-interval", "1",
                                              *absurd))
    assert good.returncode == 0, good.stderr[-3000:]
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        saved = [torch.load(d / "ckpt" / "iter_0000001" / name, weights_only=False)
                 for d in (bad_dir, good_dir)]
        assert same_tensors(*saved), name
    state = torch.load(bad_dir / "ckpt" / "iter_0000001" / "run_state_rank00000.pt",
                       weights_only=False)
    # One good block, and the two bad blocks skipped before the third bad step stopped the run.
    assert state["iteration"] == 1 and state["consumed"] == 3 * 4


def _steps_with_and_without_a_bad_one(argv: list[str]) -> dict:
    """One DP rank of a ZeRO-2 run: a learner steps good, NaN, good; a twin steps good, good.
    Returns whether their weights, fp32 master partitions and Adam moments are bit-identical."""
    from blade_mega.engine.model_engine import split_microbatches
    from blade_mega.testing import in_rank, trainer_in_rank

    def batch(step: int, poisoned: bool = False):
        rank = torch.distributed.get_rank()
        samples = torch.randint(0, 2000, (4, 33),
                                generator=torch.Generator().manual_seed(100 * step + rank))
        weights = torch.ones(4, 32)
        if poisoned:
            weights[0, 5] = float("nan")  # as an overflow would: NaN loss, NaN gradients
        return split_microbatches(samples, 4, weights)

    with in_rank(timeout_minutes=2.0):
        outcomes = {}
        for zero in ("1", "2"):
            outcome, learners = {}, {}
            for name, plan in {"with_bad": [(0, False), (1, True), (1, False)],
                               "straight": [(0, False), (1, False)]}.items():
                trainer = trainer_in_rank(argv + ["--zero-stage", zero])
                outcome[f"{name}_finite"] = [
                    trainer.learner.train_step(batch(step, bad), 8 * 32, 1e-2)[1]
                    for step, bad in plan]
                learners[name] = trainer
            a, b = (learners[n].learner for n in ("with_bad", "straight"))
            outcome["weights"] = all(torch.equal(x, y) for x, y in zip(a.module.parameters(),
                                                                      b.module.parameters()))
            fp32 = [e.engine.optimizer.single_partition_of_fp32_groups for e in (a, b)]
            outcome["fp32_partitions"] = len(fp32[0]) > 0 and all(
                torch.equal(x, y) for x, y in zip(*fp32))
            states = [list(e.engine.optimizer.optimizer.state.values()) for e in (a, b)]
            outcome["adam_moments"] = len(states[0]) > 0 and all(
                torch.equal(x[k], y[k]) for x, y in zip(*states) for k in ("exp_avg", "exp_avg_sq"))
            for trainer in learners.values():
                trainer.close()
            outcomes[zero] = outcome
    return outcomes


def test_dp2_a_dropped_step_leaves_no_trace_in_the_next_good_one(demo_data):
    """ZeRO-2 reduce-scatters gradients from backward hooks into its own buffers: a NaN step
    must be dropped there too, so a good step after it equals the good step without it (the
    next step used to fail: "output_layer.weight has already been reduced"). ZeRO-1 alike."""
    from blade_mega.testing import run_distributed

    argv = ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            "--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "4",
            "--global-batch-size", "8", "--eval-interval", "0"]
    for rank in run_distributed(_steps_with_and_without_a_bad_one, 2, argv, timeout=300):
        for zero, outcome in rank.items():
            assert outcome["with_bad_finite"] == [True, False, True], zero
            assert outcome["straight_finite"] == [True, True], zero
            assert (outcome["weights"], outcome["fp32_partitions"], outcome["adam_moments"]) == \
                (True, True, True), (zero, outcome)
