"""Merlin-style pretraining (ICD-code pretext, CT-report contrastive) and self-supervised objectives, alone or together.

Merlin (Blankemeier et al.) trains an I3D ResNet-152 on whole CT volumes with two signals: EHR
diagnosis codes (phecodes from ICD codes, multi-label BCE on the pooled features) and the
radiology report (CLIP-style InfoNCE between image and report embeddings), either staged (codes
first, then reports) or multi-task (both losses together). One LightningModule does all three; the
recipe says which objectives are on:

    ICD pretext              icd: {...}            contrastive: null
    report contrastive       icd: null             contrastive: {...}   (staged: encoder.pretrained = an
                                                                         ICD-pretext checkpoint)
    multi-task               icd: {weight: 1, ...}  contrastive: {weight: 1, ...}
    masked volume (CNN)      masked: {...}          (MaskedVolumeTask: icd and contrastive off by default)
    MAE (ViT)                mae: {...}             (MAETask)
    hybrid                   any of the above with their ``weight``s, e.g. masked + icd

The self-supervised groups are :mod:`volfm.tasks.ssl`. The loss is the weighted sum of the groups that are on.

What a checkpoint carries besides the weights (under ``checkpoint["volfm"]``, plain JSON-like data,
readable with ``torch.load(weights_only=True)``): the ICD vocabulary, the tokenizer (as the
``tokenizers`` JSON string) and the text model's config, so ``Task.load_from_checkpoint(path)``
rebuilds every head without the store or the original text model folder.

Metrics every validation epoch (``val/...``; ``test/...`` in ``volfm test``), computed over all
ranks' cases: ICD macro/micro AUROC and AUPRC over classes with enough positives, image->report and
report->image Recall@k, zero-shot findings AUROC / F1 from positive/negative prompts.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volfm import VolfmError
from volfm.losses import (
    LogitScale,
    contrastive_loss,
    multilabel_loss,
    pos_weight_from_counts,
)
from volfm.metrics.classification import multilabel_metrics
from volfm.metrics.retrieval import retrieval_metrics
from volfm.metrics.zeroshot import (
    finding_truth,
    load_prompts,
    zero_shot_metrics,
    zero_shot_scores,
)
from volfm.models import save_encoder
from volfm.models.heads import MultiLabelHead, ProjectionHead
from volfm.models.pretrained import PROJECTION_PREFIXES, pretrained_projections
from volfm.models.text import (
    TextEncoder,
    build_text_encoder,
    tokenizer_from_json,
    tokenizer_to_json,
    train_wordpiece_tokenizer,
)
from volfm.models.weights import save_weights
from volfm.store.cohort import parse_icd_codes
from volfm.targets.icd import IcdVocabulary
from volfm.targets.reports import report_views
from volfm.tasks.base import EncoderConfig, EncoderTask, OptimConfig, as_config
from volfm.tasks.optim import adamw_warmup_decay
from volfm.tasks.ssl import (
    MAEConfig,
    MaskedVolumeConfig,
    build_mae_decoder,
    build_masked_decoder,
    mae_loss,
    masked_volume_loss,
    step_generator,
)

__all__ = ["PretrainOptimConfig", "ContrastiveConfig", "IcdHeadConfig", "MAETask", "MaskedVolumeTask",
           "PretrainEvalConfig", "PretrainTask"]

ICD_LOSSES = ("bce", "focal")
REPORT_MODES = ("whole", "findings_impression", "random_section")


@dataclass(frozen=True)
class IcdHeadConfig:
    """ICD pretext: a multi-label head on the pooled features.

    Vocabulary from the training split's ``icd_codes`` at ``level`` (full, category, block, chapter) or
    through ``mapping`` (a CSV, e.g. a phecode map); classes seen in fewer than ``min_count`` training cases
    are dropped. ``loss`` "bce" or "focal" (``focal_gamma``); ``pos_weight`` balances rare classes;
    ``random_labels`` permutes the code lists among training cases (a control: nothing should be learnt).
    """

    weight: float = 1.0
    level: str = "category"
    mapping: str | None = None
    min_count: int = 5
    loss: str = "bce"
    focal_gamma: float = 2.0
    pos_weight: bool = False
    dropout: float = 0.0
    random_labels: bool = False


@dataclass(frozen=True)
class ContrastiveConfig:
    """Report contrastive: image and report projected to ``embed_dim``, symmetric InfoNCE.

    ``text_model``: a local Hugging Face folder, or None for the offline default (a small BERT from
    ``text_config`` with a WordPiece tokenizer trained on the training reports); ``text_lr`` its learning rate
    (default the optimiser's). ``text_global_attention`` ("first" or "none") and ``text_normalize`` ("none" or
    "merlin"): see :class:`volfm.models.text.TextEncoder`; Merlin's text tower is ``text_max_length: 1024``,
    ``text_global_attention: none``, ``text_normalize: merlin``. ``report_mode`` "whole", "findings_impression"
    or "random_section" (Merlin's organ sections). ``gather``: under DDP the embeddings of all ranks are gathered.
    Cases with an empty report are skipped for this loss and kept for the ICD loss.
    """

    weight: float = 1.0
    text_model: str | None = None
    text_max_length: int = 512
    text_pooling: str = "cls"
    text_global_attention: str = "first"
    text_normalize: str = "none"
    text_config: dict[str, Any] = field(default_factory=dict)
    text_lr: float | None = None
    report_mode: str = "whole"
    embed_dim: int = 512
    projection: str = "linear"
    init_temperature: float = 0.07
    learn_temperature: bool = True
    gather: bool = True


@dataclass(frozen=True)
class PretrainEvalConfig:
    """Validation/test metrics: ICD classes scored with at least ``min_positives`` positives; retrieval
    Recall@``retrieval_ks``; zero-shot findings from the prompt set ``prompts`` (None: off)."""

    min_positives: int = 2
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    prompts: str | None = "ct_findings"


@dataclass(frozen=True)
class PretrainOptimConfig(OptimConfig):
    """The optimiser group with pretraining's: AdamW at 1e-4, weight decay 0.05, 5 % linear warm-up, then cosine."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05


class PretrainTask(EncoderTask):
    """Image encoder + ICD head and/or report contrastive towers (see the module docstring).

    Groups: ``encoder`` (registry name, kwargs, ``pretrained``: staged pretraining), ``icd`` (None: no ICD
    pretext), ``contrastive`` (None: no text tower), ``evaluation``, ``optim`` (AdamW, warm-up, cosine decay);
    ``freeze_encoder`` trains only the heads (a linear probe).
    """

    optim_config_class = PretrainOptimConfig
    default_encoder = EncoderConfig("resnet152_3d")

    uses_sliding_window = False  # whole volumes in, pooled features out

    def __init__(self, encoder: EncoderConfig | None = None, icd: IcdHeadConfig | None = IcdHeadConfig(),
                 contrastive: ContrastiveConfig | None = None, masked: MaskedVolumeConfig | None = None,
                 mae: MAEConfig | None = None, evaluation: PretrainEvalConfig | None = None,
                 freeze_encoder: bool = False, optim: PretrainOptimConfig | None = None,
                 patch_size: Sequence[int] | None = None, seed: int = 0):
        super().__init__(encoder, optim, None, patch_size, seed, default_encoder=self.default_encoder)
        self.icd_cfg = as_config(IcdHeadConfig, icd, "icd") if icd is not None else None
        self.con_cfg = as_config(ContrastiveConfig, contrastive, "contrastive") if contrastive is not None else None
        self.masked_cfg = as_config(MaskedVolumeConfig, masked, "masked") if masked is not None else None
        self.mae_cfg = as_config(MAEConfig, mae, "mae") if mae is not None else None
        self.eval_cfg = as_config(PretrainEvalConfig, evaluation, "evaluation")
        self.freeze_encoder = bool(freeze_encoder)
        self.save_task_hparams(icd=self.icd_cfg, contrastive=self.con_cfg, masked=self.masked_cfg, mae=self.mae_cfg,
                               evaluation=self.eval_cfg, freeze_encoder=self.freeze_encoder)
        groups = {"icd": self.icd_cfg, "contrastive": self.con_cfg, "masked": self.masked_cfg, "mae": self.mae_cfg}
        if all(c is None for c in groups.values()):
            raise VolfmError("PretrainTask has no objective: give icd (ICD pretext), contrastive (report contrastive), "
                             "masked (masked volume, CNN), mae (MAE, ViT) or several (multi-task)")
        weights = {k: c.weight for k, c in groups.items() if c is not None}
        if min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise VolfmError(f"loss weights must be >= 0 with at least one positive, got "
                             f"{', '.join(f'{k}.weight={v:g}' for k, v in weights.items())}")
        if self.freeze_encoder and (self.masked_cfg is not None or self.mae_cfg is not None):
            raise VolfmError("freeze_encoder trains only heads (a linear probe); masked/mae pretraining trains the "
                             "encoder: set freeze_encoder: false or drop the masked/mae group")
        # self-supervised decoders (built now: they depend only on the encoder); state keys decoder.* (the name
        # SegmentationTask's decoder has, so decoder.pretrained can carry it) and mae_decoder.*
        self.decoder = build_masked_decoder(self.encoder, self.masked_cfg) if self.masked_cfg is not None else None
        self.mae_decoder = build_mae_decoder(self.encoder, self.mae_cfg) if self.mae_cfg is not None else None
        if self.icd_cfg is not None and self.icd_cfg.loss not in ICD_LOSSES:
            raise VolfmError(f"icd.loss must be 'bce' or 'focal', got {self.icd_cfg.loss!r}")
        if self.con_cfg is not None and self.con_cfg.report_mode not in REPORT_MODES:
            raise VolfmError(f"contrastive.report_mode must be whole, findings_impression or random_section, got "
                             f"{self.con_cfg.report_mode!r}")
        self.vocab = None          # volfm.targets.icd.IcdVocabulary, built in setup() or restored from a checkpoint
        self.icd_head: nn.Module | None = None
        self.text = None           # volfm.models.text.TextEncoder
        self.image_proj: nn.Module | None = None
        self.text_proj: nn.Module | None = None
        self.logit_scale: nn.Module | None = None
        self.register_buffer("icd_pos_weight", torch.empty(0), persistent=False)
        self._shuffled_codes: dict[str, list[str]] = {}
        self._prompts = None
        self._eval: dict[str, list] = {}
        self._eval_keys = None

    # ------------------------------------------------------------------------------------ building
    @property
    def use_icd(self) -> bool:
        return self.icd_cfg is not None and self.icd_cfg.weight > 0

    @property
    def use_contrastive(self) -> bool:
        return self.con_cfg is not None and self.con_cfg.weight > 0

    @property
    def use_masked(self) -> bool:
        return self.masked_cfg is not None and self.masked_cfg.weight > 0

    @property
    def use_mae(self) -> bool:
        return self.mae_cfg is not None and self.mae_cfg.weight > 0

    def _datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "train_rows"):
            raise VolfmError("the pretraining task needs a store DataModule (data: in the recipe, e.g. "
                             "volfm.data.PretrainDataModule)")
        return dm

    def _build_icd(self, vocab) -> None:
        self.vocab = vocab
        head = MultiLabelHead(self.num_features, len(vocab), dropout=self.icd_cfg.dropout)
        self.icd_head = head.to(self.device)

    def _build_text(self, text_encoder) -> None:
        c = self.con_cfg
        self.text = text_encoder.to(self.device)
        self.image_proj = ProjectionHead(self.num_features, c.embed_dim, c.projection).to(self.device)
        self.text_proj = ProjectionHead(self.text.hidden_size, c.embed_dim, c.projection).to(self.device)
        self.logit_scale = LogitScale(c.init_temperature, learnable=c.learn_temperature).to(self.device)

    def setup(self, stage: str) -> None:
        self.load_pretrained(stage)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        ic, c = self.icd_cfg, self.con_cfg
        need_vocab = self.use_icd and self.vocab is None
        need_text = self.use_contrastive and self.text is None
        dm = self._datamodule() if (need_vocab or need_text or (self.use_icd and ic.random_labels)) else None
        rows = dm.train_rows() if dm is not None else []
        if need_vocab:
            vocab = IcdVocabulary.build([parse_icd_codes(r.get("icd_codes")) for r in rows], level=ic.level,
                                        mapping=ic.mapping, min_count=ic.min_count, source=f"{dm.store} (train split)")
            self._build_icd(vocab)
            self.info(vocab.summary().replace("\n", "\n  "))
        if self.use_icd and ic.pos_weight and self.icd_pos_weight.numel() == 0:
            pos = torch.tensor([self.vocab.counts[c] for c in self.vocab.classes], dtype=torch.float32)
            n_cases = int(self.vocab.stats.get("cases") or len(rows) or 1)
            self.icd_pos_weight = pos_weight_from_counts(pos, n_cases).to(self.device)
        if self.use_icd and ic.random_labels and not self._shuffled_codes:
            perm = np.random.default_rng(self.seed).permutation(len(rows))
            self._shuffled_codes = {r["case_id"]: parse_icd_codes(rows[j].get("icd_codes")) for r, j in zip(rows, perm)}
            self.info("random_labels: ICD code lists permuted among the training cases (a control run)")
        if need_text:
            if c.text_model is not None and not Path(c.text_model).expanduser().is_dir():
                raise VolfmError(f"contrastive.text_model {c.text_model}: no such local folder; give a folder written "
                                 "by save_pretrained (nothing is downloaded), or leave it unset for the built-in small "
                                 "BERT trained on the cohort's reports")
            reports = [(r.get("report") or "").strip() for r in rows]
            reports = [r for r in reports if r]
            if c.text_model is None and not reports:
                raise VolfmError("report contrastive pretraining: no training case has a report (the manifest's "
                                 "'report' column is empty); add reports to the cohort table or set contrastive: null")
            cfg = dict(c.text_config or {})
            tokenizer = None
            if c.text_model is None:
                # WordPiece training is not bit-reproducible across processes: rank 0 trains, the others take its
                # tokenizer, so every rank maps a word to the same embedding row
                tok_json = None
                if self._trainer is None or self.trainer.is_global_zero:
                    tok_json = tokenizer_to_json(train_wordpiece_tokenizer(
                        reports, vocab_size=int(cfg.get("vocab_size", 8000)), model_max_length=c.text_max_length))
                if self._trainer is not None:
                    tok_json = self.trainer.strategy.broadcast(tok_json, src=0)
                tokenizer = tokenizer_from_json(tok_json)
            self._build_text(build_text_encoder(c.text_model, texts=reports, max_length=c.text_max_length,
                                                pooling=c.text_pooling, tokenizer=tokenizer,
                                                global_attention=c.text_global_attention,
                                                normalize=c.text_normalize, **cfg))
            src = c.text_model or f"a small BERT with a WordPiece tokenizer trained on {len(reports)} training reports"
            n = sum(p.numel() for p in self.text.parameters())
            self.info(f"text encoder: {src} ({n / 1e6:.1f} M parameters, hidden {self.text.hidden_size})")
            if stage == "fit" and not self.resuming:
                self._continue_projections()

    def _continue_projections(self) -> None:
        """With ``encoder.pretrained`` a model package or merlin:PATH that carries report-contrastive heads of the same
        shapes (a pretraining package; Merlin's contrastive head, text projection and logit scale), start the new
        projections from them, so report-contrastive training continues from both towers instead of fresh heads."""
        heads = pretrained_projections(self.encoder_cfg.pretrained)
        own = {k: v for k, v in self.state_dict().items() if k.startswith(PROJECTION_PREFIXES)}
        fit = {k: v for k, v in heads.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if not heads:
            return
        if len(fit) != len(own):
            self.info(f"contrastive heads of {self.encoder_cfg.pretrained} do not fit this task's "
                      f"({sorted(set(own) - set(fit))[:3]} differ or are missing): the projections start fresh")
            return
        self.load_state_dict(fit, strict=False)
        self.info(f"contrastive projections and logit scale continued from {self.encoder_cfg.pretrained}")

    # ---------------------------------------------------------------------------------- checkpoints
    def checkpoint_record(self) -> dict:
        info: dict[str, Any] = {}
        if self.vocab is not None:
            info["icd_vocab"] = self.vocab.to_dict()
        if self.text is not None:
            info["text"] = self.text.to_spec()
        return info

    def restore_record(self, info: dict) -> None:
        """Vocabulary and text encoder from a checkpoint's record (unless the ones built already are equal).
        Lightning restores after setup() and before it wraps the model (DDP) and builds the optimisers, so a
        module rebuilt here is the one that trains on resume."""
        if self.use_icd and info.get("icd_vocab") is not None:
            vocab = IcdVocabulary.from_dict(info["icd_vocab"])
            if self.vocab is None or list(self.vocab.classes) != list(vocab.classes):
                self._build_icd(vocab)
        if self.use_contrastive and info.get("text") is not None:
            if self.text is None or self.text.to_spec() != info["text"]:
                self._build_text(TextEncoder.from_spec(info["text"]))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        return self

    def on_fit_end(self) -> None:
        """Also write the encoder alone as safetensors next to the logs (what fine-tuning loads); without a
        logger there is no run folder, and the checkpoint itself serves (load_encoder_weights reads both)."""
        if not self.trainer.loggers:
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if "FSDP" in type(self.trainer.strategy).__name__:  # the full state dict is a collective there
            self.info("FSDP: encoder.safetensors not written; pretrained: takes the checkpoint itself")
            return
        if self.trainer.is_global_zero and log_dir:
            path = save_encoder(self.encoder, Path(log_dir) / "encoder.safetensors")
            print(f"encoder weights: {path}", flush=True)
            if self.decoder is not None:
                path = save_weights(self.decoder, Path(log_dir) / "decoder.safetensors",
                                    {"volfm.decoder": "unet", "volfm.encoder": self.encoder_cfg.name})
                print(f"decoder weights (U-Net, for SegmentationTask decoder.pretrained): {path}", flush=True)

    # ------------------------------------------------------------------------------------ forward
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_pooled(image)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_proj(features), dim=-1)

    def text_embedding(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(self.text_proj(self.text(list(texts))), dim=-1)

    output_kind = "embedding"  # what volfm predict writes for this task

    @torch.no_grad()
    def predict_embedding(self, image) -> dict[str, Any]:
        """One stored-grid image (C, I, J, K), whole, through the encoder: ``features`` (the pooled encoder features,
        num_features), ``probabilities`` (the ICD/phenotype head's sigmoid per class, when there is a head) and
        ``embedding`` (the L2-normalised joint image-report embedding, when there is a projection)."""
        was_training = self.training
        self.eval()
        try:
            x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=self.device)[None]
            feats = self.image_features(x)
            out: dict[str, Any] = {"features": feats[0].float().cpu().numpy()}
            if self.icd_head is not None:
                out["probabilities"] = torch.sigmoid(self.icd_head(feats))[0].float().cpu().numpy()
            if self.image_proj is not None:
                out["embedding"] = self.image_embedding(feats)[0].float().cpu().numpy()
            return out
        finally:
            self.train(was_training)

    def _codes(self, batch: dict, train: bool) -> list[list[str]]:
        codes = batch.get("icd_codes") or [[] for _ in batch["case_id"]]
        if train and self._shuffled_codes:
            codes = [self._shuffled_codes.get(cid, c) for cid, c in zip(batch["case_id"], codes)]
        return codes

    def _targets(self, codes: list[list[str]]) -> torch.Tensor:
        return torch.from_numpy(self.vocab.encode_many(codes)).to(self.device)

    def _report_texts(self, batch: dict, train: bool) -> tuple[list[int], list[str]]:
        """Indices of the cases that have a report, and the text each contributes."""
        reports = batch.get("report") or [""] * len(batch["case_id"])
        mode = self.con_cfg.report_mode
        if not train and mode == "random_section":
            mode = "whole"
        keep, texts = [], []
        for i, (cid, rep) in enumerate(zip(batch["case_id"], reports)):
            rep = (rep or "").strip()
            if not rep:
                continue
            rng = np.random.default_rng([self.seed, self.current_epoch, zlib.crc32(str(cid).encode())])
            text = report_views(rep, mode, rng=rng)
            if text:
                keep.append(i)
                texts.append(text)
        return keep, texts

    def _global_count(self, n: int) -> int:
        """``n`` summed over the ranks (every rank takes the same branch, so collectives stay matched)."""
        if self.con_cfg.gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([n], device=self.device)
            torch.distributed.all_reduce(t)
            return int(t.item())
        return n

    def _generator(self, batch: dict, train: bool, stream: str) -> torch.Generator:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return step_generator(self.seed, self.global_step, rank, batch["case_id"], train, stream)

    def _step(self, batch: dict, train: bool) -> tuple[torch.Tensor, dict, dict]:
        ic, c = self.icd_cfg, self.con_cfg
        image = batch["image"]
        logs, outs = {}, {}
        loss = image.new_zeros((), dtype=torch.float32)
        if self.use_masked:
            l_mask, _, _ = masked_volume_loss(self.encoder, self.decoder, image, self.masked_cfg,
                                              self._generator(batch, train, "masked"))
            loss = loss + self.masked_cfg.weight * l_mask
            logs["masked_loss"] = l_mask.detach()
        if self.use_mae:
            l_mae, _, _ = mae_loss(self.encoder, self.mae_decoder, image, self.mae_cfg,
                                   self._generator(batch, train, "mae"))
            loss = loss + self.mae_cfg.weight * l_mae
            logs["mae_loss"] = l_mae.detach()
        if not (self.use_icd or self.use_contrastive):
            logs["loss"] = loss.detach()
            return loss, logs, outs
        feats = self.image_features(image)
        outs["features"] = feats
        if self.use_icd:
            codes = self._codes(batch, train)
            target = self._targets(codes)
            logits = self.icd_head(feats)
            pw = self.icd_pos_weight if self.icd_pos_weight.numel() else None
            l_icd = multilabel_loss(logits.float(), target, pos_weight=pw,
                                    focal_gamma=ic.focal_gamma if ic.loss == "focal" else 0.0)
            loss = loss + ic.weight * l_icd
            logs["icd_loss"] = l_icd.detach()
            outs["icd_logits"], outs["icd_target"] = logits.detach(), target
        if self.use_contrastive:
            keep, texts = self._report_texts(batch, train)
            img_all = self.image_embedding(feats)
            scale = self.logit_scale()  # once per step: in training it also clamps its parameter in place
            if keep:
                img_e, txt_e = img_all[keep], self.text_embedding(texts)
            else:  # no report in this local batch: run the towers on a placeholder so every parameter is used
                empty = self.text_embedding([""])
                img_e, txt_e = img_all[:0], empty[:0]
                placeholder = (img_all.sum() + empty.sum()) * 0.0
            if self._global_count(len(keep)) >= 2:
                l_con = contrastive_loss(img_e.float(), txt_e.float(), scale, gather=c.gather)
                if not keep:
                    l_con = l_con + placeholder
            else:  # e.g. a last batch with one report: no negatives, no InfoNCE; zero keeps the graph whole
                l_con = (img_all.sum() + (txt_e.sum() if keep else placeholder) + scale) * 0.0
            loss = loss + c.weight * l_con
            logs["contrastive_loss"] = l_con.detach()
            logs["temperature"] = 1.0 / scale.detach()
            outs["keep"], outs["image_emb"], outs["text_emb"] = keep, img_all.detach(), txt_e.detach()
        logs["loss"] = loss.detach()
        return loss, logs, outs

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs, _ = self._step(batch, train=True)
        bs = len(batch["case_id"])
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=bs, sync_dist=False)
        self.log("train_loss", logs["loss"], prog_bar=True, batch_size=bs)
        return loss

    # --------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict, prefix: str) -> None:
        loss, logs, outs = self._step(batch, train=False)
        bs = len(batch["case_id"])
        self.log_dict({f"{prefix}/{k}": v for k, v in logs.items()}, batch_size=bs, sync_dist=True)
        acc = self._eval
        # DDP pads evaluation shards with repeated cases: the key lets epoch metrics count each case once
        acc.setdefault("case_key", []).append(torch.tensor([zlib.crc32(str(c).encode()) for c in batch["case_id"]],
                                                           dtype=torch.int64, device=self.device))
        if self.use_icd:
            acc.setdefault("icd_score", []).append(torch.sigmoid(outs["icd_logits"].float()))
            acc.setdefault("icd_target", []).append(outs["icd_target"])
        if self.use_contrastive:
            n = bs
            # fixed-size per-batch rows (text NaN where a case has no report) so all_gather works across ranks
            img = outs["image_emb"].float()
            txt = img.new_full((n, self.con_cfg.embed_dim), float("nan"))
            if outs["keep"]:
                txt[outs["keep"]] = outs["text_emb"].float()
            acc.setdefault("image_emb", []).append(img)
            acc.setdefault("text_emb", []).append(txt)
            if self.eval_cfg.prompts:
                acc.setdefault("finding_truth", []).append(
                    torch.from_numpy(finding_truth(batch.get("icd_codes") or [[]] * n, self._get_prompts()))
                    .to(torch.uint8).to(self.device))

    def _get_prompts(self):
        if self._prompts is None:
            self._prompts = load_prompts(self.eval_cfg.prompts)
        return self._prompts

    def _gathered(self, key: str) -> np.ndarray | None:
        parts = self._eval.get(key)
        if not parts:
            return None
        local = torch.cat(parts)
        full = self.all_gather(local)
        if full.ndim == local.ndim + 1:
            full = full.reshape(-1, *local.shape[1:])
        full = full.cpu().numpy()
        keys = self._eval_keys
        return full if keys is None else full[keys]

    def _epoch_metrics(self, prefix: str) -> dict:
        h = self.eval_cfg
        out = {}
        self._eval_keys = None
        keys = self._gathered("case_key")
        self._eval_keys = None if keys is None else np.sort(np.unique(keys, return_index=True)[1])
        score, target = self._gathered("icd_score"), self._gathered("icd_target")
        if score is not None:
            m = multilabel_metrics(target, score, class_names=list(self.vocab.classes), min_positives=h.min_positives)
            for k in ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc"):
                out[f"{prefix}/icd_{k}"] = m[k]
            out[f"{prefix}/icd_classes_scored"] = float(m["n_classes_scored"])
        img, txt = self._gathered("image_emb"), self._gathered("text_emb")
        if img is not None:
            ok = ~np.isnan(txt).any(axis=1)  # retrieval: cases with a report; zero-shot: every case
            if ok.sum() >= 2:
                r = retrieval_metrics(img[ok], txt[ok], ks=tuple(h.retrieval_ks))
                for direction, short in (("image_to_report", "i2r"), ("report_to_image", "r2i")):
                    for k in h.retrieval_ks:
                        out[f"{prefix}/{short}_R@{k}"] = r[direction][f"R@{k}"]
            truth = self._gathered("finding_truth")
            if truth is not None and h.prompts and len(img) >= 2:
                with torch.no_grad():
                    scores, names = zero_shot_scores(img, self.text_embedding, self._get_prompts())
                z = zero_shot_metrics(scores, truth.astype(bool), names)
                out[f"{prefix}/zeroshot_macro_auroc"] = z["macro_auroc"]
                out[f"{prefix}/zeroshot_macro_f1"] = z["macro_f1"]
        return {k: float(v) for k, v in out.items()}

    def _eval_epoch_end(self, prefix: str) -> None:
        metrics = self._epoch_metrics(prefix)
        self._eval = {}
        if not self.trainer.sanity_checking:
            # the same numbers on every rank (computed from gathered arrays); sync_dist keeps them so
            self.log_dict({k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}, sync_dist=True)
            self.last_metrics = metrics

    def on_validation_epoch_start(self) -> None:
        self._eval = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # --------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        o = self.optim_cfg
        text_lr = (self.con_cfg.text_lr if self.con_cfg is not None else None) or o.lr
        text_ids = {id(p) for p in self.text.parameters()} if self.text is not None else set()
        return adamw_warmup_decay(self, lambda name, p: text_lr if id(p) in text_ids else o.lr,
                                  o.weight_decay, o.warmup_fraction, "cosine")


