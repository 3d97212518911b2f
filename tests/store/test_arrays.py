"""volfm.store.arrays: array encodings of a store case (npy/blosc2, float32/compact), read back exactly or within the
error they record, partial reads, damage reported on one line naming the case, legacy cases as memory maps."""
import hashlib
import json
import pickle

import numpy as np
import pytest

import volfm.preprocess.pipeline as pipeline
import volfm.store.arrays as arrays
from volfm.data.samplers import extract_patch
from volfm.io.atomic import file_sha256
from volfm.io.volume import Volume
from volfm.preprocess.intensity import ct_window
from volfm.store.arrays import (
    StoredArray,
    StoreError,
    array_file,
    blosc2_layout,
    case_records,
    needs_conversion,
    open_array,
    storage_record,
    verify_case,
    write_array,
)
from volfm.store.layout import CohortStore, write_case_dir

COMPACT_B2 = {"codec": "blosc2", "dtype": "compact", "chunk_patch": [16, 16, 16]}


def windowed(hu: np.ndarray, **window) -> tuple[np.ndarray, dict]:
    """``hu`` (C, I, J, K) through volfm's own CT window: (the float32 array a store holds, the intensity record)."""
    vol, params = ct_window(Volume(hu, np.eye(4)), **window)
    return vol.array, params


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


# ------------------------------------------------------------------------------------------------ CT levels
@pytest.mark.parametrize("window", [
    {},                                                         # Merlin: [-1000, 1000] -> [0, 1]
    {"out_min": -1.0, "out_max": 1.0},                          # span 2
    {"hu_min": -160, "hu_max": 240, "out_min": 0.5, "out_max": 2.25},   # soft-tissue window, odd outputs
])
@pytest.mark.parametrize("codec", ["npy", "blosc2"])
def test_ct_level_roundtrip_bit_equal(tmp_path, window, codec):
    lo, hi = window.get("hu_min", -1000), window.get("hu_max", 1000)
    levels = np.arange(lo - 50, hi + 51)  # every integer HU of the window, and clipped ones on both sides
    hu = np.resize(levels, 24 * 20 * 16).reshape(1, 24, 20, 16).astype(np.float32)
    ref, params = windowed(hu, **window)
    rec = storage_record({**COMPACT_B2, "codec": codec}, ref.dtype, params)
    assert rec["encoding"] == "ct_level" and rec["stored_dtype"] == "int16" and rec["width"] == hi - lo
    out = write_array(tmp_path, "image", ref, rec)
    assert out["max_abs_error"] == 0.0 and out["file"] == f"image.{'npy' if codec == 'npy' else 'b2nd'}"
    arr = open_array(tmp_path, "image", out)
    assert isinstance(arr, StoredArray) and arr.dtype == np.float32 and arr.shape == ref.shape
    # the stored values are the integer levels 0..width, the decoded floats are bit for bit ct_window's
    np.testing.assert_array_equal(arr.read_stored(), np.clip(hu, lo, hi) - lo)
    got = np.asarray(arr)
    assert got.dtype == np.float32 and np.array_equal(bits(got), bits(ref))
    assert len(np.unique(got[np.clip(hu, lo, hi) == hu])) == hi - lo + 1  # all levels present, all distinct


def test_wide_window_uses_uint16(tmp_path):
    hu = np.linspace(-1024, 40000, 4 * 5 * 6).round().reshape(1, 4, 5, 6).astype(np.float32)
    ref, params = windowed(hu, hu_min=-1024, hu_max=40000)
    rec = write_array(tmp_path, "image", ref, storage_record(COMPACT_B2, ref.dtype, params))
    assert rec["stored_dtype"] == "uint16" and rec["width"] == 41024
    assert np.array_equal(bits(np.asarray(open_array(tmp_path, "image", rec))), bits(ref))


