"""`volfm convert merlin CKPT --out DIR`: Merlin's released checkpoint as a volfm model package.

    volfm convert merlin i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt --out merlin/ \
        --phenotypes phenotypes.csv [--text-model /models/Clinical-Longformer]

writes

    DIR/encoder.safetensors        the image encoder as a plain volfm resnet152_3d (``encoder.pretrained: DIR/...``)
    DIR/model.yaml, model.safetensors, README.md, icd_vocab.json[, text.json]
                                   a PretrainTask package: ``volfm predict --model DIR`` gives each CT's pooled
                                   features, its phenotype probabilities and (with the text tower) its joint
                                   image-report embedding; ``pretrained: DIR`` fine-tunes from it
    DIR/merlin_heads.safetensors   Merlin's heads in volfm names (icd_head, image_proj, text_proj, logit_scale), also
                                   when there is no text tower to package the projections with
    DIR/text/                      with --text-model: Clinical-Longformer with Merlin's text weights and settings
                                   (1024 tokens, no global attention, Merlin's report normalisation), for
                                   ``contrastive.text_model: DIR/text``

The checkpoint is read with ``torch.load(weights_only=True)``; see :mod:`volfm.models.merlin` for the key map.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from volfm import VolfmError
from volfm.models.merlin import MERLIN_ENCODER_KWARGS, MerlinWeights, merlin_weights
from volfm.models.package import check_package_target
from volfm.models.text import build_text_encoder
from volfm.models.weights import save_encoder, save_weights_dict, state_mismatch
from volfm.preprocess.spec import load_spec, spec_hash
from volfm.targets.icd import IcdMapping, IcdVocabulary
from volfm.tasks import ContrastiveConfig, EncoderConfig, IcdHeadConfig, PretrainTask
from volfm.tasks.package import package_task

__all__ = ["convert_merlin", "merlin_vocabulary"]

MERLIN_TEXT = {"text_max_length": 1024, "text_pooling": "cls", "text_global_attention": "none",
               "text_normalize": "merlin", "embed_dim": 512, "projection": "linear"}


def merlin_vocabulary(n: int, phenotypes: str | Path | None, source: str) -> IcdVocabulary:
    """The classes of Merlin's classifier: rows of ``phenotypes`` (Merlin's documentation/phenotypes.csv, columns
    phecode, phecode_str; row i = output i), or numbered classes without it."""
    if phenotypes is None:
        classes, desc = [f"class_{i:04d}" for i in range(n)], {}
        note = "classes numbered in the classifier's output order (no --phenotypes file given)"
    else:
        path = Path(phenotypes)
        if not path.is_file():
            raise VolfmError(f"--phenotypes {path} does not exist; give Merlin's documentation/phenotypes.csv")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "phecode" not in rows[0]:
            raise VolfmError(f"--phenotypes {path}: expected columns phecode, phecode_str (Merlin's phenotypes.csv)")
        if len(rows) != n:
            raise VolfmError(f"--phenotypes {path} has {len(rows)} rows but the checkpoint's classifier has {n} outputs "
                             "(the five-year checkpoint has 6 outcomes, not phenotypes); leave --phenotypes out")
        classes = [r["phecode"].strip() for r in rows]
        desc = {r["phecode"].strip(): (r.get("phecode_str") or "").strip() for r in rows}
        note = f"Merlin phenotypes (phecodes) from {path.name}"
    return IcdVocabulary(classes, "mapping", descriptions=desc, min_count=1,
                         mapping=IcdMapping({}, info={"note": note + "; no ICD-10-CM -> phecode table: to train this "
                                                              "head on ICD codes give icd.mapping a phecode map"}),
                         source=source)


def _text_encoder(w: MerlinWeights, text_model: str | Path, source: str):
    """The local Clinical-Longformer folder with Merlin's text weights loaded (strictly: only the position-id buffer,
    which transformers versions store or not, may differ), in Merlin's settings."""
    if not w.text:
        raise VolfmError(f"--text-model given but {source} has no text tower ('encode_text.text_encoder.*'; the "
                         "five-year checkpoint has none)")
    enc = build_text_encoder(text_model, max_length=MERLIN_TEXT["text_max_length"], pooling="cls",
                             global_attention="none", normalize="merlin")
    own = enc.model.state_dict()
    state = {k: v for k, v in w.text.items() if k in own or not k.endswith("position_ids")}
    if enc.model.pooler is None:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    missing, unexpected, bad = state_mismatch(own, state)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected or bad:
        raise VolfmError(f"--text-model {text_model} does not fit Merlin's text weights in {source} (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {bad[:3]}); give a local copy of "
                         "yikuan8/Clinical-Longformer")
    enc.model.load_state_dict(state, strict=False)
    return enc


