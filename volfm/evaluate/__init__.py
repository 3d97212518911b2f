"""volfm.evaluate: the checkpoint protocols behind ``volfm evaluate``.

:func:`evaluate` reads a checkpoint once and runs the protocol of its task: pretraining (``pretrain``: ICD head,
linear probe, retrieval, zero-shot findings, subgroups) or synthesis (``synthesis``: MAE/PSNR/SSIM next to the
identity and mean-image baselines, clean and with degraded inputs).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from volfm import VolfmError
from volfm.evaluate.pretrain import evaluate_pretraining
from volfm.evaluate.synthesis import evaluate_synthesis
from volfm.tasks import PretrainTask, SynthesisTask, load_task

__all__ = ["evaluate", "evaluate_pretraining", "evaluate_synthesis"]


def evaluate(ckpt: str | Path, *, store: str | Path | None = None, split: str = "test", train_split: str = "train",
             subgroups: Sequence[str] = (), prompts: str | None = None, degradations: str | None = None,
             out: str | Path | None = None, batch_size: int = 4, num_workers: int = 2, device: str | None = None,
             progress: bool = True) -> dict:
    """Evaluate the volfm checkpoint ``ckpt`` on ``split`` of ``store`` (default: the store it was trained on)
    with its task's protocol; returns the report (also written into ``out`` when given)."""
    task, raw = load_task(ckpt, "a .ckpt written by volfm fit (pretraining or synthesis)")
    if isinstance(task, SynthesisTask):
        return evaluate_synthesis(task, raw, ckpt, store=store, split=split, degradations=degradations, out=out,
                                  device=device, progress=progress)
    if isinstance(task, PretrainTask):
        return evaluate_pretraining(task, raw, ckpt, store=store, split=split, train_split=train_split,
                                    subgroups=subgroups, prompts=prompts, out=out, batch_size=batch_size,
                                    num_workers=num_workers, device=device, progress=progress)
    raise VolfmError(f"{ckpt} holds a {type(task).__name__}; volfm evaluate takes pretraining or synthesis "
                     "checkpoints (segmentation checkpoints are scored by volfm test)")
