"""Image-to-image synthesis (MRI -> PET, PET -> MRI): a volfm encoder + U-Net/UNETR decoder generator.

Losses (weights from the recipe's ``losses`` group): L1 inside the brain/body mask (``l1``), SSIM (MONAI's
SSIMLoss, ``ssim``), a conditional 3D PatchGAN (``adversarial``; the discriminator has its own optimiser,
manual optimisation), and a perceptual loss on the features of a frozen volfm encoder (``perceptual``,
``perceptual_encoder``: a checkpoint path). Either direction: the
source and target array names come from the paired-modality DataModule (``data.init_args.source`` /
``target``).

Validation runs sliding-window synthesis over each whole stored volume and reports, with the fixed
protocol of :mod:`volfm.metrics.synthesis` (inside the mask ``label > 0`` when the store has a label,
else the whole volume; intensity range ``data_range`` or the target's range in the mask): MAE, PSNR,
SSIM, and the same for two baselines computed on the same cases: the identity (the source itself, a
meaningful reference when both modalities share a scale) and the mean training target image.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import SSIMLoss
from torch import nn

from volfm import VolfmError
from volfm.losses.image import PerceptualLoss3d, adversarial_loss
from volfm.metrics.synthesis import synthesis_metrics
from volfm.models import load_encoder
from volfm.models.synthesis import PatchDiscriminator3d, SynthesisGenerator
from volfm.tasks.base import DecoderConfig, EncoderConfig, EncoderTask, InferenceConfig, OptimConfig, as_config, gather_objects
from volfm.tasks.checkpoint import load_task
from volfm.tasks.optim import warmup_decay

__all__ = ["SynthesisOptimConfig", "DiscriminatorConfig", "SynthesisLossConfig", "SynthesisTask"]


@dataclass(frozen=True)
class SynthesisLossConfig:
    """Loss weights: masked L1 (``l1``), SSIM (``ssim``), conditional PatchGAN (``adversarial``, ``gan_kind``
    lsgan / hinge / bce) and perceptual (``perceptual`` with ``perceptual_encoder``: a volfm checkpoint or
    encoder .safetensors whose frozen encoder compares features)."""

    l1: float = 1.0
    ssim: float = 0.0
    adversarial: float = 0.0
    perceptual: float = 0.0
    perceptual_encoder: str | None = None
    gan_kind: str = "lsgan"


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The 3D PatchGAN (used when ``losses.adversarial > 0``): base ``channels``, ``layers``, its own ``lr``
    (default the generator's)."""

    channels: int = 32
    layers: int = 3
    lr: float | None = None


@dataclass(frozen=True)
class SynthesisOptimConfig(OptimConfig):
    """The optimiser group with synthesis's: AdamW at 2e-4, weight decay 1e-5, no warm-up, then poly decay."""

    lr: float = 2e-4
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.0


