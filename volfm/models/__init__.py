"""volfm.models: encoders behind one interface, built by name (see DESIGN.md)."""
from volfm.models.registry import (create_encoder, list_encoders, load_encoder, load_encoder_weights, register_encoder,
                                   save_encoder)
from volfm.models.resnet3d import ResNet3d, inflate_resnet2d_state_dict, resnet3d_from_2d  # registers resnet*_3d
from volfm.models.vit3d import ViT3d  # registers vit_*_3d

__all__ = [
    "create_encoder",
    "list_encoders",
    "load_encoder",
    "load_encoder_weights",
    "register_encoder",
    "save_encoder",
    "ResNet3d",
    "inflate_resnet2d_state_dict",
    "resnet3d_from_2d",
]
