"""volfm.models: encoders behind one interface, built by name (``registry``), their weights (``weights``),
decoders, heads, the text tower and synthesis networks (see docs/ARCHITECTURE.md)."""
from volfm.models.registry import create_encoder, list_encoders, register_encoder
from volfm.models.resnet3d import (  # registers resnet*_3d
    ResNet3d,
    inflate_resnet2d_state_dict,
    resnet3d_from_2d,
)
from volfm.models.vit3d import ViT3d  # registers vit_*_3d
from volfm.models.weights import (
    load_encoder,
    load_encoder_weights,
    read_checkpoint,
    save_encoder,
)

__all__ = [
    "ResNet3d",
    "ViT3d",
    "create_encoder",
    "inflate_resnet2d_state_dict",
    "list_encoders",
    "load_encoder",
    "load_encoder_weights",
    "read_checkpoint",
    "register_encoder",
    "save_encoder", "resnet3d_from_2d",
]
