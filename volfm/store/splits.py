"""Deterministic train/val/test assignment for generated cohorts."""
from __future__ import annotations

import numpy as np

SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


def assign_splits(n_cases: int, seed: int = 0, salt: int = 0) -> list[str]:
    """Train/val/test (~70/15/15) for case indices 0..n-1, fixed by (seed, salt); val and test get at
    least one case each once there are three or more cases."""
    n_val = n_test = 0
    if n_cases >= 3:
        n_val = max(1, round(SPLIT_FRACTIONS["val"] * n_cases))
        n_test = max(1, round(SPLIT_FRACTIONS["test"] * n_cases))
    order = np.random.default_rng([int(seed), int(salt)]).permutation(n_cases)
    splits = ["train"] * n_cases
    for pos, idx in enumerate(order):
        if pos < n_test:
            splits[idx] = "test"
        elif pos < n_test + n_val:
            splits[idx] = "val"
    return splits
