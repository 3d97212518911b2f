"""Image <-> report retrieval metrics (Merlin-style evaluation): Recall@k, median and mean rank.

Pair ``i`` of ``image_emb`` matches pair ``i`` of ``text_emb``; every other row is a distractor. Both
sets are L2-normalised here and compared by cosine similarity (in float64).

Tie rule (pessimistic): the rank of the true match is the number of candidates whose similarity is
``>=`` the true pair's similarity minus ``tie_tol`` -- the true match itself included, so ranks start
at 1. A candidate that ties with the true match is counted as ranked ABOVE it, so a collapsed model
(all embeddings equal) gets rank N for every query and Recall@k = 0 for k < N instead of a perfect
score. ``tie_tol`` (default 1e-6) absorbs float rounding: cosine similarities closer than that count as
ties (float32 embeddings carry ~1e-7 relative precision, so smaller differences are noise).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from volfm import VolfmError

__all__ = ["retrieval_metrics", "retrieval_ranks", "chance_recall", "l2_normalize"]


def _as_matrix(x, what: str) -> np.ndarray:
    """Torch tensor / numpy array / nested list -> float64 (N, D) array, checked."""
    if hasattr(x, "detach"):  # torch.Tensor (any device / dtype)
        x = x.detach().to("cpu").double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise VolfmError(f"{what} must be a 2-D array (N, D), got shape {tuple(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise VolfmError(f"{what} must have at least one row and one column, got shape {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        bad = int(np.argwhere(~np.isfinite(a))[0, 0])
        raise VolfmError(f"{what} has non-finite values (first in row {bad}); check the encoder outputs")
    return a


def l2_normalize(a: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``a`` scaled to unit L2 norm; an all-zero row is an error naming ``what``."""
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise VolfmError(f"{what} row {int(zero[0])} is all zeros; cosine similarity is undefined for it")
    return a / norms


def chance_recall(n: int, k: int) -> float:
    """Recall@k of a random ranking over ``n`` candidates with one true match: ``k / n`` (1.0 when k >= n)."""
    n, k = int(n), int(k)
    if n < 1 or k < 1:
        raise VolfmError(f"chance_recall needs n >= 1 and k >= 1, got n={n}, k={k}")
    return min(k / n, 1.0)


def retrieval_ranks(image_emb, text_emb, tie_tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of the true match, (image->report ranks (N,), report->image ranks (N,)), int64.

    See the module docstring for the pessimistic tie rule.
    """
    img = l2_normalize(_as_matrix(image_emb, "image_emb"), "image_emb")
    txt = l2_normalize(_as_matrix(text_emb, "text_emb"), "text_emb")
    if img.shape != txt.shape:
        raise VolfmError(f"image_emb {tuple(img.shape)} and text_emb {tuple(txt.shape)} must have the same shape "
                         "(N pairs x D); row i of each is pair i")
    if not (tie_tol >= 0):
        raise VolfmError(f"tie_tol must be >= 0, got {tie_tol!r}")
    sim = img @ txt.T                       # sim[i, j] = cos(image i, report j)
    true = np.diag(sim)
    i2t = (sim >= true[:, None] - tie_tol).sum(axis=1)   # reports competing for image i (row i)
    t2i = (sim >= true[None, :] - tie_tol).sum(axis=0)   # images competing for report j (column j)
    return i2t.astype(np.int64), t2i.astype(np.int64)


def _direction(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    return out


def retrieval_metrics(image_emb, text_emb, ks: Sequence[int] = (1, 5, 10), tie_tol: float = 1e-6,
                      return_ranks: bool = False) -> dict:
    """Image->report and report->image retrieval metrics over N matched pairs.

    image_emb, text_emb: (N, D) torch tensors or numpy arrays; row i of each is pair i. L2-normalised here.
    ks: the k of Recall@k (positive integers). A k >= N gives Recall@k = 1.0 by definition; it is still
        reported and listed under ``"k_exceeds_n"`` (k > N) so a table can mark it as uninformative.
    tie_tol: similarities within this of the true pair's count as ties, ranked ahead of it (pessimistic).
    return_ranks: also return the per-query ranks (lists of ints) under ``"ranks"``.

    Returns::

        {"n": N, "ks": [..],
         "image_to_report": {"R@1": .., "R@5": .., ..., "median_rank": .., "mean_rank": ..},
         "report_to_image": {... same keys ...},
         "chance": {"R@1": min(1/N, 1), ...},         # chance_recall(N, k)
         "k_exceeds_n": [k for k in ks if k > N],
         ["ranks": {"image_to_report": [...], "report_to_image": [...]}]}

    Ranks are 1-based (1 = the true match is the top hit).
    """
    try:
        ks = [int(k) for k in ks]
    except (TypeError, ValueError) as exc:
        raise VolfmError(f"ks must be a list of positive integers, got {ks!r}") from exc
    if not ks or min(ks) < 1:
        raise VolfmError(f"ks must be a non-empty list of positive integers, got {ks!r}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, tie_tol=tie_tol)
    n = int(i2t.shape[0])
    out = {
        "n": n,
        "ks": ks,
        "image_to_report": _direction(i2t, ks),
        "report_to_image": _direction(t2i, ks),
        "chance": {f"R@{k}": chance_recall(n, k) for k in ks},
        "k_exceeds_n": [k for k in ks if k > n],
    }
    if return_ranks:
        out["ranks"] = {"image_to_report": i2t.tolist(), "report_to_image": t2i.tolist()}
    return out
