"""Self-supervised objectives of :class:`volfm.tasks.PretrainTask`: masked-volume reconstruction (CNNs) and MAE (ViTs).

Both are loss groups beside the ICD and report losses, so one recipe can run any of them alone or weighted together
(``masked: {weight: 1}`` + ``icd: {weight: 0.5}`` is a hybrid no other toolkit offers):

* :class:`MaskedVolumeConfig` -- nnssl's MAE for ResEnc U-Nets (SparK-like, without sparse convolutions): random
  3D blocks of the input are overwritten with ``fill`` (``mask_ratio`` of the blocks of ``block_size`` voxels;
  nnssl masks 75 % of 16^3 blocks at 160^3), the encoder and the **same U-Net decoder the segmentation head uses**
  reconstruct the volume, and the loss is the mean squared error over the masked voxels only. The decoder is saved
  with the checkpoint (``decoder.*``) and as ``decoder.safetensors``, so ``SegmentationTask`` can start from the
  encoder alone or from encoder + decoder (``decoder.pretrained``).
* :class:`MAEConfig` -- He et al.'s masked autoencoder for ``vit_*_3d``: ``mask_ratio`` of the tokens are dropped
  before the transformer (only the visible tokens go through the encoder: ``ViT3d.forward_masked``), a light
  transformer decoder (:class:`volfm.models.mae.MAEDecoder`) predicts every patch's voxels, and the loss is the
  mean squared error on the masked patches, against per-patch normalised targets by default (``norm_pix_loss``).
  Fine-tuning takes the encoder (``SegmentationTask`` with the UNETR decoder).

Masks are drawn from a generator seeded by (task seed, global step, global rank) in training -- every rank and
step masks differently and a resumed run masks as the uninterrupted one -- and by (seed, the batch's case ids) in
validation/test, so the same case gets the same mask every epoch.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from volfm import VolfmError
from volfm.losses import masked_mse, masked_token_mse
from volfm.models.decoders import UNetDecoder
from volfm.models.mae import MAEDecoder, patchify
from volfm.models.masking import block_mask, mask_generator, token_mask
from volfm.utils import parse_triple

__all__ = ["MAEConfig", "MaskedVolumeConfig", "build_mae_decoder", "build_masked_decoder", "mae_loss",
           "masked_volume_loss", "random_crops", "step_generator"]


@dataclass(frozen=True)
class MaskedVolumeConfig:
    """Masked-volume reconstruction (CNN encoders): ``mask_ratio`` of the ``block_size`` blocks are set to ``fill``
    and reconstructed by the U-Net decoder (``decoder_kwargs``: UNetDecoder options such as ``channels``, ``norm``;
    use the same in fine-tuning to carry the decoder); loss weight ``weight``. ``crop_size``: reconstruct a random
    crop of each volume of this size (e.g. the fine-tuning patch) instead of the whole batch item, so that a hybrid
    run feeds whole volumes to the ICD/report losses and patches to this one from the same batch."""

    weight: float = 1.0
    mask_ratio: float = 0.75
    block_size: int | list[int] = 16
    fill: float = 0.0
    crop_size: list[int] | None = None
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MAEConfig:
    """MAE (ViT encoders): ``mask_ratio`` of the tokens dropped; decoder of ``decoder_depth`` blocks of width
    ``decoder_dim`` (divisible by 6) with ``decoder_heads`` heads; ``norm_pix_loss`` normalises each target patch;
    ``crop_size`` as for :class:`MaskedVolumeConfig`; loss weight ``weight``."""

    weight: float = 1.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    crop_size: list[int] | None = None
    decoder_dim: int = 192
    decoder_depth: int = 2
    decoder_heads: int = 4


def _in_chans(encoder: nn.Module) -> int:
    return int(getattr(encoder, "in_chans", 1))


def build_masked_decoder(encoder: nn.Module, cfg: MaskedVolumeConfig) -> UNetDecoder:
    """The U-Net decoder that reconstructs the input (``in_chans`` outputs) from the encoder's maps."""
    info = list(getattr(encoder, "feature_info", []))
    reds = {tuple(i["reduction"]) for i in info}
    if not info or len(reds) == 1:
        raise VolfmError(f"masked-volume pretraining needs a CNN encoder with multi-scale maps (resnet*_3d); "
                         f"{getattr(encoder, 'encoder_name', type(encoder).__name__)} has maps at one scale -- "
                         "for a ViT use mae: {...} (MAETask)")
    n = _in_chans(encoder)
    if cfg.decoder_kwargs.get("deep_supervision"):
        raise VolfmError("masked.decoder_kwargs: deep_supervision is for segmentation; the reconstruction has one "
                         "output (and the decoder carries into fine-tuning either way)")
    try:
        return UNetDecoder(info, n, n, **dict(cfg.decoder_kwargs))
    except TypeError as exc:
        raise VolfmError(f"masked.decoder_kwargs: {exc}") from exc


