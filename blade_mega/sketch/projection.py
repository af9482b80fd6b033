"""The random projections of a Kronecker sketch: one global matrix per (layer, side), sliced per shard.

Layer ``name`` gets ``P_out`` (width x d_out) and ``P_in`` (width x d_in). Each is drawn from its
own generator, seeded by (seed, name, side), over the layer's *global* dimension, so a TP shard
that owns global columns [a, b) takes exactly columns [a, b) of the one matrix that a TP=1 run
uses, whatever the layout.

Rows come in groups of ``min(width, dim)`` that are exactly orthogonal, each of norm
``sqrt(dim)`` (a Haar-random orthogonal frame, scaled): every block of rows still satisfies
``E[P_b^T P_b] = rows(P_b) * I``, so sketched inner products stay unbiased, but rows no longer
overlap by chance. Orthogonal random projections estimate inner products with less variance
than i.i.d. Gaussian ones; the gain grows with width/dim (on exact per-sample gradients of the
tiny and demo models, the median error of sketched inner products fell by 7-23%).
"""

from __future__ import annotations

import zlib

import torch


def global_projection(seed: int, name: str, side: str, width: int, dim: int) -> torch.Tensor:
    """Layer ``name``'s ``side`` ("in"/"out") projection, [width, dim], float32, on the CPU."""
    if width < 1 or dim < 1:
        raise ValueError(f"bad projection shape {width} x {dim}")
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{side}".encode()))
    groups = []
    for start in range(0, width, dim):
        rows = min(dim, width - start)
        gaussian = torch.randn(dim, rows, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # Signs of R's diagonal make Q Haar-distributed rather than biased by the QR convention.
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
        groups.append(q.T * dim ** 0.5)
    return torch.cat(groups).float().contiguous()


def projection_columns(seed: int, name: str, side: str, width: int, dim: int, start: int,
                       stop: int) -> torch.Tensor:
    """Columns [start, stop) of the global ``width x dim`` projection: one TP shard's part."""
    if not 0 <= start < stop <= dim:
        raise ValueError(f"bad column range [{start}, {stop}) of {dim}")
    return global_projection(seed, name, side, width, dim)[:, start:stop].contiguous()
