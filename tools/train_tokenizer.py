"""Train the SentencePiece tokenizer used by preprocessing and training.

Examples:
    python tools/train_tokenizer.py --input data/demo/pool.jsonl --model-prefix data/tok \\
        --vocab-size 8000
    python tools/train_tokenizer.py --input 'corpus/*.jsonl.gz' notes.txt --json-keys text \\
        --model-type unigram --vocab-size 32000 --seed 1

Writes <model-prefix>.model and <model-prefix>.json (vocab_size, eod_id, pad_id, bos_id,
unk_id, model_type). Same inputs and seed give a byte-identical model.
"""

import argparse

from blade_mega.cli_args import key_list
from blade_mega.prepare.inputs import expand_inputs, iter_texts
from blade_mega.errors import run_cli
from blade_mega.data.tokenizer import MODEL_TYPES, train_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.gz/.txt files, globs or directories")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields holding text (space- or comma-separated)")
    parser.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.json")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling of training lines")
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="invalid records")
    args = parser.parse_args()

    texts = iter_texts(expand_inputs(args.input), key_list(args.json_keys), skip_invalid=args.on_error == "skip")
    tokenizer = train_tokenizer(
        texts, args.model_prefix, args.vocab_size, args.model_type, args.seed, args.max_sentences
    )
    print(f"train_tokenizer: wrote {tokenizer.model_path} ({tokenizer.metadata()})")
    return 0


if __name__ == "__main__":
    run_cli(main)
