"""`volfm predict` on a DICOM series writes, next to ``<name>_seg.nii.gz``, a DICOM SEG ``<name>_seg.dcm`` whose
frames equal the NIfTI prediction on each source slice (checked independently through the NIfTI's affine and each
slice's ImagePositionPatient, as in tests/io/test_dicomseg.py); ``--no-dicom-seg`` and NIfTI inputs write none; a SEG
that cannot be written (a header highdicom cannot use included) is a reported failure that leaves the NIfTI in place
and the batch going; a folder of multi-frame files of different series is one input per file."""
import importlib.util
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

import volfm.cli.predict as vp
from volfm.cli.main import main
from volfm.io import Volume, read_volume, write_nifti
from volfm.preprocess.spec import load_spec
from volfm.synth.ct import make_ct_case
from volfm.testing import write_dicom_series, write_multiframe, write_sr


def _load(name: str, rel: str):
    """A test module loaded by path (with --import-mode=importlib the tests folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_pkg, _seg = _load("_predict_dicomseg_package", "cli/test_package.py"), _load("_predict_dicomseg_io", "io/test_dicomseg.py")
trained = _pkg.trained  # the tiny spleen model of test_package.py (one training step), reused as this module's fixture
check_frames, expected_sections, seg_frames = _seg.check_frames, _seg.expected_sections, _seg.seg_frames
check_multiframe_seg = _seg.check_multiframe_seg


def series_from_volume(vol: Volume, folder, shuffle_seed=None) -> str:
    """Write ``vol`` (one channel, HU) as a single-frame CT series on the same grid (i = columns, j = rows, k =
    slices); file names shuffled when ``shuffle_seed`` is given."""
    a, flip = vol.affine, np.diag([-1.0, -1.0, 1.0])
    sp = np.round(np.sqrt((a[:3, :3] ** 2).sum(0)), 4)  # DS values hold 16 characters
    row, col, normal = (flip @ a[:3, n] / sp[n] for n in range(3))
    assert np.allclose(np.cross(row, col), normal, atol=1e-6)  # slices advance along row x column
    uid = write_dicom_series(folder, np.rint(vol.array[0]).astype(np.int16).transpose(2, 1, 0), flip @ a[:3, 3],
                             row, col, (sp[1], sp[0]), sp[2], intercept=0.0)
    if shuffle_seed is not None:
        files = sorted(folder.glob("*.dcm"))
        for f, k in zip(files, np.random.default_rng(shuffle_seed).permutation(len(files))):
            f.rename(folder / f"im{k:04d}.dcm")
    return uid


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    """An oblique (10 deg) LPS synthetic CT as a DICOM series folder, files in shuffled order."""
    folder = tmp_path_factory.mktemp("dcm") / "scan"
    uid = series_from_volume(make_ct_case(11, shape=(40, 36, 20), orientation="LPS", oblique_deg=10.0)["image"],
                             folder, shuffle_seed=3)
    return folder, uid


def test_predict_dicom_series_writes_a_seg_equal_to_the_nifti(trained, ct_series, tmp_path, capsys):
    ckpt, _ = trained
    folder, uid = ct_series
    out = tmp_path / "pred"
    assert main(["predict", "--ckpt_path", str(ckpt), "--input", str(folder), "--out", str(out), "--no-qc",
                 "--quiet"]) == 0
    assert "DICOM SEG" in capsys.readouterr().out
    nifti, dcm = out / "scan_seg.nii.gz", out / "scan_seg.dcm"
    pred = np.asarray(nib.load(str(nifti)).dataobj)
    assert nib.load(str(nifti)).shape == read_volume(folder).shape and set(np.unique(pred)) == {0, 1}
    ds, frames = seg_frames(dcm)
    assert check_frames(frames, expected_sections(nifti, folder), [1]) == int((pred == 1).any(axis=(0, 1)).sum())
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in folder.iterdir()}
    assert {str(r.ReferencedSOPInstanceUID) for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == sops
    assert ds.SegmentSequence[0].SegmentLabel == "spleen"
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Spleen"
    row = json.loads((out / "predictions.json").read_text())["outputs"][0]
    assert row["output"] == str(nifti) and row["dicom_seg"] == str(dcm)
    assert row["dicom_seg_codes"]["spleen"].startswith("Anatomical Structure / Spleen")


class _Thresholds:
    """A segmentation 'model' with three classes: 1 above one intensity, 2 above a higher one; class 3 is never
    predicted (its segment is described and has no frames)."""

    output_kind = "label"
    patch_size = None
    class_names = ["background", "liver", "kidney_right", "tumor"]

    def to(self, device):
        return self

    def predict_volume(self, image, patch_size=None):
        x = image[0]
        return ((x > np.quantile(x, 0.5)).astype(np.uint8) + (x > np.quantile(x, 0.8))).astype(np.uint8)


def _store(monkeypatch, tmp_path) -> Path:
    """A store holding only the spec (the one of test_package.py's model) and the threshold model in place of
    load_predictor."""
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    spec = load_spec("ct_merlin_demo")
    spec.update(spacing=[10.5, 10.5, 15.0], crop={"size": [32, 32, 32], "mode": "center"})
    (store / "spec.yaml").write_text(yaml.safe_dump({"spec": spec}))
    monkeypatch.setattr(vp, "load_predictor", lambda model: (_Thresholds(), {"datamodule_hyper_parameters": {}}))
    return store


def _predict(monkeypatch, tmp_path, inputs, **kw):
    store = _store(monkeypatch, tmp_path)
    return vp.predict_files("thresholds.ckpt", inputs, tmp_path / "out", store=store, progress=False, qc=False, **kw)


def test_a_folder_of_series_and_a_seg_that_cannot_be_written(monkeypatch, ct_series, tmp_path):
    """Series folders inside a folder each get a SEG (three classes, one never predicted); a series lacking the
    FrameOfReferenceUID a SEG needs, and one without SliceThickness (highdicom raises AttributeError), are reported
    failures with their NIfTI written, and the batch writes predictions.json; --no-dicom-seg and NIfTI inputs write
    no SEG."""
    folder, _ = ct_series
    case = make_ct_case(12, shape=(36, 32, 16), orientation="LPS")["image"]
    root = tmp_path / "in"
    series_from_volume(case, root / "good", shuffle_seed=1)
    series_from_volume(case, root / "nofor")
    series_from_volume(case, root / "nothick")
    for name, tag in (("nofor", "FrameOfReferenceUID"), ("nothick", "SliceThickness")):
        for f in (root / name).iterdir():
            ds = pydicom.dcmread(f)
            delattr(ds, tag)
            ds.save_as(f)
    summary = _predict(monkeypatch, tmp_path, root)
    out = tmp_path / "out"
    assert json.loads((out / "predictions.json").read_text()) == summary
    assert [r["input"] for r in summary["outputs"]] == [str(root / n) for n in ("good", "nofor", "nothick")]
    good, bad, thick = summary["outputs"]
    assert good["dicom_seg"] == str(out / "good_seg.dcm") and "dicom_seg" not in bad
    _, frames = seg_frames(out / "good_seg.dcm")
    assert check_frames(frames, expected_sections(out / "good_seg.nii.gz", root / "good"), [1, 2, 3]) > 4
    assert {k[1] for k in frames} == {1, 2}
    assert good["dicom_seg_codes"]["tumor"].startswith("Morphologically Abnormal Structure / Neoplasm")
    assert (out / "nofor_seg.nii.gz").is_file() and not (out / "nofor_seg.dcm").exists()
    failure, thick_failure = summary["failures"]
    assert failure["input"] == str(root / "nofor") and "FrameOfReferenceUID missing" in failure["error"]
    assert "DICOM SEG not written" in failure["error"] and "\n" not in failure["error"]
    assert bad["dicom_seg_error"] in failure["error"]
    assert thick_failure["input"] == str(root / "nothick") and "dicom_seg" not in thick
    assert "AttributeError" in thick_failure["error"] and str(root / "nothick") in thick_failure["error"]
    assert (out / "nothick_seg.nii.gz").is_file() and not (out / "nothick_seg.dcm").exists()

    no = tmp_path / "no"
    assert main(["predict", "--ckpt_path", "thresholds.ckpt", "--store", str(_store(monkeypatch, tmp_path)), "--input",
                 str(root / "good"), "--out", str(no), "--no-qc", "--quiet", "--no-dicom-seg"]) == 0
    assert (no / "good_seg.nii.gz").is_file() and not list(no.glob("*.dcm"))

    nifti = tmp_path / "nii" / "scan.nii.gz"
    nifti.parent.mkdir()
    write_nifti(case, nifti)
    summary = _predict(monkeypatch, tmp_path, nifti)
    assert not summary["failures"] and "dicom_seg" not in summary["outputs"][0]
    assert not list((tmp_path / "out").glob("scan_seg.dcm"))


def test_a_multiframe_dicom_file_gets_a_seg_over_its_frames(monkeypatch, tmp_path):
    """An enhanced (legacy-converted) CT file given as --input: the SEG references the file's frames by number."""
    case = make_ct_case(13, shape=(36, 32, 16), orientation="LPS", oblique_deg=8.0)["image"]
    series_from_volume(case, tmp_path / "series")
    slices = [pydicom.dcmread(f) for f in sorted((tmp_path / "series").iterdir())]
    for ds in slices:  # what the legacy conversion needs beyond the fixture's tags
        ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName, ds.Manufacturer = "101500", "1", "", "ACME"
        ds.SeriesDate, ds.SeriesTime, ds.ImageType = "20240102", "101500", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.AccessionNumber = "", "", "20240102", ""
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(slices, hd.UID(), 2, hd.UID(), 1)
    mf.save_as(tmp_path / "ct.dcm")
    summary = _predict(monkeypatch, tmp_path, tmp_path / "ct.dcm")
    assert not summary["failures"]
    row = summary["outputs"][0]
    assert row["dicom_seg"] == str(tmp_path / "out" / "ct_seg.dcm")
    assert check_multiframe_seg(row["dicom_seg"], mf, expected_sections(row["output"], tmp_path / "series"),
                                [1, 2, 3]) > 4


def test_a_folder_of_multiframe_files_of_different_series_is_one_input_per_file(monkeypatch, tmp_path):
    """Two Enhanced CT files of different series, named by their SOPInstanceUIDs, and an SR in one folder: each file
    is predicted on its own (NIfTI on its grid, a SEG over its frames); the folder itself could not be read."""
    folder = tmp_path / "export"
    files = {}
    for seed in (14, 15):
        vol = make_ct_case(seed, shape=(32, 28, 12), orientation="LPS")["image"]
        a, flip = vol.affine, np.diag([-1.0, -1.0, 1.0])
        sp = np.round(np.sqrt((a[:3, :3] ** 2).sum(0)), 4)
        row, col = (flip @ a[:3, n] / sp[n] for n in range(2))
        kji = (np.rint(vol.array[0]) + 1024).astype(np.int16).transpose(2, 1, 0)  # stored = HU + 1024
        write_multiframe(folder / "tmp.dcm", kji, flip @ a[:3, 3], row, col, (sp[1], sp[0]), sp[2])
        sop = str(pydicom.dcmread(folder / "tmp.dcm", stop_before_pixels=True).SOPInstanceUID)
        (folder / "tmp.dcm").rename(folder / sop)
        files[sop] = vol
    write_sr(folder / "report.dcm", study_uid="1.2.3.4")
    summary = _predict(monkeypatch, tmp_path, folder)
    assert not summary["failures"]
    assert [r["input"] for r in summary["outputs"]] == [str(folder / sop) for sop in sorted(files)]
    for row in summary["outputs"]:
        sop = Path(row["input"]).name
        assert read_volume(row["output"]).shape == read_volume(row["input"]).shape == files[sop].shape
        ds = pydicom.dcmread(row["dicom_seg"])
        refs = {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                for f in ds.PerFrameFunctionalGroupsSequence if "DerivationImageSequence" in f}
        refs |= {str(r.ReferencedSOPInstanceUID) for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert refs == {sop}
