"""What ``encoder.pretrained`` / ``decoder.pretrained`` accept, in one place:

- a volfm task checkpoint (``.ckpt``) or an encoder ``.safetensors`` (:mod:`volfm.models.weights`);
- a model package folder written by ``volfm export`` or ``volfm convert`` (:mod:`volfm.models.package`; every file's
  sha256 is checked before anything is loaded);
- ``merlin:PATH``: Merlin's released ``.pt``, converted on the fly (:mod:`volfm.models.merlin`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from volfm import VolfmError
from volfm.models.merlin import MERLIN_ENCODER_KWARGS, merlin_weights
from volfm.models.package import is_package, read_package
from volfm.models.weights import (
    DECODER_HEADS,
    load_decoder_state,
    load_decoder_weights,
    load_encoder_weights,
    load_state_dict_checked,
    load_task_encoder,
)

__all__ = ["MERLIN_SCHEME", "PROJECTION_PREFIXES", "load_pretrained_decoder", "load_pretrained_encoder",
           "merlin_path", "pretrained_projections"]

MERLIN_SCHEME = "merlin:"
# the report-contrastive heads a pretraining run can continue from (task state-dict prefixes)
PROJECTION_PREFIXES = ("image_proj.", "text_proj.", "logit_scale.")


def merlin_path(source: str | Path) -> Path | None:
    """The file of a ``merlin:PATH`` source (None for any other source)."""
    text = str(source)
    return Path(text[len(MERLIN_SCHEME):]).expanduser() if text.startswith(MERLIN_SCHEME) else None


def load_pretrained_encoder(model: nn.Module, source: str | Path, *, strict: bool = True) -> nn.Module:
    """Load encoder weights from any source ``pretrained:`` accepts (see the module docstring) into ``model``."""
    text = str(source)
    path = merlin_path(source)
    if path is not None:
        weights = merlin_weights(path)
        name = getattr(model, "encoder_name", None)
        if name is not None and name != weights.encoder_name:
            raise VolfmError(f"pretrained: {text} is Merlin's {weights.encoder_name} but the encoder is {name!r}; set "
                             f"encoder.name: {weights.encoder_name} (kwargs in_chans 1, time_kernel 3, pool_time_stride 2)")
        kwargs = dict(getattr(model, "encoder_kwargs", None) or {})
        other = {k: kwargs[k] for k, v in MERLIN_ENCODER_KWARGS.items() if k in kwargs and kwargs[k] != v}
        if other:  # e.g. pool_time_stride 1 takes the weights and computes something else
            raise VolfmError(f"pretrained: {text}: Merlin's encoder is built with {MERLIN_ENCODER_KWARGS}, this one with "
                             f"{other}; drop those encoder kwargs")
        return load_state_dict_checked(model, weights.encoder, source=f"{path} (Merlin, converted)", strict=strict)
    path = Path(text).expanduser()
    if is_package(path):
        doc, state = read_package(path)
        return load_task_encoder(model, state, doc.get("hyper_parameters") or {}, doc["record"],
                                 source=f"{path} (model package)", strict=strict)
    if path.is_dir():
        raise VolfmError(f"pretrained: {path} is a folder without model.yaml; give a model package (volfm export / "
                         "volfm convert), a volfm .ckpt, an encoder .safetensors or merlin:PATH")
    return load_encoder_weights(model, path, strict=strict)


def load_pretrained_decoder(decoder: nn.Module, source: str | Path, *,
                            skip: tuple[str, ...] = DECODER_HEADS) -> nn.Module:
    """Load a pretrained dense decoder (all but its output layers) from a ``.ckpt``, a ``decoder.safetensors`` or a
    model package folder."""
    path = Path(str(source)).expanduser()
    if is_package(path):
        _, state = read_package(path)
        dec = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
        return load_decoder_state(decoder, dec, source=f"{path} (model package)", skip=skip)
    return load_decoder_weights(decoder, path, skip=skip)


def pretrained_projections(source: str | Path | None) -> dict[str, torch.Tensor]:
    """The report-contrastive heads (``image_proj.*``, ``text_proj.*``, ``logit_scale.*``, task state-dict names) that
    a ``pretrained`` source carries: a model package's, or Merlin's contrastive head, text projection and logit
    scale; empty for other sources (a .ckpt or .safetensors carries the encoder only as far as pretrained: goes)."""
    if not source:
        return {}
    path = merlin_path(source)
    if path is not None:
        heads = merlin_weights(path).task_heads()
        return {k: v for k, v in heads.items() if k.startswith(PROJECTION_PREFIXES)}
    path = Path(str(source)).expanduser()
    if is_package(path):
        _, state = read_package(path)
        return {k: v for k, v in state.items() if k.startswith(PROJECTION_PREFIXES)}
    return {}
