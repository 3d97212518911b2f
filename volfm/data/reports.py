"""Radiology report text: organ-system sections (Merlin), text views for contrastive learning, tokenizers.

Section keys (snake_case) returned by :func:`split_report_sections`:

- the Merlin organ systems, :data:`MERLIN_SECTIONS`: ``lower_thorax``, ``liver_and_biliary``,
  ``gallbladder``, ``spleen``, ``pancreas``, ``adrenal_glands``, ``kidneys_and_ureters``,
  ``gastrointestinal_tract``, ``peritoneum``, ``pelvic_organs``, ``vasculature``, ``lymph_nodes``,
  ``musculoskeletal``;
- top-level parts: ``technique``, ``history`` (indication / clinical history), ``comparison``,
  ``findings`` (free text under FINDINGS that is in no organ section), ``impression``;
- ``other``: text before any header and sections whose header is not recognised (kept with
  their header, e.g. ``"ABDOMINAL WALL: Small hernia."``).

Real-world headers are mapped onto these keys by :data:`SECTION_SYNONYMS` ("HEPATOBILIARY",
"BILIARY" -> liver_and_biliary, "URINARY" -> kidneys_and_ureters, "BOWEL" -> gastrointestinal_tract,
"BONES" -> musculoskeletal, "LUNG BASES" -> lower_thorax, ...). :data:`SECTION_TITLES` gives each
key's readable name ("liver and biliary"), used when sections are written back as text.

Tokenizers: :func:`train_wordpiece_tokenizer` trains a BERT-style WordPiece tokenizer on the
cohort's reports (offline); :func:`tokenizer_to_json` / :func:`tokenizer_from_json` carry any
fast tokenizer as a pure-JSON string (e.g. inside a Lightning checkpoint, no pickle).
"""
from __future__ import annotations

import json
import re
import string
from typing import Iterable

import numpy as np

from volfm import VolfmError

MERLIN_SECTIONS: tuple[str, ...] = (
    "lower_thorax", "liver_and_biliary", "gallbladder", "spleen", "pancreas", "adrenal_glands",
    "kidneys_and_ureters", "gastrointestinal_tract", "peritoneum", "pelvic_organs", "vasculature",
    "lymph_nodes", "musculoskeletal",
)
TOP_LEVEL_SECTIONS: tuple[str, ...] = ("technique", "history", "comparison", "findings", "impression")
# Order in which sections are written back as text.
SECTION_ORDER: tuple[str, ...] = ("history", "comparison", "technique", "findings", *MERLIN_SECTIONS, "other",
                                  "impression")
SECTION_TITLES: dict[str, str] = {k: k.replace("_", " ") for k in SECTION_ORDER}
# Parts that do not describe the image (dropped by the "findings_impression" view).
NON_FINDING_SECTIONS = frozenset({"technique", "history", "comparison"})
REPORT_VIEW_MODES: tuple[str, ...] = ("whole", "findings_impression", "random_section", "sections")

