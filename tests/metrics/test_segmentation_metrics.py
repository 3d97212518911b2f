"""volfm.metrics.segmentation against hand formulas, scipy distance transforms and MONAI's metric classes."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from volfm import VolfmError
from volfm.metrics.segmentation import (
    aggregate_segmentation_metrics,
    batch_segmentation_metrics,
    hd_key,
    segmentation_metrics,
)


def _blobs(seed, shape=(20, 18, 14), num_classes=4, sigma=2.0):
    """Random smooth label map: argmax of smoothed noise, so every class forms a few blobs."""
    rng = np.random.default_rng(seed)
    field = np.stack([ndi.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(num_classes)])
    field[0] += 0.15  # some background
    return field.argmax(0).astype(np.uint8)


def _scipy_hd(p, t, spacing, percentile):
    """Independent reference: surface voxels by erosion, distances by an exact EDT in mm."""
    ep, et = p ^ ndi.binary_erosion(p), t ^ ndi.binary_erosion(t)
    to_t = ndi.distance_transform_edt(~et, sampling=spacing)[ep]
    to_p = ndi.distance_transform_edt(~ep, sampling=spacing)[et]
    if percentile is None:
        return max(to_t.max(), to_p.max())
    return max(np.percentile(to_t, percentile), np.percentile(to_p, percentile))


def _onehot(labels, num_classes):
    return np.stack([labels == c for c in range(num_classes)]).astype(np.float32)


def test_dice_matches_hand_formula():
    t = np.zeros((6, 5, 4), np.uint8)
    t[:3, :, :] = 1
    t[4:, :2, :] = 2
    p = np.zeros_like(t)
    p[1:4, :, :] = 1
    p[4:, :3, :2] = 2
    r = segmentation_metrics(p, t, 3, (1, 1, 1), class_names=["bg", "a", "b"])
    for name, c in (("a", 1), ("b", 2)):
        inter = np.sum((p == c) & (t == c))
        expected = 2 * inter / (np.sum(p == c) + np.sum(t == c))
        assert r["classes"][name]["dice"] == pytest.approx(expected, abs=1e-6)
        assert r["classes"][name]["pred_voxels"] == np.sum(p == c)
        assert r["classes"][name]["target_voxels"] == np.sum(t == c)
    # hand numbers: a: |T|=60, |P|=60, overlap 40 -> 2/3; b: |T|=16, |P|=12, overlap 8 -> 16/28
    assert r["classes"]["a"]["dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert r["classes"]["b"]["dice"] == pytest.approx(16 / 28, abs=1e-6)
    assert r["mean_dice"] == pytest.approx((2 / 3 + 16 / 28) / 2, abs=1e-6)
    assert "bg" not in r["classes"]
    assert "bg" in segmentation_metrics(p, t, 3, (1, 1, 1), ["bg", "a", "b"], include_background=True)["classes"]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd_of_shifted_cube_in_mm_with_anisotropic_spacing(axis):
    spacing = (0.8, 1.2, 3.0)
    t = np.zeros((20, 20, 20), bool)
    t[6:12, 5:13, 7:12] = True
    p = np.roll(t, 2, axis=axis)  # shifted by 2 voxels
    hd_max = segmentation_metrics(p, t, 2, spacing, percentile=None)["classes"]["class_1"]["hd_mm"]
    assert hd_max == pytest.approx(2 * spacing[axis], abs=1e-5)  # e.g. 2 voxels x 3 mm along K = 6 mm
    assert segmentation_metrics(p, t, 2, spacing, percentile=100)["classes"]["class_1"]["hd100_mm"] == \
        pytest.approx(hd_max, abs=1e-5)
    hd95 = segmentation_metrics(p, t, 2, spacing)["classes"]["class_1"]["hd95_mm"]
    assert hd95 == pytest.approx(_scipy_hd(p, t, spacing, 95), rel=1e-5)
    assert 0 < hd95 <= hd_max + 1e-6


@pytest.mark.parametrize("percentile", [95, 50, None])
def test_hd_of_offset_spheres_matches_scipy_edt(percentile):
    spacing = np.array([0.7, 1.1, 2.5])
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip((40, 32, 16), spacing)], indexing="ij"), -1)
    centre = np.array([14.0, 17.0, 19.0])
    t = np.linalg.norm(grid - centre, axis=-1) <= 9.0
    p = np.linalg.norm(grid - centre - [0.0, 0.0, 4.5], axis=-1) <= 8.0  # moved 4.5 mm along K, smaller
    r = segmentation_metrics(p, t, 2, spacing, percentile=percentile)
    got = r["classes"]["class_1"][hd_key(percentile)]
    assert got == pytest.approx(_scipy_hd(p, t, spacing, percentile), rel=1e-5)
    assert r[f"mean_{hd_key(percentile)}"] == pytest.approx(got)


@pytest.mark.parametrize("seed", range(3))
def test_equals_monai_metric_classes_on_random_blobs(seed):
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    C, B = 4, 2
    target = np.stack([_blobs(seed * 10 + b) for b in range(B)])
    pred = np.stack([_blobs(seed * 10 + b + 100) for b in range(B)])
    for b in range(B):  # every class in both, so MONAI gives finite numbers everywhere
        assert set(np.unique(target[b])) == set(np.unique(pred[b])) == set(range(C))
    spacing = [(0.9, 1.3, 2.0), (1.5, 0.6, 3.5)]
    yp, yt = torch.from_numpy(_onehot(pred, C).swapaxes(0, 1)), torch.from_numpy(_onehot(target, C).swapaxes(0, 1))
    dice = DiceMetric(include_background=False, reduction="none")(yp, yt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(yp, yt,
                                                                                               spacing=spacing)
    out = batch_segmentation_metrics(torch.from_numpy(pred), target, C, spacing, case_ids=["x", "y"])
    for b, case in enumerate(out["cases"]):
        assert case["case_id"] == ["x", "y"][b]
        for c in range(1, C):
            row = case["classes"][f"class_{c}"]
            assert row["dice"] == pytest.approx(float(dice[b, c - 1]), abs=1e-6)
            assert row["hd95_mm"] == pytest.approx(float(hd[b, c - 1]), rel=1e-6)
            assert row["status"] == "ok"
        # the one-hot form of the same case gives the same numbers
        oh = segmentation_metrics(_onehot(pred[b], C), _onehot(target[b], C), C, spacing[b])
        assert oh["classes"] == case["classes"]


def test_input_forms_agree():
    t, p = _blobs(7), _blobs(8)
    ref = segmentation_metrics(p, t, 4, (1, 2, 3))
    for pp, tt in [(p[None], t[None]), (torch.from_numpy(p).long(), torch.from_numpy(t)),
                   (_onehot(p, 4).astype(bool), t[None]), (p.astype(np.float32), _onehot(t, 4))]:
        assert segmentation_metrics(pp, tt, 4, (1, 2, 3))["classes"] == ref["classes"]


def test_empty_cases_follow_the_documented_rules():
    from monai.metrics import DiceMetric

    C = 4
    t = np.zeros((12, 12, 12), np.uint8)
    t[2:6, 2:6, 2:6] = 1  # class 1: in target, nothing predicted -> pred_empty
    t[7:10, 7:10, 7:10] = 2  # class 2: in both -> ok
    p = np.zeros_like(t)
    p[7:10, 7:10, 6:9] = 2
    p[0:2, 0:2, 0:2] = 3  # class 3: predicted, absent from target -> target_empty
    # class 4 (C=5) in neither -> both_empty
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-mask warnings leak from MONAI
        r = segmentation_metrics(p, t, C + 1, (1, 1, 2))
        r1 = segmentation_metrics(p, t, C + 1, (1, 1, 2), ignore_empty=False)
    cls, cls1 = r["classes"], r1["classes"]
    assert [cls[f"class_{c}"]["status"] for c in range(1, 5)] == ["pred_empty", "ok", "target_empty", "both_empty"]
    assert cls["class_1"]["dice"] == 0.0 and cls1["class_1"]["dice"] == 0.0
    assert math.isnan(cls["class_3"]["dice"]) and cls1["class_3"]["dice"] == 0.0
    assert math.isnan(cls["class_4"]["dice"]) and cls1["class_4"]["dice"] == 1.0
    for c in (1, 3, 4):
        assert math.isnan(cls[f"class_{c}"]["hd95_mm"]) and math.isnan(cls1[f"class_{c}"]["hd95_mm"])
    assert math.isfinite(cls["class_2"]["hd95_mm"])
    # the means average the classes present in the target (1 and 2), whatever ignore_empty says
    assert r["present"] == ["class_1", "class_2"] and r["missed"] == ["class_1"]
    assert r["false_positive"] == ["class_3"]
    assert r["mean_dice"] == pytest.approx(cls["class_2"]["dice"] / 2) and r1["mean_dice"] == r["mean_dice"]
    assert r["mean_hd95_mm"] == cls["class_2"]["hd95_mm"]  # a missed class has no HD
    # Dice equals MONAI's DiceMetric for both ignore_empty options, NaNs included
    yp, yt = torch.from_numpy(_onehot(p, C + 1))[None], torch.from_numpy(_onehot(t, C + 1))[None]
    for res, ignore in ((cls, True), (cls1, False)):
        ref = DiceMetric(include_background=False, reduction="none", ignore_empty=ignore)(yp, yt)[0]
        got = torch.tensor([res[f"class_{c}"]["dice"] for c in range(1, C + 1)])
        torch.testing.assert_close(got, ref, equal_nan=True)
    # an empty target: no class present, so the means are NaN
    e = segmentation_metrics(p, np.zeros_like(t), C + 1, (1, 1, 2))
    assert e["present"] == [] and math.isnan(e["mean_dice"]) and math.isnan(e["mean_hd95_mm"])


def test_ignore_index_excludes_voxels_as_monai():
    from monai.metrics import compute_dice

    t, p = _blobs(3), _blobs(4)
    t = t.copy()
    t[:6] = 255
    r = segmentation_metrics(p, t, 4, (1, 1, 1), ignore_index=255)
    ref = compute_dice(torch.from_numpy(p)[None, None], torch.from_numpy(t.astype(np.int64))[None, None],
                       include_background=False, num_classes=4, ignore_index=255)[0]
    got = torch.tensor([r["classes"][f"class_{c}"]["dice"] for c in range(1, 4)])
    torch.testing.assert_close(got, ref)
    # same as cutting the ignored slab away
    cut = segmentation_metrics(p[6:], t[6:], 4, (1, 1, 1))
    for c in range(1, 4):
        a, b = r["classes"][f"class_{c}"], cut["classes"][f"class_{c}"]
        assert a["dice"] == pytest.approx(b["dice"], abs=1e-6) and a["target_voxels"] == b["target_voxels"]
    with pytest.raises(VolfmError, match="outside 0..3"):
        segmentation_metrics(p, t, 4, (1, 1, 1))
    with pytest.raises(VolfmError, match="label map, not one-hot"):
        segmentation_metrics(p, _onehot(_blobs(3), 4), 4, (1, 1, 1), ignore_index=255)


def test_aggregate_over_cases():
    cases = [segmentation_metrics(_blobs(s + 20), _blobs(s), 4, (1, 1, 2), case_id=s) for s in range(4)]
    empty = segmentation_metrics(_blobs(30), np.zeros((20, 18, 14), np.uint8), 4, (1, 1, 2), case_id="empty")
    agg = aggregate_segmentation_metrics(cases + [empty])
    assert agg["n_cases"] == 5
    for name in ("class_1", "class_2", "class_3"):
        d = np.array([c["classes"][name]["dice"] for c in cases])
        a = agg["classes"][name]
        assert a["dice"]["n"] == 4  # the empty target's NaN Dice is left out
        assert a["dice"]["mean"] == pytest.approx(d.mean()) and a["dice"]["std"] == pytest.approx(d.std(ddof=1))
        assert a["status"] == {"ok": 4, "pred_empty": 0, "target_empty": 1, "both_empty": 0}
        assert a["hd95_mm"]["n"] == 4
    m = np.array([c["mean_dice"] for c in cases])
    assert agg["mean_dice"] == {"mean": pytest.approx(m.mean()), "std": pytest.approx(m.std(ddof=1)), "n": 4}
    one = aggregate_segmentation_metrics(cases[:1])
    assert math.isnan(one["classes"]["class_1"]["dice"]["std"]) and one["classes"]["class_1"]["dice"]["n"] == 1
    with pytest.raises(VolfmError, match="different percentiles"):
        aggregate_segmentation_metrics([cases[0], segmentation_metrics(_blobs(1), _blobs(2), 4, (1, 1, 1),
                                                                       percentile=None)])


def test_class_names_from_labels_mapping():
    from volfm.synth.ct import LABELS

    t = np.zeros((8, 8, 8), np.uint8)
    t[2:5, 2:5, 2:5] = 2
    r = segmentation_metrics(t, t, len(LABELS), (1, 1, 1), class_names=LABELS)
    assert list(r["classes"]) == [LABELS[c] for c in range(1, len(LABELS))]
    assert r["classes"]["spleen"]["dice"] == 1.0 and r["classes"]["spleen"]["hd95_mm"] == 0.0
    assert r["present"] == ["spleen"] and r["mean_dice"] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(pred=np.zeros((4, 4, 4)), target=np.zeros((4, 4, 5))), "differs from target grid"),
    (dict(spacing=(1, 1)), "three positive voxel sizes"),
    (dict(spacing=(1, 0, 1)), "three positive voxel sizes"),
    (dict(pred=np.full((3, 4, 4, 4), 0.5)), "threshold or argmax"),
    (dict(pred=np.zeros((2, 4, 4, 4))), r"expected \(I, J, K\)"),
    (dict(pred=np.full((4, 4, 4), 0.5)), "non-integer"),
    (dict(num_classes=1), "num_classes must be an integer >= 2"),
    (dict(percentile=120), "percentile"),
    (dict(class_names=["a", "b"]), "2 names for num_classes=3"),
    (dict(class_names=["a", "b", "a"]), "duplicates"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = dict(pred=np.zeros((4, 4, 4), np.uint8), target=np.zeros((4, 4, 4), np.uint8), num_classes=3,
                spacing=(1, 1, 1), case_id="c7")
    args.update(kwargs)
    with pytest.raises(VolfmError, match=match) as err:
        segmentation_metrics(**args)
    assert "case c7" in str(err.value) or "class_names" in str(err.value)


def test_with_a_label_map():
    from volfm.synth.ct import LABELS
    from volfm.targets.labelmap import LabelMap

    lm = LabelMap.from_yaml({"classes": {"kidney": ["kidney_left", "kidney_right"]}, "ignore": ["spine"]}, LABELS)
    src = np.zeros((1, 10, 10, 10), np.uint8)
    src[0, 1:4, 1:4, 1:4], src[0, 6:9, 6:9, 6:9], src[0, :, :, 0] = 3, 4, 8
    target = lm.remap(src)
    pred = np.where(target == 255, 0, target)[0]
    pred[1:4, 1:4, 3] = 0  # one slab of the left kidney missed
    r = segmentation_metrics(pred, target, lm.num_classes, (1, 1, 1), class_names=lm, ignore_index=lm.ignore_index)
    inter = 27 + 27 - 9  # spine voxels at k=0 are ignored; the left kidney lost its k=3 slab
    assert r["classes"]["kidney"]["dice"] == pytest.approx(2 * inter / (54 + inter), abs=1e-6)
    assert r["classes"]["kidney"]["target_voxels"] == 54
