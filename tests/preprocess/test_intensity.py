"""volfm.preprocess.intensity: CT windowing, MRI percentile clip + z-score, PET SUV/scale."""
import numpy as np
import pytest

from volfm import VolfmError
from volfm.io import Volume
from volfm.preprocess.intensity import apply_intensity, ct_window, foreground_mask, mri_zscore, otsu_threshold, pet_normalize

AFF = np.diag([0.8, 0.8, 2.0, 1.0])


def vol(arr, **meta):
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[None]
    return Volume(arr, AFF, {"path": "/data/case7.nii.gz", **meta})


# --- CT ----------------------------------------------------------------------------------------------

def test_ct_window_merlin_mapping_exact():
    hu = np.array([-3024, -1500, -1000, -500, 0, 250, 500, 999, 1000, 1001, 3071], dtype=np.int16).reshape(11, 1, 1)
    out, params = ct_window(vol(hu))
    expect = np.array([0, 0, 0, 0.25, 0.5, 0.625, 0.75, 0.9995, 1, 1, 1], dtype=np.float32)
    assert out.array.dtype == np.float32
    np.testing.assert_array_equal(out.array.ravel(), expect)
    assert params == {"type": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0, "out_min": 0.0, "out_max": 1.0}
    np.testing.assert_array_equal(out.affine, AFF)


def test_ct_window_random_values_and_custom_range():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-2000, 2000, (6, 5, 4)).astype(np.float32)
    out, _ = ct_window(vol(hu))
    np.testing.assert_allclose(out.array[0], (np.clip(hu, -1000, 1000) + 1000) / 2000, atol=1e-6)
    assert out.array.min() == 0 and out.array.max() == 1
    out, p = ct_window(vol(hu), hu_min=-160, hu_max=240, out_min=-1, out_max=1)
    np.testing.assert_allclose(out.array[0], (np.clip(hu, -160, 240) + 160) / 400 * 2 - 1, atol=1e-6)
    assert p["hu_min"] == -160 and p["out_min"] == -1


def test_ct_window_does_not_modify_input_and_rejects_empty_window():
    hu = np.full((1, 2, 2, 2), 400.0, dtype=np.float32)
    v = vol(hu)
    ct_window(v)
    assert np.all(v.array == 400.0)
    with pytest.raises(ValueError, match="hu_max > hu_min"):
        ct_window(v, hu_min=100, hu_max=100)


# --- MRI ---------------------------------------------------------------------------------------------

def brain_like(seed=0, shape=(24, 22, 16)):
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = (np.asarray(shape) - 1) / 2
    r = np.sqrt(((i - c[0]) / 9) ** 2 + ((j - c[1]) / 8) ** 2 + ((k - c[2]) / 6) ** 2)
    head = r < 1
    arr = np.where(head, 400 + 80 * rng.standard_normal(shape), 5 * rng.random(shape)).astype(np.float32)
    arr[tuple(c.astype(int))] = 5000.0  # a hot outlier that the percentile clip must tame
    return arr, head


def test_mri_zscore_foreground_standardised():
    arr, head = brain_like()
    out, params = mri_zscore(vol(arr))
    mask = foreground_mask(arr[None], "otsu")
    assert (mask == head).mean() > 0.99  # Otsu separates head from air
    y = out.array[0]
    assert out.array.dtype == np.float32
    np.testing.assert_allclose(y[mask].mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(y[mask].std(), 1.0, atol=1e-4)
    assert np.all(y[~mask] == 0.0)
    (ch,) = params["channels"]
    lo, hi = np.percentile(arr[mask], [0.5, 99.5])
    np.testing.assert_allclose(ch["clip"], [lo, hi])
    assert hi < 1000  # the outlier was clipped ...
    assert y.max() <= (hi - ch["mean"]) / ch["std"] + 1e-4  # ... before the z-score
    np.testing.assert_allclose(ch["mean"], np.clip(arr[mask], lo, hi).mean(), rtol=1e-6)
    np.testing.assert_allclose(ch["std"], np.clip(arr[mask], lo, hi).std(), rtol=1e-6)
    assert params["type"] == "mri_zscore" and params["foreground"] == "otsu"


def test_mri_zscore_background_options_and_percentiles():
    arr, _ = brain_like(1)
    out, params = mri_zscore(vol(arr), lower_percentile=2, upper_percentile=98, foreground="nonzero",
                             background=-3.0)
    mask = arr != 0
    lo, hi = np.percentile(arr[mask], [2, 98])
    np.testing.assert_allclose(params["channels"][0]["clip"], [lo, hi])
    assert params["foreground"] == "nonzero"
    arr2 = arr.copy()
    arr2[:3] = 0.0  # an explicit background for the nonzero mask
    out, _ = mri_zscore(vol(arr2), foreground="nonzero", background=-3.0)
    assert np.all(out.array[0, :3] == -3.0)
    out, p = mri_zscore(vol(arr2), foreground="nonzero", background=None)  # background normalised too
    ch = p["channels"][0]
    np.testing.assert_allclose(out.array[0, :3], (ch["clip"][0] - ch["mean"]) / ch["std"], rtol=1e-5)
    assert ch["clip"][0] > 0  # the zeros were clipped up to the foreground's low percentile
    out, p = mri_zscore(vol(arr), foreground="all")
    np.testing.assert_allclose(out.array[0].mean(), 0, atol=1e-4)
    np.testing.assert_allclose(out.array[0].std(), 1, atol=1e-4)


def test_mri_zscore_multichannel_uses_first_channel_mask():
    arr, head = brain_like(2)
    two = np.stack([arr, 3 * arr + 10])
    out, params = mri_zscore(vol(two))
    assert len(params["channels"]) == 2
    mask = foreground_mask(two, "otsu")
    for c in range(2):
        np.testing.assert_allclose(out.array[c][mask].mean(), 0, atol=1e-4)
        np.testing.assert_allclose(out.array[c][mask].std(), 1, atol=1e-4)
    # a linear rescale of a channel gives the same z-scores
    np.testing.assert_allclose(out.array[1], out.array[0], atol=1e-4)


def test_mri_zscore_empty_foreground_names_source():
    with pytest.raises(VolfmError, match="case7.nii.gz.*foreground"):
        mri_zscore(vol(np.zeros((8, 8, 8), np.float32)), foreground="nonzero")


def test_mri_zscore_constant_foreground_does_not_divide_by_zero():
    arr = np.zeros((8, 8, 8), np.float32)
    arr[2:6, 2:6, 2:6] = 7.0
    out, params = mri_zscore(vol(arr), foreground="nonzero")
    assert np.all(np.isfinite(out.array))
    assert params["channels"][0]["std"] == 1.0
    assert np.all(out.array[0, 2:6, 2:6, 2:6] == 0)


def test_otsu_and_foreground_methods():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, 5000), rng.normal(100, 5, 5000)])
    t = otsu_threshold(x)
    assert 3 < t < 90
    np.testing.assert_array_equal(x > t, np.arange(x.size) >= 5000)
    a = np.zeros((1, 4, 4, 4), np.float32)
    a[0, 1] = 2
    assert foreground_mask(a, "all").all()
    np.testing.assert_array_equal(foreground_mask(a, "nonzero"), a[0] != 0)
    with pytest.raises(ValueError, match="foreground"):
        foreground_mask(a, "kmeans")


