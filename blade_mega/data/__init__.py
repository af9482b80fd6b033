"""Data pipeline: demo corpus, raw-text inputs, tokenisation into indexed datasets, inspection."""
