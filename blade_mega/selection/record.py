"""Per-selection bookkeeping: the sidecars, the kept and noise statistics of each round.

One ``SelectionRecord`` per run, shared by every scoring selector; it needs only a sample index
(for each sample's main document) and the noise labels, so it is testable without engines.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from blade_mega import distributed
from blade_mega.data.sample_index import SampleIndex
from blade_mega.data.sidecar import Sidecar, path_in
from blade_mega.errors import UserError

QUANTILES = (10, 25, 50, 75, 90)


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


class SelectionRecord:
    """The sidecars (one per dataset of the blend) and the statistics of each selection round.

    ``samples`` needs ``main_documents(ids)`` (and ``num_documents``/``prefixes`` for the
    sidecar files); ``noise_labels`` are per document of dataset 0, or None.
    """

    def __init__(self, samples: SampleIndex, noise_labels: Optional[np.ndarray] = None,
                 noise_names: tuple[str, ...] = ()):
        self.samples = samples
        self.sidecars = [Sidecar(samples.num_documents(part))
                         for part in range(len(samples.datasets))]
        self.noise_labels = noise_labels
        self.noise_names = noise_names

    def selection(self, ids: np.ndarray, kept: np.ndarray, scores: np.ndarray) -> dict:
        """One round over candidates ``ids`` (global, the same on every rank): ``kept`` is each
        one's kept share (0/1 per sample, a fraction under token masks), ``scores`` its score
        (non-finite: unscored). Adds the round to the sidecars; returns the step's stats."""
        for part, where, documents in self.samples.main_documents(ids):
            self.sidecars[part].update(documents, kept[where], scores[where])
        return {"kept_fraction": float(kept.mean()), **self.noise_stats(ids, kept)}

    @staticmethod
    def score_means(scores: np.ndarray, kept: np.ndarray, score_name: str) -> dict:
        """Mean score of the kept and of the dropped candidates (finite scores only)."""
        finite = np.isfinite(scores)
        out = {}
        for side, chosen in (("kept", kept & finite), ("dropped", ~kept & finite)):
            out[f"{score_name}_{side}"] = float(scores[chosen].mean()) if chosen.any() \
                else float("nan")
        return out

    @staticmethod
    def score_quantiles(scores: np.ndarray, score_name: str) -> dict:
        """The candidates' score distribution (finite scores): p10/p25/p50/p75/p90, logged
        so that a long run shows how it drifts (a stale static reference's collapses to 0)."""
        finite = scores[np.isfinite(scores)]
        if not len(finite):
            return {}
        values = np.percentile(finite, QUANTILES)
        return {f"{score_name}_quantiles": {f"p{q}": float(v) for q, v in zip(QUANTILES, values)}}

    def noise_stats(self, ids: np.ndarray, kept: np.ndarray) -> dict:
        """Per labelled noise type (demo corpus): the kept rate of its candidates and its share
        of what was trained on. ``kept`` is each candidate's kept share (0..1)."""
        labels = self.labels(ids)
        if labels is None:
            return {}
        trained = kept.sum()
        kept_rate, share = {}, {}
        for code, name in enumerate(self.noise_names):
            of_type = labels == code
            if of_type.any():
                kept_rate[name] = float(kept[of_type].mean())
            share[name] = float(kept[of_type].sum() / trained) if trained else 0.0
        return {"noise_kept_rate": kept_rate, "trained_share": share}

    def labels(self, ids: np.ndarray) -> Optional[np.ndarray]:
        """Noise code of each sample's main document (-1 outside dataset 0), or None."""
        if self.noise_labels is None:
            return None
        labels = np.full(len(ids), -1, dtype=np.int64)
        for part, where, documents in self.samples.main_documents(ids):
            if part == 0:
                labels[where] = self.noise_labels[documents]
        return labels

    # -- files (a checkpoint part: train/checkpointer.py) ------------------------------------
    def save_files(self, directory: str) -> None:
        """One file per dataset of the blend, written once: every rank holds the same rows."""
        if distributed.rank() == 0:
            self.save(directory)

    def load_files(self, directory: str, load_optimizer: bool = True) -> None:
        self.load(directory)  # every rank reads the same files

    def save(self, directory: str) -> None:
        """Every rank holds the same rows: call on one rank."""
        for prefix, sidecar in zip(self.samples.prefixes, self.sidecars):
            sidecar.save(path_in(directory, prefix))

    def load(self, directory: str) -> None:
        """Replace the tables by the saved ones. ``sidecars`` stays the same list object, so
        whoever holds it (the candidate-block sampler) reads the loaded tables."""
        for part, prefix in enumerate(self.samples.prefixes):
            path = path_in(directory, prefix)
            if not os.path.isfile(path):
                raise UserError(f"{path}: the checkpoint has no sidecar for {prefix}; resume with "
                                "the --data-path and --selection it was trained with")
            self.sidecars[part] = Sidecar.load(path, self.samples.num_documents(part), prefix)
