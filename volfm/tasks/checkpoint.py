"""Loading a volfm task back from a Lightning checkpoint, whatever its class."""
from __future__ import annotations

import importlib
from pathlib import Path

from volfm import VolfmError
from volfm.models.weights import read_checkpoint


def load_task(ckpt, what: str = "a .ckpt written by volfm fit"):
    """(task in eval mode on the CPU, the raw checkpoint dict). The class comes from the checkpoint's
    ``volfm`` record, which every volfm task writes; the file is read with ``weights_only=True``."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise VolfmError(f"checkpoint {ckpt} does not exist; give {what}")
    raw = read_checkpoint(ckpt)
    info = raw.get("volfm") if isinstance(raw, dict) else None
    if not info or "task" not in info:
        raise VolfmError(f"{ckpt} is not a volfm checkpoint (no 'volfm' record); give {what}")
    module, _, name = info["task"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise VolfmError(f"{ckpt} was written by task {info['task']}, which this volfm does not have ({exc})") from exc
    task = cls.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    return task.eval(), raw
