"""Preprocessing specs: YAML -> validated dict, with errors that name the spec file and the key.

A spec says how every case of a cohort is harmonised (see preprocessing/*.yaml):

    name: ct_merlin
    orientation: RAS            # any 3-letter code
    spacing: [1.5, 1.5, 3.0]    # mm, or null to keep the reference image's spacing
    oblique: resample           # keep (stored grid stays oblique) | resample (RAS-aligned grid, world space)
    shear: refuse               # refuse | resample (world space onto an RAS-aligned grid)
    nonfinite: error            # error | zero: what to do with NaN/inf voxels
    channels: 1                 # 1 refuses 4D images; any keeps channels
    antialias: false            # Gaussian pre-filter along downsampled axes
    crop: {size: [224, 224, 160], mode: center}   # or mode: foreground (+ threshold/input), or null
    inputs:                     # one entry per cohort-table column to read
      image: {kind: image, intensity: {type: ct_window, hu_min: -1000, hu_max: 1000}}
      label: {kind: label, required: false}
    storage: {codec: npy, dtype: float32}   # how arrays are written (not in the spec hash; see volfm.store.arrays)
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from volfm import VolfmError
from volfm.configs import SPECS_DIR
from volfm.utils import did_you_mean, is_number, parse_triple, parse_triple_text

TOP_KEYS = {"name", "description", "orientation", "spacing", "oblique", "shear", "nonfinite", "channels",
            "antialias", "crop", "inputs", "reference", "storage"}
CROP_KEYS = {"size", "mode", "input", "threshold", "margin"}
INPUT_KEYS = {"kind", "required", "interpolation", "fill", "intensity", "dtype"}
INTENSITY_KEYS = {
    "none": set(),
    "ct_window": {"hu_min", "hu_max", "out_min", "out_max"},
    "mri_zscore": {"lower_percentile", "upper_percentile", "foreground", "background"},
    "pet": {"mode", "factor", "clip_max"},
}
DEFAULTS = {"orientation": "RAS", "spacing": None, "oblique": "keep", "shear": "refuse", "nonfinite": "error",
            "channels": 1, "antialias": False, "crop": None, "reference": None, "description": "", "storage": None}
# How a store writes its arrays (volfm.store.arrays). codec: npy (memory-mapped) | blosc2 (compressed, chunked);
# dtype: float32 (the arrays as the pipeline makes them) | compact (CT windows as integer levels, other images as
# float16); chunk_patch: the training patch the blosc2 chunks are sized for; clevel: blosc2's compression level.
STORAGE_DEFAULTS = {"codec": "npy", "dtype": "float32", "chunk_patch": [96, 96, 96], "clevel": 5}
STORAGE_CODECS = ("npy", "blosc2")
STORAGE_DTYPES = ("float32", "compact")
NOT_HASHED = ("description", "storage")  # neither changes the numbers a case is made of


class SpecError(VolfmError):
    pass


def unknown_key_message(where: str, key: str, allowed) -> str:
    """``"unknown key 'k' in <where> (did you mean 'x'?); allowed: a, b"``, for errors about config keys."""
    allowed = sorted(allowed)
    return f"unknown key '{key}' in {where}{did_you_mean(key, allowed, cutoff=0.6)}; allowed: {', '.join(allowed)}"


def _check_keys(d: dict, allowed, where: str, src: str):
    for k in d:
        if k not in allowed:
            raise SpecError(f"{src}: {unknown_key_message(where, k, allowed)}")


def _number(v, what: str, src: str, lo=None, hi=None, positive=False):
    """A finite number (optionally within [lo, hi], or > 0); SpecError naming ``what`` otherwise."""
    if not is_number(v) or (positive and v <= 0) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = " > 0" if positive else (f" in [{lo}, {hi}]" if lo is not None and hi is not None else
                                      f" >= {lo}" if lo is not None else "")
        raise SpecError(f"{src}: {what} must be a number{rng}, got {v!r}")
    return v


def _choice(v, options, what, src):
    if v not in options:
        raise SpecError(f"{src}: {what} must be one of {', '.join(map(str, options))}, got {v!r}")
    return v


def validate_spec(raw, src: str = "<spec>") -> dict:
    """Check a spec dict and fill defaults. Raises SpecError naming ``src`` and the bad key/value."""
    if not isinstance(raw, dict):
        raise SpecError(f"{src}: a spec must be a YAML mapping, got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, "the spec", src)
    spec = copy.deepcopy(DEFAULTS)
    spec.update(copy.deepcopy(raw))
    spec["name"] = str(spec.get("name") or Path(src).stem)
    spec["orientation"] = str(spec["orientation"]).upper()
    if len(spec["orientation"]) != 3 or {spec["orientation"][0], spec["orientation"][1], spec["orientation"][2]} \
            - set("LRAPSI") or len({c for c in spec["orientation"].translate(str.maketrans("LRAPSI", "xxyyzz"))}) != 3:
        raise SpecError(f"{src}: orientation must be a 3-letter code such as RAS or LPS, got {raw.get('orientation')!r}")
    if spec["spacing"] is not None:
        spec["spacing"] = list(parse_triple(spec["spacing"], "spacing", above=0, error=SpecError, where=f"{src}: "))
    _choice(spec["oblique"], ("keep", "resample"), "oblique", src)
    _choice(spec["shear"], ("refuse", "resample"), "shear", src)
    _choice(spec["nonfinite"], ("error", "zero"), "nonfinite", src)
    if isinstance(spec["channels"], bool):  # True == 1 would otherwise pass as "1"
        raise SpecError(f"{src}: channels must be one of 1, any, got {spec['channels']!r}")
    _choice(spec["channels"], (1, "any"), "channels", src)
    if not isinstance(spec["antialias"], bool):
        raise SpecError(f"{src}: antialias must be true or false, got {spec['antialias']!r}")
    inputs = spec.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise SpecError(f"{src}: 'inputs' must map cohort-table columns to input settings, e.g. "
                        "inputs: {image: {kind: image}}")
    for col, cfg in list(inputs.items()):
        cfg = {} if cfg is None else cfg
        if not isinstance(cfg, dict):
            raise SpecError(f"{src}: inputs.{col} must be a mapping, got {cfg!r}")
        _check_keys(cfg, INPUT_KEYS, f"inputs.{col}", src)
        kind = _choice(cfg.get("kind", "label" if col == "label" else "image"), ("image", "label"),
                       f"inputs.{col}.kind", src)
        required = cfg.get("required", kind == "image")
        if not isinstance(required, bool):
            raise SpecError(f"{src}: inputs.{col}.required must be true or false, got {required!r}")
        out = {"kind": kind, "required": required}
        if kind == "image":
            out["interpolation"] = _choice(cfg.get("interpolation", "linear"), ("linear", "bspline", "nearest"),
                                           f"inputs.{col}.interpolation", src)
            fill = cfg.get("fill", "min")
            if fill != "min" and not is_number(fill):
                raise SpecError(f"{src}: inputs.{col}.fill must be 'min' or a number, got {fill!r}")
            out["fill"] = fill
            it = cfg.get("intensity") or {"type": "none"}
            if not isinstance(it, dict) or it.get("type", "none") not in INTENSITY_KEYS:
                raise SpecError(f"{src}: inputs.{col}.intensity.type must be one of "
                                f"{', '.join(INTENSITY_KEYS)}, got {it!r}")
            _check_keys({k: v for k, v in it.items() if k != "type"}, INTENSITY_KEYS[it.get("type", "none")],
                        f"inputs.{col}.intensity ({it.get('type', 'none')})", src)
            it.setdefault("type", "none")
            key = f"inputs.{col}.intensity"
            if it["type"] == "ct_window":
                for k in ("hu_min", "hu_max", "out_min", "out_max"):
                    if k in it:
                        _number(it[k], f"{key}.{k}", src)
                if it.get("hu_max", 1000) <= it.get("hu_min", -1000):
                    raise SpecError(f"{src}: {key} needs hu_max > hu_min")
                if it.get("out_max", 1.0) <= it.get("out_min", 0.0):
                    raise SpecError(f"{src}: {key} needs out_max > out_min")
            if it["type"] == "pet":
                _choice(it.get("mode", "auto"), ("auto", "suv", "scale"), f"{key}.mode", src)
                if "factor" in it:
                    _number(it["factor"], f"{key}.factor", src, positive=True)
                if it.get("clip_max") is not None:
                    _number(it["clip_max"], f"{key}.clip_max", src, positive=True)
            if it["type"] == "mri_zscore":
                _choice(it.get("foreground", "otsu"), ("otsu", "nonzero", "all"), f"{key}.foreground", src)
                for k in ("lower_percentile", "upper_percentile"):
                    if k in it:
                        _number(it[k], f"{key}.{k}", src, lo=0, hi=100)
                if it.get("upper_percentile", 99.5) <= it.get("lower_percentile", 0.5):
                    raise SpecError(f"{src}: {key} needs upper_percentile > lower_percentile")
                if it.get("background") is not None:
                    _number(it["background"], f"{key}.background", src)
            out["intensity"] = it
            out["dtype"] = _choice(cfg.get("dtype", "float32"), ("float32", "float16"), f"inputs.{col}.dtype", src)
        else:
            out["interpolation"] = _choice(cfg.get("interpolation", "nearest"), ("nearest", "onehot_linear"),
                                           f"inputs.{col}.interpolation", src)
            for bad in ("intensity", "fill", "dtype"):
                if bad in cfg:
                    raise SpecError(f"{src}: inputs.{col} is a label; '{bad}' does not apply to labels")
        inputs[col] = out
    images = [c for c, v in inputs.items() if v["kind"] == "image"]
    if not images:
        raise SpecError(f"{src}: at least one input must be of kind image (it defines the output grid)")
    ref = spec["reference"] or next((c for c in images if inputs[c]["required"]), images[0])
    if ref not in images:
        raise SpecError(f"{src}: reference '{ref}' must name an image input ({', '.join(images)})")
    spec["reference"] = ref
    crop = spec["crop"]
    if crop is not None:
        if not isinstance(crop, dict):
            raise SpecError(f"{src}: crop must be a mapping like {{size: [224, 224, 160], mode: center}} or null")
        _check_keys(crop, CROP_KEYS, "crop", src)
        c = {"mode": _choice(crop.get("mode", "center"), ("center", "foreground"), "crop.mode", src)}
        c["size"] = (list(parse_triple(crop["size"], "crop.size", integer=True, above=0, error=SpecError, where=f"{src}: "))
                     if crop.get("size") is not None else None)
        if c["size"] is None and c["mode"] == "center":
            raise SpecError(f"{src}: crop.mode center needs crop.size")
        c["input"] = crop.get("input", ref)
        if c["input"] not in inputs:
            raise SpecError(f"{src}: crop.input '{c['input']}' is not one of the inputs ({', '.join(inputs)})")
        c["threshold"] = float(_number(crop.get("threshold", 0.0), "crop.threshold", src))
        c["margin"] = list(parse_triple(crop.get("margin", 0), "crop.margin", integer=True, at_least=0, error=SpecError,
                                        where=f"{src}: "))
        spec["crop"] = c
    spec["storage"] = validate_storage(spec["storage"], src)
    if spec["storage"]["dtype"] == "compact":
        for col, cfg in inputs.items():
            it = cfg.get("intensity") or {}
            if it.get("type") == "ct_window":
                bad = [k for k in ("hu_min", "hu_max") if not float(it.get(k, 0)).is_integer()]
                if bad:
                    raise SpecError(f"{src}: storage.dtype compact stores CT windows as integer HU levels, so "
                                    f"inputs.{col}.intensity.{bad[0]} must be a whole number, got {it[bad[0]]!r}; "
                                    "round the window or use storage.dtype float32")
    return spec


def validate_storage(raw, src: str = "<spec>", where: str = "storage") -> dict:
    """A ``storage`` block (None: the defaults) -> ``{codec, dtype, chunk_patch, clevel}`` with defaults filled;
    SpecError naming ``src`` and the key otherwise. ``where`` names the block in messages (e.g. ``--storage``)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{src}: {where} must be a mapping like {{codec: blosc2, dtype: compact}}, got {raw!r}")
    _check_keys(raw, STORAGE_DEFAULTS, where, src)
    out = copy.deepcopy(STORAGE_DEFAULTS)
    out.update(raw)
    _choice(out["codec"], STORAGE_CODECS, f"{where}.codec", src)
    _choice(out["dtype"], STORAGE_DTYPES, f"{where}.dtype", src)
    out["chunk_patch"] = list(parse_triple(out["chunk_patch"], f"{where}.chunk_patch", integer=True, at_least=1,
                                           error=SpecError, where=f"{src}: "))
    clevel = out["clevel"]
    if isinstance(clevel, bool) or not is_number(clevel) or not float(clevel).is_integer() or not 0 <= clevel <= 9:
        raise SpecError(f"{src}: {where}.clevel must be an integer in [0, 9], got {clevel!r}")
    out["clevel"] = int(clevel)
    return out


