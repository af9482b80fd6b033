"""Export the documents a selection run favoured as a new Megatron indexed dataset.

Examples:
    python tools/export_selection.py --sidecar runs/try/iter_0000050 \\
        --data-path data/pool_text_document --output-prefix data/pool_kept_text_document \\
        --metric keep-rate --threshold 0.5
    python tools/export_selection.py \\
        --sidecar runs/try/iter_0000050/pool_text_document.blade_sidecar.npy \\
        --data-path data/pool_text_document --output-prefix data/pool_top_text_document \\
        --metric mean-excess --top-fraction 0.3

--sidecar is the ``<dataset name>.blade_sidecar.npy`` that every scoring selection method
(highloss, rho, blade, sketch-influence) saves in every checkpoint directory (or that directory
itself). It has one row per document (sequence) of --data-path: how often the document was
scored, how often kept, and its summed score (excess loss, or influence for sketch-influence).

A document's weight is its keep rate (kept / scored, unsmoothed) or its mean score, the metric
mean-excess (score sum / scored). The documents whose weight is >= --threshold, or the best
--top-fraction of the scored documents (ties to the lower document id), are written in their
original order, one document each; never-scored documents are left out unless --keep-unscored
is given. The .bin/.idx (and a filtered .meta.jsonl when the source has one) are written under
temporary names and renamed only once complete. Prints one JSON summary line.
"""

import argparse
import json
import math
import os
import warnings

import numpy

from blade_mega.prepare.inspect import load as open_indexed
from blade_mega.data import sidecar
from blade_mega.data.sidecar import EXCESS_SUM, KEPT, SCORED, Sidecar
from blade_mega.errors import UserError, run_cli

with warnings.catch_warnings():  # megatron.core warns about optional GPU extensions on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

def resolve_sidecar(path: str, prefix: str) -> str:
    """A sidecar file, or the checkpoint directory holding the one of ``prefix``."""
    if os.path.isdir(path):
        path = sidecar.path_in(path, prefix)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such sidecar; pass --sidecar <checkpoint dir> or its "
                        f"<dataset name>{sidecar.SUFFIX} file")
    return path


def document_weights(table: numpy.ndarray, metric: str) -> numpy.ndarray:
    """Weight of every document; NaN for documents never scored."""
    scored = table[:, SCORED].astype(numpy.float64)
    numerator = table[:, KEPT if metric == "keep-rate" else EXCESS_SUM].astype(numpy.float64)
    weights = numpy.full(len(table), numpy.nan)
    numpy.divide(numerator, scored, out=weights, where=scored > 0)
    return weights


def choose(weights: numpy.ndarray, threshold=None, top_fraction=None,
           keep_unscored: bool = False) -> numpy.ndarray:
    """Ids of the chosen documents, ascending."""
    scored = numpy.isfinite(weights)
    if threshold is not None:
        chosen = scored & (weights >= threshold)
    else:
        count = math.ceil(top_fraction * int(scored.sum()))
        ids = numpy.flatnonzero(scored)
        best = ids[numpy.lexsort((ids, -weights[ids]))[:count]]
        chosen = numpy.zeros(len(weights), dtype=bool)
        chosen[best] = True
    if keep_unscored:
        chosen |= ~scored
    return numpy.flatnonzero(chosen)


def write_dataset(dataset, documents: numpy.ndarray, source_prefix: str, output_prefix: str
                  ) -> int:
    """Write ``documents`` of ``dataset`` to ``output_prefix``; returns the token count."""
    directory, name = os.path.split(os.path.abspath(output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {directory} ({err.strerror}); choose a writable "
                        "--output-prefix") from None
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    source_meta = source_prefix + ".meta.jsonl"
    suffixes = [".bin", ".idx"] + ([".meta.jsonl"] if os.path.isfile(source_meta) else [])
    tokens = 0
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dataset.index.dtype)
        for document in documents:
            array = numpy.asarray(dataset.get(int(document)))
            builder.add_document(array, [array.size])
            tokens += array.size
        builder.finalize(tmp + ".idx")
        if ".meta.jsonl" in suffixes:
            write_meta(source_meta, tmp + ".meta.jsonl", documents, len(dataset.sequence_lengths))
        # .idx last: a reader that finds the .idx finds the .bin it describes.
        for suffix in sorted(suffixes, key=lambda s: s == ".idx"):
            os.replace(tmp + suffix, output_prefix + suffix)
    except OSError as err:
        raise UserError(f"cannot write {output_prefix} ({err.strerror}); choose a writable "
                        "--output-prefix") from None
    finally:
        for suffix in suffixes:
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return tokens


def write_meta(source: str, target: str, documents: numpy.ndarray, num_documents: int) -> None:
    wanted = set(int(d) for d in documents)
    count = 0
    with open(source, encoding="utf-8") as f, open(target, "w", encoding="utf-8") as out:
        for count, line in enumerate(f, 1):
            if count - 1 in wanted:
                out.write(line)
    if count != num_documents:
        raise UserError(f"{source}: {count} lines for {num_documents} documents; regenerate it "
                        "with tools/preprocess_data.py or move it away")


def export(sidecar: str, data_path: str, output_prefix: str, metric: str, threshold=None,
           top_fraction=None, keep_unscored: bool = False) -> dict:
    if os.path.abspath(output_prefix) == os.path.abspath(data_path):
        raise UserError("--output-prefix must differ from --data-path; the source is read while "
                        "the export is written")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise UserError(f"--top-fraction {top_fraction} must be in (0, 1]")
    dataset = open_indexed(data_path)
    num_documents = len(dataset.sequence_lengths)
    path = resolve_sidecar(sidecar, data_path)
    weights = document_weights(Sidecar.load(path, num_documents, data_path).dense_table(), metric)
    if not numpy.isfinite(weights).any() and not keep_unscored:
        raise UserError(f"{path}: no document was ever scored; train longer with selection on, "
                        "or pass --keep-unscored")
    documents = choose(weights, threshold, top_fraction, keep_unscored)
    if len(documents) == 0:
        raise UserError(f"no document has {metric} >= {threshold} (scored range "
                        f"{numpy.nanmin(weights):.4g}..{numpy.nanmax(weights):.4g}); "
                        "lower --threshold")
    tokens = write_dataset(dataset, documents, data_path, output_prefix)
    return {"output_prefix": output_prefix, "documents": int(len(documents)),
            "of_documents": num_documents, "scored": int(numpy.isfinite(weights).sum()),
            "tokens": tokens, "metric": metric, "threshold": threshold,
            "top_fraction": top_fraction}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecar", required=True,
                        help="a checkpoint directory, or the .blade_sidecar.npy inside it")
    parser.add_argument("--data-path", required=True, help="prefix of the dataset it scores")
    parser.add_argument("--output-prefix", required=True, help="prefix of the dataset to write")
    parser.add_argument("--metric", choices=("keep-rate", "mean-excess"), default="keep-rate")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=float, help="keep documents with weight >= this")
    rule.add_argument("--top-fraction", type=float, help="keep this share of scored documents")
    parser.add_argument("--keep-unscored", action="store_true",
                        help="also write documents the run never scored")
    args = parser.parse_args()
    summary = export(args.sidecar, args.data_path, args.output_prefix, args.metric,
                     args.threshold, args.top_fraction, args.keep_unscored)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_cli(main)
