"""Encoder registry (timm-style): build encoders by name.

    @register_encoder("resnet50_3d")
    def resnet50_3d(**kwargs): ...

    model = create_encoder("resnet50_3d", in_chans=1)

Saving and loading weights (safetensors, task checkpoints, LoRA merging) is :mod:`volfm.models.weights`.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from volfm import VolfmError
from volfm.utils import did_you_mean

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}

# Keys of the safetensors metadata written by save_encoder.
META_NAME = "volfm.encoder"
META_KWARGS = "volfm.encoder_kwargs"


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``fn(**kwargs) -> nn.Module`` under ``name``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ENCODERS and _ENCODERS[name] is not fn:
            raise VolfmError(f"encoder {name!r} is registered twice; give the new one another name")
        _ENCODERS[name] = fn
        return fn

    return decorator


def list_encoders() -> list[str]:
    """Names of all registered encoders, sorted."""
    return sorted(_ENCODERS)


def _unknown_name_error(name: str) -> VolfmError:
    hint = did_you_mean(name, list_encoders(), n=3, template=" Did you mean {}?")
    return VolfmError(f"unknown encoder {name!r}.{hint} Registered encoders: {', '.join(list_encoders())}")


def create_encoder(name: str, **kwargs) -> nn.Module:
    """Build the encoder registered as ``name``; ``kwargs`` go to its factory (e.g. ``in_chans=1``).

    The name and kwargs are remembered on the model (``encoder_name``, ``encoder_kwargs``) so that
    :func:`save_encoder` can write them next to the weights.
    """
    if name not in _ENCODERS:
        raise _unknown_name_error(name)
    model = _ENCODERS[name](**kwargs)
    model.encoder_name = name
    model.encoder_kwargs = dict(kwargs)
    return model
