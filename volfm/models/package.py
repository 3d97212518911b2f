"""Model packages: a folder that holds everything a trained model needs to run, and nothing pickled.

    MODEL_DIR/model.yaml          what the model is: the task class and its settings, the encoder (name, kwargs), the
                                  labels or vocabulary, the preprocessing spec its inputs go through, the sliding-window
                                  settings, the volfm version, and the sha256 of the weights and of each part
    MODEL_DIR/model.safetensors   the task's full state dict
    MODEL_DIR/<part>.json         large plain-data parts of the record (the text tower's tokenizer), hashed likewise
    MODEL_DIR/README.md           the model card (written by volfm.tasks.package)

:func:`write_package` writes one (files first, each under a temporary name, model.yaml last: a folder without
model.yaml is no package); :func:`read_package` checks every hash before it returns anything, so a changed or
truncated weights file is refused instead of predicting with it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from volfm import VolfmError, __version__
from volfm.io.atomic import file_sha256, write_text_atomic
from volfm.io.yamlfile import UniqueKeyLoader
from volfm.models.weights import save_weights_dict

__all__ = ["PACKAGE_FILE", "PACKAGE_FORMAT", "WEIGHTS_FILE", "check_package_target", "is_package", "read_package",
           "read_package_description", "write_package"]

PACKAGE_FILE = "model.yaml"
WEIGHTS_FILE = "model.safetensors"
PACKAGE_FORMAT = "volfm.model/1"


class _PlainDumper(yaml.SafeDumper):
    """SafeDumper without anchors/aliases (``&id001``): model.yaml is for reading by eye."""

    def ignore_aliases(self, data) -> bool:
        return True


def is_package(path: str | Path) -> bool:
    """Whether ``path`` is a model package folder (it has a model.yaml)."""
    p = Path(path)
    return p.is_dir() and (p / PACKAGE_FILE).is_file()


def check_package_target(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path, if a package may be written there (a new or non-package folder, or ``overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VolfmError(f"--out {out} is a file; give a folder for the model package")
    if is_package(out) and not overwrite:
        raise VolfmError(f"{out} already holds a model package (model.yaml); pass --overwrite to replace it or give "
                         "another --out")
    return out


def write_package(out: str | Path, state: dict[str, torch.Tensor], description: dict[str, Any], *,
                  parts: dict[str, Any] | None = None, card: str | None = None, overwrite: bool = False) -> Path:
    """Write a package to ``out``: ``state`` as model.safetensors, each of ``parts`` (name -> plain data) as
    ``<name>.json`` (read back into ``description["record"][name]``), the model card, then model.yaml =
    ``description`` + format, volfm version and the files' sha256."""
    out = check_package_target(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (out / PACKAGE_FILE).unlink(missing_ok=True)  # the folder is no package until the new model.yaml lands
    files: dict[str, str] = {}
    save_weights_dict(state, out / WEIGHTS_FILE, {"volfm.package": PACKAGE_FORMAT})
    files[WEIGHTS_FILE] = file_sha256(out / WEIGHTS_FILE)
    for name, value in (parts or {}).items():
        write_text_atomic(out / f"{name}.json", json.dumps(value))
        files[f"{name}.json"] = file_sha256(out / f"{name}.json")
    if card is not None:
        write_text_atomic(out / "README.md", card)
    doc = {"format": PACKAGE_FORMAT, "volfm_version": __version__, **description,
           "parts": sorted(parts or {}), "files": files}
    write_text_atomic(out / PACKAGE_FILE, yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False, width=120))
    return out


def read_package_description(path: str | Path) -> dict[str, Any]:
    """model.yaml of the package at ``path`` (checked for its format, not yet for the files' hashes)."""
    path = Path(path)
    file = path / PACKAGE_FILE
    if not file.is_file():
        what = "does not exist" if not path.exists() else f"has no {PACKAGE_FILE}"
        raise VolfmError(f"model package {path} {what}; give a folder written by volfm export (or volfm convert)")
    try:
        doc = yaml.load(file.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise VolfmError(f"{file} is not valid YAML ({' '.join(str(exc).split())}); re-export the model") from exc
    if not isinstance(doc, dict) or doc.get("format") != PACKAGE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise VolfmError(f"{file} is not a volfm model description (format {got!r}, expected {PACKAGE_FORMAT!r}); "
                         "give a folder written by volfm export")
    if not isinstance(doc.get("files"), dict) or WEIGHTS_FILE not in doc["files"]:
        raise VolfmError(f"{file} lists no {WEIGHTS_FILE} with its sha256 under 'files'; re-export the model")
    return doc


def read_package(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model.yaml with its ``parts`` read back into ``record``, the state dict). The weights and every part are read
    once, as bytes, and used only if those bytes have the sha256 written in model.yaml: a changed file is refused."""
    path = Path(path)
    doc = read_package_description(path)

    def checked(name: str) -> bytes:
        digest = doc["files"].get(name)
        if digest is None:
            raise VolfmError(f"{path / PACKAGE_FILE} lists {name} without its sha256 under 'files'; re-export the model")
        f = path / name
        if not f.is_file():
            raise VolfmError(f"model package {path} is incomplete: {name} (listed in {PACKAGE_FILE}) is missing")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise VolfmError(f"{f} does not match the sha256 recorded in {path / PACKAGE_FILE} (the file was changed "
                             "or is corrupt); re-export the model or copy the package again")
        return data

    try:
        state = load_bytes(checked(WEIGHTS_FILE))
    except SafetensorError as exc:
        raise VolfmError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from exc
    record = dict(doc.get("record") or {})
    for name in doc.get("parts") or []:
        record[name] = json.loads(checked(f"{name}.json").decode("utf-8"))
    doc["record"] = record
    return doc, state

