"""Reconstruction losses of masked-image pretraining: mean squared error over the masked places only.

- :func:`masked_mse` -- voxels (CNN masked-volume pretraining, as nnssl's MAE for ResEnc U-Nets): the mean of
  ``(prediction - target)^2`` over the voxels where ``mask`` is True; visible voxels add nothing.
- :func:`masked_token_mse` -- patches (ViT MAE): the mean over the masked tokens of each token's mean squared
  error, optionally against per-patch normalised targets (MAE's ``norm_pix_loss``: each target patch minus its
  mean, over its std, which He et al. found to give better representations).
"""
from __future__ import annotations

from torch import Tensor

from volfm import VolfmError

__all__ = ["masked_mse", "masked_token_mse", "normalize_patches"]


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked voxels: ``sum(mask * (p - t)^2) / (sum(mask) * C)``.

    ``prediction``, ``target``: (B, C, I, J, K); ``mask``: (B, 1, I, J, K) or (B, C, I, J, K) bool, True = masked
    (the places to reconstruct). A batch without a masked voxel is an error (there is nothing to learn from it).
    """
    if prediction.shape != target.shape:
        raise VolfmError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    m = mask.to(prediction.dtype).expand_as(prediction)
    n = m.sum()
    if float(n) == 0:
        raise VolfmError("masked_mse: the mask selects no voxel; use a mask ratio > 0")
    return ((prediction - target) ** 2 * m).sum() / n


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch (last axis) minus its mean, divided by sqrt(its unbiased variance + eps), as MAE."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_token_mse(prediction: Tensor, target: Tensor, masked: Tensor, norm_pix: bool = True) -> Tensor:
    """MAE's loss: ``prediction``, ``target`` (B, N, D) patches, ``masked`` (B, N) bool (True = dropped token);
    the mean over masked tokens of each token's mean squared error (``target`` normalised per patch first
    when ``norm_pix``)."""
    if prediction.shape != target.shape or masked.shape != prediction.shape[:2]:
        raise VolfmError(f"prediction {tuple(prediction.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(masked.shape)} do not match (B, N, D) / (B, N)")
    if norm_pix:
        target = normalize_patches(target.float())
    per_token = ((prediction.float() - target.float()) ** 2).mean(dim=-1)
    m = masked.to(per_token.dtype)
    if float(m.sum()) == 0:
        raise VolfmError("masked_token_mse: no token is masked; use a mask ratio > 0")
    return (per_token * m).sum() / m.sum()
