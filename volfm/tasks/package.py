"""Model packages of volfm tasks: ``volfm export`` (a checkpoint -> a self-contained folder) and the model card.

    export_checkpoint("runs/seg/last.ckpt", "models/spleen")    # model.yaml, model.safetensors, README.md
    task, raw = load_task("models/spleen")                       # volfm.tasks.checkpoint: the same task back

A package is what :mod:`volfm.models.package` writes; this module decides what goes into it for a task: the task
class and its hyper-parameters, the checkpoint's ``volfm`` record (encoder, patch size, sliding-window settings, label
map or vocabulary, the preprocessing spec and input it was trained with, case counts, validation metrics), and a
README.md model card written from those same fields.
"""
from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import torch

from volfm import VolfmError, __version__
from volfm.models.package import PACKAGE_FILE, WEIGHTS_FILE, write_package
from volfm.models.weights import read_checkpoint
from volfm.store.layout import CohortStore
from volfm.targets.labelmap import LabelMap
from volfm.tasks.checkpoint import load_package_task

__all__ = ["LARGE_PARTS", "export_checkpoint", "model_card", "package_task", "write_task_package"]

# record entries written as <name>.json beside model.yaml (large, and not for reading by eye)
LARGE_PARTS = ("text", "icd_vocab")
KINDS = {"SegmentationTask": "segmentation", "SynthesisTask": "synthesis"}


def _kind(task_path: str) -> str:
    return KINDS.get(str(task_path).rpartition(".")[2], "pretraining")


def _labels(record: dict) -> list[str] | None:
    """The class names of a segmentation record's label map (output channel order)."""
    lm = record.get("labelmap")
    if not isinstance(lm, dict):
        return None
    return LabelMap.from_yaml(lm).class_names


def write_task_package(out, state: dict[str, torch.Tensor], hyper_parameters: dict, record: dict, *,
                       source: str, name: str | None = None, overwrite: bool = False,
                       card_notes: str = "") -> Path:
    """Write a task package from its parts (a checkpoint's, or a task built in memory) and check that it loads back
    into a task with exactly these tensors."""
    record = dict(record)
    task_path = record.pop("task", None) or hyper_parameters.get("_class_path")
    if not task_path:
        raise VolfmError(f"{source} does not say which volfm task wrote it (no 'task' in its record)")
    data = dict(record.get("data") or {})
    if not data.get("spec"):
        raise VolfmError(f"{source} records no preprocessing spec (written by an older volfm): pass --store STORE, the "
                         "store the model was trained on, so the package carries its spec")
    parts = {k: record.pop(k) for k in LARGE_PARTS if record.get(k) is not None}
    out = Path(out)
    hp = {k: v for k, v in hyper_parameters.items() if not str(k).startswith("_")}
    description = {
        "name": name or out.resolve().name,
        "kind": _kind(task_path),
        "task": task_path,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": str(source),
        "encoder": record.get("encoder"),
        "patch_size": record.get("patch_size"),
        "inference": record.get("inference"),
        "labels": _labels(record),
        "classes": len(parts["icd_vocab"]["classes"]) if "icd_vocab" in parts else None,
        "preprocessing": {"input": data.get("input"), "spec_hash": data.get("spec_hash"), "spec": data.get("spec")},
        "training": {"store": data.get("store"), "cases": data.get("cases"),
                     "train_cases_used": data.get("train_cases_used"), "metrics": record.get("metrics") or {}},
        "hyper_parameters": hp,
        "record": record,
    }
    description = {k: v for k, v in description.items() if v is not None}
    card = model_card({**description, "record": {**record, **parts}}, notes=card_notes)
    write_package(out, state, description, parts=parts, card=card, overwrite=overwrite)
    task, _ = load_package_task(out)  # the package must load into the task it describes, tensor for tensor
    mine = task.state_dict()
    bad = [k for k, v in state.items() if k not in mine or not torch.equal(mine[k].cpu(), v.detach().cpu())]
    if bad or len(mine) != len(state):
        (out / PACKAGE_FILE).unlink(missing_ok=True)  # no package rather than a wrong one
        raise VolfmError(f"the package written to {out} does not load back with the same weights "
                         f"({bad[:3] or 'key count differs'}); this is a volfm bug, please report it")
    return out


