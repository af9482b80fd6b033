"""Run a function on N real gloo ranks from inside one pytest (or bench) process.

Each rank is a spawned process with the torchrun environment variables set, so the code under
test discovers its rank exactly as in a real launch.  A failure on any rank re-raises here with
that rank's traceback; a hang ends at ``timeout`` with the ranks killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_module
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(fn, rank: int, world_size: int, port: int, results, args, kwargs) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    import warnings

    import torch

    # OMP_NUM_THREADS only takes effect if torch is not imported yet, but unpickling ``fn``
    # imports its module first (test modules import torch). Set the count itself, so every rank
    # of every call runs with the same intra-op threads: CPU kernels such as LayerNorm's backward
    # sum per-thread partials, so their last bits depend on it (a resumed half run with another
    # count than the first half drifts by float ulps).
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        results.put((rank, True, fn(*args, **kwargs)))
    except BaseException:  # report every failure, SystemExit included
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 600,
                    **kwargs) -> list[Any]:
    """``fn(*args, **kwargs)`` on ranks 0..world_size-1; returns their results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry,
                         args=(fn, rank, world_size, port, results, args, kwargs), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue_module.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(outcomes))} "
                                   f"did not finish within {timeout} s") from None
            outcomes[rank] = (ok, value)
            if not ok:
                break  # the others may now hang in a collective
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outcomes) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    if failed:
        rank = min(failed)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{failed[rank]}")
    return [outcomes[rank][1] for rank in range(world_size)]


@contextlib.contextmanager
def in_rank(tp: int = 1, pp: int = 1, timeout_minutes: float = 10.0):
    """Inside a rank of ``run_distributed``: CPU patches, the process group and Megatron's groups
    for ``tp`` x ``pp`` for the block's duration, then torn down. Yields the layout."""
    from blade_mega.engine import cpu_compat, parallel

    cpu_compat.install()
    _, layout = parallel.init_distributed(tp, pp, timeout_minutes)
    try:
        yield layout
    finally:
        parallel.shutdown()


def pretrain_rank(argv: list[str]) -> list[dict]:
    """One rank of ``blade-pretrain argv``; rank 0 returns the run's JSON log records."""
    import json

    from blade_mega.config import parse_config
    from blade_mega.pretrain import pretrain

    config = parse_config(argv)
    pretrain(config)
    if os.environ.get("RANK", "0") != "0" or not config.log.log_file:
        return []
    with open(config.log.log_file) as f:
        return [json.loads(line) for line in f]


def trainer_in_rank(argv: list[str], tp: int = 1, pp: int = 1):
    """A built ``Trainer`` (learner, data, hook) inside a rank whose process group is up, with
    Megatron's groups (re)made for ``tp`` x ``pp``: for tests that drive the hook directly."""
    import torch
    from megatron.core import parallel_state

    from blade_mega.config import parse_config
    from blade_mega.engine.parallel import Layout
    from blade_mega.train.trainer import Trainer

    current = ((parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
               if parallel_state.model_parallel_is_initialized() else None)
    if current != (tp, pp):
        if current is not None:
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
    config = parse_config(argv + ["--tensor-model-parallel-size", str(tp),
                                  "--pipeline-model-parallel-size", str(pp)])
    return Trainer(config, Layout.from_world(torch.distributed.get_world_size(), tp, pp))
