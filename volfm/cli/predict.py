"""`volfm predict`: run a trained volfm model on raw images and write results in each image's own grid.

    volfm predict --model models/spleen --input scan.nii.gz|folder/ --out predictions/     # a package (volfm export)
    volfm predict --ckpt_path runs/.../last.ckpt --input ... --out ...                     # a checkpoint (volfm fit)

Inputs: image files, a DICOM folder (one input, its DICOM files found whatever their names; when they are two or more
multi-frame files of different series, one input per file), or a folder of those.

Segmentation models write label maps (``<name>_seg.nii.gz``) and, for a DICOM input (a series folder), also a DICOM
Segmentation object ``<name>_seg.dcm`` over the source series (:func:`volfm.io.dicomseg.write_dicom_seg`: one segment
per foreground class, coded category/type and colour, one frame per source slice that holds the class, referencing
the source images; ``dicom_seg=False`` / ``--no-dicom-seg`` skips it); synthesis models write the synthesised image
(``<name>_synth.nii.gz``, float32), and with ``--target`` (a file, or a folder of files named like the inputs) also
the metrics against it and a QC PNG with source, prediction, target and difference. Pretraining models (ICD /
phenotype heads, report contrastive; a converted Merlin) write per input ``<name>_embedding.json`` (pooled features,
class probabilities with descriptions, the joint image-report embedding) and, over all inputs, ``features.csv``,
``probabilities.csv`` and ``embeddings.csv``, plus a QC PNG of what the model saw.

Preprocessing: every input goes through the spec the model was trained with (same orientation, spacing, intensity,
crop). volfm records that spec in every checkpoint (``checkpoint["volfm"]["data"]``) and package (model.yaml), so no
store is needed; ``--store`` makes a store's spec.yaml win, and is how checkpoints of older volfm versions (no
record) find theirs. Segmentation and synthesis run sliding-window inference with the training patch size and map
the prediction back onto the source grid through meta (the inverse of preprocessing, nearest for labels):
``<name>_seg.nii.gz`` has exactly the input's shape and affine; ``<name>_qc.png`` shows source slices with the
prediction overlaid. One file failing (unreadable, 4D, sheared, ...) is reported and the others go on; the exit
status is 1 then. A DICOM SEG that cannot be written (e.g. the source series lacks a required attribute) is reported
the same way, the NIfTI output staying written (its row in ``predictions.json`` holds ``dicom_seg_error``).

Units of a synthesised image (:func:`output_units`; in the NIfTI ``descrip`` field and ``predictions.json``):
the target modality's physical units where the store's intensity step can be undone (SUV for PET stored as
SUV, the files' own values for PET stored as values x factor, HU for a CT window), else the store's units (a
z-scored MRI). A ``--target`` file goes through the same intensity step into the same units before it is
compared, so a PET target in Bq/ml (DICOM with dose tags) or an MRI on any scale is scored fairly.
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml

from volfm import VolfmError
from volfm.inference.sliding_window import predict_to_source
from volfm.io import is_image_path, read_volume, write_nifti
from volfm.io.atomic import write_json_atomic, write_text_atomic
from volfm.io.dicomseg import segment_code, write_dicom_seg
from volfm.io.multiframe import dicom_files, image_headers, is_dicom_file
from volfm.metrics.synthesis import synthesis_metrics
from volfm.preprocess.intensity import apply_intensity
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.qc import render_case_png
from volfm.preprocess.resample import resample_to_grid
from volfm.tasks import load_task
from volfm.utils import progress_bar

__all__ = ["OutputUnits", "load_predictor", "output_units", "predict_files", "training_spec"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _inputs(path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
        if files:
            return files
        if dicom_files(p):
            return _dicom_inputs(p)  # the folder is itself one DICOM series, or holds multi-frame files
        dicom = sorted(d for d in p.iterdir() if d.is_dir())
        if dicom:
            return [x for d in dicom for x in _dicom_inputs(d)]  # DICOM series folders
        raise VolfmError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM folders inside")
    raise VolfmError(f"--input {p} does not exist")


def _dicom_inputs(folder: Path) -> list[Path]:
    """A DICOM folder as inputs: each of its multi-frame files on its own when the DICOM images directly in it are
    two or more multi-frame files of different series (one volume each), else the folder (one series; the reader
    takes its largest, or says why it cannot). Headers are read only until a single-frame image shows a series."""
    files, series = [], set()
    for f, uid, frames in image_headers(folder):
        if frames == 1 or uid in series:
            return [folder]
        series.add(uid)
        files.append(f)
    return files if len(files) > 1 else [folder]


def _stem(p: Path) -> str:
    name = p.name
    for suf in (*IMAGE_SUFFIXES, ".dcm"):  # .dcm: a multi-frame DICOM file given as --input
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


def load_predictor(model):
    """The volfm task of a checkpoint or model package (eval mode, CPU) and the raw checkpoint dict."""
    task, raw = load_task(model, "a .ckpt written by volfm fit or a model package folder (volfm export)")
    if not hasattr(task, "predict_volume") and not hasattr(task, "predict_embedding"):
        raise VolfmError(f"{model} holds a {type(task).__name__}, which does not predict images; volfm predict takes "
                         "segmentation, synthesis or pretraining (embeddings) models")
    return task, raw


def training_spec(model, raw: dict, config=None, store=None) -> tuple[dict, str, dict]:
    """(the resolved preprocessing spec the model was trained with, where it came from, the data settings).

    Order: an explicit ``store`` (its spec.yaml); the spec the checkpoint or package recorded at training (volfm
    records it in ``checkpoint["volfm"]["data"]``, so the store is not needed); the store named by the checkpoint's
    DataModule or by ``config``. A checkpoint from an older volfm carries no spec: then the store must exist."""
    data = {**_config_data(config), **(raw.get("datamodule_hyper_parameters") or {})}
    recorded = (raw.get("volfm") or {}).get("data") or {}
    if store is None and recorded.get("spec"):
        return recorded["spec"], f"{model} (the spec recorded at training)", {**data, **recorded}
    if store is not None:
        where = f"--store {store}"
    elif data.get("store"):
        where = f"{model} records no preprocessing spec (a checkpoint from an older volfm) and the training store"
    else:
        raise VolfmError(f"{model} records no preprocessing spec (a checkpoint from an older volfm) and names no "
                         "training store; pass --store STORE (or a --config naming it)")
    store = Path(store or data["store"])
    spec_file = store / "spec.yaml"
    if not spec_file.is_file():
        raise VolfmError(f"{where}: {spec_file} is missing; pass --store STORE, the store the model was trained on "
                         "(or a --config naming it), or re-export the model with volfm export --store STORE")
    spec = (yaml.safe_load(spec_file.read_text()) or {}).get("spec")
    if not spec:
        raise VolfmError(f"{spec_file} holds no resolved spec; rerun volfm preprocess --overwrite on {store}")
    return spec, str(spec_file), {**data, **{k: v for k, v in recorded.items() if k in ("input", "arrays")}}


def _matching(f: Path, target) -> Path | None:
    """The target image for input ``f``: ``target`` itself (a file or a DICOM series folder), or the file (or
    DICOM series folder) with f's name inside a folder of targets."""
    if not target:
        return None
    t = Path(target)
    if t.is_file():
        return t
    cands = [c for c in (t.iterdir() if t.is_dir() else []) if _stem(c) == _stem(f) and is_image_path(c)]
    if cands:
        return cands[0]
    if t.is_dir() and is_image_path(t):  # the folder is itself one DICOM series
        return t
    raise VolfmError(f"--target {t}: no image or DICOM series named like {f.name} (same name, any image suffix)")


