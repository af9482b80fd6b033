"""Run Megatron-Core on CPU (gloo) when no CUDA device exists.

Megatron-Core names the CUDA device in a few places that the CPU path reaches: the pipeline
schedules allocate a token counter on ``"cuda"``, the p2p layer and rotary embeddings ask
``torch.cuda.current_device()`` (p2p also ``torch.cuda.synchronize()``), and the model-parallel RNG
tracker (and activation recompute, which saves and restores it) keeps CUDA generator states.
``install()`` redirects exactly those to the CPU.  It does nothing when CUDA is available, so the
GPU path (nccl, fused kernels, the stock RNG tracker) is never touched.  Everything CPU-specific
lives here so that it can be tested and removed in one place.
"""

from __future__ import annotations

import contextlib
import types

import torch

_INSTALLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


class _CudaOnCpu:
    """Stand-in for ``torch.cuda`` inside the patched Megatron modules."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args, **_kwargs) -> None:
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cpu_device(device):
    if device is None:
        return None
    if str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


def _on_cpu(factory):
    def make(*args, device=None, **kwargs):
        return factory(*args, device=_cpu_device(device), **kwargs)

    return make


class _TorchOnCpu(types.ModuleType):
    """A view of ``torch`` whose tensor factories map a CUDA device to the CPU.

    It replaces the name ``torch`` only inside the Megatron modules that hard-code the device.
    """

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange"):
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Megatron's named RNG-state tracker, holding CPU generator states.

    Same interface as ``megatron.core.tensor_parallel.random.CudaRNGStatesTracker``
    (``reset/get_states/set_states/add/fork``), so checkpointing code treats both alike.
    """

    def __init__(self, *_args, **_kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _no_cuda_rng_state(*_args, **_kwargs) -> None:
    return None


def install() -> bool:
    """Patch Megatron-Core for CPU execution. Returns True if anything was patched.

    Must run before the first call to ``model_parallel_cuda_manual_seed``.
    """
    global _INSTALLED
    if cuda_available():
        return False
    if _INSTALLED:
        return True
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as tp_random

    torch_on_cpu = _TorchOnCpu()
    for module in (schedules, p2p_communication, rotary_pos_embedding):
        module.torch = torch_on_cpu
    tp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Activation recompute saves and restores the CUDA generator beside the CPU one and the
    # tracker's states; without CUDA the latter two are all there is.
    tp_random._get_cuda_rng_state = _no_cuda_rng_state
    tp_random._set_cuda_rng_state = _no_cuda_rng_state
    tp_random.initialize_rng_tracker(force_reset=True)
    _INSTALLED = True
    return True