def test_resampled_ct_error_bounded(tmp_path):
    """Linear resampling makes HU non-integer: the level is rounded, so the error is at most half a level."""
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1100, 1100, (1, 30, 26, 20)).astype(np.float32)
    for window, span in (({}, 1.0), ({"out_min": -1.0, "out_max": 1.0}, 2.0)):
        ref, params = windowed(hu, **window)
        rec = write_array(tmp_path, "image", ref, storage_record(COMPACT_B2, ref.dtype, params))
        got = np.asarray(open_array(tmp_path, "image", rec))
        err = float(np.abs(got.astype(np.float64) - ref).max())
        bound = 0.5 / 2000 * span
        assert bound * 0.9 < err <= bound * (1 + 1e-5)  # about half a level: really rounded, never more
        assert rec["max_abs_error"] == pytest.approx(err, rel=1e-12)
        # nearest level: equal to rounding the HU themselves (the window is exact in float64 here)
        want = np.rint(np.clip(hu.astype(np.float64), -1000, 1000) + 1000)
        off = np.abs(open_array(tmp_path, "image", rec).read_stored() - want)
        assert off.max() <= 1 and (off > 0).mean() < 1e-3  # off by one only at float32 ties


@pytest.mark.parametrize("missing", [("hu_min",), ("hu_max",), ("hu_min", "hu_max")])
def test_ct_window_record_without_its_window_is_float16(tmp_path, missing):
    """No window is assumed: [-1000, 1000] levels of a [-1024, 3071] window would round 4095 HU levels to 2000."""
    hu = np.arange(-1024, 3072, dtype=np.float32)[: 16 * 16 * 16].reshape(1, 16, 16, 16)
    ref, params = windowed(hu, hu_min=-1024, hu_max=3071)
    partial = {k: v for k, v in params.items() if k not in missing}
    rec = storage_record(COMPACT_B2, ref.dtype, partial)
    assert (rec["encoding"], rec["stored_dtype"]) == ("float16", "float16") and "width" not in rec
    out = write_array(tmp_path, "image", ref, rec)
    err = np.abs(np.asarray(open_array(tmp_path, "image", out)).astype(np.float64) - ref)
    assert out["max_abs_error"] == pytest.approx(float(err.max()), rel=1e-12)
    assert np.all(err <= np.abs(ref) * 2.0**-11 + 2.0**-25)  # float16's bound, stated in the record
    # the whole window stated: integer levels, exact
    full = write_array(tmp_path, "image", ref, storage_record(COMPACT_B2, ref.dtype, params))
    assert (full["encoding"], full["width"], full["max_abs_error"]) == ("ct_level", 4095, 0.0)


@pytest.mark.parametrize("values", ["outside the output range", "NaN"])
def test_ct_level_beyond_half_a_level_is_stored_raw(tmp_path, values):
    """A ct_window record that does not describe the array (values outside [out_min, out_max], NaN): integer levels
    would change values by more than half a level, so the array is stored as it is, and the record says why."""
    ref, params = windowed(np.linspace(-1000, 1000, 12 * 10 * 8).reshape(1, 12, 10, 8).astype(np.float32))
    ref = ref.copy()
    if values == "NaN":
        ref[0, 3, 4, 5] = np.nan
    else:
        ref[0, -2:] += 0.5  # e.g. edited after windowing: up to 1.5 on a [0, 1] window
    rec = storage_record(COMPACT_B2, ref.dtype, params)
    assert rec["encoding"] == "ct_level"  # planned from the record...
    out = write_array(tmp_path, "image", ref, rec)
    # ...but not kept: raw float32, bit for bit
    assert (out["encoding"], out["stored_dtype"], out["requested_encoding"]) == ("raw", "float32", "ct_level")
    assert out["max_abs_error"] == 0.0 and "more than half a level" in out["note"] and "uncompacted" in out["note"]
    got = np.asarray(open_array(tmp_path, "image", out))
    assert np.array_equal(bits(got), bits(ref))
    # the same encoding as the plan asks for: a rerun does not convert it again
    case = tmp_path / "case"
    meta = {"case_id": "c", "intensity": {"image": params}, "source": {"image": {}}}
    write_case_dir(tmp_path, "case", {"image": ref}, meta, storage=COMPACT_B2)
    meta = json.loads((case / "meta.json").read_text())
    assert meta["storage"]["image"]["encoding"] == "raw" and not needs_conversion(case, meta, COMPACT_B2)


def test_ct_level_error_within_half_a_level_is_kept():
    """The bound the encoding checks: half a level plus float32 rounding, for every window the tests use."""
    for params in ({"out_min": 0.0, "out_max": 1.0}, {"out_min": -1.0, "out_max": 1.0},
                   {"out_min": 0.5, "out_max": 2.25}):
        rec = {"width": 2000, **params}
        half = 0.5 * (params["out_max"] - params["out_min"]) / 2000
        assert half < arrays.ct_level_bound(rec) < half * (1 + 1e-2)


