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

Tokenizers (WordPiece trained on the cohort's reports, JSON round trip) live with the text encoder in
:mod:`volfm.models.text`.
"""
from __future__ import annotations

import re

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
