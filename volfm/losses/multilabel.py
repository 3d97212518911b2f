"""Multi-label losses (ICD codes): masked BCE with logits, focal loss, positive weights from counts."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from volfm import VolfmError

__all__ = ["multilabel_loss", "pos_weight_from_counts"]


def multilabel_loss(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None, focal_gamma: float = 0.0,
                    focal_alpha: float | None = None, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy with logits for multi-label targets, optionally focal (Lin et al. 2017).

    ``logits``, ``targets``: the same shape, classes last, e.g. ``(B, C)``; targets in [0, 1] (soft
    labels allowed). Entries whose target is NaN or negative (e.g. -1 for a missing label) are
    ignored: they add nothing to the loss or the gradient. ``pos_weight``: ``(C,)``, multiplies the
    positive term as in ``torch.nn.BCEWithLogitsLoss`` (see :func:`pos_weight_from_counts`).

    ``focal_gamma > 0``: each entry's (pos-weighted) BCE is multiplied by ``(1 - p_t) ** gamma``,
    ``p_t = p if y = 1 else 1 - p`` (for soft y: ``1 - p_t = y (1 - p) + (1 - y) p``), and by
    ``alpha_t = alpha y + (1 - alpha)(1 - y)`` when ``focal_alpha`` is given; ``focal_gamma=0`` without
    alpha is exactly BCE. ``reduction``: ``"mean"`` over the kept entries (0 when none is kept),
    ``"sum"``, or ``"none"`` (elementwise, 0 at ignored entries).
    """
    if logits.shape != targets.shape:
        raise VolfmError(f"logits and targets must have the same shape; got logits {tuple(logits.shape)} and "
                         f"targets {tuple(targets.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise VolfmError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if focal_gamma < 0:
        raise VolfmError(f"focal_gamma must be >= 0; got {focal_gamma}")
    if focal_alpha is not None and not 0.0 <= focal_alpha <= 1.0:
        raise VolfmError(f"focal_alpha must be in [0, 1] or None; got {focal_alpha}")
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        if pos_weight.ndim != 1 or logits.ndim == 0 or pos_weight.shape[0] != logits.shape[-1]:
            raise VolfmError(f"pos_weight must be (C,) with C = logits.shape[-1]; got pos_weight "
                             f"{tuple(pos_weight.shape)} for logits {tuple(logits.shape)}")

    targets = targets.to(logits.dtype)
    keep = ~torch.isnan(targets) & (targets >= 0)
    y = torch.where(keep, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    if focal_gamma > 0:
        # 1 - p_t from sigmoid(+-x) directly (accurate for confident logits); clamp keeps pow finite.
        one_minus_pt = y * torch.sigmoid(-logits) + (1 - y) * torch.sigmoid(logits)
        loss = loss * one_minus_pt.clamp(min=torch.finfo(logits.dtype).tiny) ** focal_gamma
    if focal_alpha is not None:
        loss = loss * (focal_alpha * y + (1 - focal_alpha) * (1 - y))
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp(min=1).to(loss.dtype)


def pos_weight_from_counts(pos_counts, n, clip: float | tuple[float, float] | None = 100.0) -> Tensor:
    """Per-class ``pos_weight = (n - pos) / pos`` (negatives per positive), clipped.

    ``pos_counts``: ``(C,)`` positives per class; ``n``: the number of labelled cases, an int or
    ``(C,)`` (per class, when labels can be missing). ``clip``: an upper bound, ``(low, high)``, or
    None; a class without positives gets the upper bound (it is an error when there is none).
    Returns a float32 ``(C,)`` tensor for :func:`multilabel_loss`.
    """
    pos = torch.as_tensor(pos_counts, dtype=torch.float64).reshape(-1)
    total = torch.as_tensor(n, dtype=torch.float64)
    if total.ndim > 1 or (total.ndim == 1 and total.shape != pos.shape):
        raise VolfmError(f"n must be an int or (C,) like pos_counts {tuple(pos.shape)}; got {tuple(total.shape)}")
    if bool((pos < 0).any()) or bool((pos > total).any()):
        raise VolfmError(f"pos_counts must lie in [0, n]; got pos_counts {pos.tolist()} with n {total.tolist()}")
    low, high = (None, None) if clip is None else (clip if isinstance(clip, (tuple, list)) else (None, clip))
    if high is None and bool((pos == 0).any()):
        raise VolfmError("a class has no positives, so its neg/pos ratio is infinite; give clip= an upper bound "
                         f"(classes {torch.nonzero(pos == 0).flatten().tolist()})")
    safe = torch.where(pos > 0, pos, torch.ones_like(pos))
    ratio = torch.where(pos > 0, (total - pos) / safe, torch.full_like(pos, math.inf))
    if low is not None or high is not None:
        ratio = ratio.clamp(min=low, max=high)
    return ratio.to(torch.float32)