def build_mae_decoder(encoder: nn.Module, cfg: MAEConfig) -> MAEDecoder:
    if not hasattr(encoder, "forward_masked"):
        raise VolfmError(f"MAE needs a ViT encoder (vit_*_3d) with a token-dropping forward; "
                         f"{getattr(encoder, 'encoder_name', type(encoder).__name__)} has none -- for a CNN use "
                         "masked: {...} (MaskedVolumeTask)")
    return MAEDecoder(encoder.num_features, encoder.patch_size, _in_chans(encoder), decoder_dim=cfg.decoder_dim,
                      depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
                      num_prefix_tokens=int(getattr(encoder, "num_prefix_tokens", 0)))


def step_generator(seed: int, step: int, rank: int, case_ids, train: bool, stream: str) -> torch.Generator:
    """Training: (seed, global step, rank); evaluation: (seed, the batch's case ids) -- see the module docstring."""
    if train:
        return mask_generator(seed, step, rank, stream)
    return mask_generator(seed, zlib.crc32("|".join(map(str, case_ids)).encode()), 0, f"eval-{stream}")


def random_crops(image: torch.Tensor, size, generator: torch.Generator) -> torch.Tensor:
    """One random crop of ``size`` per batch item (start uniform over the valid positions, from ``generator``);
    ``size`` None or the full size returns ``image`` itself."""
    if size is None:
        return image
    size = parse_triple(size, "crop_size", integer=True, at_least=1)
    full = tuple(int(s) for s in image.shape[2:])
    if size == full:
        return image
    if any(c > f for c, f in zip(size, full)):
        raise VolfmError(f"crop_size {size} is larger than the batch's volumes {full}; use a crop of at most the "
                         "volume size (or none)")
    starts = [[int(torch.randint(0, f - c + 1, (1,), generator=generator)) for c, f in zip(size, full)]
              for _ in range(image.shape[0])]
    return torch.stack([image[b, :, i:i + size[0], j:j + size[1], k:k + size[2]]
                        for b, (i, j, k) in enumerate(starts)])


def masked_volume_loss(encoder: nn.Module, decoder: nn.Module, image: torch.Tensor, cfg: MaskedVolumeConfig,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, mask): the masked input through encoder + decoder, MSE over the masked voxels."""
    image = random_crops(image, cfg.crop_size, generator)
    mask = block_mask(image.shape[0], image.shape[2:], cfg.block_size, cfg.mask_ratio, generator, image.device)
    x = torch.where(mask, torch.as_tensor(cfg.fill, dtype=image.dtype, device=image.device), image)
    recon = decoder(encoder.forward_intermediates(x), x)
    return masked_mse(recon.float(), image.float(), mask), recon, mask


def mae_loss(encoder: nn.Module, decoder: MAEDecoder, image: torch.Tensor, cfg: MAEConfig,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, predicted patches (B, N, D), masked (B, N)): visible tokens only through the encoder."""
    image = random_crops(image, cfg.crop_size, generator)
    grid = tuple(s // p for s, p in zip(image.shape[2:], encoder.patch_size))
    n = grid[0] * grid[1] * grid[2]
    keep, masked = token_mask(image.shape[0], n, cfg.mask_ratio, generator, image.device)
    visible, grid = encoder.forward_masked(image, keep)
    pred = decoder(visible, keep, grid)
    target = patchify(image, encoder.patch_size)
    return masked_token_mse(pred, target, masked, norm_pix=cfg.norm_pix_loss), pred, masked
