"""The layers hold: the flags stay in the config layer, the online path imports nothing offline,
and a selection setting is read from the config in one place below it."""

from __future__ import annotations

import ast
import glob
import os

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "blade_mega")


def _modules(*folders: str) -> dict[str, ast.Module]:
    out = {}
    for folder in folders:
        for path in glob.glob(os.path.join(PACKAGE, folder, "**", "*.py"), recursive=True):
            with open(path, encoding="utf-8") as f:
                out[os.path.relpath(path, REPO)] = ast.parse(f.read())
    return out


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


BELOW_CONFIG = _modules("train", "engine", "data", "selection", "sketch", "report")


def test_below_the_config_layer_nothing_reads_the_flags():
    for path, tree in BELOW_CONFIG.items():
        imported = _imports(tree)
        assert not {"argparse", "blade_mega.config.flags"} & imported, path


def test_the_online_path_imports_nothing_offline():
    online = {p: t for p, t in BELOW_CONFIG.items() if "/report/" not in p}
    for path, tree in online.items():
        assert not [m for m in _imports(tree) if m.startswith("blade_mega.prepare")], path


@pytest.mark.parametrize("field", ["keep_ratio", "sync_interval", "sync_beta",
                                   "sidecar_half_life", "redraw_gap"])
def test_a_selection_setting_is_read_in_one_place_below_the_config(field):
    reads = [(path, node.lineno) for path, tree in BELOW_CONFIG.items()
             for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == field
             and isinstance(node.ctx, ast.Load)
             and not (isinstance(node.value, ast.Name) and node.value.id == "self")]
    assert len(reads) == 1, reads
