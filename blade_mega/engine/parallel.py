"""Process discovery, ``torch.distributed`` start-up and the TP/PP/DP layout.

Ranks come from whichever launcher started us: torchrun and the deepspeed launcher set
``RANK``/``WORLD_SIZE``; Slurm's ``srun`` sets ``SLURM_PROCID``/``SLURM_NTASKS``; mpiexec (MPICH,
Open MPI) sets ``PMI_RANK``/``OMPI_COMM_WORLD_RANK``.  They are normalised to the torchrun
variables, then DeepSpeed starts the process group (gloo on CPU, nccl on GPUs) and
``megatron.core.parallel_state`` builds the groups.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from blade_mega.engine.cpu_compat import cuda_available
from blade_mega.errors import UserError

_LAUNCHER_VARS = (
    # (launcher, rank, world size, local rank)
    ("torchrun/deepspeed", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class ProcessInfo:
    launcher: str
    rank: int
    world_size: int
    local_rank: int


def discover_process(env=os.environ) -> ProcessInfo:
    """Which launcher started this process, and where it sits. A lone process is rank 0 of 1."""
    for launcher, rank, world, local in _LAUNCHER_VARS:
        if rank in env and world in env:
            return ProcessInfo(launcher, int(env[rank]), int(env[world]), int(env.get(local, 0)))
    return ProcessInfo("single", 0, 1, 0)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @staticmethod
    def from_world(world_size: int, tp: int, pp: int) -> "Layout":
        if tp < 1 or pp < 1 or world_size % (tp * pp):
            raise UserError(
                f"world size {world_size} is not divisible by tensor-model-parallel-size {tp} x "
                f"pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} ranks or change "
                "the parallel sizes")
        return Layout(tp, pp, world_size // (tp * pp))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The rendezvous store of this process, kept from run to run (see _run_store), and its key.
_store: "tuple[tuple, torch.distributed.Store] | None" = None
# How many process groups init_distributed has started in this process: each run's keys live
# under their own prefix in the store.
_runs = 0


def _run_store(proc: ProcessInfo, timeout: datetime.timedelta) -> torch.distributed.Store:
    """The store this run's process group meets on: the process's one rendezvous store (what
    ``env://`` makes: a TCPStore on MASTER_ADDR:MASTER_PORT, served by rank 0 or the torchrun
    agent), with this run's keys under a prefix of their own.

    A second ``pretrain`` in the same process (a notebook, a sweep driver) must not meet the
    first one's keys: gloo would read a finished run's peer addresses and wait for them forever.
    Nor may rank 0 close its store server between runs: a rank that finished run n first and
    starts run n+1 would connect to the closing server of run n.  Keeping one store for the
    process and numbering the runs does both; every rank counts its runs alike."""
    global _store, _runs
    key = (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], proc.rank, proc.world_size)
    if _store is None or _store[0] != key:
        store, _, _ = next(torch.distributed.rendezvous("env://", timeout=timeout))
        _store = (key, store)
    _store[1].set_timeout(timeout)
    _runs += 1
    return torch.distributed.PrefixStore(f"blade_mega/run{_runs}", _store[1])


def _nccl_device(proc: ProcessInfo) -> dict:
    """``device_id`` for NCCL, as DeepSpeed's own init passes it: binding the device makes later
    ``new_group`` calls (Megatron makes many) use ncclCommSplit. Not for one rank (no peer), and
    not on torch 2.6.x-2.7.0, where it hangs (pytorch#153960)."""
    from packaging.version import Version

    version = Version(torch.__version__.split("+")[0])
    if (not cuda_available() or proc.world_size == 1
            or Version("2.6.0") < version < Version("2.7.1")):
        return {}
    return {"device_id": torch.device("cuda", torch.cuda.current_device())}


def init_distributed(tp: int, pp: int, timeout_minutes: float = 10.0) -> tuple[ProcessInfo, Layout]:
    """Start the process group and Megatron's parallel groups. Collectives time out, so a dead
    rank ends the job instead of hanging it.  ``shutdown()`` undoes it, after which it may be
    called again in the same process."""
    import deepspeed

    proc = discover_process()
    layout = Layout.from_world(proc.world_size, tp, pp)
    os.environ.update(RANK=str(proc.rank), WORLD_SIZE=str(proc.world_size),
                      LOCAL_RANK=str(proc.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # A lone process has nobody to meet: any free port, so two single runs on a host coexist.
    os.environ.setdefault("MASTER_PORT", str(_free_port()) if proc.world_size == 1 else "29500")
    if cuda_available():
        torch.cuda.set_device(proc.local_rank % torch.cuda.device_count())
    backend = "nccl" if cuda_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend, store=_run_store(proc, timeout), rank=proc.rank,
            world_size=proc.world_size, timeout=timeout, **_nccl_device(proc))
        if proc.world_size > 1:  # heartbeats, and one line per error (blade_mega/engine/peers.py)
            from blade_mega import errors
            from blade_mega.engine.peers import Peers

            peers = Peers(_store[1], f"blade_mega/run{_runs}/peers", proc.rank, proc.world_size,
                          timeout_minutes)
            peers.start()
            errors.set_peers(peers)
    # DeepSpeed finds the process group up and only sets up its communication backend.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        # Megatron's groups get their own timeout (30 min unless told): pass ours down too.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=timeout_minutes)
    return proc, layout


def _holds_group(value) -> bool:
    group = torch.distributed.ProcessGroup
    if isinstance(value, group):
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple, set)) and any(
        isinstance(v, group) or (isinstance(v, (list, tuple)) and
                                 any(isinstance(w, group) for w in v))
        for v in value)


