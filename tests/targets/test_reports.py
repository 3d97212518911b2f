"""Report sections, text views and WordPiece tokenizers (offline)."""
import json

import numpy as np
import pytest

from volfm import VolfmError
from volfm.models.text import tokenizer_from_json, tokenizer_to_json, train_wordpiece_tokenizer
from volfm.synth.ct import REPORT_SECTIONS, make_ct_case
from volfm.targets.reports import (
    MERLIN_SECTIONS,
    SECTION_TITLES,
    canonical_section,
    report_sections_list,
    report_views,
    split_report_sections,
)

REAL = (
    "EXAM: CT ABDOMEN AND PELVIS WITH CONTRAST\r\n\r\n"
    "CLINICAL HISTORY: Abdominal pain.\r\n"
    "COMPARISON: None.\r\n\r\n"
    "FINDINGS:\r\n"
    "Lung bases: Mild bibasilar atelectasis.\r\n\r\n"
    "HEPATOBILIARY:\r\n"
    "The liver is enlarged.\r\n"
    "No biliary dilatation.\r\n"
    "Gallbladder: Cholelithiasis.\r\n"
    "SPLEEN/PANCREAS: Unremarkable.\r\n"
    "Adrenals: Normal.\r\n"
    "URINARY: 4 mm nonobstructing left renal stone.\r\n"
    "BOWEL: No obstruction. Appendix normal.\r\n"
    "STRANGE HEADER: Something else.\r\n"
    "BONES: Degenerative changes.\r\n\r\n"
    "IMPRESSION:\r\n"
    "1. Hepatomegaly.\r\n"
    "2. Cholelithiasis.")


@pytest.fixture(scope="module")
def synth_reports():
    return [make_ct_case(seed, shape=(16, 16, 16))["report"] for seed in range(30)]


def test_synthetic_report_sections_match_lines(synth_reports):
    for report in synth_reports:
        sections = split_report_sections(report)
        lines = report.split("\n")
        assert lines[0].startswith("TECHNIQUE: ") and sections["technique"] == lines[0][len("TECHNIQUE: "):]
        assert lines[-1].startswith("IMPRESSION: ") and sections["impression"] == lines[-1][len("IMPRESSION: "):]
        for name in REPORT_SECTIONS:
            line = next(x for x in lines if x.startswith(name + ":"))
            key = name.lower().replace(" ", "_")
            assert key in MERLIN_SECTIONS
            assert sections[key] == line[len(name) + 2:]
        expected = {"technique", "impression", *(n.lower().replace(" ", "_") for n in REPORT_SECTIONS)}
        assert set(sections) == expected  # nothing in "findings" / "other"


def test_real_world_report_synonyms_and_own_line_headers():
    sections = split_report_sections(REAL)
    assert sections == {
        "history": "Abdominal pain.",
        "comparison": "None.",
        "technique": "CT ABDOMEN AND PELVIS WITH CONTRAST",
        "lower_thorax": "Mild bibasilar atelectasis.",
        "liver_and_biliary": "The liver is enlarged. No biliary dilatation.",
        "gallbladder": "Cholelithiasis.",
        "spleen": "Unremarkable.",
        "adrenal_glands": "Normal.",
        "kidneys_and_ureters": "4 mm nonobstructing left renal stone.",
        "gastrointestinal_tract": "No obstruction. Appendix normal.",
        "musculoskeletal": "Degenerative changes.",
        "other": "STRANGE HEADER: Something else.",
        "impression": "1. Hepatomegaly. 2. Cholelithiasis.",
    }
    assert list(sections)[-1] == "impression"


def test_lower_case_colonless_and_inline_headers():
    text = "findings\nliver\nnormal in size.\n\nkidneys:\nno stones.\nimpression\nno acute process."
    assert split_report_sections(text) == {"liver_and_biliary": "normal in size.",
                                           "kidneys_and_ureters": "no stones.",
                                           "impression": "no acute process."}
    one_line = "Findings: Small hiatal hernia. LIVER: Fatty. Pelvis: normal. Impression: Hepatic steatosis."
    # "Pelvis:" mid-line in mixed case is not split (only upper-case or top-level headers are)
    assert split_report_sections(one_line) == {"findings": "Small hiatal hernia.",
                                               "liver_and_biliary": "Fatty. Pelvis: normal.",
                                               "impression": "Hepatic steatosis."}
    both = split_report_sections("FINDINGS: LIVER: Normal.\nNote: the spleen is small.")
    assert both == {"liver_and_biliary": "Normal. Note: the spleen is small."}


def test_free_text_and_empty_reports():
    assert split_report_sections(None) == {}
    assert split_report_sections("") == {}
    assert split_report_sections(" \r\n \n") == {}
    assert split_report_sections("No header at all.\nSecond line.") == {"other": "No header at all. Second line."}
    assert split_report_sections("FINDINGS:\nThe liver is normal.\n") == {"findings": "The liver is normal."}