_SYN: dict[str, tuple[str, ...]] = {
    "technique": ("TECHNIQUE", "TECHNIQUES", "PROCEDURE", "PROTOCOL", "EXAM", "EXAMINATION", "EXAM TYPE",
                  "STUDY", "CT TECHNIQUE", "CONTRAST", "DOSE"),
    "history": ("HISTORY", "CLINICAL HISTORY", "INDICATION", "INDICATIONS", "CLINICAL INDICATION",
                "REASON FOR EXAM", "REASON FOR EXAMINATION", "REASON FOR STUDY", "CLINICAL INFORMATION",
                "CLINICAL DATA", "CLINICAL NOTES"),
    "comparison": ("COMPARISON", "COMPARISONS", "PRIOR", "PRIOR STUDIES", "PRIORS"),
    "findings": ("FINDINGS", "FINDING", "REPORT", "DESCRIPTION", "FINDINGS AND DISCUSSION"),
    "impression": ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY", "OPINION",
                   "DIAGNOSIS", "ASSESSMENT"),
    "lower_thorax": ("LOWER THORAX", "LOWER CHEST", "LUNG BASES", "LUNG BASE", "BASES", "LUNGS", "LUNG",
                     "THORAX", "CHEST", "HEART", "PLEURA", "LOWER THORAX AND HEART", "HEART AND PERICARDIUM"),
    "liver_and_biliary": ("LIVER AND BILIARY", "LIVER", "HEPATOBILIARY", "BILIARY", "BILIARY TREE",
                          "BILE DUCTS", "HEPATIC", "LIVER AND BILIARY TREE", "LIVER AND BILE DUCTS"),
    "gallbladder": ("GALLBLADDER", "GALL BLADDER"),
    "spleen": ("SPLEEN", "SPLENIC"),
    "pancreas": ("PANCREAS", "PANCREATIC"),
    "adrenal_glands": ("ADRENAL GLANDS", "ADRENALS", "ADRENAL", "ADRENAL GLAND"),
    "kidneys_and_ureters": ("KIDNEYS AND URETERS", "KIDNEYS", "KIDNEY", "RENAL", "URETERS", "URINARY",
                            "URINARY TRACT", "GENITOURINARY", "GU", "KIDNEYS URETERS AND BLADDER",
                            "KIDNEYS AND BLADDER"),
    "gastrointestinal_tract": ("GASTROINTESTINAL TRACT", "GASTROINTESTINAL", "GI", "GI TRACT", "BOWEL",
                               "BOWELS", "STOMACH", "STOMACH AND BOWEL", "SMALL BOWEL", "LARGE BOWEL", "COLON",
                               "APPENDIX", "BOWEL AND MESENTERY", "ESOPHAGUS"),
    "peritoneum": ("PERITONEUM", "PERITONEAL CAVITY", "PERITONEUM AND RETROPERITONEUM", "RETROPERITONEUM",
                   "PERITONEAL", "MESENTERY", "ABDOMINAL WALL", "ASCITES"),
    "pelvic_organs": ("PELVIC ORGANS", "PELVIS", "PELVIC", "REPRODUCTIVE ORGANS", "REPRODUCTIVE",
                      "BLADDER", "URINARY BLADDER", "PROSTATE", "UTERUS", "UTERUS AND ADNEXA", "ADNEXA",
                      "OVARIES", "BLADDER AND REPRODUCTIVE ORGANS", "PELVIC STRUCTURES"),
    "vasculature": ("VASCULATURE", "VASCULAR", "VESSELS", "AORTA", "ABDOMINAL AORTA", "VASCULAR STRUCTURES",
                    "AORTA AND BRANCHES"),
    "lymph_nodes": ("LYMPH NODES", "LYMPH NODE", "LYMPHATICS", "LYMPHADENOPATHY", "NODES", "LYMPHATIC"),
    "musculoskeletal": ("MUSCULOSKELETAL", "BONES", "BONE", "OSSEOUS STRUCTURES", "OSSEOUS", "SKELETON",
                        "MSK", "BONES AND SOFT TISSUES", "SOFT TISSUES", "SPINE", "OSSEOUS AND SOFT TISSUES"),
}
SECTION_SYNONYMS: dict[str, str] = {syn: key for key, syns in _SYN.items() for syn in syns}
# Single words that identify an organ section inside an unlisted upper-case header ("LIVER PARENCHYMA").
_KEYWORDS: dict[str, str] = {
    "LIVER": "liver_and_biliary", "HEPATIC": "liver_and_biliary", "BILIARY": "liver_and_biliary",
    "GALLBLADDER": "gallbladder", "SPLEEN": "spleen", "PANCREAS": "pancreas", "ADRENAL": "adrenal_glands",
    "ADRENALS": "adrenal_glands", "KIDNEY": "kidneys_and_ureters", "KIDNEYS": "kidneys_and_ureters",
    "RENAL": "kidneys_and_ureters", "URETERS": "kidneys_and_ureters", "BOWEL": "gastrointestinal_tract",
    "STOMACH": "gastrointestinal_tract", "COLON": "gastrointestinal_tract", "PERITONEUM": "peritoneum",
    "PERITONEAL": "peritoneum", "PELVIS": "pelvic_organs", "PELVIC": "pelvic_organs",
    "AORTA": "vasculature", "VASCULAR": "vasculature", "LYMPH": "lymph_nodes", "NODES": "lymph_nodes",
    "BONES": "musculoskeletal", "OSSEOUS": "musculoskeletal", "MUSCULOSKELETAL": "musculoskeletal",
    "LUNG": "lower_thorax", "LUNGS": "lower_thorax", "THORAX": "lower_thorax",
}

# "HEADER: text" at line start; the header is a short phrase of letters (digits allowed after the first).
_HEADER_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9 /&,()'\-]{0,60}?)\s*:\s*(.*)$")
# A header in the middle of a line, after the end of a sentence: upper-case phrase or a known top-level one.
_TOP = sorted({s for k in TOP_LEVEL_SECTIONS for s in _SYN[k]}, key=len, reverse=True)
_INLINE_RE = re.compile(
    r"(?<=[.;!?])\s+(?=(?:[A-Z][A-Z /&,\-]{2,60}|(?i:" + "|".join(re.escape(s) for s in _TOP) + r"))\s*:)")


def _norm_header(header: str) -> str:
    h = header.upper().replace("&", " AND ")
    return " ".join(re.sub(r"[^A-Z0-9]+", " ", h).split())