def convert_merlin(ckpt, out, *, phenotypes=None, text_model=None, spec: str = "ct_merlin",
                   overwrite: bool = False) -> dict:
    """Convert Merlin's ``.pt`` into the package folder ``out`` (see the module docstring); returns a summary."""
    ckpt, out = Path(ckpt), check_package_target(out, overwrite)
    w = merlin_weights(ckpt)
    if not w.classifier:
        raise VolfmError(f"{ckpt} has no classifier ('classifier.weight/bias' of the I3ResNet); Merlin's released "
                         "checkpoints all have one: is the file complete?")
    out.mkdir(parents=True, exist_ok=True)
    encoder = w.build_encoder().float()
    enc_path = save_encoder(encoder, out / "encoder.safetensors")
    vocab = merlin_vocabulary(w.num_classes, phenotypes, source=f"{ckpt.name} classifier")
    text = _text_encoder(w, text_model, str(ckpt)) if text_model is not None else None
    con = None
    if text is not None:
        text_dir = text.save_pretrained(out / "text")
        con = ContrastiveConfig(text_model=str(text_dir.resolve()), **MERLIN_TEXT)
    task = PretrainTask(encoder=EncoderConfig(w.encoder_name, dict(MERLIN_ENCODER_KWARGS)),
                        icd=IcdHeadConfig(level="category", min_count=1), contrastive=con)
    task.restore_record({"icd_vocab": vocab.to_dict(), **({"text": text.to_spec()} if text is not None else {})})
    heads = w.task_heads()
    with torch.no_grad():
        task.encoder.load_state_dict(encoder.state_dict())
        if text is not None:
            task.text.model.load_state_dict(text.model.state_dict())
        own = task.state_dict()
        fit = {k: v for k, v in heads.items() if k in own}
        _, _, bad = state_mismatch({k: own[k] for k in fit}, fit)
        if bad:
            raise VolfmError(f"{ckpt}: Merlin's heads do not fit volfm's ({', '.join(bad[:3])}); is this a Merlin "
                             "checkpoint?")
        task.load_state_dict(fit, strict=False)
    save_weights_dict({k: v.detach().float() for k, v in heads.items()}, out / "merlin_heads.safetensors",
                      {"source": ckpt.name, "classes": str(w.num_classes),
                       "logit_scale": "copied as log_scale, assuming CLIP's exp convention (unverified: Merlin's "
                                      "training loss is not public)"})
    resolved = load_spec(spec)
    notes = (f"## Source\n\nConverted by `volfm convert merlin` from `{ckpt.name}` (Merlin, Blankemeier et al. 2024, "
             "StanfordMIMI/Merlin, MIT licence): image encoder I3D "
             f"ResNet-{w.depth} ({'full MerlinArchitecture' if w.layout == 'merlin' else 'bare I3ResNet'} layout), "
             "classifier with "
             f"{w.num_classes} outputs ({vocab.mapping.info['note']})"
             + (", Clinical-Longformer text tower with Merlin's 768->512 projection" if text is not None else "")
             + ". Merlin's inference preprocessing is RAS, 1.5 x 1.5 x 3 mm, HU [-1000, 1000] -> [0, 1], "
               "224 x 224 x 160 (the ct_merlin spec)."
             + (" Without its text tower the package has no joint embedding: Merlin's contrastive head (2048 -> 512) "
                "is in merlin_heads.safetensors (image_proj.net.*); convert with --text-model to package it."
                if text is None and w.contrastive_head else ""))
    package_task(task, out, data={"spec": resolved, "spec_hash": spec_hash(resolved), "input": "image"},
                 source=str(ckpt), name=out.resolve().name, overwrite=overwrite, card_notes=notes)
    return {"out": str(out), "encoder": str(enc_path), "encoder_name": w.encoder_name, "layout": w.layout,
            "tensors": len(w.encoder), "classes": w.num_classes, "text": text is not None,
            "contrastive_head": bool(w.contrastive_head), "notes": w.notes}