class OutputUnits(NamedTuple):
    """The units a synthesised image is written in, and how the model's stored-unit output gets there."""

    name: str
    to_output: Callable[[np.ndarray], np.ndarray]


def output_units(intensity: dict | None) -> OutputUnits:
    """The output units of a model trained on a store whose target input has the spec ``intensity`` block.

    The model predicts in the store's units; the written image is in the modality's physical units where the
    stored step can be undone: Hounsfield units for a CT window (clipped to the window), SUV for PET stored as SUV,
    the PET files' own values for PET stored as values x factor. A z-scored MRI has no physical unit (its
    mean and scale come from each image itself), so it stays a z-score.
    """
    cfg = dict(intensity or {})
    kind = cfg.get("type", "none")
    if kind == "ct_window":
        lo, hi = float(cfg.get("hu_min", -1000.0)), float(cfg.get("hu_max", 1000.0))
        o0, o1 = float(cfg.get("out_min", 0.0)), float(cfg.get("out_max", 1.0))
        return OutputUnits(f"HU (window {lo:g}..{hi:g})", lambda a: (a - o0) / (o1 - o0) * (hi - lo) + lo)
    if kind == "pet":
        mode, factor = cfg.get("mode", "auto"), float(cfg.get("factor", 1.0))
        if mode == "suv":
            return OutputUnits("SUV (body weight)", lambda a: a)
        if mode == "scale":  # stored = file values x factor: undo the factor
            return OutputUnits("the PET files' own units", lambda a: a / factor)
        # auto: SUV for DICOM PET with dose tags, file values x factor otherwise (which one depends on the case)
        extra = f" x {factor:g}" if factor != 1.0 else ""
        return OutputUnits(f"SUV where the PET had DICOM dose tags, else the file values{extra}", lambda a: a)
    if kind == "mri_zscore":
        return OutputUnits("z-score (MRI standardised in its own foreground; no physical unit)", lambda a: a)
    return OutputUnits("the training images' units", lambda a: a)


