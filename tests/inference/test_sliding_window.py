"""Sliding-window grid + aggregator: coverage, exact reconstruction, equivalence with dense and MONAI
inference, and predictions mapped back onto an oblique, anisotropic source grid."""
import json

import numpy as np
import pytest
import torch

from volfm.inference.sliding_window import SlidingWindowInferer, grid_starts, importance_map, predict_to_source, scan_interval
from volfm.store.arrays import open_array, write_array

RNG = np.random.default_rng(0)


def _coverage(shape, patch, overlap, short_axis="center"):
    starts = grid_starts(shape, patch, overlap, short_axis)
    count = np.zeros(shape, np.int32)
    for s in starts:
        lo = np.maximum(s, 0)
        count[lo[0]:s[0] + patch[0], lo[1]:s[1] + patch[1], lo[2]:s[2] + patch[2]] += 1
    return starts, count


@pytest.mark.parametrize("shape,patch,overlap", [
    ((37, 41, 29), (16, 16, 16), 0.5),  # odd shapes
    ((37, 41, 29), (16, 16, 16), 0.0),
    ((101, 33, 17), (32, 16, 8), 0.25),  # anisotropic patch
    ((64, 48, 40), (32, 16, 8), (0.5, 0.0, 0.7)),  # per-axis overlap
    ((5, 7, 3), (16, 16, 16), 0.5),  # smaller than the patch on every axis
    ((50, 9, 30), (16, 16, 16), 0.6),  # smaller on one axis only
    ((16, 16, 16), (16, 16, 16), 0.5),  # exactly one patch
])
@pytest.mark.parametrize("short_axis", ["center", "start"])
def test_grid_covers_every_voxel(shape, patch, overlap, short_axis):
    starts, count = _coverage(shape, patch, overlap, short_axis)
    assert starts.shape[1] == 3 and starts.dtype == np.int64
    assert (count > 0).all()
    step = scan_interval(patch, overlap)
    for a in range(3):
        axis = np.unique(starts[:, a])
        if shape[a] >= patch[a]:
            assert axis[0] == 0 and axis[-1] == shape[a] - patch[a]  # last window flush with the end
            assert (np.diff(axis) <= step[a]).all()
        else:  # one window, padded: volume centred in it (as MONAI) or at its start
            assert axis.tolist() == ([-((patch[a] - shape[a]) // 2)] if short_axis == "center" else [0])
    # no duplicate windows
    assert len({tuple(s) for s in starts}) == len(starts)


def test_grid_matches_monai_window_placement():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval  # noqa: PLC2701 - MONAI itself is the reference

    for shape, patch, ov in [((300, 300, 300), (96, 96, 96), 0.5), ((37, 41, 29), (16, 12, 8), 0.25),
                             ((61, 50, 47), (16, 20, 12), 0.6)]:
        interval = _get_scan_interval(shape, patch, 3, (ov,) * 3)
        ref = np.array([[s.start for s in sl] for sl in dense_patch_slices(shape, patch, interval)])
        np.testing.assert_array_equal(grid_starts(shape, patch, ov), ref)


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="overlap"):
        grid_starts((10, 10, 10), 4, 1.0)
    with pytest.raises(ValueError, match="patch_size"):
        grid_starts((10, 10, 10), (4, 4), 0.5)
    with pytest.raises(ValueError, match="mode"):
        importance_map((4, 4, 4), "triangle")


def test_importance_map_is_monai_gaussian():
    from monai.data.utils import compute_importance_map

    for patch in [(96, 96, 96), (15, 16, 7)]:
        w = importance_map(patch, "gaussian", 0.125)
        assert w.shape == patch and w.dtype == torch.float32
        assert torch.equal(w, compute_importance_map(patch, "gaussian", 0.125))
        assert float(w.min()) >= 1e-3 and float(w.max()) <= 1.0
        c = tuple(p // 2 for p in patch)
        assert float(w[c]) == pytest.approx(float(w.max()))  # peak at the centre
    assert torch.equal(importance_map((4, 5, 6), "constant"), torch.ones(4, 5, 6))


def identity(x):
    return x


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("kwargs", [{}, {"accumulate_on": "cpu"}, {"max_device_bytes": 1024},
                                    {"accumulate_on": "device", "batch_size": 3}])
def test_identity_model_reproduces_input(mode, kwargs):
    vol = RNG.standard_normal((2, 37, 29, 23)).astype(np.float32)
    inf = SlidingWindowInferer((16, 12, 8), overlap=0.5, mode=mode, **kwargs)
    out = inf(vol, identity)
    assert out.dtype == torch.float32 and tuple(out.shape) == vol.shape
    assert float((out - torch.from_numpy(vol)).abs().max()) < 1e-5
    if kwargs.get("max_device_bytes"):
        assert inf.last_info["accumulate_on"] == "cpu"  # streamed: the accumulators did not fit


@pytest.mark.parametrize("short_axis", ["center", "start"])
def test_identity_small_volume_memmap_and_tensor(tmp_path, short_axis):
    vol = RNG.standard_normal((1, 5, 19, 3)).astype(np.float32)  # smaller than the patch on two axes
    np.save(tmp_path / "image.npy", vol)
    mm = np.load(tmp_path / "image.npy", mmap_mode="r")
    inf = SlidingWindowInferer((8, 8, 8), overlap=0.25, pad_value=-7.0, short_axis=short_axis)
    for src in (mm, torch.from_numpy(vol), vol.astype(np.int16)):
        out = inf(src, identity)
        ref = np.asarray(src, np.float32) if not isinstance(src, torch.Tensor) else vol
        assert tuple(out.shape) == vol.shape
        assert float(np.abs(out.numpy() - ref).max()) < 1e-5
    # the model sees pad_value outside the volume: after the end, and before it when centred
    seen = []
    inf(mm, lambda x: (seen.append(x.clone()), x)[1])
    first = seen[0][0, 0]
    assert float(first[7, 0, 7]) == -7.0
    lead = (8 - 5) // 2 if short_axis == "center" else 0
    assert float(first[lead, 0, (8 - 3) // 2 if short_axis == "center" else 0]) == pytest.approx(float(vol[0, 0, 0, 0]))
    if short_axis == "center":
        assert float(first[0, 0, 0]) == -7.0



def test_stored_array_volume_is_decoded_once(tmp_path):
    """A compressed, compact store array (volfm.store.arrays.StoredArray) goes through inference like its decoded
    ndarray: same output, bit for bit."""
    vol = RNG.standard_normal((1, 21, 17, 11)).astype(np.float32)
    rec = write_array(tmp_path, "mri", vol, {"codec": "blosc2", "dtype": "compact", "chunk_patch": [8, 8, 8]})
    stored = open_array(tmp_path, "mri", rec)
    assert rec["encoding"] == "float16" and stored.dtype == np.float32
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    inf = SlidingWindowInferer((8, 8, 8), overlap=0.5)
    assert torch.equal(inf(stored, conv), inf(np.asarray(stored), conv))

def test_linear_model_matches_dense():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    vol = RNG.standard_normal((3, 33, 26, 21)).astype(np.float32)
    with torch.no_grad():
        dense = conv(torch.from_numpy(vol)[None])[0]
    for mode in ("gaussian", "constant"):
        out = SlidingWindowInferer((16, 16, 8), overlap=0.5, mode=mode, batch_size=2)(vol, conv)
        assert out.shape == dense.shape
        assert float((out - dense).abs().max()) < 1e-5
    # model dtype is respected (float64 model), output stays float32
    conv64 = conv.double()
    out = SlidingWindowInferer((16, 16, 8), overlap=0.5)(vol, conv64)
    assert out.dtype == torch.float32 and float((out - dense).abs().max()) < 1e-5


def _conv_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(8, 2, 3, padding=1)).eval()


@pytest.mark.parametrize("shape,patch,overlap,mode", [
    ((61, 50, 47), (16, 20, 12), 0.5, "gaussian"),
    ((40, 33, 24), (16, 16, 16), 0.25, "constant"),
    ((40, 33, 24), (24, 12, 16), 0.6, "gaussian"),
])
def test_matches_monai_sliding_window(shape, patch, overlap, mode):
    """Same windows (for axes at least as long as the patch), same importance map: same numbers."""
    from monai.inferers import sliding_window_inference

    model = _conv_model()
    vol = RNG.standard_normal((1, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(vol)[None], patch, 4, model, overlap, mode)[0]
    for acc in ("device", "cpu"):
        out = SlidingWindowInferer(patch, overlap, mode, batch_size=4, accumulate_on=acc)(vol, model)
        assert float((out - ref).abs().max()) < 1e-5


def test_short_axis_matches_monai_when_centred():
    """An axis shorter than the patch: centred in the window (default) = MONAI's symmetric padding;
    short_axis="start" (padding after the end only) is a different placement and gives other numbers."""
    from monai.inferers import sliding_window_inference

    model = _conv_model()
    vol = RNG.standard_normal((1, 30, 9, 20)).astype(np.float32)
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(vol)[None], (16, 16, 16), 2, model, 0.5, "gaussian")[0]
    out = SlidingWindowInferer((16, 16, 16), 0.5, batch_size=2)(vol, model)
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 1e-5
    start = SlidingWindowInferer((16, 16, 16), 0.5, batch_size=2, short_axis="start")(vol, model)
    assert start.shape == ref.shape and float((start - ref).abs().max()) > 1e-3


def test_bad_model_and_volume_give_clear_errors():
    vol = np.zeros((1, 20, 20, 20), np.float32)
    inf = SlidingWindowInferer(8, 0.5)
    with pytest.raises(ValueError, match="same spatial size"):
        inf(vol, lambda x: x[:, :, ::2, ::2, ::2])
    with pytest.raises(ValueError, match=r"\(C, I, J, K\)"):
        inf(vol[0], identity)
    with pytest.raises(TypeError, match="must return a tensor"):
        inf(vol, lambda x: [x])
    with pytest.raises(ValueError, match="accumulate_on"):
        SlidingWindowInferer(8, accumulate_on="gpu")


def test_amp_and_progress_run_on_cpu():
    model = _conv_model()
    vol = RNG.standard_normal((1, 24, 20, 18)).astype(np.float32)
    ref = SlidingWindowInferer((16, 16, 16), 0.5)(vol, model)
    out = SlidingWindowInferer((16, 16, 16), 0.5, amp=True, progress=True)(vol, model)  # bfloat16 autocast
    assert out.dtype == torch.float32 and float((out - ref).abs().max()) < 0.1


def test_output_channels_may_differ():
    vol = RNG.standard_normal((1, 21, 18, 17)).astype(np.float32)
    out = SlidingWindowInferer((8, 8, 8), 0.5)(vol, lambda x: torch.cat([x, 2 * x, -x], 1))
    ref = torch.from_numpy(vol)
    assert out.shape == (3, 21, 18, 17)
    assert float((out - torch.cat([ref, 2 * ref, -ref])).abs().max()) < 1e-5


# --- back onto the source grid ---------------------------------------------------------------------

def _oblique_source():
    """A two-class label on an oblique (10 degrees about z, 5 about x), 1.28 x 1.28 x 4 mm grid.

    In-plane voxels not much finer than the 1.5 mm stored ones: a nearest round trip through a grid
    twice as coarse loses about as much as a one-voxel shift, and the map-back must beat that."""
    from volfm.io import Volume
    from volfm.testing import rotation

    shape, spacing = (60, 60, 24), np.array([1.28, 1.28, 4.0])

    aff = np.eye(4)
    aff[:3, :3] = rotation(2, 10) @ rotation(0, 5) @ np.diag(spacing)
    aff[:3, 3] = np.array([-20.0, 35.0, 12.0]) - aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    rel = xyz - np.array([-20.0, 35.0, 12.0])
    lab = np.zeros(len(xyz), np.uint8)
    lab[((rel - [-6, 4, 5]) ** 2 / np.array([16.0, 11.0, 26.0]) ** 2).sum(1) <= 1] = 1  # off-centre ellipsoid
    lab[((rel - [14, -12, -18]) ** 2).sum(1) <= 10.0 ** 2] = 2  # sphere in another corner
    lab = lab.reshape(shape)
    img = (100.0 * lab + RNG.normal(0, 5, shape)).astype(np.float32)
    return (Volume(img[None], aff, {"path": "<oblique image>"}),
            Volume(lab[None], aff, {"path": "<oblique label>"}))


def _dice(a, b, c):
    a, b = a == c, b == c
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _fg_agreement(a, b):
    """Share of voxels labelled alike among those foreground in either (background does not count)."""
    fg = (a > 0) | (b > 0)
    return float((a[fg] == b[fg]).mean())


def _shifted(lab, axis, step):
    """``lab`` moved by one voxel along ``axis`` (step +1 or -1), zero-filled."""
    out = np.zeros_like(lab)
    src, dst = [slice(None)] * 3, [slice(None)] * 3
    src[axis], dst[axis] = (slice(0, -1), slice(1, None)) if step > 0 else (slice(1, None), slice(0, -1))
    out[tuple(dst)] = lab[tuple(src)]
    return out


def _one_voxel_shift_best(truth, score, *args):
    """The best ``score(shifted, truth, *args)`` any copy of the truth moved by one voxel along one axis gets."""
    return max(score(_shifted(truth, a, s), truth, *args) for a in range(3) for s in (1, -1))


def _centroid_offset(mask, truth, affine, stored_affine):
    """World (RAS mm, voxel index -> mm through ``affine``) centroid of ``mask`` minus that of ``truth``,
    in stored voxels along each stored axis."""
    d = affine[:3, :3] @ (np.argwhere(mask).mean(0) - np.argwhere(truth).mean(0))
    return np.linalg.solve(np.asarray(stored_affine)[:3, :3], d)


def test_predictions_land_on_source_labels(tmp_path):
    from volfm.preprocess.pipeline import Pipeline

    img, lab = _oblique_source()
    assert img.is_oblique
    spec = {"spacing": [1.5, 1.5, 1.5], "oblique": "resample",
            "inputs": {"image": {"kind": "image", "intensity": {"type": "none"}}, "label": {"kind": "label"}}}
    case = Pipeline(spec)({"image": img, "label": lab}, case_id="obl1", hash_sources=False)
    stored = case.arrays["label"][0]
    assert not np.allclose(case.affine[:3, :3], img.affine[:3, :3])  # really resampled to another grid
    # "model": identity on the one-hot of the stored label -> class probabilities on the stored grid
    onehot = np.stack([(stored == c) for c in range(3)]).astype(np.float32)
    probs = SlidingWindowInferer((24, 24, 24), 0.5, "gaussian", batch_size=4)(onehot, identity)
    pred = probs.argmax(0)
    assert np.array_equal(pred.numpy(), stored)
    src = lab.array[0]
    # labels: argmax on the stored grid, nearest back to the source grid
    back = predict_to_source(pred[None].to(torch.uint8), case.meta, order="nearest")
    assert back.shape == src.shape and np.allclose(back.affine, lab.affine)
    # probabilities: linear back to the source grid, then argmax
    back_p = predict_to_source(probs, case.meta, input_name="label", order="linear")
    # exact to well under a voxel: each class's world centroid within a quarter of a stored voxel, Dice and
    # foreground agreement above the best that the source label itself moved by one voxel gets
    for how, got in (("nearest", back.array[0]), ("linear", back_p.array.argmax(0))):
        for c in (1, 2):
            off = _centroid_offset(got == c, src == c, lab.affine, case.affine)
            assert np.abs(off).max() <= 0.25, f"{how}: class {c} centroid off by {off} stored voxels"
            dice, bound = _dice(got, src, c), _one_voxel_shift_best(src, _dice, c)
            assert dice > bound, f"{how}: class {c} Dice {dice:.4f} <= {bound:.4f} of a one-voxel shift"
        agree, bound = _fg_agreement(got, src), _one_voxel_shift_best(src, _fg_agreement)
        assert agree > bound, f"{how}: foreground agreement {agree:.4f} <= {bound:.4f} of a one-voxel shift"
    # the check has teeth: a prediction flipped along one stored axis lands elsewhere
    flipped = predict_to_source(np.ascontiguousarray(pred.numpy()[None, ::-1]).astype(np.uint8), case.meta)
    assert _dice(flipped.array[0], src, 1) < 0.6
    meta_path = tmp_path / "meta.json"  # meta.json as the store writes it
    meta_path.write_text(json.dumps(case.meta))
    again = predict_to_source(pred.numpy().astype(np.uint8), meta_path)  # (I, J, K) is taken as one channel
    assert np.array_equal(again.array, back.array)
    with pytest.raises(ValueError, match="does not match the stored grid"):
        predict_to_source(probs[:, :-1], case.meta)


def test_channels_last_gives_the_same_numbers_and_restores_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv3d(4, 2, 3, padding=1)).eval()
    vol = torch.rand(1, 30, 26, 22)
    plain = SlidingWindowInferer((16, 16, 16), memory_format="preserve")(vol, model)
    inf = SlidingWindowInferer((16, 16, 16))  # auto: channels-last for Conv3d models on the CPU
    fast = inf(vol, model)
    assert inf.last_info["memory_format"] == "channels_last_3d"
    assert torch.allclose(plain, fast, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())  # the caller's model is left as it was


def test_channels_last_restores_5d_buffers():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1)).eval()
    model.register_buffer("mask", torch.ones(1, 2, 3, 4, 5))
    SlidingWindowInferer((8, 8, 8))(torch.rand(1, 10, 10, 10), model)
    assert model.mask.is_contiguous() and all(p.is_contiguous() for p in model.parameters())