def inference_only(state: dict, hyper_parameters: dict) -> tuple[dict, dict, list[str]]:
    """(state, hyper-parameters, notes) without what only training needs from outside the package: a synthesis
    task's perceptual-loss network, which its settings would load from a file on the training machine."""
    losses = hyper_parameters.get("losses")
    if isinstance(losses, dict) and float(losses.get("perceptual") or 0) > 0:
        hp = {**hyper_parameters, "losses": {**losses, "perceptual": 0.0, "perceptual_encoder": None}}
        state = {k: v for k, v in state.items() if not k.startswith("perceptual.")}
        return state, hp, [f"The training-only perceptual loss (weight {losses.get('perceptual')}, network "
                           f"{losses.get('perceptual_encoder')}) is not in the package."]
    return state, hyper_parameters, []


def export_checkpoint(ckpt, out, *, store=None, name: str | None = None, overwrite: bool = False) -> Path:
    """``volfm export``: a task checkpoint written by ``volfm fit`` -> a model package folder. ``store``: the
    training store, needed only for a checkpoint from a volfm that did not record the preprocessing spec."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise VolfmError(f"--ckpt {ckpt} does not exist; give a .ckpt written by volfm fit")
    raw = read_checkpoint(ckpt)
    record = dict(raw.get("volfm") or {}) if isinstance(raw, dict) else {}
    if "task" not in record or not isinstance(raw.get("state_dict"), dict):
        raise VolfmError(f"{ckpt} is not a volfm task checkpoint (no 'volfm' record or state dict); give a .ckpt "
                         "written by volfm fit")
    if store is not None:
        spec = CohortStore(store).spec_record()
        if not spec["spec"]:
            raise VolfmError(f"{store}/spec.yaml holds no resolved spec; rerun volfm preprocess --overwrite there")
        data = dict(record.get("data") or {})
        dm = raw.get("datamodule_hyper_parameters") or {}
        arrays = list(dm.get("arrays") or data.get("arrays") or ["image"])
        data.update(spec)
        data.setdefault("input", record.get("source") or arrays[0])
        record["data"] = data
    state, hp, notes = inference_only(raw["state_dict"], raw.get("hyper_parameters") or {})
    return write_task_package(out, state, hp, record, source=str(ckpt), name=name, overwrite=overwrite,
                              card_notes="\n".join(notes))


def package_task(task, out, *, data: dict, source: str, name: str | None = None, overwrite: bool = False,
                 card_notes: str = "") -> Path:
    """A task built in memory (e.g. from converted weights) -> a package; ``data`` is its data record (at least
    ``spec`` and ``input``: what predict puts images through)."""
    ck: dict[str, Any] = {}
    task.on_save_checkpoint(ck)
    record = {**ck["volfm"], "data": {**(ck["volfm"].get("data") or {}), **data}}
    return write_task_package(out, task.state_dict(), dict(task.hparams), record, source=source, name=name,
                              overwrite=overwrite, card_notes=card_notes)


# ------------------------------------------------------------------------------------------------ the card
def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return "n/a" if v is None else str(v)


def model_card(desc: dict, notes: str = "") -> str:
    """The README.md of a package, from its description (model.yaml's fields, with the large parts)."""
    rec = desc.get("record") or {}
    pre = desc.get("preprocessing") or {}
    spec = pre.get("spec") or {}
    train = desc.get("training") or {}
    enc = desc.get("encoder") or {}
    kind = desc.get("kind")
    name = desc.get("name", "model")
    lines = [f"# {name}", "",
             f"A volfm model package ({kind}; task `{desc.get('task')}`), written by volfm {__version__} on "
             f"{desc.get('created', '')} from `{desc.get('source')}`.", ""]
    lines += ["## What it does", ""]
    if kind == "segmentation":
        labels = desc.get("labels") or []
        lines.append(f"Segments {', '.join(labels[1:]) or 'its classes'} (label values: "
                     + ", ".join(f"{i} = {n}" for i, n in enumerate(labels)) + ") by sliding-window inference.")
    elif kind == "synthesis":
        lines.append(f"Synthesises `{rec.get('target')}` from `{rec.get('source')}` (image-to-image, sliding window).")
    else:
        vocab = rec.get("icd_vocab") or {}
        what = [f"pooled image features ({enc.get('name')})"]
        if vocab:
            what.append(f"{len(vocab.get('classes', []))} class probabilities ({vocab.get('level')} classes)")
        if rec.get("text"):
            what.append("a joint image-report embedding")
        lines.append("Encodes a whole volume into " + ", ".join(what) + ".")
    lines += ["", "## Use", "", "```",
              f"volfm predict --model {name} --input scan.nii.gz --out predictions/",
              "```", "",
              f"Fine-tune from it: `encoder: {{pretrained: {name}}}` in a recipe (or `--model.init_args.encoder."
              f"pretrained {name}`).", ""]
    lines += ["## Preprocessing it expects", "",
              "`volfm predict` applies it to every input (from `model.yaml`); other tools must reproduce it:", ""]
    if spec:
        inp = (spec.get("inputs") or {}).get(pre.get("input") or "", {})
        lines += [f"- input array: `{pre.get('input')}` (spec `{spec.get('name')}`, hash {pre.get('spec_hash')})",
                  f"- orientation {spec.get('orientation')}, spacing {spec.get('spacing')} mm, "
                  f"{inp.get('interpolation', 'linear')} interpolation",
                  f"- crop/pad: {spec.get('crop') or 'none'}",
                  f"- intensity: {inp.get('intensity') or 'none'}"]
    lines += [f"- encoder `{enc.get('name')}` {enc.get('kwargs') or {}}; training patch {desc.get('patch_size')}; "
              f"sliding window {desc.get('inference') or 'n/a (whole volumes)'}", ""]
    lines += ["## Trained on", ""]
    cases = train.get("cases") or {}
    if train.get("store"):
        lines.append(f"Store `{train.get('store')}`: " + (", ".join(f"{k} {v}" for k, v in sorted(cases.items()))
                                                          or "case counts not recorded") + " cases (ok cases per "
                     "split; failed: cases the store could not preprocess).")
        used = train.get("train_cases_used")
        if used is not None:
            lines.append(f"The run trained on {used} of the {cases.get('train', '?')} training cases.")
    else:
        lines.append("Not recorded.")
    metrics = train.get("metrics") or {}
    if metrics:
        lines += ["", "## Results recorded at export", "",
                  f"Last validation of the run (epoch {_fmt(metrics.get('epoch'))}, step "
                  f"{_fmt(metrics.get('global_step'))}):", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if k not in ("epoch", "global_step")]
    if notes:
        lines += ["", notes.strip()]
    lines += ["", "## Intended use", "",
              "Research use. Not a medical device and not for diagnosis. "
              + ("The numbers above come from the run's own validation split; o" if metrics else "O")
              + "n data from other scanners, sites or protocols, evaluate before relying on it.",
              "", "## Files", "",
              f"`{PACKAGE_FILE}` (description; sha256 of the weights and record files: loading refuses a file that "
              "does not match), "
              f"`{WEIGHTS_FILE}` (the task's weights), " + ", ".join(f"`{k}.json`" for k in LARGE_PARTS if k in rec)
              + (" (large record parts), " if any(k in rec for k in LARGE_PARTS) else "") + "this card.", ""]
    return "\n".join(lines)

