"""The selection methods, by name: one ``MethodSpec`` each, the one place a method's facts live.

The flags' choices, config validation, the memory plan, the sample-index sizing, the overhead
bench and the demo ask the spec; nothing compares method names. A new method is a selector class
and one ``register(MethodSpec(...))`` line (docs/architecture.md, *How to add a method*).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Union

from blade_mega.errors import UserError

# The rules below take the run's RunConfig (config/run_config.py), which imports this module to
# validate the --selection choice: they are typed by description, not by import, so the config
# layer stays above the registry.
RunConfig = SelectionConfig = ModelSize = Any


@dataclass(frozen=True)
class EngineRole:
    """One model engine a method builds (for the memory plan)."""
    role: str          # learner | reference | proxy | proxy_reference | ...
    size: ModelSize
    offload: bool      # optimizer state in host memory


def one_batch(config: RunConfig) -> int:
    return config.data.global_batch_size


def learner_only(config: RunConfig, learner: ModelSize) -> list[EngineRole]:
    return [EngineRole("learner", learner, False)]


def unchanged(config: RunConfig) -> SelectionConfig:
    return config.selection


def no_checks(config: RunConfig) -> None:
    pass


def training_only(config: RunConfig) -> float:
    return 1.0


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of the code needs to know of one selection method."""
    name: str
    # The selection hook: its class (or any callable taking a SelectionContext), or
    # "module:Class" for a class imported only when a run builds it.
    selector: Union[str, Callable]
    needs_target: bool = False   # reads the target set V (--target-data-path)
    proxy_pair: bool = False     # may score with a small proxy pair (--reference-model PRESET)
    # may score against a small reference of a preset (--reference-model PRESET; 'auto' still
    # means the same size for it)
    small_reference: bool = False
    # Candidates one selecting step reads (the sample index is sized by it).
    candidates: Callable[[RunConfig], int] = one_batch
    # Every engine it builds, for the memory plan (--dry-run).
    engines: Callable[[RunConfig, ModelSize], list[EngineRole]] = learner_only
    # The selection section with the method's own defaults filled in (rho's reference budget).
    resolve: Callable[[RunConfig], SelectionConfig] = unchanged
    # Flag combinations the method cannot run: raise UserError naming the flags.
    check: Callable[[RunConfig], None] = no_checks
    # Analytic cost of one step in learner training steps (1: no overhead; a forward is 1/3).
    cost: Callable[[RunConfig], float] = training_only

    def selector_class(self):
        """The selection hook's class (or callable), imported if named as "module:Class"."""
        selector = self.selector
        if isinstance(selector, str):
            module, _, name = selector.partition(":")
            selector = getattr(importlib.import_module(module), name)
        return selector

    def build(self, ctx):
        return self.selector_class()(ctx)


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` a ``--selection`` choice (a name registered twice is a programming error)."""
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"selection method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


# The built-in methods are registered when the package is imported (selection/__init__.py).
def method_names() -> list[str]:
    return list(_METHODS)


def method_spec(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise UserError(f"--selection {name} is not available in this build; "
                        f"choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
