"""Small heads on pooled encoder features: multi-label classification and projection to a joint space."""
from __future__ import annotations

from torch import nn


class MultiLabelHead(nn.Sequential):
    """Dropout + linear: (B, in_features) -> (B, num_classes) logits (Merlin's phenotype head)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
        self.in_features, self.num_classes = int(in_features), int(num_classes)


class ProjectionHead(nn.Module):
    """(B, in_features) -> (B, embed_dim): linear (as Merlin and CLIP), or a 2-layer MLP with GELU."""

    def __init__(self, in_features: int, embed_dim: int = 512, kind: str = "linear"):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"projection kind must be 'linear' or 'mlp', got {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.net = nn.Linear(in_features, embed_dim)
        else:
            self.net = nn.Sequential(nn.Linear(in_features, in_features), nn.GELU(), nn.Linear(in_features, embed_dim))

    def forward(self, x):
        return self.net(x)
