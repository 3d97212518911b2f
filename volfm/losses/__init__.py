"""volfm.losses: every training loss in one place.

- ``contrastive``: symmetric InfoNCE across DDP ranks (gradient-carrying all-gather, learnable temperature).
- ``multilabel``: masked BCE / focal loss for ICD codes, positive weights from counts.
- ``image``: adversarial (LSGAN, hinge, BCE) and perceptual losses for synthesis.
"""
from volfm.losses.contrastive import (
           ContrastiveLogits,
           LogitScale,
           contrastive_logits,
           contrastive_loss,
           gather_with_grad,
)
from volfm.losses.image import ADVERSARIAL_KINDS, PerceptualLoss3d, adversarial_loss
from volfm.losses.multilabel import multilabel_loss, pos_weight_from_counts

__all__ = ["ADVERSARIAL_KINDS", "ContrastiveLogits", "LogitScale", "PerceptualLoss3d", "adversarial_loss",
           "contrastive_logits", "contrastive_loss", "gather_with_grad", "multilabel_loss", "pos_weight_from_counts"]