def _target_on_grid(vol, tgt: Path, intensity: dict | None) -> np.ndarray:
    """The target image in the prediction's units, on the prediction's (= the input's) grid: the target file
    goes through the store spec's intensity step for the target input (z-score, SUV from DICOM tags, x factor,
    CT window), then into the output units, then is resampled when it lies on another grid."""
    t = read_volume(str(tgt))
    t, _ = apply_intensity(t, intensity)
    t = t.replace(array=output_units(intensity).to_output(t.array).astype(np.float32))
    if tuple(t.shape) != tuple(vol.shape) or not np.allclose(t.affine, vol.affine, atol=1e-3):
        t = resample_to_grid(t, vol.affine, vol.shape, order="linear")
    return t.array[0].astype(np.float32)


def _compare_target(vol, tgt: Path, intensity: dict | None) -> dict:
    t = _target_on_grid(vol, tgt, intensity)
    mask = t > 0 if (t > 0).any() else None
    m = synthesis_metrics(vol.array[0], t, mask=mask)
    return {"target": str(tgt), "metrics": {k: m[k] for k in ("mae", "psnr", "ssim")},
            "metric_protocol": "target through the store's intensity step into the output units, then inside "
                               "target > 0, range = the target's range there (volfm.metrics.synthesis)"}


def _qc_png(path: Path, f: Path, vol, tgt, label_out: bool, task, intensity: dict | None = None) -> Path:
    """Labels: source slices with the prediction overlaid. Synthesis: source, prediction, target, difference."""
    src = read_volume(str(f))
    if label_out:
        return render_case_png(path, src.array[0], src.affine, vol.array[0],
                               title=f"{f.name}: {', '.join(task.class_names[1:])}")
    extra = [("prediction", vol.array[0])]
    if tgt is not None:
        t = _target_on_grid(vol, tgt, intensity)
        extra += [("target", t), ("difference (prediction - target)", vol.array[0] - t)]
    return render_case_png(path, src.array[0], src.affine, None, title=f"{f.name}: source", extra=extra)


