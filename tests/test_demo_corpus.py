import base64
import json
import os
import re

import pytest

from blade_mega.prepare.demo_corpus import (
    MAX_DOC_BYTES,
    MIN_DOC_BYTES,
    NOISE_TYPES,
    build_demo_corpus,
    split_into_documents,
    stdlib_modules,
)
from conftest import assert_user_error, run_tool


@pytest.fixture(scope="module")
def corpus(demo_data):
    splits = {}
    for name in ("pool", "target", "test"):
        with open(os.path.join(demo_data.corpus_dir, f"{name}.jsonl"), encoding="utf-8") as f:
            splits[name] = [json.loads(line) for line in f]
    with open(os.path.join(demo_data.corpus_dir, "labels.json")) as f:
        return splits, json.load(f)


def test_records_have_stable_unique_ids(corpus):
    splits, _ = corpus
    records = [r for split in splits.values() for r in split]
    assert all(set(r) == {"text", "id", "module", "noise"} for r in records)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))


def test_splits_are_by_module_and_only_pool_is_noisy(corpus):
    splits, _ = corpus
    modules = {name: {r["module"] for r in split if r["noise"] == "clean"} for name, split in splits.items()}
    assert not modules["pool"] & modules["target"]
    assert not modules["pool"] & modules["test"]
    assert not modules["target"] & modules["test"]
    assert all(r["noise"] == "clean" for r in splits["target"] + splits["test"])
    assert all(len(modules[name]) >= 3 for name in modules)


def test_noise_rate_and_types(corpus):
    splits, labels = corpus
    pool = splits["pool"]
    noise = [r for r in pool if r["noise"] != "clean"]
    assert abs(len(noise) / len(pool) - 0.5) < 0.01
    assert {r["noise"] for r in noise} == set(NOISE_TYPES)
    counts = labels["splits"]["pool"]["noise"]
    assert counts == {kind: sum(r["noise"] == kind for r in pool) for kind in ["clean", *NOISE_TYPES]}
    # Noise is interleaved, not appended: both halves of the pool hold some.
    half = len(pool) // 2
    assert any(r["noise"] != "clean" for r in pool[:half]) and any(r["noise"] == "clean" for r in pool[half:])


def test_noise_documents_are_what_their_label_says(corpus):
    pool = corpus[0]["pool"]
    clean_texts = [r["text"] for r in pool if r["noise"] == "clean"]
    clean_lines = {tuple(sorted(t.splitlines())) for t in clean_texts}
    vocabulary = {w for t in clean_texts for w in re.findall(r"[A-Za-z_]\w+", t)}
    by_kind = {kind: [r["text"] for r in pool if r["noise"] == kind] for kind in NOISE_TYPES}

    assert all(tuple(sorted(t.splitlines())) in clean_lines for t in by_kind["scramble"])
    assert sum(t not in clean_texts for t in by_kind["scramble"]) > 0.9 * len(by_kind["scramble"])
    assert len(set(by_kind["duplicate"])) <= 3 < len(by_kind["duplicate"])
    assert all(set(t.split()) <= vocabulary for t in by_kind["spam"])
    for text in by_kind["blob"]:
        payload = "".join(re.findall(r"'([^']*)'", text))
        assert re.fullmatch(r"[0-9a-f]+", payload) or base64.b64decode(payload, validate=True)


def test_sizes(corpus):
    splits, labels = corpus
    pool_bytes = labels["splits"]["pool"]["bytes"]
    assert 0.6 * 2**20 < pool_bytes < 1.2 * 2**20  # --size-mb 1.0 caps the pool
    for held_out in ("target", "test"):
        assert 200_000 < labels["splits"][held_out]["bytes"] <= 300_000
    clean = [r["text"] for split in splits.values() for r in split if r["noise"] == "clean"]
    assert all(len(t) <= MAX_DOC_BYTES + MIN_DOC_BYTES for t in clean)
    assert sum(MIN_DOC_BYTES <= len(t) for t in clean) > 0.7 * len(clean)


def test_labels_describe_the_build(corpus):
    _, labels = corpus
    assert labels["seed"] == 0 and labels["noise_rate"] == 0.5
    assert set(labels["noise_types"]) == set(NOISE_TYPES)
    assert labels["python_version"] and os.path.isdir(labels["stdlib"])
    assert set(labels["splits"]) == {"pool", "target", "test"}


def test_deterministic_per_seed():
    first, _ = build_demo_corpus(size_mb=0.3, seed=5)
    again, _ = build_demo_corpus(size_mb=0.3, seed=5)
    other, _ = build_demo_corpus(size_mb=0.3, seed=6)
    records = lambda splits: {n: [d.record() for d in docs] for n, docs in splits.items()}  # noqa: E731
    assert records(first) == records(again)
    assert records(first) != records(other)


def test_noise_rate_zero_gives_a_clean_pool():
    splits, labels = build_demo_corpus(size_mb=0.3, noise_rate=0.0)
    assert all(doc.noise == "clean" for doc in splits["pool"])
    assert labels["splits"]["pool"]["noise"]["spam"] == 0


def test_split_into_documents_cuts_at_top_level_without_losing_text():
    functions = "".join(f"def f{i}(x):\n    '''doc'''\n\n    return x + {i}\n\n\n" for i in range(200))
    source = "import os\n\n" + functions + "class Big:\n" + "".join(
        f"    def m{i}(self):\n        return {i}\n\n" for i in range(400)
    )
    documents = split_into_documents(source)
    assert "".join(documents) == source
    assert all(len(d) <= MAX_DOC_BYTES for d in documents)
    assert all(len(d) >= MIN_DOC_BYTES for d in documents[:-1])
    # Every cut is at a def/class (top level or method), never inside a function body.
    assert all(re.match(r"(import|def |class |    def )", d) for d in documents)


def test_module_scan_skips_tests_site_packages_and_non_utf8(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "ok.py").write_text("y = 2\n")
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "latin.py").write_bytes(b"s = '\xe9'\n")
    for skipped in ("test", "site-packages"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "t.py").write_text("z = 3\n")
    assert [name for name, _ in stdlib_modules(str(tmp_path))] == ["ok.py", os.path.join("pkg", "mod.py")]


def test_cli_writes_outputs(tmp_path):
    result = run_tool("make_demo_corpus", "--output-dir", str(tmp_path / "d"), "--size-mb", "0.2", "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "d")) == ["labels.json", "pool.jsonl", "target.jsonl", "test.jsonl"]
    labels = json.loads((tmp_path / "d" / "labels.json").read_text())
    with open(tmp_path / "d" / "pool.jsonl") as f:
        assert labels["splits"]["pool"]["documents"] == sum(1 for _ in f)


def test_cli_bad_arguments(tmp_path):
    assert_user_error(run_tool("make_demo_corpus", "--output-dir", str(tmp_path), "--noise-rate", "1.5"), "--noise-rate")
    (tmp_path / "file").write_text("")
    assert_user_error(run_tool("make_demo_corpus", "--output-dir", str(tmp_path / "file" / "d")), "file")
