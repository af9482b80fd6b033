"""``--selection classifier``: keep the candidates whose documents a static classifier scored
best (``tools/score_documents.py``: fastText on V against the pool, as DCLM's filter).

The baseline every online method has to beat: its scores cost one offline pass over the pool
and no model pass during training. A sample's score is its main document's (the document under
its middle token, as the sidecar credits it); the block's top ``global_batch`` are kept, ties to
the smaller global id. It keeps a sidecar like the scoring methods, so ``--reweight-mix`` draws
well-scored documents more often through the same candidate-block sampler.
"""

from __future__ import annotations

import numpy as np

from blade_mega.data.document_scores import read_scores
from blade_mega.selection.base import SelectionContext, SelectionHook, TrainBatch
from blade_mega.selection.excess_loss import top_k_samples


class ClassifierSelector(SelectionHook):
    keeps_sidecar = True
    score_name = "classifier"

    def __init__(self, ctx: SelectionContext):
        super().__init__(ctx)
        train = ctx.train
        self.scores = [read_scores(prefix, train.num_documents(part))
                       for part, prefix in enumerate(train.prefixes)]
        self.block = self.candidate_block()

    def block_size(self, step: int) -> int:
        return self.block

    def sample_scores(self, block_ids: np.ndarray) -> np.ndarray:
        scores = np.empty(len(block_ids), dtype=np.float64)
        for part, where, documents in self.ctx.train.main_documents(block_ids):
            scores[where] = self.scores[part][documents]
        return scores

    def select(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        scores = self.sample_scores(block_ids)
        keep = top_k_samples(scores, block_ids, self.ctx.global_batch)
        return self.train_on_kept(block_ids, keep, scores)
