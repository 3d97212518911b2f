"""volfm.preprocess.pipeline: one planned grid, one resample per input, intensities last."""
import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from volfm import VolfmError
from volfm.io import Volume, read_volume, write_nifti
from volfm.io import affine as geo
from volfm.preprocess.intensity import ct_window
from volfm.preprocess.pipeline import Pipeline, grids_match, to_source_grid
from volfm.preprocess.resample import index_map, resample_to_grid, resample_to_spacing
from volfm.preprocess.spatial import crop_or_pad, reorient
from volfm.testing import centred_affine, index_grid
from volfm.testing import rotation as rot

SPEC_DIR = Path(__file__).resolve().parents[2] / "preprocessing"
SRC_SHAPE = (41, 37, 12)  # odd in-plane sizes: no nearest-neighbour ties at the FOV centre (see test_fused...)
SRC_SP = (0.7, 0.7, 5.0)
CROP = [16, 20, 14]  # crops x and z, pads y of the 19 x 17 x 20 resampled grid
TARGET_SP = [1.5, 1.5, 3.0]


def merlin(**changes):
    spec = yaml.safe_load((SPEC_DIR / "ct_merlin.yaml").read_text())
    spec["crop"]["size"] = list(CROP)
    spec.update(changes)
    return spec


def grid_affine(directions, spacing, shape, centre=(4.0, -6.0, 12.0)):
    return centred_affine(directions, spacing, shape, centre)


def world(affine, shape):
    return geo.voxel_to_world(affine, index_grid(shape))


CENTRE = np.array([4.0, -6.0, 12.0])
BLOB = CENTRE + [3.0, -2.0, 4.0]


def ct_field(xyz):
    """A body (soft tissue, smooth texture) in air, HU."""
    r = np.linalg.norm((xyz - CENTRE) / [12.0, 10.0, 26.0], axis=-1)
    body = 40 + 300 * np.sin(xyz[..., 0] / 6.0) * np.cos(xyz[..., 1] / 5.0) + 5 * xyz[..., 2]
    return np.where(r < 1, body, -1000.0)


def blob_label(xyz, radii=(7.0, 6.0, 14.0), centre=BLOB):
    return (np.linalg.norm((xyz - centre) / radii, axis=-1) < 1).astype(np.uint8)


LPS_DIRS = np.diag([-1.0, -1.0, 1.0])


def ct_case(directions=LPS_DIRS, spacing=SRC_SP, shape=SRC_SHAPE, path_dir=None):
    aff = grid_affine(directions, spacing, shape)
    w = world(aff, shape)
    img = Volume(ct_field(w).astype(np.float32)[None], aff, {"path": "<ct image>"})
    lab = Volume(blob_label(w)[None], aff, {"path": "<ct label>"})
    if path_dir is not None:
        write_nifti(img, path_dir / "ct.nii.gz")
        write_nifti(lab, path_dir / "ct_label.nii.gz")
        img = read_volume(path_dir / "ct.nii.gz")
        lab = read_volume(path_dir / "ct_label.nii.gz", dtype=None)
    return img, lab


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline_case")
    ct_case(path_dir=d)
    return d / "ct.nii.gz", d / "ct_label.nii.gz"


# --- shape, spacing, orientation, meta ------------------------------------------------------------------

