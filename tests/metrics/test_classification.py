"""volfm.metrics.classification against scikit-learn and MONAI (independent references)."""
import math
import warnings

import numpy as np
import pytest
import sklearn.metrics as sk_metrics  # scikit-learn is the reference (a dev dependency)
import torch

from volfm import VolfmError
from volfm.metrics.classification import (
    best_threshold_f1,
    binary_auprc,
    binary_auroc,
    binary_f1,
    macro_f1,
    multilabel_metrics,
)


def _tied_binary(seed, n=200, levels=7, prevalence=0.3):
    """Labels and scores quantised to a few levels, so ties (also across classes) are common."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    y[:2] = [True, False]  # both classes always present
    s = np.round(rng.normal(size=n) + 0.8 * y, 0) / levels  # few distinct values
    return y.astype(int), s


@pytest.mark.parametrize("seed", range(6))
def test_binary_auroc_and_auprc_match_sklearn_with_ties(seed):
    y, s = _tied_binary(seed)
    assert len(np.unique(s)) < len(s) // 4  # the data really has ties
    assert binary_auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
    assert binary_auprc(y, s) == pytest.approx(sk_metrics.average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_binary_auroc_matches_monai(seed):
    from monai.metrics import compute_roc_auc

    y, s = _tied_binary(seed, n=150)
    ref = float(compute_roc_auc(torch.tensor(s), torch.tensor(y, dtype=torch.float64)))
    assert binary_auroc(torch.tensor(y), torch.tensor(s)) == pytest.approx(ref, abs=1e-7)


def test_hand_worked_values():
    # positives 0.8, 0.5; negatives 0.5, 0.2: pairs (0.8>0.5, 0.8>0.2, 0.5=0.5 -> 1/2, 0.5>0.2) = 3.5/4
    y, s = [1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]
    assert binary_auroc(y, s) == 0.875
    # thresholds 0.8: P=1, R=1/2; 0.5 (tie enters together): P=2/3, R=1; AP = 1/2*1 + 1/2*2/3
    assert binary_auprc(y, s) == pytest.approx(0.5 + 1 / 3)
    assert binary_auroc([0, 1], [0.3, 0.3]) == 0.5
    assert binary_auroc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0


def test_one_class_gives_nan():
    assert math.isnan(binary_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(binary_auroc([0, 0], [0.1, 0.2]))
    assert math.isnan(binary_auprc([0, 0], [0.1, 0.2]))  # sklearn says 0; undefined here
    assert binary_auprc([1, 1], [0.1, 0.2]) == 1.0


def test_bad_inputs_raise_volfm_error():
    with pytest.raises(VolfmError, match="other than 0/1"):
        binary_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(VolfmError, match="NaN/inf"):
        binary_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(VolfmError, match="one score per label"):
        binary_auprc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(VolfmError, match="class_names has 1 names"):
        multilabel_metrics(np.eye(3), np.eye(3), class_names=["a"])
    with pytest.raises(VolfmError, match="shape"):
        multilabel_metrics(np.eye(3), np.eye(4))


def _multilabel(seed, n=120, c=6):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.linspace(0.05, 0.5, c)).astype(int)
    s = np.round(rng.normal(size=(n, c)) + y, 1)
    return y, s


@pytest.mark.parametrize("seed", range(4))
def test_multilabel_macro_micro_match_sklearn_on_scored_columns(seed):
    y, s = _multilabel(seed)
    y[:, 1] = 0  # no positives -> skipped
    y[:, 4] = 1  # no negatives -> skipped
    y[:3, 2] = [1, 0, 0]
    y[3:, 2] = 0  # exactly one positive: scored with min_positives=1, skipped with 2
    names = [f"f{i}" for i in range(y.shape[1])]
    out = multilabel_metrics(torch.tensor(y), torch.tensor(s), class_names=names)
    cols = [0, 2, 3, 5]
    assert out["n_classes_scored"] == 4 and out["n_classes_skipped"] == 2
    assert out["skipped_classes"] == ["f1", "f4"]
    for avg in ("macro", "micro"):
        assert out[f"{avg}_auroc"] == pytest.approx(sk_metrics.roc_auc_score(y[:, cols], s[:, cols], average=avg), abs=1e-12)
        assert out[f"{avg}_auprc"] == pytest.approx(
            sk_metrics.average_precision_score(y[:, cols], s[:, cols], average=avg), abs=1e-12)
    for c, name in enumerate(names):
        pc = out["per_class"][name]
        assert pc["positives"] == int(y[:, c].sum())
        assert pc["negatives"] == len(y) - pc["positives"]
        assert pc["prevalence"] == pytest.approx(y[:, c].mean())
        assert pc["scored"] == (c in cols)
        if c in cols:
            assert pc["auroc"] == pytest.approx(sk_metrics.roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
        else:
            assert math.isnan(pc["auroc"]) and math.isnan(pc["auprc"])
    assert "f1, f4" in out["note"]

    stricter = multilabel_metrics(y, s, class_names=names, min_positives=2)
    assert "f2" in stricter["skipped_classes"] and stricter["n_classes_scored"] == 3
    assert stricter["macro_auroc"] == pytest.approx(
        sk_metrics.roc_auc_score(y[:, [0, 3, 5]], s[:, [0, 3, 5]], average="macro"), abs=1e-12)


def test_multilabel_nothing_scorable_is_nan_with_note():
    y = np.zeros((5, 3), dtype=int)
    out = multilabel_metrics(y, np.random.default_rng(0).random((5, 3)))
    for k in ("macro_auroc", "macro_auprc", "micro_auroc", "micro_auprc"):
        assert math.isnan(out[k])
    assert out["n_classes_scored"] == 0 and out["skipped_classes"] == ["class_0", "class_1", "class_2"]
    assert "no class" in out["note"]


@pytest.mark.parametrize("seed", range(4))
def test_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random((80, 5)) < 0.3
    p = rng.random((80, 5)) < 0.3
    y[:, 3] = False
    p[:, 3] = False  # 0/0 class: zero_division applies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert macro_f1(y, p) == pytest.approx(sk_metrics.f1_score(y, p, average="macro", zero_division=0), abs=1e-12)
        assert macro_f1(y, p, zero_division=1.0) == pytest.approx(
            sk_metrics.f1_score(y, p, average="macro", zero_division=1.0), abs=1e-12)
    for c in range(5):
        assert binary_f1(y[:, c], p[:, c]) == pytest.approx(sk_metrics.f1_score(y[:, c], p[:, c], zero_division=0),
                                                            abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_best_threshold_f1_is_the_brute_force_optimum(seed):
    y, s = _tied_binary(seed, n=150)
    out = best_threshold_f1(y, s)
    f1s = {t: sk_metrics.f1_score(y, (s >= t).astype(int)) for t in np.unique(s)}
    best = max(f1s.values())
    assert out["f1"] == pytest.approx(best, abs=1e-12)
    assert out["threshold"] == max(t for t, v in f1s.items() if v == best)  # highest among ties
    pred = s >= out["threshold"]
    assert out["precision"] == pytest.approx(sk_metrics.precision_score(y, pred))
    assert out["recall"] == pytest.approx(sk_metrics.recall_score(y, pred))
    assert math.isnan(best_threshold_f1([0, 0], [0.2, 0.4])["f1"])
