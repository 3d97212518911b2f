"""Image-to-image synthesis (MRI -> PET, PET -> MRI): a volfm encoder + U-Net/UNETR decoder generator.

Losses (weights from the recipe): L1 inside the brain/body mask (``l1_weight``), SSIM (MONAI's
SSIMLoss, ``ssim_weight``), a conditional 3D PatchGAN (``adversarial_weight``; the discriminator has
its own optimiser, manual optimisation), and a perceptual loss on the features of a frozen volfm
encoder (``perceptual_weight``, ``perceptual_encoder``: a checkpoint path). Either direction: the
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
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from monai.losses import SSIMLoss
from torch import nn

from volfm import VolfmError
from volfm.losses.image import PerceptualLoss3d, adversarial_loss
from volfm.metrics.synthesis import synthesis_metrics
from volfm.models import create_encoder, load_encoder, load_encoder_weights
from volfm.models.synthesis import PatchDiscriminator3d, SynthesisGenerator
from volfm.tasks.checkpoint import gather_objects, load_task
from volfm.tasks.inference import sliding_window
from volfm.tasks.optim import warmup_decay

__all__ = ["SynthesisTask"]


class SynthesisTask(pl.LightningModule):
    """Paired image-to-image synthesis (see the module docstring).

    encoder / encoder_kwargs / pretrained: the generator's encoder (``pretrained`` loads encoder weights
    from any volfm checkpoint, e.g. an ICD or contrastive encoder). residual: add the source to the
    decoder output (sensible when source and target share a scale). final_activation: "relu" for PET.
    """

    def __init__(self, encoder: str = "resnet18_3d", encoder_kwargs: dict | None = None,
                 pretrained: str | None = None, decoder: str = "auto", decoder_kwargs: dict | None = None,
                 residual: bool = False, final_activation: str | None = None,
                 l1_weight: float = 1.0, ssim_weight: float = 0.0, adversarial_weight: float = 0.0,
                 perceptual_weight: float = 0.0, perceptual_encoder: str | None = None, gan_kind: str = "lsgan",
                 disc_channels: int = 32, disc_layers: int = 3, mask_label: bool = True,
                 data_range: Sequence[float] | None = None, lr: float = 2e-4, disc_lr: float | None = None,
                 weight_decay: float = 1e-5, sw_overlap: float = 0.5, sw_batch_size: int = 2, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

        if min(l1_weight, ssim_weight, adversarial_weight, perceptual_weight) < 0:
            raise VolfmError("loss weights must be >= 0")
        if l1_weight + ssim_weight + adversarial_weight + perceptual_weight <= 0:
            raise VolfmError("give at least one positive loss weight (l1_weight, ssim_weight, ...)")
        if perceptual_weight > 0 and not perceptual_encoder:
            raise VolfmError("perceptual_weight > 0 needs perceptual_encoder: a volfm checkpoint whose frozen encoder "
                             "compares features (e.g. the ICD or contrastive pretraining encoder)")
        if data_range is not None and (len(data_range) != 2 or not data_range[0] < data_range[1]):
            raise VolfmError(f"data_range must be [low, high] with low < high, got {data_range}")
        kw = dict(encoder_kwargs or {})
        self.encoder = create_encoder(encoder, **kw)
        gen = SynthesisGenerator(self.encoder, out_chans=1, in_chans_source=int(getattr(self.encoder, "in_chans", 1)),
                                 residual=residual, decoder=decoder, final_activation=final_activation,
                                 **(decoder_kwargs or {}))
        self.decoder = gen.decoder
        self.__dict__["_gen"] = gen  # registered through encoder/decoder (state keys encoder.* / decoder.*)
        self.discriminator = None
        if adversarial_weight > 0:
            self.discriminator = PatchDiscriminator3d(2, base_channels=disc_channels, n_layers=disc_layers)
            self.automatic_optimization = False
        self.perceptual = None
        if perceptual_weight > 0:
            self.perceptual = PerceptualLoss3d(self._load_frozen(perceptual_encoder))
        self.source_name, self.target_name = "mri", "pet"
        self.register_buffer("mean_target", torch.empty(0), persistent=True)
        self._val: list[dict] = []
        self.last_metrics: dict = {}

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
        h = self.hparams
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "source"):
            raise VolfmError("SynthesisTask needs a PairedModalityDataModule (data: in the recipe) naming source and "
                             "target arrays")
        self.source_name, self.target_name = dm.source, dm.target
        if h.pretrained and stage == "fit" and not getattr(self, "_pretrained_loaded", False):
            load_encoder_weights(self.encoder, h.pretrained)
            self._pretrained_loaded = True
        if stage == "fit" and self.mean_target.numel() == 0:
            self.mean_target = self._mean_training_target(dm).to(self.device)

    @staticmethod
    def _mean_training_target(dm) -> torch.Tensor:
        """Voxel-wise mean of the training targets (a baseline); empty when the cases differ in shape."""
        if "train" not in dm.datasets:
            dm.setup("fit")
        ds = dm.datasets["train"].dataset
        acc, n = None, 0
        for cid in ds.case_ids:
            a = np.asarray(ds.array(cid, dm.target), dtype=np.float64)
            if acc is not None and a.shape != acc.shape:
                return torch.empty(0)
            acc = a if acc is None else acc + a
            n += 1
        return torch.from_numpy((acc / max(n, 1)).astype(np.float32))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["volfm"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}",
                               "encoder": {"name": self.hparams.encoder,
                                           "kwargs": dict(self.hparams.encoder_kwargs or {})},
                               "source": self.source_name, "target": self.target_name}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pretrained_loaded = True
        info = checkpoint.get("volfm") or {}
        self.source_name = info.get("source", self.source_name)
        self.target_name = info.get("target", self.target_name)
        shape = checkpoint.get("state_dict", {}).get("mean_target")
        if shape is not None:
            self.mean_target = torch.empty_like(shape)

    # ------------------------------------------------------------------------------------ losses
    def _mask(self, batch: dict, like: torch.Tensor) -> torch.Tensor:
        lab = batch.get("label")
        if self.hparams.mask_label and isinstance(lab, torch.Tensor):
            return (lab > 0).to(like.dtype)
        return torch.ones_like(like)

    def _gen_loss(self, fake, real, src, mask) -> tuple[torch.Tensor, dict]:
        h = self.hparams
        logs = {}
        loss = fake.new_zeros(())
        if h.l1_weight:
            l1 = ((fake - real).abs() * mask).sum() / mask.sum().clamp_min(1.0)
            loss = loss + h.l1_weight * l1
            logs["l1"] = l1.detach()
        if h.ssim_weight:
            lo, hi = self._range(real)
            s = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=7 if min(real.shape[2:]) < 22 else 11)(
                ((fake - lo) / (hi - lo)).clamp(0, 1), ((real - lo) / (hi - lo)).clamp(0, 1))
            loss = loss + h.ssim_weight * s
            logs["ssim_loss"] = s.detach()
        if h.perceptual_weight:
            p = self.perceptual(fake, real)
            loss = loss + h.perceptual_weight * p
            logs["perceptual"] = p.detach()
        if h.adversarial_weight:
            g = adversarial_loss(self.discriminator(torch.cat([src, fake], 1)), True, h.gan_kind,
                                 for_discriminator=False)
            loss = loss + h.adversarial_weight * g
            logs["g_adv"] = g.detach()
        return loss, logs

    def _range(self, real: torch.Tensor) -> tuple[float, float]:
        if self.hparams.data_range is not None:
            return float(self.hparams.data_range[0]), float(self.hparams.data_range[1])
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
        loss_d = 0.5 * (adversarial_loss(d_real, True, self.hparams.gan_kind)
                        + adversarial_loss(d_fake, False, self.hparams.gan_kind))
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
        out = sliding_window(self, self.generator, image, patch_size)
        return out[0].cpu().numpy().astype(np.float32)

    output_kind = "image"

    def _eval_step(self, batch: dict) -> None:
        h = self.hparams
        for i, cid in enumerate(batch["case_id"]):
            src = batch[self.source_name][i].cpu().numpy()
            tgt = batch[self.target_name][i, 0].cpu().numpy()
            lab = batch.get("label")
            mask = (lab[i, 0].cpu().numpy() > 0) if (h.mask_label and isinstance(lab, torch.Tensor)) else None
            if mask is not None and not mask.any():
                mask = None
            rng = h.data_range
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
        h = self.hparams
        gen_params = [p for p in list(self.encoder.parameters()) + list(self.decoder.parameters()) if p.requires_grad]
        opt_g = torch.optim.AdamW(gen_params, lr=h.lr, betas=(0.5, 0.999) if self.discriminator else (0.9, 0.999),
                                  weight_decay=h.weight_decay)

        total = max(1, int(self.trainer.estimated_stepping_batches))
        sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, warmup_decay(total, 0, "poly"))
        if self.discriminator is None:
            return {"optimizer": opt_g, "lr_scheduler": {"scheduler": sch_g, "interval": "step"}}
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=h.disc_lr or h.lr, betas=(0.5, 0.999),
                                  weight_decay=h.weight_decay)
        return [opt_g, opt_d], [sch_g]
