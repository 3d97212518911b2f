"""The ISA-L in-memory .nii.gz path must give exactly what nibabel's own reader gives."""
import hashlib

import nibabel as nib
import numpy as np
import pytest

from volfm.io import readers
from volfm.io.readers import read_volume


def _fixtures(tmp_path):
    rng = np.random.default_rng(0)
    aff = np.diag([-0.8, 0.9, 2.5, 1.0])
    aff[:3, 3] = [10, -20, 30]
    a = rng.integers(-1000, 2000, (17, 13, 9)).astype(np.int16)
    out = {}
    out["int16"] = nib.Nifti1Image(a, aff)
    out["float32"] = nib.Nifti1Image(rng.normal(size=(11, 7, 5)).astype(np.float32), aff)
    out["big_endian"] = nib.Nifti1Image(a.astype(">i2"), aff)
    scaled = nib.Nifti1Image(a, aff)
    scaled.header.set_slope_inter(2.0, -1024.0)
    out["scaled"] = scaled
    out["nifti2"] = nib.Nifti2Image(a, aff)
    out["4d"] = nib.Nifti1Image(rng.normal(size=(6, 5, 4, 3)).astype(np.float32), aff)
    paths = {}
    for name, img in out.items():
        p = tmp_path / f"{name}.nii.gz"
        nib.save(img, str(p))
        paths[name] = p
    return paths


@pytest.mark.parametrize("dtype", [None, np.float32])
def test_fast_path_equals_nibabel(tmp_path, monkeypatch, dtype):
    paths = _fixtures(tmp_path)
    fast = {n: read_volume(p, dtype=dtype) for n, p in paths.items()}
    monkeypatch.setattr(readers, "_read_gz_in_memory", lambda path: None)
    slow = {n: read_volume(p, dtype=dtype) for n, p in paths.items()}
    for n in paths:
        assert fast[n].array.dtype == slow[n].array.dtype, n
        assert fast[n].array.dtype.isnative, n
        np.testing.assert_array_equal(fast[n].array, slow[n].array, err_msg=n)
        np.testing.assert_allclose(fast[n].affine, slow[n].affine, err_msg=n)
    # and both agree with the data that was written
    ref = np.asanyarray(nib.load(str(paths["scaled"])).dataobj)
    np.testing.assert_allclose(fast["scaled"].array[0], ref)


def test_fast_path_is_used_and_hashes_the_file(tmp_path):
    p = _fixtures(tmp_path)["int16"]
    v = read_volume(p, dtype=None)
    assert v.meta.get("sha256") == hashlib.sha256(p.read_bytes()).hexdigest()


def test_truncated_file_still_gets_the_clear_error(tmp_path):
    p = _fixtures(tmp_path)["int16"]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(readers.VolumeReadError, match="truncated or corrupt"):
        read_volume(p)


def test_default_read_is_writable_and_pipeline_read_is_zero_copy(tmp_path):
    p = _fixtures(tmp_path)["float32"]
    v = read_volume(p)
    v.array[0, 0, 0, 0] = 5.0  # the default contract: an array you may edit
    assert v.array[0, 0, 0, 0] == 5.0
    ro = read_volume(p, writable=False)
    assert not ro.array.flags.writeable
    np.testing.assert_array_equal(ro.array[0, 1:], v.array[0, 1:])