def _embedding_outputs(task, res: dict, case: str, out: Path) -> dict:
    """``<case>_embedding.json`` (features, embedding, class probabilities with their descriptions) and the row of
    predictions.json (the top classes)."""
    doc: dict = {"features": [round(float(v), 6) for v in res["features"]]}
    row: dict = {"features": len(res["features"])}
    if "embedding" in res:
        doc["embedding"] = [round(float(v), 6) for v in res["embedding"]]
        row["embedding"] = len(res["embedding"])
    if "probabilities" in res:
        vocab = task.vocab
        p = res["probabilities"]
        doc["probabilities"] = {c: round(float(v), 6) for c, v in zip(vocab.classes, p)}
        top = np.argsort(-p)[:10]
        row["top_classes"] = [{"class": vocab.classes[i], "description": vocab.descriptions.get(vocab.classes[i], ""),
                               "probability": round(float(p[i]), 4)} for i in top]
    path = out / f"{case}_embedding.json"
    write_json_atomic(path, doc)
    row["output"] = str(path)
    return row


def _write_tables(out: Path, rows: list[tuple[str, dict]], task) -> dict:
    """features.csv, embeddings.csv and probabilities.csv: one row per input (embedding models)."""
    written = {}
    for key, name, cols in (("features", "features.csv", None), ("embedding", "embeddings.csv", None),
                            ("probabilities", "probabilities.csv", getattr(getattr(task, "vocab", None), "classes", None))):
        have = [(case, res[key]) for case, res in rows if key in res]
        if not have:
            continue
        header = cols or [f"{key[:4]}_{i}" for i in range(len(have[0][1]))]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["case", *header])
        w.writerows([case, *(f"{float(v):.6g}" for v in vec)] for case, vec in have)
        write_text_atomic(out / name, buf.getvalue())
        written[key] = str(out / name)
    return written


def _write_dicom_seg(row: dict, vol, f: Path, case: str, out: Path, task, source: dict, model_name: str) -> str:
    """``<case>_seg.dcm`` over the DICOM series ``f`` (a folder, or a multi-frame file) the prediction ``vol`` was
    made from (the series the reader took: ``source["series_id"]``); the row records its path and how each class is
    coded. Returns '' or the one-line error (the row keeps it as ``dicom_seg_error``)."""
    names = list(task.class_names)
    try:
        path = write_dicom_seg(vol, f if f.is_dir() else [f], names, out / f"{case}_seg.dcm",
                               series_id=source.get("series_id"), algorithm_name=model_name,
                               content_description=f"volfm {model_name}: {', '.join(names[1:])}")
    except VolfmError as exc:
        row["dicom_seg_error"] = " ".join(str(exc).split())
        return f"DICOM SEG not written ({row['dicom_seg_error']}); the NIfTI output was written"
    row["dicom_seg"] = str(path)
    row["dicom_seg_codes"] = {n: segment_code(n).describe() for n in task.class_names[1:]}
    return ""


