"""Flag value forms shared by the command-line tools."""

from typing import Iterable


def key_list(words: Iterable[str]) -> list[str]:
    """JSON keys given either way users know: space-separated words as Megatron-LM's
    ``--json-keys text title``, or comma-separated as ``--meta-keys id,noise`` (or both mixed).
    Repeats are dropped, the order kept."""
    keys = [key.strip() for word in words for key in word.split(",")]
    return list(dict.fromkeys(key for key in keys if key))
