"""StoreDataset and the samplers on a blosc2 compact store: the same items, patches and whole volumes as the float32
npy store (integer-HU CT, so bit for bit), precomputed foreground locations used, DataLoader workers included."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from volfm.data.dataset import StoreDataset
from volfm.data.samplers import LabelWeightedPatchSampler, PatchDataset, UniformPatchSampler, WholeVolumeSampler
from volfm.io.volume import Volume
from volfm.preprocess.intensity import ct_window
from volfm.preprocess.spec import validate_spec
from volfm.store.arrays import StoredArray, array_file
from volfm.store.cohort import write_table
from volfm.store.foreground import FG_MAX_PER_CLASS, case_seed, foreground_locations, save_foreground_locations
from volfm.store.layout import write_case_dir

SHAPE = (30, 26, 18)
STORAGES = {"npy": None, "blosc2": {"codec": "blosc2", "dtype": "compact", "chunk_patch": [16, 16, 16]}}


def write_store(root: Path, storage) -> Path:
    """4 CT cases from integer HU (as a non-resampled pipeline makes them), with labels and their foreground
    locations stamped with the label file, written by write_case_dir as the cohort runner does."""
    spec = validate_spec({"name": "tiny", "storage": storage, "inputs": {
        "image": {"kind": "image", "fill": -1000, "intensity": {"type": "ct_window"}}, "label": {"kind": "label"}}},
        "tiny")
    rng = np.random.default_rng(9)
    rows = []
    for i in range(4):
        cid = f"case{i}"
        hu = np.cumsum(rng.integers(-60, 61, (1, *SHAPE)), axis=1).clip(-1000, 1000).astype(np.float32)
        vol, params = ct_window(Volume(hu, np.eye(4)))
        lab = np.zeros((1, *SHAPE), np.uint8)
        lab[0, 4 + i:12 + i, 6:12, 3:9] = 1 + i % 2
        locs = foreground_locations(lab, FG_MAX_PER_CLASS, case_seed(cid))
        extras = {"label_fg.npz": lambda p, locs=locs: save_foreground_locations(p, locs, SHAPE,
                                                                                 array_file(p.parent, "label"))}
        meta = {"case_id": cid, "affine": np.eye(4).tolist(), "spacing": [2.0, 2.0, 2.0], "shape": list(SHAPE),
                "intensity": {"image": params}, "source": {"image": {}, "label": {}}}
        write_case_dir(root / "cases", cid, {"image": vol.array, "label": lab}, meta, extras, storage=spec["storage"])
        rows.append({"case_id": cid, "status": "ok", "error": "", "split": "train", "icd_codes": "I10", "report": "r"})
    (root / "spec.yaml").write_text(yaml.safe_dump({"spec": spec, "spec_hash": "x", "volfm_version": "0"}))
    write_table(root / "manifest.csv", rows)
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("compressed")
    return {k: write_store(d / k, st) for k, st in STORAGES.items()}


def same_item(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_dataset_items_decode_on_read(stores):
    item = StoreDataset(stores["blosc2"])[1]
    img, lab = item["image"], item["label"]
    assert isinstance(img, StoredArray) and isinstance(lab, StoredArray)
    assert (img.dtype, lab.dtype, img.shape) == (np.float32, np.uint8, (1, *SHAPE))
    assert (stores["blosc2"] / "cases" / "case1" / "image.b2nd").is_file()
    ref = StoreDataset(stores["npy"])[1]
    assert isinstance(ref["image"], np.memmap)
    assert np.array_equal(np.asarray(img).view(np.uint32), np.asarray(ref["image"]).view(np.uint32))
    whole = StoreDataset(stores["blosc2"], mmap=False)[1]["image"]
    assert type(whole) is np.ndarray and np.array_equal(whole, np.asarray(ref["image"]))
    assert item["meta"]["storage"]["image"]["encoding"] == "ct_level"


@pytest.mark.parametrize("sampler", [LabelWeightedPatchSampler((16, 12, 10), foreground_fraction=0.5),
                                     UniformPatchSampler((20, 20, 20)), WholeVolumeSampler(),
                                     WholeVolumeSampler((34, 20, 18))])
def test_patches_equal_the_npy_store(stores, sampler):
    pds = {k: PatchDataset(StoreDataset(s), sampler, samples_per_volume=5, seed=3) for k, s in stores.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stale foreground stamp would warn and recompute
        for i in range(len(pds["npy"])):
            same_item(pds["npy"][i], pds["blosc2"][i])


def test_precomputed_foreground_locations_are_used(stores, monkeypatch):
    import volfm.data.samplers as samplers

    def no_scan(*a, **k):
        raise AssertionError("the label was scanned: the stored locations should have been used")

    monkeypatch.setattr(samplers, "foreground_locations", no_scan)
    sampler = LabelWeightedPatchSampler((8, 8, 8), foreground_fraction=1.0)
    case = StoreDataset(stores["blosc2"])[2]
    for seed in range(5):
        patch = sampler.sample(case, np.random.default_rng(seed))
        assert patch["label"][(0, 4, 4, 4)] > 0  # the centre voxel is foreground


def test_dataloader_workers_read_the_compressed_store(stores):
    pds = PatchDataset(StoreDataset(stores["blosc2"]), LabelWeightedPatchSampler((16, 12, 10)), samples_per_volume=2,
                       seed=1)
    ref = [pds[i] for i in range(len(pds))]
    got = list(DataLoader(pds, batch_size=None, num_workers=2, shuffle=False))
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        same_item(a, b)
