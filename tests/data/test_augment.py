"""volfm.data.augment: YAML -> TorchIO augmentation that moves image, label and paired modalities together."""
import pickle
import warnings

import numpy as np
import pytest
import torch
import yaml

from volfm.data.augment import TRANSFORMS, Augmentation, AugmentationError, build_augmentation, load_augmentation

SHAPE = (24, 20, 16)
SPACING = (1.5, 1.5, 3.0)
KEYS = dict(image_keys=["image", "mri"], label_keys=["label"])


def make_case():
    """image = label * 100 + a smooth ramp in [0, 20); mri = label * 3: both functions of the label."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    # 4-voxel blocks of classes 0/1/2: a shift of one or two voxels is enough to break the agreement
    label = (((i // 4) + 2 * (j // 4) + (k // 4)) % 3).astype(np.uint8)
    ramp = 20.0 * (i + 0.5 * j + 0.25 * k) / (SHAPE[0] + 0.5 * SHAPE[1] + 0.25 * SHAPE[2])
    image = (label * 100.0 + ramp).astype(np.float32)
    mri = (label * 3.0).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    return {"image": image[None], "mri": mri[None], "label": label[None], "case_id": "c0",
            "meta": {"affine": affine.tolist(), "spacing": list(SPACING)}}


def aug(text, **kw):
    a = build_augmentation(text, source="recipe.yaml", **kw)
    assert isinstance(a, Augmentation)
    return a


def interior(label):
    """Voxels whose 6 neighbours have the same label (array border excluded)."""
    lab = label[0]
    m = torch.ones_like(lab, dtype=torch.bool)
    for ax in range(3):
        for s in (-1, 1):
            m &= torch.roll(lab, s, dims=ax) == lab
    m[0, :, :] = m[-1, :, :] = False
    m[:, 0, :] = m[:, -1, :] = False
    m[:, :, 0] = m[:, :, -1] = False
    return m


def check_aligned(out, exact=False):
    """The label read back from the image and from mri agrees with the label, per class (>= 97% away
    from boundaries under linear interpolation; everywhere when images were resampled nearest)."""
    lab = out["label"]
    assert lab.dtype == torch.uint8 and lab.shape == (1, *SHAPE)
    assert set(lab.unique().tolist()) <= {0, 1, 2}
    img_hat = ((out["image"] > 65).int() + (out["image"] > 165).int())[0]
    mri_hat = ((out["mri"] > 1.5).int() + (out["mri"] > 4.5).int())[0]
    m = torch.ones(SHAPE, dtype=torch.bool) if exact else interior(lab)
    assert m.sum() > 500
    for c in (0, 1, 2):
        mc = m & (lab[0] == c)
        assert mc.sum() > 50
        for hat in (img_hat, mri_hat):
            agree = (hat[mc] == c).float().mean().item()
            assert agree == 1.0 if exact else agree >= 0.97, (c, agree)


SPATIAL_CFGS = {
    "affine": "- {name: RandomAffine, scales: [0.85, 1.15], degrees: 20, translation: 3}",
    "elastic": "- {name: RandomElasticDeformation, num_control_points: 6, max_displacement: 4, locked_borders: 1}",
    "flip": "- {name: RandomFlip, axes: [0, 1, 2], flip_probability: 0.5}",
    "affine_elastic": "- {name: RandomAffineElasticDeformation, affine_kwargs: {degrees: 15}, "
                      "elastic_kwargs: {num_control_points: 6, max_displacement: 4, locked_borders: 1}}",
}


@pytest.mark.parametrize("which", sorted(SPATIAL_CFGS))
def test_spatial_transforms_keep_image_label_and_modality_aligned(which):
    a = aug(SPATIAL_CFGS[which])
    case = make_case()
    for seed in range(3):
        out = a(case, **KEYS, rng_seed=seed)
        check_aligned(out)
        assert not torch.equal(out["label"], torch.from_numpy(case["label"]))  # it did move
        assert out["image"].dtype == torch.float32 and out["mri"].dtype == torch.float32


@pytest.mark.parametrize("which", sorted(SPATIAL_CFGS))
def test_spatial_transforms_with_nearest_images_agree_everywhere(which):
    # images resampled nearest too: image and mri must equal a function of the moved label voxel by voxel
    text = SPATIAL_CFGS[which]
    if which == "affine_elastic":
        text = text.replace("affine_kwargs: {", "affine_kwargs: {image_interpolation: nearest, ")
        text = text.replace("elastic_kwargs: {", "elastic_kwargs: {image_interpolation: nearest, ")
    elif which != "flip":
        text = text.replace("}", ", image_interpolation: nearest}")
    a = aug(text)
    case = make_case()
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = a(case, **KEYS, rng_seed=seed)
        check_aligned(out, exact=True)
        moved = (out["label"].numpy() != case["label"]).mean()
        assert moved > 0.05, moved  # the labels really moved, so agreement is not trivial


def test_flip_is_exact():
    out = aug("- {name: RandomFlip, axes: [0, 1, 2], flip_probability: 1.0}")(make_case(), **KEYS)
    case = make_case()
    for k in ("image", "mri", "label"):
        assert np.array_equal(out[k].numpy(), case[k][:, ::-1, ::-1, ::-1])


SMOKE = {
    "RandomFlip": "{axes: [0, 1, 2]}",
    "RandomAffine": "{scales: [0.9, 1.1], degrees: 10}",
    "RandomElasticDeformation": "{num_control_points: 6, max_displacement: 4, locked_borders: 1}",
    "RandomAffineElasticDeformation":
        "{elastic_kwargs: {num_control_points: 6, max_displacement: 4, locked_borders: 1}}",
    "RandomAnisotropy": "{axes: [0, 1], downsampling: [1.5, 2]}",
    "RandomBiasField": "{coefficients: 0.3}",
    "RandomGamma": "{log_gamma: [-0.3, 0.3]}",
    "RandomNoise": "{std: [0, 0.1]}",
    "RandomBlur": "{std: [0.5, 1]}",
    "RandomMotion": "{degrees: 5, translation: 3, num_transforms: 1, include: [mri]}",
    "RandomGhosting": "{num_ghosts: [2, 4], intensity: [0.3, 0.6], include: [mri]}",
    "RandomSpike": "{intensity: [0.5, 1]}",
    "RescaleIntensity": "{out_min_max: [0, 1], percentiles: [0.5, 99.5]}",
    "ZNormalization": "{}",
    "Clamp": "{out_min: 0, out_max: 150}",
}


def test_smoke_list_covers_whitelist():
    assert set(SMOKE) == set(TRANSFORMS)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_each_whitelisted_transform_runs_from_yaml(name):
    entry = yaml.safe_load(SMOKE[name])
    text = yaml.safe_dump([{"name": name, **entry, "p": 1.0}])
    a = aug(text, keys=["image", "mri", "label"])
    case = make_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. elastic folding warnings
        out = a(case, **KEYS, rng_seed=0)
    for k in ("image", "mri", "label"):
        assert isinstance(out[k], torch.Tensor) and out[k].shape == (1, *SHAPE)
        assert torch.isfinite(out[k].float()).all()
    assert out["image"].dtype == out["mri"].dtype == torch.float32 and out["label"].dtype == torch.uint8
    assert set(out["label"].unique().tolist()) <= {0, 1, 2}
    assert out["case_id"] == "c0" and out["meta"] is case["meta"]


INTENSITY_CFGS = [
    "- {name: RandomGamma, log_gamma: [0.4, 0.5]}",
    "- {name: RandomNoise, std: [0.5, 1.0]}",
    "- {name: RandomBiasField, coefficients: [0.4, 0.5]}",
    "- {name: RandomBlur, std: [1, 2]}",
    "- {name: RandomMotion, degrees: 10, translation: 5}",
    "- {name: RandomGhosting, intensity: [0.5, 1]}",
    "- {name: RandomSpike, intensity: [1, 2]}",
    "- {name: RandomAnisotropy, downsampling: [2, 3]}",
    "- {name: RescaleIntensity, out_min_max: [-1, 1]}",
    "- {name: ZNormalization}",
    "- {name: Clamp, out_max: 150}",
]


@pytest.mark.parametrize("text", INTENSITY_CFGS)
def test_intensity_transforms_leave_labels_bit_identical(text):
    case = make_case()
    out = aug(text)(case, **KEYS, rng_seed=1)
    assert out["label"].dtype == torch.uint8
    assert np.array_equal(out["label"].numpy(), case["label"])
    assert not np.allclose(out["image"].numpy(), case["image"])


def test_include_restricts_to_one_modality():
    case = make_case()
    out = aug("- {name: RandomNoise, std: [1, 2], include: mri}")(case, **KEYS, rng_seed=0)
    assert np.array_equal(out["image"].numpy(), case["image"])
    assert np.array_equal(out["label"].numpy(), case["label"])
    assert not np.allclose(out["mri"].numpy(), case["mri"])
    out = aug("- {name: RandomNoise, std: [1, 2], exclude: [mri]}")(case, **KEYS, rng_seed=0)
    assert np.array_equal(out["mri"].numpy(), case["mri"])
    assert not np.allclose(out["image"].numpy(), case["image"])


def test_determinism_with_rng_seed_and_caller_rng_untouched():
    text = """
    - {name: RandomAffine, scales: [0.9, 1.1], degrees: 10, p: 0.7}
    - {name: RandomNoise, std: [0, 0.5]}
    - {name: RandomBiasField, include: [mri], p: 0.5}
    """
    a = aug(text)
    case = make_case()
    state = torch.random.get_rng_state()
    o1, o2 = a(case, **KEYS, rng_seed=123), a(case, **KEYS, rng_seed=123)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k in ("image", "mri", "label"):
        assert torch.equal(o1[k], o2[k])
    o3 = a(case, **KEYS, rng_seed=124)
    assert not torch.equal(o1["image"], o3["image"])
    torch.manual_seed(5)
    u1 = a(case, **KEYS)
    torch.manual_seed(5)
    u2 = a(case, **KEYS)
    assert torch.equal(u1["image"], u2["image"])


@pytest.mark.parametrize("text", [
    "- {name: RandomAffine, degrees: 30, p: 0}\n- {name: RandomNoise, std: 1, p: 0.0}",
    "{p: 0, transforms: [{name: RandomAffine, degrees: 30}, {name: RandomNoise, std: 1}]}",
    "- {one_of: [{name: RandomAffine}, {name: RandomElasticDeformation}], p: 0}",
])
def test_p_zero_is_identity(text):
    case = make_case()
    out = aug(text)(case, **KEYS, rng_seed=0)
    for k in ("image", "mri", "label"):
        assert np.array_equal(out[k].numpy(), case[k])
    assert out["label"].dtype == torch.uint8 and out["image"].dtype == torch.float32


def test_empty_configs_give_none_and_mapping_form_works():
    assert build_augmentation(None) is None
    assert build_augmentation([]) is None
    assert build_augmentation("") is None
    assert build_augmentation({"transforms": []}) is None
    a = aug({"transforms": [{"name": "RandomFlip", "axes": [0]}], "p": 0.5})
    assert a.transform.probability == 0.5


def test_one_of_group():
    text = """
    - one_of:
        - {name: RandomFlip, axes: [0], flip_probability: 1, weight: 3}
        - {name: RandomFlip, axes: [1], flip_probability: 1, weight: 1}
    """
    a = aug(text)
    case = make_case()
    seen = set()
    for seed in range(12):
        out = a(case, **KEYS, rng_seed=seed)
        check_aligned(out)
        for ax in (1, 2):
            if np.array_equal(out["label"].numpy(), np.flip(case["label"], ax)):
                seen.add(ax)
    assert seen == {1, 2}


def test_inputs_are_not_modified_and_torch_inputs_and_3d_arrays_work():
    case = make_case()
    before = {k: case[k].copy() for k in ("image", "mri", "label")}
    a = aug("- {name: RandomNoise, std: 1}\n- {name: RandomFlip, axes: [0, 1, 2], flip_probability: 1}")
    a(case, **KEYS, rng_seed=0)
    for k in before:
        assert np.array_equal(case[k], before[k])
    tcase = {"image": torch.from_numpy(case["image"][0]), "label": torch.from_numpy(case["label"][0]).long(),
             "spacing": SPACING}
    out = a(tcase, image_keys=["image", "mri"], label_keys=["label"], rng_seed=0)  # mri absent: skipped
    assert out["image"].shape == SHAPE and out["label"].dtype == torch.int64 and "mri" not in out
    assert torch.equal(out["label"], torch.from_numpy(np.ascontiguousarray(case["label"][0, ::-1, ::-1, ::-1])).long())


def test_rotation_uses_case_affine_spacing():
    # with an anisotropic affine and isotropic affine the same rotation seed gives different results
    a = aug("- {name: RandomAffine, degrees: [20, 20, 0, 0, 0, 0], scales: 0}")
    case = make_case()
    aniso = a(case, **KEYS, rng_seed=0)
    iso = a(case, **KEYS, affine=np.eye(4), rng_seed=0)
    check_aligned(aniso)
    check_aligned(iso)
    assert not torch.equal(aniso["label"], iso["label"])


def one_line_error(text, *needles, **kw):
    with pytest.raises(AugmentationError) as ei:
        build_augmentation(text, source="recipes/seg.yaml", **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("recipes/seg.yaml: ")
    for n in needles:
        assert n in msg, msg
    return msg


def test_errors_are_one_line_and_name_source_and_entry():
    one_line_error("- {name: RandomFlip}\n- {name: RandomAfine, degrees: 10}",
                   "entry 1", "'RandomAfine'", "did you mean 'RandomAffine'", "allowed:", "RandomGhosting")
    one_line_error("- {name: RandomFlip}\n- {name: RandomAffine, degree: 10}",
                   "entry 1 (RandomAffine)", "'degree'", "did you mean 'degrees'", "allowed:", "scales")
    one_line_error("- {name: RandomNoise, std: -1}", "entry 0 (RandomNoise)", "bad argument std=-1")
    one_line_error("- {name: RandomAffine, degrees: 3, scales: abc}", "entry 0 (RandomAffine)",
                   "bad argument scales='abc'")
    one_line_error("- {name: [RandomFlip]}", "entry 0", "unknown transform")
    one_line_error("- {name: RandomFlip, axes: [0, 5]}", "entry 0 (RandomFlip)", "bad argument")
    one_line_error("- {name: RandomGamma, p: 1.5}", "entry 0.p", "[0, 1]")
    one_line_error("- {name: RandomAffine, include: [image]}", "entry 0 (RandomAffine)", "spatial")
    one_line_error("- {name: RandomAffine, label_interpolation: linear}", "nearest")
    one_line_error("- {name: RandomGamma, weight: 2}", "one_of")
    one_line_error("- {degrees: 10}", "entry 0", "needs 'name'")
    one_line_error("- RandomFlip", "entry 0", "mapping")
    one_line_error("name: RandomFlip", "list of entries", "- {name: RandomFlip")
    one_line_error("{transforms: [], prob: 1}", "unknown key 'prob'", "allowed: p, transforms")
    one_line_error("42", "list of transform entries")
    one_line_error("- {one_of: [{name: RandomFlip}, {name: Bogus}]}", "entry 0.one_of[1]", "'Bogus'")
    one_line_error("- {name: RandomNoise, include: [mr]}", "entry 0.include", "did you mean 'mri'",
                   keys=["image", "mri", "label"])
    msg = one_line_error("- {name: RandomFlip, axes: [0, 1\n- {name: RandomGamma}", "malformed YAML", "line")
    assert "Traceback" not in msg


def test_augmentation_pickles_for_dataloader_workers():
    a = aug("- {one_of: [{name: RandomAffine}, {name: RandomFlip}], p: 0.5}\n- {name: RandomMotion, include: [mri]}")
    b = pickle.loads(pickle.dumps(a))
    case = make_case()
    o1, o2 = a(case, **KEYS, rng_seed=3), b(case, **KEYS, rng_seed=3)
    for k in ("image", "mri", "label"):
        assert torch.equal(o1[k], o2[k])


def test_load_augmentation_from_file(tmp_path):
    p = tmp_path / "aug.yaml"
    p.write_text("augment:\n  - {name: RandomFlip, axes: [0, 1, 2]}\n")
    a = load_augmentation(p)
    assert a is not None and a.source == str(p)
    p.write_text("- {name: RandomFlipp}\n")
    with pytest.raises(AugmentationError, match=f"^{p}: entry 0: unknown transform 'RandomFlipp'"):
        load_augmentation(p)
    with pytest.raises(AugmentationError, match="cannot read"):
        load_augmentation(tmp_path / "missing.yaml")


def test_label_and_image_key_overlap_and_grid_mismatch_are_refused():
    a = aug("- {name: RandomFlip}")
    case = make_case()
    with pytest.raises(AugmentationError, match="both image and label"):
        a(case, image_keys=["image", "label"], label_keys=["label"])
    case["mri"] = case["mri"][:, :-1]
    with pytest.raises(AugmentationError, match="share one grid"):
        a(case, **KEYS)


def test_memmapped_store_arrays(tmp_path):
    case = make_case()
    np.save(tmp_path / "image.npy", case["image"].astype(np.float16))
    np.save(tmp_path / "label.npy", case["label"])
    mm = {k: np.load(tmp_path / f"{k}.npy", mmap_mode="r") for k in ("image", "label")}
    mm["meta"] = case["meta"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "non-writable array" warning
        out = aug("- {name: RandomAffine, degrees: 10}\n- {name: RandomGamma}")(mm, rng_seed=0)
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.uint8
    assert set(out["label"].unique().tolist()) <= {0, 1, 2}
