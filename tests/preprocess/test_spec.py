"""volfm.preprocess.spec: the shipped YAML specs load; bad specs fail with the file and the key named."""
import copy
from pathlib import Path

import pytest
import yaml

from volfm import VolfmError
from volfm.preprocess.spec import (
    SpecError,
    load_spec,
    parse_storage_text,
    resolve_spec_path,
    spec_hash,
    validate_spec,
    with_storage,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = ROOT / "preprocessing"
SHIPPED = ["ct_merlin", "ct_seg", "mri_brain", "pet"]


def raw(name):
    return yaml.safe_load((SPEC_DIR / f"{name}.yaml").read_text())


# --- the shipped specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs_load(name):
    spec = load_spec(SPEC_DIR / f"{name}.yaml")
    assert spec["name"] == name
    assert spec["orientation"] == "RAS"
    assert len(spec["spacing"]) == 3 and all(isinstance(s, float) and s > 0 for s in spec["spacing"])
    assert spec["reference"] in spec["inputs"] and spec["inputs"][spec["reference"]]["kind"] == "image"
    # the copy packaged with volfm is the same spec, found by bare name
    assert resolve_spec_path(name).parent.name == "specs"
    builtin = load_spec(name)
    assert spec_hash(builtin) == spec_hash(spec)


def test_shipped_spec_contents():
    merlin = load_spec(SPEC_DIR / "ct_merlin.yaml")
    assert merlin["spacing"] == [1.5, 1.5, 3.0]
    assert merlin["crop"] == {"mode": "center", "size": [224, 224, 160], "input": "image", "threshold": 0.0,
                              "margin": [0, 0, 0]}
    assert merlin["inputs"]["image"]["intensity"] == {"type": "ct_window", "hu_min": -1000, "hu_max": 1000,
                                                      "out_min": 0.0, "out_max": 1.0}
    assert merlin["inputs"]["image"]["fill"] == -1000 and merlin["oblique"] == "resample"
    assert merlin["inputs"]["label"] == {"kind": "label", "required": False, "interpolation": "nearest"}
    seg = load_spec(SPEC_DIR / "ct_seg.yaml")
    assert seg["crop"]["mode"] == "foreground" and seg["crop"]["threshold"] == -500.0
    assert seg["crop"]["margin"] == [5, 5, 5] and seg["crop"]["size"] is None
    assert seg["inputs"]["label"]["interpolation"] == "onehot_linear" and seg["antialias"] is True
    mri = load_spec(SPEC_DIR / "mri_brain.yaml")
    assert mri["reference"] == "mri" and mri["inputs"]["pet"]["required"] is False
    assert mri["inputs"]["mri"]["intensity"]["type"] == "mri_zscore"
    pet = load_spec(SPEC_DIR / "pet.yaml")
    assert pet["reference"] == "pet" and pet["inputs"]["pet"]["intensity"]["mode"] == "auto"
    assert len({spec_hash(load_spec(SPEC_DIR / f"{n}.yaml")) for n in SHIPPED}) == 4


def test_defaults_filled():
    spec = validate_spec({"inputs": {"image": {}, "label": None}}, "mini.yaml")
    assert spec["name"] == "mini"
    assert spec["orientation"] == "RAS" and spec["spacing"] is None and spec["crop"] is None
    assert spec["oblique"] == "keep" and spec["shear"] == "refuse" and spec["nonfinite"] == "error"
    assert spec["inputs"]["image"] == {"kind": "image", "required": True, "interpolation": "linear", "fill": "min",
                                       "intensity": {"type": "none"}, "dtype": "float32"}
    assert spec["inputs"]["label"] == {"kind": "label", "required": False, "interpolation": "nearest"}
    assert spec["reference"] == "image"
    assert validate_spec({"spacing": 2, "inputs": {"image": {}}})["spacing"] == [2.0, 2.0, 2.0]
    assert validate_spec({"orientation": "lps", "inputs": {"image": {}}})["orientation"] == "LPS"


# --- errors name the file and the key -------------------------------------------------------------------

def edit(name, fn):
    r = copy.deepcopy(raw(name))
    fn(r)
    return r


def _set(path, value):
    def fn(r):
        d = r
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return fn


def _del(path):
    def fn(r):
        d = r
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return fn


BAD = [
    # (id, base spec, edit, words the message must contain)
    ("unknown_top_key", "ct_merlin", _set(["spacings"], [1, 1, 1]), ["spacings", "did you mean 'spacing'"]),
    ("unknown_input_key", "ct_merlin", _set(["inputs", "image", "interp"], "linear"), ["interp", "inputs.image"]),
    ("unknown_label_key", "ct_merlin", _set(["inputs", "label", "intensity"], {"type": "none"}),
     ["inputs.label", "intensity"]),
    ("label_dtype", "ct_merlin", _set(["inputs", "label", "dtype"], "float16"), ["inputs.label", "dtype"]),
    ("unknown_crop_key", "ct_merlin", _set(["crop", "centre"], True), ["centre", "crop"]),
    ("unknown_intensity_key", "ct_merlin", _set(["inputs", "image", "intensity", "window"], 400),
     ["window", "inputs.image.intensity"]),
    ("bad_orientation", "ct_merlin", _set(["orientation"], "RAX"), ["orientation", "RAX"]),
    ("bad_orientation_repeat", "ct_merlin", _set(["orientation"], "RLS"), ["orientation", "RLS"]),
    ("bad_orientation_length", "mri_brain", _set(["orientation"], "RA"), ["orientation"]),
    ("bad_spacing_len", "ct_merlin", _set(["spacing"], [1.5, 1.5]), ["spacing"]),
    ("bad_spacing_neg", "ct_merlin", _set(["spacing"], [1.5, -1.5, 3]), ["spacing"]),
    ("bad_spacing_zero", "pet", _set(["spacing"], 0), ["spacing"]),
    ("bad_spacing_str", "ct_merlin", _set(["spacing"], "1.5mm"), ["spacing"]),
    ("bad_spacing_inf", "ct_merlin", _set(["spacing"], [1.5, float("inf"), 3]), ["spacing"]),
    ("bad_spacing_bool", "ct_merlin", _set(["spacing"], [1.5, True, 3]), ["spacing"]),
    ("bad_crop_size_len", "ct_merlin", _set(["crop", "size"], [224, 224]), ["crop.size"]),
    ("bad_crop_size_frac", "ct_merlin", _set(["crop", "size"], [224, 224.5, 160]), ["crop.size"]),
    ("bad_crop_type", "ct_merlin", _set(["crop"], "224x224x160"), ["crop"]),
    ("bad_crop_mode", "ct_merlin", _set(["crop", "mode"], "random"), ["crop.mode", "random"]),
    ("crop_center_without_size", "ct_merlin", _del(["crop", "size"]), ["crop.mode", "crop.size"]),
    ("bad_crop_input", "ct_seg", _set(["crop", "input"], "ct"), ["crop.input", "ct"]),
    ("bad_crop_threshold", "ct_seg", _set(["crop", "threshold"], "air"), ["crop.threshold", "air"]),
    ("bad_crop_margin", "ct_seg", _set(["crop", "margin"], [5, 5]), ["crop.margin"]),
    ("bad_crop_margin_neg", "ct_seg", _set(["crop", "margin"], -2), ["crop.margin"]),
    ("bad_crop_margin_str", "ct_seg", _set(["crop", "margin"], "5vox"), ["crop.margin"]),
    ("bad_intensity_type", "ct_merlin", _set(["inputs", "image", "intensity", "type"], "ct"),
     ["inputs.image.intensity.type", "ct_window"]),
    ("bad_intensity_block", "ct_merlin", _set(["inputs", "image", "intensity"], "ct_window"),
     ["inputs.image.intensity.type"]),
    ("bad_hu_order", "ct_merlin", _set(["inputs", "image", "intensity", "hu_max"], -1000), ["hu_max > hu_min"]),
    ("bad_hu_value", "ct_merlin", _set(["inputs", "image", "intensity", "hu_min"], "air"),
     ["inputs.image.intensity.hu_min", "air"]),
    ("bad_out_order", "ct_merlin", _set(["inputs", "image", "intensity", "out_max"], 0.0), ["out_max > out_min"]),
    ("bad_percentile", "mri_brain", _set(["inputs", "mri", "intensity", "upper_percentile"], 150),
     ["inputs.mri.intensity.upper_percentile"]),
    ("bad_percentile_order", "mri_brain", _set(["inputs", "mri", "intensity", "lower_percentile"], 99.9),
     ["upper_percentile > lower_percentile"]),
    ("bad_background", "mri_brain", _set(["inputs", "mri", "intensity", "background"], "zero"),
     ["inputs.mri.intensity.background"]),
    ("bad_foreground", "mri_brain", _set(["inputs", "mri", "intensity", "foreground"], "kmeans"),
     ["inputs.mri.intensity.foreground", "kmeans"]),
    ("bad_pet_mode", "pet", _set(["inputs", "pet", "intensity", "mode"], "suvlbm"), ["inputs.pet.intensity.mode"]),
    ("bad_pet_factor", "pet", _set(["inputs", "pet", "intensity", "factor"], -1), ["inputs.pet.intensity.factor"]),
    ("bad_pet_clip", "pet", _set(["inputs", "pet", "intensity", "clip_max"], "high"),
     ["inputs.pet.intensity.clip_max"]),
    ("bad_kind", "ct_merlin", _set(["inputs", "image", "kind"], "mask"), ["inputs.image.kind", "mask"]),
    ("bad_image_interp", "ct_merlin", _set(["inputs", "image", "interpolation"], "cubic"),
     ["inputs.image.interpolation", "cubic"]),
    ("bad_label_interp", "ct_merlin", _set(["inputs", "label", "interpolation"], "linear"),
     ["inputs.label.interpolation"]),
    ("bad_fill", "ct_merlin", _set(["inputs", "image", "fill"], "air"), ["inputs.image.fill", "air"]),
    ("bad_dtype", "ct_merlin", _set(["inputs", "image", "dtype"], "float64"), ["inputs.image.dtype"]),
    ("bad_required", "pet", _set(["inputs", "mri", "required"], "sometimes"), ["inputs.mri.required"]),
    ("bad_oblique", "ct_merlin", _set(["oblique"], "rotate"), ["oblique", "rotate"]),
    ("bad_shear", "ct_merlin", _set(["shear"], True), ["shear"]),
    ("bad_nonfinite", "ct_merlin", _set(["nonfinite"], "nan"), ["nonfinite"]),
    ("bad_channels", "ct_merlin", _set(["channels"], 3), ["channels"]),
    ("bad_channels_bool", "ct_merlin", _set(["channels"], True), ["channels"]),
    ("bad_antialias", "ct_merlin", _set(["antialias"], "yes please"), ["antialias"]),
    ("no_inputs", "ct_merlin", _del(["inputs"]), ["inputs"]),
    ("only_labels", "ct_merlin", _del(["inputs", "image"]), ["kind image"]),
    ("bad_reference", "mri_brain", _set(["reference"], "label"), ["reference", "label"]),
]


@pytest.mark.parametrize("base,change,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_names_file_and_key(tmp_path, base, change, words):
    path = tmp_path / f"{base}_edited.yaml"
    path.write_text(yaml.safe_dump(edit(base, change), sort_keys=False))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    msg = str(exc.value)
    assert msg.startswith(str(path) + ":"), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert isinstance(exc.value, VolfmError)


def test_validate_spec_names_the_source_it_is_given():
    with pytest.raises(SpecError, match=r"^cohorts/x/spec\.yaml: unknown key 'colour' in the spec"):
        validate_spec({"colour": "red", "inputs": {"image": {}}}, "cohorts/x/spec.yaml")
    with pytest.raises(SpecError, match="a spec must be a YAML mapping"):
        validate_spec(["image"], "list.yaml")


@pytest.mark.parametrize("text,where", [
    ("name: x\ninputs:\n\timage: {kind: image}\n", "line 3"),             # a tab in the indentation
    ("name: x\nspacing: [1.5, 1.5, 3.0\ninputs: {image: {}}\n", "line"),  # unclosed bracket
    ("name: x\ninputs: {image: {kind: image}\n", "line"),                  # unclosed brace
])
def test_malformed_yaml(tmp_path, text, where):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: malformed YAML") and where in msg, msg


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match=f"^{empty}: a spec must be a YAML mapping"):
        load_spec(empty)
    with pytest.raises(SpecError, match=r"nope\.yaml: spec file not found.*ct_merlin"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec("ct_merlin_v2")


# --- hash and idempotence ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_validate_spec_is_idempotent(name, tmp_path):
    once = load_spec(SPEC_DIR / f"{name}.yaml")
    twice = validate_spec(copy.deepcopy(once), "resolved.yaml")
    assert twice == once
    # the resolved spec also survives a YAML round trip (it is stored next to the processed data)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(once))
    assert load_spec(p) == once
    assert spec_hash(load_spec(p)) == spec_hash(once)


def test_validate_spec_does_not_modify_its_input():
    r = raw("ct_seg")
    before = copy.deepcopy(r)
    validate_spec(r, "ct_seg.yaml")
    assert r == before


def test_spec_hash_stable_and_sensitive():
    a = load_spec(SPEC_DIR / "ct_merlin.yaml")
    h = spec_hash(a)
    assert h == spec_hash(load_spec(SPEC_DIR / "ct_merlin.yaml")) == spec_hash(copy.deepcopy(a))
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == spec_hash(validate_spec(raw("ct_merlin"), "elsewhere/ct_merlin.yaml"))  # path-independent
    # key order does not matter
    reordered = dict(reversed(list(raw("ct_merlin").items())))
    assert spec_hash(validate_spec(reordered, "x.yaml")) == h
    # the description is documentation only
    assert spec_hash(validate_spec(edit("ct_merlin", _set(["description"], "notes")), "x.yaml")) == h
    # any processing value changes it
    for change in (_set(["spacing"], [1.5, 1.5, 2.0]), _set(["crop", "size"], [224, 224, 161]),
                   _set(["inputs", "image", "intensity", "hu_max"], 1001), _set(["antialias"], True),
                   _set(["inputs", "label", "interpolation"], "onehot_linear"), _set(["orientation"], "LPS")):
        assert spec_hash(validate_spec(edit("ct_merlin", change), "x.yaml")) != h


# --- storage ------------------------------------------------------------------------------------------

def test_storage_key_validates():
    assert load_spec("ct_merlin")["storage"] == {"codec": "npy", "dtype": "float32", "chunk_patch": [96, 96, 96],
                                                 "clevel": 5}
    spec = validate_spec(edit("ct_merlin", _set(["storage"], {"codec": "blosc2", "dtype": "compact",
                                                               "chunk_patch": 64})), "x.yaml")
    assert spec["storage"] == {"codec": "blosc2", "dtype": "compact", "chunk_patch": [64, 64, 64], "clevel": 5}
    for value, match in (({"codec": "zarr"}, r"x.yaml: storage.codec must be one of npy, blosc2, got 'zarr'"),
                         ({"dtype": "int16"}, r"x.yaml: storage.dtype must be one of float32, compact"),
                         ({"clevel": 10}, r"x.yaml: storage.clevel must be an integer in \[0, 9\], got 10"),
                         ({"clevel": True}, r"storage.clevel must be an integer"),
                         ({"chunk_patch": [96, 0, 96]}, r"x.yaml: storage.chunk_patch must be"),
                         ({"codecs": "npy"}, r"x.yaml: unknown key 'codecs' in storage \(did you mean 'codec'\?\)"),
                         ("blosc2", r"x.yaml: storage must be a mapping")):
        with pytest.raises(SpecError, match=match) as info:
            validate_spec(edit("ct_merlin", _set(["storage"], value)), "x.yaml")
        assert "\n" not in str(info.value)
    assert parse_storage_text("codec=blosc2, dtype=compact,chunk_patch=96x96x64,clevel=3") == {
        "codec": "blosc2", "dtype": "compact", "chunk_patch": [96, 96, 64], "clevel": 3}
    for text, match in (("codec", "expected key=value pairs"), ("codec=zarr", "--storage: storage.codec must be"),
                        ("chunk_patch=0", "--storage: chunk_patch must be")):
        with pytest.raises(SpecError, match=match):
            parse_storage_text(text)


def test_storage_not_in_spec_hash():
    spec = load_spec("ct_merlin")
    h = spec_hash(spec)
    assert h == "b431903ac2bc03ba"  # the hash of ct_merlin before storage blocks existed: stores and checkpoints keep it
    assert spec_hash(with_storage(spec, "codec=blosc2,dtype=compact,clevel=9")) == h
    assert spec_hash(validate_spec(edit("ct_merlin", _set(["storage"], {"codec": "blosc2"})), "x.yaml")) == h
    assert with_storage(spec, {"codec": "blosc2"})["storage"]["codec"] == "blosc2" and spec["storage"]["codec"] == "npy"


def test_compact_needs_integer_hu_window():
    frac = _set(["inputs", "image", "intensity", "hu_min"], -1000.5)
    assert validate_spec(edit("ct_merlin", frac), "x.yaml")["storage"]["dtype"] == "float32"  # fine uncompacted
    with pytest.raises(SpecError, match=r"x.yaml: storage.dtype compact stores CT windows as integer HU levels, so "
                                        r"inputs.image.intensity.hu_min must be a whole number, got -1000.5"):
        validate_spec(edit("ct_merlin", lambda r: (frac(r), _set(["storage"], {"dtype": "compact"})(r))), "x.yaml")
    with pytest.raises(SpecError, match=r"--storage: .*hu_min must be a whole number"):
        with_storage(validate_spec(edit("ct_merlin", frac), "x.yaml"), "dtype=compact")
    # 1000.0 is a whole number; MRI/PET specs have no window to check
    whole = _set(["inputs", "image", "intensity", "hu_max"], 1000.0)
    assert validate_spec(edit("ct_merlin", lambda r: (whole(r), _set(["storage"], {"dtype": "compact"})(r))), "x.yaml")
    assert with_storage(load_spec("mri_brain"), "dtype=compact")["storage"]["dtype"] == "compact"
