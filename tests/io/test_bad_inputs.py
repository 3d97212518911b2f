"""Bad inputs give a one-line VolumeReadError that names the file."""
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volfm import VolfmError
from volfm.io import Volume, VolumeReadError, is_image_path, read_volume, write_nifti


def assert_one_line_error(path, **kwargs):
    with pytest.raises(VolumeReadError) as info:
        read_volume(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg and "\r" not in msg
    assert isinstance(info.value, VolfmError)
    return msg


def _nifti_bytes(tmp_path, shape=(40, 40, 40), suffix=".nii.gz"):
    arr = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    src = tmp_path / f"src{suffix}"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(src))
    return src.read_bytes()


@pytest.mark.parametrize("fraction", [0.5, 0.001])
def test_truncated_nii_gz(tmp_path, fraction):
    data = _nifti_bytes(tmp_path)
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: max(1, int(len(data) * fraction))])  # 0.001: cut inside the gzipped header
    msg = assert_one_line_error(path)
    assert "truncated" in msg


def test_truncated_nii(tmp_path):
    data = _nifti_bytes(tmp_path, suffix=".nii")
    path = tmp_path / "cut.nii"
    path.write_bytes(data[: len(data) // 2])
    msg = assert_one_line_error(path)
    assert "truncated" in msg


def test_empty_file(tmp_path):
    for name in ("empty.nii.gz", "empty.nii", "empty.mha"):
        path = tmp_path / name
        path.write_bytes(b"")
        assert "empty" in assert_one_line_error(path)


def test_text_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("subject 12: see the PACS export\n" * 10)
    assert_one_line_error(path)


def test_html_named_nii(tmp_path):
    path = tmp_path / "download.nii"
    path.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                    "<body><h1>Not Found</h1></body></html>\n" * 5)
    assert_one_line_error(path)


def test_garbage_mha_and_nrrd(tmp_path):
    for name in ("x.mha", "x.nrrd"):
        path = tmp_path / name
        path.write_text("this is not\nan image\n")
        assert_one_line_error(path)


def test_truncated_mha(tmp_path):
    img = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32))
    src = tmp_path / "src.mha"
    sitk.WriteImage(img, str(src))
    data = src.read_bytes()
    path = tmp_path / "cut.mha"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(path)


def test_missing_path(tmp_path):
    assert "not found" in assert_one_line_error(tmp_path / "nope" / "missing.nii.gz")


def test_2d_images(tmp_path):
    nii = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)), str(nii))
    assert_one_line_error(nii)
    mha = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(mha))
    assert "2D" in assert_one_line_error(mha)


def test_too_many_dims(tmp_path):
    path = tmp_path / "5d.nii"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2, 2), np.int16), np.eye(4)), str(path))
    assert_one_line_error(path)


def test_unknown_suffix(tmp_path):
    for name in ("scan.png", "scan.img", "scan"):
        path = tmp_path / name
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        assert "not a recognised image" in assert_one_line_error(path)
        assert not is_image_path(path)


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here\n")
    assert "DICOM" in assert_one_line_error(folder)


def test_is_image_path(tmp_path):
    p = tmp_path / "a.NII.GZ"
    write_nifti(Volume(np.zeros((1, 2, 2, 2), np.float32), np.eye(4)), p)
    assert is_image_path(p)
    assert p.read_bytes()[:2] == b"\x1f\x8b"  # gzipped despite the upper-case suffix
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.NII.GZ"]  # no temp file left behind
    assert is_image_path(tmp_path / "b.nrrd") and is_image_path(tmp_path / "c.mha")
    assert not is_image_path(tmp_path / "d.csv")
