"""The embedded demo corpus: Python standard-library sources with labelled contamination.

Built offline from the running interpreter's stdlib `.py` files. Modules (files) are split
between a training pool, a held-out target set and a test set, so no module spans two splits.
Only the pool is contaminated: a `noise_rate` fraction of its documents is noise of four
labelled types (NOISE_TYPES), which a good data selector should learn to down-weight.
"""

import base64
import itertools
import json
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from blade_mega.errors import UserError

NOISE_TYPES = {
    "spam": "identifiers and keywords drawn at random from the clean pool's vocabulary, "
    "in random-length lines: code-like tokens with no structure",
    "scramble": "a real clean pool document with its lines shuffled: right vocabulary, "
    "wrong order",
    "duplicate": "exact copies of a small fixed set of boilerplate documents (license "
    "header, generated-stub banner, empty package init) repeated many times",
    "blob": "base64 or hex encoded random bytes assigned to a variable: data, not code",
}
SPLITS = ("pool", "target", "test")
MIN_DOC_BYTES = 1024
MAX_DOC_BYTES = 6 * 1024
MIN_HELD_OUT_BYTES = 256 * 1024  # target and test stay big enough to evaluate on
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_BOUNDARY = re.compile(r"(async\s+def|def|class)\s|@")


@dataclass
class Document:
    id: str
    module: str
    text: str
    noise: str = "clean"

    def record(self) -> dict:
        return {"text": self.text, "id": self.id, "module": self.module, "noise": self.noise}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_modules(root: str) -> List[Tuple[str, str]]:
    """(relative path, source) of every UTF-8 `.py` file under `root`, sorted, excluding
    site-packages and test directories."""
    modules = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if source.strip():
                modules.append((os.path.relpath(path, root), source))
    modules.sort()
    return modules


def split_into_documents(source: str) -> List[str]:
    """Cut a module into ~1-6 KB documents at top-level boundaries (a line after a blank line
    that starts at column 0, or a def/class/decorator at any indent); a segment longer than
    6 KB is cut between lines."""
    segments: List[str] = []
    current: List[str] = []
    previous_blank = False
    for line in source.splitlines(keepends=True):
        stripped = line.lstrip()
        at_boundary = previous_blank and stripped and (
            line[0] not in " \t" or _BOUNDARY.match(stripped)
        )
        if at_boundary and current:
            segments.append("".join(current))
            current = []
        current.append(line)
        previous_blank = not stripped
    if current:
        segments.append("".join(current))

    documents: List[str] = []
    pending = ""
    for piece in (part for segment in segments for part in _cut_long(segment)):
        if pending and len(pending) >= MIN_DOC_BYTES and len(pending) + len(piece) > MAX_DOC_BYTES:
            documents.append(pending)
            pending = ""
        pending += piece
    if pending:
        # A short tail joins the previous document when that stays within the size bound.
        if documents and len(pending) < MIN_DOC_BYTES and len(documents[-1]) + len(pending) <= MAX_DOC_BYTES:
            documents[-1] += pending
        else:
            documents.append(pending)
    return [doc for doc in documents if doc.strip()]


def _cut_long(segment: str) -> List[str]:
    if len(segment) <= MAX_DOC_BYTES:
        return [segment]
    pieces, current = [], ""
    for line in segment.splitlines(keepends=True):
        if current and len(current) + len(line) > MAX_DOC_BYTES:
            pieces.append(current)
            current = ""
        current += line
    return pieces + [current] if current else pieces


def _documents_of(module: str, source: str) -> List[Document]:
    return [Document(f"{module}#{i}", module, text) for i, text in enumerate(split_into_documents(source))]


def _fill(modules: List[Tuple[str, str]], used: set, budget: int) -> List[Document]:
    """Whole modules, in the (shuffled) given order, that fit in `budget` bytes."""
    documents: List[Document] = []
    size = 0
    for module, source in modules:
        if module in used or size + len(source) > budget:
            continue
        used.add(module)
        module_docs = _documents_of(module, source)
        documents.extend(module_docs)
        size += sum(len(doc.text) for doc in module_docs)
    return documents


