"""cpu_compat: which Megatron modules install() patches (and that a CUDA machine gets none), the
CPU RNG tracker's fork semantics, and that the CPU attention is plain causal softmax attention."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from blade_mega.engine.cpu_compat import CpuRNGStatesTracker
from blade_mega.testing import free_port

PATCHED_MODULES = ["megatron.core.models.common.embeddings.rotary_pos_embedding",
                   "megatron.core.pipeline_parallel.p2p_communication",
                   "megatron.core.pipeline_parallel.schedules"]

# Runs in a fresh interpreter, so nothing was installed before: install() first while CUDA is
# reported available (must change nothing), then on this CPU machine; then the CPU attention on
# fixed inputs, saved for the test to check against its own attention.
SCRIPT = r"""
import json, sys, torch
import megatron.core.pipeline_parallel  # import everything install() may touch, before it runs
import megatron.core.models.gpt
from megatron.core.tensor_parallel import random as tp_random
from blade_mega.engine import cpu_compat

def snapshot():
    names = {name: id(vars(mod).get("torch")) for name, mod in list(sys.modules.items())
             if name.startswith("megatron") and mod is not None and "torch" in vars(mod)}
    return names, tp_random.CudaRNGStatesTracker

def changed(before):
    names, tracker = snapshot()
    return {"modules": sorted(n for n, i in names.items() if before[0].get(n) != i),
            "tracker_class": tracker.__name__ if tracker is not before[1] else None}

report = {}
before = snapshot()
real_is_available = torch.cuda.is_available
torch.cuda.is_available = lambda: True
report["with_cuda"] = {"returned": cpu_compat.install(), **changed(before)}
torch.cuda.is_available = real_is_available
report["on_cpu"] = {"returned": cpu_compat.install(), **changed(before),
                    "tracker": type(tp_random.get_cuda_rng_tracker()).__name__}

from datetime import timedelta
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from blade_mega.engine.model import CpuDotProductAttention

torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}",
                                     rank=0, world_size=1, timeout=timedelta(seconds=60))
parallel_state.initialize_model_parallel(1, 1)
tensor_parallel.model_parallel_cuda_manual_seed(0)
config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                           num_query_groups=2, attention_dropout=0.0,
                           use_cpu_initialization=True, masked_softmax_fusion=False)
gen = torch.Generator().manual_seed(0)
s, b = 5, 2
q = torch.randn(s, b, 4, 8, generator=gen)
k = torch.randn(s, b, 2, 8, generator=gen)  # 2 query groups: each serves 2 heads
v = torch.randn(s, b, 2, 8, generator=gen)
padding = torch.zeros(b, 1, s, s, dtype=torch.bool)
padding[1, :, :, 3:] = True  # sample 1: keys 3, 4 masked out (True = masked, Megatron's way)
causal = CpuDotProductAttention(config, 1, AttnMaskType.causal, "self")
padded = CpuDotProductAttention(config, 1, AttnMaskType.padding, "self")
torch.save({"q": q, "k": k, "v": v, "padding": padding,
            "causal": causal(q, k, v, None), "padded": padded(q, k, v, padding)}, sys.argv[1])
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> tuple[dict, dict]:
    out = str(tmp_path_factory.mktemp("cpu_compat") / "attention.pt")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", SCRIPT, out, str(free_port())], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, torch.load(out)


def test_install_is_a_no_op_when_cuda_is_available(fresh_process):
    report, _ = fresh_process
    assert report["with_cuda"] == {"returned": False, "modules": [], "tracker_class": None}


def test_install_patches_exactly_the_listed_megatron_modules_on_cpu(fresh_process):
    report, _ = fresh_process
    assert report["on_cpu"]["returned"] is True
    assert report["on_cpu"]["modules"] == PATCHED_MODULES
    assert report["on_cpu"]["tracker_class"] == "CpuRNGStatesTracker"
    assert report["on_cpu"]["tracker"] == "CpuRNGStatesTracker"


def reference_attention(q, k, v, masked):
    """[s, b, heads, dim] inputs, ``masked[b, i, j]`` True where query i may not see key j;
    returns [s, b, heads * dim]. Loops, no library attention."""
    s, b, heads, dim = q.shape
    per_group = heads // k.size(2)
    out = torch.zeros(s, b, heads, dim, dtype=torch.float64)
    for batch in range(b):
        for head in range(heads):
            group = head // per_group
            for i in range(s):
                scores = [float(q[i, batch, head] @ k[j, batch, group]) / math.sqrt(dim)
                          if not masked[batch, i, j] else -math.inf for j in range(s)]
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                total = sum(weights)
                for j in range(s):
                    out[i, batch, head] += weights[j] / total * v[j, batch, group].double()
    return out.reshape(s, b, heads * dim).float()


def test_cpu_attention_is_causal_softmax_attention(fresh_process):
    _, saved = fresh_process
    s, b = saved["q"].shape[:2]
    future = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, s, s)
    expected = reference_attention(saved["q"], saved["k"], saved["v"], future)
    assert torch.allclose(saved["causal"], expected, atol=1e-5)


def test_cpu_attention_honours_an_explicit_mask(fresh_process):
    _, saved = fresh_process
    expected = reference_attention(saved["q"], saved["k"], saved["v"], saved["padding"][:, 0])
    assert torch.allclose(saved["padded"], expected, atol=1e-5)
    assert not torch.allclose(saved["padded"][:, 1], saved["causal"][:, 1], atol=1e-3)


# -- the RNG tracker --------------------------------------------------------------------------

def test_fork_draws_from_the_named_stream_and_advances_it():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    expected = torch.randn(6, generator=torch.Generator().manual_seed(7))
    with tracker.fork():
        first = torch.randn(3)
    with tracker.fork():
        second = torch.randn(3)  # continues where the first fork stopped
    assert torch.equal(torch.cat([first, second]), expected)


def test_fork_restores_the_outer_state():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(99)
    expected = torch.randn(4)
    torch.manual_seed(99)
    with tracker.fork():
        torch.randn(10)
    assert torch.equal(torch.randn(4), expected)


def test_fork_restores_the_outer_state_after_an_exception():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    outer = torch.get_rng_state()
    with pytest.raises(ValueError), tracker.fork():
        torch.randn(5)
        raise ValueError
    assert torch.equal(torch.get_rng_state(), outer)


def test_get_and_set_states_round_trip():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    tracker.add("data-rng", 8)
    saved = tracker.get_states()
    with tracker.fork():
        before = torch.randn(4)
    with tracker.fork("data-rng"):
        data_before = torch.randn(4)
    restored = CpuRNGStatesTracker()
    restored.set_states(saved)
    with restored.fork():
        assert torch.equal(torch.randn(4), before)
    with restored.fork("data-rng"):
        assert torch.equal(torch.randn(4), data_before)
    # get_states hands out copies: drawing did not change what was saved.
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.randn(4), before)


def test_tracker_rejects_reused_seeds_names_and_unknown_forks():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(RuntimeError, match="seed 1 already exists"):
        tracker.add("b", 1)
    with pytest.raises(RuntimeError, match="rng state a already exists"):
        tracker.add("a", 2)
    with pytest.raises(RuntimeError, match="not added"), tracker.fork("missing"):
        pass
    assert tracker.is_initialized()
    tracker.reset()
    assert not tracker.is_initialized()
