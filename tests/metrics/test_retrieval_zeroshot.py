"""Retrieval (R@k, ranks, tie rule) and zero-shot findings classification (prompts, truth, scores, metrics)."""
import math
import re

import numpy as np
import pytest
import torch
from scipy.special import expit

from volfm import VolfmError
from volfm.metrics.retrieval import chance_recall, retrieval_metrics, retrieval_ranks
from volfm.metrics.zeroshot import (
    PROMPTS_DIR,
    finding_truth,
    load_prompts,
    prompt_embeddings,
    validate_prompts,
    zero_shot_metrics,
    zero_shot_scores,
)
from volfm.synth.ct import FINDINGS, make_ct_case
from volfm.targets.icd import normalize_code_prefix


# ----------------------------------------------------------------------------------- retrieval
def test_identity_embeddings_are_perfect():
    e = np.eye(4)
    m = retrieval_metrics(e, e)
    assert m["n"] == 4 and m["ks"] == [1, 5, 10]
    for d in ("image_to_report", "report_to_image"):
        assert m[d]["R@1"] == 1.0 and m[d]["R@5"] == 1.0 and m[d]["R@10"] == 1.0
        assert m[d]["median_rank"] == 1.0 and m[d]["mean_rank"] == 1.0
    assert m["chance"] == {"R@1": 0.25, "R@5": 1.0, "R@10": 1.0}
    assert m["k_exceeds_n"] == [5, 10]


def test_hand_computed_ranks_both_directions():
    # text = identity, so sim[i, j] = image[i, j]; image rows are unit vectors with distinct entries.
    img = np.array([[0.8, 0.36, 0.48],
                    [0.48, 0.6, 0.64],
                    [0.64, 0.48, 0.6]])
    i2t, t2i = retrieval_ranks(img, np.eye(3))
    # rows: 0.8 is the row max -> 1; 0.6 < 0.64 -> 2; 0.6 < 0.64 -> 2
    assert i2t.tolist() == [1, 2, 2]
    # columns [.8 .48 .64] -> 1; [.36 .6 .48] -> 1; [.48 .64 .6] -> 2
    assert t2i.tolist() == [1, 1, 2]
    m = retrieval_metrics(img, np.eye(3), ks=(1, 2))
    assert m["image_to_report"] == pytest.approx({"R@1": 1 / 3, "R@2": 1.0, "median_rank": 2.0, "mean_rank": 5 / 3})
    assert m["report_to_image"] == pytest.approx({"R@1": 2 / 3, "R@2": 1.0, "median_rank": 1.0, "mean_rank": 4 / 3})
    assert m["k_exceeds_n"] == []


def test_known_permutation_of_random_embeddings_and_scale_invariance():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((6, 8))
    perm = np.array([0, 2, 1, 3, 5, 4])
    txt = img[perm]                     # report i is image perm[i]'s copy: fixed points 0 and 3 are matched
    i2t, t2i = retrieval_ranks(img, txt)
    assert i2t[0] == 1 and i2t[3] == 1 and t2i[0] == 1 and t2i[3] == 1
    # the others: brute force rank by sorting (no ties in random data)
    sim = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    for i in range(6):
        assert i2t[i] == 1 + int(np.sum(sim[i] > sim[i, i]))
        assert t2i[i] == 1 + int(np.sum(sim[:, i] > sim[i, i]))
    assert all(i2t[i] > 1 for i in (1, 2, 4, 5))
    # L2 normalisation inside: per-row positive scaling changes nothing; torch input gives the same result
    scaled = retrieval_metrics(torch.tensor(img * rng.uniform(0.1, 10, (6, 1)), dtype=torch.float32),
                               torch.tensor(txt * 7.0), return_ranks=True)
    assert scaled["ranks"] == {"image_to_report": i2t.tolist(), "report_to_image": t2i.tolist()}


