"""Data-selection plug-ins for the pretraining loop: one class per ``--selection`` method.

``sketch/`` is the gradient-sketch library the selectors here build on."""

from __future__ import annotations

from blade_mega.errors import UserError


def make_hook(name: str, ctx):
    from blade_mega.selection.base import SelectionHook
    from blade_mega.selection.excess_loss import BladeSelector, HighLossSelector, RhoSelector
    from blade_mega.selection.influence import SketchInfluenceSelector

    hooks = {"uniform": SelectionHook, "highloss": HighLossSelector, "rho": RhoSelector,
             "blade": BladeSelector, "sketch-influence": SketchInfluenceSelector}
    if name not in hooks:
        raise UserError(f"--selection {name} is not available in this build; "
                        f"choose one of {', '.join(sorted(hooks))}")
    return hooks[name](ctx)
