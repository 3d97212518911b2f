"""Merlin's released checkpoints as volfm weights.

Merlin (Blankemeier et al., StanfordMIMI/Merlin, MIT licence) publishes a flat ``torch.save`` state dict of its
``MerlinArchitecture``: the image encoder under ``encode_image.i3_resnet.`` with torchvision ResNet-152 names
(``conv1``, ``bn1.*``, ``layerN.M.{conv1..3, bn1..3, downsample.0/1}``), a 1x1x1 ``classifier`` (2048 -> 1692
phenotypes) and ``contrastive_head`` (2048 -> 512); the text tower under ``encode_text.text_encoder.``
(Clinical-Longformer), its ``encode_text.linear_layer`` (768 -> 512) and ``logit_scale``. The five-year
prediction checkpoint holds the same I3ResNet with bare keys and a 6-output classifier.

Merlin permutes its input ``(B, 1, X, Y, Z)`` to ``(B, 1, Z, X, Y)`` and copies the channel three times; its
kernels are ``(out, in, kT, kH, kW)`` with T = Z. volfm's ``resnet152_3d`` convolves ``(B, 1, I, J, K)`` with
``(out, in, kI, kJ, kK)`` and otherwise has the same layers (stem (7,7,3) stride (2,2,1), max-pool stride 2 on every
axis, strided 3x3x3 conv2 and 1x1x1 downsample on every axis), so the conversion is:

- every 5-D kernel ``w.permute(0, 1, 3, 4, 2)`` (1x1x1 and 3x3x3 kernels have the same shape in both layouts, so a
  converter that forgets the permute loads without complaint and computes something else: tests compare against
  a reference written from Merlin's layout);
- the stem summed over its three input channels (exactly the replicated grey input, by linearity);
- BatchNorm tensors copied; the heads' 1x1x1 kernels flattened to ``nn.Linear`` weights.

The conversion is strict: every volfm key must come from the checkpoint, and a key it does not know is an error
naming it.

    w = convert_merlin_state(read_merlin_state("merlin.pt"))   # MerlinWeights
    enc = merlin_encoder("merlin.pt")                            # a volfm resnet152_3d with Merlin's weights
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from volfm import VolfmError
from volfm.models.registry import create_encoder
from volfm.models.resnet3d import RESNET_DEPTHS, Bottleneck3d
from volfm.models.weights import load_state_dict_checked, read_checkpoint

__all__ = ["MERLIN_ENCODER_KWARGS", "MERLIN_IMAGE_PREFIX", "MERLIN_TEXT_PREFIX", "MERLIN_TEXT_PROJ_PREFIX",
           "MerlinWeights", "convert_merlin_state", "merlin_conv_to_volfm", "merlin_encoder", "merlin_weights",
           "read_merlin_state"]

MERLIN_IMAGE_PREFIX = "encode_image.i3_resnet."
MERLIN_TEXT_PREFIX = "encode_text.text_encoder."
MERLIN_TEXT_PROJ_PREFIX = "encode_text.linear_layer."
# the kwargs that give resnet{50,101,152}_3d Merlin's geometry (they are also the defaults; stated so that the
# converted file's metadata keeps them whatever the defaults become)
MERLIN_ENCODER_KWARGS = {"in_chans": 1, "time_kernel": 3, "pool_time_stride": 2, "base_channels": 64, "norm": "batch"}
_HEADS = ("classifier.", "contrastive_head.")
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def merlin_conv_to_volfm(w: torch.Tensor) -> torch.Tensor:
    """A Merlin conv kernel ``(O, I, kT, kH, kW)`` (T = the superior axis) as volfm's ``(O, I, kI, kJ, kK)``."""
    if w.ndim != 5:
        raise VolfmError(f"expected a 5-D Conv3d kernel, got shape {tuple(w.shape)}")
    return w.permute(0, 1, 3, 4, 2).contiguous()


