"""Build the demo corpus from this interpreter's standard library, offline.

Examples:
    python tools/make_demo_corpus.py --output-dir data/demo
    python tools/make_demo_corpus.py --output-dir data/demo30 --size-mb 30 --noise-rate 0.5 \\
        --seed 1 --target-frac 0.1 --test-frac 0.1

Writes pool.jsonl (with labelled noise), target.jsonl, test.jsonl ({"text", "id", "module",
"noise"} per line) and labels.json (counts, seed, noise-type descriptions).
"""

import argparse

from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus
from blade_mega.errors import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--size-mb", type=float, default=2.0, help="cap on the pool size (noise included)")
    parser.add_argument("--noise-rate", type=float, default=0.5, help="fraction of pool documents that are noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-frac", type=float, default=0.1)
    parser.add_argument("--test-frac", type=float, default=0.1)
    args = parser.parse_args()

    splits, labels = build_demo_corpus(
        args.size_mb, args.noise_rate, args.seed, args.target_frac, args.test_frac
    )
    write_demo_corpus(args.output_dir, splits, labels)
    for name, stats in labels["splits"].items():
        print(f"make_demo_corpus: {name}: {stats['documents']} docs, {stats['bytes'] / 2**20:.2f} MB, noise {stats['noise']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
