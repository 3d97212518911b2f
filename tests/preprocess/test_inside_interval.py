"""The per-row k-range mask used by the oblique resampling path equals the direct float64 test."""
import numpy as np
import pytest
import torch

from volfm.preprocess.resample import inside_interval


@pytest.mark.parametrize("d", [0.7321, -1.25, 2.0, 0.0, -0.5, 1e-18, -3e-17, 1e-300])
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


def test_a_near_zero_coefficient_of_an_oblique_map_keeps_the_whole_field_of_view():
    """An oblique source's index map has a k-coefficient of ~1e-18 where it should be 0; its quotients must not
    overflow int64 (they once turned a label that covers the target grid into all background)."""
    from volfm.io import Volume  # noqa: PLC0415
    from volfm.preprocess.resample import resample_to_grid  # noqa: PLC0415
    from volfm.testing import rotation  # noqa: PLC0415

    shape = (64, 64, 24)
    aff = np.eye(4)
    aff[:3, :3] = rotation(2, 10) @ rotation(0, 5) @ np.diag([1.2, 1.2, 4.0])
    aff[:3, 3] = np.array([-20.0, 35.0, 12.0]) - aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    tgt = np.diag([1.5, 1.5, 1.5, 1.0])
    tgt[:3, 3] = [-30, 20, 0]  # a 30 mm cube well inside the source
    out = resample_to_grid(Volume(np.ones((1, *shape), np.uint8), aff), tgt, (20, 20, 20), order="nearest").array
    assert int(out.sum()) == out.size
