"""Data-selection plug-ins for the pretraining loop: one selector class per method, each
registered with its facts in ``methods.py`` (``registry.method_spec(name).build(ctx)``).

``sketch/`` is the gradient-sketch library the selectors here build on."""

from blade_mega.selection import methods  # noqa: F401 - registers the built-in methods
