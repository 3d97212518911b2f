"""BatchNorm statistics of a frozen encoder: find the frozen layers, re-estimate their running statistics.

A frozen (or partly frozen) encoder keeps the running mean and variance it learnt in pretraining, and in eval mode
normalises with them. When fine-tuning inputs differ from pretraining inputs (volfm's ICD and report objectives see
whole 48^3 volumes, segmentation sees 32^3 patches with the organ in half of them), those statistics can be off.
:func:`recompute_batchnorm_stats` replaces them by the average over batches of the new inputs, with every weight
unchanged ("precise BN" as in pycls/timm, or AdaBN, Li et al. 2016): each layer's running mean becomes the mean of
its per-batch input means and its running variance the mean of its per-batch (unbiased) variances.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["batchnorm_layers", "recompute_batchnorm_stats"]


def batchnorm_layers(module: nn.Module, frozen_only: bool = False) -> list[nn.Module]:
    """The BatchNorm layers (1d/2d/3d, SyncBatchNorm) of ``module`` that track running statistics; with
    ``frozen_only`` only those whose affine parameters do not train."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            if frozen_only and any(p.requires_grad for p in m.parameters()):
                continue
            out.append(m)
    return out


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, layers: Iterable[nn.Module], batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running statistics of ``layers`` (BatchNorm layers inside ``model``) on ``batches``.

    The layers are reset and put in train mode with a cumulative average (``momentum=None``); every other module of
    ``model`` is in eval mode meanwhile (no dropout, other norms use their own statistics); ``model(x)`` runs on each
    batch without gradients. Afterwards the layers get their momentum back and every
    module its previous train/eval mode; weights are never touched. Returns the number of batches used (0 leaves the
    statistics as they were)."""
    layers = list(layers)
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in layers]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    n = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        if n == 0:  # nothing seen: keep what was there
            for m, (mean, var, count) in zip(layers, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        for m, was_training in modes.items():
            m.train(was_training)
    return n
