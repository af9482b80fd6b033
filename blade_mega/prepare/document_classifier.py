"""A static quality classifier, as DCLM's filter: fastText trained on the target set V (positive)
against the pool (negative); every pool document is scored once by P(target).

Two choices that decide whether it works on a small V (measured on the domain-shift bench's
data, area under the ROC curve of the *selection* split against the pool, docs/method.md):
* **cross-fitting**: the pool's documents are split into ``FOLDS`` folds; each fold is scored by
  a model that never saw it as a negative (a model scoring its own negatives has memorised them
  as "pool": 0.47, no better than chance; cross-fitted: 0.78);
* **pieces**: documents are cut into pieces of ``PIECE_WORDS`` whitespace words, which gives a
  small V many examples; a document's score is the mean over its pieces (32 words: 0.78,
  128: 0.71).

Documents are read from the indexed datasets (what users keep) and detokenised, so the
classifier sees text, not one tokenizer's ids. fastText runs on one thread with a fixed seed, so
the same inputs give the same scores.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np

from blade_mega.errors import UserError

POSITIVE, NEGATIVE = "__label__target", "__label__pool"
FOLDS = 2
PIECE_WORDS = 32
FASTTEXT = dict(epoch=5, wordNgrams=2, dim=64, lr=0.5, minCount=1)


def _fasttext():
    try:
        import fasttext
    except ImportError:
        raise UserError("the static classifier needs fastText: pip install fasttext "
                        "(or the project's [classifier] extra)") from None
    return fasttext


def pieces(text: str, words: int = PIECE_WORDS) -> list[str]:
    """``text`` as lines of ``words`` whitespace words (fastText reads one example a line);
    an empty document is one empty piece."""
    split = text.split()
    return [" ".join(split[i:i + words]) for i in range(0, len(split), words)] or [""]


def documents(dataset, tokenizer, indices: Sequence[int]) -> Iterator[str]:
    for index in indices:
        yield tokenizer.decode(dataset.get(int(index)).tolist())


def train_classifier(positives: list[str], negatives: list[str], seed: int):
    """fastText on the pieces of ``positives`` (V) against those of ``negatives``."""
    fasttext = _fasttext()
    lines = [f"{POSITIVE} {p}" for text in positives for p in pieces(text)]
    lines += [f"{NEGATIVE} {p}" for text in negatives for p in pieces(text)]
    random.Random(seed).shuffle(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        return fasttext.train_supervised(path, thread=1, seed=seed, verbose=0, **FASTTEXT)


def target_probability(model, texts: list[str]) -> np.ndarray:
    """P(target) of each text: the mean over its pieces."""
    out = np.empty(len(texts), dtype=np.float32)
    for row, text in enumerate(texts):
        labels, probabilities = model.predict(pieces(text), k=2)
        out[row] = np.mean([dict(zip(names, values)).get(POSITIVE, 0.0)
                            for names, values in zip(labels, probabilities)])
    return out


def classify(target, pools: list, tokenizer, seed: int = 0) -> tuple[list[np.ndarray], dict]:
    """Scores of every document of each pool dataset (cross-fitted over FOLDS folds)."""
    started = time.perf_counter()
    positives = list(documents(target, tokenizer, range(len(target.sequence_lengths))))
    texts = [list(documents(pool, tokenizer, range(len(pool.sequence_lengths))))
             for pool in pools]
    folds = [np.random.default_rng([seed, part]).integers(0, FOLDS, len(t))
             for part, t in enumerate(texts)]
    scores = [np.empty(len(t), dtype=np.float32) for t in texts]
    for fold in range(FOLDS):
        negatives = [text for t, f in zip(texts, folds) for text, k in zip(t, f) if k != fold]
        model = train_classifier(positives, negatives, seed)
        for t, f, out in zip(texts, folds, scores):
            held_out = np.flatnonzero(f == fold)
            out[held_out] = target_probability(model, [t[i] for i in held_out])
    about = {"classifier": "fasttext", "seed": seed, "folds": FOLDS,
             "piece_words": PIECE_WORDS, **{f"fasttext_{k}": v for k, v in FASTTEXT.items()},
             "seconds": round(time.perf_counter() - started, 2)}
    return scores, about
