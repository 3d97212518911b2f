"""Input degradations for robustness reports: noise, a bias field, missing slices.

A synthesis (or any image) model is scored on clean inputs and again on degraded ones, so users see
how sensitive the metrics are to a noisier scan, an uncorrected bias field or missing slices. Each
degradation is a pure function of the volume, a level and a seeded generator:

- ``add_noise(x, level, rng)``: additive Gaussian noise on every voxel, ``sigma = level * s`` with
  ``s`` the standard deviation of the channel's foreground intensities (``level`` is a fraction of
  the tissue contrast, independent of the units); per channel.
- ``add_bias_field(x, strength, rng)``: ``x * f`` with a smooth multiplicative field
  ``f = exp(P) / mean(exp(P))``: ``P`` a random polynomial of degree 3 (no constant term) in the voxel
  coordinates scaled to [-1, 1] per axis (the grid's spacing is ignored), scaled so that the standard
  deviation of ``P`` over the whole grid is ``strength`` (0.1 is roughly a +-10% field); the mean of
  ``f`` over the foreground is exactly 1. One field for all channels (one coil).
- ``drop_slices(x, fraction, rng, axis=-1, fill=...)``: ``round(fraction * n)`` (half up) of the n
  slices along a spatial axis, chosen at random, are lost: ``fill="zero"`` sets them to 0,
  ``fill="nearest"`` copies the nearest kept slice (the lower one on a tie). At least one slice is kept.

Foreground: voxels where a ``mask`` (if given) is nonzero, else the voxels that differ from the
channel's minimum (the background of skull-stripped or masked volumes); for the bias field the union
over channels. A constant channel has no foreground and gets no noise.

Inputs are ``(C, I, J, K)`` (or ``(I, J, K)``) arrays or tensors; the output has the same shape and
type (float dtypes are kept, integers become float32). ``rng`` is a ``numpy.random.Generator`` or an
integer seed -- never the global state -- so a seed gives the same degradation. With the same seed the
random draws do not depend on the level (the noise pattern, the field's shape and the slice order are
fixed and the level only scales them or takes more slices), so a level sweep is monotone: a higher
level always deviates more from the clean input.

``DEGRADATIONS`` maps the names ``noise``, ``bias``, ``slices`` to the functions; ``degrade(x, name,
level, seed)`` applies one; ``parse_degradations("noise:0.05,0.1;bias:0.3;slices:0.1,0.2")`` reads a
sweep specification (e.g. from the CLI) into ``[("noise", 0.05), ("noise", 0.1), ...]``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from volfm import VolfmError
from volfm.utils import did_you_mean

__all__ = ["DEGRADATIONS", "LEVEL_RULES", "add_noise", "bias_field", "add_bias_field", "drop_slices", "degrade",
           "parse_degradations"]

BIAS_ORDER = 3


# ----------------------------------------------------------------------------------- helpers
def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise VolfmError(f"rng must be a numpy.random.Generator or an integer seed, got {rng!r}; degradations are "
                     "deterministic only with an explicit seed")


def _as_array(x) -> tuple[np.ndarray, Callable]:
    """(C, I, J, K) float numpy copy of x, and a function turning a result back into x's type and shape."""
    is_torch = hasattr(x, "detach")
    arr = x.detach().cpu().numpy() if is_torch else np.asarray(x)
    if arr.ndim not in (3, 4):
        raise VolfmError(f"a volume of shape {tuple(arr.shape)} cannot be degraded; expected (C, I, J, K) or (I, J, K)")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise VolfmError(f"a volume of dtype {arr.dtype} cannot be degraded; give a float image")
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float32)
    squeeze = arr.ndim == 3
    work = np.array(arr[None] if squeeze else arr, dtype=np.float64)

    def back(out: np.ndarray):
        out = (out[0] if squeeze else out).astype(dtype, copy=False)
        if is_torch:
            return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)
        return out

    return work, back


