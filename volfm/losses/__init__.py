"""volfm.losses: every training loss in one place.

- ``contrastive``: symmetric InfoNCE across DDP ranks (gradient-carrying all-gather, learnable temperature).
- ``multilabel``: masked BCE / focal loss for ICD codes, positive weights from counts.
- ``image``: adversarial (LSGAN, hinge, BCE) and perceptual losses for synthesis.
- ``reconstruction``: masked-voxel and masked-token MSE for masked-image pretraining.
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
from volfm.losses.reconstruction import masked_mse, masked_token_mse, normalize_patches

__all__ = ["ADVERSARIAL_KINDS", "ContrastiveLogits", "LogitScale", "PerceptualLoss3d", "adversarial_loss",
           "contrastive_logits", "contrastive_loss", "gather_with_grad", "masked_mse", "masked_token_mse", "multilabel_loss",
           "normalize_patches", "pos_weight_from_counts"]
