"""volfm.metrics.synthesis against MONAI's regression metrics, numpy and hand-computed numbers."""
import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from scipy import ndimage as ndi

from volfm import VolfmError
from volfm.metrics.synthesis import (
    MS_SSIM_WEIGHTS,
    default_win_size,
    masked_mae,
    masked_psnr,
    ms_ssim3d,
    regional_uptake_error,
    ssim3d,
    synthesis_metrics,
)


def _pair(seed, shape, noise=0.05, channels=None):
    """A smooth [0, 1] target and a noisy, clipped prediction of it."""
    rng = np.random.default_rng(seed)
    full = shape if channels is None else (channels, *shape)
    t = ndi.gaussian_filter(rng.random(full), 2.0)
    t = (t - t.min()) / (t.max() - t.min())
    p = np.clip(t + noise * rng.normal(size=full), 0.0, 1.0)
    return p, t


def _monai(x):
    x = torch.as_tensor(x, dtype=torch.float32)
    return x[None, None] if x.ndim == 3 else x[None]


def _ball(shape, centre, radius):
    idx = np.indices(shape)
    return sum((i - c) ** 2 for i, c in zip(idx, centre)) <= radius ** 2


# ----------------------------------------------------------------------------------- vs MONAI
@pytest.mark.parametrize("channels", [None, 2])
def test_ssim_equals_monai_gaussian_11(channels):
    p, t = _pair(0, (30, 28, 26), channels=channels)
    ref = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5,
                     k1=0.01, k2=0.03)(_monai(p), _monai(t))
    ours = ssim3d(p, t, data_range=(0.0, 1.0))
    assert ours == pytest.approx(float(ref), abs=1e-4)
    assert ours < 0.95  # not a trivial agreement at 1


def test_ssim_scaling_to_unit_range_equals_monai_on_scaled_images():
    p, t = _pair(1, (26, 24, 30))
    lo, hi = -1.0, 7.0  # e.g. an SUV-like range with some pred values outside it
    p_units, t_units = p * 9.0 - 1.5, t * 9.0 - 1.5  # both exceed [lo, hi] at the extremes
    clip = lambda x: (np.clip(x, lo, hi) - lo) / (hi - lo)  # noqa: E731
    ref = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5)(_monai(clip(p_units)),
                                                                                    _monai(clip(t_units)))
    assert ssim3d(p_units, t_units, data_range=(lo, hi)) == pytest.approx(float(ref), abs=1e-4)
    # scaling and MONAI's own data_range agree when nothing is clipped
    ref2 = SSIMMetric(spatial_dims=3, data_range=9.0, win_size=11)(_monai(p_units), _monai(t_units))
    assert ssim3d(p_units, t_units, data_range=(-1.5, 7.5)) == pytest.approx(float(ref2), abs=1e-4)


@pytest.mark.parametrize("win,shape", [(3, (48, 52, 50)), (5, (80, 84, 82))])
def test_ms_ssim_equals_monai(win, shape):
    p, t = _pair(2, shape, noise=0.1)
    ref = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", kernel_size=win,
                               kernel_sigma=1.5, k1=0.01, k2=0.03, weights=MS_SSIM_WEIGHTS)(_monai(p), _monai(t))
    ours = ms_ssim3d(p, t, data_range=(0.0, 1.0), win_size=win)
    assert ours == pytest.approx(float(ref), abs=1e-4)
    assert ours < 0.99