def _foreground(work: np.ndarray, mask) -> np.ndarray:
    """Boolean (C, I, J, K) foreground (see the module docstring)."""
    if mask is None:
        return work != work.reshape(work.shape[0], -1).min(axis=1).reshape(-1, 1, 1, 1)
    m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4 or m.shape[1:] != work.shape[1:] or m.shape[0] not in (1, work.shape[0]):
        raise VolfmError(f"mask shape {tuple(m.shape)} does not fit a volume of shape {work.shape}; give an "
                         "(I, J, K) mask on the volume's grid")
    return np.broadcast_to(m != 0, work.shape)


def _level(value, name: str, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VolfmError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or v > hi or (hi_open and v == hi):
        bound = f"[{lo:g}, {hi:g}{')' if hi_open else ']'}" if math.isfinite(hi) else f">= {lo:g}"
        raise VolfmError(f"{name} must be {'in ' if math.isfinite(hi) else ''}{bound}, got {value!r}")
    return v


# ----------------------------------------------------------------------------------- degradations
def add_noise(x, level: float, rng, *, mask=None):
    """``x`` plus Gaussian noise with ``sigma = level * std(foreground of the channel)``, on every voxel."""
    level = _level(level, "noise level")
    gen = _rng(rng)
    work, back = _as_array(x)
    fg = _foreground(work, mask)
    z = gen.standard_normal(work.shape)  # drawn whatever the level, so levels share one pattern
    for c in range(work.shape[0]):
        vals = work[c][fg[c]]
        scale = float(vals.std()) if vals.size else 0.0
        work[c] += level * scale * z[c]
    return back(work)


def _monomials(shape: tuple[int, int, int], order: int) -> tuple[list[tuple[int, int, int]], list[np.ndarray]]:
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    powers = [(a, b, c) for a in range(order + 1) for b in range(order + 1 - a) for c in range(order + 1 - a - b)
              if a + b + c > 0]
    terms = [axes[0][:, None, None] ** a * axes[1][None, :, None] ** b * axes[2][None, None, :] ** c
             for a, b, c in powers]
    return powers, terms


def bias_field(shape, strength: float, rng, *, foreground=None, order: int = BIAS_ORDER) -> np.ndarray:
    """The (I, J, K) multiplicative field of :func:`add_bias_field`: smooth, mean 1 over ``foreground``."""
    strength = _level(strength, "bias strength")
    gen = _rng(rng)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise VolfmError(f"bias_field needs a spatial shape (I, J, K), got {shape}")
    fg = np.ones(shape, dtype=bool) if foreground is None else np.asarray(foreground, dtype=bool)
    if not fg.any():
        fg = np.ones(shape, dtype=bool)
    powers, terms = _monomials(shape, order)
    coef = gen.uniform(-1.0, 1.0, size=len(powers))  # drawn whatever the strength: one shape per seed
    poly = np.zeros(shape)
    for cf, term in zip(coef, terms):
        poly = poly + cf * term
    sd = float(poly.std())  # over the whole grid, so the scale does not depend on the foreground's shape
    poly = poly * (strength / sd) if sd > 0 else np.zeros(shape)
    field = np.exp(poly)
    return field / field[fg].mean()


def add_bias_field(x, strength: float, rng, *, mask=None, order: int = BIAS_ORDER):
    """``x`` times a smooth random field (log-field std ``strength`` over the grid, mean 1 over the foreground)."""
    work, back = _as_array(x)
    fg = _foreground(work, mask).any(axis=0)
    field = bias_field(work.shape[1:], strength, rng, foreground=fg, order=order)
    return back(work * field[None])


def _spatial_axis(axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= axis <= 2:
        raise VolfmError(f"axis must be a spatial axis: 0, 1, 2 (I, J, K) or -3..-1, got {axis!r}")
    return int(axis) % 3


def drop_slices(x, fraction: float, rng, *, axis: int = -1, fill: str = "zero", return_indices: bool = False):
    """Lose ``round(fraction * n)`` random slices along spatial ``axis`` (``fill``: "zero" or "nearest").

    ``return_indices=True`` also returns the sorted indices of the dropped slices.
    """
    fraction = _level(fraction, "slice fraction", 0.0, 1.0, hi_open=True)
    if fill not in ("zero", "nearest"):
        raise VolfmError(f"fill must be 'zero' or 'nearest', got {fill!r}")
    ax = _spatial_axis(axis)
    gen = _rng(rng)
    work, back = _as_array(x)
    n = work.shape[1 + ax]
    order = gen.permutation(n)  # drawn whatever the fraction: more slices = a superset of fewer
    count = min(int(math.floor(fraction * n + 0.5)), n - 1)
    dropped = np.sort(order[:count])
    if count:
        moved = np.moveaxis(work, 1 + ax, 1)  # a view: writes go to work
        if fill == "zero":
            moved[:, dropped] = 0.0
        else:
            kept = np.setdiff1d(np.arange(n), dropped)
            # nearest kept slice, the lower one on a tie
            pos = np.searchsorted(kept, dropped)  # kept[pos - 1] < dropped < kept[pos]
            lower = kept[np.maximum(pos - 1, 0)]
            upper = kept[np.minimum(pos, len(kept) - 1)]
            has_lower, has_upper = pos > 0, pos < len(kept)
            use_lower = has_lower & (~has_upper | (dropped - lower <= upper - dropped))
            source = np.where(use_lower, lower, upper)
            moved[:, dropped] = moved[:, source]
    out = back(work)
    return (out, [int(i) for i in dropped]) if return_indices else out


# ----------------------------------------------------------------------------------- registry
DEGRADATIONS: dict[str, Callable] = {"noise": add_noise, "bias": add_bias_field, "slices": drop_slices}
# name -> (lower bound, upper bound, upper bound open); the level's meaning is in the module docstring
LEVEL_RULES: dict[str, tuple[float, float, bool]] = {
    "noise": (0.0, math.inf, False),
    "bias": (0.0, math.inf, False),
    "slices": (0.0, 1.0, True),
}


def _unknown(name) -> VolfmError:
    return VolfmError(f"unknown degradation '{name}'{did_you_mean(name, DEGRADATIONS)}; choose from {', '.join(DEGRADATIONS)}")


def degrade(x, name: str, level: float, seed, **kwargs):
    """Apply the degradation ``name`` at ``level`` with a generator seeded by ``seed`` (extra keyword
    arguments go to the function, e.g. ``axis=``/``fill=`` for slices, ``mask=`` for noise and bias)."""
    if name not in DEGRADATIONS:
        raise _unknown(name)
    return DEGRADATIONS[name](x, level, _rng(seed), **kwargs)


def parse_degradations(spec: str) -> list[tuple[str, float]]:
    """``"noise:0.05,0.1;bias:0.3;slices:0.1,0.2"`` -> ``[("noise", 0.05), ("noise", 0.1), ("bias", 0.3),
    ("slices", 0.1), ("slices", 0.2)]``, in the given order; whitespace is ignored, a name appears once."""
    if not isinstance(spec, str) or not spec.strip():
        raise VolfmError(f"degradation spec must be a non-empty string like 'noise:0.05,0.1;bias:0.3;slices:0.1', "
                         f"got {spec!r}")
    out: list[tuple[str, float]] = []
    seen = set()
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue  # tolerate a trailing ';'
        name, sep, levels = part.partition(":")
        name = name.strip()
        if not sep or not levels.strip():
            raise VolfmError(f"degradation spec part '{part}' needs 'name:level[,level...]', e.g. 'noise:0.05,0.1'")
        if name not in DEGRADATIONS:
            raise _unknown(name)
        if name in seen:
            raise VolfmError(f"degradation '{name}' appears twice in '{spec}'; list all its levels once, "
                             f"e.g. '{name}:0.1,0.2'")
        seen.add(name)
        lo, hi, hi_open = LEVEL_RULES[name]
        for text in levels.split(","):
            text = text.strip()
            try:
                value = float(text)
            except ValueError:
                raise VolfmError(f"degradation '{name}': level '{text}' is not a number (in '{part}')") from None
            out.append((name, _level(value, f"degradation '{name}' level", lo, hi, hi_open)))
    if not out:
        raise VolfmError(f"degradation spec '{spec}' holds no degradation; e.g. 'noise:0.05;slices:0.1'")
    return out
