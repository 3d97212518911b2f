"""Sliding-window inference of a task's network over one whole stored volume (validation, test, predict)."""
from __future__ import annotations

import numpy as np
import torch

from volfm.inference.sliding_window import SlidingWindowInferer


@torch.no_grad()
def sliding_window(task, net, image, patch_size=None) -> torch.Tensor:
    """``net``'s output (C_out, I, J, K) over ``image`` (C, I, J, K), windows of ``patch_size`` (default the
    DataModule's training patch size, else the whole volume), with the task's ``sw_overlap`` and
    ``sw_batch_size``; the task is put in eval mode for the call and restored after."""
    dm_patch = None
    if task._trainer is not None and getattr(task.trainer, "datamodule", None) is not None:
        dm_patch = task.trainer.datamodule.hparams.get("patch_size")
    patch = tuple(patch_size or dm_patch or np.asarray(image).shape[-3:])
    inferer = SlidingWindowInferer(patch, overlap=task.hparams.sw_overlap, batch_size=task.hparams.sw_batch_size,
                                   device=task.device)
    was_training = task.training
    task.eval()
    try:
        return inferer(np.asarray(image, dtype=np.float32), net)
    finally:
        task.train(was_training)