def test_masked_ms_ssim_matches_monai_maps_averaged_in_pooled_mask():
    p, t = _pair(3, (48, 50, 48), noise=0.1)
    mask = _ball(p.shape, (24, 25, 24), 18)
    x, y, mk = _monai(p).double(), _monai(t).double(), _monai(mask).double()
    values = []
    for s in range(5):
        ssim_map, cs_map = compute_ssim_and_cs(x, y, spatial_dims=3, kernel_size=[3] * 3, kernel_sigma=[1.5] * 3)
        inside = mk[..., 1:-1, 1:-1, 1:-1] >= 0.5
        values.append(float((ssim_map if s == 4 else cs_map)[inside].mean()))
        x, y, mk = (torch.nn.functional.avg_pool3d(a, 2) for a in (x, y, mk))
    expected = float(np.prod(np.maximum(values, 0) ** np.asarray(MS_SSIM_WEIGHTS)))
    assert ms_ssim3d(p, t, mask, data_range=(0.0, 1.0), win_size=3) == pytest.approx(expected, abs=1e-4)
    # an all-True mask is the unmasked value
    assert ms_ssim3d(p, t, np.ones(p.shape, bool), data_range=(0, 1), win_size=3) == pytest.approx(
        ms_ssim3d(p, t, data_range=(0, 1), win_size=3), abs=1e-12)


def test_psnr_equals_monai_and_hand_example():
    p, t = _pair(4, (20, 18, 16), noise=0.07)
    ref = PSNRMetric(max_val=1.0)(_monai(p), _monai(t))
    assert masked_psnr(p, t, data_range=(0.0, 1.0)) == pytest.approx(float(ref), abs=1e-4)
    # hand: SUV target 0..2, prediction off by 0.2 everywhere -> scaled error 0.1 -> MSE 0.01 -> 20 dB
    target = np.linspace(0.2, 1.8, 8 * 8 * 8).reshape(8, 8, 8)
    assert masked_psnr(target + 0.2, target, data_range=(0.0, 2.0)) == pytest.approx(20.0, abs=1e-9)
    # half the voxels wrong by 0.1 (scaled) -> MSE 0.005 -> 10 log10(200)
    pred = target.copy()
    pred[:4] += 0.2
    assert masked_psnr(pred, target, data_range=(0.0, 2.0)) == pytest.approx(10 * math.log10(200), abs=1e-9)
    # inside a mask holding only the wrong half: 20 dB again
    half = np.zeros(target.shape, bool)
    half[:4] = True
    assert masked_psnr(pred, target, half, data_range=(0.0, 2.0)) == pytest.approx(20.0, abs=1e-9)


def test_mae_equals_numpy_in_original_units():
    p, t = _pair(5, (12, 14, 10))
    p, t = p * 1000.0, t * 1000.0  # MRI-like units; MAE is not scaled or clipped
    mask = _ball(p.shape, (6, 7, 5), 4)
    assert masked_mae(p, t) == pytest.approx(np.abs(p - t).mean(), rel=1e-12)
    assert masked_mae(p, t, mask) == pytest.approx(np.abs(p - t)[mask].mean(), rel=1e-12)
    assert masked_mae(torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(mask)) == pytest.approx(
        np.abs(p - t)[mask].mean(), rel=1e-12)
    # a constant offset gives that offset, even beyond the intensity range used for PSNR/SSIM
    r = synthesis_metrics(t + 37.5, t, mask, data_range=(0.0, 500.0))
    assert r["mae"] == pytest.approx(37.5, abs=1e-9)


