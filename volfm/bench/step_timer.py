"""StepTimer: where a training step's time goes, data or compute (used by `volfm bench gpu`)."""
from __future__ import annotations

import time

import lightning.pytorch as pl
import torch


class StepTimer(pl.Callback):
    """Per optimiser step: the time waiting for the batch (from the previous step's end to this one's start: the
    loader; Lightning's copy of a pinned batch to the device is asynchronous, so it lands in the step's time) and
    the time computing (start to end, with the device synchronised when
    ``sync``), after ``warmup`` untimed steps; the peak-memory counter is reset when timing starts. ``loss_finite``
    turns False if any step's loss is NaN or infinite."""

    def __init__(self, warmup: int = 5, sync: bool = True):
        self.warmup, self.sync = int(warmup), bool(sync)
        self.steps: list[tuple[float, float]] = []  # (data wait s, compute s) of each timed step
        self.loss_finite = True
        self._prev_end: float | None = None
        self._start = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._seen == self.warmup and self.sync:
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sync:
            torch.cuda.synchronize()
        end = time.perf_counter()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss).detach()).all()):
            self.loss_finite = False
        if self._seen >= self.warmup and self._prev_end is not None:
            self.steps.append((self._start - self._prev_end, end - self._start))
        self._prev_end = end
        self._seen += 1
