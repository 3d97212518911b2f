"""volfm.data.degrade: determinism, monotone levels, bias-field shape, exact slice counts, spec parsing."""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from volfm import VolfmError
from volfm.data.degrade import (
    DEGRADATIONS,
    add_bias_field,
    add_noise,
    bias_field,
    degrade,
    drop_slices,
    parse_degradations,
)


def _volume(seed=0, shape=(2, 20, 22, 18)):
    """Two channels: a smooth positive 'brain' inside a ball, 0 outside (a skull-stripped image)."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape[1:])
    ball = sum((i - (n - 1) / 2) ** 2 for i, n in zip(idx, shape[1:])) <= 8 ** 2
    x = np.stack([ndi.gaussian_filter(rng.random(shape[1:]), 1.5) * 10 + 1 for _ in range(shape[0])])
    return (x * ball).astype(np.float32), ball


LEVELS = {"noise": (0.02, 0.1, 0.3), "bias": (0.05, 0.2, 0.5), "slices": (0.1, 0.3, 0.6)}


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_deterministic_given_seed(name):
    x, _ = _volume()
    a = degrade(x, name, LEVELS[name][1], seed=3)
    b = degrade(x, name, LEVELS[name][1], seed=3)
    c = degrade(x, name, LEVELS[name][1], seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.array_equal(x, _volume()[0])  # the input is not modified
    # a Generator works as well as a seed, and level 0 is the identity
    np.testing.assert_array_equal(DEGRADATIONS[name](x, LEVELS[name][1], np.random.default_rng(3)), a)
    np.testing.assert_array_equal(degrade(x, name, 0.0, seed=3), x)


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_higher_level_deviates_more(name):
    x, _ = _volume(1)
    dev = [float(np.abs(degrade(x, name, level, seed=5) - x).mean()) for level in LEVELS[name]]
    assert 0 < dev[0] < dev[1] < dev[2]


def test_noise_sigma_is_level_times_foreground_std():
    x = np.zeros((1, 40, 40, 40))
    x[0, 10:30, 10:30, 10:30] = np.random.default_rng(0).normal(100, 20, (20, 20, 20))
    fg_std = x[0][x[0] != 0].std()
    out = add_noise(x, 0.5, 7)
    assert (out - x).std() == pytest.approx(0.5 * fg_std, rel=0.02)
    assert np.abs((out - x).mean()) < 0.05 * fg_std
    # a given mask defines the foreground instead
    m = np.zeros((40, 40, 40), bool)
    m[10:20, 10:30, 10:30] = True
    out_m = add_noise(x, 0.5, 7, mask=m)
    assert (out_m - x).std() == pytest.approx(0.5 * x[0][m].std(), rel=0.02)


def test_bias_field_is_smooth_with_mean_one_inside():
    x, ball = _volume(2, (1, 32, 30, 28))
    field = bias_field(x.shape[1:], 0.3, 11, foreground=ball)
    assert field.min() > 0
    assert field[ball].mean() == pytest.approx(1.0, abs=1e-12)
    log_f = np.log(field)
    assert log_f.std() == pytest.approx(0.3, abs=1e-9)  # strength = std of the log-field over the grid
    # smooth: the log-field is a cubic polynomial (4th differences vanish) and changes little per voxel
    for axis in range(3):
        assert np.abs(np.diff(log_f, n=4, axis=axis)).max() < 1e-9
        assert np.abs(np.diff(log_f, axis=axis)).mean() < 0.3 / 5
    # unlike white noise of the same std, whose neighbours differ by ~0.34 on average
    noise = np.random.default_rng(0).normal(0, 0.3, field.shape)
    assert np.abs(np.diff(noise, axis=0)).mean() > 0.3
    # add_bias_field multiplies every channel by that field (foreground from the image itself)
    out = add_bias_field(x, 0.3, 11)
    np.testing.assert_allclose(out[0][ball], (x[0] * field)[ball], rtol=1e-5)
    assert (out[0][~ball] == 0).all()


@pytest.mark.parametrize("fraction,n,expected", [(0.1, 18, 2), (0.25, 18, 5), (0.5, 20, 10), (0.99, 10, 9)])
def test_dropped_slice_count_is_exact(fraction, n, expected):
    x = np.random.default_rng(0).random((2, 6, 5, n)).astype(np.float32) + 1.0
    out, dropped = drop_slices(x, fraction, 4, return_indices=True)
    assert len(dropped) == expected == int((out[0] == 0).all(axis=(0, 1)).sum())
    assert (out[:, :, :, dropped] == 0).all()
    kept = [k for k in range(n) if k not in dropped]
    np.testing.assert_array_equal(out[:, :, :, kept], x[:, :, :, kept])


def test_drop_slices_axis_nearest_and_nesting():
    x = np.arange(8, dtype=np.float64)[None, :, None, None] * np.ones((1, 8, 3, 3))  # slice i holds value i
    out, dropped = drop_slices(x, 0.5, 1, axis=0, fill="nearest", return_indices=True)
    kept = [i for i in range(8) if i not in dropped]
    for d in dropped:
        dist = [abs(k - d) for k in kept]
        nearest = kept[int(np.argmin(dist))]  # argmin takes the first, i.e. the lower on a tie
        assert (out[0, d] == nearest).all()
    # the same seed with a higher fraction drops a superset
    _, more = drop_slices(x, 0.75, 1, axis=0, return_indices=True)
    assert set(dropped) < set(more)
    # a 3D torch input comes back as a 3D torch tensor
    t = torch.ones(4, 5, 6)
    out_t = drop_slices(t, 0.5, 0, axis=1)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == t.shape
    assert int((out_t == 0).all(dim=(0, 2)).sum()) == 3  # round(2.5) half up


def test_parse_degradations():
    assert parse_degradations("noise:0.05,0.1;bias:0.3;slices:0.1,0.2") == [
        ("noise", 0.05), ("noise", 0.1), ("bias", 0.3), ("slices", 0.1), ("slices", 0.2)]
    assert parse_degradations(" slices : 0.5 ; ") == [("slices", 0.5)]


@pytest.mark.parametrize("spec,match", [
    ("", "non-empty"),
    (";", "holds no degradation"),
    ("noise", "name:level"),
    ("noise:", "name:level"),
    ("nosie:0.1", "did you mean 'noise'"),
    ("blur:1", "choose from noise, bias, slices"),
    ("noise:0.1;noise:0.2", "appears twice"),
    ("noise:0.1,abc", "'abc' is not a number"),
    ("noise:-0.1", "must be >= 0"),
    ("slices:1.0", r"must be in \[0, 1\)"),
    ("bias:nan", "must be >= 0"),
])
def test_parse_degradations_errors(spec, match):
    with pytest.raises(VolfmError, match=match):
        parse_degradations(spec)


def test_errors():
    x, _ = _volume()
    with pytest.raises(VolfmError, match="integer seed"):
        add_noise(x, 0.1, None)
    with pytest.raises(VolfmError, match="did you mean 'bias'"):
        degrade(x, "bais", 0.1, seed=0)
    with pytest.raises(VolfmError, match="spatial axis"):
        drop_slices(x, 0.1, 0, axis=3)
    with pytest.raises(VolfmError, match="fill"):
        drop_slices(x, 0.1, 0, fill="mean")
    with pytest.raises(VolfmError, match=r"\[0, 1\)"):
        drop_slices(x, 1.0, 0)
    with pytest.raises(VolfmError, match="shape"):
        add_noise(np.ones((4, 4)), 0.1, 0)
    with pytest.raises(VolfmError, match="mask shape"):
        add_bias_field(x, 0.1, 0, mask=np.ones((3, 3, 3)))