def test_merlin_small_crop_output_grid(on_disk):
    img_path, lab_path = on_disk
    pipe = Pipeline(merlin())
    case = pipe({"image": str(img_path), "label": str(lab_path)}, case_id="c001")
    assert read_volume(img_path).orientation == "LPS"
    assert case.shape == tuple(CROP)
    assert case.arrays["image"].shape == (1, *CROP) and case.arrays["image"].dtype == np.float32
    assert case.arrays["label"].shape == (1, *CROP) and case.arrays["label"].dtype == np.uint8
    np.testing.assert_allclose(geo.spacing_from_affine(case.affine), TARGET_SP, rtol=1e-9)
    assert geo.axcodes(case.affine) == "RAS" and not geo.is_oblique(case.affine)
    meta = case.meta
    assert meta["case_id"] == "c001" and meta["spec_name"] == "ct_merlin" and meta["spec_hash"] == pipe.hash
    assert meta["shape"] == CROP and meta["orientation"] == "RAS"
    np.testing.assert_allclose(meta["spacing"], TARGET_SP)
    np.testing.assert_array_equal(np.asarray(meta["affine"]), case.affine)
    assert meta["grid"]["resampled_shape"] == [19, 17, 20]
    assert meta["grid"]["crop_size"] == CROP and meta["grid"]["crop_start"] == [1, -2, 3]
    src = meta["source"]["image"]
    assert src["path"] == str(img_path) and src["shape"] == list(SRC_SHAPE) and src["orientation"] == "LPS"
    assert len(src["sha256"]) == 64 and "sha256" in meta["source"]["label"]
    assert meta["intensity"]["image"]["type"] == "ct_window"
    x = case.arrays["image"]
    assert x.min() >= 0 and x.max() <= 1
    assert np.any(x == 0) and np.any(x > 0.3)  # padded air and tissue
    assert set(np.unique(case.arrays["label"])) == {0, 1}
    # the crop keeps the resampled grid's FOV centre (to within half a voxel of rounding)
    full_aff = np.asarray(meta["grid"]["resampled_affine"])
    d = geo.fov_center(case.affine, case.shape) - geo.fov_center(full_aff, meta["grid"]["resampled_shape"])
    assert np.all(np.abs(d) <= np.asarray(TARGET_SP) / 2 + 1e-9)
    np.testing.assert_allclose(geo.fov_center(full_aff, meta["grid"]["resampled_shape"]),
                               geo.fov_center(read_volume(img_path).affine, SRC_SHAPE), atol=1e-4)


def test_pipeline_from_spec_path_equals_dict(on_disk, tmp_path):
    img_path, lab_path = on_disk
    p = tmp_path / "merlin_small.yaml"
    p.write_text(yaml.safe_dump(merlin()))
    a = Pipeline(p)({"image": str(img_path)}, hash_sources=False)
    b = Pipeline(merlin(), source=str(p))({"image": str(img_path)}, hash_sources=False)
    assert Pipeline(p).hash == Pipeline(merlin()).hash
    np.testing.assert_array_equal(a.arrays["image"], b.arrays["image"])
    assert "label" not in a.arrays  # optional input left out
    # a resolved spec (as stored in meta / spec.yaml) runs again unchanged
    again = Pipeline(copy.deepcopy(Pipeline(p).spec))
    assert again.spec == Pipeline(p).spec


def test_fused_pipeline_equals_step_by_step(on_disk):
    """reorient -> resample_to_spacing -> crop_or_pad -> ct_window, each step on its own, gives the
    pipeline's single resample from the source onto the planned grid."""
    img_path, lab_path = on_disk
    img, lab = read_volume(img_path), read_volume(lab_path, dtype=None)
    case = Pipeline(merlin())({"image": img, "label": lab})

    step = reorient(img, "RAS")
    step = resample_to_spacing(step, TARGET_SP, order="linear", fill=-1000.0)
    step, _ = crop_or_pad(step, CROP, fill=-1000.0)
    step, _ = ct_window(step)
    np.testing.assert_allclose(step.affine, case.affine, atol=1e-9)
    np.testing.assert_allclose(case.arrays["image"], step.array, atol=1e-5)

    lstep = reorient(lab, "RAS")
    lstep = resample_to_spacing(lstep, TARGET_SP, order="nearest")
    # no target point sits on a nearest-neighbour .5 tie of the source (the odd source sizes see to
    # it), so flipping the source axes first cannot change which voxel is nearest
    c = index_grid(lstep.shape) @ index_map(reorient(lab, "RAS").affine, lstep.affine)[:3, :3].T
    c += index_map(reorient(lab, "RAS").affine, lstep.affine)[:3, 3]
    assert np.abs(c - np.floor(c) - 0.5).min() > 1e-3
    lstep, _ = crop_or_pad(lstep, CROP, fill=0)
    np.testing.assert_array_equal(case.arrays["label"], lstep.array)