# ----------------------------------------------------------------------------------- identity
def test_identical_images_give_perfect_scores_and_serialise():
    _, t = _pair(6, (48, 48, 48))
    r = synthesis_metrics(t, t.copy(), data_range=(0.0, 1.0), win_size=3)
    assert r["mae"] == 0.0
    assert r["mse_scaled"] == 0.0
    assert r["psnr"] == math.inf
    assert r["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert r["ms_ssim"] == pytest.approx(1.0, abs=1e-12)
    assert any("PSNR is inf" in n for n in r["notes"])
    text = json.dumps(r)  # Python's json writes inf as Infinity (and NaN as NaN)
    assert '"psnr": Infinity' in text
    assert json.loads(text)["psnr"] == math.inf


def test_protocol_is_recorded():
    p, t = _pair(7, (24, 24, 24))
    t = t * 4.0 + 1.0
    mask = _ball(t.shape, (12, 12, 12), 8)
    r = synthesis_metrics(p * 4.0 + 1.0, t, mask)
    proto = r["protocol"]
    assert proto["data_range"] == [pytest.approx(t[mask].min()), pytest.approx(t[mask].max())]
    assert proto["data_range_source"] == "target_min_max_in_mask"
    assert proto["ssim_window"] == 11 and proto["ssim_sigma"] == 1.5 and proto["k1"] == 0.01 and proto["k2"] == 0.03
    assert proto["ms_ssim_window"] == 11 and proto["ms_ssim_weights"] == list(MS_SSIM_WEIGHTS)
    assert math.isnan(r["ms_ssim"]) and any("MS-SSIM not computed" in n and "176" in n for n in r["notes"])
    assert r["n_mask_voxels"] == int(mask.sum())
    assert synthesis_metrics(p, t, mask, data_range=(1, 5))["protocol"]["data_range_source"] == "given"
    json.dumps(r)


def test_default_range_clips_prediction_to_target_range():
    t = np.linspace(0.0, 1.0, 16 ** 3).reshape(16, 16, 16)
    over = t.copy()
    over[0, 0, 0] = 50.0  # a hot voxel beyond the target's max is clipped for PSNR, not for MAE
    at_max = t.copy()
    at_max[0, 0, 0] = 1.0
    assert masked_psnr(over, t) == pytest.approx(masked_psnr(at_max, t), abs=1e-12)
    assert masked_mae(over, t) > masked_mae(at_max, t)


# ----------------------------------------------------------------------------------- masks
def test_outside_mask_values_do_not_change_mae_psnr():
    p, t = _pair(8, (24, 26, 22))
    mask = _ball(p.shape, (12, 13, 11), 7)
    p2, t2 = p.copy(), t.copy()
    rng = np.random.default_rng(0)
    p2[~mask] = rng.random(int((~mask).sum()))
    t2[~mask] = rng.random(int((~mask).sum()))
    for fn in (masked_mae, lambda a, b, m: masked_psnr(a, b, m, data_range=(0, 1))):
        assert fn(p2, t2, mask) == fn(p, t, mask)


@pytest.mark.parametrize("win", [7, 11])
def test_ssim_ignores_voxels_beyond_the_window_radius_but_not_within(win):
    p, t = _pair(9, (34, 36, 32))
    mask = _ball(p.shape, (17, 18, 16), 6)
    r = (win - 1) // 2
    near = ndi.binary_dilation(mask, np.ones((3, 3, 3), bool), iterations=r)  # Chebyshev distance <= r
    base = ssim3d(p, t, mask, data_range=(0, 1), win_size=win)
    rng = np.random.default_rng(1)
    p2, t2 = p.copy(), t.copy()
    p2[~near] = rng.random(int((~near).sum()))
    t2[~near] = rng.random(int((~near).sum()))
    assert ssim3d(p2, t2, mask, data_range=(0, 1), win_size=win) == base
    # a change just outside the mask (within the window) does move it: the map is computed on the full images
    ring = near & ~mask
    p3 = p.copy()
    p3[ring] = 1.0 - p3[ring]
    assert ssim3d(p3, t, mask, data_range=(0, 1), win_size=win) != pytest.approx(base, abs=1e-6)


def test_ssim_map_is_averaged_inside_the_mask():
    p, t = _pair(10, (24, 24, 24))
    mask = _ball(p.shape, (12, 12, 12), 9)
    value, smap = ssim3d(p, t, mask, data_range=(0, 1), return_map=True)
    assert smap.shape == p.shape
    r = 5  # 11-voxel window on a 24^3 volume
    assert np.isnan(smap[:r]).all() and np.isnan(smap[-r:]).all() and np.isfinite(smap[r:-r, r:-r, r:-r]).all()
    scored = mask & np.isfinite(smap)
    assert value == pytest.approx(smap[scored].mean(), abs=1e-12)
    unmasked = ssim3d(p, t, data_range=(0, 1))
    assert unmasked == pytest.approx(np.nanmean(smap), abs=1e-12)
    r_all = synthesis_metrics(p, t, mask, data_range=(0, 1))
    assert r_all["ssim"] == value
    assert r_all["ssim_unscored_mask_voxels"] == int((mask & np.isnan(smap)).sum()) > 0
    assert any("not in the SSIM mean" in n for n in r_all["notes"])


def test_window_rule_for_small_volumes():
    assert default_win_size((22, 40, 40)) == 11
    assert default_win_size((21, 40, 40)) == 7
    p, t = _pair(11, (16, 18, 20))
    r = synthesis_metrics(p, t, data_range=(0, 1))
    assert r["protocol"]["ssim_window"] == 7
    ref = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7, kernel_sigma=1.5)(_monai(p), _monai(t))
    assert r["ssim"] == pytest.approx(float(ref), abs=1e-4)
    with pytest.raises(VolfmError, match="smaller than the 7-voxel SSIM window"):
        ssim3d(np.zeros((6, 20, 20)), np.ones((6, 20, 20)), data_range=(0, 1))
    with pytest.raises(VolfmError, match="odd"):
        ssim3d(p, t, data_range=(0, 1), win_size=4)


