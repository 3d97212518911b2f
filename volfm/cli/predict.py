"""`volfm predict`: run a trained volfm model on raw images and write results in each image's own grid.

Segmentation checkpoints write label maps (``<name>_seg.nii.gz``); synthesis checkpoints write the
synthesised image (``<name>_synth.nii.gz``, float32), and with ``--target`` (a file, or a folder of files
named like the inputs) also the metrics against it and a QC PNG with source, prediction, target and
difference.

    volfm predict --config recipes/seg_finetune.yaml --ckpt_path runs/.../last.ckpt \
                  --input scan.nii.gz|folder/ --out predictions/

For every input file: preprocess it with the spec of the store the model was trained on (the
store's spec.yaml: same orientation, spacing, intensity, crop), run sliding-window inference with the
training patch size, map the prediction back onto the source grid through meta (the inverse of
preprocessing, nearest for labels), and write ``<name>_seg.nii.gz`` with exactly the input's shape
and affine, plus ``<name>_qc.png`` (source slices with the prediction overlaid). One file failing
(unreadable, 4D, sheared, ...) is reported and the others go on; the exit status is 1 then.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from volfm import VolfmError
from volfm.inference.sliding_window import predict_to_source
from volfm.io import read_volume, write_nifti
from volfm.metrics.synthesis import synthesis_metrics
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.qc import render_case_png
from volfm.preprocess.resample import resample_to_grid
from volfm.tasks import load_task

__all__ = ["predict_files"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _inputs(path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
        if files:
            return files
        dicom = sorted(d for d in p.iterdir() if d.is_dir())
        if dicom:
            return dicom  # DICOM series folders
        raise VolfmError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM folders inside")
    raise VolfmError(f"--input {p} does not exist")


def _stem(p: Path) -> str:
    name = p.name
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _config_data(config) -> dict:
    """The data init_args of a recipe (store, patch_size), or {} without a config."""
    if not config:
        return {}
    try:
        doc = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise VolfmError(f"--config {config} does not exist") from None
    except yaml.YAMLError as exc:
        raise VolfmError(f"--config {config} is not valid YAML: {' '.join(str(exc).split())}") from None
    return ((doc.get("data") or {}).get("init_args") or {}) if isinstance(doc, dict) else {}


def load_predictor(ckpt):
    """The volfm task stored in a checkpoint (eval mode, CPU) and the raw checkpoint; it must predict images."""
    task, raw = load_task(ckpt, "a segmentation .ckpt written by volfm fit")
    if not hasattr(task, "predict_volume"):
        raise VolfmError(f"{ckpt} holds a {type(task).__name__}, which does not predict images; volfm predict takes "
                         "segmentation (or synthesis) checkpoints")
    return task, raw


def _matching(f: Path, target) -> Path | None:
    """The target image for input ``f``: ``target`` itself (a file), or the file with f's name in a folder."""
    if not target:
        return None
    t = Path(target)
    if t.is_file():
        return t
    cands = [c for c in (t.iterdir() if t.is_dir() else []) if c.is_file() and _stem(c) == _stem(f)]
    if not cands:
        raise VolfmError(f"--target {t}: no file named like {f.name} (same name, any image suffix)")
    return cands[0]


def _target_on_grid(vol, tgt: Path) -> np.ndarray:
    """The target image on the prediction's (= the input's) grid; resampled when it was stored on another one."""
    t = read_volume(str(tgt))
    if tuple(t.shape) != tuple(vol.shape) or not np.allclose(t.affine, vol.affine, atol=1e-3):
        t = resample_to_grid(t, vol.affine, vol.shape, order="linear")
    return t.array[0].astype(np.float32)


def _compare_target(vol, tgt: Path) -> dict:
    t = _target_on_grid(vol, tgt)
    mask = t > 0 if (t > 0).any() else None
    m = synthesis_metrics(vol.array[0], t, mask=mask)
    return {"target": str(tgt), "metrics": {k: m[k] for k in ("mae", "psnr", "ssim")},
            "metric_protocol": "inside target > 0, range = the target's range there (volfm.metrics.synthesis)"}