def one_voxel_shifts(a):
    """Copies of an (I, J, K) array moved by one voxel along each axis, both ways, zero-filled."""
    out = []
    for axis in range(3):
        for src, dst in ((slice(0, -1), slice(1, None)), (slice(1, None), slice(0, -1))):
            s = np.zeros_like(a)
            s[(slice(None),) * axis + (dst,)] = a[(slice(None),) * axis + (src,)]
            out.append(s)
    return out


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def fg_agreement(a, b):
    """Share of voxels labelled alike among those foreground in either (background does not count)."""
    fg = (a > 0) | (b > 0)
    return float((a[fg] == b[fg]).mean())


def centroid_offset(mask, truth, affine, stored_affine):
    """World (RAS mm, voxel index -> mm through ``affine``) centroid of ``mask`` minus that of ``truth``,
    in stored voxels along each stored axis."""
    d = affine[:3, :3] @ (np.argwhere(mask).mean(0) - np.argwhere(truth).mean(0))
    return np.linalg.solve(np.asarray(stored_affine)[:3, :3], d)


# up_in_plane: 5.5 mm, not 6, through plane: with 6 mm stored slices over the blob's six 5 mm source slices,
# the nearest resample onto the stored grid already moves its centroid by 1.8 mm (0.3 slice) and loses as much
# overlap as a one-voxel shift, so no map-back could meet the bounds below
@pytest.mark.parametrize("spacing", [[1.5, 1.5, 3.0], [0.5, 0.5, 5.5]], ids=["down_in_plane", "up_in_plane"])
def test_label_maps_back_to_source(on_disk, spacing):
    img_path, lab_path = on_disk
    lab = read_volume(lab_path, dtype=None)
    spec = merlin(spacing=spacing, crop=None)
    case = Pipeline(spec)({"image": str(img_path), "label": str(lab_path)})
    back = to_source_grid(case.arrays["label"], case.meta, "label")
    np.testing.assert_allclose(back.affine, lab.affine, atol=1e-6)
    assert back.shape == lab.shape
    # exact to well under a voxel: world centroid within a quarter of a stored voxel, Dice and foreground
    # agreement above the best that the source label itself moved by one voxel gets
    got, src = back.array[0], lab.array[0]
    off = centroid_offset(got == 1, src == 1, lab.affine, case.affine)
    assert np.abs(off).max() <= 0.25, f"centroid off by {off} stored voxels"
    d, bound = dice(got == 1, src == 1), max(dice(s == 1, src == 1) for s in one_voxel_shifts(src))
    assert d > bound, f"Dice {d:.4f} <= {bound:.4f} of a one-voxel shift"
    agree, bound = fg_agreement(got, src), max(fg_agreement(s, src) for s in one_voxel_shifts(src))
    assert agree > bound, f"foreground agreement {agree:.4f} <= {bound:.4f} of a one-voxel shift"
    # the default input is the reference image, on the same grid here
    np.testing.assert_array_equal(to_source_grid(case.arrays["label"], case.meta).array, back.array)


def test_continuous_output_maps_back_linearly(on_disk):
    img_path, _ = on_disk
    case = Pipeline(merlin(spacing=[1.0, 1.0, 2.5], crop=None))({"image": str(img_path)})
    back = to_source_grid(case.arrays["image"], case.meta, order="linear")
    src, _ = ct_window(read_volume(img_path))
    err = np.abs(back.array - src.array)
    assert err.mean() < 0.05  # two linear interpolations of a textured image
    # inside the body (air, windowed to 0, does not count) the typical error is below that of the source
    # image itself moved by one voxel along any axis
    s, body = src.array[0], src.array[0] > 0
    bound = min(float(np.median(np.abs(m - s)[body])) for m in one_voxel_shifts(s))
    assert np.median(err[0][body]) < bound, f"median error {np.median(err[0][body]):.4f} >= {bound:.4f} of a one-voxel shift"


