"""Patch augmentation with TorchIO, configured from YAML, geometry-aware.

A config is a list of transform entries (or a mapping ``{transforms: [...], p: 0.8}`` whose ``p`` is
the probability of applying the whole chain); ``None`` or ``[]`` means no augmentation. In a file
read by ``load_augmentation`` the list may sit under a top-level ``augment:`` key::

    augment:
      - {name: RandomFlip, axes: [0, 1, 2], flip_probability: 0.5}
      - {name: RandomAffine, scales: [0.9, 1.1], degrees: 10, p: 0.3}
      - one_of:                                   # tio.OneOf: one of these, by weight
          - {name: RandomAffine, degrees: 15, weight: 0.8}
          - {name: RandomElasticDeformation, max_displacement: 5, weight: 0.2}
        p: 0.5
      - {name: RandomBiasField, coefficients: 0.3, include: [mri], p: 0.3}   # MRI only
      - {name: RandomGamma, log_gamma: [-0.3, 0.3], p: 0.3}
      - {name: RandomNoise, std: [0, 0.05], p: 0.2}

Every entry names one transform of a curated whitelist (``TRANSFORMS``) plus that transform's own
TorchIO arguments and the common ``p`` (probability), ``include`` / ``exclude`` (array names the
transform is restricted to / kept off). Unknown names or arguments give a one-line
``AugmentationError`` naming the config source and the entry index, with a did-you-mean.

Geometry: ``Augmentation.__call__`` wraps all arrays of a case into one ``tio.Subject`` that shares
a single affine, so spatial transforms (flip, affine, elastic) draw one random displacement and move
the image, the label and every paired modality together. Labels are ``tio.LabelMap``: resampled with
nearest neighbour (a ``label_interpolation`` other than nearest is refused) and never touched by
intensity transforms. Spatial transforms may not be given include/exclude (that would misalign the
arrays); intensity transforms may (e.g. ``include: [mri]`` for motion/ghosting/bias field).

Randomness: TorchIO draws every random parameter from torch's global RNG. Without ``rng_seed`` the
augmentation uses (and advances) that RNG, which DataLoader seeds differently per worker. With
``rng_seed`` the call runs inside ``torch.random.fork_rng`` seeded with it: the same seed gives the
same augmentation, and the caller's RNG state is left untouched.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from volfm import VolfmError
from volfm.preprocess.spec import unknown_key_message
from volfm.utils import did_you_mean, is_number

try:  # a volfm dependency, but kept optional at import (as MONAI does): training without augmentation needs none
    import torchio as tio
except ImportError:  # pragma: no cover - depends on the environment (torchio also needs SimpleITK)
    tio = None


class AugmentationError(VolfmError):
    pass


# Transforms that change geometry: applied to every array of the case together.
SPATIAL = ("RandomFlip", "RandomAffine", "RandomElasticDeformation", "RandomAffineElasticDeformation")
# Intensity transforms (ScalarImage only; labels are never touched). RandomAnisotropy resamples
# down and back up onto the same grid (scalars only), so it behaves like an intensity transform.
INTENSITY = ("RandomAnisotropy", "RandomBiasField", "RandomGamma", "RandomNoise", "RandomBlur", "RandomMotion",
             "RandomGhosting", "RandomSpike", "RescaleIntensity", "ZNormalization", "Clamp")
TRANSFORMS = {name: getattr(tio, name) for name in SPATIAL + INTENSITY} if tio is not None else {}
COMMON_ARGS = ("p", "include", "exclude")
ENTRY_KEYS = ("name", "one_of", "weight")  # non-argument keys of an entry


def _own_args(cls) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


ALLOWED_ARGS = {name: _own_args(cls) + list(COMMON_ARGS) for name, cls in TRANSFORMS.items()}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _tuplify(v):
    """YAML lists -> tuples (TorchIO range arguments expect tuples)."""
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuplify(x) for k, x in v.items()}
    return v


def _keys_arg(v, what: str, src: str, keys) -> list[str]:
    v = [v] if isinstance(v, str) else v
    if not (isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v)):
        raise AugmentationError(f"{src}: {what} must be an array name or a list of names, got {v!r}")
    if keys is not None:
        for k in v:
            if k not in keys:
                raise AugmentationError(f"{src}: {what}: unknown array '{k}'{did_you_mean(k, keys)}; "
                                        f"the case holds: {', '.join(keys)}")
    return list(v)


def _probability(v, what: str, src: str) -> float:
    if not is_number(v) or not 0 <= v <= 1:
        raise AugmentationError(f"{src}: {what} must be a probability in [0, 1], got {v!r}")
    return float(v)


def _build_entry(entry, where: str, src: str, keys, in_one_of=False) -> tuple[tio.Transform, float]:
    """One config entry -> (TorchIO transform, OneOf weight)."""
    if not isinstance(entry, Mapping):
        raise AugmentationError(f"{src}: {where} must be a mapping like {{name: RandomFlip, axes: [0]}}, "
                                f"got {entry!r}")
    entry = dict(entry)
    weight = 1.0
    if "weight" in entry:
        if not in_one_of:
            raise AugmentationError(f"{src}: {where}: 'weight' only applies to entries inside a one_of group")
        weight = entry.pop("weight")
        if not is_number(weight) or weight <= 0:
            raise AugmentationError(f"{src}: {where}.weight must be a number > 0, got {weight!r}")
    if "one_of" in entry:
        extra = set(entry) - {"one_of", "p"}
        if extra:
            k = sorted(map(str, extra))[0]
            raise AugmentationError(f"{src}: {unknown_key_message(f'{where} (one_of group)', k, ['one_of', 'p', 'weight'])}")
        items = entry["one_of"]
        if not isinstance(items, list) or not items:
            raise AugmentationError(f"{src}: {where}.one_of must be a non-empty list of transform entries")
        choices = {}
        for i, sub in enumerate(items):
            t, w = _build_entry(sub, f"{where}.one_of[{i}]", src, keys, in_one_of=True)
            choices[t] = float(w)
        p = _probability(entry.get("p", 1.0), f"{where}.p", src)
        return tio.OneOf(choices, p=p, copy=False), weight
    if "name" not in entry:
        raise AugmentationError(f"{src}: {where} needs 'name' (one of {', '.join(TRANSFORMS)}) or 'one_of'")
    name = entry.pop("name")
    if not isinstance(name, str) or name not in TRANSFORMS:
        raise AugmentationError(f"{src}: {where}: unknown transform {name!r}{did_you_mean(name, TRANSFORMS)}; "
                                f"allowed: {', '.join(TRANSFORMS)}")
    allowed = ALLOWED_ARGS[name]
    for k in entry:
        if k not in allowed:
            raise AugmentationError(f"{src}: {where} ({name}): unknown argument '{k}'{did_you_mean(k, allowed)}; "
                                    f"allowed: {', '.join(allowed)}")
    kwargs = {}
    for k, v in entry.items():
        if k == "p":
            kwargs["p"] = _probability(v, f"{where}.p", src)
        elif k in ("include", "exclude"):
            if name in SPATIAL:
                raise AugmentationError(f"{src}: {where} ({name}): a spatial transform moves every array of the "
                                        f"case together; '{k}' is only for intensity transforms")
            kwargs[k] = _keys_arg(v, f"{where}.{k}", src, keys)
        else:
            kwargs[k] = _tuplify(v)
    if "include" in kwargs and "exclude" in kwargs:
        raise AugmentationError(f"{src}: {where} ({name}): give include or exclude, not both")
    label_interp = [kwargs.get("label_interpolation")]
    for sub in ("affine_kwargs", "elastic_kwargs"):
        if isinstance(kwargs.get(sub), Mapping):
            label_interp.append(kwargs[sub].get("label_interpolation"))
    if any(li not in (None, "nearest") for li in label_interp):
        raise AugmentationError(f"{src}: {where} ({name}): labels are always resampled with nearest "
                                f"neighbour; label_interpolation must be 'nearest'")
    try:
        transform = TRANSFORMS[name](copy=False, **kwargs)
    except Exception as exc:  # TorchIO's own argument checks (ValueError, TypeError, ...)
        culprit = ""
        for k, v in kwargs.items():  # find the argument that fails on its own, to name it
            try:
                TRANSFORMS[name](copy=False, **{k: v})
            except Exception:
                culprit = f" {k}={entry[k]!r}"
                break
        raise AugmentationError(f"{src}: {where} ({name}): bad argument{culprit}: {_one_line(exc)}") from exc
    return transform, weight


def parse_augmentation_yaml(text: str, source: str = "<config>"):
    """YAML text -> raw config (list/mapping/None); malformed YAML raises a one-line error naming source."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or _one_line(exc)
        raise AugmentationError(f"{source}: malformed YAML{where} ({problem}); fix the syntax") from exc


