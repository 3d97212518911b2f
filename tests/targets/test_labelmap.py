"""volfm.targets.labelmap: remapping, merging, picking, ignore labels, error messages, YAML round trip."""
import json

import numpy as np
import pytest
import yaml

from volfm import VolfmError
from volfm.synth.ct import LABEL_IDS, LABELS
from volfm.targets.labelmap import LabelMap, load_source_labels, normalize_source_labels


def _all_values(shape=(1, 6, 5, 4), values=range(10), seed=0):
    """A (1, I, J, K) uint8 label array holding each of ``values`` at least once."""
    rng = np.random.default_rng(seed)
    vals = np.array(list(values), np.uint8)
    arr = rng.choice(vals, size=shape).astype(np.uint8)
    arr.ravel()[: len(vals)] = vals
    return arr


def _reference_remap(arr, table, default=0):
    """Voxel-by-voxel loop: the obvious implementation."""
    out = np.empty_like(arr)
    for idx, v in np.ndenumerate(arr):
        out[idx] = table.get(int(v), default)
    return out


def test_merge_and_rename_by_names_and_values():
    doc = {"classes": {"kidney": ["kidney_left", "kidney_right"], "spleen": 2, "lung": ["lung_left", 6]}}
    lm = LabelMap.from_yaml(doc, source_labels=LABELS)
    assert lm.class_names == ["background", "kidney", "spleen", "lung"] and lm.num_classes == 4
    assert lm.classes == {"background": (0,), "kidney": (3, 4), "spleen": (2,), "lung": (5, 6)}
    arr = _all_values()
    out = lm.remap(arr)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    np.testing.assert_array_equal(out, _reference_remap(arr, {3: 1, 4: 1, 2: 2, 5: 3, 6: 3}))
    assert lm.lut.shape == (256,) and lm.lut.dtype == np.uint8 and not lm.lut.flags.writeable


def test_pick_one_organ_from_multi_organ_map():
    lm = LabelMap.from_names(["spleen"], LABELS)
    assert lm.class_names == ["background", "spleen"] and lm.num_classes == 2
    arr = _all_values()
    np.testing.assert_array_equal(lm.remap(arr), (arr == LABEL_IDS["spleen"]).astype(np.uint8))
    lm.check(arr)  # liver etc. are known to the source map: dropped to background, not unknown
    assert lm == LabelMap.from_yaml({"classes": ["spleen"]}, source_labels=LABEL_IDS)
    assert lm == LabelMap.from_yaml({"classes": {"spleen": None}}, source_labels=LABEL_IDS)  # `spleen:` alone


def test_ignore_labels_go_to_ignore_index():
    lm = LabelMap.from_yaml({"classes": {"liver": "liver"}, "ignore": ["lung_left", "lung_right"]}, LABELS)
    arr = _all_values()
    np.testing.assert_array_equal(lm.remap(arr), _reference_remap(arr, {1: 1, 5: 255, 6: 255}))
    lm2 = LabelMap.from_yaml({"classes": {"liver": 1}, "ignore": 9, "ignore_index": 200})
    np.testing.assert_array_equal(lm2.remap(arr), _reference_remap(arr, {1: 1, 9: 200}))
    with pytest.raises(VolfmError, match="ignore_index 1 is a class index"):
        LabelMap.from_yaml({"classes": {"liver": 1}, "ignore_index": 1})
    with pytest.raises(VolfmError, match="both ignored and in class 'liver'"):
        LabelMap.from_yaml({"classes": {"liver": 1}, "ignore": [1]})


def test_background_rules():
    lm = LabelMap.from_yaml({"classes": {"liver": 1, "background": [0, "gallbladder"]}}, LABELS)
    assert lm.class_names == ["background", "liver"]  # background is class 0 wherever it is listed
    assert lm.classes["background"] == (0, 9)
    lm = LabelMap.from_yaml({"classes": {"tissue": [0, 1]}})  # 0 claimed: background holds nothing
    assert lm.classes == {"background": (), "tissue": (0, 1)}
    np.testing.assert_array_equal(lm.remap(np.array([0, 1, 2], np.uint8)), [1, 1, 0])