# --- input checks ---------------------------------------------------------------------------------------

def test_4d_image_refused_when_channels_is_1(tmp_path):
    img, _ = ct_case()
    four = img.replace(array=np.concatenate([img.array] * 3))
    path = tmp_path / "dyn_4d.nii.gz"
    write_nifti(four, path)
    with pytest.raises(VolfmError) as exc:
        Pipeline(merlin())({"image": str(path)}, case_id="case042")
    msg = str(exc.value)
    assert "case042" in msg and str(path) in msg and "3 channels" in msg and "channels: any" in msg
    case = Pipeline(merlin(channels="any"))({"image": str(path)}, case_id="case042")
    assert case.arrays["image"].shape == (3, *CROP)
    np.testing.assert_array_equal(case.arrays["image"][2], case.arrays["image"][0])


def test_nonfinite_error_and_zero():
    img, _ = ct_case()
    bad = img.array.copy()
    bad[0, 20, 18, 6] = np.nan
    bad[0, 3, 4, 5] = np.inf
    nan_img = img.replace(array=bad, meta={"path": "/data/nan_ct.nii.gz"})
    with pytest.raises(VolfmError, match=r"case nan1.*nan_ct\.nii\.gz.*2 NaN/inf voxels.*nonfinite: zero"):
        Pipeline(merlin())({"image": nan_img}, case_id="nan1")
    out = Pipeline(merlin(nonfinite="zero"))({"image": nan_img}, case_id="nan1")
    assert np.all(np.isfinite(out.arrays["image"]))
    zeroed = img.replace(array=np.where(np.isfinite(bad), bad, 0).astype(np.float32))
    ref = Pipeline(merlin())({"image": zeroed})
    np.testing.assert_array_equal(out.arrays["image"], ref.arrays["image"])
    assert np.all(np.isnan(nan_img.array[0, 20, 18, 6]))  # the input was not modified


def sheared_case():
    """CT-style gantry tilt: the slice axis leans 12 degrees towards y (non-orthogonal columns)."""
    shape = (30, 28, 12)
    a = grid_affine(np.eye(3), (0.8, 0.8, 3.0), shape)
    a[1, 2] = 3.0 * np.tan(np.deg2rad(12))
    a[:3, 3] = CENTRE - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    w = world(a, shape)
    return Volume(ct_field(w).astype(np.float32)[None], a, {"path": "/data/tilted.nii.gz"})


def test_shear_refused_by_default_and_resampled_on_request():
    img = sheared_case()
    assert img.is_sheared and geo.shear_of(img.affine) > 0.1
    with pytest.raises(VolfmError, match=r"case t1.*tilted\.nii\.gz.*shear"):
        Pipeline(merlin())({"image": img}, case_id="t1")
    spec = merlin(shear="resample", crop=None, spacing=[1.0, 1.0, 1.0])
    case = Pipeline(spec)({"image": img}, case_id="t1")
    assert case.meta["grid"]["world_resampled"] == "sheared"
    assert not geo.is_sheared(case.affine) and not geo.is_oblique(case.affine)
    assert geo.axcodes(case.affine) == "RAS"
    np.testing.assert_allclose(geo.spacing_from_affine(case.affine), 1.0)
    # values land at the right world points: compare with the windowed field inside the source
    w = world(case.affine, case.shape)
    src_idx = geo.world_to_voxel(img.affine, w)
    interior = np.all((src_idx >= 1) & (src_idx <= np.asarray(img.shape) - 2), axis=-1)
    truth = (np.clip(ct_field(w), -1000, 1000) + 1000) / 2000
    r = np.linalg.norm((w - CENTRE) / [12.0, 10.0, 26.0], axis=-1)
    smooth_part = interior & (np.abs(r - 1) > 0.25)  # away from the air/tissue step
    assert smooth_part.sum() > 500
    assert np.median(np.abs(case.arrays["image"][0] - truth)[smooth_part]) < 0.01


