"""ICD-10-CM vocabularies (volfm.targets.icd): normalization, hierarchy roll-up, mapping tables, encoding, JSON."""
import json

import numpy as np
import pytest
import simple_icd_10_cm as icd

from volfm import VolfmError
from volfm.targets.icd import LEVELS, IcdVocabulary, load_mapping, normalize_code, roll_up

ANCHORS = ["R16.0", "R16.1", "K76.0", "N28.1", "N20.0", "K80.20", "J90", "R18.8", "R91.1", "J98.11",
           "I71.40", "I10", "E11.9", "E78.5", "Z87.891"]


# ------------------------------------------------------------------------------------ normalize_code
@pytest.mark.parametrize("raw, want", [
    ("K76.0", "K76.0"), ("k760", "K76.0"), (" K76.0 ", "K76.0"), ("K760", "K76.0"), ("k76.0", "K76.0"),
    ("R16.0", "R16.0"), ("K8020", "K80.20"), ("K80.20", "K80.20"), ("J90", "J90"), ("j90", "J90"),
    ("Z87891", "Z87.891"), ("i7140", "I71.40"), ("K 76.0", "K76.0"), ("S72001A", "S72.001A"),
    ("t360x1a", "T36.0X1A"), ("C7A.00", "C7A.00"),
    ("K7620", "K76.20"),  # well-formed but not in ICD-10-CM: still dotted by hand
    ("Q99.99", "Q99.99"),
])
def test_normalize_good(raw, want):
    assert normalize_code(raw) == want


@pytest.mark.parametrize("raw", ["", "   ", "12.3", "hello", "K7", "K", "7K6.0", "KK6.0", "K76.00000",
                                 "K80-K87", "11", "K76.0;I10", "K76-0", None, 760, float("nan")])
def test_normalize_malformed(raw):
    assert normalize_code(raw) is None


# ----------------------------------------------------------------------------------------- roll_up
@pytest.mark.parametrize("code", ANCHORS)
def test_roll_up_matches_library_hierarchy(code):
    assert icd.is_valid_item(code)
    anc = icd.get_ancestors(code)
    assert roll_up(code, "full") == code
    assert roll_up(code, "chapter") == anc[-1]
    assert icd.is_chapter(roll_up(code, "chapter"))
    block = roll_up(code, "block")
    assert block in anc and icd.is_block(block) and "-" in block
    cat = roll_up(code, "category")
    assert icd.is_category(cat) and cat == code[:3]
    assert cat == code or cat in anc


@pytest.mark.parametrize("code, cat, block, chapter", [
    ("K80.20", "K80", "K80-K87", "11"), ("K76.0", "K76", "K70-K77", "11"), ("J90", "J90", "J90-J94", "10"),
    ("J98.11", "J98", "J96-J99", "10"), ("I71.40", "I71", "I70-I79", "9"), ("I10", "I10", "I10-I1A", "9"),
    ("Z87.891", "Z87", "Z77-Z99", "21"), ("N20.0", "N20", "N20-N23", "14"), ("R16.1", "R16", "R10-R19", "18"),
    ("E11.9", "E11", "E08-E13", "4"),
    ("C50.911", "C50", "C50", "2"),  # 'C50' is both a category and a one-category block
])
def test_roll_up_values(code, cat, block, chapter):
    assert roll_up(code, "category") == cat
    assert roll_up(code, "block") == block
    assert roll_up(code, "chapter") == chapter


def test_roll_up_unnormalized_unknown_and_bad_level():
    assert roll_up("k8020", "block") == "K80-K87"
    assert roll_up("K80.2", "category") == "K80"  # valid non-billable parent code
    assert roll_up("K76.20", "category") is None  # well-formed, not in ICD-10-CM
    assert roll_up("hello", "full") is None
    with pytest.raises(VolfmError, match="full, category, block, chapter"):
        roll_up("K76.0", "subcategory")


# -------------------------------------------------------------------------------------- vocabulary
CASES = [
    "K76.0;I10",
    ["K80.20", "R16.0", "I10"],
    ["k800", " K76.0 ", "E11.9"],
    ["hello", "K76.20", "12.3"],  # malformed, unknown, malformed
    [],
    None,
    "J90;R18.8;E78.5;I10",
]


