"""A checkpoint's model weights outside training, in one process and without a process group.

``read_checkpoint`` gathers every tensor- and pipeline-parallel shard of a checkpoint (the
DeepSpeed ``mp_rank_XX_model_states.pt`` files, one per model-parallel rank) into one full state
dict under the names a single-stage, TP1 ``GPTModel`` uses; ``shard_for`` cuts such a full state
dict into the shard of any other layout. Export (tools/export_hf.py) reads the full model;
evaluation (tools/evaluate.py) loads it into whatever layout it runs on.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from blade_mega.config import RunConfig, from_checkpoint
from blade_mega.engine.model import ModelSize, _global_name, gated_tp_order
from blade_mega.errors import UserError
from blade_mega.train import checkpoint, safe_load

# Which dimension Megatron-Core's parallel layers split over TP ranks; the rest is replicated.
# ColumnParallelLinear / VocabParallelEmbedding split their output rows, RowParallelLinear its
# input columns (its bias is replicated).
_ROWS = re.compile(r"(^embedding\.word_embeddings\.weight|^output_layer\.weight"
                   r"|linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias))$")
_COLUMNS = re.compile(r"(linear_proj|linear_fc2)\.weight$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def partition_dim(name: str):
    """0 or 1 for a TP-split tensor, None for a replicated one."""
    if _ROWS.search(name):
        return 0
    if _COLUMNS.search(name):
        return 1
    return None


@dataclass
class Checkpoint:
    """One checkpoint's full model: Megatron names -> tensors, plus what it was trained with."""
    directory: str            # the iter_XXXXXXX directory read
    state: dict               # full (unsharded) tensors, global layer numbers
    size: ModelSize
    vocab_size: int           # the tokenizer's; state holds padded_vocab_size rows
    padded_vocab_size: int
    config: RunConfig         # the training run's configuration
    tp: int
    pp: int


def _model_parallel_coords(tp: int, pp: int, dp: int) -> list[tuple[int, int]]:
    """(tp_rank, pp_rank) of model-parallel rank 0, 1, ... (the mp_rank_XX files), from
    Megatron's own rank layout: DeepSpeed numbers the files by rank in the model-parallel group."""
    from megatron.core.parallel_state import RankGenerator

    ranks = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    position = {}
    for kind in ("tp", "pp"):
        for group in ranks.get_ranks(kind):
            for index, rank in enumerate(group):
                position.setdefault(rank, {})[kind] = index
    model_parallel_group = next(g for g in ranks.get_ranks("tp-pp") if 0 in g)
    return [(position[r]["tp"], position[r]["pp"]) for r in model_parallel_group]


def _load(path: str, trust: bool) -> dict:
    try:
        return safe_load.load_file(path, trust)
    except UserError:
        raise  # refused: names the file and what it holds
    except Exception as err:  # a corrupt file raises many types
        raise UserError(f"{path}: unreadable ({type(err).__name__}); the checkpoint is damaged, "
                        "load an earlier one") from None


def _run_config(directory: str, trust: bool) -> tuple[RunConfig, dict]:
    state = _load(os.path.join(directory, "run_state_rank00000.pt"), trust)
    return from_checkpoint(state), state


def _size_of(config: RunConfig, run_state: dict) -> ModelSize:
    if "model" in run_state:  # the architecture as trained, whatever the presets say today
        return ModelSize(**run_state["model"])
    return config.model.size


def read_checkpoint(load: str, trust: bool = False) -> Checkpoint:
    """The newest complete checkpoint under ``load`` (a --save directory or one iter_ of it),
    its files read as data (``trust``: beyond data too, train/safe_load.py)."""
    trust = safe_load.trusted(trust)
    load = os.path.abspath(load)
    if os.path.isfile(os.path.join(load, checkpoint.MANIFEST)):
        root, tag = os.path.split(load)
        problem = checkpoint.check_complete(load)
        if problem is not None:
            raise UserError(f"{problem}; pick a complete checkpoint")
        with open(os.path.join(load, checkpoint.MANIFEST)) as f:
            manifest = json.load(f)
        checkpoint.note_format(load, manifest)
    elif os.path.isdir(load):
        tag, manifest = checkpoint.find_loadable(load)
        root = load
    else:
        raise UserError(f"{load}: no such checkpoint directory; pass a --save directory or one "
                        "of its iter_XXXXXXX")
    directory = os.path.join(root, tag)
    tp, pp, dp = manifest["tp"], manifest["pp"], manifest["dp"]
    config, run_state = _run_config(directory, trust)
    size = _size_of(config, run_state)
    coords = _model_parallel_coords(tp, pp, dp)
    stages: list[list[dict]] = [[None] * tp for _ in range(pp)]
    for mp_rank, (tp_rank, pp_rank) in enumerate(coords):
        path = os.path.join(directory, f"mp_rank_{mp_rank:02d}_model_states.pt")
        module = _load(path, trust)["module"]
        stages[pp_rank][tp_rank] = {k: v for k, v in module.items()
                                    if not k.endswith("_extra_state")}
    state: dict = {}
    offset = 0
    for pp_rank, shards in enumerate(stages):
        layers = {int(m.group(1)) for name in shards[0] if (m := _LAYER.match(name))}
        for name in shards[0]:
            state[_global_name(name, offset)] = _merge(name, [s[name] for s in shards], size)
        offset += len(layers)
    if offset != size.num_layers:
        raise UserError(f"{directory}: holds {offset} layers, its run args say "
                        f"{size.num_layers}; the files do not belong together")
    vocab = run_state.get("vocab_size") or _vocab_of(config)
    padded = state["embedding.word_embeddings.weight"].shape[0]
    return Checkpoint(directory, state, size, vocab, padded, config, tp, pp)


def _vocab_of(config: RunConfig) -> int:
    model = config.model
    if model.tokenizer_model and os.path.isfile(model.tokenizer_model):
        from blade_mega.data.tokenizer import Tokenizer

        return Tokenizer.load(model.tokenizer_model).vocab_size
    if model.vocab_size:
        return model.vocab_size
    raise UserError(f"{model.tokenizer_model}: the run's tokenizer is gone, so its vocabulary "
                    "size is unknown; pass --tokenizer-model")


def _merge(name: str, shards: list[torch.Tensor], size: ModelSize) -> torch.Tensor:
    dim = partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if size.swiglu and ".linear_fc1." in name:  # each shard is [gate_r; up_r]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=dim)


def shard_for(full: Checkpoint, local_names, tp_rank: int, tp_size: int,
              layer_offset: int) -> dict:
    """This rank's state dict: ``local_names`` are its module's parameter names (local layer
    numbers on a later pipeline stage, from ``layer_offset``)."""
    out = {}
    for name in local_names:
        if name.endswith("_extra_state"):
            continue
        tensor = full.state[_global_name(name, layer_offset)]
        dim = partition_dim(name)
        if dim is not None and tp_size > 1:
            if full.size.swiglu and ".linear_fc1." in name:
                tensor = gated_tp_order(tensor, tp_size)
            tensor = tensor.chunk(tp_size, dim=dim)[tp_rank]
        out[name] = tensor.contiguous()
    return out