def test_label_on_another_grid_refused():
    img, lab = ct_case()
    moved = lab.replace(affine=crop_grid_shift(lab.affine, [2.0, 0, 0]), meta={"path": "/data/seg_moved.nii.gz"})
    img = img.replace(meta={"path": "/data/ct_orig.nii.gz"})
    with pytest.raises(VolfmError) as exc:
        Pipeline(merlin())({"image": img, "label": moved}, case_id="g1")
    msg = str(exc.value)
    assert "g1" in msg and "seg_moved.nii.gz" in msg and "ct_orig.nii.gz" in msg and "not on the grid" in msg
    small = lab.replace(array=lab.array[:, :-1], meta={"path": "/data/seg_small.nii.gz"})
    with pytest.raises(VolfmError, match=r"seg_small\.nii\.gz.*ct_orig\.nii\.gz.*shape"):
        Pipeline(merlin())({"image": img, "label": small}, case_id="g1")
    ok, _ = grids_match(img, lab.replace(affine=crop_grid_shift(lab.affine, [5e-4, 0, 0])))
    assert ok


def crop_grid_shift(affine, mm):
    a = np.asarray(affine, float).copy()
    a[:3, 3] += mm
    return a


def test_label_values_checked():
    img, lab = ct_case()
    frac = lab.replace(array=lab.array.astype(np.float32) * 0.5)
    with pytest.raises(VolfmError, match="non-integer"):
        Pipeline(merlin())({"image": img, "label": frac})
    neg = lab.replace(array=lab.array.astype(np.int16) - 1)
    with pytest.raises(VolfmError, match="negative"):
        Pipeline(merlin())({"image": img, "label": neg})
    whole = lab.replace(array=lab.array.astype(np.float32) * 2)  # float class ids are accepted
    case = Pipeline(merlin())({"image": img, "label": whole})
    assert set(np.unique(case.arrays["label"])) == {0, 2}


def test_missing_inputs():
    img, lab = ct_case()
    with pytest.raises(VolfmError, match=r"case m1: required input 'image' is empty"):
        Pipeline(merlin())({"image": "  ", "label": lab}, case_id="m1")
    with pytest.raises(VolfmError, match="required input 'image'"):
        Pipeline(merlin())({"label": lab}, case_id="m1")


# --- oblique --------------------------------------------------------------------------------------------

def oblique_case():
    dirs = LPS_DIRS @ rot(2, 9.0) @ rot(0, -7.0)
    img, lab = ct_case(directions=dirs)
    return img, lab


def test_oblique_resample_gives_ras_aligned_grid():
    img, lab = oblique_case()
    assert img.is_oblique
    case = Pipeline(merlin(crop=None))({"image": img, "label": lab})
    assert case.meta["grid"]["world_resampled"] == "oblique"
    assert not geo.is_oblique(case.affine) and geo.axcodes(case.affine) == "RAS"
    np.testing.assert_allclose(case.affine[:3, :3], np.diag(TARGET_SP), atol=1e-12)
    # the stored grid is the world bounding box, centred on the source FOV centre
    np.testing.assert_allclose(geo.fov_center(case.affine, case.shape), geo.fov_center(img.affine, img.shape),
                               atol=1e-9)
    ref = resample_to_grid(img, case.affine, case.shape, fill=-1000.0)
    np.testing.assert_allclose(case.arrays["image"], ct_window(ref)[0].array, atol=1e-6)
    assert case.arrays["label"].max() == 1


def test_oblique_keep_stays_oblique():
    img, _ = oblique_case()
    case = Pipeline(merlin(oblique="keep", crop=None))({"image": img})
    assert geo.is_oblique(case.affine) and geo.axcodes(case.affine) == "RAS"
    assert "world_resampled" not in case.meta["grid"]
    d_src = geo.direction_from_affine(reorient(img, "RAS").affine)
    np.testing.assert_allclose(geo.direction_from_affine(case.affine), d_src, atol=1e-12)
    # keep -> no interpolation in the stored orientation beyond the spacing change
    direct = resample_to_spacing(reorient(img, "RAS"), TARGET_SP, fill=-1000.0)
    np.testing.assert_allclose(case.arrays["image"], ct_window(direct)[0].array, atol=1e-5)


