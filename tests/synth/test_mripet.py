"""Tests for the simulated paired MRI/PET generator (volfm.synth.mripet)."""
import csv
import json

import numpy as np
import pytest

from volfm import VolfmError
from volfm.io import axcodes, read_volume, spacing_from_affine, voxel_to_world
from volfm.synth import mripet as sm

SP = 3.0


@pytest.fixture(scope="module")
def case():
    return sm.make_mripet_case(1, "c1", spacing=SP)


def _world_grid(affine, shape):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return voxel_to_world(affine, idx)


def test_deterministic_for_a_seed():
    a = sm.make_mripet_case(7, "x", spacing=SP)
    b = sm.make_mripet_case(np.random.default_rng(7), "x", spacing=SP)
    for key in ("mri", "pet", "label"):
        np.testing.assert_array_equal(a[key].array, b[key].array)
        np.testing.assert_array_equal(a[key].affine, b[key].affine)
    assert a["metadata"] == b["metadata"]
    c = sm.make_mripet_case(8, "x", spacing=SP)
    assert not np.array_equal(a["pet"].array, c["pet"].array)


def test_shared_grid_labels_and_types(case):
    mri, pet, label = case["mri"], case["pet"], case["label"]
    assert mri.shape == pet.shape == label.shape
    np.testing.assert_array_equal(mri.affine, pet.affine)
    np.testing.assert_array_equal(mri.affine, label.affine)
    np.testing.assert_allclose(spacing_from_affine(mri.affine), [SP] * 3)
    assert axcodes(mri.affine) == case["metadata"]["orientation"]
    assert label.array.dtype == np.uint8
    assert set(np.unique(label.array)) <= {0, 1, 2, 3}
    assert set(np.unique(label.array)) == {0, 1, 2, 3}
    assert mri.array.dtype == pet.array.dtype == np.float32
    assert np.all(np.isfinite(pet.array)) and pet.array.min() >= 0
    assert case["metadata"]["simulated"] is True


def test_tissue_contrast(case):
    lab, t1, pet = case["label"].array[0], case["mri"].array[0], case["pet"].array[0]
    csf_t1, gm_t1, wm_t1 = (t1[lab == k].mean() for k in (1, 2, 3))
    assert wm_t1 > gm_t1 > csf_t1
    assert 300 < wm_t1 < 1200
    gm_pet, wm_pet, csf_pet = (pet[lab == k].mean() for k in (2, 3, 1))
    # Measured GM/WM is well below the true 3-4x uptake ratio: 5-7 mm PET blur and partial volume.
    assert gm_pet > 1.3 * wm_pet > 1.3 * csf_pet
    assert 5.0 < gm_pet < 12.0 and 2.0 < wm_pet < 7.0
    meta = case["metadata"]["pet"]
    assert 2.9 < meta["suv_gm"] / meta["suv_wm"] < 4.2
    assert 2.0 <= meta["suv_wm"] <= 3.0


def test_mri_and_pet_coregistered(case):
    lab, pet = case["label"].array[0], case["pet"].array[0]
    brain = lab > 0
    gm = (lab == 2).astype(np.float32)
    r0 = np.corrcoef(pet[brain], gm[brain])[0, 1]
    assert r0 > 0.5
    for axis in range(3):   # the match is best without a shift
        for shift in (-2, 2):
            moved = np.roll(gm, shift, axis=axis)
            assert np.corrcoef(pet[brain], moved[brain])[0, 1] < r0 - 0.05


def test_world_coordinates_sane(case):
    lab, affine = case["label"].array[0], case["label"].affine
    centre = voxel_to_world(affine, np.argwhere(lab > 0).mean(axis=0))
    # The ICBM152 brain centroid is about (0, -22, 10) mm; subjects are moved by a few mm only.
    assert np.linalg.norm(centre - np.array([0.0, -22.0, 10.0])) < 12.0
    assert np.linalg.norm(centre) < 30.0
    assert abs(centre[0]) < 6.0


def test_orientation_changes_only_the_array_order():
    ras = sm.make_mripet_case(3, "o", spacing=SP, orientation="RAS")
    lps = sm.make_mripet_case(3, "o", spacing=SP, orientation="LPS")
    assert axcodes(ras["label"].affine) == "RAS" and axcodes(lps["label"].affine) == "LPS"
    shape = ras["label"].shape
    ijk = np.array([[0, 0, 0], [5, 7, 9], [shape[0] - 1, shape[1] - 1, shape[2] - 1]])
    flipped = np.stack([shape[0] - 1 - ijk[:, 0], shape[1] - 1 - ijk[:, 1], ijk[:, 2]], axis=1)
    np.testing.assert_allclose(voxel_to_world(ras["label"].affine, ijk),
                               voxel_to_world(lps["label"].affine, flipped), atol=1e-6)
    same = ras["label"].array[0] == lps["label"].array[0][::-1, ::-1, :]
    assert same.mean() > 0.999


