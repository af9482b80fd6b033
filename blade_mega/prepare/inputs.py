"""Reading raw text inputs: `.jsonl`, `.jsonl.gz` (one JSON record per line) and `.txt` (one
document per file), named by files, globs or directories. Streams; never holds a whole file
except a single `.txt` document."""

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

from blade_mega.errors import UserError

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")


class InvalidRecord(UserError):
    """One input record cannot be used (bad UTF-8, bad JSON, missing key); `--on-error skip`
    skips these, anything else is fatal."""


@dataclass
class RawRecord:
    """Undecoded bytes of one record: a JSON line or a whole `.txt` file."""

    path: str
    line: int
    data: bytes


def expand_inputs(specs: Sequence[str]) -> List[str]:
    """Files, globs and directories (searched recursively) -> sorted list of input files."""
    paths: List[str] = []
    for spec in specs:
        if glob.has_magic(spec):
            matched = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matched:
                raise UserError(f"no files match --input {spec}; check the pattern")
            paths.extend(matched)
        elif os.path.isdir(spec):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if name.endswith(INPUT_SUFFIXES)
            )
            if not found:
                raise UserError(
                    f"directory {spec} holds no {', '.join(INPUT_SUFFIXES)} files; "
                    "point --input at the data files"
                )
            paths.extend(found)
        elif os.path.isfile(spec):
            if not spec.endswith(INPUT_SUFFIXES):
                raise UserError(
                    f"{spec}: unsupported input type; use {', '.join(INPUT_SUFFIXES)} files"
                )
            paths.append(spec)
        else:
            raise UserError(f"input not found: {spec}; check the path given to --input")
    return list(dict.fromkeys(paths))


def iter_raw_records(paths: Sequence[str]) -> Iterator[RawRecord]:
    """Yield every record of every file in order; blank JSONL lines are not records."""
    for path in paths:
        if path.endswith(".txt"):
            with _open_input(path, open) as f:
                yield RawRecord(path, 1, f.read())
            continue
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with _open_input(path, opener) as f:
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        yield RawRecord(path, line_no, line)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise UserError(f"{path}: damaged gzip file ({err}); recompress or remove it") from None


def _open_input(path: str, opener):
    try:
        return opener(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read input {path} ({err.strerror})") from None


def parse_record(
    raw: RawRecord, json_keys: Sequence[str], meta_keys: Sequence[str] = ()
) -> Dict[str, object]:
    """Decode a raw record into {key: text} for `json_keys` plus the `meta_keys` values.

    Raises InvalidRecord naming file:line.
    """
    where = f"{raw.path}:{raw.line}"
    try:
        text = raw.data.decode("utf-8")
    except UnicodeDecodeError as err:
        # A .txt record is a whole file: name the line the bad byte is on.
        line = raw.line + raw.data.count(b"\n", 0, err.start)
        where = f"{raw.path}:{line}"
        raise InvalidRecord(
            f"{where}: not valid UTF-8 (byte 0x{raw.data[err.start]:02x}); "
            "re-encode the file as UTF-8 or pass --on-error skip"
        ) from None
    if raw.path.endswith(".txt"):
        record: object = {"text": text}
    else:
        try:
            record = json.loads(text)
        except ValueError as err:
            raise InvalidRecord(
                f"{where}: invalid JSON ({err}); fix the line or pass --on-error skip"
            ) from None
        if not isinstance(record, dict):
            raise InvalidRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in list(json_keys) + list(meta_keys):
        if key not in record:
            present = ", ".join(sorted(record)) or "none"
            raise InvalidRecord(
                f"{where}: record has no key {key!r} (keys: {present}); "
                "pass the right --json-keys / --meta-keys"
            )
    for key in json_keys:
        if not isinstance(record[key], str):
            raise InvalidRecord(f"{where}: key {key!r} is not a string")
        try:  # JSON escapes can spell lone surrogates (\ud800), which no tokenizer accepts
            record[key].encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidRecord(
                f"{where}: key {key!r} holds an unpaired surrogate escape "
                f"(\\u{ord(err.object[err.start]):04x}), not text; fix the line or pass "
                "--on-error skip") from None
    return {key: record[key] for key in list(json_keys) + list(meta_keys)}


def iter_texts(paths: Sequence[str], json_keys: Sequence[str], skip_invalid: bool) -> Iterator[str]:
    """The text of every `json_keys` field of every record, in order (for tokenizer training)."""
    for raw in iter_raw_records(paths):
        try:
            record = parse_record(raw, json_keys)
        except InvalidRecord:
            if skip_invalid:
                continue
            raise
        for key in json_keys:
            yield record[key]
