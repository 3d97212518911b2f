"""Patch samplers and PatchDataset (volfm.data.samplers)."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from volfm.data import samplers as S
from volfm.data.dataset import StoreDataset
from volfm.data.samplers import (
    LabelWeightedPatchSampler,
    PatchDataset,
    SamplerError,
    UniformPatchSampler,
    WholeVolumeSampler,
    extract_patch,
    foreground_locations,
)
from volfm.preprocess.spec import validate_spec
from volfm.store.layout import write_case_dir

SHAPE = (20, 17, 11)


def coord_case(shape=SHAPE, case_id="c0"):
    """image channels encode (i, j, k); a second image encodes the flat index; label = (i + 2j + 3k) % 5."""
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return {"case_id": case_id,
            "image": np.stack([ii, jj, kk]).astype(np.float32),
            "pet": (np.ravel_multi_index((ii, jj, kk), shape)[None]).astype(np.float32),
            "label": ((ii + 2 * jj + 3 * kk) % 5)[None].astype(np.uint8),
            "icd_codes": ["K76.0"], "report": "text", "meta": {"affine": np.eye(4).tolist()},
            "pad_values": {"image": -1.0, "pet": -7.0, "label": 0}}


def check_same_window(case, patch, size):
    """Every array is the window [start, start + size) of its source, padded outside with its pad value."""
    start = patch["patch_start"]
    assert start.dtype == np.int64 and start.shape == (3,)
    shape = np.array(case["image"].shape[1:])
    offs = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"))
    coords = start[:, None, None, None] + offs
    inside = np.all((coords >= 0) & (coords < shape[:, None, None, None]), axis=0)
    img, pet, lab = patch["image"], patch["pet"], patch["label"]
    assert img.shape == (3, *size) and pet.shape == (1, *size) and lab.shape == (1, *size)
    for c in range(3):
        np.testing.assert_array_equal(img[c][inside], coords[c][inside])
        assert np.all(img[c][~inside] == -1.0)
    ci = [coords[a][inside] for a in range(3)]
    np.testing.assert_array_equal(pet[0][inside], np.ravel_multi_index(ci, tuple(shape)))
    np.testing.assert_array_equal(lab[0][inside], (ci[0] + 2 * ci[1] + 3 * ci[2]) % 5)
    assert np.all(pet[0][~inside] == -7.0) and np.all(lab[0][~inside] == 0)
    for k in ("case_id", "icd_codes", "report", "meta", "pad_values"):
        assert patch[k] is case[k] or patch[k] == case[k]


def centre_of(patch, size):
    return patch["patch_start"] + np.array(size) // 2


# ------------------------------------------------------------------------------------------ extract_patch
@pytest.mark.parametrize("dtype,pad", [(np.float32, -3.5), (np.uint8, 0), (np.int16, 7)])
def test_extract_patch_matches_dense_padding(tmp_path, dtype, pad):
    rng = np.random.default_rng(1)
    arr = (rng.random((2, 13, 11, 7)) * 100).astype(dtype)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    margin = 40
    dense = np.pad(arr, [(0, 0)] + [(margin, margin)] * 3, constant_values=pad)
    for _ in range(300):
        size = rng.integers(1, 17, size=3)
        start = rng.integers(-20, 20, size=3)
        got = extract_patch(mm, start, size, pad)
        ref = dense[(slice(None), *(slice(s + margin, s + margin + n) for s, n in zip(start, size)))]
        assert got.dtype == arr.dtype and got.shape == (2, *size)
        assert type(got) is np.ndarray and got.flags.writeable
        np.testing.assert_array_equal(got, ref)
    # window entirely outside, whole volume, int size
    assert np.all(extract_patch(mm, (100, 0, 0), 4, pad) == np.asarray(pad, dtype))
    np.testing.assert_array_equal(extract_patch(mm, (0, 0, 0), (13, 11, 7), pad), arr)
    assert extract_patch(mm, (-1, -1, -1), 3).shape == (2, 3, 3, 3)
    with pytest.raises(SamplerError):
        extract_patch(arr[0], (0, 0, 0), 3)
    with pytest.raises(SamplerError):
        extract_patch(arr, (0, 0), 3)


# ------------------------------------------------------------------------------------------ same window
@pytest.mark.parametrize("sampler", [UniformPatchSampler((8, 6, 5)),
                                     LabelWeightedPatchSampler((8, 6, 5), foreground_fraction=0.5),
                                     LabelWeightedPatchSampler(7, foreground_fraction=1.0, classes=[3]),
                                     WholeVolumeSampler(), WholeVolumeSampler((25, 9, 12))])
def test_every_array_is_cut_from_the_same_window(sampler):
    case = coord_case()
    rng = np.random.default_rng(0)
    draws = 1 if isinstance(sampler, WholeVolumeSampler) else 60
    for _ in range(draws):
        patch = sampler.sample(case, rng)
        size = patch["image"].shape[1:]
        check_same_window(case, patch, size)
    if isinstance(sampler, WholeVolumeSampler):
        if sampler.patch_size is None:
            assert patch["image"].shape[1:] == SHAPE and list(patch["patch_start"]) == [0, 0, 0]
        else:
            assert list(patch["patch_start"]) == [(20 - 25) // 2, (17 - 9) // 2, (11 - 12) // 2]


def test_arrays_on_different_grids_are_refused():
    case = coord_case()
    case["label"] = case["label"][:, :-1]
    with pytest.raises(SamplerError, match="c0.*different grids"):
        UniformPatchSampler(4).sample(case, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------ uniform
def test_uniform_centres_cover_the_volume():
    shape = (9, 6, 4)
    case = {"case_id": "u", "image": np.zeros((1, *shape), np.float32), "pad_values": {"image": 0.0}}
    sampler = UniformPatchSampler((5, 4, 3))
    rng = np.random.default_rng(0)
    n = 6000
    centres = np.array([centre_of(sampler.sample(case, rng), (5, 4, 3)) for _ in range(n)])
    assert np.all(centres >= 0) and np.all(centres < np.array(shape))
    assert np.any(centres < 2) and np.any(centres[:, 0] == 8)  # border patches happen (and are padded)
    counts = np.bincount(np.ravel_multi_index(centres.T, shape), minlength=int(np.prod(shape)))
    expected = n / np.prod(shape)
    assert counts.min() > 0
    chi2 = ((counts - expected) ** 2 / expected).sum()  # dof 215: mean 215, sd ~21
    assert chi2 < 215 + 6 * 21


# ------------------------------------------------------------------------------------------ label weighted
def small_fg_case(shape=(30, 24, 16)):
    lab = np.zeros(shape, np.uint8)
    lab[3:5, 4:6, 2:4] = 1        # 8 voxels near a corner
    lab[20:23, 15:17, 10:11] = 2  # 6 voxels
    lab[25, 2, 14] = 3            # 1 voxel near the border
    return {"case_id": "fg", "image": np.zeros((1, *shape), np.float32), "label": lab[None],
            "pad_values": {"image": 0.0, "label": 0}}


def centre_labels(sampler, case, n, seed=0):
    rng = np.random.default_rng(seed)
    lab = case["label"][0]
    out = []
    for _ in range(n):
        c = centre_of(sampler.sample(case, rng), sampler.patch_size)
        assert np.all(c >= 0) and np.all(c < np.array(lab.shape))
        out.append(int(lab[tuple(c)]))
    return np.array(out)


def test_foreground_fraction_one_centres_every_patch_on_foreground():
    case = small_fg_case()
    labels = centre_labels(LabelWeightedPatchSampler((8, 8, 8), foreground_fraction=1.0), case, 600)
    assert np.all(labels > 0)
    share = np.bincount(labels, minlength=4)[1:] / len(labels)  # classes chosen uniformly
    assert np.all(np.abs(share - 1 / 3) < 0.07)


@pytest.mark.parametrize("f", [0.0, 0.33, 0.7])
def test_measured_foreground_fraction_matches_the_requested_one(f):
    case = small_fg_case()
    q = (case["label"] > 0).mean()  # uniform patches land on foreground this often
    expected = f + (1 - f) * q
    n = 2000
    hit = (centre_labels(LabelWeightedPatchSampler(16, foreground_fraction=f), case, n, seed=3) > 0).mean()
    tol = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3
    assert abs(hit - expected) < tol, (hit, expected, tol)


def test_per_class_sampling_and_weights():
    case = small_fg_case()
    for k in (1, 2, 3):
        labels = centre_labels(LabelWeightedPatchSampler(6, foreground_fraction=1.0, classes=[k]), case, 100)
        assert np.all(labels == k)
    labels = centre_labels(LabelWeightedPatchSampler(6, foreground_fraction=1.0, classes=[1, 2],
                                                     class_weights=[1, 3]), case, 1000)
    assert set(labels.tolist()) == {1, 2}
    assert abs((labels == 2).mean() - 0.75) < 0.06
    labels = centre_labels(LabelWeightedPatchSampler(6, foreground_fraction=1.0, class_weights={3: 1.0}), case, 50)
    assert np.all(labels == 3)
    # a requested class the case lacks: uniform fallback (centre still inside)
    labels = centre_labels(LabelWeightedPatchSampler(6, foreground_fraction=1.0, classes=[9]), case, 200)
    assert (labels > 0).mean() < 0.05
    with pytest.raises(SamplerError):
        LabelWeightedPatchSampler(6, classes=[1, 2], class_weights=[1.0])
    with pytest.raises(SamplerError):
        LabelWeightedPatchSampler(6, foreground_fraction=1.5)
    with pytest.raises(SamplerError):
        LabelWeightedPatchSampler(6, classes=[0])


def test_case_without_foreground_falls_back_to_uniform():
    case = small_fg_case()
    case["label"] = np.zeros_like(case["label"])
    labels = centre_labels(LabelWeightedPatchSampler(10, foreground_fraction=1.0), case, 200)
    assert np.all(labels == 0)


def test_foreground_locations_are_cached_per_case(monkeypatch):
    calls = []
    real = S.foreground_locations

    def counting(label, *a, **k):
        calls.append(1)
        return real(label, *a, **k)

    monkeypatch.setattr(S, "foreground_locations", counting)
    sampler = LabelWeightedPatchSampler(6, foreground_fraction=1.0, cache_size=2)
    rng = np.random.default_rng(0)
    a, b, c = small_fg_case(), small_fg_case(), small_fg_case()
    b["case_id"], c["case_id"] = "b", "c"
    for _ in range(20):
        sampler.sample(a, rng)
        sampler.sample(b, rng)
    assert len(calls) == 2
    sampler.sample(c, rng)  # evicts 'fg' (least recently used)
    sampler.sample(a, rng)
    assert len(calls) == 4


def test_foreground_locations_subsample_deterministically():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, size=(1, 40, 30, 20)).astype(np.uint8)
    locs = foreground_locations(lab, max_per_class=500, seed=7)
    assert sorted(locs) == [1, 2]
    for cls, idx in locs.items():
        assert len(idx) == 500 and len(np.unique(idx)) == 500
        assert np.all(lab.reshape(-1)[idx] == cls)
    again = foreground_locations(lab, max_per_class=500, seed=7)
    assert all(np.array_equal(locs[k], again[k]) for k in locs)
    full = foreground_locations(lab[0], max_per_class=10**9)
    assert all(np.array_equal(full[k], np.flatnonzero(lab == k)) for k in (1, 2))
    assert foreground_locations(np.zeros((4, 4, 4), np.uint8)) == {}


# ------------------------------------------------------------------------------------------ PatchDataset
def write_store(root: Path, n_cases=4, shape=(26, 22, 14)) -> Path:
    raw = {"name": "tiny", "spacing": [2.0, 2.0, 2.0], "inputs": {
        "image": {"kind": "image", "fill": -1000, "intensity": {"type": "ct_window"}},
        "label": {"kind": "label"}}}
    spec = validate_spec(raw, "tiny")
    (root / "cases").mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(n_cases):
        cid = f"case{i}"
        img = rng.random((1, *shape), dtype=np.float32)
        lab = np.zeros((1, *shape), np.uint8)
        lab[0, 5 + i:9 + i, 6:10, 3:6] = 1 + i % 2
        write_case_dir(root / "cases", cid, {"image": img, "label": lab},
                       {"affine": np.eye(4).tolist(), "spacing": [2.0, 2.0, 2.0]})
        rows.append({"case_id": cid, "status": "ok", "error": "", "split": "train",
                     "icd_codes": "K76.0;I10" if i % 2 else "", "report": f"report {i}"})
    (root / "spec.yaml").write_text(yaml.safe_dump({"spec": spec, "spec_hash": "x", "volfm_version": "0"}))
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("patches") / "store")


def make_pds(store, seed=0, spv=3, sampler=None, **kw):
    sampler = sampler or LabelWeightedPatchSampler((12, 10, 8), foreground_fraction=0.5)
    return PatchDataset(StoreDataset(store), sampler, samples_per_volume=spv, seed=seed, **kw)


def same_item(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_patch_dataset_items(store):
    pds = make_pds(store)
    assert len(pds) == 12 and pds.num_cases == 4
    item = pds[4]
    assert item["case_id"] == "case1" and item["index"] == 4
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 12, 10, 8)
    assert item["label"].dtype == torch.uint8 and item["label"].shape == (1, 12, 10, 8)
    assert item["patch_start"].dtype == torch.int64 and item["patch_start"].shape == (3,)
    assert item["icd_codes"] == ["K76.0", "I10"] and item["report"] == "report 1"
    assert pds[0]["icd_codes"] == []
    # the tensors are the store's window
    img = np.load(store / "cases" / "case1" / "image.npy")
    np.testing.assert_array_equal(item["image"].numpy(), extract_patch(img, item["patch_start"].numpy(), (12, 10, 8),
                                                                       0.0))
    assert make_pds(store, label_dtype="int64")[4]["label"].dtype == torch.int64
    raw = make_pds(store, to_tensor=False)[4]
    assert isinstance(raw["image"], np.ndarray) and "meta" in raw and "row" in raw
    assert make_pds(store, transform=lambda d: {**d, "extra": 1})[0]["extra"] == 1
    with pytest.raises(IndexError):
        pds[12]
    with pytest.raises(SamplerError, match="label=None"):
        PatchDataset(StoreDataset(store, label=None), LabelWeightedPatchSampler(8))


def test_patch_dataset_is_deterministic_per_seed_epoch_index(store):
    a, b = make_pds(store), make_pds(store)
    forward = [a[i] for i in range(len(a))]
    backward = [b[i] for i in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward):
        same_item(x, y)
    starts = lambda items: [tuple(it["patch_start"].tolist()) for it in items]  # noqa: E731
    a.set_epoch(1)
    epoch1 = [a[i] for i in range(len(a))]
    assert starts(epoch1) != starts(forward)
    b.set_epoch(1)
    for x, y in zip(epoch1, [b[i] for i in range(len(b))]):
        same_item(x, y)
    other_seed = make_pds(store, seed=1)
    assert starts([other_seed[i] for i in range(len(a))]) != starts(forward)
    # samples of one volume differ from each other
    assert len(set(starts(forward[:3]))) > 1


def test_dataloader_workers_give_the_same_items(store):
    pds = make_pds(store, spv=2)
    pds.set_epoch(2)
    ref = [pds[i] for i in range(len(pds))]
    got = list(DataLoader(pds, batch_size=None, num_workers=2, shuffle=False))
    assert len(got) == len(ref)
    for x, y in zip(ref, got):
        same_item(x, y)
    batches = list(DataLoader(pds, batch_size=4, num_workers=0, collate_fn=list))
    flat = [it for batch in batches for it in batch]
    for x, y in zip(ref, flat):
        same_item(x, y)


def test_whole_volume_patch_dataset(store):
    pds = PatchDataset(StoreDataset(store, label=None), WholeVolumeSampler(), seed=0)
    item = pds[2]
    np.testing.assert_array_equal(item["image"].numpy(), np.load(store / "cases" / "case2" / "image.npy"))
    assert item["patch_start"].tolist() == [0, 0, 0] and "label" not in item
    padded = PatchDataset(StoreDataset(store), WholeVolumeSampler((30, 20, 14)))[0]
    assert padded["image"].shape == (1, 30, 20, 14) and padded["patch_start"].tolist() == [-2, 1, 0]
    assert float(padded["image"][0, 0].max()) == 0.0  # padded with the store's background (ct_window out_min)


def test_precomputed_foreground_locations_equal_the_computed_ones(tmp_path):
    """The runner stores <label>_fg.npz; loading it gives exactly what the sampler would compute."""
    import yaml

    from volfm.data.dataset import StoreDataset
    from volfm.preprocess.spec import load_spec
    from volfm.store.build import run_cohort
    from volfm.store.foreground import FG_MAX_PER_CLASS, case_seed, foreground_locations, load_foreground_locations
    from volfm.synth.ct import make_ct_cohort

    table = make_ct_cohort(tmp_path / "ct", 2, seed=4, shape=(40, 40, 24), progress=False)
    spec = load_spec("ct_seg")
    spec.update(spacing=[5.0, 5.0, 5.0], antialias=False)
    spec["inputs"]["label"]["interpolation"] = "nearest"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run_cohort(tmp_path / "spec.yaml", tmp_path / "store", cohort=table, progress=False, qc=False)
    ds = StoreDataset(tmp_path / "store")
    for i in range(len(ds)):
        case = ds[i]
        assert (tmp_path / "store" / "cases" / case["case_id"] / "label_fg.npz").is_file()
        want = foreground_locations(case["label"], FG_MAX_PER_CLASS, case_seed(case["case_id"]))
        fg_path = case["label_fg_path"]
        got = load_foreground_locations(fg_path, case["label"], tmp_path / "store" / "cases" / case["case_id"] / "label.npy")
        assert sorted(got) == sorted(want) and len(got) >= 5
        for c in want:
            np.testing.assert_array_equal(got[c], want[c])
        # the sampler uses the stored locations and draws foreground centres from them
        sampler = LabelWeightedPatchSampler((8, 8, 8), foreground_fraction=1.0)
        patch = sampler.sample(case, np.random.default_rng(0))
        centre = np.asarray(patch["patch_start"]) + 4
        assert case["label"][(0, *centre)] > 0
    # a label replaced after the store was built: the stored locations are refused and recomputed
    case = ds[0]
    lpath = tmp_path / "store" / "cases" / case["case_id"] / "label.npy"
    new = np.zeros_like(np.load(lpath))
    new[0, 3, 4, 5] = 7
    np.save(lpath, new)
    case = ds[0]
    with pytest.warns(UserWarning, match="do not match"):
        patch = LabelWeightedPatchSampler((8, 8, 8), foreground_fraction=1.0).sample(case, np.random.default_rng(1))
    assert tuple(np.asarray(patch["patch_start"]) + 4) == (3, 4, 5)

