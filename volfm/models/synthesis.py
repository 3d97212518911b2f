"""Image-to-image synthesis (MRI -> PET, PET -> MRI, ...) on volfm's encoder interface.

    gen = SynthesisGenerator("resnet18_3d", encoder_kwargs=dict(base_channels=8),
                             final_activation="relu")                  # MRI -> PET (SUV >= 0)
    fake = gen(mri)                                                     # (B, 1, I, J, K)

    disc = PatchDiscriminator3d(in_chans=2)                             # (source, target-or-fake)
    # adversarial and perceptual losses: volfm.losses.image (adversarial_loss, PerceptualLoss3d)

- :class:`SynthesisGenerator`: a volfm encoder plus the segmentation decoders of
  :mod:`volfm.models.decoders` (U-Net for CNNs, UNETR for ViTs) with ``out_chans`` image channels
  instead of class logits; optional conditioning channels concatenated to the source; a residual
  output that makes an untrained generator the identity.
- :class:`PatchDiscriminator3d`: pix2pix's PatchGAN (Isola et al. 2017) in 3D, conditional on the
  source: one logit per overlapping patch.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from volfm import VolfmError
from volfm.models.decoders import SegmentationModel, norm_layer
from volfm.models.registry import META_KWARGS, META_NAME, create_encoder
from volfm.models.weights import (
    load_encoder_weights,
    load_state_dict_checked,
    read_encoder_metadata,
)

__all__ = [
    "SynthesisGenerator",
    "PatchDiscriminator3d",
    "adapt_input_channels",
    "ACTIVATIONS",
]

Triple = tuple[int, int, int]

ACTIVATIONS = (None, "relu", "sigmoid", "tanh")
_ACTIVATION_FNS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _encoder_in_chans(encoder: nn.Module) -> int | None:
    if hasattr(encoder, "in_chans"):
        return int(encoder.in_chans)
    kwargs = getattr(encoder, "encoder_kwargs", None)
    if isinstance(kwargs, dict):
        return int(kwargs.get("in_chans", 1))
    return None


def _output_conv(decoder: nn.Module) -> nn.Conv3d:
    """The decoder's last conv: ``head`` (UNetDecoder) or ``out`` (UNETRDecoder, a MONAI UnetOutBlock)."""
    head = getattr(decoder, "head", None)
    head = getattr(decoder, "out", None) if head is None else head
    convs = [m for m in head.modules() if isinstance(m, nn.Conv3d)] if head is not None else []
    if not convs:
        raise VolfmError(f"cannot find the output conv of {type(decoder).__name__} (no 'head' or 'out' conv); "
                         "use residual=False with this decoder")
    return convs[-1]


def adapt_input_channels(state: dict[str, torch.Tensor], model: nn.Module, *, source: str = "checkpoint"
                         ) -> dict[str, torch.Tensor]:
    """Fit an encoder state dict saved with fewer input channels to ``model`` (built with more).

    Every tensor whose shape differs from ``model``'s only in dim 1 (the stem conv / patch embedding,
    ``(out, in, *kernel)``) is widened: its ``c`` saved input channels are copied into the first ``c``
    channels and the extra ones are zero. The adapted encoder therefore computes exactly what the
    pretrained one computes on the first ``c`` channels, whatever the extra (conditioning) channels
    hold, until training gives them weight. Other tensors are returned unchanged; any other shape
    disagreement raises a VolfmError.
    """
    own = model.state_dict()
    out = dict(state)
    for key, want in own.items():
        have = state.get(key)
        if have is None or tuple(have.shape) == tuple(want.shape):
            continue
        if (have.ndim != want.ndim or have.ndim < 2 or have.shape[0] != want.shape[0]
                or have.shape[2:] != want.shape[2:] or have.shape[1] > want.shape[1]):
            raise VolfmError(f"{source}: {key} has shape {tuple(have.shape)}, the model needs {tuple(want.shape)}; "
                             "only a stem with fewer input channels (dim 1) can be adapted -- build the encoder the "
                             "checkpoint was saved from")
        widened = torch.zeros_like(want)
        widened[:, : have.shape[1]] = have.to(want.dtype)
        out[key] = widened
    return out