def test_build_category_counts_and_stats():
    v = IcdVocabulary.build(CASES, level="category", source="store/x")
    assert v.level == "category" and v.min_count == 1
    assert v.classes == sorted(["E11", "E78", "I10", "J90", "K76", "K80", "R16", "R18"])
    assert v.counts == {"E11": 1, "E78": 1, "I10": 3, "J90": 1, "K76": 2, "K80": 2, "R16": 1, "R18": 1}
    assert v.descriptions["K80"] == icd.get_description("K80") == "Cholelithiasis"
    s = v.stats
    assert s["cases"] == 7 and s["cases_without_codes"] == 2 and s["cases_without_classes"] == 3
    assert s["codes"] == 15
    assert s["malformed"] == {"count": 2, "unique": 2, "examples": ["hello", "12.3"]}
    assert s["unknown"] == {"count": 1, "unique": 1, "examples": ["K76.20"]}
    assert s["unmapped"]["count"] == 0
    assert s["dropped_classes"] == {"count": 0, "examples": []}
    text = v.summary()
    assert "level 'category'" in text and "8 classes" in text and "store/x" in text
    assert "2 malformed codes" in text and "hello" in text and "K76.20" in text


@pytest.mark.parametrize("level, classes", [
    ("full", ["E11.9", "E78.5", "I10", "J90", "K76.0", "K80.0", "K80.20", "R16.0", "R18.8"]),
    ("block", ["E08-E13", "E70-E88", "I10-I1A", "J90-J94", "K70-K77", "K80-K87", "R10-R19"]),
    ("chapter", ["10", "11", "18", "4", "9"]),
])
def test_build_levels(level, classes):
    v = IcdVocabulary.build(CASES, level=level)
    assert v.classes == sorted(classes)
    if level == "block":
        assert v.counts["K80-K87"] == 2 and v.counts["R10-R19"] == 2
        assert v.descriptions["K80-K87"] == icd.get_description("K80-K87")
    if level == "chapter":
        assert v.counts["11"] == 3 and v.descriptions["11"].startswith("Diseases of the digestive system")


def test_min_count_drops_rare_classes():
    v = IcdVocabulary.build(CASES, level="category", min_count=2)
    assert v.classes == ["I10", "K76", "K80"]
    assert v.stats["classes_before_min_count"] == 8
    assert v.stats["dropped_classes"]["count"] == 5
    assert v.stats["dropped_classes"]["examples"] == ["E11", "E78", "J90", "R16", "R18"]
    assert v.stats["cases_without_classes"] == 3
    assert "5 of 8 classes dropped" in v.summary()
    np.testing.assert_array_equal(v.encode("J90;I10;R16.0"), [1, 0, 0])  # rare codes ignored


def test_encode_decode_round_trip():
    v = IcdVocabulary.build(CASES, level="category")
    x = v.encode(["K80.20", "I10", "hello", "K76.20", "Q99.99", "", "k760"])
    assert x.dtype == np.float32 and x.shape == (len(v),) == (8,)
    assert v.decode(x) == ["I10", "K76", "K80"]
    assert x.sum() == 3 and x[v.index("K80")] == 1 and x[v.index("k80")] == 1
    assert v.decode(np.flatnonzero(x)) == ["I10", "K76", "K80"]
    assert v.decode([v.index("J90")]) == ["J90"]
    assert v.decode(x > 0) == ["I10", "K76", "K80"]
    assert v.decode(np.array([0.9, 0.1, 0.4, 0.6, 0, 0, 0, 0], dtype=np.float32)) == ["E11", "J90"]
    assert v.encode(None).sum() == 0 and v.encode("garbage;;").sum() == 0
    m = v.encode_many(CASES)
    assert m.shape == (7, 8) and m.dtype == np.float32
    assert m.sum(axis=0).tolist() == [v.counts[c] for c in v.classes]
    assert v.encode_many([]).shape == (0, 8)
    assert "J90" in v and "Z99" not in v
    with pytest.raises(VolfmError, match="not a class"):
        v.index("Z99")
    with pytest.raises(VolfmError, match="length 3"):
        v.decode(np.ones(3, dtype=np.float32))
    with pytest.raises(VolfmError, match="out of range"):
        v.decode([8])


def test_anchor_codes_all_known():
    v = IcdVocabulary.build([ANCHORS], level="full")
    assert v.classes == sorted(ANCHORS)
    assert v.stats["unknown"]["count"] == 0 and v.stats["malformed"]["count"] == 0
    v = IcdVocabulary.build([ANCHORS[:11], ANCHORS[11:]], level="chapter")
    assert v.classes == sorted({icd.get_ancestors(c)[-1] for c in ANCHORS})


