"""What the loop builds for a selection hook: sidecars, demo noise labels, held-out losses."""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import torch

from blade_mega.data.sample_index import SampleIndex
from blade_mega.engine import comm_device
from blade_mega.data.sidecar import Sidecar
from blade_mega.errors import UserError


def sidecars_for(samples: SampleIndex) -> list[Sidecar]:
    """One (empty, sparse) sidecar per dataset of the blend."""
    return [Sidecar(samples.num_documents(part)) for part in range(len(samples.datasets))]


def load_noise_labels(path: Optional[str], windows: SampleIndex
                      ) -> tuple[Optional[np.ndarray], tuple[str, ...]]:
    """Per-document noise type codes of the first dataset, from a preprocess ``meta.jsonl``."""
    if not path:
        return None, ()
    num_docs = windows.num_documents(0)
    names: list[str] = []
    codes = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                try:
                    label = json.loads(line).get("noise", "clean")
                except ValueError:
                    raise UserError(f"{path}:{number}: invalid JSON; regenerate it with "
                                    "tools/preprocess_data.py --meta-keys id,noise") from None
                if label not in names:
                    names.append(label)
                codes.append(names.index(label))
    except OSError as err:
        raise UserError(f"{path}: cannot read noise labels ({err.strerror}); check --noise-labels")
    if len(codes) != num_docs:
        raise UserError(f"{path}: {len(codes)} labels for {num_docs} documents of "
                        f"{windows.prefixes[0]}; use the meta.jsonl written with that dataset")
    return np.asarray(codes, dtype=np.int16), tuple(names)


def eval_loss(learner, windows: SampleIndex, count: int, groups) -> float:
    """Mean token loss over a fixed set of ``count`` samples (the same at every evaluation)."""
    per_rank_unit = groups.dp_size * learner.micro_batch_size
    count = max(per_rank_unit, (count // per_rank_unit) * per_rank_unit)
    ids = windows.ordered_ids(0, count)
    samples = windows.read(groups.share(ids))
    means = learner.sample_losses(samples).double()  # equal-length samples: mean of means
    totals = torch.tensor([means.sum().item(), float(means.numel())], dtype=torch.float64,
                          device=comm_device())
    torch.distributed.all_reduce(totals, group=groups.dp)
    return float(totals[0] / totals[1])