@dataclass
class MerlinWeights:
    """A Merlin checkpoint in volfm's names: ``encoder`` (a ``resnet{depth}_3d`` state dict), the heads as
    ``nn.Linear`` tensors (``classifier``: phenotype logits; ``contrastive_head``: the 512-d image embedding), the
    text tower's Hugging Face state dict (``text``), its projection (``text_proj``) and ``logit_scale``; ``layout``
    is "merlin" (``encode_image.i3_resnet.`` keys) or "bare" (the five-year checkpoint)."""

    encoder: dict[str, torch.Tensor]
    depth: int
    layout: str
    source: str = ""
    classifier: dict[str, torch.Tensor] = field(default_factory=dict)
    contrastive_head: dict[str, torch.Tensor] = field(default_factory=dict)
    text: dict[str, torch.Tensor] = field(default_factory=dict)
    text_proj: dict[str, torch.Tensor] = field(default_factory=dict)
    logit_scale: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def encoder_name(self) -> str:
        return f"resnet{self.depth}_3d"

    @property
    def num_classes(self) -> int:
        return int(self.classifier["weight"].shape[0]) if self.classifier else 0

    def task_heads(self) -> dict[str, torch.Tensor]:
        """The heads under the names a volfm ``PretrainTask`` gives them: ``icd_head.1.*`` (the classifier),
        ``image_proj.net.*`` (the contrastive head), ``text_proj.net.*`` (the text projection) and
        ``logit_scale.log_scale`` (copied as volfm's log scale, assuming CLIP's convention: Merlin's training loss is
        not public)."""
        out = {f"icd_head.1.{k}": v for k, v in self.classifier.items()}
        out.update({f"image_proj.net.{k}": v for k, v in self.contrastive_head.items()})
        out.update({f"text_proj.net.{k}": v for k, v in self.text_proj.items()})
        if self.logit_scale is not None:
            out["logit_scale.log_scale"] = self.logit_scale.reshape(())
        return out

    def build_encoder(self) -> nn.Module:
        """A volfm encoder with these weights (strictly loaded, in their floating dtype), in eval mode."""
        model = create_encoder(self.encoder_name, **MERLIN_ENCODER_KWARGS).to(self.encoder["conv1.weight"].dtype)
        load_state_dict_checked(model, self.encoder, source=f"{self.source} (converted from Merlin)", strict=True)
        return model.eval()


