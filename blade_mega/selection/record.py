"""Per-selection bookkeeping: the sidecars, the recently trained documents, the kept and noise
statistics of each round.

One ``SelectionRecord`` per run, shared by every scoring selector; it needs only a sample index
(for each sample's main document) and the noise labels, so it is testable without engines.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from blade_mega import distributed
from blade_mega.data.recently_trained import RecentlyTrained
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
    """The sidecars (one per dataset of the blend), the documents trained in the last
    ``redraw_gap`` steps (``recently_trained``, None without a gap) and the statistics of each
    selection round.

    ``samples`` needs ``main_documents(ids)`` (and ``num_documents``/``prefixes`` for the
    sidecar files); ``noise_labels`` are per document of dataset 0, or None; ``half_life`` is
    the sidecars' (0: counts never forget); ``priors`` per dataset the probabilities keep rates
    start from (None: 1/2).

    Rounds are stamped with ``step``, the loop's current step, which the trainer sets before
    each step (``begin_step``), so hooks report rounds without passing it.
    """

    def __init__(self, samples: SampleIndex, noise_labels: Optional[np.ndarray] = None,
                 noise_names: tuple[str, ...] = (), half_life: int = 0, redraw_gap: int = 0,
                 priors: Optional[list] = None):
        self.samples = samples
        self.half_life = half_life
        self.priors = priors or [None] * len(samples.datasets)
        self.sidecars = [Sidecar(samples.num_documents(part), half_life, self.priors[part])
                         for part in range(len(samples.datasets))]
        self.recently_trained = RecentlyTrained(redraw_gap, len(samples.datasets)) \
            if redraw_gap else None
        self.noise_labels = noise_labels
        self.noise_names = noise_names
        self.step = 0

    def begin_step(self, step: int) -> None:
        self.step = step

    def selection(self, ids: np.ndarray, kept: np.ndarray, scores: np.ndarray) -> dict:
        """One round over candidates ``ids`` (global, the same on every rank): ``kept`` is each
        one's kept share (0/1 per sample, a fraction under token masks), ``scores`` its score
        (non-finite: unscored). Adds the round to the sidecars, and the documents with any kept
        share to the recently trained; returns the step's stats."""
        for part, where, documents in self.samples.main_documents(ids):
            self.sidecars[part].update(documents, kept[where], scores[where], self.step)
            if self.recently_trained is not None:
                self.recently_trained.add(self.step, part, documents[kept[where] > 0])
        return {"kept_fraction": float(kept.mean()), **self.noise_stats(ids, kept)}

    def trained_all(self, ids: np.ndarray) -> dict:
        """A step that trains on every candidate and scores none (warm-up, uniform): nothing for
        the sidecars, every main document for the recently trained; returns the noise stats."""
        if self.recently_trained is not None:
            for part, _, documents in self.samples.main_documents(ids):
                self.recently_trained.add(self.step, part, documents)
        return self.noise_stats(ids, np.ones(len(ids)))

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
            sidecar = Sidecar.load(path, self.samples.num_documents(part), prefix)
            if sidecar.half_life != self.half_life:
                # Rows weighted by one half-life cannot be re-weighted by another: the rounds'
                # steps are not kept.
                raise UserError(f"{path}: the sidecar was saved with --sidecar-half-life "
                                f"{sidecar.half_life}, this run has {self.half_life}; resume "
                                "with the half-life it was trained with")
            sidecar.prior = self.priors[part]  # read from the dataset, never saved
            self.sidecars[part] = sidecar
