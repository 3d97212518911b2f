"""Segmentation decoders on volfm's encoder interface, and the encoder + decoder model.

Every decoder is built from an encoder's ``feature_info`` (a list of ``{"num_chs", "reduction"}``,
reduction per (I, J, K) axis) and called as ``decoder(features, x)`` with the encoder's
``forward_intermediates(x)`` and the raw input ``x`` (for the full-resolution skip):

    encoder = create_encoder("resnet50_3d", in_chans=1)
    model = SegmentationModel(encoder, num_classes=3)      # picks UNetDecoder for CNN encoders,
    logits = model(x)                                      # UNETRDecoder for ViT token maps
    # logits: (B, 3, I, J, K), the input's own spatial size

- :class:`UNetDecoder`: nnU-Net-style decoder over a CNN's multi-scale maps (resnet3d: the stem at
  reduction (2, 2, 1) plus 4 stages). Per-axis upsampling factors come from the ratio of
  consecutive reductions, so anisotropic encoders need nothing special; odd input sizes, which the
  encoder rounded up, are cropped (or padded) back to each skip's size.
- :class:`UNETRDecoder`: UNETR (Hatamizadeh et al. 2022) for 4 ViT token maps, built from MONAI's
  ``UnetrBasicBlock`` / ``UnetrPrUpBlock`` / ``UnetrUpBlock`` with the same module names as
  ``monai.networks.nets.UNETR`` (its non-``vit.`` weights load as they are). Patch sizes may be
  anisotropic powers of two per axis, e.g. (16, 16, 8).

Deep supervision: in training mode the decoders return ``[full-res logits, lower-res logits, ...]``
(highest resolution first; ``decoder.output_reductions`` gives each one's per-axis reduction); in
eval mode only the full-resolution tensor.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import (
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrPrUpBlock,
    UnetrUpBlock,
)
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from volfm import VolfmError
from volfm.utils import parse_triple

__all__ = ["UNetDecoder", "UNETRDecoder", "SegmentationModel", "match_spatial_size", "unetr_upsample_factors",
           "norm_layer"]

Triple = tuple[int, int, int]
NormSpec = str | tuple | None


def _reductions(feature_info: Sequence[dict]) -> list[Triple]:
    out = []
    for i, info in enumerate(feature_info):
        out.append(parse_triple(info.get("reduction"), f"feature_info[{i}] reduction", integer=True, at_least=1))
    return out


def match_spatial_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop or zero-pad the trailing spatial axes of ``x`` (B, C, I, J, K) at their far end to ``size``.

    Strided convs with 'same' padding round up (ceil(n / s)), so an upsampled map is at most one
    step larger than its skip and the surplus sits at the far end of each axis.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    x = x[:, :, : size[0], : size[1], : size[2]]
    pad = []
    for have, want in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, want - have]
    return F.pad(x, pad) if any(pad) else x


def norm_layer(norm: NormSpec, channels: int) -> nn.Module:
    """A 3D normalisation layer for ``channels``: 'instance', 'batch', 'none'/None or a MONAI norm spec."""
    if norm is None or norm == "none":
        return nn.Identity()
    if norm == "instance":  # nnU-Net: affine instance norm
        return nn.InstanceNorm3d(channels, affine=True)

    try:
        return get_norm_layer(name=norm, spatial_dims=3, channels=channels)
    except Exception as exc:  # noqa: BLE001 - re-raised with the option named
        raise VolfmError(f"unknown norm {norm!r} ({exc}); use 'instance', 'batch', 'none' or a MONAI norm spec such "
                         "as ('group', {'num_groups': 8})") from exc


class ConvNormAct(nn.Sequential):
    """3x3x3 conv -> norm -> LeakyReLU(0.01), nnU-Net's basic unit."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormSpec = "instance", kernel_size: int = 3):
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            norm_layer(norm, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNetDecoderStage(nn.Module):
    """Upsample the deeper map by ``factor`` (transposed conv, kernel = stride = factor), fit it to the
    skip's size, concatenate the skip, then two conv-norm-LeakyReLU blocks."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, factor: Triple, norm: NormSpec):
        super().__init__()
        self.factor = tuple(factor)
        self.up = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=self.factor, stride=self.factor)
        self.convs = nn.Sequential(ConvNormAct(out_ch + skip_ch, out_ch, norm), ConvNormAct(out_ch, out_ch, norm))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = match_spatial_size(self.up(x), skip.shape[2:])
        return self.convs(torch.cat([x, skip], dim=1))


def _he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2) on the decoder's own convs."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=1e-2)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class UNetDecoder(nn.Module):
    """U-Net decoder (nnU-Net style) over a CNN encoder's ``forward_intermediates``.

    Starting at the deepest map, each stage upsamples by the ratio of consecutive reductions (per
    axis: (2, 2, 1), (2, 2, 2), ...), concatenates the next shallower map and applies two 3x3x3
    conv-norm-LeakyReLU blocks. A last stage goes from the shallowest map to full resolution with a
    skip made from the raw input (one conv block on ``x``, as nnU-Net/UNETR), then a 1x1x1 conv
    gives ``num_classes`` logits of exactly ``x``'s spatial size.

    Args:
        feature_info: the encoder's ``feature_info`` (shallowest first); reductions must grow by
            integer factors per axis.
        in_chans: channels of the raw input.
        num_classes: output channels (logits).
        channels: decoder widths, ``len(feature_info)`` ints: ``channels[0]`` for the
            full-resolution stage, ``channels[i]`` for the stage at ``feature_info[i - 1]``'s
            resolution (the deepest map is no decoder stage). Default: each
            stage as wide as its skip (capped at 320, as nnU-Net), full resolution min(32, skip 0).
        deep_supervision: in training also return logits of every lower-resolution stage.
        norm: "instance" (affine, nnU-Net), "batch", "none" or a MONAI norm spec.
    """

    def __init__(
        self,
        feature_info: Sequence[dict],
        in_chans: int,
        num_classes: int,
        channels: Sequence[int] | None = None,
        deep_supervision: bool = False,
        norm: NormSpec = "instance",
    ):
        super().__init__()
        if len(feature_info) < 1:
            raise VolfmError("UNetDecoder needs an encoder feature_info with at least one map")
        reds = _reductions(feature_info)
        skip_chs = [int(info["num_chs"]) for info in feature_info]
        n = len(feature_info)
        if channels is None:
            channels = [min(32, skip_chs[0])] + [min(c, 320) for c in skip_chs[:-1]]
        channels = [int(c) for c in channels]
        if len(channels) != n or any(c < 1 for c in channels):
            raise VolfmError(f"UNetDecoder channels must be {n} positive ints (full resolution, then one per encoder "
                             f"map except the deepest), got {channels}")
        # Upsampling factor into level i from level i + 1; level -1 is full resolution (reduction 1).
        full = [(1, 1, 1)] + reds
        factors = []
        for lo, hi in zip(full[:-1], full[1:]):
            if any(h % l for l, h in zip(lo, hi)):
                raise VolfmError(f"encoder reductions {reds} do not grow by integer factors per axis ({lo} -> {hi}); "
                                 "UNetDecoder needs each map's reduction to divide the next one's")
            factors.append(tuple(h // l for l, h in zip(lo, hi)))

        self.in_chans, self.num_classes = int(in_chans), int(num_classes)
        self.deep_supervision = bool(deep_supervision)
        self.channels = channels
        self.input_skip = ConvNormAct(in_chans, channels[0], norm)
        # stages[i] brings level i + 1 (or the deepest map) to level i (i = 0: full resolution).
        stages = []
        for i in range(n):
            in_ch = skip_chs[-1] if i == n - 1 else channels[i + 1]
            skip_ch = channels[0] if i == 0 else skip_chs[i - 1]
            stages.append(UNetDecoderStage(in_ch, skip_ch, channels[i], factors[i], norm))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv3d(channels[0], num_classes, kernel_size=1)
        # Deep-supervision heads on the stages at reductions reds[0], reds[1], ... (not the deepest map).
        self.ds_heads = nn.ModuleList(
            nn.Conv3d(channels[i], num_classes, kernel_size=1) for i in range(1, n)
        ) if self.deep_supervision else nn.ModuleList()
        self.output_reductions: list[Triple] = [(1, 1, 1)] + (reds[:-1] if self.deep_supervision else [])
        _he_init(self)

    def forward(self, features: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        n = len(self.stages)
        if len(features) != n:
            raise VolfmError(f"UNetDecoder was built for {n} encoder maps, got {len(features)}")
        skips = [self.input_skip(x)] + list(features[:-1])
        y = features[-1]
        outs = []
        for i in reversed(range(n)):
            y = self.stages[i](y, skips[i])
            if i > 0 and self.deep_supervision and self.training:
                outs.append(self.ds_heads[i - 1](y))
        logits = self.head(y)
        if self.deep_supervision and self.training:
            return [logits] + outs[::-1]
        return logits


def unetr_upsample_factors(patch_size: Sequence[int]) -> tuple[Triple, Triple]:
    """Per-axis factors of UNETR's upsampling steps for a (possibly anisotropic) patch size.

    UNETR climbs from the token stride ``p`` to full resolution in 4 transposed-conv steps; the
    three deepest (the ``UnetrPrUpBlock`` stacks and decoder5/4/3) share one kernel per axis and
    the last (decoder2, into the raw-input skip) takes the rest: ``p = up**3 * last`` per axis with
    ``up = 2, last = p / 8`` for p >= 8 (16 -> 2, 2, 2, 2 as UNETR; 8 -> 2, 2, 2, 1; 32 -> ..., 4) and
    ``up = 1, last = p`` for p < 8. Returns ``(up, last)``; a patch side that is not a power of two
    raises VolfmError.
    """
    up, last = [], []
    for p in patch_size:
        p = int(p)
        if p < 1 or p & (p - 1):
            raise VolfmError(f"UNETRDecoder needs a power-of-two patch size on every axis, got {tuple(patch_size)}; "
                             "use e.g. 16 or (16, 16, 8), or the UNet decoder (decoder='unet')")
        u = 2 if p >= 8 else 1
        up.append(u)
        last.append(p // u**3)
    return tuple(up), tuple(last)  # type: ignore[return-value]


class UNETRDecoder(nn.Module):
    """UNETR decoder for 4 ViT token maps (all at the patch-size stride), MONAI's structure.

    ``features = [z3, z6, z9, z12]`` (``ViT3d.forward_intermediates`` default): z3/z6/z9 are projected
    and upsampled by stacks of 3/2/1 transposed convs (encoder2/3/4, ``UnetrPrUpBlock``) to strides
    p/8, p/4, p/2; encoder1 is a residual conv block on the raw input; decoder5..2
    (``UnetrUpBlock``) climb from z12 through those skips to full resolution; ``out`` is a 1x1x1
    conv. Module names equal ``monai.networks.nets.UNETR``'s, so its decoder weights load directly.

    Args:
        feature_info: the ViT's ``feature_info``: 4 maps of equal reduction (the patch size).
        in_chans: channels of the raw input.
        num_classes: output channels (logits).
        embed_dim: the token width (default: ``feature_info``'s num_chs).
        feature_size: UNETR's base width (16 as MONAI).
        deep_supervision: in training also return logits at strides p/8, p/4, p/2 (decoder3/4/5).
        norm: MONAI norm name for the blocks ("instance" as MONAI's UNETR).
        res_block, conv_block: as MONAI's UNETR (both True there).
    """

    def __init__(
        self,
        feature_info: Sequence[dict],
        in_chans: int,
        num_classes: int,
        embed_dim: int | None = None,
        feature_size: int = 16,
        deep_supervision: bool = False,
        norm: NormSpec = "instance",
        res_block: bool = True,
        conv_block: bool = True,
    ):
        super().__init__()

        reds = _reductions(feature_info)
        if len(reds) != 4 or len(set(reds)) != 1:
            raise VolfmError(f"UNETRDecoder needs 4 token maps at one reduction (a ViT's feature_info), got reductions "
                             f"{reds}; use the UNet decoder (decoder='unet') for CNN encoders")
        chs = {int(info["num_chs"]) for info in feature_info}
        if embed_dim is None:
            if len(chs) != 1:
                raise VolfmError(f"UNETRDecoder needs token maps of one width, got num_chs {sorted(chs)}")
            embed_dim = chs.pop()
        elif chs != {int(embed_dim)}:
            raise VolfmError(f"UNETRDecoder embed_dim={embed_dim} does not match the encoder's num_chs {sorted(chs)}")
        self.patch_size: Triple = reds[0]
        up, last = unetr_upsample_factors(self.patch_size)
        self.in_chans, self.num_classes, self.embed_dim = int(in_chans), int(num_classes), int(embed_dim)
        self.feature_size = fs = int(feature_size)
        self.deep_supervision = bool(deep_supervision)
        common = dict(spatial_dims=3, norm_name=norm, res_block=res_block)
        pr_up = dict(kernel_size=3, stride=1, upsample_kernel_size=up, conv_block=conv_block, **common)
        E = self.embed_dim
        self.encoder1 = UnetrBasicBlock(in_channels=in_chans, out_channels=fs, kernel_size=3, stride=1, **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=E, out_channels=fs * 2, num_layer=2, **pr_up)
        self.encoder3 = UnetrPrUpBlock(in_channels=E, out_channels=fs * 4, num_layer=1, **pr_up)
        self.encoder4 = UnetrPrUpBlock(in_channels=E, out_channels=fs * 8, num_layer=0, **pr_up)
        self.decoder5 = UnetrUpBlock(in_channels=E, out_channels=fs * 8, kernel_size=3, upsample_kernel_size=up,
                                     **common)
        self.decoder4 = UnetrUpBlock(in_channels=fs * 8, out_channels=fs * 4, kernel_size=3, upsample_kernel_size=up,
                                     **common)
        self.decoder3 = UnetrUpBlock(in_channels=fs * 4, out_channels=fs * 2, kernel_size=3, upsample_kernel_size=up,
                                     **common)
        self.decoder2 = UnetrUpBlock(in_channels=fs * 2, out_channels=fs, kernel_size=3, upsample_kernel_size=last,
                                     **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=num_classes)
        # decoder3, decoder4, decoder5 outputs: strides last, last*up, last*up^2.
        self.ds_heads = nn.ModuleList(
            nn.Conv3d(c, num_classes, kernel_size=1) for c in (fs * 2, fs * 4, fs * 8)
        ) if self.deep_supervision else nn.ModuleList()
        self.output_reductions: list[Triple] = [(1, 1, 1)]
        if self.deep_supervision:
            self.output_reductions += [tuple(lo * u**k for lo, u in zip(last, up))  # type: ignore[misc]
                                       for k in range(3)]

    def forward(self, features: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if len(features) != 4:
            raise VolfmError(f"UNETRDecoder takes 4 token maps, got {len(features)}")
        grid = tuple(features[0].shape[2:])
        if any(g * p != s for g, p, s in zip(grid, self.patch_size, x.shape[2:])) or any(
                tuple(f.shape[2:]) != grid for f in features):
            raise VolfmError(f"token maps {[tuple(f.shape[2:]) for f in features]} times the patch size "
                             f"{self.patch_size} do not give the input size {tuple(x.shape[2:])}; pad the input to a "
                             "multiple of the patch size")
        z3, z6, z9, z12 = features
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(z3)
        enc3 = self.encoder3(z6)
        enc4 = self.encoder4(z9)
        dec3 = self.decoder5(z12, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        logits = self.out(self.decoder2(dec1, enc1))
        if self.deep_supervision and self.training:
            return [logits] + [head(d) for head, d in zip(self.ds_heads, (dec1, dec2, dec3))]
        return logits


DECODERS = ("auto", "unet", "unetr")


class SegmentationModel(nn.Module):
    """A volfm encoder plus a segmentation decoder: ``forward(x)`` -> ``(B, num_classes, I, J, K)``.

    Args:
        encoder: a volfm encoder (``forward_intermediates`` + ``feature_info``), e.g. from
            ``create_encoder`` or ``load_encoder``.
        num_classes: output channels (logits; background included).
        decoder: "unet" (:class:`UNetDecoder`), "unetr" (:class:`UNETRDecoder`) or "auto": UNETR
            when all of the encoder's maps share one reduction (a ViT), U-Net otherwise.
        deep_supervision: in training mode return ``[full-res logits, lower-res logits, ...]``
            (``self.decoder.output_reductions`` gives each one's reduction); eval mode always
            returns the full-resolution tensor.
        decoder_kwargs: passed to the decoder (``channels``, ``norm``, ``feature_size``, ...).

    ``self.config`` records the encoder's registry name/kwargs (when built by ``create_encoder``)
    and the decoder's settings, enough to rebuild the model.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, decoder: str = "auto", deep_supervision: bool = False,
                 **decoder_kwargs):
        super().__init__()
        for attr in ("forward_intermediates", "feature_info"):
            if not hasattr(encoder, attr):
                raise VolfmError(f"SegmentationModel needs a volfm encoder with {attr!r} ({type(encoder).__name__} has "
                                 "none); build one with volfm.models.create_encoder")
        if decoder not in DECODERS:
            raise VolfmError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        feature_info = list(encoder.feature_info)
        if decoder == "auto":
            decoder = "unetr" if len(set(_reductions(feature_info))) == 1 else "unet"
        in_chans = int(getattr(encoder, "in_chans", getattr(encoder, "encoder_kwargs", {}).get("in_chans", 1)))
        self.encoder = encoder
        cls = UNETRDecoder if decoder == "unetr" else UNetDecoder
        try:
            self.decoder = cls(feature_info, in_chans, num_classes, deep_supervision=deep_supervision, **decoder_kwargs)
        except TypeError as exc:
            raise VolfmError(f"bad decoder options for {cls.__name__}: {exc}") from exc
        self.decoder_name = decoder
        self.num_classes = int(num_classes)
        self.config = {
            "encoder": getattr(encoder, "encoder_name", None),
            "encoder_kwargs": dict(getattr(encoder, "encoder_kwargs", {})),
            "num_classes": self.num_classes,
            "decoder": decoder,
            "deep_supervision": bool(deep_supervision),
            "decoder_kwargs": dict(decoder_kwargs),
        }

    @property
    def output_reductions(self) -> list[Triple]:
        return self.decoder.output_reductions

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder.forward_intermediates(x), x)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters (e.g. for a smaller learning rate, or to freeze)."""
        return self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.decoder.parameters()