def predict_files(model, inputs, out, config=None, store=None, device: str | None = None, qc: bool = True,
                  progress: bool = True, target=None, dicom_seg: bool = True) -> dict:
    """Run a checkpoint or model package on ``inputs`` (a file, a DICOM folder or a folder of them); see the module
    docstring. ``dicom_seg``: segmentation of a DICOM series also writes ``<name>_seg.dcm``. Returns the summary also
    written to ``out/predictions.json``."""
    task, raw = load_predictor(model)
    model_name = str((raw.get("package") or {}).get("name") or Path(model).stem)
    spec, spec_source, data = training_spec(model, raw, config, store)
    image_inputs = [n for n, c in spec["inputs"].items() if c.get("kind") != "label"]
    # the array the model reads: recorded at training; else a synthesis task's source, else the first image array
    name = (data.get("input") or getattr(task, "source_name", None)
            or (list(data.get("arrays") or []) or image_inputs)[0])
    if name not in image_inputs:
        raise VolfmError(f"the model reads '{name}' but the spec of {spec_source} has image inputs {image_inputs}")
    target_name = getattr(task, "target_name", None)
    target_intensity = (spec["inputs"].get(target_name) or {}).get("intensity") if target_name else None
    units = output_units(target_intensity)
    spec = {**spec, "inputs": {n: c for n, c in spec["inputs"].items() if n == name}, "reference": name}
    pipe = Pipeline(spec, source=spec_source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = task.to(device)
    patch = task.patch_size or data.get("patch_size")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _inputs(inputs)
    results, failures, used, vectors = [], [], set(), []
    kind = getattr(task, "output_kind", "label")
    label_out = kind == "label"
    suffix = "_seg" if label_out else "_synth"
    for f in progress_bar(files, desc="predict", unit="image", disable=not progress):
        t0 = time.perf_counter()
        case = re.sub(r"[^A-Za-z0-9._-]", "_", _stem(f))
        while case in used:  # two inputs with the same stem (a.nii and a.nii.gz) must not overwrite each other
            case += "_"
        used.add(case)
        try:
            proc = pipe({name: str(f)}, case_id=case, hash_sources=False)
            if kind == "embedding":
                res = task.predict_embedding(proc.arrays[name])
                vectors.append((case, res))
                row = {"input": str(f), **_embedding_outputs(task, res, case, out),
                       "seconds": round(time.perf_counter() - t0, 2)}
                if qc:  # what the model saw: the input on the model's grid, after the intensity step
                    row["qc"] = str(render_case_png(out / f"{case}_qc.png", proc.arrays[name][0], proc.affine, None,
                                                    title=f"{f.name}: model input ({spec.get('name')})"))
                results.append(row)
                continue
            pred = task.predict_volume(proc.arrays[name], patch_size=patch)
            meta = {**proc.meta, "affine": proc.affine.tolist(), "case_id": case}
            vol = predict_to_source(pred.astype(np.float32), meta, order="nearest" if label_out else "linear")
            arr = np.rint(vol.array).astype(np.uint8) if label_out else units.to_output(vol.array).astype(np.float32)
            vol = type(vol)(arr, vol.affine, {"path": f"prediction for {f}"})
            desc = (f"volfm labels: {', '.join(task.class_names)}" if label_out
                    else f"volfm synthetic {target_name}, units: {units.name}")
            seg = write_nifti(vol, out / f"{case}{suffix}.nii.gz", description=desc)
            row = {"input": str(f), "output": str(seg), "shape": list(vol.array.shape[1:]),
                   "seconds": round(time.perf_counter() - t0, 2)}
            if not label_out:
                row["units"] = units.name
            if label_out:
                row["voxels_per_class"] = {n: int((vol.array == i).sum()) for i, n in enumerate(task.class_names)}
                if dicom_seg and (f.is_dir() or is_dicom_file(f)):  # a series folder or a multi-frame file
                    seg_error = _write_dicom_seg(row, vol, f, case, out, task, proc.meta["source"][name], model_name)
                    if seg_error:
                        failures.append({"input": str(f), "error": seg_error})
            tgt = _matching(f, target)
            if tgt is not None and not label_out:
                row.update(_compare_target(vol, tgt, target_intensity))
            if qc:
                row["qc"] = str(_qc_png(out / f"{case}_qc.png", f, vol, tgt, label_out, task, target_intensity))
            results.append(row)
        except VolfmError as exc:
            failures.append({"input": str(f), "error": " ".join(str(exc).split())})
    summary = {"model": str(model), "spec": spec_source, "outputs": results, "failures": failures}
    if vectors:
        summary["tables"] = _write_tables(out, vectors, task)
    (out / "predictions.json").write_text(json.dumps(summary, indent=2))
    return summary