class MaskedVolumeTask(PretrainTask):
    """Masked-volume pretraining of a CNN encoder with the U-Net decoder (see :mod:`volfm.tasks.ssl`): a
    :class:`PretrainTask` whose ``masked`` group is on and whose ICD and report groups are off unless given (then
    it is a hybrid). Recipes: ``recipes/masked_volume.yaml``, ``recipes/hybrid_pretrain.yaml``."""

    default_encoder = EncoderConfig("resnet50_3d")

    def __init__(self, encoder: EncoderConfig | None = None, masked: MaskedVolumeConfig | None = MaskedVolumeConfig(),
                 icd: IcdHeadConfig | None = None, contrastive: ContrastiveConfig | None = None,
                 mae: MAEConfig | None = None, evaluation: PretrainEvalConfig | None = None,
                 freeze_encoder: bool = False, optim: PretrainOptimConfig | None = None,
                 patch_size: Sequence[int] | None = None, seed: int = 0):
        super().__init__(encoder=encoder, icd=icd, contrastive=contrastive, masked=masked, mae=mae,
                         evaluation=evaluation, freeze_encoder=freeze_encoder, optim=optim, patch_size=patch_size,
                         seed=seed)


class MAETask(PretrainTask):
    """MAE pretraining of a ``vit_*_3d`` encoder (see :mod:`volfm.tasks.ssl`): a :class:`PretrainTask` whose ``mae``
    group is on and whose ICD and report groups are off unless given. Recipe: ``recipes/mae_vit.yaml``; fine-tune
    with SegmentationTask (UNETR decoder) from its checkpoint or encoder.safetensors."""

    default_encoder = EncoderConfig("vit_base_3d")

    def __init__(self, encoder: EncoderConfig | None = None, mae: MAEConfig | None = MAEConfig(),
                 icd: IcdHeadConfig | None = None, contrastive: ContrastiveConfig | None = None,
                 masked: MaskedVolumeConfig | None = None, evaluation: PretrainEvalConfig | None = None,
                 freeze_encoder: bool = False, optim: PretrainOptimConfig | None = None,
                 patch_size: Sequence[int] | None = None, seed: int = 0):
        super().__init__(encoder=encoder, icd=icd, contrastive=contrastive, masked=masked, mae=mae,
                         evaluation=evaluation, freeze_encoder=freeze_encoder, optim=optim, patch_size=patch_size,
                         seed=seed)
