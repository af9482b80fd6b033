"""Tokenise raw text into Megatron indexed datasets (flags follow Megatron-LM's tool).

Examples:
    python tools/preprocess_data.py --input data/demo/pool.jsonl --output-prefix data/pool \\
        --tokenizer-model data/tok.model --append-eod --workers 2 --meta-keys id,noise
    python tools/preprocess_data.py --input 'raw/*.jsonl.gz' raw/extra/ --json-keys text \\
        --output-prefix data/web --tokenizer-model data/tok.model --on-error skip

Writes <output-prefix>_<key>_document.bin/.idx for each json key (and .meta.jsonl with the
--meta-keys fields of each written document, in index order). Prints a summary line at the end.
"""

import argparse

from blade_mega.cli_args import key_list
from blade_mega.prepare.preprocess import DTYPE_CHOICES, preprocess
from blade_mega.errors import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.gz/.txt files, globs or directories")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON fields to tokenise (space- or comma-separated)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model from train_tokenizer.py")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=1000, help="documents between progress updates")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="what to do with invalid records (bad JSON, bad UTF-8, missing key)")
    parser.add_argument("--meta-keys", nargs="+", default=[],
                        help="record fields to keep per document (comma- or space-separated)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="token dtype in the .bin")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args()

    summary = preprocess(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        json_keys=key_list(args.json_keys),
        append_eod=args.append_eod,
        workers=args.workers,
        on_error=args.on_error,
        meta_keys=key_list(args.meta_keys),
        dtype=args.dtype,
        log_interval=args.log_interval,
        show_progress=not args.no_progress,
    )
    print(summary.line())
    return 0


if __name__ == "__main__":
    run_cli(main)
