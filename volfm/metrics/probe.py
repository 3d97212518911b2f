"""Linear probe on frozen encoder features: one-vs-rest L2 logistic regression fitted in torch.

Protocol (what :func:`linear_probe` reports):

1. Features are standardised with the *training* mean and population std (a constant feature
   gets std 1, so it becomes 0 everywhere); test features use the same statistics.
2. Each class with at least one positive and one negative in the training labels gets its own
   logistic regression, minimising scikit-learn's objective
   ``0.5 * ||w||^2 + C * sum_i log(1 + exp(-y_i (w.x_i + b)))`` (bias not penalised), i.e. the
   same minimiser as ``LogisticRegression(C=C)``. All classes are solved together by one
   full-batch L-BFGS in float64 (the objective is separable per class, so this equals fitting
   them one by one); CPU, no randomness. Classes without both label values in train are skipped
   and reported.
3. ``C``: one value is used as given. A sequence is a grid: the probe is fitted on a validation
   split carved from the training cases (``val_fraction``, a seeded random permutation) for each
   value, the value with the best validation macro AUROC wins (ties go to the smallest ``C``, the
   strongest regularisation), and the final probe is refitted on all training cases with it.
   Pass ``val_x``/``val_y`` to select on your own (e.g. patient-disjoint) validation set instead.
4. Test-set metrics are :func:`volfm.metrics.classification.multilabel_metrics` over the fitted classes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from volfm import VolfmError
from volfm.metrics.classification import (
    as_binary_labels,
    as_scores,
    multilabel_metrics,
    resolve_class_names,
)

__all__ = ["C_GRID", "LinearProbe", "fit_linear_probe", "linear_probe"]

#: Default grid of inverse regularisation strengths (scikit-learn's C), selected on validation.
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass
class LinearProbe:
    """A fitted probe: ``sigmoid(((x - mean) / std) @ weight + bias)`` per fitted class."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    weight: np.ndarray  # (D, K) for the K fitted classes
    bias: np.ndarray  # (K,)
    C: float
    class_names: list[str]  # the K fitted classes
    skipped_classes: list[str]  # classes without both label values in train
    n_iter: int
    grad_max: float  # max |gradient| of the mean objective at the solution

    def decision_function(self, x) -> np.ndarray:
        """Logits (N, K) for raw (unstandardised) features ``x`` (N, D)."""
        x = _features(x, "x", self.mean.size)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict_proba(self, x) -> np.ndarray:
        """Probabilities (N, K) of each fitted class."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(x)))


def _features(x, name: str, dim: int | None = None) -> np.ndarray:
    x = as_scores(x, name)
    if x.ndim != 2:
        raise VolfmError(f"{name} has shape {tuple(x.shape)}; pass (N, D) features, one row per case")
    if dim is not None and x.shape[1] != dim:
        raise VolfmError(f"{name} has {x.shape[1]} feature dims but the probe was fitted on {dim}; "
                         "use features from the same encoder and pooling")
    return x


def _targets(y, name: str, n: int) -> np.ndarray:
    y = as_binary_labels(y, name)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n:
        raise VolfmError(f"{name} has shape {tuple(y.shape)} but there are {n} feature rows; "
                         "pass (N, C) multi-hot labels in the same case order as the features")
    return y


def _solve(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Minimise ``mean_i logloss + ||W||^2 / (2 C N)`` (scikit-learn's objective / (C N)) by L-BFGS."""
    n, d = x.shape
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    yt = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(d, y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    l2 = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2,
                            tolerance_grad=tol, tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = xt @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="sum") / n
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    grad_max = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    n_iter = int(opt.state[w].get("n_iter", 0))
    return w.detach().numpy().copy(), b.detach().numpy().copy(), n_iter, grad_max


def fit_linear_probe(train_x, train_y, C: float = 1.0, class_names: Sequence[str] | None = None,
                     max_iter: int = 1000, tol: float = 1e-8) -> LinearProbe:
    """Standardise ``train_x`` (N, D) and fit one-vs-rest L2 logistic regression for ``train_y`` (N, C).

    ``C`` is scikit-learn's inverse regularisation strength (see the module docstring for the exact
    objective). Classes with no positive or no negative in ``train_y`` are not fitted and are listed
    in ``skipped_classes``. ``tol`` bounds the max |gradient| of the objective divided by ``C N``.
    """
    x = _features(train_x, "train_x")
    y = _targets(train_y, "train_y", x.shape[0])
    names = resolve_class_names(class_names, y.shape[1])
    if not (np.isscalar(C) and not isinstance(C, (str, bool)) and C > 0 and math.isfinite(C)):
        raise VolfmError(f"C must be a positive number (got {C!r}); larger C = weaker L2 regularisation")
    if int(max_iter) < 1:
        raise VolfmError(f"max_iter must be >= 1 (got {max_iter})")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    pos = y.sum(axis=0)
    fit = (pos > 0) & (pos < y.shape[0])
    kept = [n for n, ok in zip(names, fit) if ok]
    skipped = [n for n, ok in zip(names, fit) if not ok]
    d = x.shape[1]
    if not kept:
        return LinearProbe(mean, std, np.zeros((d, 0)), np.zeros(0), float(C), kept, skipped, 0, 0.0)
    w, b, n_iter, grad_max = _solve((x - mean) / std, y[:, fit], float(C), int(max_iter), tol)
    return LinearProbe(mean, std, w, b, float(C), kept, skipped, n_iter, grad_max)