def test_ties_are_counted_pessimistically():
    # permuted one-hot reports: an unmatched image has similarity 0 to its own report and to N-2 others,
    # so all N candidates score >= the true one -> rank N.
    e = np.eye(4)
    i2t, t2i = retrieval_ranks(e, e[[1, 0, 2, 3]])
    assert i2t.tolist() == [4, 4, 1, 1] and t2i.tolist() == [4, 4, 1, 1]
    # collapsed model: every embedding equal -> every rank N, R@1 = 0 (not 1)
    same = np.ones((5, 3))
    m = retrieval_metrics(same, same, ks=(1, 4, 5))
    for d in ("image_to_report", "report_to_image"):
        assert m[d]["R@1"] == 0.0 and m[d]["R@4"] == 0.0 and m[d]["R@5"] == 1.0
        assert m[d]["median_rank"] == 5.0 and m[d]["mean_rank"] == 5.0
    # tie tolerance: a distractor 1e-9 below the true similarity ties (rank 2); 1e-3 below does not
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    for gap, expected in ((1e-9, 2), (1e-3, 1)):
        c = 1.0 - gap
        txt = np.array([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])  # cos(img0, txt1) = 1 - gap
        assert retrieval_ranks(img, txt)[0][0] == expected
    assert retrieval_ranks(img, np.array([[1.0, 0.0], [1 - 1e-9, math.sqrt(1 - (1 - 1e-9) ** 2)]]),
                           tie_tol=0.0)[0][0] == 1


def test_k_larger_than_n_is_flagged_and_chance():
    m = retrieval_metrics(np.eye(3), np.eye(3)[[1, 2, 0]], ks=(1, 3, 5))
    assert m["image_to_report"]["R@5"] == 1.0 and m["report_to_image"]["R@5"] == 1.0
    assert m["k_exceeds_n"] == [5]
    assert m["chance"] == pytest.approx({"R@1": 1 / 3, "R@3": 1.0, "R@5": 1.0})
    assert chance_recall(100, 5) == 0.05 and chance_recall(10, 1) == 0.1 and chance_recall(3, 10) == 1.0
    with pytest.raises(VolfmError):
        chance_recall(0, 1)


def test_retrieval_bad_inputs():
    with pytest.raises(VolfmError, match="same shape"):
        retrieval_metrics(np.eye(3), np.eye(4))
    with pytest.raises(VolfmError, match="all zeros"):
        retrieval_metrics(np.array([[1.0, 0.0], [0.0, 0.0]]), np.eye(2))
    with pytest.raises(VolfmError, match="2-D"):
        retrieval_metrics(np.ones(3), np.ones(3))
    with pytest.raises(VolfmError, match="non-finite"):
        retrieval_metrics(np.array([[1.0, np.nan], [0.0, 1.0]]), np.eye(2))
    with pytest.raises(VolfmError, match="positive integers"):
        retrieval_metrics(np.eye(2), np.eye(2), ks=(0, 1))


# ----------------------------------------------------------------------------------- prompts / truth
def _report_sentences(n_seeds=25):
    out = set()
    for seed in range(n_seeds):
        for present in (list(FINDINGS), []):
            report = make_ct_case(seed, shape=(16, 16, 16), findings=present)["report"]
            for line in report.splitlines():
                line = re.sub(r"^[A-Z ]+:\s*", "", line)
                for s in re.split(r"(?<=\.)\s+", line):
                    s = re.sub(r"^\d+\.\s*", "", s).strip().lower()
                    if s:
                        out.add(s)
    return out