# ----------------------------------------------------------------------------------- regions
def test_regional_uptake_on_hand_built_labels():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[:2] = 1  # 72 voxels each
    labels[2:4] = 2
    labels[4:] = 3
    target = np.select([labels == 1, labels == 2, labels == 3], [1.0, 4.0, 2.0])
    pred = target.copy()
    pred[labels == 1] = 1.5           # +0.5 (+50 %)
    pred[labels == 2] = [3.0, 4.0] * 36  # mean 3.5: -0.5 (-12.5 %)
    # region 3 (reference) predicted 10 % high: SUVR of the others drop by 1/1.1
    pred[labels == 3] = 2.2
    r = regional_uptake_error(pred, target, labels, reference_label="white_matter",
                              names={"background": 0, "csf": 1, "gray_matter": 2, "white_matter": 3})
    gm, csf, wm = r["regions"]["gray_matter"], r["regions"]["csf"], r["regions"]["white_matter"]
    assert csf["voxels"] == 72 and csf["label"] == 1
    assert csf["error"] == pytest.approx(0.5) and csf["rel_error_pct"] == pytest.approx(50.0)
    assert gm["pred_mean"] == pytest.approx(3.5) and gm["target_mean"] == pytest.approx(4.0)
    assert gm["error"] == pytest.approx(-0.5) and gm["abs_error"] == pytest.approx(0.5)
    assert gm["rel_error_pct"] == pytest.approx(-12.5) and gm["abs_rel_error_pct"] == pytest.approx(12.5)
    assert r["mean_abs_error"] == pytest.approx((0.5 + 0.5 + 0.2) / 3)
    assert r["mean_abs_rel_error_pct"] == pytest.approx((50 + 12.5 + 10) / 3)
    # SUVR to white matter: target GM 2.0, pred 3.5 / 2.2
    assert r["reference_label"] == 3 and r["reference_name"] == "white_matter"
    assert gm["target_suvr"] == pytest.approx(2.0) and gm["pred_suvr"] == pytest.approx(3.5 / 2.2)
    assert gm["suvr_error"] == pytest.approx(3.5 / 2.2 - 2.0)
    assert gm["suvr_rel_error_pct"] == pytest.approx(100 * (3.5 / 2.2 / 2.0 - 1))
    assert wm["pred_suvr"] == 1.0 and wm["suvr_error"] == 0.0
    assert r["mean_suvr_abs_error"] == pytest.approx((abs(1.5 / 2.2 - 0.5) + abs(3.5 / 2.2 - 2.0)) / 2)
    # a reference given by value, default names; no reference -> no SUVR keys
    assert regional_uptake_error(pred, target, labels, reference_label=3)["regions"]["label_2"]["pred_suvr"] == \
        pytest.approx(3.5 / 2.2)
    plain = regional_uptake_error(pred, target, labels)
    assert "suvr_error" not in plain["regions"]["label_1"] and "mean_suvr_abs_error" not in plain
    # through synthesis_metrics, with a channel axis and names as a list indexed by value
    full = synthesis_metrics(pred[None], target[None], labels=labels, data_range=(0, 5), reference_label=3,
                             names=["bg", "csf", "gm", "wm"], win_size=3)
    assert full["regional"]["regions"]["gm"]["suvr_error"] == pytest.approx(gm["suvr_error"])
    json.dumps(full)


