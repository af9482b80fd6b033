"""Pretrain a Megatron-Core GPT under DeepSpeed ZeRO, with online data selection as a plug-in.

One CPU process, the tiny model on the demo data (``make demo`` builds it under runs/demo/data)::

    python -m blade_mega.pretrain --tokenizer-model runs/demo/data/tokenizer.model \\
        --data-path runs/demo/data/pool_text_document \\
        --target-data-path runs/demo/data/target_text_document \\
        --selection blade --train-iters 50 --save runs/try

Two ranks with tensor parallelism (torchrun; launch/ has deepspeed, Slurm and mpiexec scripts)::

    torchrun --nproc_per_node 2 -m blade_mega.pretrain --tensor-model-parallel-size 2 ...

Print the resolved configuration and parallel layout without training: add ``--dry-run``.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from blade_mega import quiet  # first: its filters must be in place before megatron.core imports

quiet.install()

from blade_mega.config import RunConfig, parse_config  # noqa: E402
from blade_mega.engine import cpu_compat  # noqa: E402
from blade_mega.errors import run_cli  # noqa: E402
from blade_mega.train.trainer import Trainer, tokenizer  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_cli(lambda: pretrain(parse_config(argv)))


def vocab_size(config: RunConfig) -> int:
    return tokenizer(config).vocab_size


def dry_run(config: RunConfig) -> None:
    """The resolved config, layout and memory plan; no process group, no data read. The world
    is ``--world-size`` (plan a cluster run from a laptop) or the launcher's."""
    from blade_mega.engine import device_path, ds_config, plan
    from blade_mega.engine.parallel import discover_process

    proc = discover_process()
    world_size = config.world_size or proc.world_size
    figures = plan.plan(config, world_size, vocab_size(config))
    ds_config.for_run(config, figures["layout"]["dp"])
    if proc.rank == 0:
        # This machine's own path (a run here); the plan is for the cluster's dtype.
        for line in [f"device path here: {device_path.detect().describe()}",
                     *plan.describe(figures)]:
            print(line)
        resolved = {k: v for k, v in config.as_flags().items() if k != "split_weights"}
        print(json.dumps({"config": resolved, "model": config.model.size.__dict__,
                          "launcher": proc.launcher, **figures}, default=str))


def pretrain(config: RunConfig) -> int:
    if config.dry_run:
        dry_run(config)
        return 0
    from blade_mega.engine import parallel

    cpu_compat.install()
    trainer = None
    try:
        parallel_config = config.parallel
        _, layout = parallel.init_distributed(parallel_config.tensor_model_parallel_size,
                                              parallel_config.pipeline_model_parallel_size,
                                              parallel_config.distributed_timeout_minutes)
        trainer = Trainer(config, layout)
        return trainer.train()
    finally:
        # pretrain() may run again in this process (a notebook, a sweep driver): nothing of this
        # run (model, optimizer, log, process groups and their connections) may outlive it.
        try:
            if trainer is not None:
                trainer.close()
                trainer = None
        finally:
            parallel.shutdown()


if __name__ == "__main__":
    main()
