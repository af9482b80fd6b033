"""Score every document of the pool once with a static classifier trained on the target set V.

Example:
    python tools/score_documents.py --tokenizer-model data/tokenizer.model \\
        --target-data-path data/target_text_document --data-path data/pool_text_document

fastText (as DCLM's quality filter) learns V's documents against the pool's, then scores each
pool document by P(target), cross-fitted: a document is scored by a model that did not learn
from it (blade_mega/prepare/document_classifier.py says why). The scores go beside each dataset, as
``<prefix>.classifier_scores.npy`` (one float32 per document, memory-mapped by the run) and a
``.json`` naming the document count and the classifier; ``--selection classifier`` keeps the
best-scored share of each candidate block. Prints one JSON line (files, timings, score
quantiles).
"""

import argparse
import json
import os

from blade_mega.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", nargs="+", required=True,
                        help="the pool's indexed dataset prefixes (each gets its scores file)")
    parser.add_argument("--target-data-path", required=True,
                        help="the target set V (indexed dataset prefix): the positive class")
    parser.add_argument("--tokenizer-model", required=True,
                        help="the datasets' tokenizer, to detokenise documents into text")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import numpy as np

    from blade_mega.data.document_scores import write_scores
    from blade_mega.data.tokenizer import Tokenizer
    from blade_mega.prepare.document_classifier import classify
    from blade_mega.report.evaluation import open_dataset

    args = parse_args(argv)
    tokenizer = Tokenizer.load(args.tokenizer_model)
    target = open_dataset(args.target_data_path)
    pools = [open_dataset(prefix) for prefix in args.data_path]
    scores, about = classify(target, pools, tokenizer, seed=args.seed)
    about["target"] = os.path.abspath(args.target_data_path)
    files = [write_scores(prefix, values, about) for prefix, values in zip(args.data_path, scores)]
    quantiles = np.percentile(np.concatenate(scores), [10, 50, 90]).round(4).tolist()
    print(json.dumps({"files": files, "documents": [len(s) for s in scores],
                      "score_p10_p50_p90": quantiles, **about}))
    return 0


if __name__ == "__main__":
    run_cli(main)
