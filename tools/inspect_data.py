"""Summarise or verify a Megatron indexed dataset.

Examples:
    python tools/inspect_data.py data/pool_text_document
    python tools/inspect_data.py data/pool_text_document --json
    python tools/inspect_data.py data/pool_text_document --verify
    python tools/inspect_data.py data/pool_text_document --decode 3 --tokenizer-model data/tok.model

--verify checks the .idx header (magic, version, dtype), its size against its counts, and that
every sequence lies inside the .bin; it prints OK or one error line and exits 2.
"""

import argparse
import json

from blade_mega.data.index_check import normalize_prefix, verify
from blade_mega.prepare.inspect import decode_document, format_summary, summarize
from blade_mega.errors import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="dataset prefix (or its .bin/.idx path)")
    parser.add_argument("--verify", action="store_true", help="only check consistency; print OK")
    parser.add_argument("--json", action="store_true", help="machine-readable summary")
    parser.add_argument("--bins", type=int, default=10, help="histogram bins")
    parser.add_argument("--decode", type=int, metavar="N", help="print the text of document N")
    parser.add_argument("--tokenizer-model", help="needed by --decode")
    args = parser.parse_args()
    prefix = normalize_prefix(args.prefix)

    if args.verify:
        verify(prefix)
        print("OK")
    elif args.decode is not None:
        print(decode_document(prefix, args.decode, args.tokenizer_model), end="")
    else:
        summary = summarize(prefix, args.bins)
        print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    run_cli(main)
