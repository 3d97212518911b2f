"""Zero-shot findings classification (Merlin-style): positive vs negative prompts, phrasings averaged.

Protocol:

1. Prompts: per finding, ICD-10-CM codes that make a case positive, and several positive and negative
   phrasings (:func:`load_prompts`; the built-in set is ``volfm/configs/prompts/ct_findings.yaml``).
2. Truth: a case is positive for a finding when any of its codes starts with one of the finding's codes,
   both sides uppercased with dots removed (``K80.2`` covers ``K80.20`` and ``K8021``) -- :func:`finding_truth`.
3. Class embeddings: every phrasing is encoded and L2-normalised; the positive set is averaged and the
   mean re-normalised, likewise the negative set -- :func:`prompt_embeddings`.
4. Score: with ``c+ = cos(image, positive)`` and ``c- = cos(image, negative)`` (image embedding
   L2-normalised), ``p = softmax([c+, c-] / temperature)[0] = sigmoid((c+ - c-) / temperature)``, the
   probability that the finding is present -- :func:`zero_shot_scores`. The temperature changes neither
   AUROC (monotone) nor the decision at 0.5 (``p >= 0.5`` exactly when ``c+ >= c-``); it only matters
   for calibration and for thresholds other than 0.5.
5. Metrics: per-finding AUROC / AUPRC, F1 at the threshold, best-threshold F1; macro values over the
   findings with both classes present -- :func:`zero_shot_metrics`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.special import expit

from volfm import VolfmError
from volfm.configs import PROMPTS_DIR
from volfm.io.yamlfile import UniqueKeyLoader
from volfm.metrics.classification import (
    best_threshold_f1,
    binary_f1,
    multilabel_metrics,
)
from volfm.metrics.retrieval import l2_normalize
from volfm.targets.icd import normalize_code_prefix

__all__ = [
    "PROMPTS_DIR",
    "builtin_prompt_sets",
    "load_prompts",
    "validate_prompts",
    "finding_truth",
    "prompt_embeddings",
    "zero_shot_scores",
    "zero_shot_metrics",
]

_ENTRY_KEYS = ("codes", "positive", "negative")
# An ICD-10-CM code or code prefix without its dot: letter, digit, alphanumeric (the category), then up
# to 4 more characters.
_CODE_RE = re.compile(r"^[A-Z][0-9][0-9A-Z][0-9A-Z]{0,4}$")


# ----------------------------------------------------------------------------------- prompts
def builtin_prompt_sets() -> list[str]:
    """Names of the packaged prompt sets (YAML files in ``volfm/configs/prompts``)."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml"))


