"""The README says what the code does: the hook calls it shows take the code's arguments, and
the demo's duration is the same figure in the README and in tools/demo.py."""

import inspect
import os
import re

from blade_mega.selection.base import SelectionHook
from conftest import REPO


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_readme_hook_calls_match_the_hook_interface():
    calls = re.findall(r"hook\.(\w+)\(([^)]*)\)", read("README.md"))
    assert {name for name, _ in calls} >= {"select", "after_step"}
    for name, arguments in calls:
        parameters = [p for p in inspect.signature(getattr(SelectionHook, name)).parameters
                      if p != "self"]
        assert [a.strip() for a in arguments.split(",") if a.strip()] == parameters, name


def test_demo_duration_is_one_figure():
    readme = re.search(r"it took ([\d.]+) minutes", read("README.md")).group(1)
    demo = re.search(r"``make demo`` runs it: ([\d.]+) minutes", read("tools/demo.py")).group(1)
    assert demo == readme


def test_every_source_path_the_docs_name_exists():
    """A module moved without its docs is caught here (paths like blade_mega/x/y.py)."""
    missing = []
    docs = ["README.md", *(os.path.join("docs", name)
                           for name in os.listdir(os.path.join(REPO, "docs"))
                           if name.endswith(".md"))]
    for doc in docs:
        named = re.findall(r"\b((?:blade_mega|tools|bench|tests)/[\w/]+\.py)\b", read(doc))
        for path in set(named):
            if not os.path.exists(os.path.join(REPO, path)):
                missing.append(f"{doc}: {path}")
    assert not missing, missing


def test_every_registered_method_is_documented():
    """docs/method.md's table of --selection methods lists exactly the registered built-ins
    (a method registered by a test file is not one)."""
    from blade_mega.selection.methods import BUILT_IN

    table = re.search(r"\| `--selection` \| reference \| rule \|\n((?:\|.*\n)+)",
                      read("docs/method.md")).group(1)
    documented = re.findall(r"^\| `([\w-]+)`", table, flags=re.M)
    assert documented == [spec.name for spec in BUILT_IN]