def test_spacing_null_keeps_reference_spacing_per_world_axis():
    """A sagittal acquisition (array axes A, S, R; 5 mm across R) keeps 5 mm along R after
    reorientation to RAS, not along the output's third axis."""
    a = np.zeros((4, 4))
    a[1, 0], a[2, 1], a[0, 2], a[3, 3] = 1.0, 1.0, 5.0, 1.0
    img = Volume(np.random.default_rng(0).normal(size=(1, 20, 22, 6)).astype(np.float32), a)
    assert img.orientation == "ASR"
    case = Pipeline({"spacing": None, "inputs": {"image": {}}})({"image": img})
    np.testing.assert_allclose(case.meta["spacing"], [5.0, 1.0, 1.0])
    assert case.shape == (6, 20, 22)
    np.testing.assert_allclose(case.arrays["image"], reorient(img, "RAS").array, atol=1e-6)


def test_spacing_follows_output_axes_on_the_world_path():
    img = sheared_case()
    spec = {"orientation": "ASR", "spacing": [1.0, 2.0, 3.0], "shear": "resample", "inputs": {"image": {}}}
    case = Pipeline(spec)({"image": img})
    assert geo.axcodes(case.affine) == "ASR"
    np.testing.assert_allclose(case.meta["spacing"], [1.0, 2.0, 3.0])


# --- paired modalities, foreground crop -------------------------------------------------------------------

def gaussian_blob(xyz, centre, sigma=4.0):
    return np.exp(-0.5 * (np.linalg.norm(xyz - centre, axis=-1) / sigma) ** 2)


def weighted_centroid(array, affine, frac=0.5):
    x = array - np.median(array)
    w = np.where(x > frac * x.max(), x, 0.0)
    idx = index_grid(array.shape).reshape(-1, 3)
    c = (idx * w.reshape(-1, 1)).sum(axis=0) / w.sum()
    return geo.voxel_to_world(affine, c)


def test_paired_modalities_share_the_stored_grid():
    """MRI (LPS, 1.2 mm) and a co-registered PET (RAS, 2.4 mm, slightly smaller FOV) land on one
    stored grid, with the lesion at the same world position in both."""
    hot = CENTRE + [5.0, -4.0, 3.0]
    mri_shape = (40, 36, 30)
    mri_aff = grid_affine(LPS_DIRS, (1.2, 1.2, 1.2), mri_shape)
    w = world(mri_aff, mri_shape)
    head = np.linalg.norm((w - CENTRE) / [20.0, 18.0, 15.0], axis=-1) < 1
    mri = np.where(head, 300 + 200 * gaussian_blob(w, hot), 2.0).astype(np.float32)
    pet_shape = (18, 16, 14)
    pet_aff = grid_affine(np.eye(3), (2.4, 2.4, 2.4), pet_shape, centre=CENTRE + [0.6, -0.3, 0.9])
    wp = world(pet_aff, pet_shape)
    pet = (1.0 + 10 * gaussian_blob(wp, hot)).astype(np.float32)
    spec = yaml.safe_load((SPEC_DIR / "mri_brain.yaml").read_text())
    spec["spacing"] = [1.5, 1.5, 1.5]
    pipe = Pipeline(spec)
    case = pipe({"mri": Volume(mri[None], mri_aff, {"path": "mri.nii.gz"}),
                 "pet": Volume(pet[None], pet_aff, {"path": "pet.nii.gz", "suv_factor": 2.0})}, case_id="p1")
    assert case.arrays["mri"].shape == case.arrays["pet"].shape == (1, *case.shape)
    assert geo.axcodes(case.affine) == "RAS"
    np.testing.assert_allclose(geo.fov_center(case.affine, case.shape), geo.fov_center(mri_aff, mri_shape), atol=1e-9)
    assert case.meta["intensity"]["pet"]["applied"] == "suv" and case.meta["source"]["pet"]["suv_factor"] == 2.0
    c_mri = weighted_centroid(case.arrays["mri"][0], case.affine)
    c_pet = weighted_centroid(case.arrays["pet"][0], case.affine)
    np.testing.assert_allclose(c_mri, hot, atol=0.75)
    np.testing.assert_allclose(c_pet, hot, atol=0.75)
    np.testing.assert_allclose(c_mri, c_pet, atol=0.75)
    # PET values are SUV-scaled, with fill 0 outside its smaller field of view
    assert np.isclose(case.arrays["pet"].max(), 2.0 * pet.max(), rtol=0.1)  # peak blunted by sampling
    assert (case.arrays["pet"] == 0).any()