def test_unknown_values_error_names_the_case_and_what_to_do(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("classes:\n  spleen: spleen\n")
    lm = LabelMap.from_yaml(path, source_labels=LABELS)
    arr = _all_values(values=[0, 1, 2, 12, 40])
    with pytest.raises(VolfmError) as err:
        lm.check(arr, source="stores/ct case ct_0003 label.npy")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("stores/ct case ct_0003 label.npy: label values [12, 40] are missing from the label map")
    assert str(path) in msg and "it knows 0-9" in msg and "strict=False" in msg
    np.testing.assert_array_equal(lm.remap(arr), (arr == 2).astype(np.uint8))  # not strict: background
    with pytest.raises(VolfmError, match=r"case ct_0003.*\[12, 40\]"):
        lm.remap(arr, strict=True, source="case ct_0003")
    assert lm.check(_all_values()) == list(range(10))
    # without a source map only the values the classes name (and 0) are known
    bare = LabelMap.from_yaml({"classes": {"spleen": 2}})
    with pytest.raises(VolfmError, match=r"label values \[1, 3, 4, 5, 6, 7, 8, 9\] are missing.*knows 0, 2"):
        bare.check(_all_values())


def test_remap_accepts_other_integer_dtypes_and_refuses_out_of_range():
    lm = LabelMap.from_names(["liver", "aorta"], LABELS)
    arr = _all_values()
    for a in (arr.astype(np.int16), arr.astype(np.int64), arr.astype(np.float32)):
        np.testing.assert_array_equal(lm.remap(a), lm.remap(arr))
    with pytest.raises(VolfmError, match=r"\[-1, 300\] are outside 0-255"):
        lm.remap(np.array([0, -1, 300], np.int16), source="case x")
    with pytest.raises(VolfmError, match="non-integer"):
        lm.remap(np.array([0.5, 1.0]))


def test_did_you_mean():
    with pytest.raises(VolfmError, match=r"unknown source label 'splen' \(did you mean 'spleen'\?\); known: back"):
        LabelMap.from_yaml({"classes": {"spleen": "splen"}}, LABELS)
    with pytest.raises(VolfmError, match=r"did you mean 'kidney_left'"):
        LabelMap.from_names(["kidney_lft"], LABELS)
    with pytest.raises(VolfmError, match=r"unknown key 'clases' \(did you mean 'classes'\?\)"):
        LabelMap.from_yaml({"clases": {"spleen": 2}})


@pytest.mark.parametrize("doc, match", [
    ({"classes": {"a": 1, "b": [2, 1]}}, "source value 1 is in both 'a' and 'b'"),
    ({"classes": {"a": 256}}, "label value 256 is outside 0-255"),
    ({"classes": {"a": -1}}, "label value -1 is outside 0-255"),
    ({"classes": {"a": 1.5}}, "1.5 is not a label value"),
    ({"classes": {"a": True}}, "True is not a label value"),
    ({"classes": {"a": []}}, "class 'a' names no source label"),
    ({"classes": {}}, "non-empty mapping"),
    ({"source": {"liver": 1}}, "no 'classes'"),
    ({"classes": {"a": "liver"}}, "no source map is known"),
    ({"classes": ["liver", "liver"], "source": {"liver": 1}}, "listed twice"),
    ({"classes": {1: 2}}, "class name 1 is not a text"),
    ({"classes": {"a": 1}, "source": {"liver": 1, "spleen": 1}}, "share value 1"),
    ({"classes": {"a": 1}, "ignore_index": "x"}, "ignore_index must be an integer"),
])
def test_malformed_maps(doc, match):
    with pytest.raises(VolfmError, match=match):
        LabelMap.from_yaml(doc)


def test_malformed_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  spleen: [2\n")
    with pytest.raises(VolfmError, match=r"bad.yaml: malformed label map YAML"):
        LabelMap.from_yaml(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("classes:\n  spleen: 2\n  spleen: 3\n")
    with pytest.raises(VolfmError, match="duplicate key 'spleen'"):
        LabelMap.from_yaml(dup)
    lst = tmp_path / "list.yaml"
    lst.write_text("- spleen\n")
    with pytest.raises(VolfmError, match="a label map is a mapping"):
        LabelMap.from_yaml(lst)
    with pytest.raises(VolfmError, match="label map not found"):
        LabelMap.from_yaml(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    text = """
# kidneys merged, spleen kept, lungs ignored
source: {background: 0, liver: 1, spleen: 2, kidney_left: 3, kidney_right: 4, lung_left: 5, lung_right: 6}
classes:
  background: 0
  kidney: [kidney_left, kidney_right]
  spleen: spleen
ignore: [lung_left, lung_right]
"""
    src = tmp_path / "task.yaml"
    src.write_text(text)
    lm = LabelMap.from_yaml(src)
    assert lm.to_dict() == {"source": {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3,
                                       "kidney_right": 4, "lung_left": 5, "lung_right": 6},
                            "classes": {"background": 0, "kidney": [3, 4], "spleen": 2}, "ignore": [5, 6]}
    out = tmp_path / "out.yaml"
    written = lm.to_yaml(out)
    assert out.read_text() == written and yaml.safe_load(written) == lm.to_dict()
    again = LabelMap.from_yaml(out)
    assert again == lm and again.to_dict() == lm.to_dict()
    arr = _all_values(values=range(7))
    np.testing.assert_array_equal(again.remap(arr), lm.remap(arr))
    odd = LabelMap.from_yaml({"classes": {"liver": 1}, "ignore_index": 254})
    assert LabelMap.from_yaml(odd.to_dict()) == odd and odd.to_dict()["ignore_index"] == 254
    # the YAML's source and the one passed in must agree
    assert LabelMap.from_yaml(src, source_labels={k: v for k, v in lm.source.items()}) == lm
    with pytest.raises(VolfmError, match="disagrees with the source_labels"):
        LabelMap.from_yaml(src, source_labels=LABELS)


def test_source_label_formats_from_synth_ct():
    assert normalize_source_labels(LABELS) == LABEL_IDS  # value -> name is inverted
    assert normalize_source_labels(json.loads(json.dumps(LABELS))) == LABEL_IDS  # JSON's string keys
    assert normalize_source_labels(LABEL_IDS) == LABEL_IDS
    everything = LabelMap.from_yaml({"classes": [n for n in LABEL_IDS if n != "background"]}, LABELS)
    assert everything.class_names == [LABELS[v] for v in range(len(LABELS))]
    arr = _all_values()
    np.testing.assert_array_equal(everything.remap(arr), arr)  # identity on the synthetic cohort's labels


def test_load_source_labels_from_cohort_store_and_files(tmp_path):
    from volfm.data.dataset import StoreDataset
    from volfm.preprocess.spec import load_spec
    from volfm.store.build import run_cohort
    from volfm.synth.ct import make_ct_cohort

    table = make_ct_cohort(tmp_path / "cohort", 2, seed=0, shape=(24, 24, 12), progress=False)
    assert load_source_labels(tmp_path / "cohort") == LABEL_IDS
    assert load_source_labels(table) == LABEL_IDS
    assert load_source_labels(tmp_path / "cohort" / "labels.json") == LABEL_IDS
    spec = load_spec("ct_seg")
    spec.update(spacing=[12.0, 12.0, 12.0], antialias=False)
    spec["inputs"]["label"]["interpolation"] = "nearest"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert run_cohort(tmp_path / "spec.yaml", tmp_path / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    assert load_source_labels(tmp_path / "store") == LABEL_IDS  # found next to the store's source labels

    lm = LabelMap.from_names(["liver"], tmp_path / "store")
    ds = StoreDataset(tmp_path / "store", arrays=(), label="label")
    case = ds[0]
    label = np.asarray(case["label"])
    assert label.shape[0] == 1 and label.dtype == np.uint8
    lm.check(label, source=f"store case {case['case_id']}")
    np.testing.assert_array_equal(lm.remap(label), (label == 1).astype(np.uint8))

    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "labels": {"0": "background", "1": "pancreas"}}))
    assert load_source_labels(tmp_path / "dataset.json") == {"background": 0, "pancreas": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolfmError, match=r"empty: no label names found \(looked for .*labels.json"):
        load_source_labels(tmp_path / "empty")