def test_builtin_prompts_cover_findings_with_valid_codes_and_own_wording():
    import simple_icd_10_cm as icd

    prompts = load_prompts()
    assert list(prompts) == list(FINDINGS)
    assert load_prompts(PROMPTS_DIR / "ct_findings.yaml") == prompts == load_prompts("ct_findings.yaml")
    for name, entry in prompts.items():
        assert entry["codes"] and all(icd.is_valid_item(c) for c in entry["codes"]), name
        assert 3 <= len(entry["positive"]) <= 5 and 3 <= len(entry["negative"]) <= 5, name
    # the synthetic cohort's code for each finding makes exactly that finding positive
    truth = finding_truth([[spec.code] for spec in FINDINGS.values()], prompts)
    assert np.array_equal(truth, np.eye(len(FINDINGS), dtype=bool))
    # generic clinical phrasings, not the synthetic generator's sentences
    sentences = _report_sentences()
    assert "no ascites." in sentences and "splenomegaly." in sentences  # the sentence extraction works
    copied = [t for e in prompts.values() for t in e["positive"] + e["negative"] if t.lower() in sentences]
    assert copied == []


def test_finding_truth_prefixes_and_dots():
    prompts = load_prompts()
    names = list(prompts)
    cases = [
        ["K8021"],                 # undotted child of the K80.2 prefix -> gallstone
        ["k80.20", "I10"],         # lower case, dotted -> gallstone
        ["K80.4"],                 # bile duct calculus: not a gallbladder stone
        ["R18.0", "I71.43"],       # R18 prefix -> ascites; I71.4 prefix -> aneurysm
        ["I71.2"],                 # thoracic aneurysm: no
        ["R16"],                   # shorter than R16.0 / R16.1: neither
        " J90 ;E11.9",             # ';'-separated string as in cohort.csv, with spaces
        [],
    ]
    t = finding_truth(cases, prompts)
    assert t.shape == (8, 11) and t.dtype == bool
    pos = [sorted(names[j] for j in np.flatnonzero(row)) for row in t]
    assert pos == [["gallstone"], ["gallstone"], [], ["aortic_aneurysm", "ascites"], [], [], ["pleural_effusion"], []]
    # dotted or undotted prefixes in the prompt set behave the same
    custom = {"x": {"codes": ["A011"], "positive": ["p"], "negative": ["n"]},
              "y": {"codes": ["b02.3"], "positive": ["p"], "negative": ["n"]}}
    t = finding_truth([["A01.12"], ["B0234"], ["A0"], ["B02"]], custom)
    assert t.tolist() == [[True, False], [False, True], [False, False], [False, False]]
    assert normalize_code_prefix(" k80.20 ") == "K8020"
    assert finding_truth([], custom).shape == (0, 2)


def _write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD_ENTRY = "  codes: [R16.0]\n  positive: [Enlarged liver is seen.]\n  negative: [Liver size is normal.]\n"


@pytest.mark.parametrize("text, entry, what", [
    ("liver:\n  codes: [R16.0\n", None, "malformed YAML at line"),
    ("- a\n- b\n", None, "non-empty mapping"),
    ("liver:\n  codes: [R16.0]\n  positive: [Big liver.]\n", "'liver'", "missing negative"),
    ("liver:\n  codes: [R16.0]\n  positive: []\n  negative: [Normal.]\n", "'liver'", "'positive' must be a non-empty"),
    ("liver:\n  codes: [XYZ]\n  positive: [Big.]\n  negative: [Normal.]\n", "'liver'", "not an ICD-10-CM code"),
    ("liver:\n  codes: []\n  positive: [Big.]\n  negative: [Normal.]\n", "'liver'", "'codes' must be a non-empty"),
    ("liver:\n" + GOOD_ENTRY + "  postive: [x]\n", "'liver'", "unknown key"),
    ("liver:\n" + GOOD_ENTRY + "liver:\n" + GOOD_ENTRY, None, "duplicate key 'liver'"),
    ("liver:\n  codes: [R16.0]\n  positive: [Big.]\n  negative: [No]\n", "'liver'", "False"),
    ("liver:\n  codes: [R16.0]\n  positive: [Big.]\n  negative: [big.]\n", "'liver'", "both positive and negative"),
    ("liver: [R16.0]\n", "'liver'", "must be a mapping"),
])
def test_load_prompts_errors_name_file_and_entry(tmp_path, text, entry, what):
    p = _write(tmp_path, text)
    with pytest.raises(VolfmError) as exc:
        load_prompts(p)
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg and what in msg
    if entry:
        assert f"finding {entry}" in msg