class NoiseMaker:
    """Makes labelled noise documents, sized like the clean documents they dilute."""

    def __init__(self, clean: Sequence[Document], rng: random.Random):
        self.clean = clean
        self.rng = rng
        self.vocabulary = sorted({w for doc in clean for w in re.findall(r"[A-Za-z_]\w+", doc.text)})
        self.boilerplate = self._boilerplate_set()

    def make(self, kind: str, index: int) -> Document:
        size = len(self.rng.choice(self.clean).text)
        text = getattr(self, f"_{kind}")(size)
        return Document(f"noise/{kind}#{index}", f"noise/{kind}", text, kind)

    def _spam(self, size: int) -> str:
        lines, total = [], 0
        while total < size:
            line = " ".join(self.rng.choices(self.vocabulary, k=self.rng.randint(3, 12)))
            lines.append(" " * 4 * self.rng.randint(0, 2) + line)
            total += len(lines[-1]) + 1
        return "\n".join(lines) + "\n"

    def _scramble(self, size: int) -> str:
        lines = self.rng.choice(self.clean).text.splitlines()
        self.rng.shuffle(lines)
        return "\n".join(lines) + "\n"

    def _duplicate(self, size: int) -> str:
        return self.rng.choice(self.boilerplate)

    def _blob(self, size: int) -> str:
        data = self.rng.randbytes(size * 3 // 4)
        if self.rng.random() < 0.5:
            encoded = base64.b64encode(data).decode("ascii")
        else:
            encoded = data.hex()
        lines = [f"    {encoded[i:i + 76]!r}" for i in range(0, len(encoded), 76)]
        return f"_DATA_{self.rng.randrange(10**6)} = (\n" + "\n".join(lines) + "\n)\n"

    def _boilerplate_set(self) -> List[str]:
        notice = "\n".join("# " + line for line in sys.copyright.splitlines())
        license_header = (
            notice + "\n#\n# Licensed under the Python Software Foundation License Version 2.\n"
            "# You may not use this file except in compliance with the License.\n"
            "# Distributed on an \"AS IS\" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND.\n"
        )
        names = sorted(self.rng.sample(self.vocabulary, min(30, len(self.vocabulary))))
        stub = "# Code generated by a tool. DO NOT EDIT.\n\n" + "".join(
            f"def {name}(*args, **kwargs):\n    raise NotImplementedError({name!r})\n\n" for name in names
        )
        package_init = '"""Package initialisation."""\n\n__all__ = []\n__version__ = "0.0.0"\n'
        return [license_header, stub, package_init]


def _noise_count(clean_docs: int, noise_rate: float) -> int:
    return round(clean_docs * noise_rate / (1 - noise_rate))


def build_demo_corpus(
    size_mb: float = 2.0,
    noise_rate: float = 0.5,
    seed: int = 0,
    target_frac: float = 0.1,
    test_frac: float = 0.1,
    root: Optional[str] = None,
) -> Tuple[Dict[str, List[Document]], dict]:
    """Documents per split (pool, target, test) and the labels.json content."""
    if not 0 <= noise_rate < 1:
        raise UserError(f"--noise-rate must be in [0, 1), got {noise_rate}")
    if target_frac <= 0 or test_frac <= 0 or target_frac + test_frac >= 1:
        raise UserError("--target-frac and --test-frac must be positive and sum to less than 1")
    if size_mb <= 0:
        raise UserError(f"--size-mb must be positive, got {size_mb}")
    root = root or stdlib_root()
    modules = stdlib_modules(root)
    if not modules:
        raise UserError(f"no readable .py files under {root}; is this a full Python install?")
    rng = random.Random(seed)
    rng.shuffle(modules)

    pool_bytes = int(size_mb * 2**20)
    pool_frac = 1 - target_frac - test_frac
    used: set = set()
    splits = {
        "target": _fill(modules, used, max(int(pool_bytes * target_frac / pool_frac), MIN_HELD_OUT_BYTES)),
        "test": _fill(modules, used, max(int(pool_bytes * test_frac / pool_frac), MIN_HELD_OUT_BYTES)),
    }
    clean_pool = _fill(modules, used, int(pool_bytes * (1 - noise_rate)))
    if not clean_pool:
        raise UserError(f"--size-mb {size_mb} is too small to hold one module; raise it")

    maker = NoiseMaker(clean_pool, rng)
    count = _noise_count(len(clean_pool), noise_rate)
    kinds = list(itertools.islice(itertools.cycle(NOISE_TYPES), count))
    rng.shuffle(kinds)
    pool = clean_pool + [maker.make(kind, i) for i, kind in enumerate(kinds)]
    rng.shuffle(pool)
    splits["pool"] = pool

    labels = {
        "seed": seed,
        "noise_rate": noise_rate,
        "size_mb": size_mb,
        "python_version": sys.version.split()[0],
        "stdlib": root,
        "noise_types": NOISE_TYPES,
        "splits": {name: _split_stats(splits[name]) for name in SPLITS},
    }
    return {name: splits[name] for name in SPLITS}, labels


def _split_stats(documents: List[Document]) -> dict:
    counts = {kind: 0 for kind in ["clean", *NOISE_TYPES]}
    for doc in documents:
        counts[doc.noise] += 1
    return {
        "documents": len(documents),
        "bytes": sum(len(doc.text.encode("utf-8")) for doc in documents),
        "modules": len({doc.module for doc in documents if doc.noise == "clean"}),
        "noise": counts,
    }


def write_demo_corpus(output_dir: str, splits: Dict[str, List[Document]], labels: dict) -> None:
    """`<output_dir>/{pool,target,test}.jsonl` and `labels.json`, each renamed into place only
    after every file was written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {output_dir} ({err.strerror})") from None
    contents = {
        f"{name}.jsonl": "".join(json.dumps(doc.record()) + "\n" for doc in splits[name]) for name in SPLITS
    }
    contents["labels.json"] = json.dumps(labels, indent=2) + "\n"
    temporary = {name: os.path.join(output_dir, f".{name}.tmp-{os.getpid()}") for name in contents}
    try:
        for name, text in contents.items():
            with open(temporary[name], "w", encoding="utf-8") as f:
                f.write(text)
        for name, tmp in temporary.items():
            os.replace(tmp, os.path.join(output_dir, name))
    except OSError as err:
        raise UserError(
            f"cannot write to {output_dir} ({err.strerror}); choose a writable --output-dir"
        ) from None
    finally:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.remove(tmp)
