"""Smoke tests of every entry point, so that moving a module cannot silently break one.

* every ``bench/*.py`` and ``tools/*.py`` script (found by glob: a new one is covered at once) and
  ``python -m blade_mega.pretrain`` (and any other ``-m blade_mega.X`` a script runs) answer
  ``--help`` with exit 0 and a usage line;
* ``--help`` runs only a script's top level and most scripts import lazily inside functions, so
  every ``import blade_mega...`` / ``from blade_mega... import a, b`` in bench/, tools/,
  blade_mega/ and tests/ (inside functions too; tests/ because CUDA-only tests are skipped here)
  is resolved: the module exists and has each name (or the name is a submodule). One subprocess
  imports them all;
* the shell launchers, Makefile and CI scripts name only scripts and ``-m`` modules that exist.
"""

import ast
import glob
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO

TIMEOUT = 120


def _files(*patterns: str) -> list[str]:
    """Repo-relative paths matching the glob patterns, sorted, without ``__init__.py`` scripts."""
    found = set()
    for pattern in patterns:
        found.update(os.path.relpath(p, REPO)
                     for p in glob.glob(os.path.join(REPO, pattern), recursive=True))
    return sorted(found)


SCRIPTS = [p for p in _files("bench/*.py", "tools/*.py") if os.path.basename(p) != "__init__.py"]
PYTHON_SOURCES = _files("bench/*.py", "tools/*.py", "blade_mega/**/*.py", "tests/*.py")
# files that start scripts by path or modules with -m: checked for targets that do not exist
LAUNCHING = _files("bench/*.sh", "bench/*.py", "tools/*.py", "launch/*", ".ci/*", "Makefile")

MODULE_TARGET = re.compile(r"""-m["',\s]+(blade_mega(?:\.\w+)*)""")
SCRIPT_TARGET = re.compile(r"\b((?:bench|tools|launch)/\w+\.(?:py|sh|sbatch))\b")


def _read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _module_targets() -> list[tuple[str, int, str]]:
    """(file, line, module) for each ``-m blade_mega.X`` in LAUNCHING."""
    found = []
    for path in LAUNCHING:
        for number, line in enumerate(_read(path).splitlines(), 1):
            found.extend((path, number, m) for m in MODULE_TARGET.findall(line))
    return found


HELP_COMMANDS = [[path] for path in SCRIPTS] + [
    ["-m", module] for module in sorted({"blade_mega.pretrain"}
                                        | {m for _, _, m in _module_targets()})]


def test_the_globs_find_the_scripts():
    assert "bench/gpu_check.py" in SCRIPTS and "tools/demo.py" in SCRIPTS
    assert "blade_mega/prepare/preprocess.py" in PYTHON_SOURCES
    assert "bench/gpu_check.sh" in LAUNCHING and "launch/torchrun.sh" in LAUNCHING


def _run_help(command: list[str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, *command, "--help"]
    try:
        return subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:  # one hung script fails its own test only
        return subprocess.CompletedProcess(argv, "timeout", "",
                                           f"no exit after {TIMEOUT} s: {e.stderr!r}")


@pytest.fixture(scope="module")
def help_results(request) -> dict:
    """``--help`` of every command this session selected, run a few at a time (each start-up
    imports torch for seconds; one after another they took ~75 s on 2 cores)."""
    selected = {tuple(item.callspec.params["command"]) for item in request.session.items
                if getattr(item, "originalname", None) == "test_help_exits_0_with_a_usage_line"}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(selected, pool.map(_run_help, [list(c) for c in selected])))


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda command: command[-1])
def test_help_exits_0_with_a_usage_line(command, help_results):
    result = help_results.get(tuple(command)) or _run_help(command)
    shown = " ".join(["python", *command, "--help"])
    assert result.returncode == 0, \
        f"{shown} exited {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    assert result.stdout.startswith("usage: "), f"{shown} printed no usage line:\n{result.stdout}"


def _package_of(path: str) -> str | None:
    """The package a blade_mega/ source file's relative imports resolve against."""
    if not path.startswith("blade_mega" + os.sep):
        return None
    parts = path[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1])


def blade_mega_imports(path: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for each import of a blade_mega module anywhere in the file (top
    level, functions, classes, branches); names is [] for ``import blade_mega.x``."""
    tree = ast.parse(_read(path), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names
                         if alias.name.split(".")[0] == "blade_mega")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = _package_of(path)
                if package is None:
                    continue
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            if module.split(".")[0] == "blade_mega":
                found.append((node.lineno, module,
                              [alias.name for alias in node.names if alias.name != "*"]))
    return found


# Run in one subprocess: reads [[where, module, names], ...] on stdin, prints one line
# "PROBLEMS <json list of messages>".
CHECK_IMPORTS = r"""
import importlib, importlib.util, json, sys

def has_submodule(module, name):
    try:
        return importlib.util.find_spec(f"{module}.{name}") is not None
    except (ImportError, AttributeError, ValueError):
        return False

problems, loaded = [], {}
for where, module, names in json.load(sys.stdin):
    if module not in loaded:
        try:
            loaded[module] = importlib.util.find_spec(module) is not None and \
                importlib.import_module(module)
        except ModuleNotFoundError:
            loaded[module] = False
        except Exception as e:
            loaded[module] = f"importing it raised {type(e).__name__}: {e}"
    mod = loaded[module]
    if mod is False:
        problems.append(f"{where}: module {module} does not exist")
    elif isinstance(mod, str):
        problems.append(f"{where}: module {module}: {mod}")
    else:
        problems.extend(f"{where}: module {module} has no name {name}" for name in names
                        if not hasattr(mod, name) and not has_submodule(module, name))
print("PROBLEMS " + json.dumps(problems))
"""


def test_every_blade_mega_import_resolves():
    imports = [[f"{path}:{line}", module, names] for path in PYTHON_SOURCES
               for line, module, names in blade_mega_imports(path)]
    assert any(where.startswith("bench/gpu_check.py:") for where, _, _ in imports)
    result = subprocess.run([sys.executable, "-c", CHECK_IMPORTS], input=json.dumps(imports),
                            cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBLEMS ")]
    assert result.returncode == 0 and lines, \
        f"the import check failed (rc {result.returncode}):\n{result.stderr[-4000:]}"
    problems = json.loads(lines[-1][len("PROBLEMS "):])
    assert not problems, "imports of blade_mega that do not resolve:\n" + "\n".join(problems)


def _module_exists(module: str) -> bool:
    """``python -m module`` has something to run: module.py or a package's __main__.py."""
    base = os.path.join(REPO, *module.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__main__.py"))


def test_launch_scripts_name_existing_scripts_and_modules():
    missing = [f"{path}:{line}: -m {module}: no such module"
               for path, line, module in _module_targets() if not _module_exists(module)]
    for path in LAUNCHING:
        for number, line in enumerate(_read(path).splitlines(), 1):
            missing.extend(f"{path}:{number}: {target}: no such file"
                           for target in SCRIPT_TARGET.findall(line)
                           if not os.path.isfile(os.path.join(REPO, target)))
    assert not missing, "targets that do not exist:\n" + "\n".join(missing)