def _select_C(x, y, names, grid, val_x, val_y, val_fraction, seed, max_iter, tol) -> tuple[dict, str]:
    if val_x is not None:
        tr_x, tr_y = x, y
        va_x = _features(val_x, "val_x", x.shape[1])
        va_y = _targets(val_y, "val_y", va_x.shape[0])
        if va_y.shape[1] != y.shape[1]:
            raise VolfmError(f"val_y has {va_y.shape[1]} classes but train_y has {y.shape[1]}; use the same label columns")
        how = f"given validation set ({va_x.shape[0]} cases)"
    else:
        if not 0.0 < val_fraction < 1.0:
            raise VolfmError(f"val_fraction must be in (0, 1) (got {val_fraction}) when C is a grid")
        n = x.shape[0]
        n_val = int(round(n * val_fraction))
        if n_val < 2 or n - n_val < 2:
            raise VolfmError(f"{n} training cases are too few to carve a validation split (val_fraction={val_fraction}); "
                             "pass a single C or more training cases")
        perm = np.random.default_rng(seed).permutation(n)
        va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        tr_x, tr_y, va_x, va_y = x[tr], y[tr], x[va], y[va]
        how = f"random {n_val}/{n} split of train (val_fraction={val_fraction}, seed={seed})"
    scores: dict[float, float] = {}
    for c in sorted(grid):
        probe = fit_linear_probe(tr_x, tr_y, c, names, max_iter, tol)
        cols = [names.index(k) for k in probe.class_names]
        m = multilabel_metrics(va_y[:, cols], probe.predict_proba(va_x), probe.class_names)
        scores[c] = m["macro_auroc"]
    if all(math.isnan(v) for v in scores.values()):
        raise VolfmError(f"validation set ({how}) has no class with both positives and negatives among the fitted "
                         "classes, so C cannot be selected; pass a single C, val_x/val_y, or more training cases")
    return scores, how


def linear_probe(train_x, train_y, test_x, test_y, class_names: Sequence[str] | None = None,
                 C: float | Sequence[float] = C_GRID, val_fraction: float = 0.2, seed: int = 0,
                 val_x=None, val_y=None, max_iter: int = 1000, tol: float = 1e-8,
                 min_positives: int = 1, min_negatives: int = 1) -> dict:
    """Fit a linear probe on frozen train features and score it on the test set.

    ``train_x`` (N, D) / ``test_x`` (M, D) are pooled encoder features, ``train_y`` (N, C) /
    ``test_y`` (M, C) multi-hot labels. See the module docstring for the exact protocol
    (standardisation, objective, C selection). Returns the test-set
    :func:`~volfm.metrics.classification.multilabel_metrics` dict (over the fitted classes, with
    ``min_positives``/``min_negatives``) plus:

    - ``C``: the value used; ``C_grid``, ``C_selection`` (how it was chosen) and ``val_macro_auroc``
      (``{str(C): value}``; empty for a single C).
    - ``weights_shape`` ``[D, K]``, ``classes_fitted``, ``classes_skipped_train`` (no positive or
      no negative in train), ``n_train``, ``n_iter``, ``grad_max``.
    - ``test_scores``: (M, K) numpy probabilities, columns in ``classes_fitted`` order, for
      subgroup breakdowns; the one non-JSON value, pop it before ``json.dump``.
    """
    x = _features(train_x, "train_x")
    y = _targets(train_y, "train_y", x.shape[0])
    tx = _features(test_x, "test_x", x.shape[1])
    ty = _targets(test_y, "test_y", tx.shape[0])
    if ty.shape[1] != y.shape[1]:
        raise VolfmError(f"test_y has {ty.shape[1]} classes but train_y has {y.shape[1]}; use the same label columns")
    names = resolve_class_names(class_names, y.shape[1])

    try:
        grid = [float(C)] if np.isscalar(C) else [float(c) for c in C]
    except (TypeError, ValueError) as exc:
        raise VolfmError(f"C must be a positive number or a list of them (got {C!r})") from exc
    if not grid or any(not (c > 0 and math.isfinite(c)) for c in grid):
        raise VolfmError(f"C must be a positive number or a non-empty list of them (got {C!r})")
    if len(grid) == 1:
        chosen, val_scores, how = grid[0], {}, "given"
    else:
        val_scores, how = _select_C(x, y, names, grid, val_x, val_y, val_fraction, seed, max_iter, tol)
        best = max(v for v in val_scores.values() if not math.isnan(v))
        chosen = min(c for c, v in val_scores.items() if v == best)
        how = f"best validation macro AUROC on {how}, refit on all train"

    probe = fit_linear_probe(x, y, chosen, names, max_iter, tol)
    cols = [names.index(k) for k in probe.class_names]
    test_scores = probe.predict_proba(tx)
    result = multilabel_metrics(ty[:, cols], test_scores, probe.class_names, min_positives, min_negatives)
    if probe.skipped_classes:
        skipped_note = (f"{len(probe.skipped_classes)} class(es) not fitted (no positive or no negative in train): "
                        f"{', '.join(probe.skipped_classes)}")
        result["note"] = f"{skipped_note}; {result['note']}" if result["note"] else skipped_note
    result.update({
        "C": chosen,
        "C_grid": grid,
        "C_selection": how,
        "val_macro_auroc": {str(c): v for c, v in val_scores.items()},
        "weights_shape": [int(s) for s in probe.weight.shape],
        "classes_fitted": list(probe.class_names),
        "classes_skipped_train": list(probe.skipped_classes),
        "n_train": int(x.shape[0]),
        "n_iter": probe.n_iter,
        "grad_max": probe.grad_max,
        "test_scores": test_scores,
    })
    return result
