"""Image losses for synthesis: adversarial (LSGAN, hinge, BCE) and perceptual (feature distance under a frozen
volfm encoder)."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from volfm import VolfmError
from volfm.models import load_encoder

__all__ = ["ADVERSARIAL_KINDS", "PerceptualLoss3d", "adversarial_loss"]

ADVERSARIAL_KINDS = ("lsgan", "hinge", "bce")


def adversarial_loss(logits: torch.Tensor, real: bool, kind: str = "lsgan", *, for_discriminator: bool = True
                     ) -> torch.Tensor:
    """GAN loss of discriminator ``logits`` (any shape, e.g. a PatchGAN map), averaged over all elements.

    ``real`` is the label the loss pushes towards: the discriminator uses ``real=True`` on real pairs
    and ``real=False`` on fakes; the generator uses ``real=True`` on its fakes.

    - "lsgan" (Mao et al. 2017, pix2pix/CycleGAN's default): ``mean((logits - 1)**2)`` / ``mean(logits**2)``.
    - "bce": binary cross-entropy with logits against ones / zeros (the original GAN loss).
    - "hinge" (Lim & Ye 2017; SAGAN, BigGAN): discriminator ``mean(relu(1 - logits))`` /
      ``mean(relu(1 + logits))``; generator (``for_discriminator=False``, needs ``real=True``)
      ``-mean(logits)``.
    """
    if kind not in ADVERSARIAL_KINDS:
        raise VolfmError(f"adversarial loss kind must be one of {', '.join(ADVERSARIAL_KINDS)}, got {kind!r}")
    logits = logits.float()
    if kind == "lsgan":
        return ((logits - 1.0) ** 2).mean() if real else (logits**2).mean()
    if kind == "bce":
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
    if not for_discriminator:
        if not real:
            raise VolfmError("the generator's hinge loss pushes fakes towards real: call it with real=True")
        return -logits.mean()
    return F.relu(1.0 - logits).mean() if real else F.relu(1.0 + logits).mean()


def _instance_normalize(f: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per sample and channel over the spatial axes (a 1-voxel map gives zeros)."""
    f = f.float()
    dims = tuple(range(2, f.ndim))
    mean = f.mean(dim=dims, keepdim=True)
    var = f.var(dim=dims, keepdim=True, unbiased=False)
    return (f - mean) * torch.rsqrt(var + eps)


class PerceptualLoss3d(nn.Module):
    """Feature-space distance under a frozen volfm encoder (LPIPS-style, 3D, no learned weights).

    ``loss(pred, target) = sum_l w_l * mean|n(F_l(pred)) - n(F_l(target))|`` where ``F_l`` is map
    ``l`` of ``encoder.forward_intermediates`` and ``n`` normalises each channel of each sample to zero
    mean and unit variance over space (so layers of different scale weigh alike). The target's
    features are computed without grad; gradients reach ``pred`` only.

    The encoder (a module, or the path of an encoder ``.safetensors`` written by ``save_encoder``) is
    deep-copied -- so passing the generator's own encoder does not freeze it -- then frozen:
    ``requires_grad`` False and eval mode forever (``train()`` keeps it in eval, so BatchNorm uses its
    running statistics and dropout/drop-path stay off). Use a pretrained encoder: random features
    make a weak loss.

    Args:
        encoder: the volfm encoder; its ``in_chans`` must match the images compared.
        layers: indices into ``forward_intermediates`` (negative count from the end); (1, 2, 3) is
            layer1..layer3 of a ResNet3d, the 2nd..4th default token maps of a ViT3d.
        weights: one per layer; default equal weights summing to 1.
    """

    def __init__(self, encoder: nn.Module | str | Path, layers: Sequence[int] = (1, 2, 3),
                 weights: Sequence[float] | None = None):
        super().__init__()
        if isinstance(encoder, (str, Path)):
            encoder = load_encoder(encoder)
        if not hasattr(encoder, "forward_intermediates"):
            raise VolfmError(f"PerceptualLoss3d needs a volfm encoder with forward_intermediates "
                             f"({type(encoder).__name__} has none); build one with volfm.models.create_encoder")
        n_maps = len(getattr(encoder, "feature_info", ())) or None
        layers = [int(i) for i in layers]
        if not layers:
            raise VolfmError("PerceptualLoss3d needs at least one layer index")
        if n_maps is not None:
            bad = [i for i in layers if not -n_maps <= i < n_maps]
            if bad:
                raise VolfmError(f"layer indices {bad} out of range: the encoder's forward_intermediates gives "
                                 f"{n_maps} maps (indices 0..{n_maps - 1})")
            layers = [i % n_maps for i in layers]
        if weights is None:
            weights = [1.0 / len(layers)] * len(layers)
        weights = [float(w) for w in weights]
        if len(weights) != len(layers):
            raise VolfmError(f"PerceptualLoss3d got {len(weights)} weights for {len(layers)} layers")
        self.layers, self.weights = tuple(layers), tuple(weights)
        self.encoder = copy.deepcopy(encoder)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> PerceptualLoss3d:
        super().train(mode)
        self.encoder.eval()  # frozen: never leaves eval mode
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.encoder.forward_intermediates(x)
        return [feats[i] for i in self.layers]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise VolfmError(f"PerceptualLoss3d compares images of one shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        with torch.no_grad():
            ft = self._features(target.detach())
        fp = self._features(pred)
        loss = pred.new_zeros((), dtype=torch.float32)
        for w, a, b in zip(self.weights, fp, ft):
            loss = loss + w * (_instance_normalize(a) - _instance_normalize(b)).abs().mean()
        return loss

    def extra_repr(self) -> str:
        return f"layers={self.layers}, weights={self.weights}"