# --- PET ---------------------------------------------------------------------------------------------

def pet(**meta):
    rng = np.random.default_rng(4)
    return vol(rng.uniform(0, 20000, (6, 5, 4)).astype(np.float32), **meta)


@pytest.mark.parametrize("mode", ["auto", "suv"])
def test_pet_suv_from_meta(mode):
    v = pet(suv_factor=2.5e-4)
    out, params = pet_normalize(v, mode=mode, factor=3.0)
    np.testing.assert_allclose(out.array, v.array * np.float32(2.5e-4), rtol=1e-6)
    assert params == {"type": "pet", "applied": "suv", "factor": 2.5e-4, "clip_max": None}
    assert out.array.dtype == np.float32


def test_pet_scale_without_suv_factor():
    v = pet()
    out, params = pet_normalize(v, mode="auto", factor=0.5)
    np.testing.assert_allclose(out.array, v.array * 0.5, rtol=1e-6)
    assert params["applied"] == "scale" and params["factor"] == 0.5
    out, params = pet_normalize(pet(suv_factor=2.5e-4), mode="scale", factor=2.0)  # scale ignores the tags
    assert params["applied"] == "scale" and params["factor"] == 2.0
    out, params = pet_normalize(v)
    np.testing.assert_array_equal(out.array, v.array)
    assert params["factor"] == 1.0


def test_pet_suv_mode_without_factor_raises_naming_source():
    with pytest.raises(VolfmError, match=r"case7\.nii\.gz.*no SUV factor.*Units is 'CNTS'"):
        pet_normalize(pet(suv_missing="Units is 'CNTS', SUV needs BQML"), mode="suv")
    with pytest.raises(VolfmError, match=r"case7\.nii\.gz.*no SUV factor"):
        pet_normalize(pet(), mode="suv")


def test_pet_clip_and_bad_mode():
    out, params = pet_normalize(pet(suv_factor=1e-3), clip_max=10.0)
    assert out.array.max() <= 10.0 and out.array.min() >= 0 and params["clip_max"] == 10.0
    with pytest.raises(ValueError, match="pet mode"):
        pet_normalize(pet(), mode="suvlbm")


def test_pet_integer_input():
    v = vol(np.arange(24, dtype=np.int16).reshape(2, 3, 4), suv_factor=0.5)
    out, _ = pet_normalize(v)
    assert out.array.dtype == np.float32
    np.testing.assert_array_equal(out.array.ravel(), np.arange(24) * 0.5)


# --- dispatch ----------------------------------------------------------------------------------------

def test_apply_intensity_dispatch():
    hu = vol(np.linspace(-1200, 1200, 60, dtype=np.float32).reshape(5, 4, 3))
    out, params = apply_intensity(hu, {"type": "ct_window", "hu_min": -1000, "hu_max": 1000})
    np.testing.assert_array_equal(out.array, ct_window(hu)[0].array)
    assert params["type"] == "ct_window"
    same, params = apply_intensity(hu, {"type": "none"})
    assert same is hu and params == {"type": "none"}
    same, params = apply_intensity(hu, None)
    assert same is hu and params == {"type": "none"}
    out, params = apply_intensity(pet(suv_factor=2.0), {"type": "pet", "mode": "auto"})
    assert params["applied"] == "suv"