def _drop_megatron_groups() -> None:
    """Clear every group handle ``parallel_state`` still holds after ``destroy_model_parallel``
    (Megatron-Core 0.16 forgets ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`` and its ``_GLOO``
    twin), so that the finished run's groups can be freed."""
    for name, value in vars(parallel_state).copy().items():
        if name.startswith("_") and name.isupper() and _holds_group(value):
            setattr(parallel_state, name, {} if isinstance(value, dict) else None)


def _clear_megatron_caches() -> None:
    """Empty the ``functools.lru_cache`` s of Megatron-Core's classes and functions.

    ``RotaryEmbedding.forward`` is one: its cache keeps the module (``self``) alive after the
    run, and with it the module's context-parallel group."""
    for name, module in sys.modules.copy().items():  # copy(): other threads may import
        if not name.startswith("megatron.core") or module is None:
            continue
        for value in vars(module).copy().values():
            members = (list(vars(value).values()) if isinstance(value, type)
                       and value.__module__ == name else [value])
            for member in members:
                try:
                    member = getattr(member, "__func__", member)  # staticmethod/classmethod
                    if callable(getattr(member, "cache_clear", None)):
                        member.cache_clear()
                except Exception:  # noqa: BLE001 - a lazy proxy's __getattr__; not a cache
                    continue


def shutdown() -> None:
    """Tear down Megatron's groups and the process group, and let go of everything that held
    them, so that ``init_distributed`` can start again in this process."""
    from blade_mega import errors

    errors.stop_heartbeat()  # its reports still serve the error that may be ending this run
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _drop_megatron_groups()
    _clear_megatron_caches()
    if torch.distributed.is_initialized():
        from deepspeed import comm as ds_comm

        if ds_comm.is_initialized():  # DeepSpeed's way also drops its own handles to the groups
            ds_comm.destroy_process_group()
        else:
            torch.distributed.destroy_process_group()
    gc.collect()  # the run's objects sit in reference cycles, holding their groups


class MegatronMPU:
    """The ``mpu`` object DeepSpeed asks for, answered from ``megatron.core.parallel_state``.

    DeepSpeed uses it to shard ZeRO state over the data-parallel group only, and to know which
    ranks hold replicas of the same model-parallel shard.
    """

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    @staticmethod
    def get_model_parallel_rank() -> int:
        return torch.distributed.get_rank(parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return torch.distributed.get_world_size(parallel_state.get_model_parallel_group())

    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