def test_load_prompts_missing_file_lists_builtins(tmp_path):
    with pytest.raises(VolfmError, match="not found.*ct_findings"):
        load_prompts("no_such_set")
    with pytest.raises(VolfmError, match="not found"):
        load_prompts(tmp_path / "missing.yaml")
    ok = load_prompts(_write(tmp_path, "liver:\n" + GOOD_ENTRY))
    assert ok == {"liver": {"codes": ["R16.0"], "positive": ["Enlarged liver is seen."],
                            "negative": ["Liver size is normal."]}}


# ----------------------------------------------------------------------------------- zero-shot
D = 6
E = np.eye(D)
PHRASES = {
    # finding a: positive phrasings symmetric about e0 (different lengths: normalised before averaging)
    "a present one": [2.0, 0.5, 0, 0, 0, 0], "a present two": [4.0, -1.0, 0, 0, 0, 0],
    "a absent one": E[1] * 3, "a absent two": E[1], "a absent three": E[1] * 0.5,
    "b present": E[2], "b absent": E[3] * 2,
    "c present": E[4], "c absent": E[5],
}
PROMPTS = {
    "a": {"codes": ["A01.1"], "positive": ["a present one", "a present two"],
          "negative": ["a absent one", "a absent two", "a absent three"]},
    "b": {"codes": ["B02"], "positive": ["b present"], "negative": ["b absent"]},
    "c": {"codes": ["C03.45"], "positive": ["c present"], "negative": ["c absent"]},
}


class FakeEncoder:
    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.tensor(np.array([PHRASES[t] for t in texts]), dtype=torch.float32)


def test_phrasings_are_normalised_then_averaged_then_renormalised():
    enc = FakeEncoder()
    prompts = {"f": {"codes": ["R16.0"], "positive": ["p1", "p2"], "negative": ["n1"]}}
    PHRASES.update({"p1": [1.0, 1.0, 0, 0, 0, 0], "p2": [3.0, 0, 0, 0, 0, 0], "n1": [0, 0, 0, 0, 0, -2.0]})
    try:
        pos, neg, names = prompt_embeddings(enc, prompts)
    finally:
        for k in ("p1", "p2", "n1"):
            PHRASES.pop(k)
    # hand: (1,1)/sqrt2 and (1,0) -> mean (0.85355, 0.35355) -> / 0.92388 = (0.92388, 0.38268)
    mean = np.array([(1 / math.sqrt(2) + 1) / 2, 1 / (2 * math.sqrt(2))])
    expected = mean / np.linalg.norm(mean)
    assert names == ["f"]
    assert pos[0, :2] == pytest.approx(expected, abs=1e-6) and pos[0, :2] == pytest.approx([0.92388, 0.38268], abs=1e-5)
    assert not np.allclose(pos[0, :2], np.array([4.0, 1.0]) / math.hypot(4, 1), atol=1e-3)  # not a raw mean
    assert neg[0] == pytest.approx(-E[5])
    assert enc.calls == [["p1", "p2", "n1"]]


def _cases():
    # a: cases 0-2 positive; b: image positive for 0-1, but the codes say 0-2 (case 2 mislabelled); c: none
    status_a = [1, 1, 1, 0, 0, 0]
    status_b = [1, 1, 0, 0, 0, 0]
    img = np.array([(E[0] if sa else E[1]) + (E[2] if sb else E[3]) for sa, sb in zip(status_a, status_b)])
    codes = [["A01.1", "B02.1"], ["A011", "b02"], ["A01.19", "B02.9", "I10"], ["I10"], [], ["Z87.891"]]
    # row scales are normalised away (powers of two, so equal directions stay bit-identical and tie exactly)
    return img * np.array([1.0, 2.0, 4.0, 0.5, 8.0, 0.25])[:, None], codes


