"""AdamW with per-parameter learning rates and a step-wise warm-up + decay schedule, shared by the tasks."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup_decay(total: int, warm: int = 0, decay: str = "cosine") -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over ``warm`` steps, then ``cosine`` to 0 or ``poly``
    (nnU-Net's (1 - t)^0.9) over the remaining ``total - warm`` steps."""
    if decay not in ("cosine", "poly"):
        raise ValueError(f"decay must be 'cosine' or 'poly', got {decay!r}")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * t)) if decay == "cosine" else max(0.0, 1.0 - t) ** 0.9

    return factor


def adamw_warmup_decay(module: torch.nn.Module, lr_of: Callable[[str, torch.nn.Parameter], float],
                       weight_decay: float, warmup_fraction: float, decay: str) -> dict:
    """Lightning's ``configure_optimizers`` dict: trainable parameters grouped by their learning rate
    (``lr_of(name, param)``), no weight decay on biases, norms and scalars (ndim <= 1), and the
    :func:`warmup_decay` schedule stepped every optimiser step over the trainer's estimated steps."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups.setdefault((lr_of(name, p), p.ndim <= 1), []).append(p)
    params = [{"params": ps, "lr": lr, "weight_decay": 0.0 if no_decay else weight_decay}
              for (lr, no_decay), ps in groups.items()]
    opt = torch.optim.AdamW(params, weight_decay=weight_decay)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(total, int(round(warmup_fraction * total)), decay))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
