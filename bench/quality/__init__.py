"""The selection-quality bench's figures, as pure functions of its runs' evaluation curves:
crossings and budgets (curves.py), paired confidence intervals (paired.py), the per-regime
summary and goals (summary.py)."""
