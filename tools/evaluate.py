"""Evaluate a checkpoint on whole documents: mean token loss and bits per byte per dataset.

Examples:
    python tools/evaluate.py --load runs/try --data-path data/test_text_document
    torchrun --nproc_per_node 4 tools/evaluate.py --load runs/try \\
        --data-path data/test_text_document data/web_text_document \\
        --tensor-model-parallel-size 2 --noise-labels data/test_text_document.meta.jsonl \\
        data/web_text_document.meta.jsonl

Documents are read in index order (no shuffle, no blending) straight from each indexed dataset;
each document's tokens, its EOD included, are cut into consecutive chunks of --seq-length tokens
(default: the run's), and each chunk predicts its tokens 2..n. Bytes are the UTF-8 bytes of the
detokenised document: bits per byte = summed token loss / ln 2 / bytes. The checkpoint may have
any TP/PP layout and the evaluation any other (launch with torchrun, or any launcher in
launch/); data-parallel ranks share the documents. With --noise-labels (one preprocess
.meta.jsonl per --data-path), the same figures per "noise" label as well.

The loss is Megatron's, over the padded vocabulary, the same as the training loop's; a model
exported with tools/export_hf.py (tokenizer rows only) gives at most the padded rows' share of
probability less. Prints a progress bar on stderr and, last, one JSON line (rank 0).
"""

import argparse
import json
import os

from blade_mega.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="a --save directory (its newest complete checkpoint) or one "
                             "iter_XXXXXXX of it")
    parser.add_argument("--data-path", nargs="+", required=True, help="indexed dataset prefixes")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="may unpickle what a checkpoint never holds, which can run code: "
                             "only for checkpoints you trust, such as one written before "
                             "checkpoint format 2 (also: BLADE_TRUST_CHECKPOINT=1)")
    parser.add_argument("--noise-labels", nargs="+",
                        help="one .meta.jsonl per --data-path: figures per 'noise' label too")
    parser.add_argument("--seq-length", type=int, help="chunk length (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--tokenizer-model",
                        help="SentencePiece model, to detokenise (default: the run's)")
    parser.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.noise_labels and len(args.noise_labels) != len(args.data_path):
        raise UserError(f"--noise-labels has {len(args.noise_labels)} files for "
                        f"{len(args.data_path)} --data-path prefixes; give one .meta.jsonl per "
                        "prefix, in the same order")
    if args.micro_batch_size < 1:
        raise UserError("--micro-batch-size must be positive")
    return args


def _tokenizer(path, ckpt):
    from blade_mega.data.tokenizer import Tokenizer

    path = path or ckpt.config.model.tokenizer_model
    if not path or not os.path.isfile(path):
        raise UserError(f"{path}: no tokenizer model to detokenise with (bytes need it); pass "
                        "--tokenizer-model")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != ckpt.vocab_size:
        raise UserError(f"{path}: {tokenizer.vocab_size} tokens, the checkpoint was trained with "
                        f"{ckpt.vocab_size}; pass the run's --tokenizer-model")
    return tokenizer


def build_model(ckpt, layout):
    """This rank's stage of the checkpoint's model, for this evaluation's layout."""
    from megatron.core import parallel_state

    from blade_mega.engine.model import build_gpt
    from blade_mega.train.model_weights import shard_for

    if ckpt.padded_vocab_size % layout.tp:
        raise UserError(f"{ckpt.directory}: its {ckpt.padded_vocab_size} vocabulary rows do not "
                        f"split over --tensor-model-parallel-size {layout.tp}")
    if ckpt.size.query_groups % layout.tp:
        raise UserError(f"{ckpt.directory}: its {ckpt.size.query_groups} key/value groups do not "
                        f"split over --tensor-model-parallel-size {layout.tp}")
    model = build_gpt(ckpt.size, ckpt.padded_vocab_size, seed=0,
                      bf16=ckpt.config.model.bf16)
    offset = model.decoder.layers[0].layer_number - 1
    names = list(model.state_dict())
    state = shard_for(ckpt, names, parallel_state.get_tensor_model_parallel_rank(), layout.tp,
                      offset)
    model.load_state_dict(state, strict=False)
    missing = [n for n in names if n not in state and not n.endswith("_extra_state")]
    if missing:
        raise UserError(f"{ckpt.directory}: lacks {missing[0]}; not this project's GPT")
    model.eval()
    return model


def evaluate(args) -> dict:
    import numpy as np
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from blade_mega.report import evaluation as ev
    from blade_mega.engine.model_engine import PipelineRunner
    from blade_mega.train.metrics import progress
    from blade_mega.train.model_weights import read_checkpoint
    from blade_mega.engine.parallel import Layout

    ckpt = read_checkpoint(args.load, args.trust_checkpoint)
    seq_length = args.seq_length or ckpt.config.data.seq_length
    if not 2 <= seq_length <= ckpt.size.max_position_embeddings:
        raise UserError(f"--seq-length {seq_length}: use 2 .. the model's "
                        f"{ckpt.size.max_position_embeddings} positions")
    tokenizer = _tokenizer(args.tokenizer_model, ckpt)
    datasets = [ev.open_dataset(prefix) for prefix in args.data_path]
    labels = [ev.read_labels(path, len(d.sequence_lengths))
              for path, d in zip(args.noise_labels, datasets)] if args.noise_labels else None
    layout = Layout.from_world(torch.distributed.get_world_size(),
                               args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(ckpt, layout)
    runner = PipelineRunner(model, seq_length, args.micro_batch_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    scoring = (parallel_state.is_pipeline_last_stage()
               and parallel_state.get_tensor_model_parallel_rank() == 0)
    rank0 = torch.distributed.get_rank() == 0
    per_rank = [-(-len(ev.chunks(d.sequence_lengths, seq_length)) // layout.dp) for d in datasets]
    bar = progress(rank0 and not args.no_progress,
                   sum(-(-n // args.micro_batch_size) for n in per_rank), 0)
    results = {}
    for index, (prefix, dataset) in enumerate(zip(args.data_path, datasets)):
        nll = ev.document_losses(runner, dataset, seq_length, args.micro_batch_size, dp_rank,
                                 layout.dp, scoring, bar)
        if not rank0:
            continue
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        predicted = ev.predicted_tokens(lengths, seq_length)
        nbytes = ev.document_bytes(dataset, tokenizer)
        summary = ev.summarize(nll, predicted, lengths, nbytes)
        if labels is not None:
            names = np.asarray(labels[index])
            summary["by_label"] = {label: ev.summarize(nll, predicted, lengths, nbytes,
                                                       names == label)
                                   for label in dict.fromkeys(labels[index])}
        results[prefix] = summary
    bar.close()
    return {"checkpoint": ckpt.directory, "seq_length": seq_length,
            "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
            "datasets": results}


def main(argv=None) -> int:
    from blade_mega.engine import cpu_compat, parallel

    args = parse_args(argv)
    cpu_compat.install()
    try:
        proc, _ = parallel.init_distributed(args.tensor_model_parallel_size,
                                            args.pipeline_model_parallel_size,
                                            args.distributed_timeout_minutes)
        result = evaluate(args)
        if proc.rank == 0:
            print(json.dumps(result), flush=True)
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main)