def parse_storage_text(text: str, where: str = "--storage") -> dict:
    """``"codec=blosc2,dtype=compact,chunk_patch=96x96x96,clevel=5"`` (any subset) -> a validated storage block."""
    raw: dict = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise SpecError(f"{where} {text!r}: expected key=value pairs separated by commas, e.g. "
                            "codec=blosc2,dtype=compact")
        if key == "chunk_patch":
            raw[key] = list(parse_triple_text(value, "chunk_patch", integer=True, at_least=1, error=SpecError,
                                             where=f"{where}: "))
        elif key == "clevel":
            raw[key] = int(value) if value.isdigit() else value
        else:
            raw[key] = value
    return validate_storage(raw, where, "storage")


def with_storage(spec: dict, storage, src: str = "--storage") -> dict:
    """A copy of the resolved ``spec`` with its ``storage`` block replaced (a dict or a ``--storage`` text) and checked
    against the inputs (compact needs integer CT windows); the spec hash does not change."""
    block = parse_storage_text(storage, src) if isinstance(storage, str) else validate_storage(storage, src)
    raw = copy.deepcopy(spec)
    raw["storage"] = block
    return validate_spec(raw, src)


def load_spec(path) -> dict:
    """Read and validate a spec YAML file; a built-in name (e.g. 'ct_merlin') is found in volfm/configs/specs."""
    raw, path = read_spec_yaml(path)
    return validate_spec(raw, str(path))


def read_spec_yaml(path) -> tuple[object, Path]:
    """(the parsed YAML of a spec file, not validated, its path): what the file itself says, e.g. whether it sets a
    ``storage`` block (:func:`validate_spec` fills the defaults, so the resolved spec cannot tell)."""
    path = resolve_spec_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise SpecError(f"{path}: not a YAML text file ({type(exc).__name__}); give the path of a spec .yaml") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: malformed YAML{where} ({getattr(exc, 'problem', exc)}); fix the syntax") from exc
    return raw, path


def resolve_spec_path(path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    builtin = SPECS_DIR / f"{p.stem}.yaml"
    if builtin.exists() and p.parent == Path("."):
        return builtin
    raise SpecError(f"{path}: spec file not found; give a path to a YAML spec or a built-in name "
                    f"({', '.join(sorted(x.stem for x in builtin.parent.glob('*.yaml')))})")


def spec_hash(spec: dict) -> str:
    """Content hash of a resolved spec (description and storage excluded): equal hashes mean equal processing. The
    storage encoding is left out so that a store converted to another encoding keeps its hash (and its checkpoints'
    records and resume stay valid)."""
    core = {k: v for k, v in spec.items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]