def _resolve_prompts_path(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.parent == Path(".") and p.suffix in ("", ".yaml", ".yml"):
        builtin = PROMPTS_DIR / f"{p.stem}.yaml"
        if builtin.is_file():
            return builtin
    raise VolfmError(f"{name_or_path}: prompt file not found; give a path to a prompts YAML or a built-in name "
                     f"({', '.join(builtin_prompt_sets()) or 'none installed'})")


def _text_list(value, src: str, name: str, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise VolfmError(f"{src}: finding {name!r}: '{key}' must be a non-empty list of phrasings, got {value!r}")
    out = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise VolfmError(f"{src}: finding {name!r}: '{key}' has {v!r}, not a non-empty text; quote phrasings "
                             "that YAML reads as something else (e.g. 'No', 'yes', numbers)")
        out.append(v.strip())
    return out


def validate_prompts(raw, source: str = "<prompts>") -> dict:
    """Check a prompt set (mapping finding -> {codes, positive, negative}) and return a clean copy.

    Each entry needs ``codes`` (ICD-10-CM codes or prefixes, at least the 3-character category),
    at least one ``positive`` and one ``negative`` phrasing; a single string is accepted for any of
    them. Unknown keys, a phrasing in both sets, and duplicate codes are errors. Order is kept.
    Raises a one-line :class:`VolfmError` naming ``source``, the entry and the problem.
    """
    if not isinstance(raw, dict) or not raw:
        raise VolfmError(f"{source}: a prompt set must be a non-empty mapping finding -> "
                         f"{{codes, positive, negative}}, got {type(raw).__name__}")
    out: dict[str, dict] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not name.strip():
            raise VolfmError(f"{source}: finding name {name!r} must be a non-empty text")
        if not isinstance(entry, dict):
            raise VolfmError(f"{source}: finding {name!r} must be a mapping with keys codes, positive, negative; "
                             f"got {type(entry).__name__}")
        unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS)
        if unknown:
            raise VolfmError(f"{source}: finding {name!r} has unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(_ENTRY_KEYS)}")
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        if missing:
            raise VolfmError(f"{source}: finding {name!r} is missing {', '.join(missing)}; "
                             "each entry needs codes, positive and negative")
        codes = entry["codes"]
        if isinstance(codes, str):
            codes = [codes]
        if not isinstance(codes, list) or not codes:
            raise VolfmError(f"{source}: finding {name!r}: 'codes' must be a non-empty list of ICD-10-CM codes, "
                             f"got {entry['codes']!r}")
        clean_codes = []
        for c in codes:
            if not isinstance(c, str) or not _CODE_RE.match(normalize_code_prefix(c)):
                raise VolfmError(f"{source}: finding {name!r}: code {c!r} is not an ICD-10-CM code or prefix "
                                 "(letter, digit, letter/digit, then up to 4 more, e.g. R16.0, K80.2, J90)")
            clean_codes.append(c.strip().upper())
        norm = [normalize_code_prefix(c) for c in clean_codes]
        dupes = sorted({c for c in clean_codes if norm.count(normalize_code_prefix(c)) > 1})
        if dupes:
            raise VolfmError(f"{source}: finding {name!r}: code(s) {', '.join(dupes)} listed twice")
        pos = _text_list(entry["positive"], source, name, "positive")
        neg = _text_list(entry["negative"], source, name, "negative")
        both = sorted({p.lower() for p in pos} & {n.lower() for n in neg})
        if both:
            raise VolfmError(f"{source}: finding {name!r}: phrasing {both[0]!r} is both positive and negative")
        out[name.strip()] = {"codes": clean_codes, "positive": pos, "negative": neg}
    return out


def load_prompts(name_or_path="ct_findings") -> dict:
    """Read and validate a prompt set: a built-in name (``'ct_findings'``) or the path of a YAML file.

    Returns ``{finding: {"codes": [...], "positive": [...], "negative": [...]}}`` in file order.
    A malformed file or entry raises a one-line :class:`VolfmError` naming the file, the entry and the problem.
    """
    path = _resolve_prompts_path(name_or_path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise VolfmError(f"{path}: not a YAML text file ({type(exc).__name__}); give the path of a prompts .yaml") \
            from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise VolfmError(f"{path}: malformed YAML{where} ({problem}); fix the file") from exc
    return validate_prompts(raw, str(path))


def _prompt_set(prompts) -> dict:
    """A validated prompt dict from a dict, a built-in name or a path."""
    if isinstance(prompts, dict):
        return validate_prompts(prompts)
    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts)
    raise VolfmError(f"prompts must be a dict from load_prompts, a built-in name or a YAML path, "
                     f"got {type(prompts).__name__}")


# ----------------------------------------------------------------------------------- truth
def finding_truth(code_lists, prompts="ct_findings") -> np.ndarray:
    """(N, F) bool: case n is positive for finding f when one of its codes starts with one of f's codes.

    code_lists: one list of ICD codes per case; a string is read as one case's codes separated by ';'
        or ',' (as in cohort.csv). Codes are compared stripped, uppercased and without dots on both
        sides, as prefixes (``K80.2`` matches ``K80.20`` and ``K8021``; ``R18`` matches ``R18.8``).
    prompts: as returned by :func:`load_prompts` (or a built-in name / path). Columns follow its order.
    """
    prompts = _prompt_set(prompts)
    if isinstance(code_lists, (str, bytes)):
        raise VolfmError("code_lists must be a list with one entry (list of codes) per case, got a single string")
    prefixes = [tuple(normalize_code_prefix(c) for c in entry["codes"]) for entry in prompts.values()]
    rows = []
    for i, codes in enumerate(code_lists):
        if codes is None:
            codes = []
        elif isinstance(codes, str):
            codes = re.split(r"[;,]", codes)
        elif not isinstance(codes, (list, tuple, set, np.ndarray)):
            raise VolfmError(f"code_lists[{i}] must be a list of ICD codes (or a ';'-separated string), "
                             f"got {type(codes).__name__}")
        norm = [normalize_code_prefix(c) for c in codes]
        norm = [c for c in norm if c]
        rows.append([any(c.startswith(p) for c in norm for p in pre) for pre in prefixes])
    return np.asarray(rows, dtype=bool).reshape(len(rows), len(prefixes))


# ----------------------------------------------------------------------------------- scores
def _embeddings(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().to("cpu").double().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolfmError(f"{what} is not a numeric array ({exc}); return a (M, D) tensor or array") from exc
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise VolfmError(f"{what} must be a 2-D array (rows, D) with at least one row, got shape {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise VolfmError(f"{what} has NaN/inf values (first in row {int(np.argwhere(~np.isfinite(a))[0, 0])}); "
                         "check the encoder outputs")
    return a


def _encode(encode_text: Callable, texts: list[str], batch_size: int) -> np.ndarray:
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            emb = _embeddings(encode_text(chunk), f"encode_text output for {len(chunk)} phrasing(s)")
            if emb.shape[0] != len(chunk):
                raise VolfmError(f"encode_text returned {emb.shape[0]} row(s) for {len(chunk)} phrasing(s); "
                                 "it must return one embedding per text")
            parts.append(emb)
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise VolfmError(f"encode_text returned embeddings of different sizes {sorted(dims)} across batches")
    return np.concatenate(parts, axis=0)


def prompt_embeddings(encode_text: Callable[[list[str]], object], prompts="ct_findings",
                      batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class embeddings (positive (F, D), negative (F, D), finding names), float64, unit rows.

    Each phrasing is encoded (``encode_text(list[str]) -> (M, D)`` tensor or array; called in batches of
    ``batch_size`` under ``torch.no_grad``; a phrasing shared by several findings is encoded once) and
    L2-normalised; the phrasings of a set are averaged and the mean re-normalised.
    """
    prompts = _prompt_set(prompts)
    if int(batch_size) < 1:
        raise VolfmError(f"batch_size must be >= 1, got {batch_size!r}")
    texts = list(dict.fromkeys(t for e in prompts.values() for t in (*e["positive"], *e["negative"])))
    emb = l2_normalize(_encode(encode_text, texts, int(batch_size)), "text embedding")
    index = {t: i for i, t in enumerate(texts)}
    names = list(prompts)
    sets = {"positive": [], "negative": []}
    for name, entry in prompts.items():
        for key in sets:
            mean = emb[[index[t] for t in entry[key]]].mean(axis=0)
            norm = float(np.linalg.norm(mean))
            if norm < 1e-12:
                raise VolfmError(f"finding {name!r}: the {key} phrasings' embeddings cancel out (mean of unit "
                                 "vectors is ~0); use phrasings that say the same thing")
            sets[key].append(mean / norm)
    return np.stack(sets["positive"]), np.stack(sets["negative"]), names


def zero_shot_scores(image_emb, encode_text: Callable[[list[str]], object], prompts="ct_findings",
                     temperature: float = 1.0, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Zero-shot probability that each finding is present: (scores (N, F) float64 in (0, 1), finding names).

    image_emb: (N, D) image embeddings in the joint space (tensor or array), L2-normalised here.
    encode_text: maps a list of texts to their (M, D) joint-space embeddings.
    prompts: from :func:`load_prompts` (or a built-in name / path).
    temperature: ``p = softmax([c+, c-] / temperature)[0] = sigmoid((c+ - c-) / temperature)`` with c+/c-
        the cosine similarities to the averaged positive/negative class embeddings (see
        :func:`prompt_embeddings`). A CLIP-style model's learned logit scale s corresponds to 1 / s.
    """
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        temperature = math.nan
    if not (math.isfinite(temperature) and temperature > 0):
        raise VolfmError(f"temperature must be a positive number, got {temperature!r}")
    img = l2_normalize(_embeddings(image_emb, "image_emb"), "image_emb")
    pos, neg, names = prompt_embeddings(encode_text, prompts, batch_size=batch_size)
    if pos.shape[1] != img.shape[1]:
        raise VolfmError(f"image_emb has {img.shape[1]} dimensions but encode_text returns {pos.shape[1]}; "
                         "both must be in the same joint space")
    margin = (img @ pos.T - img @ neg.T) / temperature
    return expit(margin), names


# ----------------------------------------------------------------------------------- metrics
def zero_shot_metrics(scores, truth, names: Sequence[str], threshold: float = 0.5) -> dict:
    """Per-finding and macro metrics of zero-shot scores (JSON-serialisable).

    scores: (N, F) probabilities from :func:`zero_shot_scores`; truth: (N, F) bool from :func:`finding_truth`;
    names: the F finding names. A case is called positive when ``score >= threshold``.

    Returns::

        {"per_finding": {name: {"auroc", "auprc", "f1", "best_f1", "best_threshold", "positives",
                                "negatives", "prevalence", "scored"}},
         "macro_auroc", "macro_auprc", "macro_f1", "macro_best_f1",   # over scored findings only
         "threshold", "n_cases", "n_findings", "n_findings_scored", "skipped_findings", "note"}

    A finding is *scored* when both classes are present; the others keep their counts, NaN metrics,
    and are left out of the macro averages. ``best_f1`` / ``best_threshold`` pick the F1-optimal
    threshold on these same cases, so they are optimistic (an upper bound); ``f1`` uses ``threshold``.
    """
    names = [str(n) for n in names]
    base = multilabel_metrics(truth, scores, class_names=names)
    s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
    y = np.asarray(truth.detach().cpu().numpy() if hasattr(truth, "detach") else truth).astype(bool)
    s, y = s.reshape(len(s), -1), y.reshape(len(y), -1)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise VolfmError(f"threshold must be a finite number, got {threshold!r}")
    per: dict[str, dict] = {}
    f1s, best_f1s = [], []
    for j, name in enumerate(names):
        c = base["per_class"][name]
        if c["scored"]:
            f1 = binary_f1(y[:, j], s[:, j] >= threshold)
            best = best_threshold_f1(y[:, j], s[:, j])
            f1s.append(f1)
            best_f1s.append(best["f1"])
        else:
            f1, best = math.nan, {"f1": math.nan, "threshold": math.nan}
        per[name] = {"auroc": c["auroc"], "auprc": c["auprc"], "f1": f1, "best_f1": best["f1"],
                     "best_threshold": best["threshold"], "positives": c["positives"],
                     "negatives": c["negatives"], "prevalence": c["prevalence"], "scored": c["scored"]}
    return {
        "per_finding": per,
        "macro_auroc": base["macro_auroc"],
        "macro_auprc": base["macro_auprc"],
        "macro_f1": float(np.mean(f1s)) if f1s else math.nan,
        "macro_best_f1": float(np.mean(best_f1s)) if best_f1s else math.nan,
        "threshold": threshold,
        "n_cases": base["n_cases"],
        "n_findings": base["n_classes"],
        "n_findings_scored": base["n_classes_scored"],
        "skipped_findings": base["skipped_classes"],
        "note": base["note"].replace("class(es)", "finding(s)").replace("no class", "no finding"),
    }
