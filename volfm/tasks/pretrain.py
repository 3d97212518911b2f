"""Merlin-style pretraining: ICD-code multi-label pretext and CT-report contrastive learning.

Merlin (Blankemeier et al.) trains an I3D ResNet-152 on whole CT volumes with two signals: EHR
diagnosis codes (phecodes from ICD codes, multi-label BCE on the pooled features) and the
radiology report (CLIP-style InfoNCE between image and report embeddings), either staged (codes
first, then reports) or multi-task (both losses together). One LightningModule does all three:

    IcdPretrainTask          icd_weight 1, no text tower
    ReportContrastiveTask    contrastive_weight 1, optional icd_weight > 0 (multi-task), optional
                             ``pretrained`` = an ICD-pretext checkpoint (staged)

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
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from volfm import VolfmError
from volfm.data.dataset import parse_icd_codes
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
from volfm.models import create_encoder, load_encoder_weights, save_encoder
from volfm.models.heads import MultiLabelHead, ProjectionHead
from volfm.models.text import (
    TextEncoder,
    build_text_encoder,
    tokenizer_from_json,
    tokenizer_to_json,
    train_wordpiece_tokenizer,
)
from volfm.targets.icd import IcdVocabulary
from volfm.targets.reports import report_views
from volfm.tasks.optim import adamw_warmup_decay

__all__ = ["PretrainTask", "IcdPretrainTask", "ReportContrastiveTask"]


def _rank_zero_print(module: pl.LightningModule, text: str) -> None:
    trainer = module._trainer
    if trainer is None or trainer.is_global_zero:
        print(text, flush=True)


class PretrainTask(pl.LightningModule):
    """Image encoder + ICD head and/or report contrastive towers (see the module docstring).

    Encoder: ``encoder`` (a registry name) built with ``encoder_kwargs``; ``pretrained``: a volfm
    checkpoint (.ckpt of any volfm task, or encoder .safetensors) whose encoder weights are loaded
    before training (staged pretraining); ``freeze_encoder`` trains only the heads (a linear probe).

    ICD pretext (``icd_weight > 0``): vocabulary built from the training split's ``icd_codes`` at
    ``icd_level`` (full, category, block, chapter) or through ``icd_mapping`` (a CSV, e.g. a phecode
    map), classes seen in fewer than ``icd_min_count`` training cases dropped; ``icd_loss`` "bce" or
    "focal" (``focal_gamma``), ``pos_weight`` balances rare classes. ``random_labels`` permutes the
    code lists among training cases (a control: a model must not learn from it).

    Report contrastive (``contrastive_weight > 0``): ``text_model`` a local Hugging Face folder, or
    None for the offline default (a small BERT from ``text_config`` with a WordPiece tokenizer trained
    on the training reports); ``report_mode`` "whole", "findings_impression" or "random_section"
    (Merlin's organ sections); projections to ``embed_dim``; learnable temperature; under DDP the
    embeddings of all ranks are gathered (``gather``). Cases with an empty report are skipped for
    this loss and kept for the ICD loss.
    """

    def __init__(self, encoder: str = "resnet152_3d", encoder_kwargs: dict | None = None,
                 pretrained: str | None = None, freeze_encoder: bool = False,
                 icd_weight: float = 1.0, icd_level: str = "category", icd_mapping: str | None = None,
                 icd_min_count: int = 5, icd_loss: str = "bce", focal_gamma: float = 2.0, pos_weight: bool = False,
                 head_dropout: float = 0.0, random_labels: bool = False,
                 contrastive_weight: float = 0.0, text_model: str | None = None, text_max_length: int = 512,
                 text_pooling: str = "cls", text_config: dict | None = None, report_mode: str = "whole",
                 embed_dim: int = 512, projection: str = "linear", init_temperature: float = 0.07,
                 learn_temperature: bool = True, gather: bool = True,
                 prompts: str | None = "ct_findings", min_positives: int = 2, retrieval_ks: tuple[int, ...] = (1, 5, 10),
                 lr: float = 1e-4, text_lr: float | None = None, weight_decay: float = 0.05,
                 warmup_fraction: float = 0.05, seed: int = 0):
        # every argument of this (base) signature, whatever subclass called it: Lightning's frame
        # inspection would only record the subclass's own arguments
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters(args)

        if icd_weight < 0 or contrastive_weight < 0 or icd_weight + contrastive_weight <= 0:
            raise VolfmError(f"loss weights icd_weight={icd_weight}, contrastive_weight={contrastive_weight}: give at "
                             "least one positive weight (ICD pretext, report contrastive, or both)")
        if icd_loss not in ("bce", "focal"):
            raise VolfmError(f"icd_loss must be 'bce' or 'focal', got {icd_loss!r}")
        if report_mode not in ("whole", "findings_impression", "random_section"):
            raise VolfmError(f"report_mode must be whole, findings_impression or random_section, got {report_mode!r}")
        self.encoder = create_encoder(encoder, **(encoder_kwargs or {}))
        self.num_features = int(self.encoder.num_features)
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
        return self.hparams.icd_weight > 0

    @property
    def use_contrastive(self) -> bool:
        return self.hparams.contrastive_weight > 0

    def _train_rows(self) -> list[dict]:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise VolfmError("the pretraining task needs a DataModule (data: in the recipe, e.g. "
                             "volfm.data.datamodules.PretrainDataModule)")
        if "train" not in getattr(dm, "datasets", {}):
            dm.setup("fit")
        return list(dm.datasets["train"].dataset.rows)

    def _build_icd(self, vocab) -> None:
        self.vocab = vocab
        head = MultiLabelHead(self.num_features, len(vocab), dropout=self.hparams.head_dropout)
        self.icd_head = head.to(self.device)

    def _build_text(self, text_encoder) -> None:
        h = self.hparams
        self.text = text_encoder.to(self.device)
        self.image_proj = ProjectionHead(self.num_features, h.embed_dim, h.projection).to(self.device)
        self.text_proj = ProjectionHead(self.text.hidden_size, h.embed_dim, h.projection).to(self.device)
        self.logit_scale = LogitScale(h.init_temperature, learnable=h.learn_temperature).to(self.device)

    def setup(self, stage: str) -> None:
        h = self.hparams
        if stage == "fit" and h.pretrained and not getattr(self, "_pretrained_loaded", False):
            load_encoder_weights(self.encoder, h.pretrained)
            self._pretrained_loaded = True
            _rank_zero_print(self, f"encoder weights loaded from {h.pretrained}")
        if self.hparams.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        need_vocab = self.use_icd and self.vocab is None
        need_text = self.use_contrastive and self.text is None
        rows = self._train_rows() if (need_vocab or need_text or (self.use_icd and h.random_labels)) else []
        if need_vocab:
            dm = self.trainer.datamodule
            source = f"{getattr(dm, 'hparams', {}).get('store', 'the store')} (train split)"
            vocab = IcdVocabulary.build([parse_icd_codes(r.get("icd_codes")) for r in rows], level=h.icd_level,
                                        mapping=h.icd_mapping, min_count=h.icd_min_count, source=source)
            self._build_icd(vocab)
            _rank_zero_print(self, vocab.summary().replace("\n", "\n  "))
        if self.use_icd and h.pos_weight and self.icd_pos_weight.numel() == 0:
            pos = torch.tensor([self.vocab.counts[c] for c in self.vocab.classes], dtype=torch.float32)
            n_cases = int(self.vocab.stats.get("cases") or len(rows) or 1)
            self.icd_pos_weight = pos_weight_from_counts(pos, n_cases).to(self.device)
        if self.use_icd and h.random_labels and not self._shuffled_codes:
            perm = np.random.default_rng(h.seed).permutation(len(rows))
            self._shuffled_codes = {r["case_id"]: parse_icd_codes(rows[j].get("icd_codes")) for r, j in zip(rows, perm)}
            _rank_zero_print(self, "random_labels: ICD code lists permuted among the training cases (a control run)")
        if need_text:
            if h.text_model is not None and not Path(h.text_model).expanduser().is_dir():
                raise VolfmError(f"text_model {h.text_model}: no such local folder; give a folder written by "
                                 "save_pretrained (nothing is downloaded), or leave text_model unset for the built-in "
                                 "small BERT trained on the cohort's reports")
            reports = [(r.get("report") or "").strip() for r in rows]
            reports = [r for r in reports if r]
            if h.text_model is None and not reports:
                raise VolfmError("report contrastive pretraining: no training case has a report (the manifest's "
                                 "'report' column is empty); add reports to the cohort table or use IcdPretrainTask")
            cfg = dict(h.text_config or {})
            tokenizer = None
            if h.text_model is None:
                # WordPiece training is not bit-reproducible across processes: rank 0 trains, the others take its
                # tokenizer, so every rank maps a word to the same embedding row
                tok_json = None
                if self._trainer is None or self.trainer.is_global_zero:
                    tok_json = tokenizer_to_json(train_wordpiece_tokenizer(
                        reports, vocab_size=int(cfg.get("vocab_size", 8000)), model_max_length=h.text_max_length))
                if self._trainer is not None:
                    tok_json = self.trainer.strategy.broadcast(tok_json, src=0)
                tokenizer = tokenizer_from_json(tok_json)
            self._build_text(build_text_encoder(h.text_model, texts=reports, max_length=h.text_max_length,
                                                pooling=h.text_pooling, tokenizer=tokenizer, **cfg))
            src = h.text_model or f"a small BERT with a WordPiece tokenizer trained on {len(reports)} training reports"
            n = sum(p.numel() for p in self.text.parameters())
            _rank_zero_print(self, f"text encoder: {src} ({n / 1e6:.1f} M parameters, hidden {self.text.hidden_size})")

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        info: dict[str, Any] = {"task": f"{type(self).__module__}.{type(self).__qualname__}",
                                "encoder": {"name": self.hparams.encoder, "kwargs": dict(self.hparams.encoder_kwargs or {})}}
        if self.vocab is not None:
            info["icd_vocab"] = self.vocab.to_dict()
        if self.text is not None:
            info["text"] = self.text.to_spec()
        checkpoint["volfm"] = info

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restore(checkpoint.get("volfm") or {})

    def _restore(self, info: dict) -> None:
        """Vocabulary and text encoder from a checkpoint's record (unless the ones built already are equal);
        the encoder weights then come from the checkpoint, so ``pretrained`` is not loaded again. Lightning
        restores after setup() and before it wraps the model (DDP) and builds the optimisers, so a module
        rebuilt here is the one that trains on resume."""
        self._pretrained_loaded = True
        if self.use_icd and info.get("icd_vocab") is not None:
            vocab = IcdVocabulary.from_dict(info["icd_vocab"])
            if self.vocab is None or list(self.vocab.classes) != list(vocab.classes):
                self._build_icd(vocab)
        if self.use_contrastive and info.get("text") is not None:
            if self.text is None or self.text.to_spec() != info["text"]:
                self._build_text(TextEncoder.from_spec(info["text"]))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        return self

    def on_fit_end(self) -> None:
        """Also write the encoder alone as safetensors next to the logs (what fine-tuning loads); without a
        logger there is no run folder, and the checkpoint itself serves (load_encoder_weights reads both)."""
        if not self.trainer.loggers:
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if "FSDP" in type(self.trainer.strategy).__name__:  # the full state dict is a collective there
            _rank_zero_print(self, "FSDP: encoder.safetensors not written; pretrained: takes the checkpoint itself")
            return
        if self.trainer.is_global_zero and log_dir:
            path = save_encoder(self.encoder, Path(log_dir) / "encoder.safetensors")
            print(f"encoder weights: {path}", flush=True)

    # ------------------------------------------------------------------------------------ forward
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_pooled(image)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_proj(features), dim=-1)

    def text_embedding(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(self.text_proj(self.text(list(texts))), dim=-1)

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
        mode = self.hparams.report_mode if train else ("whole" if self.hparams.report_mode == "random_section"
                                                       else self.hparams.report_mode)
        keep, texts = [], []
        for i, (cid, rep) in enumerate(zip(batch["case_id"], reports)):
            rep = (rep or "").strip()
            if not rep:
                continue
            rng = np.random.default_rng([self.hparams.seed, self.current_epoch, zlib.crc32(str(cid).encode())])
            text = report_views(rep, mode, rng=rng)
            if text:
                keep.append(i)
                texts.append(text)
        return keep, texts

    def _global_count(self, n: int) -> int:
        """``n`` summed over the ranks (every rank takes the same branch, so collectives stay matched)."""
        if self.hparams.gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([n], device=self.device)
            torch.distributed.all_reduce(t)
            return int(t.item())
        return n

    def _step(self, batch: dict, train: bool) -> tuple[torch.Tensor, dict, dict]:
        h = self.hparams
        image = batch["image"]
        feats = self.image_features(image)
        logs, outs = {}, {"features": feats}
        loss = feats.new_zeros(())
        if self.use_icd:
            codes = self._codes(batch, train)
            target = self._targets(codes)
            logits = self.icd_head(feats)
            pw = self.icd_pos_weight if self.icd_pos_weight.numel() else None
            l_icd = multilabel_loss(logits.float(), target, pos_weight=pw,
                                    focal_gamma=h.focal_gamma if h.icd_loss == "focal" else 0.0)
            loss = loss + h.icd_weight * l_icd
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
                l_con = contrastive_loss(img_e.float(), txt_e.float(), scale, gather=h.gather)
                if not keep:
                    l_con = l_con + placeholder
            else:  # e.g. a last batch with one report: no negatives, no InfoNCE; zero keeps the graph whole
                l_con = (img_all.sum() + (txt_e.sum() if keep else placeholder) + scale) * 0.0
            loss = loss + h.contrastive_weight * l_con
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
            txt = img.new_full((n, self.hparams.embed_dim), float("nan"))
            if outs["keep"]:
                txt[outs["keep"]] = outs["text_emb"].float()
            acc.setdefault("image_emb", []).append(img)
            acc.setdefault("text_emb", []).append(txt)
            if self.hparams.prompts:
                acc.setdefault("finding_truth", []).append(
                    torch.from_numpy(finding_truth(batch.get("icd_codes") or [[]] * n, self._get_prompts()))
                    .to(torch.uint8).to(self.device))

    def _get_prompts(self):
        if self._prompts is None:
            self._prompts = load_prompts(self.hparams.prompts)
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
        h = self.hparams
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
        h = self.hparams
        text_ids = {id(p) for p in self.text.parameters()} if self.text is not None else set()
        return adamw_warmup_decay(self, lambda name, p: (h.text_lr or h.lr) if id(p) in text_ids else h.lr,
                                  h.weight_decay, h.warmup_fraction, "cosine")


class IcdPretrainTask(PretrainTask):
    """ICD-code multi-label pretext (Merlin's EHR supervision): pooled features -> BCE over code classes."""

    def __init__(self, encoder: str = "resnet152_3d", encoder_kwargs: dict | None = None,
                 pretrained: str | None = None, freeze_encoder: bool = False,
                 icd_level: str = "category", icd_mapping: str | None = None, icd_min_count: int = 5,
                 icd_loss: str = "bce", focal_gamma: float = 2.0, pos_weight: bool = False, head_dropout: float = 0.0,
                 random_labels: bool = False, min_positives: int = 2,
                 lr: float = 1e-4, weight_decay: float = 0.05, warmup_fraction: float = 0.05, seed: int = 0):
        super().__init__(encoder=encoder, encoder_kwargs=encoder_kwargs, pretrained=pretrained,
                         freeze_encoder=freeze_encoder, icd_weight=1.0, icd_level=icd_level, icd_mapping=icd_mapping,
                         icd_min_count=icd_min_count, icd_loss=icd_loss, focal_gamma=focal_gamma,
                         pos_weight=pos_weight, head_dropout=head_dropout, random_labels=random_labels,
                         contrastive_weight=0.0, prompts=None, min_positives=min_positives, lr=lr,
                         weight_decay=weight_decay, warmup_fraction=warmup_fraction, seed=seed)


class ReportContrastiveTask(PretrainTask):
    """CT-report contrastive learning (symmetric InfoNCE); staged from an ICD checkpoint via
    ``pretrained``, or multi-task with ``icd_weight > 0``."""

    def __init__(self, encoder: str = "resnet152_3d", encoder_kwargs: dict | None = None,
                 pretrained: str | None = None, freeze_encoder: bool = False,
                 text_model: str | None = None, text_max_length: int = 512, text_pooling: str = "cls",
                 text_config: dict | None = None, report_mode: str = "whole", embed_dim: int = 512,
                 projection: str = "linear", init_temperature: float = 0.07, learn_temperature: bool = True,
                 gather: bool = True, contrastive_weight: float = 1.0,
                 icd_weight: float = 0.0, icd_level: str = "category", icd_mapping: str | None = None,
                 icd_min_count: int = 5, icd_loss: str = "bce", focal_gamma: float = 2.0, pos_weight: bool = False,
                 head_dropout: float = 0.0, random_labels: bool = False,
                 prompts: str | None = "ct_findings", min_positives: int = 2, retrieval_ks: tuple[int, ...] = (1, 5, 10),
                 lr: float = 1e-4, text_lr: float | None = None, weight_decay: float = 0.05,
                 warmup_fraction: float = 0.05, seed: int = 0):
        super().__init__(encoder=encoder, encoder_kwargs=encoder_kwargs, pretrained=pretrained,
                         freeze_encoder=freeze_encoder, icd_weight=icd_weight, icd_level=icd_level,
                         icd_mapping=icd_mapping, icd_min_count=icd_min_count, icd_loss=icd_loss,
                         focal_gamma=focal_gamma, pos_weight=pos_weight, head_dropout=head_dropout,
                         random_labels=random_labels, contrastive_weight=contrastive_weight, text_model=text_model,
                         text_max_length=text_max_length, text_pooling=text_pooling, text_config=text_config,
                         report_mode=report_mode, embed_dim=embed_dim, projection=projection,
                         init_temperature=init_temperature, learn_temperature=learn_temperature, gather=gather,
                         prompts=prompts, min_positives=min_positives, retrieval_ks=retrieval_ks, lr=lr,
                         text_lr=text_lr, weight_decay=weight_decay, warmup_fraction=warmup_fraction, seed=seed)