def _checkpoint_encoder_record(path: Path) -> tuple[str | None, dict]:
    """(registry name, kwargs) of the encoder a volfm checkpoint was saved from, (None, {}) if unrecorded."""
    if path.suffix == ".safetensors":
        meta = read_encoder_metadata(path)
        return meta.get(META_NAME), json.loads(meta.get(META_KWARGS, "{}"))
    if not path.is_file():
        raise VolfmError(f"encoder checkpoint {path} does not exist; give the path of a volfm .ckpt or an encoder "
                         ".safetensors file")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise VolfmError(f"cannot read checkpoint {path} with torch.load(weights_only=True): "
                         f"{' '.join(str(exc).split())[:300]}") from exc
    rec = ((raw.get("volfm") or {}).get("encoder") or {}) if isinstance(raw, dict) else {}
    return (rec.get("name"), dict(rec.get("kwargs") or {})) if isinstance(rec, dict) else (None, {})


class SynthesisGenerator(SegmentationModel):
    """Encoder + U-Net-style decoder mapping a source image (plus optional conditioning) to a target image.

    The decoder is :class:`~volfm.models.decoders.UNetDecoder` or
    :class:`~volfm.models.decoders.UNETRDecoder` (``decoder="auto"`` picks as
    :class:`~volfm.models.decoders.SegmentationModel`, which this class extends) with ``out_chans``
    output channels; outputs have the input's spatial size (ViT encoders need multiples of the patch
    size). Deep supervision is not offered.

    ``forward(source, cond=None)``: ``source`` is ``(B, in_chans_source, I, J, K)``; with
    ``cond_chans > 0``, ``cond`` ``(B, cond_chans, I, J, K)`` (e.g. a tissue map, a dose, a time
    point) is concatenated after the source channels, so the encoder must take
    ``in_chans_source + cond_chans`` channels (a VolfmError says so otherwise;
    :meth:`from_pretrained_encoder` widens a pretrained stem).

    Residual output: when ``residual`` and ``out_chans == in_chans_source`` the generator returns
    ``act(source + decoder(...))`` and the decoder's last conv starts at zero (weights and bias), so
    an untrained generator returns the source exactly (with ``final_activation`` None, or "relu" on
    a non-negative source) and training learns the change from source to target -- the usual way to
    start image translation between co-registered modalities. Otherwise (``residual=False`` or other
    channel counts; ``self.residual`` says which) the output is ``act(decoder(...))``. The
    activation: None (any real value), "relu" (non-negative, e.g. PET SUV), "sigmoid" ((0, 1)
    intensities) or "tanh" ((-1, 1)).

    Args:
        encoder: a volfm encoder module, or a registry name built with ``encoder_kwargs`` (its
            ``in_chans`` defaults to ``in_chans_source + cond_chans``).
        out_chans, in_chans_source, cond_chans: channels of the output, the source and the conditioning.
        residual: see above.
        decoder: "auto", "unet" or "unetr".
        final_activation: None, "relu", "sigmoid" or "tanh".
        encoder_kwargs: only with a registry name.
        decoder_kwargs: passed to the decoder (``channels``, ``norm``, ``feature_size``, ...).

    ``self.config`` holds everything needed to rebuild the generator (:meth:`from_config`) when the
    encoder came from the registry.
    """

    def __init__(self, encoder: nn.Module | str, out_chans: int = 1, in_chans_source: int = 1,
                 cond_chans: int = 0, residual: bool = True, decoder: str = "auto",
                 final_activation: str | None = None, encoder_kwargs: dict | None = None, **decoder_kwargs):
        out_chans, in_chans_source, cond_chans = int(out_chans), int(in_chans_source), int(cond_chans)
        if out_chans < 1 or in_chans_source < 1 or cond_chans < 0:
            raise VolfmError(f"SynthesisGenerator needs out_chans >= 1, in_chans_source >= 1 and cond_chans >= 0, got "
                             f"{out_chans}, {in_chans_source}, {cond_chans}")
        if final_activation == "none":
            final_activation = None
        if final_activation not in ACTIVATIONS:
            raise VolfmError(f"final_activation must be one of {ACTIVATIONS}, got {final_activation!r}")
        if "deep_supervision" in decoder_kwargs:
            raise VolfmError("SynthesisGenerator has no deep supervision; drop the deep_supervision option")
        need = in_chans_source + cond_chans
        if isinstance(encoder, str):
            kwargs = dict(encoder_kwargs or {})
            kwargs.setdefault("in_chans", need)
            encoder = create_encoder(encoder, **kwargs)
        elif encoder_kwargs:
            raise VolfmError("encoder_kwargs go with a registry name (encoder='resnet18_3d'); an encoder module is "
                             "used as it is")
        have = _encoder_in_chans(encoder)
        if have is not None and have != need:
            name = getattr(encoder, "encoder_name", type(encoder).__name__)
            raise VolfmError(
                f"encoder {name!r} takes {have} input channels, but the generator feeds in_chans_source + cond_chans "
                f"= {in_chans_source} + {cond_chans} = {need} (source channels first, then conditioning); build it "
                f"with in_chans={need}, or use SynthesisGenerator.from_pretrained_encoder, which widens a "
                f"{have}-channel pretrained stem")
        super().__init__(encoder, num_classes=out_chans, decoder=decoder, deep_supervision=False, **decoder_kwargs)
        self.out_chans, self.in_chans_source, self.cond_chans = out_chans, in_chans_source, cond_chans
        self.residual = bool(residual) and out_chans == in_chans_source
        self.final_activation = final_activation
        if self.residual:
            conv = _output_conv(self.decoder)
            nn.init.zeros_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.config = {
            "encoder": getattr(encoder, "encoder_name", None),
            "encoder_kwargs": dict(getattr(encoder, "encoder_kwargs", {})),
            "out_chans": out_chans,
            "in_chans_source": in_chans_source,
            "cond_chans": cond_chans,
            "residual": bool(residual),
            "decoder": self.decoder_name,
            "final_activation": final_activation,
            "decoder_kwargs": dict(decoder_kwargs),
        }

    @classmethod
    def from_config(cls, config: dict) -> SynthesisGenerator:
        """A fresh (untrained) generator from ``self.config`` of a generator whose encoder came from the registry."""
        cfg = dict(config)
        if not cfg.get("encoder"):
            raise VolfmError("this generator config has no encoder registry name (the encoder was not built by "
                             "create_encoder); build the encoder yourself and pass it to SynthesisGenerator")
        decoder_kwargs = cfg.pop("decoder_kwargs", None) or {}
        return cls(cfg.pop("encoder"), encoder_kwargs=cfg.pop("encoder_kwargs", None), **cfg, **decoder_kwargs)

    @classmethod
    def from_pretrained_encoder(cls, path: str | Path, encoder: str | None = None, *,
                                encoder_kwargs: dict | None = None, pretrained_in_chans: int | None = None,
                                strict: bool = True, out_chans: int = 1, in_chans_source: int = 1,
                                cond_chans: int = 0, **kwargs) -> SynthesisGenerator:
        """A generator whose encoder starts from a volfm checkpoint (encoder ``.safetensors`` or task ``.ckpt``,
        read by :func:`~volfm.models.weights.load_encoder_weights`).

        The architecture is the registry name/kwargs recorded in the checkpoint, or ``encoder`` and
        ``encoder_kwargs`` (these override the record). The checkpoint's input channels are
        ``pretrained_in_chans``, else the recorded ``in_chans``, else 1. When the generator needs
        more (``in_chans_source + cond_chans``, e.g. a 1-channel MRI encoder conditioned on a
        tissue map), the stem (conv1 / patch embedding) is widened by
        :func:`adapt_input_channels`: pretrained weights on the first channels, zeros on the extra
        ones, so at the start the encoder sees only the source exactly as pretrained. Fewer
        channels than the checkpoint's is an error. ``kwargs`` go to the constructor
        (``residual``, ``decoder``, ``final_activation``, decoder options).
        """
        path = Path(path)
        saved_name, saved_kwargs = _checkpoint_encoder_record(path)
        name = encoder or saved_name
        if not name:
            raise VolfmError(f"{path} records no encoder name; pass encoder='resnet50_3d' (the registry name it was "
                             "saved from) and its encoder_kwargs")
        pre_in = int(pretrained_in_chans if pretrained_in_chans is not None else saved_kwargs.get("in_chans", 1))
        need = int(in_chans_source) + int(cond_chans)
        if pre_in > need:
            raise VolfmError(f"{path} holds a {pre_in}-channel encoder but the generator feeds {need} channels "
                             f"(in_chans_source={in_chans_source}, cond_chans={cond_chans}); dropping pretrained input "
                             "channels is not supported -- feed all of them")
        base = {**saved_kwargs, **(encoder_kwargs or {})}
        pretrained = create_encoder(name, **{**base, "in_chans": pre_in})
        load_encoder_weights(pretrained, path, strict=strict)
        if pre_in == need:
            enc = pretrained
        else:
            enc = create_encoder(name, **{**base, "in_chans": need})
            state = adapt_input_channels(pretrained.state_dict(), enc, source=str(path))
            load_state_dict_checked(enc, state, source=f"{path} (stem widened {pre_in} -> {need} channels)",
                                    strict=True)
        return cls(enc, out_chans=out_chans, in_chans_source=in_chans_source, cond_chans=cond_chans, **kwargs)

    def _input(self, source: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if source.ndim != 5 or source.shape[1] != self.in_chans_source:
            raise VolfmError(f"SynthesisGenerator expects a source (B, {self.in_chans_source}, I, J, K), got shape "
                             f"{tuple(source.shape)}")
        if self.cond_chans == 0:
            if cond is not None:
                raise VolfmError("this generator was built with cond_chans=0 but got a cond tensor; build it with "
                                 "cond_chans=<channels> (and an encoder taking source + cond channels)")
            return source
        if cond is None:
            raise VolfmError(f"this generator is conditioned on {self.cond_chans} channel(s): call it as "
                             "generator(source, cond)")
        want = (source.shape[0], self.cond_chans, *source.shape[2:])
        if tuple(cond.shape) != want:
            raise VolfmError(f"cond has shape {tuple(cond.shape)}, expected {want} (the source's batch and spatial "
                             f"size, {self.cond_chans} channel(s))")
        return torch.cat([source, cond.to(source.dtype)], dim=1)

    def forward(self, source: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self._input(source, cond)
        out = self.decoder(self.encoder.forward_intermediates(x), x)
        if self.residual:
            out = source + out
        if self.final_activation is not None:
            out = _ACTIVATION_FNS[self.final_activation](out)
        return out


class PatchDiscriminator3d(nn.Module):
    """pix2pix's N-layer PatchGAN discriminator in 3D: a map of real/fake logits, one per overlapping patch.

    Layers (as pix2pix's ``NLayerDiscriminator``, all kernels 4, padding 1): a stride-2 conv to
    ``base_channels`` + LeakyReLU(0.2) (no norm), ``n_layers - 1`` more stride-2 conv-norm-LeakyReLU
    blocks doubling the width (capped at 8x base), a stride-1 conv-norm-LeakyReLU block, and a
    stride-1 conv to 1 channel. Each logit sees a cube of :meth:`receptive_field` voxels (70 for
    ``n_layers=3``, pix2pix's "70x70 PatchGAN"); "instance" norm adds global per-volume statistics
    on top (as in pix2pix). Output size per axis: ``floor(n / 2**n_layers) - 2``
    (:meth:`output_size`), so inputs need at least ``3 * 2**n_layers`` voxels per axis.

    Conditional GAN: feed the concatenation ``(source, target)`` for real pairs and ``(source,
    fake)`` for generated ones, so the discriminator judges whether the target fits *this* source;
    ``in_chans`` is the sum of both. ``disc(source, image)`` concatenates for you; ``disc(x)``
    takes the concatenation.

    Args:
        in_chans: input channels (source + target channels for a conditional GAN).
        base_channels: width of the first conv (64 in pix2pix; 32 default here for 3D memory).
        n_layers: stride-2 convs (3 as pix2pix).
        norm: "instance" (affine, as volfm's decoders; pix2pix's is not), "batch", "none" or a MONAI
            norm spec (the first and last conv have none).
        spectral_norm: wrap every conv in spectral normalisation (Miyato et al. 2018), which
            stabilises hinge-loss training; often used with ``norm="none"``.
    """

    def __init__(self, in_chans: int, base_channels: int = 32, n_layers: int = 3,
                 norm: str | tuple | None = "instance", spectral_norm: bool = False):
        super().__init__()
        if int(in_chans) < 1 or int(base_channels) < 1 or int(n_layers) < 1:
            raise VolfmError(f"PatchDiscriminator3d needs in_chans, base_channels and n_layers >= 1, got {in_chans}, "
                             f"{base_channels}, {n_layers}")
        self.in_chans, self.base_channels, self.n_layers = int(in_chans), int(base_channels), int(n_layers)
        self.spectral_norm = bool(spectral_norm)
        use_norm = norm not in (None, "none")
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        w = self.base_channels

        def conv(cin: int, cout: int, stride: int, bias: bool) -> nn.Module:
            return wrap(nn.Conv3d(cin, cout, kernel_size=4, stride=stride, padding=1, bias=bias))

        layers: list[nn.Module] = [conv(self.in_chans, w, 2, True), nn.LeakyReLU(0.2, inplace=True)]
        self._specs: list[tuple[int, int]] = [(4, 2)]  # (kernel, stride) of each conv, for the receptive field
        mult = 1
        for n in range(1, self.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            # A bias before a norm that subtracts the mean is redundant.
            layers += [conv(w * prev, w * mult, stride, not use_norm), norm_layer(norm, w * mult),
                       nn.LeakyReLU(0.2, inplace=True)]
            self._specs.append((4, stride))
        layers.append(conv(w * mult, 1, 1, True))
        self._specs.append((4, 1))
        self.model = nn.Sequential(*layers)

    def receptive_field(self) -> Triple:
        """Voxels per (I, J, K) axis that one output logit depends on through the convs:
        ``r = 1; for (k, s) in reversed(convs): r = (r - 1) * s + k``."""
        r = 1
        for k, s in reversed(self._specs):
            r = (r - 1) * s + k
        return (r, r, r)

    def output_size(self, size: Sequence[int]) -> Triple:
        """Spatial size of the logit map for an input of spatial size ``size``."""
        out = []
        for n in size:
            n = int(n)
            for k, s in self._specs:
                n = (n + 2 - k) // s + 1
            out.append(n)
        return tuple(out)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, 1, *output_size)`` for ``x`` = the concatenation ``(source, target-or-fake)``,
        or for ``cat(x, image)`` when ``image`` is given."""
        if image is not None:
            x = torch.cat([x, image.to(x.dtype)], dim=1)
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise VolfmError(f"PatchDiscriminator3d expects (B, {self.in_chans}, I, J, K) -- the source and the target "
                             f"(or fake) concatenated on channels -- got shape {tuple(x.shape)}")
        if min(self.output_size(x.shape[2:])) < 1:
            raise VolfmError(f"input spatial size {tuple(x.shape[2:])} is too small for a {self.n_layers}-layer "
                             f"PatchDiscriminator3d (needs >= {3 * 2**self.n_layers} voxels per axis); use fewer "
                             "n_layers or bigger patches")
        return self.model(x)
