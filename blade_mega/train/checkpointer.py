"""What a checkpoint holds and when one is written: the run's parts, saved and loaded by one
mechanism (``train/checkpoint.py`` writes the files atomically).

A part is any object with ``state_dict()``/``load_state_dict(state)`` (its small state, kept
under its name in every rank's run state file: the hook, the FLOP counter) and/or
``save_files(directory)``/``load_files(directory, load_optimizer)`` (files of its own in the
checkpoint directory: the hook's engines, the sidecars). The learner's DeepSpeed files and the
run position (iteration, consumed samples, bad steps, at the run state's top level) are the
checkpoint's own. The block sampler has no state: a block is a function of (seed, step,
consumed samples, sidecars and, with --redraw-gap, the recently trained documents, a part of
its own).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from blade_mega.engine.cpu_compat import cuda_available
from blade_mega.train import checkpoint


@dataclass
class RunPosition:
    """Where the run is: steps done, samples consumed (the reading position) and the current
    run of non-finite steps."""
    iteration: int = 0
    consumed: int = 0
    bad_steps: int = 0

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed": self.consumed,
                "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.consumed = state["consumed"]
        self.bad_steps = state.get("bad_steps", 0)


class Checkpointer:
    def __init__(self, config, layout, learner, position: RunPosition, trained_as: dict, log,
                 trust: bool = False):
        """``trained_as``: what tools reading the checkpoint need besides the weights (the
        config, the architecture, the vocab size), stored beside the parts' states; ``trust``:
        the user allows loading beyond data (train/safe_load.py)."""
        self.config = config.checkpoint
        self.layout = layout
        self.learner = learner
        self.position = position
        self.trained_as = trained_as
        self.log = log
        self.trust = trust
        self.parts: dict[str, object] = {}
        self.saved_iteration = -1  # the iteration whose checkpoint is already in --save

    def register(self, name: str, part) -> None:
        self.parts[name] = part

    def _stateful(self) -> dict:
        return {name: part for name, part in self.parts.items() if hasattr(part, "state_dict")}

    def _with_files(self) -> list:
        return [part for part in self.parts.values() if hasattr(part, "save_files")]

    # -- cadence -------------------------------------------------------------------------------
    def maybe_save(self, iteration: int) -> None:
        if self.config.save and self.config.save_interval and \
                iteration % self.config.save_interval == 0:
            self.save()

    def save_at_end(self, iteration: int) -> None:
        if self.config.save and (not self.config.save_interval
                                 or iteration % self.config.save_interval):
            self.save()

    # -- the mechanism ---------------------------------------------------------------------------
    def run_state(self) -> dict:
        return {**self.position.state_dict(),
                **{name: part.state_dict() for name, part in self._stateful().items()},
                **self.trained_as, "cpu_threads": torch.get_num_threads()}

    def save(self) -> None:
        iteration = self.position.iteration
        if iteration == self.saved_iteration:
            return  # that checkpoint exists; rewriting it would put it at risk for nothing
        directory = checkpoint.save(self.config.save, iteration, self.learner.engine,
                                    self.run_state(), self.layout, self._with_files(),
                                    self.config.keep_checkpoints)
        self.saved_iteration = iteration
        self.log.write({"kind": "checkpoint", "iteration": iteration, "path": directory})

    def load(self) -> None:
        """Resume from ``--load``: every part, then the run position."""
        load = self.config.load
        state = checkpoint.load(load, self.learner.engine, self.layout, self._with_files(),
                                load_optimizer=not self.config.no_load_optim, trust=self.trust)
        self.position.load_state_dict(state)
        for name, part in self._stateful().items():
            part.load_state_dict(state.get(name, {}))
        threads = state.get("cpu_threads")
        if (threads is not None and threads != torch.get_num_threads() and not cuda_available()
                and torch.distributed.get_rank() == 0):
            # CPU kernels (LayerNorm's backward among them) sum per-thread partial results, so
            # their last bits depend on the thread count: the run resumes, but not bit-exactly.
            warnings.warn(f"{load}: saved by ranks with {threads} CPU threads, this "
                          f"run has {torch.get_num_threads()}; set OMP_NUM_THREADS={threads} "
                          "for a bit-exact resume")
        if self.config.save and os.path.realpath(self.config.save) == os.path.realpath(load):
            self.saved_iteration = self.position.iteration
        self.log.write({"kind": "resume", "iteration": self.position.iteration, "path": load})

    def load_weights(self) -> None:
        """``--finetune``: the learner's weights only; everything else starts fresh."""
        tag = checkpoint.load_weights(self.config.load, self.learner.engine, self.layout)
        self.log.write({"kind": "finetune", "iteration": 0, "path": self.config.load, "tag": tag})
