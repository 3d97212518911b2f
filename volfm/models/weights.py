"""Encoder weights: safetensors files with the registry name in their metadata, volfm task checkpoints, LoRA.

    save_encoder(model, "enc.safetensors")        # name + kwargs go into the file's metadata
    model = load_encoder("enc.safetensors")        # rebuilt from the metadata
    load_encoder(model, "enc.safetensors")         # or into an existing model
    load_encoder_weights(model, "last.ckpt")       # the encoder of any volfm task checkpoint
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from volfm import VolfmError
from volfm.io.atomic import default_permissions
from volfm.models.registry import META_KWARGS, META_NAME, create_encoder

__all__ = ["DECODER_HEADS", "load_decoder_state", "load_decoder_weights", "load_encoder", "load_encoder_weights",
           "load_state_dict_checked", "load_task_encoder", "merge_lora_state", "read_checkpoint",
           "read_encoder_metadata", "save_encoder", "save_weights", "save_weights_dict"]

# Output layers of the dense decoders (U-Net ``head``/``ds_heads``, UNETR ``out``): they depend on the task's
# output channels, so a pretrained decoder is carried without them.
DECODER_HEADS = ("head.", "ds_heads.", "out.")


def save_weights_dict(state: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to ``path`` as safetensors, atomically (a temporary file, then renamed), readable as a plainly
    created file is (safetensors itself creates owner-only files)."""
    path = Path(path)
    # contiguous() also turns channels_last_3d weights into the standard layout safetensors needs.
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})
    default_permissions(tmp)
    tmp.replace(path)
    return path


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s state dict to ``path`` as safetensors (see :func:`save_weights_dict`)."""
    return save_weights_dict(model.state_dict(), path, metadata)


def save_encoder(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict to ``path`` (safetensors) with its registry name and kwargs."""
    path = Path(path)
    metadata = {}
    name = getattr(model, "encoder_name", None)
    if name is not None:
        kwargs = getattr(model, "encoder_kwargs", {})
        try:
            metadata[META_NAME] = name
            metadata[META_KWARGS] = json.dumps(kwargs, sort_keys=True)
        except TypeError as exc:
            raise VolfmError(
                f"cannot save encoder {name!r} to {path}: its kwargs {kwargs!r} are not JSON-serialisable "
                f"({exc}); build it with plain (str/int/float/bool/list/dict) kwargs"
            ) from exc
    return save_weights(model, path, metadata)


def read_encoder_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of an encoder checkpoint (empty dict when there is none)."""
    path = Path(path)
    if not path.is_file():
        raise VolfmError(f"encoder checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _list_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` (a checkpoint's tensors) disagrees with ``own`` (a model's state dict): the keys it lacks, the keys
    the model lacks, and the shared keys whose shapes differ (each as ``"key (checkpoint shape vs model shape)"``)."""
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
                        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    return missing, unexpected, mismatched


def load_state_dict_checked(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str, strict: bool = True
) -> nn.Module:
    """Load ``state`` into ``model``; on any key/shape disagreement raise a VolfmError that lists
    the missing, unexpected and shape-mismatched keys. With ``strict=False`` only the keys present
    on both sides with equal shapes are loaded."""
    own = model.state_dict()
    missing, unexpected, mismatched = state_mismatch(own, state)
    if strict and (missing or unexpected or mismatched):
        lines = [f"checkpoint {source} does not fit the model {getattr(model, 'encoder_name', type(model).__name__)!r}:"]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape-mismatched keys: {_list_keys(mismatched)}")
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_list_keys(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_list_keys(unexpected)}")
        lines.append("Build the encoder the checkpoint was saved from (load_encoder(path) does this), or pass strict=False.")
        raise VolfmError("\n".join(lines))
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)
    return model


def load_encoder(path_or_model: str | Path | nn.Module, path: str | Path | None = None, *, strict: bool = True) -> nn.Module:
    """Load an encoder checkpoint written by :func:`save_encoder`.

    ``load_encoder(path)`` rebuilds the encoder from the name and kwargs in the file's metadata;
    ``load_encoder(model, path)`` loads the weights into an existing model.
    """
    if isinstance(path_or_model, nn.Module):
        model = path_or_model
        if path is None:
            raise VolfmError("load_encoder(model, path): give the checkpoint path to load into the model")
        path = Path(path)
        meta = read_encoder_metadata(path)
    else:
        if path is not None:
            raise VolfmError("load_encoder(path) takes one path; to load into a model call load_encoder(model, path)")
        path = Path(path_or_model)
        meta = read_encoder_metadata(path)
        if META_NAME not in meta:
            raise VolfmError(
                f"checkpoint {path} has no volfm encoder name in its metadata (not written by save_encoder); "
                f"build the model with create_encoder(...) and call load_encoder(model, {str(path)!r})"
            )
        model = create_encoder(meta[META_NAME], **json.loads(meta.get(META_KWARGS, "{}")))
    saved_as = meta.get(META_NAME)
    source = f"{path}" + (f" (saved from {saved_as!r})" if saved_as else "")
    state = load_file(str(path))
    return load_state_dict_checked(model, state, source=source, strict=strict)