def read_merlin_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Merlin ``.pt`` file, read with ``torch.load(weights_only=True)`` (no pickled code runs);
    a ``{"state_dict": ...}`` wrapper and DataParallel's ``module.`` prefix are removed."""
    path = Path(path)
    if not path.is_file():
        raise VolfmError(f"Merlin checkpoint {path} does not exist; download Merlin's weights (Hugging Face "
                         "stanfordmimi/Merlin) on a machine with network and give the local .pt path")
    raw = read_checkpoint(path)
    state = raw
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        state = raw["state_dict"]
    if not isinstance(state, dict) or not state:
        raise VolfmError(f"{path} is not a Merlin checkpoint: expected a state dict (name -> tensor), got "
                         f"{type(raw).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise VolfmError(f"{path} is not a Merlin state dict: entry {bad[0]!r} is not a named tensor; give the .pt "
                         "file Merlin's load.py reads (a flat torch.save state dict)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _layer_counts(keys, source: str) -> tuple[int, int]:
    """(depth, blocks per stage) from the ``layerN.M.`` keys of an I3ResNet state dict."""
    counts = [0, 0, 0, 0]
    for k in keys:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            counts[int(m.group(1)) - 1] = max(counts[int(m.group(1)) - 1], int(m.group(2)) + 1)
    for depth, (block, layers) in RESNET_DEPTHS.items():
        if tuple(counts) == tuple(layers) and block is Bottleneck3d:
            return depth, counts
    raise VolfmError(f"{source}: the image encoder has {counts} blocks per stage, which is no bottleneck ResNet "
                     "(Merlin's is ResNet-152: [3, 8, 36, 3]); is this a Merlin checkpoint?")


def convert_merlin_state(state: dict[str, torch.Tensor], source: str = "the checkpoint") -> MerlinWeights:
    """Map a Merlin state dict (full ``MerlinArchitecture`` or the bare I3ResNet) to volfm's names; strict."""
    if any(k.startswith(MERLIN_IMAGE_PREFIX) for k in state):
        layout, prefix = "merlin", MERLIN_IMAGE_PREFIX
    elif "conv1.weight" in state and any(k.startswith("layer4.") for k in state):
        layout, prefix = "bare", ""
    else:
        first = ", ".join(sorted(state)[:5])
        raise VolfmError(f"{source} is not a Merlin checkpoint: no '{MERLIN_IMAGE_PREFIX}*' keys and no bare "
                         f"I3ResNet keys (conv1.weight, layer1-4.*); first keys: {first}")
    image = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)} if prefix else {}
    depth, _ = _layer_counts(image, source)
    out = MerlinWeights(encoder={}, depth=depth, layout=layout, source=str(source))
    own = create_encoder(f"resnet{depth}_3d", **MERLIN_ENCODER_KWARGS).state_dict()
    for key, ref in own.items():
        if key in image:
            w = image[key]
        elif key.endswith(".num_batches_tracked"):  # a save from a torch that did not track them
            w = torch.zeros((), dtype=torch.long)
            if not out.notes or "num_batches_tracked" not in out.notes[-1]:
                out.notes.append("num_batches_tracked missing (filled with 0)")
        else:
            raise VolfmError(f"{source}: Merlin key '{prefix}{key}' is missing (volfm's {key}); the file is "
                             "truncated or not a Merlin I3ResNet checkpoint")
        if key == "conv1.weight":
            if w.ndim != 5 or w.shape[1] not in (1, 3):
                raise VolfmError(f"{source}: '{prefix}conv1.weight' has shape {tuple(w.shape)}; Merlin's stem is "
                                 "(64, 3, 3, 7, 7)")
            w = w.sum(dim=1, keepdim=True)  # the grey volume Merlin copies into 3 channels: same output
        if w.ndim == 5:
            w = merlin_conv_to_volfm(w)
        if tuple(w.shape) != tuple(ref.shape):
            raise VolfmError(f"{source}: '{prefix}{key}' has shape {tuple(image[key].shape)}, which does not give "
                             f"volfm's {tuple(ref.shape)} after the axis permute; not Merlin's layout")
        out.encoder[key] = w.contiguous()
    for name in ("classifier", "contrastive_head"):
        head = {t: image[f"{name}.{t}"] for t in ("weight", "bias") if f"{name}.{t}" in image}
        if head:
            if set(head) != {"weight", "bias"} or head["weight"].ndim not in (2, 5):
                raise VolfmError(f"{source}: '{prefix}{name}' is incomplete or not a 1x1x1 Conv3d / Linear "
                                 f"({ {k: tuple(v.shape) for k, v in head.items()} })")
            head["weight"] = head["weight"].reshape(head["weight"].shape[0], -1).contiguous()
            if head["weight"].shape[1] != own["layer4.0.bn3.weight"].shape[0]:
                raise VolfmError(f"{source}: '{prefix}{name}.weight' takes {head['weight'].shape[1]} features, "
                                 f"the encoder gives {own['layer4.0.bn3.weight'].shape[0]}")
            setattr(out, name, head)
    known = set(own) | {f"{h}{t}" for h in _HEADS for t in ("weight", "bias")}
    unknown = sorted(k for k in image if k not in known)
    if unknown:
        raise VolfmError(f"{source}: unknown Merlin image key '{prefix}{unknown[0]}'"
                         f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; this converter knows "
                         "Merlin's I3ResNet (conv1, bn1, layer1-4, classifier, contrastive_head) only")
    out.text = {k[len(MERLIN_TEXT_PREFIX):]: v for k, v in rest.items() if k.startswith(MERLIN_TEXT_PREFIX)}
    out.text_proj = {k[len(MERLIN_TEXT_PROJ_PREFIX):]: v for k, v in rest.items()
                     if k.startswith(MERLIN_TEXT_PROJ_PREFIX)}
    if out.text_proj and set(out.text_proj) != {"weight", "bias"}:
        raise VolfmError(f"{source}: '{MERLIN_TEXT_PROJ_PREFIX}*' should be a Linear's weight and bias, got "
                         f"{sorted(out.text_proj)}")
    out.logit_scale = rest.get("logit_scale")
    unknown = sorted(k for k in rest if not k.startswith((MERLIN_TEXT_PREFIX, MERLIN_TEXT_PROJ_PREFIX))
                     and k != "logit_scale")
    if unknown:
        raise VolfmError(f"{source}: unknown Merlin key '{unknown[0]}'"
                         f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; this converter knows "
                         "encode_image.i3_resnet.*, encode_text.text_encoder.*, encode_text.linear_layer.* and "
                         "logit_scale")
    return out


def merlin_weights(path: str | Path) -> MerlinWeights:
    """A Merlin ``.pt`` file read (:func:`read_merlin_state`) and converted (:func:`convert_merlin_state`)."""
    return convert_merlin_state(read_merlin_state(path), source=str(path))


def merlin_encoder(path: str | Path) -> nn.Module:
    """The image encoder of a Merlin ``.pt`` file as a volfm ``resnet152_3d`` (eval mode)."""
    return merlin_weights(path).build_encoder()
