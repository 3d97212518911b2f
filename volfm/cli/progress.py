"""Lightning progress for logs: :class:`LineProgressBar` prints whole lines, never carriage returns.

Lightning's own bars (TQDM, or Rich when it is installed) redraw one line with ``\\r``, which turns
``volfm fit ... > log 2>&1`` into one huge line of frames. :class:`~volfm.cli.lightning.VolfmCLI` puts a
:class:`LineProgressBar` in their place when stderr is not a terminal (:func:`line_progress_wanted`); on a terminal
Lightning's bar stays. The lines come from :class:`volfm.utils.LineProgress` (the progress display of every room):

- ``epoch 3/9: 120/480 batch, 30.0 s`` at most every ``every_s`` seconds within an epoch (no lines per fraction:
  short epochs would flood a log), and ``epoch 3/9: 480/480 batch in 121.4 s`` when it ends;
- ``epoch 3/9: step 1920; train_loss 0.412, val_loss 0.388`` after each epoch: the global step and the metrics
  logged with ``prog_bar=True`` (validation included, which runs before the epoch ends);
- ``validation: 12/12 batch in 40.2 s`` (also ``test``, ``predict``) for each evaluation run, with the same
  time-based lines while it runs; the sanity check prints nothing.
"""
from __future__ import annotations

import importlib
import math
import numbers
import sys

from lightning.pytorch.callbacks import ProgressBar

from volfm.utils import LineProgress

__all__ = ["LineProgressBar", "line_progress_wanted"]


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _is_progress_bar(callback) -> bool:
    """Whether a trainer callback from a config (an instance, or a ``class_path`` namespace or dict) is a
    ProgressBar; a class path that does not import is left for LightningCLI to report."""
    if isinstance(callback, ProgressBar):
        return True
    path = callback.get("class_path") if hasattr(callback, "get") else None
    if not isinstance(path, str) or "." not in path:
        return False
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, ProgressBar)


def line_progress_wanted(enable_progress_bar, callbacks, stream=None) -> bool:
    """Whether ``volfm fit|validate|test`` should use :class:`LineProgressBar`: ``stream`` (default stderr) is not
    a terminal, the trainer's ``enable_progress_bar`` is not False, and its ``callbacks`` hold no progress bar of
    their own (a recipe that names one keeps it)."""
    if enable_progress_bar is False or _is_terminal(sys.stderr if stream is None else stream):
        return False
    items = callbacks if isinstance(callbacks, list | tuple) else [] if callbacks is None else [callbacks]
    return not any(_is_progress_bar(c) for c in items)


def _value(v) -> str:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    return f"{v:.4g}" if isinstance(v, numbers.Real) and not isinstance(v, bool | int) else str(v)


class LineProgressBar(ProgressBar):
    """A Lightning progress bar for logs: whole lines to ``file`` (default: stderr at print time), at most one per
    ``every_s`` seconds within an epoch or evaluation, a final line for each and a metrics line per epoch."""

    def __init__(self, file=None, every_s: float = 30.0):
        super().__init__()
        self.file, self.every_s = file, every_s
        self._enabled = True
        self._bars: dict[str, LineProgress] = {}  # "train" and the running evaluation ("validation", "test", ...)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def stream(self):
        return sys.stderr if self.file is None else self.file

    def _start(self, kind: str, total, desc: str) -> None:
        self._finish(kind)
        total = int(total) if isinstance(total, numbers.Real) and math.isfinite(total) and total > 0 else None
        self._bars[kind] = LineProgress(total=total, desc=desc, unit="batch", disable=not self._enabled,
                                        file=self.stream, every_fraction=0.0, every_s=self.every_s)

    def _advance(self, kind: str) -> None:
        if kind in self._bars:
            self._bars[kind].update(1)

    def _finish(self, kind: str) -> None:
        bar = self._bars.pop(kind, None)
        if bar is not None:
            bar.close()

    def _epoch(self, trainer) -> str:
        last = trainer.max_epochs - 1 if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        return f"epoch {trainer.current_epoch}" + (f"/{last}" if last is not None else "")

    # -- training ------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start("train", self.total_train_batches, self._epoch(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._advance("train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._finish("train")
        if self._enabled:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            shown = ", ".join(f"{k} {_value(v)}" for k, v in metrics.items())
            print(f"{self._epoch(trainer)}: step {trainer.global_step}" + (f"; {shown}" if shown else ""),
                  file=self.stream, flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish("train")

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_start(self, kind: str, batches, trainer) -> None:
        if trainer.sanity_checking:
            return
        total = sum(batches) if isinstance(batches, list | tuple) else batches
        in_fit = trainer.state.fn == "fit"
        self._start(kind, total, f"{self._epoch(trainer)} {kind}" if in_fit else kind)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start("validation", trainer.num_val_batches, trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._finish("validation")

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start("test", trainer.num_test_batches, trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance("test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._finish("test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._eval_start("predict", trainer.num_predict_batches, trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance("predict")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._finish("predict")

    def on_exception(self, trainer, pl_module, exception) -> None:
        for kind in list(self._bars):
            self._finish(kind)