def test_zero_shot_scores_and_metrics_known_values():
    img, codes = _cases()
    truth = finding_truth(codes, PROMPTS)
    assert truth.astype(int).tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    enc = FakeEncoder()
    scores, names = zero_shot_scores(torch.tensor(img, dtype=torch.float32), enc, PROMPTS, batch_size=4)
    assert names == ["a", "b", "c"] and scores.shape == (6, 3) and scores.dtype == np.float64
    assert [len(c) for c in enc.calls] == [4, 4, 1]              # batches of 4 over 9 distinct phrasings
    # image (e0 + e2)/sqrt2: cos to pos_a = e0 is 1/sqrt2, to neg_a = e1 is 0 -> sigmoid(1/sqrt2)
    s = 1 / math.sqrt(2)
    assert scores[0] == pytest.approx([expit(s), expit(s), 0.5], abs=1e-6)
    assert scores[3] == pytest.approx([expit(-s), expit(-s), 0.5], abs=1e-6)
    assert scores[2, 1] == pytest.approx(expit(-s), abs=1e-6)
    # softmax over [c+, c-] / temperature
    sharp, _ = zero_shot_scores(img, enc, PROMPTS, temperature=0.1)
    assert sharp[0, 0] == pytest.approx(math.exp(10 * s) / (math.exp(10 * s) + 1), abs=1e-6)

    m = zero_shot_metrics(scores, truth, names)
    a, b, c = (m["per_finding"][n] for n in names)
    assert a["auroc"] == 1.0 and a["f1"] == 1.0 and a["best_f1"] == 1.0
    # b: positives {0,1} score high, positive 2 ties with negatives {3,4,5}: AUROC (6 + 3/2) / 9
    assert b["auroc"] == pytest.approx(5 / 6)
    assert b["f1"] == pytest.approx(0.8)                          # TP 2, FP 0, FN 1
    assert b["best_f1"] == pytest.approx(0.8) and b["best_threshold"] == pytest.approx(expit(s), abs=1e-6)
    assert (a["positives"], b["positives"], c["positives"]) == (3, 3, 0)
    assert c["scored"] is False and math.isnan(c["auroc"]) and math.isnan(c["f1"])
    assert m["macro_auroc"] == pytest.approx((1 + 5 / 6) / 2)
    assert m["macro_f1"] == pytest.approx(0.9)
    assert m["n_findings_scored"] == 2 and m["skipped_findings"] == ["c"] and m["n_cases"] == 6
    assert "c" in m["note"]
    # temperature changes neither AUROC nor the decision at 0.5
    m_sharp = zero_shot_metrics(sharp, truth, names)
    assert m_sharp["macro_auroc"] == m["macro_auroc"] and m_sharp["macro_f1"] == m["macro_f1"]
    # a threshold above every score: no positive calls -> F1 0
    assert zero_shot_metrics(scores, truth, names, threshold=0.99)["macro_f1"] == 0.0


def test_zero_shot_with_builtin_prompts_and_bad_inputs():
    rng = np.random.default_rng(1)
    table = {}

    def encode(texts):
        for t in texts:
            table.setdefault(t, rng.standard_normal(8))
        return np.stack([table[t] for t in texts])

    scores, names = zero_shot_scores(rng.standard_normal((5, 8)), encode, "ct_findings")
    assert names == list(FINDINGS) and scores.shape == (5, 11) and np.all((scores > 0) & (scores < 1))
    with pytest.raises(VolfmError, match="dimensions"):
        zero_shot_scores(np.ones((2, 3)), encode, "ct_findings")
    with pytest.raises(VolfmError, match="temperature"):
        zero_shot_scores(np.ones((2, 8)), encode, "ct_findings", temperature=0)
    with pytest.raises(VolfmError, match="one embedding per text"):
        zero_shot_scores(np.ones((2, 8)), lambda t: np.ones((1, 8)), "ct_findings")
    with pytest.raises(VolfmError, match="missing negative"):
        validate_prompts({"x": {"codes": ["R16.0"], "positive": ["p"]}})