@pytest.mark.parametrize("header, key", [
    ("LIVER", "liver_and_biliary"), ("HEPATOBILIARY", "liver_and_biliary"), ("BILIARY", "liver_and_biliary"),
    ("Liver/Gallbladder", "liver_and_biliary"), ("KIDNEYS", "kidneys_and_ureters"),
    ("URINARY", "kidneys_and_ureters"), ("Kidneys, ureters and bladder", "kidneys_and_ureters"),
    ("BOWEL", "gastrointestinal_tract"), ("GI", "gastrointestinal_tract"), ("BONES", "musculoskeletal"),
    ("bones & soft tissues", "musculoskeletal"), ("LUNG BASES", "lower_thorax"), ("adrenals", "adrenal_glands"),
    ("PELVIS", "pelvic_organs"), ("LYMPH NODES", "lymph_nodes"), ("Aorta", "vasculature"),
    ("Indication", "history"), ("CONCLUSION", "impression"), ("LIVER PARENCHYMA", "liver_and_biliary"),
    ("WHATEVER", None)])
def test_canonical_section_synonyms(header, key):
    assert canonical_section(header) == key


def test_section_names():
    assert len(MERLIN_SECTIONS) == 13
    assert SECTION_TITLES["liver_and_biliary"] == "liver and biliary"


def test_report_views(synth_reports):
    report = synth_reports[0]
    assert report_views(report, "whole") == " ".join(report.split())
    fi = report_views(report, "findings_impression")
    assert "TECHNIQUE" not in fi and "technique" not in fi and "portal venous phase" not in fi
    assert "portal venous phase" in report  # seed 0 is a contrast study
    sections = split_report_sections(report)
    assert sections["technique"] not in fi and fi.endswith("impression: " + sections["impression"])
    assert fi.startswith("lower thorax: " + sections["lower_thorax"])
    listed = report_views(report, "sections")
    assert listed == report_sections_list(report) and isinstance(listed, list)
    assert listed[1] == "liver and biliary: " + sections["liver_and_biliary"]
    assert " ".join(listed) == fi

    draws = [report_views(report, "random_section", rng=np.random.default_rng(s)) for s in range(40)]
    again = [report_views(report, "random_section", rng=np.random.default_rng(s)) for s in range(40)]
    assert draws == again
    organ_items = [x for x in listed if not x.startswith("impression")]
    assert set(draws) <= set(organ_items) and len(set(draws)) >= 5
    assert report_views(report, "random_section", rng=3) == report_views(report, "random_section", rng=3)
    # precomputed sections give the same views
    assert report_views(report, "random_section", rng=5, sections=sections) == report_views(
        report, "random_section", rng=5)


def test_report_views_edge_cases():
    for mode in ("whole", "findings_impression", "random_section"):
        assert report_views("", mode) == "" and report_views(None, mode) == ""
    assert report_views(None, "sections") == []
    text = "FINDINGS: Nothing focal.\nIMPRESSION: Normal."
    assert report_views(text, "random_section", rng=0) == "findings: Nothing focal. impression: Normal."
    with pytest.raises(VolfmError, match="unknown report view mode"):
        report_views(text, "nope")


def test_wordpiece_tokenizer_roundtrips(tmp_path, synth_reports):
    from transformers import AutoTokenizer

    tok = train_wordpiece_tokenizer(synth_reports, vocab_size=2000, min_frequency=2)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2 and tok.sep_token_id == 3 and tok.mask_token_id == 4
    sentence = "Hepatomegaly and Splenomegaly (16.4 cm); no HYDRONEPHROSIS, 7% #?"
    pieces = tok.tokenize(sentence)
    for word in ("hepatomegaly", "splenomegaly", "hydronephrosis"):
        assert word in pieces  # frequent medical words are single tokens
    ids = tok(sentence)["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids  # printable ASCII never becomes [UNK]
    assert tok.decode(ids, skip_special_tokens=True).startswith("hepatomegaly and splenomegaly")
    assert any(p.startswith("##") for p in tok.tokenize("hepatosplenomegalyx"))

    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert loaded(sentence)["input_ids"] == ids and loaded.pad_token_id == 0

    tok_json = tokenizer_to_json(tok)
    assert isinstance(json.loads(tok_json), dict)
    restored = tokenizer_from_json(tok_json)
    assert restored(sentence)["input_ids"] == ids
    assert restored.pad_token == "[PAD]" and restored.mask_token_id == 4 and restored.model_max_length == 512
    batch = restored(["liver", sentence], padding=True)["input_ids"]
    assert batch[0][3:] == [0] * (len(batch[1]) - 3)
    # a bare tokenizers JSON (a tokenizer.json) is accepted too
    bare = tokenizer_from_json((tmp_path / "tok" / "tokenizer.json").read_text())
    assert bare(sentence)["input_ids"] == ids


def test_tokenizer_options_and_errors(synth_reports):
    cased = train_wordpiece_tokenizer(synth_reports[:10], vocab_size=500, lowercase=False)
    assert "Hepatomegaly" not in cased.tokenize("hepatomegaly") and len(cased) <= 500
    with pytest.raises(VolfmError, match="no non-empty report texts"):
        train_wordpiece_tokenizer([])
    with pytest.raises(VolfmError, match="no non-empty report texts"):
        train_wordpiece_tokenizer(["", None, "  "])
    with pytest.raises(VolfmError, match="could not be parsed"):
        tokenizer_from_json("{not json")