def _left_right_gm_pet(c, region="left_temporal"):
    lab, pet = c["label"].array[0], c["pet"].array[0]
    world = _world_grid(c["pet"].affine, lab.shape)
    centre, radii = (np.asarray(v) for v in sm.HYPO_REGIONS[region])
    mirror = centre * np.array([-1.0, 1.0, 1.0])
    inside = lambda cen: (((world - cen) / radii) ** 2).sum(axis=-1) < 0.6  # noqa: E731
    gm = lab == 2
    return pet[gm & inside(centre)].mean(), pet[gm & inside(mirror)].mean()


def test_hypometabolism_on_the_named_side():
    hypo = sm.make_mripet_case(5, "h", spacing=SP, orientation="LPS", hypometabolism="left_temporal")
    assert hypo["metadata"]["hypometabolism"] == "left_temporal"
    left, right = _left_right_gm_pet(hypo)
    assert left < 0.85 * right
    normal = sm.make_mripet_case(5, "h", spacing=SP, orientation="LPS", hypometabolism="none")
    assert normal["metadata"]["hypometabolism"] == "none"
    left, right = _left_right_gm_pet(normal)
    assert 0.9 < left / right < 1.1
    # Forcing the region changes the PET only: same anatomy, MRI and labels for the same seed.
    np.testing.assert_array_equal(hypo["mri"].array, normal["mri"].array)
    np.testing.assert_array_equal(hypo["label"].array, normal["label"].array)
    assert not np.array_equal(hypo["pet"].array, normal["pet"].array)


def test_cohort_files_and_csv(tmp_path):
    csv_path = sm.make_mripet_cohort(tmp_path / "cohort", 3, seed=0, spacing=SP, progress=False)
    assert csv_path == tmp_path / "cohort" / "cohort.csv"
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert tuple(reader.fieldnames) == sm.CSV_COLUMNS
    assert len(rows) == 3
    assert sorted(r["split"] for r in rows) == ["test", "train", "val"]
    assert all(r["note"] == "simulated" for r in rows)
    assert {r["sex"] for r in rows} <= {"F", "M"}
    assert all(55 <= int(r["age"]) <= 85 for r in rows)
    assert all(r["hypometabolism"] in {"none", *sm.HYPO_REGIONS} for r in rows)
    for row in rows:
        vols = {}
        for key in ("mri", "pet", "label"):
            assert row[key] == f"{key}/{row['case_id']}.nii.gz"  # relative to the CSV's folder
            vols[key] = read_volume(csv_path.parent / row[key], dtype=None)
        assert vols["mri"].shape == vols["pet"].shape == vols["label"].shape
        np.testing.assert_allclose(vols["mri"].affine, vols["pet"].affine, atol=1e-5)
        np.testing.assert_allclose(vols["mri"].affine, vols["label"].affine, atol=1e-5)
        assert vols["label"].array.dtype == np.uint8
        assert set(np.unique(vols["label"].array)) <= {0, 1, 2, 3}
    # Files hold exactly the in-memory case for the per-case seed (case i depends on (seed, i)).
    first = sm.make_mripet_case(np.random.SeedSequence(0).spawn(3)[0], rows[0]["case_id"], spacing=SP)
    on_disk = read_volume(csv_path.parent / rows[0]["mri"])
    np.testing.assert_array_equal(on_disk.array, first["mri"].array)
    np.testing.assert_allclose(on_disk.affine, first["mri"].affine, atol=1e-5)
    np.testing.assert_allclose(read_volume(csv_path.parent / rows[0]["pet"]).array, first["pet"].array)
    assert json.loads((csv_path.parent / "labels.json").read_text()) == sm.LABELS
    assert "SIMULATED" in (csv_path.parent / "README.txt").read_text()


def test_splits_deterministic_and_proportional():
    s = sm.assign_splits(20, seed=4)
    assert s == sm.assign_splits(20, seed=4)
    assert (s.count("train"), s.count("val"), s.count("test")) == (14, 3, 3)
    assert sm.assign_splits(2) == ["train", "train"]


def test_missing_template_names_the_file(tmp_path):
    with pytest.raises(VolfmError, match="mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"):
        sm.template_paths(tmp_path)
    with pytest.raises(VolfmError, match="not found"):
        sm.make_mripet_case(0, "x", spacing=SP, data_dir=tmp_path)


def test_bad_arguments():
    with pytest.raises(VolfmError, match="orientation"):
        sm.make_mripet_case(0, "x", spacing=SP, orientation="XYZ")
    with pytest.raises(VolfmError, match="hypometabolism"):
        sm.make_mripet_case(0, "x", spacing=SP, hypometabolism="cerebellum")
    with pytest.raises(VolfmError, match="spacing"):
        sm.make_mripet_case(0, "x", spacing=0.0)