def test_errors_level_min_count_empty():
    with pytest.raises(VolfmError, match="valid levels: full, category, block, chapter"):
        IcdVocabulary.build(CASES, level="phenotype")
    with pytest.raises(VolfmError, match="min_count"):
        IcdVocabulary.build(CASES, min_count=0)
    with pytest.raises(VolfmError, match=r"8 classes .* before the min_count filter.*lower min_count"):
        IcdVocabulary.build(CASES, level="category", min_count=10, source="store/x")
    with pytest.raises(VolfmError, match=r"0 classes .*2 malformed"):
        IcdVocabulary.build([["hello", "12.3"], []], source="store/y")
    with pytest.raises(VolfmError, match="needs a mapping table"):
        IcdVocabulary.build(CASES, level="mapping")


# ---------------------------------------------------------------------------------------- mapping
PHECODE_CSV = (
    "icd10cm,icd10cm_str,phecode,phecode_str,exclude_range\n"
    "K80,Cholelithiasis,574,Cholelithiasis and cholecystitis,\n"
    "K80.20,Calculus of gallbladder,574.1,Cholelithiasis without cholecystitis,\n"
    "K80.20,Calculus of gallbladder,574,Cholelithiasis and cholecystitis,\n"
    "K76.0,Fatty liver,571.5,Other chronic nonalcoholic liver disease,\n"
    "I10,Essential hypertension,401.1,Essential hypertension,\n"
    "E11.9,Type 2 diabetes,250.2,Type 2 diabetes,\n"
    "not-a-code,x,999,bad row,\n"
    "R16.0,Hepatomegaly,,,\n"
)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_mapping_autodetect_longest_prefix_multi_target(tmp_path):
    p = _write(tmp_path, "phecode_map.csv", PHECODE_CSV)
    m = load_mapping(p)
    assert (m.info["code_column"], m.info["target_column"], m.info["description_column"]) == \
        ("icd10cm", "phecode", "phecode_str")
    assert m.info["malformed_rows"] == {"count": 1, "examples": ["not-a-code"]}
    assert m.info["rows_without_target"] == 1
    assert m.lookup("K80.20") == ["574.1", "574"]  # the most specific entry, both targets
    assert m.lookup("K80.21") == ["574"]  # falls back to the 'K80' entry
    assert m.lookup("K80") == ["574"]
    assert m.lookup("K76.0") == ["571.5"] and m.lookup("K76.9") is None

    cases = [["K80.20", "I10"], ["K80.10", "K76.0", "R16.0", "J90"], ["E11.9", "bad"], ["I10"]]
    v = IcdVocabulary.build(cases, mapping=p, source="store/z")
    assert v.level == "mapping"
    assert v.classes == ["250.2", "401.1", "571.5", "574", "574.1"]
    assert v.counts == {"250.2": 1, "401.1": 2, "571.5": 1, "574": 2, "574.1": 1}
    assert v.descriptions["574.1"] == "Cholelithiasis without cholecystitis"
    s = v.stats
    assert s["unmapped"] == {"count": 2, "unique": 2, "examples": ["R16.0", "J90"]}
    assert s["malformed"]["count"] == 1 and s["unknown"]["count"] == 0
    assert s["mapping"]["path"] == str(p)
    assert v.decode(v.encode(["k8020"])) == ["574", "574.1"]
    assert v.decode(v.encode(["K80.01", "I10"])) == ["401.1", "574"]
    assert "2 codes not in the mapping table" in v.summary() and "R16.0" in v.summary()


def test_mapping_explicit_columns_tsv_and_case(tmp_path):
    tsv = ("ICD10CM\tPHECODE\tGroup Name\n"
           "K80.2\tgallstones\tGallbladder stones\n"
           "K80\tbiliary\tBiliary disease\n"
           "k7600\tliver\tLiver\n")
    p = _write(tmp_path, "map.tsv", tsv)
    v = IcdVocabulary.build([["K80.20"], ["K80.10"], ["K76.00"]], mapping=p,
                            mapping_columns=("icd10cm", "phecode", "group name"))
    assert v.classes == ["biliary", "gallstones", "liver"]
    assert v.descriptions == {"biliary": "Biliary disease", "gallstones": "Gallbladder stones", "liver": "Liver"}
    assert v.decode(v.encode(["K80.20"])) == ["gallstones"]  # 'K80.2' beats 'K80'
    # auto-detection also works case-insensitively, without a description column of the target's name
    assert load_mapping(p).info["code_column"] == "ICD10CM"
    assert load_mapping(p).info["description_column"] is None