def test_one_sha256_implementation(tmp_path):
    """The store, the pipeline (and through it model packages) hash files with volfm.io.atomic.file_sha256."""
    assert pipeline.file_sha256 is file_sha256 and arrays.file_sha256 is file_sha256
    img = np.random.default_rng(4).random((1, 6, 5, 4), dtype=np.float32)
    rec = write_array(tmp_path, "image", img, None)
    assert rec["sha256"] == file_sha256(tmp_path / "image.npy") == hashlib.sha256(
        (tmp_path / "image.npy").read_bytes()).hexdigest()
    series = tmp_path / "series"  # a DICOM folder: names and bytes of its files, sorted
    (series / "b").mkdir(parents=True)
    (series / "a.dcm").write_bytes(b"one")
    (series / "b" / "c.dcm").write_bytes(b"two")
    want = hashlib.sha256(b"a.dcm" + b"one" + b"b/c.dcm" + b"two").hexdigest()
    assert file_sha256(series) == want


def test_float16_error_bounded_and_recorded(tmp_path):
    rng = np.random.default_rng(2)
    mri = rng.standard_normal((1, 20, 18, 12)).astype(np.float32) * 1.5  # z-scored
    rec = write_array(tmp_path, "mri", mri, storage_record(COMPACT_B2, mri.dtype, {"type": "mri_zscore"}))
    assert rec["encoding"] == "float16" and rec["stored_dtype"] == "float16"
    got = np.asarray(open_array(tmp_path, "mri", rec))
    assert got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - mri)
    assert np.all(err <= np.abs(mri) * 2.0**-11 + 2.0**-25)  # half a float16 ulp (subnormals: 2^-25)
    assert rec["max_abs_error"] == pytest.approx(float(err.max()), rel=1e-12) and rec["max_abs_error"] > 0
    # values beyond float16's range are kept as they are (and said so), never turned into inf
    pet = mri * 1e5
    rec = write_array(tmp_path, "pet", pet, storage_record(COMPACT_B2, pet.dtype, {"type": "pet"}))
    assert rec["encoding"] == "raw" and rec["requested_encoding"] == "float16" and "float16 range" in rec["note"]
    assert np.array_equal(np.asarray(open_array(tmp_path, "pet", rec)), pet) and rec["max_abs_error"] == 0.0


def test_labels_and_float32_stay_as_they_are(tmp_path):
    lab = np.random.default_rng(3).integers(0, 5, (1, 12, 10, 8)).astype(np.uint8)
    rec = write_array(tmp_path, "label", lab, storage_record(COMPACT_B2, lab.dtype))
    assert (rec["encoding"], rec["stored_dtype"], rec["codec"]) == ("raw", "uint8", "blosc2")
    assert np.array_equal(np.asarray(open_array(tmp_path, "label", rec)), lab)
    # the defaults: npy as the pipeline made it, read as a memory map; sha256 and size recorded
    img = np.random.default_rng(4).random((1, 6, 5, 4), dtype=np.float32)
    rec = write_array(tmp_path, "image", img, None)
    assert rec["codec"] == "npy" and rec["encoding"] == "raw" and rec["max_abs_error"] == 0.0
    path = tmp_path / "image.npy"
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["nbytes"] == path.stat().st_size
    assert isinstance(open_array(tmp_path, "image", rec), np.memmap)
    # writing another encoding of the same array replaces the file (one encoding on disk at a time)
    write_array(tmp_path, "image", img, {"codec": "blosc2"})
    assert array_file(tmp_path, "image") == tmp_path / "image.b2nd" and not path.exists()


def test_blosc2_files_are_reproducible(tmp_path):
    """The same array gives the same bytes (and sha256), so a converted store equals a directly built one."""
    a = np.cumsum(np.random.default_rng(5).integers(-30, 31, (1, 70, 60, 50)), axis=-1).astype(np.float32) / 3000
    recs = []
    for i in range(3):
        (tmp_path / str(i)).mkdir()
        recs.append(write_array(tmp_path / str(i), "x", a, COMPACT_B2))
    assert len({r["sha256"] for r in recs}) == 1 and recs[0]["chunks"] == [1, 16, 16, 32]


