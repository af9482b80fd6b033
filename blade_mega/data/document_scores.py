"""Per-document scores of one dataset, in a file beside it: ``<prefix>.classifier_scores.npy``.

A static classifier (``tools/score_documents.py``) scores every document of a dataset once,
offline; a run reads the file memory-mapped, so a 10^9-document corpus costs 4 GB of page cache
shared by every rank on a node, not per-rank memory. A ``.json`` beside it names the document
count and what made the scores, so a file of another dataset is refused instead of misread.
"""

from __future__ import annotations

import json
import os

import numpy as np

from blade_mega.atomic import write_atomic
from blade_mega.errors import UserError

SUFFIX = ".classifier_scores.npy"


def scores_path(prefix: str) -> str:
    return prefix + SUFFIX


def _meta_path(path: str) -> str:
    return path[:-len(".npy")] + ".json"


def write_scores(prefix: str, scores: np.ndarray, about: dict) -> str:
    """Write the scores of dataset ``prefix`` (one float per document) and their metadata;
    both files appear whole or not at all."""
    path = scores_path(prefix)
    scores = np.asarray(scores, dtype=np.float32)
    tmp = path + f".tmp-{os.getpid()}.npy"
    try:
        np.save(tmp, scores)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_atomic(_meta_path(path), json.dumps({"documents": int(len(scores)), **about},
                                              indent=1))
    return path


def read_scores(prefix: str, num_documents: int) -> np.ndarray:
    """The memory-mapped scores of dataset ``prefix``, checked against its document count."""
    path = scores_path(prefix)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no classifier scores for {prefix}; make them with "
                        f"tools/score_documents.py --data-path {prefix} --target-data-path V")
    try:
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]}); remake it with "
                        "tools/score_documents.py") from None
    if scores.ndim != 1 or len(scores) != num_documents or scores.dtype != np.float32:
        raise UserError(f"{path}: {scores.shape} {scores.dtype} scores, but {prefix} has "
                        f"{num_documents} documents; remake it with tools/score_documents.py")
    return scores