def test_foreground_crop_centres_on_the_label():
    img, lab = ct_case()
    spec = merlin(crop={"size": [14, 14, 14], "mode": "foreground", "input": "label"})
    case = Pipeline(spec)({"image": img, "label": lab})
    assert case.shape == (14, 14, 14)
    # the label's bounding-box centre (in world) sits at the window's centre, within half a voxel
    ijk = np.argwhere(lab.array[0] > 0)
    centre_world = geo.voxel_to_world(lab.affine, (ijk.min(axis=0) + ijk.max(axis=0)) / 2)
    at = geo.world_to_voxel(case.affine, centre_world)
    assert np.all(np.abs(at - (np.array([14, 14, 14]) - 1) / 2) <= 0.5 + 1e-6), at
    # the whole blob is inside the window, and the window is off the image centre (the blob is)
    assert case.arrays["label"].sum() > 0
    stored = np.argwhere(case.arrays["label"][0] > 0)
    assert stored.min() > 0 and np.all(stored.max(axis=0) < np.array([14, 14, 14]) - 1)
    centre_case = Pipeline(merlin(crop={"size": [14, 14, 14], "mode": "center"}))({"image": img})
    assert not np.allclose(centre_case.affine, case.affine)


def test_foreground_crop_bbox_plus_margin():
    img, lab = ct_case()
    spec = yaml.safe_load((SPEC_DIR / "ct_seg.yaml").read_text())
    spec["crop"]["margin"] = 2
    case = Pipeline(spec)({"image": img, "label": lab})
    full = resample_to_grid(img, np.asarray(case.meta["grid"]["resampled_affine"]),
                            case.meta["grid"]["resampled_shape"], fill=-1000.0)
    # the body (HU > -500) of the source, boxed in the resampled grid, plus 2 voxels, clipped
    body = img.array[0] > -500
    ijk = np.argwhere(body)
    corners = np.array([[a, b, c] for a in (ijk.min(0)[0], ijk.max(0)[0]) for b in (ijk.min(0)[1], ijk.max(0)[1])
                        for c in (ijk.min(0)[2], ijk.max(0)[2])], float)
    idx = geo.world_to_voxel(full.affine, geo.voxel_to_world(img.affine, corners))
    lo = np.maximum(np.floor(idx.min(0) + 1e-6).astype(int) - 2, 0)
    hi = np.minimum(np.ceil(idx.max(0) - 1e-6).astype(int) + 2, np.asarray(full.shape) - 1)
    assert case.meta["grid"]["crop_start"] == lo.tolist()
    assert list(case.shape) == (hi - lo + 1).tolist()
    # no body voxel of the resampled image is lost by the crop
    inside = np.zeros(full.shape, bool)
    inside[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    assert not np.any((full.array[0] > -400) & ~inside)
    assert case.arrays["label"].dtype == np.uint8 and case.arrays["label"].max() == 1


@pytest.mark.parametrize("top,dtype", [(1, np.uint8), (255, np.uint8), (256, np.int16), (40000, np.int32)])
def test_stored_label_dtype_holds_every_class_id(top, dtype):
    img, lab = ct_case()
    big = lab.replace(array=lab.array.astype(np.int32) * top)
    case = Pipeline(merlin())({"image": img, "label": big})
    assert case.arrays["label"].dtype == dtype
    assert set(np.unique(case.arrays["label"])) == {0, top}