def test_blosc2_layout_follows_the_patch():
    assert blosc2_layout((1, 224, 224, 160), 2) == ((1, 96, 96, 96), (1, 16, 16, 32))
    assert blosc2_layout((1, 224, 224, 160), 1) == ((1, 96, 96, 96), (1, 16, 32, 32))
    assert blosc2_layout((1, 224, 224, 160), 4) == ((1, 96, 96, 96), (1, 16, 16, 16))
    assert blosc2_layout((1, 224, 224, 160), 8) == ((1, 96, 96, 96), (1, 8, 16, 16))
    # rounded up to whole blocks, clipped to the volume
    assert blosc2_layout((1, 224, 224, 160), 2, (100, 100, 100)) == ((1, 112, 112, 128), (1, 16, 16, 32))
    assert blosc2_layout((2, 40, 30, 20), 2) == ((1, 40, 30, 20), (1, 16, 16, 20))


# ------------------------------------------------------------------------------------------------ partial reads
@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory):
    """One integer-HU CT stored three ways: npy float32 (memmap), blosc2 compact, blosc2 float32; small chunks
    (16^3 patches) so that windows cross chunk and block borders."""
    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(7)
    hu = np.cumsum(rng.integers(-40, 41, (1, 45, 38, 29)), axis=-1).clip(-1000, 1000).astype(np.float32)
    ref, params = windowed(hu)
    lab = (hu > 50).astype(np.uint8) + (hu > 300)
    out = {}
    for key, storage in (("npy", None), ("compact", COMPACT_B2), ("b2f32", {**COMPACT_B2, "dtype": "float32"})):
        (d / key).mkdir()
        out[key] = {n: open_array(d / key, n, write_array(d / key, n, a, storage_record(storage, a.dtype, p)))
                    for n, a, p in (("image", ref, params), ("label", lab, None))}
    return ref, lab, out


def test_blosc2_patch_equals_npy_patch(ct_pair):
    ref, lab, arrays = ct_pair
    assert isinstance(arrays["npy"]["image"], np.memmap)
    rng = np.random.default_rng(0)
    shape = np.array(ref.shape[1:])
    size = (16, 12, 20)
    starts = [rng.integers(-8, shape) for _ in range(25)]  # random windows, many crossing the border
    starts += [(0, 0, 0), (-16, -12, -20), tuple(shape - 1), tuple(shape), (-3, 30, 25)]
    for start in starts:
        want_img = extract_patch(ref, start, size, -1.0)
        want_lab = extract_patch(lab, start, size, 0)
        for key in ("npy", "compact", "b2f32"):
            img = extract_patch(arrays[key]["image"], start, size, -1.0)
            assert img.dtype == np.float32 and np.array_equal(bits(img), bits(want_img)), (key, start)
            got_lab = extract_patch(arrays[key]["label"], start, size, 0)
            assert got_lab.dtype == np.uint8 and np.array_equal(got_lab, want_lab), (key, start)
    # numpy's basic indexing: ints, steps, reversed and empty slices, Ellipsis
    stored = arrays["compact"]["image"]
    for key in [np.s_[0, 3, 2:9, -5:], np.s_[..., 7], np.s_[:, ::3, 1:30:4, ::-2], np.s_[0, 40:2:-7, 5],
                np.s_[:, 5:5], np.s_[-1, -1, -1, -1], np.s_[0]]:
        np.testing.assert_array_equal(stored[key], ref[key])
    with pytest.raises(IndexError):
        stored[0, 45]
    with pytest.raises(TypeError):
        stored[0, [1, 2]]


def test_stored_array_whole_read_and_dtype(ct_pair):
    ref, lab, arrays = ct_pair
    img = arrays["compact"]["image"]
    assert (img.shape, img.ndim, img.dtype, len(img)) == (ref.shape, 4, np.float32, 1)
    assert img.stored_dtype == np.int16 and img.nbytes == ref.nbytes
    assert img.nbytes_stored == img.path.stat().st_size < ref.nbytes / 2
    for whole in (np.asarray(img), np.array(img), extract_patch(img, (0, 0, 0), ref.shape[1:])):
        assert whole.dtype == np.float32 and np.array_equal(bits(whole), bits(ref))
    assert np.asarray(img, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="copy"):
        np.asarray(img, copy=False)
    assert np.asarray(arrays["compact"]["label"]).dtype == np.uint8
    # DataLoader workers receive a pickled copy, which reopens the file
    again = pickle.loads(pickle.dumps(img))
    assert again._src is None and np.array_equal(again[0, 3], ref[0, 3])
    assert "ct_level" in repr(img)


