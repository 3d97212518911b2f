"""`volfm predict` for synthesis writes and scores in stated units: the target file goes through the store's
intensity step (z-score, SUV from DICOM dose tags, x factor) before it is compared, and the written image is in
the target modality's physical units where the stored step can be undone."""
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

import volfm.cli.predict as vp
from volfm.io import Volume, read_volume, write_nifti
from volfm.preprocess.intensity import ct_window, pet_normalize
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.spec import load_spec, validate_spec
from volfm.synth.mripet import make_mripet_cohort
from volfm.testing import pet_tags, write_dicom_series


class _Oracle:
    """A perfect synthesis model: returns the stored-grid target it was given (store units)."""

    output_kind = "image"
    patch_size = None

    def __init__(self, source, target, stored_target):
        self.source_name, self.target_name, self.stored = source, target, stored_target

    def to(self, device):
        return self

    def predict_volume(self, image, patch_size=None):
        assert image.shape[1:] == self.stored.shape
        return self.stored


def _store(root, spec: dict):
    (root / "store").mkdir(parents=True, exist_ok=True)
    (root / "store" / "spec.yaml").write_text(yaml.safe_dump({"spec": spec}))
    return root / "store"


def _predict(monkeypatch, oracle, store, src, tgt, out):
    monkeypatch.setattr(vp, "load_predictor", lambda ckpt: (oracle, {"datamodule_hyper_parameters": {}}))
    summary = vp.predict_files("oracle.ckpt", src, out, store=store, progress=False, qc=False, target=tgt)
    assert not summary["failures"], summary["failures"]
    return summary["outputs"][0]


def test_output_units_undo_the_stored_step_where_it_can_be_undone():
    hu = np.array([[-1000.0, -250.0, 0.0, 40.0, 999.0]], dtype=np.float32)
    v = Volume(hu[:, :, None, None], np.eye(4))
    cfg = {"type": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0, "out_min": 0.0, "out_max": 1.0}
    stored, _ = ct_window(v, **{k: c for k, c in cfg.items() if k != "type"})
    np.testing.assert_allclose(vp.output_units(cfg).to_output(stored.array), v.array, atol=1e-3)
    assert vp.output_units(cfg).name.startswith("HU")
    scaled, _ = pet_normalize(v, mode="scale", factor=0.25)
    back = vp.output_units({"type": "pet", "mode": "scale", "factor": 0.25}).to_output(scaled.array)
    np.testing.assert_allclose(back, v.array, rtol=1e-6)
    assert vp.output_units({"type": "pet", "mode": "suv"}).name == "SUV (body weight)"
    z = vp.output_units({"type": "mri_zscore"})
    assert z.name.startswith("z-score") and z.to_output(hu) is hu


def test_pet2mri_target_is_z_scored_like_the_store_so_its_scale_does_not_matter(tmp_path, monkeypatch):
    table = make_mripet_cohort(tmp_path / "mp", 1, seed=4, spacing=4.0, progress=False)
    mri, pet = tmp_path / "mp" / "mri" / "mripet_0000.nii.gz", tmp_path / "mp" / "pet" / "mripet_0000.nii.gz"
    assert table.is_file() and mri.is_file() and pet.is_file()
    spec = load_spec("mri_pet_demo")
    spec.update(crop=None, reference="pet")
    spec = validate_spec(spec, "test spec")
    stored = Pipeline(spec)({"mri": str(mri), "pet": str(pet)}, "c0").arrays["mri"][0]
    store = _store(tmp_path, spec)
    raw = nib.load(str(mri))
    rescaled = tmp_path / "mri_rescaled.nii.gz"  # the same MRI on another scanner scale
    nib.save(nib.Nifti1Image(np.asarray(raw.dataobj, np.float32) * 1000.0 + 500.0, raw.affine), str(rescaled))

    rows = [_predict(monkeypatch, _Oracle("pet", "mri", stored), store, pet, t, tmp_path / f"out{i}")
            for i, t in enumerate((mri, rescaled))]
    for row in rows:
        assert row["units"].startswith("z-score")
        assert nib.load(row["output"]).header["descrip"].tobytes().startswith(b"volfm synthetic mri, units: z-score")
    m0, m1 = rows[0]["metrics"], rows[1]["metrics"]
    assert m0 == pytest.approx(m1, rel=1e-3)  # scoring does not depend on the target file's scale
    # the perfect model's z-scored MRI against the target z-scored on its own grid: the statistics differ only
    # by the stored grid's resampling; scoring the raw file instead would put the error at the MRI's own scale
    assert m0["mae"] < 0.15 and m0["ssim"] > 0.9
    written = np.asarray(nib.load(rows[0]["output"]).dataobj)
    assert np.abs(written).max() < 20  # z-scores, not scanner units
    assert json.loads((tmp_path / "out0" / "predictions.json").read_text())["outputs"][0]["units"] == rows[0]["units"]


def test_mri2pet_dicom_target_is_scored_in_suv_from_its_dose_tags(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    k, j, i = np.meshgrid(np.arange(12), np.arange(20), np.arange(18), indexing="ij")
    blob = np.exp(-(((i - 9) / 5.0) ** 2 + ((j - 10) / 6.0) ** 2 + ((k - 6) / 4.0) ** 2))
    kji = (20000 * blob + rng.integers(0, 200, blob.shape)).astype(np.int16)  # activity in Bq/ml
    folder = tmp_path / "pet_dicom"
    write_dicom_series(folder, kji, [-40.0, -30.0, -20.0], [1, 0, 0], [0, 1, 0], (4.0, 4.0), 4.0, modality="PT",
                       extra=pet_tags)
    pet = read_volume(folder)
    factor = pet.meta["suv_factor"]
    mri = tmp_path / "mri.nii.gz"
    write_nifti(pet.replace(array=(pet.array.max() - pet.array).astype(np.float32) + 100.0), mri)

    spec = load_spec("mri_pet_demo")
    spec.update(crop=None, spacing=[4.0, 4.0, 4.0], antialias=False)
    spec = validate_spec(spec, "test spec")
    stored = Pipeline(spec)({"mri": str(mri), "pet": str(folder)}, "c0").arrays["pet"][0]
    store = _store(tmp_path, spec)
    row = _predict(monkeypatch, _Oracle("mri", "pet", stored), store, mri, folder, tmp_path / "out")

    assert row["units"].startswith("SUV where the PET had DICOM dose tags")
    written = np.asarray(nib.load(row["output"]).dataobj)
    suv = pet.array[0] * factor
    assert written.max() == pytest.approx(suv.max(), rel=0.02)  # written in SUV, not Bq/ml
    m = row["metrics"]
    assert m["mae"] < 0.01 * suv.max() and m["psnr"] > 40
    # in Bq/ml the same comparison is off by the SUV factor (~1/3900): what scoring the raw file gave
    assert suv.max() / pet.array.max() == pytest.approx(factor) and factor < 1e-3
