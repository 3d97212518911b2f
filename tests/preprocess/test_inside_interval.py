"""The per-row k-range mask used by the oblique resampling path equals the direct float64 test."""
import numpy as np
import pytest
import torch

from volfm.preprocess.resample import inside_interval


@pytest.mark.parametrize("d", [0.7321, -1.25, 2.0, 0.0, -0.5])
def test_inside_interval_equals_direct_evaluation(d):
    rng = np.random.default_rng(1)
    partial = torch.from_numpy(rng.uniform(-20, 40, (7, 9)))
    # put some rows exactly on the bounds to exercise ties
    partial[0, 0] = -0.5
    partial[1, 1] = 19.5 - 3 * d
    lo, hi, n_k = -0.5, 19.5, 23
    got = inside_interval(partial, d, n_k, lo, hi)
    c = partial[:, :, None] + d * torch.arange(n_k, dtype=torch.float64)[None, None, :]
    want = (c >= lo) & (c <= hi)
    assert torch.equal(got, want)