def canonical_section(header: str, keyword_fallback: bool = True) -> str | None:
    """Section key for a report header (any case), or None if it is not recognised.

    Tries the whole header, then its parts split at "/", ",", "&" and "AND" (first recognised part
    wins: "LIVER/GALLBLADDER" -> liver_and_biliary), then (``keyword_fallback``) organ words in it.
    """
    norm = _norm_header(header)
    if not norm:
        return None
    if norm in SECTION_SYNONYMS:
        return SECTION_SYNONYMS[norm]
    parts = [p.strip() for p in re.split(r"\bAND\b|/|,", header.upper().replace("&", " AND "))]
    for part in parts:
        key = SECTION_SYNONYMS.get(_norm_header(part))
        if key:
            return key
    if keyword_fallback:
        for word in norm.split():
            if word in _KEYWORDS:
                return _KEYWORDS[word]
    return None


def _is_upper_phrase(header: str) -> bool:
    letters = [c for c in header if c.isalpha()]
    return len(letters) >= 2 and header == header.upper() and len(header.split()) <= 6


def _classify_line(line: str) -> tuple[str, str | None, str] | None:
    """(header, key or None for an unknown upper-case header, rest) if ``line`` starts with a header."""
    m = _HEADER_RE.match(line)
    if m:
        header, rest = m.group(1).strip(), m.group(2)
        key = canonical_section(header, keyword_fallback=False)
        if key is None and _is_upper_phrase(header):
            key = canonical_section(header)  # organ words in an upper-case header; None = unknown header
            return header, key, rest
        if key is not None:
            return header, key, rest
        return None
    # A header alone on its line without a colon ("LIVER", "Impression") must be a known one.
    stripped = line.strip()
    if stripped and len(stripped) <= 60 and not stripped.endswith((".", ";", ",")):
        key = canonical_section(stripped, keyword_fallback=False)
        if key is not None and (_is_upper_phrase(stripped) or _norm_header(stripped) in SECTION_SYNONYMS):
            return stripped, key, ""
    return None


def _clean(text: str) -> str:
    return " ".join(text.split())


def split_report_sections(text: str | None) -> dict[str, str]:
    """Split a radiology report into sections keyed as in the module docstring.

    Headers are "HEADER: text" at the start of a line (any case if the header is a known one;
    unknown headers must be upper case and go to ``other`` with their header), a known header alone
    on its line (text on the following lines), or an upper-case / top-level header right after the
    end of a sentence in the middle of a line. Repeated sections are joined; whitespace inside each
    section is normalised; empty sections are left out. Empty or None text gives ``{}``.
    """
    if text is None:
        return {}
    text = str(text).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        return {}
    text = _INLINE_RE.sub("\n", text)
    parts: dict[str, list[str]] = {}
    current = "other"

    def add(key: str, chunk: str) -> None:
        chunk = _clean(chunk)
        if chunk:
            parts.setdefault(key, []).append(chunk)

    for line in text.split("\n"):
        rest = line
        while True:  # a line may hold a top-level header followed by an organ header ("FINDINGS: LIVER: ...")
            hit = _classify_line(rest)
            if hit is None:
                break
            header, key, rest = hit
            if key is None:
                current = "other"
                rest = f"{header}: {rest}" if rest.strip() else f"{header}:"
                break
            current = key
            if not rest.strip():
                break
        add(current, rest)
    return {k: " ".join(parts[k]) for k in SECTION_ORDER if k in parts}


def _sections_of(text, sections) -> dict[str, str]:
    return split_report_sections(text) if sections is None else sections


def report_sections_list(text: str | None, sections: dict[str, str] | None = None,
                         include_non_findings: bool = False) -> list[str]:
    """Sections as ``"title: text"`` strings in report order (technique/history/comparison left out
    unless ``include_non_findings``). ``sections``: an already computed :func:`split_report_sections`."""
    secs = _sections_of(text, sections)
    return [f"{SECTION_TITLES[k]}: {v}" for k, v in secs.items()
            if v and (include_non_findings or k not in NON_FINDING_SECTIONS)]


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def report_views(text: str | None, mode: str = "whole", rng: np.random.Generator | int | None = None,
                 sections: dict[str, str] | None = None) -> str | list[str]:
    """One text view of a report for contrastive training.

    mode:
      - ``"whole"``: the whole report, whitespace normalised (newlines become spaces);
      - ``"findings_impression"``: all sections but technique/history/comparison, as
        ``"title: text"`` joined by spaces;
      - ``"random_section"``: one non-empty Merlin organ section drawn with ``rng`` (a numpy
        Generator or a seed; None = fresh entropy), as ``"liver and biliary: ..."``; a report without
        organ sections gives its ``"findings_impression"`` view;
      - ``"sections"``: the list of :func:`report_sections_list` (a ``list[str]``).
    ``sections``: an already computed :func:`split_report_sections` of ``text`` (saves re-parsing).
    Empty or None text gives ``""`` (``[]`` for ``"sections"``).
    """
    if mode not in REPORT_VIEW_MODES:
        raise VolfmError(f"unknown report view mode {mode!r}; choose one of {', '.join(REPORT_VIEW_MODES)}")
    if mode == "whole":
        return _clean(text) if text else ""
    secs = _sections_of(text, sections)
    if mode == "sections":
        return report_sections_list(text, secs)
    if mode == "random_section":
        organ = [k for k in MERLIN_SECTIONS if secs.get(k)]
        if organ:
            key = organ[int(_as_rng(rng).integers(len(organ)))]
            return f"{SECTION_TITLES[key]}: {secs[key]}"
    return " ".join(report_sections_list(text, secs))


