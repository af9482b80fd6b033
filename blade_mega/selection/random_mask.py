"""``--selection random``: keep a uniformly random share of each candidate block (sample level)
or of each micro-batch's tokens (token level), at the same keep ratio as the scoring methods.

The control a sceptic asks for first: does *any* masking help, or only the scored kind? It
scores nothing (no model passes beyond training) and keeps no sidecar, so its blocks are read
in order. Its choices are a function of (seed, step) alone, so a resumed run keeps the same.
"""

from __future__ import annotations

import numpy as np
import torch

from blade_mega.selection.base import SelectionContext, SelectionHook, TrainBatch
from blade_mega.selection.methods import kept_tokens_per_microbatch

_STREAM = 0x5EED_0A5C  # keeps this generator apart from the block sampler's


def random_keep(seed: int, step: int, block: int, k: int) -> np.ndarray:
    """Positions of ``k`` of ``block`` candidates, uniformly at random, in block order."""
    rng = np.random.default_rng([seed, step, _STREAM])
    return np.sort(rng.choice(block, size=k, replace=False))


def random_token_mask(seed: int, step: int, rows: int, tokens: int, micro_batch: int,
                      k: int) -> torch.Tensor:
    """[rows, tokens] 0/1 mask keeping ``k`` random tokens of every micro-batch of
    ``micro_batch`` rows (rows: the global batch; each micro-batch gets its own draw)."""
    rng = np.random.default_rng([seed, step, _STREAM])
    mask = np.zeros((rows, tokens), dtype=np.float32)
    for begin in range(0, rows, micro_batch):
        flat = mask[begin:begin + micro_batch].reshape(-1)
        flat[rng.choice(flat.size, size=min(k, flat.size), replace=False)] = 1.0
        mask[begin:begin + micro_batch] = flat.reshape(-1, tokens)
    return torch.from_numpy(mask)


class RandomSelector(SelectionHook):
    def __init__(self, ctx: SelectionContext):
        super().__init__(ctx)
        self.token_level = self.config.selection.token_level
        self.block = None if self.token_level else self.candidate_block()
        self.seed = self.config.data.seed

    def block_size(self, step: int) -> int:
        return self.ctx.global_batch if self.token_level else self.block

    def select(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        if self.token_level:
            return self._mask_tokens(step, block_ids)
        keep = random_keep(self.seed, step, len(block_ids), self.ctx.global_batch)
        kept = np.zeros(len(block_ids), dtype=np.float64)
        kept[keep] = 1.0
        stats = {"kept_fraction": float(kept.mean()),
                 **self.ctx.record.noise_stats(block_ids, kept)}
        return self.train_on(block_ids, keep, stats)

    def _mask_tokens(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        """Every DP rank draws the whole batch's masks (the same generator), then takes its
        rows: the masks do not depend on the layout."""
        config = self.config
        micro, k = config.data.micro_batch_size, kept_tokens_per_microbatch(config)
        masks = random_token_mask(self.seed, step, len(block_ids), config.data.seq_length,
                                  micro, k)
        per_rank = len(block_ids) // self.groups.dp_size
        first = self.groups.dp_rank * per_rank
        ids = self.local_share(block_ids)
        samples = self.read(ids)
        kept_share = masks.mean(1).double().numpy()
        stats = {"kept_fraction": float(kept_share.mean()),
                 **self.ctx.record.noise_stats(block_ids, kept_share)}
        normaliser = float((self.ctx.global_batch // micro) * k)
        return TrainBatch(ids, samples, masks[first:first + per_rank], normaliser,
                          candidates=block_ids, stats=stats)