# ------------------------------------------------------------------------------------------------ damage
def _case(root, storage=COMPACT_B2, shape=(1, 64, 60, 48)):
    rng = np.random.default_rng(11)
    hu = rng.integers(-1000, 1000, shape).astype(np.float32)  # noisy: compresses poorly, the file is large
    ref, params = windowed(hu)
    write_case_dir(root / "cases", "ct7", {"image": ref}, {"case_id": "ct7", "intensity": {"image": params},
                                                           "source": {"image": {}}}, storage=storage)
    return root / "cases" / "ct7", ref


@pytest.mark.parametrize("damage", ["zeroed 4 KiB", "truncated", "bad header"])
def test_corrupt_block_one_line_error_names_case(tmp_path, damage):
    case_dir, ref = _case(tmp_path)
    path = case_dir / "image.b2nd"
    data = path.read_bytes()
    mid = len(data) // 2
    path.write_bytes({"zeroed 4 KiB": data[:mid] + bytes(4096) + data[mid + 4096:],
                      "truncated": data[: len(data) // 3],
                      "bad header": bytes(64) + data[64:]}[damage])
    meta = json.loads((case_dir / "meta.json").read_text())
    with pytest.raises(StoreError) as info:
        np.asarray(open_array(case_dir, "image", meta["storage"]["image"]))  # at open or while decoding
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "case ct7" in msg and "corrupt" in msg
    assert "volfm preprocess" in msg and f"delete {case_dir}" in msg
    # the sha256 recorded at write time catches it without decoding (and also what LZ4 cannot: flipped bits)
    problems = verify_case(case_dir)
    assert len(problems) == 1 and "sha256 mismatch" in problems[0] and str(path) in problems[0]


def test_flipped_bit_is_caught_by_sha256_only(tmp_path):
    case_dir, _ = _case(tmp_path)
    assert verify_case(case_dir) == []
    path = case_dir / "image.b2nd"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert "sha256 mismatch" in verify_case(case_dir)[0]


def test_record_and_file_disagree(tmp_path):
    case_dir, _ = _case(tmp_path)
    rec = json.loads((case_dir / "meta.json").read_text())["storage"]["image"]
    with pytest.raises(StoreError, match=r"case ct7: the file holds int16, meta.json says float16.*delete"):
        open_array(case_dir, "image", {**rec, "stored_dtype": "float16"})
    with pytest.raises(StoreError, match=r"image.npy: missing array 'image' for case ct7; rerun volfm preprocess"):
        open_array(case_dir, "image", {**rec, "file": "image.npy"})


# ------------------------------------------------------------------------------------------------ legacy cases
def test_legacy_case_without_storage_is_memmap(tmp_path):
    """A case written before encodings existed: plain .npy files and no storage record in meta.json."""
    case_dir = tmp_path / "cases" / "old"
    case_dir.mkdir(parents=True)
    img = np.random.default_rng(0).random((1, 8, 7, 6), dtype=np.float32)
    np.save(case_dir / "image.npy", img)
    np.save(case_dir / "label.npy", (img > 0.5).astype(np.uint8))
    meta = {"case_id": "old", "source": {"image": {}, "label": {}}, "intensity": {"image": {"type": "ct_window"}}}
    (case_dir / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "manifest.csv").write_text("case_id,status\nold,ok\n")
    arr = CohortStore(tmp_path).array("old")
    assert isinstance(arr, np.memmap) and np.array_equal(arr, img)
    assert isinstance(open_array(case_dir, "label"), np.memmap)
    recs = case_records(case_dir, meta)
    assert recs["image"] == {"codec": "npy", "encoding": "raw", "file": "image.npy", "dtype": "float32",
                             "stored_dtype": "float32", "shape": [1, 8, 7, 6]}
    assert recs["label"]["dtype"] == "uint8"
    assert not needs_conversion(case_dir, meta, None)
    assert needs_conversion(case_dir, meta, {"codec": "blosc2"})
    # compact: the image's ct_window record states no window, so no integer levels are assumed: float16
    assert storage_record({"dtype": "compact"}, np.float32, meta["intensity"]["image"])["encoding"] == "float16"
    assert needs_conversion(case_dir, meta, {"dtype": "compact"})
    assert verify_case(case_dir, meta)[0].endswith("no sha256 recorded (written before volfm recorded them); "
                                                   "not checked")