def load_augmentation(path, keys: Iterable[str] | None = None) -> Augmentation | None:
    """Read an augmentation YAML file (a list, or a mapping with 'transforms', or 'augment: ...')."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AugmentationError(f"{p}: cannot read augmentation config ({_one_line(exc)})") from exc
    raw = parse_augmentation_yaml(text, str(p))
    if isinstance(raw, Mapping) and set(raw) == {"augment"}:
        raw = raw["augment"]
    return build_augmentation(raw, source=str(p), keys=keys)


def build_augmentation(cfg, source: str = "<config>", keys: Iterable[str] | None = None) -> Augmentation | None:
    """Config -> ``Augmentation`` (or None when there is nothing to do).

    ``cfg``: a list of entries, a mapping ``{transforms: [...], p: ...}``, None/[] (-> None), or YAML
    text holding one of those. ``source`` names the config in errors (file path, recipe key).
    ``keys``: when given, the array names a case can hold; include/exclude are checked against them.
    """
    if isinstance(cfg, str):
        cfg = parse_augmentation_yaml(cfg, source)
    keys = None if keys is None else sorted(set(keys))
    p = 1.0
    if isinstance(cfg, Mapping):
        extra = set(cfg) - {"transforms", "p"}
        if "name" in cfg or "one_of" in cfg:
            raise AugmentationError(f"{source}: the augmentation config must be a list of entries; write a single "
                                    f"transform as a one-item list: - {{name: {cfg.get('name', '...')}, ...}}")
        if extra:
            bad = sorted(map(str, extra))[0]
            raise AugmentationError(f"{source}: {unknown_key_message('the augmentation config', bad, ['transforms', 'p'])}")
        p = _probability(cfg.get("p", 1.0), "p", source)
        cfg = cfg.get("transforms")
    if cfg is None:
        return None
    if not isinstance(cfg, (list, tuple)):
        raise AugmentationError(f"{source}: an augmentation config must be a list of transform entries "
                                f"(e.g. [{{name: RandomFlip, axes: [0, 1, 2]}}]) or {{transforms: [...], p: ...}}, "
                                f"got {type(cfg).__name__}")
    if not cfg:
        return None
    if tio is None:
        raise AugmentationError(f"{source}: augmentation needs TorchIO (and SimpleITK), which is not installed here; "
                                "pip install torchio (a volfm dependency), or set augmentation: null")
    transforms = [_build_entry(e, f"entry {i}", source, keys)[0] for i, e in enumerate(cfg)]
    return Augmentation(tio.Compose(transforms, p=p, copy=False), source=source)


def _affine_for(case: Mapping, affine) -> np.ndarray:
    if affine is None:
        meta = case.get("meta") or {}
        affine = meta.get("affine") if isinstance(meta, Mapping) else None
        if affine is None:
            spacing = (meta.get("spacing") if isinstance(meta, Mapping) else None) or case.get("spacing")
            affine = np.diag([*(float(s) for s in spacing), 1.0]) if spacing is not None else np.eye(4)
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise AugmentationError(f"augmentation needs a finite 4x4 affine, got shape {a.shape}")
    return a


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    except TypeError:
        return torch.int64


class Augmentation:
    """A composed TorchIO transform applied to a case's arrays together (see the module docstring)."""

    def __init__(self, transform: tio.Transform, source: str = "<config>"):
        self.transform = transform
        self.source = source

    def __repr__(self) -> str:
        return f"Augmentation({self.transform!r}, source={self.source!r})"

    def __call__(self, case: dict, image_keys: Sequence[str] = ("image",), label_keys: Sequence[str] = ("label",),
                 affine=None, rng_seed: int | None = None) -> dict:
        """Augment ``case[k]`` for every image/label key present (arrays (C, I, J, K) or (I, J, K)).

        All arrays share one affine: ``affine`` if given, else ``case['meta']['affine']``, else a
        diagonal one from ``case['meta']['spacing']`` / ``case['spacing']``, else identity.
        Returns a new dict: augmented arrays as torch tensors (images float32, labels in their input
        integer dtype, same shape), every other key passed through. Keys missing or None are skipped.
        ``rng_seed``: run under a forked torch RNG seeded with it (same seed, same augmentation).
        """
        image_keys, label_keys = list(image_keys), list(label_keys)
        both = set(image_keys) & set(label_keys)
        if both:
            raise AugmentationError(f"{self.source}: {sorted(both)} given as both image and label keys")
        present = [k for k in image_keys + label_keys if case.get(k) is not None]
        out = dict(case)
        if not present:
            return out
        aff = _affine_for(case, affine)
        subject_images, info = {}, {}
        shape = None
        for k in present:
            arr = case[k]
            # always a float32 copy: memmaps and the caller's arrays are never written
            if isinstance(arr, torch.Tensor):
                dtype, t = arr.dtype, arr.detach().to("cpu", torch.float32, copy=True)
            else:
                arr = np.asarray(arr)
                dtype, t = _torch_dtype(arr.dtype), torch.tensor(arr, dtype=torch.float32)
            if t.ndim not in (3, 4):
                raise AugmentationError(f"{self.source}: array '{k}' must be (C, I, J, K) or (I, J, K), "
                                        f"got shape {tuple(t.shape)}")
            info[k] = (t.ndim, dtype)
            t = t[None] if t.ndim == 3 else t
            if shape is not None and tuple(t.shape[1:]) != shape:
                raise AugmentationError(f"{self.source}: arrays must share one grid; '{k}' is {tuple(t.shape[1:])}, "
                                        f"'{present[0]}' is {shape}")
            shape = tuple(t.shape[1:])
            if k in label_keys:
                if dtype.is_floating_point and not torch.equal(t, t.round()):
                    raise AugmentationError(f"{self.source}: label '{k}' has non-integer values")
                subject_images[k] = tio.LabelMap(tensor=t, affine=aff)
            else:
                subject_images[k] = tio.ScalarImage(tensor=t, affine=aff)
        subject = tio.Subject(subject_images)
        if rng_seed is None:
            result = self.transform(subject)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng_seed))
                result = self.transform(subject)
        for k in present:
            ndim, dtype = info[k]
            t = result[k].data
            if k in label_keys:
                t = t.round().to(dtype)
            else:
                t = t.to(torch.float32)
            out[k] = (t[0] if ndim == 3 else t).contiguous()
        return out