def test_mapping_bad_header_and_missing_file(tmp_path):
    p = _write(tmp_path, "m.csv", "diag,outcome\nK80,574\n")
    with pytest.raises(VolfmError, match=r"cannot tell .*code column.*\['diag', 'outcome'\].*mapping_columns"):
        IcdVocabulary.build([["K80.20"]], mapping=p)
    v = IcdVocabulary.build([["K80.20"]], mapping=p, mapping_columns=["diag", "outcome"])
    assert v.classes == ["574"]
    with pytest.raises(VolfmError, match=r"no column\(s\) \['phecode'\].*\['diag', 'outcome'\]"):
        IcdVocabulary.build([["K80.20"]], mapping=p, mapping_columns=("diag", "phecode"))
    missing = tmp_path / "nope.csv"
    with pytest.raises(VolfmError, match="nope.csv does not exist"):
        IcdVocabulary.build([["K80.20"]], mapping=missing)
    with pytest.raises(VolfmError, match="empty"):
        load_mapping(_write(tmp_path, "e.csv", ""))


def test_mapping_trim_keeps_longest_prefix_semantics(tmp_path):
    csv_text = "icd10cm,phecode\nK80,574\nK80.2,574.1\nI10,401.1\n"
    p = _write(tmp_path, "m.csv", csv_text)
    # '574.1' is dropped by min_count; 'K80.20' must still not fall back to 'K80' -> '574'
    cases = [["K80.10", "I10"], ["K80.00", "I10"], ["K80.20"]]
    v = IcdVocabulary.build(cases, mapping=p, min_count=2)
    assert v.classes == ["401.1", "574"]
    assert v.encode(["K80.20"]).sum() == 0
    v2 = IcdVocabulary.from_dict(json.loads(json.dumps(v.to_dict())))
    assert v2.encode(["K80.20"]).sum() == 0
    np.testing.assert_array_equal(v2.encode(["K80.11", "I10"]), [1, 1])
    assert "I10" not in v2.mapping.entries or v2.mapping.entries["I10"] == ["401.1"]
    assert "K802" in v2.mapping.entries  # kept as an (empty) blocker


# ------------------------------------------------------------------------------------------- JSON
def test_json_round_trip(tmp_path):
    v = IcdVocabulary.build(CASES, level="block", min_count=2, source="store/x")
    path = tmp_path / "sub" / "icd_vocab.json"
    v.to_json(path)
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    w = IcdVocabulary.from_json(path)
    assert (w.classes, w.counts, w.descriptions, w.level, w.min_count) == \
        (v.classes, v.counts, v.descriptions, v.level, v.min_count)
    assert w.stats == v.stats and w.summary() == v.summary()
    for case in CASES:
        np.testing.assert_array_equal(w.encode(case), v.encode(case))
    assert IcdVocabulary.from_dict(v.to_dict()).classes == v.classes


def test_json_mapping_round_trip(tmp_path):
    p = _write(tmp_path, "phecode_map.csv", PHECODE_CSV)
    v = IcdVocabulary.build([["K80.20", "I10"], ["K80.10"]], mapping=p)
    v.to_json(tmp_path / "v.json")
    p.unlink()  # the saved vocabulary does not need the table any more
    w = IcdVocabulary.from_json(tmp_path / "v.json")
    assert w.level == "mapping" and w.classes == v.classes == ["401.1", "574", "574.1"]
    assert w.decode(w.encode(["K80.20", "E11.9"])) == ["574", "574.1"]
    assert w.decode(w.encode(["K80.99"])) == ["574"]


def test_from_json_missing_and_corrupt(tmp_path):
    with pytest.raises(VolfmError, match="absent.json does not exist"):
        IcdVocabulary.from_json(tmp_path / "absent.json")
    bad = _write(tmp_path, "bad.json", "{not json")
    with pytest.raises(VolfmError, match="bad.json is unreadable or corrupt"):
        IcdVocabulary.from_json(bad)
    other = _write(tmp_path, "other.json", json.dumps({"classes": ["K80"]}))
    with pytest.raises(VolfmError, match="not an ICD vocabulary in .*other.json"):
        IcdVocabulary.from_json(other)
    d = IcdVocabulary.build(CASES).to_dict()
    d["level"] = "organ"
    broken = _write(tmp_path, "broken.json", json.dumps(d))
    with pytest.raises(VolfmError, match="broken.json is invalid.*valid levels"):
        IcdVocabulary.from_json(broken)


def test_levels_constant():
    assert LEVELS == ("full", "category", "block", "chapter")