def test_regional_errors():
    labels = np.zeros((4, 4, 4), np.int64)
    labels[:2] = 1
    x = np.ones((4, 4, 4))
    with pytest.raises(VolfmError, match="does not occur"):
        regional_uptake_error(x, x, labels, reference_label=2)
    with pytest.raises(VolfmError, match="not a region name"):
        regional_uptake_error(x, x, labels, reference_label="cerebellum")
    with pytest.raises(VolfmError, match="only 0"):
        regional_uptake_error(x, x, np.zeros_like(labels))
    with pytest.raises(VolfmError, match="single-channel"):
        regional_uptake_error(np.ones((2, 4, 4, 4)), np.ones((2, 4, 4, 4)), labels)
    with pytest.raises(VolfmError, match="grid"):
        regional_uptake_error(x, x, labels[:3])
    with pytest.raises(VolfmError, match="non-integer"):
        regional_uptake_error(x, x, labels + 0.5)
    with pytest.raises(VolfmError, match="mean 0"):
        regional_uptake_error(x, np.where(labels == 1, 0.0, 1.0), labels, reference_label=1)
    with pytest.raises(VolfmError, match="no name"):
        regional_uptake_error(x, x, labels, names={0: "bg"})


# ----------------------------------------------------------------------------------- input errors
def test_input_errors():
    x = np.ones((8, 8, 8))
    with pytest.raises(VolfmError, match="differs from target shape"):
        masked_mae(x, np.ones((8, 8, 7)))
    bad = x.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(VolfmError, match=r"NaN/inf voxel\(s\) \(first at \(1, 2, 3\)\)"):
        masked_mae(bad, x)
    with pytest.raises(VolfmError, match="mask is empty"):
        masked_mae(x, x, np.zeros((8, 8, 8), bool))
    with pytest.raises(VolfmError, match="does not fit"):
        masked_mae(x, x, np.ones((8, 8), bool))
    with pytest.raises(VolfmError, match="constant"):
        masked_psnr(x, x)
    with pytest.raises(VolfmError, match="lo < hi"):
        masked_psnr(x, x, data_range=(1, 1))
    with pytest.raises(VolfmError, match="pair"):
        masked_psnr(x, x, data_range=1.0)
    with pytest.raises(VolfmError, match="case 7: prediction shape"):
        synthesis_metrics(x, np.ones((8, 8, 7)), case_id=7)


# ----------------------------------------------------------------------------------- realistic case
def test_simulated_pet_metrics_degrade_with_noise():
    from volfm.data.degrade import degrade
    from volfm.synth.mripet import LABELS, make_mripet_case

    case = make_mripet_case(1, "c1", spacing=4.0, orientation="RAS", hypometabolism="none")
    pet, labels = case["pet"].array, case["label"].array[0]
    brain = labels > 0
    results = [synthesis_metrics(degrade(pet, "noise", level, seed=0), pet, brain, data_range=(0.0, 15.0),
                                 labels=labels, names=LABELS, reference_label="white_matter")
               for level in (0.05, 0.2)]
    low, high = results
    assert low["psnr"] > high["psnr"] and low["ssim"] > high["ssim"] and low["mae"] < high["mae"]
    assert set(low["regional"]["regions"]) == {"csf", "gray_matter", "white_matter"}
    # zero-mean noise barely moves region means
    assert low["regional"]["mean_abs_rel_error_pct"] < 2.0
    json.dumps(results)