def read_checkpoint(path: str | Path):
    """A Lightning/torch checkpoint read with ``torch.load(weights_only=True)`` on the CPU (no pickle
    code runs); an unreadable file is a VolfmError naming it."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise VolfmError(f"cannot read checkpoint {path} with torch.load(weights_only=True): "
                         f"{' '.join(str(exc).split())[:300]}") from exc


def _checkpoint_part(path: Path, prefix: str) -> tuple:
    """(checkpoint, its state dict, the tensors under ``prefix`` with the prefix removed) of a task ``.ckpt``."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise VolfmError(f"{path} does not hold a state dict (got {type(ckpt).__name__})")
    return ckpt, state, {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


def load_encoder_weights(model: nn.Module, path: str | Path, *, strict: bool = True, prefix: str = "encoder.") -> nn.Module:
    """Load encoder weights into ``model`` from any volfm checkpoint: an encoder ``.safetensors``
    (:func:`save_encoder`) or a Lightning ``.ckpt`` of a volfm task (ICD pretext, report contrastive,
    segmentation, synthesis), whose encoder lives under ``prefix`` in the state dict. Read with
    ``torch.load(weights_only=True)``; a checkpoint of another encoder fails listing the mismatched keys."""
    path = Path(path)
    if not path.is_file():
        raise VolfmError(f"encoder checkpoint {path} does not exist; give the path of a volfm .ckpt or an encoder "
                         ".safetensors file")
    if path.suffix == ".safetensors":
        return load_encoder(model, path, strict=strict)
    ckpt, state, _ = _checkpoint_part(path, prefix)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    return load_task_encoder(model, state, ckpt.get("hyper_parameters") or {}, ckpt.get("volfm") or {},
                             source=str(path), strict=strict, prefix=prefix)


def load_task_encoder(model: nn.Module, state: dict[str, torch.Tensor], hyper_parameters: dict, record: dict, *,
                      source: str, strict: bool = True, prefix: str = "encoder.") -> nn.Module:
    """Load the encoder of a volfm task's state dict (keys ``prefix*``; LoRA adapters merged with the task's
    ``finetune`` settings) into ``model``; ``record`` is the task's ``volfm`` record (names the encoder in errors)."""
    enc = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    if not enc:
        raise VolfmError(f"{source} holds no encoder weights (no '{prefix}*' keys; first keys: "
                         f"{_list_keys(sorted(map(str, state)), 5)}); give a volfm task checkpoint or an encoder "
                         ".safetensors file")
    hp = hyper_parameters
    if any(".lora_A." in k for k in enc):
        ft = hp.get("finetune") if isinstance(hp.get("finetune"), dict) else hp  # grouped, or flat (older volfm)
        enc = merge_lora_state(enc, float(ft.get("lora_alpha", 16)) / float(ft.get("lora_r", 8)))
    saved_as = (record.get("encoder") or {}).get("name") if isinstance(record.get("encoder"), dict) else None
    source = f"{source}" + (f" (saved from {saved_as!r})" if saved_as else "")
    return load_state_dict_checked(model, enc, source=source, strict=strict)


def load_decoder_weights(decoder: nn.Module, path: str | Path, *, prefix: str = "decoder.",
                         skip: tuple[str, ...] = DECODER_HEADS) -> nn.Module:
    """Load a pretrained dense decoder (e.g. the U-Net decoder of a masked-volume pretraining run) into
    ``decoder``: from a volfm task ``.ckpt`` (keys ``decoder.*``) or a ``decoder.safetensors``. The output layers
    (``skip``: the prediction heads, whose channels are the task's) keep their fresh initialisation; every other
    tensor must match (a decoder of another encoder or width fails listing the keys)."""
    path = Path(path)
    if not path.is_file():
        raise VolfmError(f"decoder checkpoint {path} does not exist; give a volfm .ckpt (e.g. of a masked-volume "
                         "pretraining run) or its decoder.safetensors")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        _, _, state = _checkpoint_part(path, prefix)
    return load_decoder_state(decoder, state, source=str(path), skip=skip, prefix=prefix)


def load_decoder_state(decoder: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                       skip: tuple[str, ...] = DECODER_HEADS, prefix: str = "decoder.") -> nn.Module:
    """Load decoder tensors (names without ``prefix``) into ``decoder``, all but the ``skip`` output layers."""
    if not state:
        raise VolfmError(f"{source} holds no decoder weights (no '{prefix}*' keys): only checkpoints of tasks with a "
                         "dense decoder (masked-volume pretraining, segmentation, synthesis) carry one; load the "
                         "encoder alone (encoder.pretrained) instead")
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in decoder.state_dict().items() if not k.startswith(skip)}
    missing, unexpected, bad = state_mismatch(own, state)
    if missing or unexpected or bad:
        parts = [f"missing {_list_keys(missing)}" if missing else "", f"unexpected {_list_keys(unexpected)}"
                 if unexpected else "", f"shape mismatch {_list_keys(bad)}" if bad else ""]
        raise VolfmError(f"decoder weights in {source} do not fit this decoder ({'; '.join(p for p in parts if p)}); "
                         "the pretrained decoder must come from the same encoder and decoder settings")
    decoder.load_state_dict(state, strict=False)
    return decoder


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters (peft's ``<m>.base_layer.*`` + ``<m>.lora_A/B.<adapter>.weight``) into plain
    ``<m>.weight`` / ``<m>.bias``: W + scaling * B A (for convolutions B is 1x1x1, so the product is taken
    over the rank axis at every kernel tap). The result loads into the encoder without adapters."""
    out = {k: v for k, v in state.items() if ".lora_" not in k and ".base_layer." not in k}
    for key in [k for k in state if ".lora_A." in k and k.endswith(".weight")]:
        prefix, _, rest = key.partition(".lora_A.")
        adapter = rest[: -len(".weight")]
        a, b = state[key].float(), state[f"{prefix}.lora_B.{adapter}.weight"].float()
        w = state[f"{prefix}.base_layer.weight"]
        delta = torch.einsum("or,ri...->oi...", b.reshape(b.shape[0], b.shape[1]), a)
        out[f"{prefix}.weight"] = (w.float() + scaling * delta.reshape(w.shape)).to(w.dtype)
        if f"{prefix}.base_layer.bias" in state:
            out[f"{prefix}.bias"] = state[f"{prefix}.base_layer.bias"]
    return out
