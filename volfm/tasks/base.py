"""What every volfm task shares: an encoder built by name, ``pretrained`` weights, the checkpoint record,
rank-zero messages, sliding-window inference and the knob groups recipes fill.

A task's constructor takes small groups of settings instead of dozens of flat arguments. Each group is a
frozen dataclass that jsonargparse (LightningCLI) fills from the recipe, so a recipe reads

    model:
      class_path: volfm.tasks.SegmentationTask
      init_args:
        encoder: {name: resnet18_3d, kwargs: {in_chans: 1, base_channels: 16}, pretrained: runs/.../encoder.safetensors}
        optim: {lr: 3.0e-3, weight_decay: 1.0e-5}
        inference: {overlap: 0.5, batch_size: 4}

and ``--model.init_args.encoder.pretrained PATH`` overrides one field. A group may also be given as a plain
dict (that is how ``load_from_checkpoint`` passes the saved hyper-parameters back, which are stored as plain
data so that ``torch.load(weights_only=True)`` reads them); an unknown key is an error naming it.

``patch_size`` is the training patch size: ``volfm fit`` links it from the DataModule's ``patch_size``
(``link_arguments`` in :mod:`volfm.cli.lightning`), so a checkpoint knows the sliding-window size it was trained
with; ``None`` means whole volumes.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from volfm import VolfmError
from volfm.inference import SlidingWindowInferer
from volfm.models import create_encoder
from volfm.models.pretrained import load_pretrained_decoder, load_pretrained_encoder
from volfm.store.layout import CohortStore
from volfm.utils import did_you_mean, parse_triple

__all__ = ["DecoderConfig", "EncoderConfig", "EncoderTask", "InferenceConfig", "OptimConfig", "as_config", "gather_objects",
           "plain_data"]

C = TypeVar("C")


@dataclass(frozen=True)
class EncoderConfig:
    """The image encoder: a registry ``name`` (``volfm.models.list_encoders()``), its ``kwargs``, and
    ``pretrained``: where its starting weights come from, loaded before training starts: a volfm task .ckpt, an
    encoder .safetensors, a model package folder (volfm export / volfm convert), or ``merlin:PATH`` (Merlin's
    released .pt, converted on the fly; see volfm.models.pretrained)."""

    name: str = "resnet18_3d"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None


@dataclass(frozen=True)
class DecoderConfig:
    """The dense decoder over the encoder's ``forward_intermediates``: ``name`` "auto" (U-Net for CNNs, UNETR
    for ViTs), "unet" or "unetr", its ``kwargs``, ``deep_supervision`` (segmentation only), and ``pretrained``: a
    volfm checkpoint with a decoder of the same shape (a MaskedVolumeTask .ckpt or its decoder.safetensors, or a
    segmentation/synthesis .ckpt) whose decoder weights are loaded when fitting starts, all but the output layers."""

    name: str = "auto"
    kwargs: dict[str, Any] = field(default_factory=dict)
    deep_supervision: bool = False
    pretrained: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up over ``warmup_fraction`` of the steps, then the task's decay schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.0


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window inference over whole stored volumes (validation, test, ``volfm predict``)."""

    overlap: float = 0.5
    batch_size: int = 2


