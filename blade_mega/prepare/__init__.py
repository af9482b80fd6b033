"""Offline preparation: raw text -> tokenizer -> Megatron indexed datasets, and their checks."""
