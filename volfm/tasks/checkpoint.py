"""Loading a volfm task back, whatever its class: from a Lightning checkpoint or a model package folder."""
from __future__ import annotations

import importlib
from pathlib import Path

from volfm import VolfmError
from volfm.models.package import is_package, read_package
from volfm.models.weights import load_state_dict_checked, read_checkpoint
from volfm.tasks.base import EncoderTask


def task_class(name: str, where: Path) -> type[EncoderTask]:
    """The volfm task class a checkpoint or package names. Only classes in ``volfm.tasks`` that are EncoderTasks are
    accepted: the name comes from a file, and importing and calling whatever it names would run code from it."""
    module, _, cls = str(name).rpartition(".")
    if module != "volfm.tasks" and not module.startswith("volfm.tasks."):
        raise VolfmError(f"{where} names task {name!r}, which is not a volfm task (volfm.tasks.*); refusing to load it")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as exc:
        raise VolfmError(f"{where} was written by task {name}, which this volfm does not have ({exc})") from exc
    if not (isinstance(found, type) and issubclass(found, EncoderTask)):
        raise VolfmError(f"{where} names {name!r}, which is not a volfm task class; refusing to load it")
    return found


def load_package_task(path):
    """(task in eval mode on the CPU, a checkpoint-like dict: ``volfm`` record, ``hyper_parameters``) from a model
    package (``volfm export``); every file's sha256 is checked first (:func:`volfm.models.package.read_package`)."""
    path = Path(path)
    doc, state = read_package(path)
    cls = task_class(doc.get("task", ""), path)
    hp = {k: v for k, v in (doc.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    task = cls(**hp)
    record = {"task": doc.get("task"), **doc["record"]}
    task.on_load_checkpoint({"volfm": record, "state_dict": state})  # rebuilds heads, label maps, text tower
    load_state_dict_checked(task, state, source=f"{path} (model package)", strict=True)
    return task.eval(), {"volfm": record, "hyper_parameters": hp, "package": doc}


def load_task(ckpt, what: str = "a .ckpt written by volfm fit"):
    """(task in eval mode on the CPU, the raw checkpoint dict). ``ckpt`` is a Lightning checkpoint, whose class
    comes from the ``volfm`` record every volfm task writes (read with ``weights_only=True``), or a model package
    folder (:func:`load_package_task`)."""
    ckpt = Path(ckpt)
    if is_package(ckpt):
        return load_package_task(ckpt)
    if ckpt.is_dir():
        raise VolfmError(f"{ckpt} is a folder without model.yaml; give {what} or a model package (volfm export)")
    if not ckpt.is_file():
        raise VolfmError(f"checkpoint {ckpt} does not exist; give {what}")
    raw = read_checkpoint(ckpt)
    info = raw.get("volfm") if isinstance(raw, dict) else None
    if not info or "task" not in info:
        raise VolfmError(f"{ckpt} is not a volfm checkpoint (no 'volfm' record); give {what}")
    cls = task_class(info["task"], ckpt)
    task = cls.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    return task.eval(), raw