def as_config(cls: type[C], value: Any, what: str) -> C:
    """``value`` (None, a ``cls``, or a mapping of its fields) as a ``cls``; None gives the defaults."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise VolfmError(f"{what} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, "
                         f"got {type(value).__name__} {value!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise VolfmError(f"{what}: unknown key {unknown[0]!r}{did_you_mean(str(unknown[0]), known)}; "
                         f"known keys: {', '.join(known)}")
    return cls(**value)


def plain_data(value: Any) -> Any:
    """Dataclasses, tuples and numpy scalars as plain dicts/lists/numbers (what a checkpoint may hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def gather_objects(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` (a one-item list without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class EncoderTask(pl.LightningModule):
    """Base LightningModule of the volfm tasks (subclasses: pretraining, segmentation, synthesis).

    Subclasses call ``super().__init__(encoder, optim, inference, patch_size, seed, default_encoder=...)``, then
    :meth:`save_task_hparams` with their own groups; add what their checkpoints need to carry in
    :meth:`checkpoint_record` and restore it in :meth:`restore_record`. A task whose constructor has no
    ``inference`` group (it never runs sliding windows) sets ``uses_sliding_window = False``.
    """

    uses_sliding_window = True
    # the optimiser group's class: a subclass of OptimConfig whose defaults are the task's, so that a recipe giving
    # part of the group (optim: {lr: 3e-3}) keeps the task's defaults for the rest
    optim_config_class: type[OptimConfig] = OptimConfig

    def __init__(self, encoder: EncoderConfig | Mapping | None = None, optim: OptimConfig | Mapping | None = None,
                 inference: InferenceConfig | Mapping | None = None, patch_size: Sequence[int] | None = None,
                 seed: int = 0, *, default_encoder: EncoderConfig | None = None):
        super().__init__()
        self.encoder_cfg = as_config(EncoderConfig, encoder if encoder is not None else default_encoder, "encoder")
        self.optim_cfg = as_config(type(self).optim_config_class, optim, "optim")
        self.inference_cfg = as_config(InferenceConfig, inference, "inference")
        self.patch_size = (parse_triple(patch_size, "patch_size", integer=True, at_least=1)
                           if patch_size is not None else None)
        self.seed = int(seed)
        self._base_hparams = {"encoder": self.encoder_cfg, "optim": self.optim_cfg, "patch_size": self.patch_size,
                              "seed": self.seed}
        if self.uses_sliding_window:
            self._base_hparams["inference"] = self.inference_cfg
        # state-dict keys encoder.*: load_encoder_weights reads the encoder of any volfm checkpoint
        self.encoder = create_encoder(self.encoder_cfg.name, **dict(self.encoder_cfg.kwargs))
        self.num_features = int(getattr(self.encoder, "num_features", 0))
        self._pretrained_loaded = False
        self._decoder_loaded = False
        self.last_metrics: dict = {}
        self._data_record: dict = {}     # what data_record() found (or a loaded checkpoint carried)
        self._saved_metrics: dict = {}   # the metrics record of a loaded checkpoint

    def save_task_hparams(self, **groups: Any) -> None:
        """Record the base groups and the subclass's ``groups`` as plain data (``self.hparams``, the checkpoint's
        ``hyper_parameters``): ``load_from_checkpoint`` passes them back to ``__init__``."""
        # _class_path: what LightningCLI's --ckpt_path (validate, test, resume) rebuilds the model from;
        # load_from_checkpoint drops it (not an __init__ argument)
        hp = {"_class_path": f"{type(self).__module__}.{type(self).__qualname__}", **self._base_hparams, **groups}
        self.save_hyperparameters(plain_data(hp))

    # ------------------------------------------------------------------------------------------ messages
    def info(self, text: str) -> None:
        """Print on global rank zero only (every rank when there is no trainer)."""
        if self._trainer is None or self.trainer.is_global_zero:
            print(text, flush=True)

    # ---------------------------------------------------------------------------------------- pretrained
    @property
    def resuming(self) -> bool:
        """Whether the trainer is resuming from a checkpoint, whose weights replace anything loaded at setup (which
        Lightning runs before it restores): the pretrained sources are then not read at all."""
        return self._trainer is not None and getattr(self.trainer, "ckpt_path", None) is not None

    def load_pretrained(self, stage: str) -> None:
        """Load ``encoder.pretrained`` once, when fitting starts (not over a checkpoint being resumed)."""
        path = self.encoder_cfg.pretrained
        if stage == "fit" and path and not self._pretrained_loaded and not self.resuming:
            load_pretrained_encoder(self.encoder, path)
            self._pretrained_loaded = True
            self.info(f"encoder weights loaded from {path}")

    def load_pretrained_decoder(self, stage: str, decoder: nn.Module, cfg: DecoderConfig) -> None:
        """Load ``decoder.pretrained`` into ``decoder`` once, when fitting starts (not over a resumed checkpoint)."""
        if stage == "fit" and cfg.pretrained and not self._decoder_loaded and not self.resuming:
            load_pretrained_decoder(decoder, cfg.pretrained)
            self._decoder_loaded = True
            self.info(f"decoder weights (all but the output layers) loaded from {cfg.pretrained}")

    @property
    def pretrained_decoder_loaded(self) -> bool:
        """Whether ``decoder.pretrained`` was loaded into the decoder (or a checkpoint's weights replaced it)."""
        return self._decoder_loaded

    @property
    def pretrained_loaded(self) -> bool:
        """Whether ``encoder.pretrained`` was loaded into the encoder (or a checkpoint's weights replaced it)."""
        return self._pretrained_loaded

    # --------------------------------------------------------------------------------------- checkpoints
    def checkpoint_record(self) -> dict:
        """What a subclass adds to ``checkpoint["volfm"]`` (plain data)."""
        return {}

    def restore_record(self, record: dict) -> None:
        """Rebuild what :meth:`checkpoint_record` saved (called before the weights are loaded)."""

    def input_name(self, arrays: Sequence[str]) -> str:
        """The store array the model reads (a synthesis task overrides this with its source)."""
        return str(arrays[0])

    def data_record(self) -> dict:
        """What the model was trained on, as plain data (``checkpoint["volfm"]["data"]``): the store, its resolved
        preprocessing spec (what ``volfm predict`` puts new images through, without the store), the array the model
        reads, the case counts per split (and how many training cases the run used: ``num_train_cases`` /
        ``train_fraction``). Taken from the trainer's DataModule when it reads a store; a checkpoint loaded without one
        keeps the record it was saved with."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        store = getattr(dm, "store", None)
        if not store or self._data_record.get("store") == str(Path(store).resolve()):
            return self._data_record  # no store at hand, or already recorded for this one
        try:
            cs = CohortStore(store)
            trained_on = len(dm.train_dataset())
        except VolfmError:
            return self._data_record
        arrays = list(getattr(dm.hparams, "arrays", None) or ["image"])
        counts: dict[str, int] = {}
        for r in cs.rows:
            key = (r.get("split") or "unsplit") if r.get("status") == "ok" else "failed"
            counts[key] = counts.get(key, 0) + 1
        self._data_record = plain_data({
            **cs.spec_record(), "input": self.input_name(arrays), "arrays": arrays,
            "label": getattr(dm.hparams, "label", None), "cases": counts, "train_cases_used": trained_on})
        return self._data_record

    def metrics_record(self) -> dict:
        """The last validation metrics with the epoch and step at which a checkpoint first carried them (kept as
        they were when no validation has run since, e.g. after resuming)."""
        metrics = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in self.last_metrics.items()
                   if isinstance(v, (int, float))}
        if not metrics:
            return self._saved_metrics
        seen = {k: v for k, v in self._saved_metrics.items() if k not in ("epoch", "global_step")}
        if metrics != seen:
            when = ({"epoch": int(self.current_epoch), "global_step": int(self.global_step)}
                    if self._trainer is not None else {})
            self._saved_metrics = {**when, **metrics}
        return self._saved_metrics

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["volfm"] = {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            **plain_data({"encoder": {"name": self.encoder_cfg.name, "kwargs": dict(self.encoder_cfg.kwargs)},
                          "patch_size": self.patch_size}),
            **({"inference": plain_data(self.inference_cfg)} if self.uses_sliding_window else {}),
            "data": self.data_record(),
            "metrics": self.metrics_record(),
            **self.checkpoint_record(),
        }

    def on_train_start(self) -> None:
        # Lightning starts fitting in the modules' current modes without calling train(), so a subclass's train()
        # override (a frozen encoder's BatchNorm layers kept in eval mode) would not act until after the first
        # validation; call it here (the validation loop then captures and restores these modes)
        self.train()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the encoder (and decoder) weights come from the checkpoint: ``pretrained`` is not loaded over them
        self._pretrained_loaded = True
        self._decoder_loaded = True
        record = checkpoint.get("volfm") or {}
        self._data_record = dict(record.get("data") or {})
        self._saved_metrics = dict(record.get("metrics") or {})
        self.restore_record(record)

    # ----------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def sliding_window(self, net: nn.Module, image, patch_size: Sequence[int] | None = None) -> torch.Tensor:
        """``net``'s output (C_out, I, J, K) over one stored-grid ``image`` (C, I, J, K), in windows of
        ``patch_size`` (default: the training patch size, else the whole volume) with the ``inference``
        group's overlap and batch size; the task is in eval mode for the call and restored after."""
        image = np.asarray(image, dtype=np.float32)
        patch = tuple(patch_size or self.patch_size or image.shape[-3:])
        inferer = SlidingWindowInferer(patch, overlap=self.inference_cfg.overlap,
                                       batch_size=self.inference_cfg.batch_size, device=self.device)
        was_training = self.training
        self.eval()
        try:
            return inferer(image, net)
        finally:
            self.train(was_training)