# ------------------------------------------------------------------------------------------- tokenizers
SPECIAL_TOKENS: dict[str, str] = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                                  "sep_token": "[SEP]", "mask_token": "[MASK]"}
_JSON_FORMAT = "volfm.tokenizer/1"


def _wrap(backend, model_max_length: int | None = None, **special):
    """A transformers fast tokenizer around a ``tokenizers.Tokenizer`` (copied)."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: v for k, v in special.items() if v is not None}
    if model_max_length is not None:
        kwargs["model_max_length"] = int(model_max_length)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def train_wordpiece_tokenizer(texts: Iterable[str | None], vocab_size: int = 8000, min_frequency: int = 2,
                              lowercase: bool = True, model_max_length: int = 512):
    """Train a BERT-style WordPiece tokenizer on report texts (offline) -> ``PreTrainedTokenizerFast``.

    BertNormalizer (``lowercase``), BertPreTokenizer, WordPiece with "##" continuation, special tokens
    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, "[CLS] $A [SEP]" post-processing. Printable ASCII
    characters are always in the alphabet, so digits and punctuation never become [UNK].
    ``save_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` round-trip.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece

    corpus = [str(t) for t in (texts or []) if t is not None and str(t).strip()]
    if not corpus:
        raise VolfmError("cannot train a tokenizer: no non-empty report texts were given; "
                         "check the cohort table's 'report' column (or pass a pretrained model folder)")
    specials = list(SPECIAL_TOKENS.values())
    if int(vocab_size) <= len(specials):
        raise VolfmError(f"vocab_size must be larger than the {len(specials)} special tokens, got {vocab_size}")
    tok = Tokenizer(WordPiece(unk_token=SPECIAL_TOKENS["unk_token"], continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    alphabet = sorted(set((string.ascii_lowercase if lowercase else string.ascii_letters) + string.digits
                          + string.punctuation))
    trainer = trainers.WordPieceTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                        special_tokens=specials, initial_alphabet=alphabet,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return _wrap(tok, model_max_length=model_max_length, **SPECIAL_TOKENS)


def tokenizer_to_json(tokenizer) -> str:
    """A fast tokenizer as one JSON string: the ``tokenizers`` backend, its special tokens and
    ``model_max_length`` / padding and truncation sides. Inverse: :func:`tokenizer_from_json`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VolfmError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
                         "only fast tokenizers can be written as JSON")
    special = {k: str(getattr(tokenizer, k)) for k in ("pad_token", "unk_token", "cls_token", "sep_token",
                                                          "mask_token", "bos_token", "eos_token")
               if getattr(tokenizer, k, None) is not None}
    max_len = getattr(tokenizer, "model_max_length", None)
    return json.dumps({
        "format": _JSON_FORMAT,
        "tokenizer": json.loads(backend.to_str()),
        "special_tokens": special,
        "model_max_length": int(max_len) if max_len is not None and max_len < 10 ** 12 else None,
        "padding_side": getattr(tokenizer, "padding_side", "right"),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
    })


def tokenizer_from_json(s: str):
    """Rebuild a ``PreTrainedTokenizerFast`` from :func:`tokenizer_to_json` (also accepts a bare
    ``tokenizers`` JSON, i.e. the content of a tokenizer.json)."""
    from tokenizers import Tokenizer

    try:
        obj = json.loads(s)
    except (TypeError, json.JSONDecodeError) as e:
        raise VolfmError(f"tokenizer JSON could not be parsed: {e}") from e
    if not isinstance(obj, dict):
        raise VolfmError("tokenizer JSON must be an object")
    if obj.get("format") != _JSON_FORMAT:
        obj = {"tokenizer": obj, "special_tokens": {}}
    backend = Tokenizer.from_str(json.dumps(obj["tokenizer"]))
    tok = _wrap(backend, obj.get("model_max_length"), **obj.get("special_tokens", {}))
    tok.padding_side = obj.get("padding_side", "right")
    tok.truncation_side = obj.get("truncation_side", "right")
    return tok