class SynthesisTask(EncoderTask):
    """Paired image-to-image synthesis (see the module docstring).

    Groups: ``encoder`` (the generator's encoder; ``pretrained`` loads encoder weights from any volfm
    checkpoint, e.g. an ICD or contrastive encoder), ``decoder``, ``losses``, ``discriminator``, ``optim``
    (AdamW, poly decay), ``inference``. residual: add the source to the decoder output (sensible when source
    and target share a scale). final_activation: "relu" for PET. mask_label: losses and metrics inside
    ``label > 0`` when the store has a label. data_range: the intensity range for SSIM/PSNR (default the
    target's range).
    """

    optim_config_class = SynthesisOptimConfig

    def __init__(self, encoder: EncoderConfig | None = None, decoder: DecoderConfig | None = None,
                 residual: bool = False, final_activation: str | None = None,
                 losses: SynthesisLossConfig | None = None, discriminator: DiscriminatorConfig | None = None,
                 mask_label: bool = True, data_range: Sequence[float] | None = None,
                 optim: SynthesisOptimConfig | None = None, inference: InferenceConfig | None = None,
                 patch_size: Sequence[int] | None = None, seed: int = 0):
        super().__init__(encoder, optim, inference, patch_size, seed, default_encoder=EncoderConfig("resnet18_3d"))
        self.decoder_cfg = as_config(DecoderConfig, decoder, "decoder")
        self.loss_cfg = L = as_config(SynthesisLossConfig, losses, "losses")
        self.disc_cfg = as_config(DiscriminatorConfig, discriminator, "discriminator")
        self.residual, self.final_activation = bool(residual), final_activation
        self.mask_label = bool(mask_label)
        self.data_range = [float(v) for v in data_range] if data_range is not None else None
        self.save_task_hparams(decoder=self.decoder_cfg, residual=self.residual, final_activation=final_activation,
                               losses=L, discriminator=self.disc_cfg, mask_label=self.mask_label,
                               data_range=self.data_range)
        if min(L.l1, L.ssim, L.adversarial, L.perceptual) < 0:
            raise VolfmError("loss weights must be >= 0")
        if L.l1 + L.ssim + L.adversarial + L.perceptual <= 0:
            raise VolfmError("give at least one positive loss weight (losses.l1, losses.ssim, ...)")
        if L.perceptual > 0 and not L.perceptual_encoder:
            raise VolfmError("losses.perceptual > 0 needs losses.perceptual_encoder: a volfm checkpoint whose frozen "
                             "encoder compares features (e.g. the ICD or contrastive pretraining encoder)")
        if self.data_range is not None and (len(self.data_range) != 2 or not self.data_range[0] < self.data_range[1]):
            raise VolfmError(f"data_range must be [low, high] with low < high, got {self.data_range}")
        if self.decoder_cfg.deep_supervision:
            raise VolfmError("decoder.deep_supervision is for segmentation; synthesis has one output")
        gen = SynthesisGenerator(self.encoder, out_chans=1, in_chans_source=int(getattr(self.encoder, "in_chans", 1)),
                                 residual=self.residual, decoder=self.decoder_cfg.name, final_activation=final_activation,
                                 **dict(self.decoder_cfg.kwargs))
        self.decoder = gen.decoder
        self.__dict__["_gen"] = gen  # registered through encoder/decoder (state keys encoder.* / decoder.*)
        self.discriminator = None
        if L.adversarial > 0:
            self.discriminator = PatchDiscriminator3d(2, base_channels=self.disc_cfg.channels,
                                                      n_layers=self.disc_cfg.layers)
            self.automatic_optimization = False
        self.perceptual = None
        if L.perceptual > 0:
            self.perceptual = PerceptualLoss3d(self._load_frozen(L.perceptual_encoder))
        self.source_name, self.target_name = "mri", "pet"
        self.register_buffer("mean_target", torch.empty(0), persistent=True)
        self._val: list[dict] = []

    @staticmethod
    def _load_frozen(path) -> nn.Module:
        p = Path(path)
        if p.suffix == ".safetensors":
            return load_encoder(p)
        task, _ = load_task(p, "a volfm checkpoint or encoder .safetensors for the perceptual loss")
        return task.encoder

    @property
    def generator(self) -> nn.Module:
        return self.__dict__["_gen"]

    # ------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "source"):
            raise VolfmError("SynthesisTask needs a PairedModalityDataModule (data: in the recipe) naming source and "
                             "target arrays")
        self.source_name, self.target_name = dm.source, dm.target
        self.load_pretrained(stage)
        self.load_pretrained_decoder(stage, self.decoder, self.decoder_cfg)
        if stage == "fit" and self.mean_target.numel() == 0:
            self.mean_target = self._mean_training_target(dm).to(self.device)

    @staticmethod
    def _mean_training_target(dm) -> torch.Tensor:
        """Voxel-wise mean of the training targets (a baseline); empty when the cases differ in shape."""
        ds = dm.train_dataset()
        acc, n = None, 0
        for cid in ds.case_ids:
            a = np.asarray(ds.array(cid, dm.target), dtype=np.float64)
            if acc is not None and a.shape != acc.shape:
                return torch.empty(0)
            acc = a if acc is None else acc + a
            n += 1
        return torch.from_numpy((acc / max(n, 1)).astype(np.float32))

    def checkpoint_record(self) -> dict:
        return {"source": self.source_name, "target": self.target_name}

    def input_name(self, arrays) -> str:
        return self.source_name

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        info = checkpoint.get("volfm") or {}
        self.source_name = info.get("source", self.source_name)
        self.target_name = info.get("target", self.target_name)
        shape = checkpoint.get("state_dict", {}).get("mean_target")
        if shape is not None:
            self.mean_target = torch.empty_like(shape)

    # ------------------------------------------------------------------------------------ losses
    def _mask(self, batch: dict, like: torch.Tensor) -> torch.Tensor:
        lab = batch.get("label")
        if self.mask_label and isinstance(lab, torch.Tensor):
            return (lab > 0).to(like.dtype)
        return torch.ones_like(like)

    def _gen_loss(self, fake, real, src, mask) -> tuple[torch.Tensor, dict]:
        L = self.loss_cfg
        logs = {}
        loss = fake.new_zeros(())
        if L.l1:
            l1 = ((fake - real).abs() * mask).sum() / mask.sum().clamp_min(1.0)
            loss = loss + L.l1 * l1
            logs["l1"] = l1.detach()
        if L.ssim:
            lo, hi = self._range(real)
            s = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=7 if min(real.shape[2:]) < 22 else 11)(
                ((fake - lo) / (hi - lo)).clamp(0, 1), ((real - lo) / (hi - lo)).clamp(0, 1))
            loss = loss + L.ssim * s
            logs["ssim_loss"] = s.detach()
        if L.perceptual:
            p = self.perceptual(fake, real)
            loss = loss + L.perceptual * p
            logs["perceptual"] = p.detach()
        if L.adversarial:
            g = adversarial_loss(self.discriminator(torch.cat([src, fake], 1)), True, L.gan_kind,
                                 for_discriminator=False)
            loss = loss + L.adversarial * g
            logs["g_adv"] = g.detach()
        return loss, logs

    def _range(self, real: torch.Tensor) -> tuple[float, float]:
        if self.data_range is not None:
            return float(self.data_range[0]), float(self.data_range[1])
        lo, hi = float(real.min()), float(real.max())
        return lo, (hi if hi > lo else lo + 1.0)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.generator(source)

    def training_step(self, batch: dict, batch_idx: int):
        src, real = batch[self.source_name], batch[self.target_name]
        mask = self._mask(batch, real)
        fake = self.generator(src)
        bs = src.shape[0]
        if self.automatic_optimization:
            loss, logs = self._gen_loss(fake, real, src, mask)
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=bs)
            self.log("train_loss", loss, prog_bar=True, batch_size=bs)
            return loss

        opt_g, opt_d = self.optimizers()
        # discriminator: real pairs vs generated pairs (generator output detached)
        d_real = self.discriminator(torch.cat([src, real], 1))
        d_fake = self.discriminator(torch.cat([src, fake.detach()], 1))
        loss_d = 0.5 * (adversarial_loss(d_real, True, self.loss_cfg.gan_kind)
                        + adversarial_loss(d_fake, False, self.loss_cfg.gan_kind))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        # generator: fool the (just updated) discriminator + the reconstruction losses
        loss_g, logs = self._gen_loss(fake, real, src, mask)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        self.log_dict({f"train/{k}": v for k, v in {**logs, "d_loss": loss_d.detach()}.items()}, batch_size=bs)
        self.log("train_loss", loss_g.detach(), prog_bar=True, batch_size=bs)

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_volume(self, image, patch_size=None) -> np.ndarray:
        """The synthesised target (I, J, K) float32 for one stored-grid source image (C, I, J, K)."""
        out = self.sliding_window(self.generator, image, patch_size)
        return out[0].cpu().numpy().astype(np.float32)

    output_kind = "image"

    def _eval_step(self, batch: dict) -> None:
        for i, cid in enumerate(batch["case_id"]):
            src = batch[self.source_name][i].cpu().numpy()
            tgt = batch[self.target_name][i, 0].cpu().numpy()
            lab = batch.get("label")
            mask = (lab[i, 0].cpu().numpy() > 0) if (self.mask_label and isinstance(lab, torch.Tensor)) else None
            if mask is not None and not mask.any():
                mask = None
            rng = self.data_range
            if rng is None:
                sel = tgt[mask] if mask is not None else tgt
                rng = (float(sel.min()), float(sel.max()) if sel.max() > sel.min() else float(sel.min()) + 1.0)
            pred = self.predict_volume(src)
            row = {"case_id": cid}
            cands = {"model": pred, "identity": src[0]}
            if self.mean_target.numel() and tuple(self.mean_target.shape[1:]) == tgt.shape:
                cands["mean_image"] = self.mean_target[0].cpu().numpy()
            for name, img in cands.items():
                m = synthesis_metrics(img, tgt, mask=mask, data_range=rng, case_id=cid)
                row[name] = {k: m[k] for k in ("mae", "psnr", "ssim")}
            self._val.append(row)

    def _epoch_end(self, prefix: str) -> None:
        local, self._val = self._val, []
        if self.trainer.sanity_checking:
            return
        rows = list({r["case_id"]: r for part in gather_objects(local) for r in part}.values())  # each case once
        if not rows:
            return
        out = {}
        for name in ("model", "identity", "mean_image"):
            have = [r[name] for r in rows if name in r]
            if not have:
                continue
            for k in ("mae", "psnr", "ssim"):
                vals = [v[k] for v in have if v[k] is not None and math.isfinite(v[k])]
                key = f"{prefix}/{k}" if name == "model" else f"{prefix}/{name}_{k}"
                out[key] = float(np.mean(vals)) if vals else float("nan")
        self.last_metrics = out
        self.log_dict(out, sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # --------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        o = self.optim_cfg
        gen_params = [p for p in list(self.encoder.parameters()) + list(self.decoder.parameters()) if p.requires_grad]
        opt_g = torch.optim.AdamW(gen_params, lr=o.lr, betas=(0.5, 0.999) if self.discriminator else (0.9, 0.999),
                                  weight_decay=o.weight_decay)

        total = max(1, int(self.trainer.estimated_stepping_batches))
        sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, warmup_decay(total, 0, "poly"))
        if self.discriminator is None:
            return {"optimizer": opt_g, "lr_scheduler": {"scheduler": sch_g, "interval": "step"}}
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=self.disc_cfg.lr or o.lr, betas=(0.5, 0.999),
                                  weight_decay=o.weight_decay)
        return [opt_g, opt_d], [sch_g]