def _qc_png(path: Path, f: Path, vol, tgt, label_out: bool, task) -> Path:
    """Labels: source slices with the prediction overlaid. Synthesis: source, prediction, target, difference."""
    src = read_volume(str(f))
    if label_out:
        return render_case_png(path, src.array[0], src.affine, vol.array[0],
                               title=f"{f.name}: {', '.join(task.class_names[1:])}")
    extra = [("prediction", vol.array[0])]
    if tgt is not None:
        t = _target_on_grid(vol, tgt)
        extra += [("target", t), ("difference (prediction - target)", vol.array[0] - t)]
    return render_case_png(path, src.array[0], src.affine, None, title=f"{f.name}: source", extra=extra)


def predict_files(ckpt, inputs, out, config=None, store=None, device: str | None = None, qc: bool = True,
                  progress: bool = True, target=None) -> dict:
    task, raw = load_predictor(ckpt)
    # what the model was trained with wins over the recipe's defaults: --store, then the checkpoint, then --config
    data = {**_config_data(config), **(raw.get("datamodule_hyper_parameters") or {})}
    store = Path(store or data.get("store") or "")
    spec_file = store / "spec.yaml"
    if not spec_file.is_file():
        raise VolfmError(f"the training store's spec {spec_file} is missing: predict preprocesses inputs with the "
                         "spec the model was trained on; pass --store STORE (or a --config naming it)")
    spec = (yaml.safe_load(spec_file.read_text()) or {}).get("spec")
    if not spec:
        raise VolfmError(f"{spec_file} holds no resolved spec; rerun volfm preprocess --overwrite on {store}")
    image_inputs = [n for n, c in spec["inputs"].items() if c.get("kind") != "label"]
    # the array the model reads: a synthesis task's source, else the DataModule's first image array
    name = getattr(task, "source_name", None) or (list(data.get("arrays") or []) or image_inputs)[0]
    if name not in image_inputs:
        raise VolfmError(f"the model reads '{name}' but the store spec {spec_file} has image inputs {image_inputs}")
    spec = {**spec, "inputs": {n: c for n, c in spec["inputs"].items() if n == name}, "reference": name}
    pipe = Pipeline(spec, source=str(spec_file))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = task.to(device)
    patch = task.patch_size or data.get("patch_size")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _inputs(inputs)
    results, failures, used = [], [], set()
    label_out = getattr(task, "output_kind", "label") == "label"
    suffix = "_seg" if label_out else "_synth"
    for f in tqdm(files, desc="predict", unit="image", disable=not progress):
        t0 = time.perf_counter()
        case = re.sub(r"[^A-Za-z0-9._-]", "_", _stem(f))
        while case in used:  # two inputs with the same stem (a.nii and a.nii.gz) must not overwrite each other
            case += "_"
        used.add(case)
        try:
            proc = pipe({name: str(f)}, case_id=case, hash_sources=False)
            pred = task.predict_volume(proc.arrays[name], patch_size=patch)
            meta = {**proc.meta, "affine": proc.affine.tolist(), "case_id": case}
            vol = predict_to_source(pred.astype(np.float32), meta, order="nearest" if label_out else "linear")
            arr = np.rint(vol.array).astype(np.uint8) if label_out else vol.array.astype(np.float32)
            vol = type(vol)(arr, vol.affine, {"path": f"prediction for {f}"})
            seg = write_nifti(vol, out / f"{case}{suffix}.nii.gz")
            row = {"input": str(f), "output": str(seg), "shape": list(vol.array.shape[1:]),
                   "seconds": round(time.perf_counter() - t0, 2)}
            if label_out:
                row["voxels_per_class"] = {n: int((vol.array == i).sum()) for i, n in enumerate(task.class_names)}
            tgt = _matching(f, target)
            if tgt is not None and not label_out:
                row.update(_compare_target(vol, tgt))
            if qc:
                row["qc"] = str(_qc_png(out / f"{case}_qc.png", f, vol, tgt, label_out, task))
            results.append(row)
        except VolfmError as exc:
            failures.append({"input": str(f), "error": " ".join(str(exc).split())})
    summary = {"checkpoint": str(ckpt), "store": str(store), "outputs": results, "failures": failures}
    (out / "predictions.json").write_text(json.dumps(summary, indent=2))
    return summary
