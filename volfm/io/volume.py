"""The in-memory image: an array (C, I, J, K) plus a RAS voxel-to-world affine."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from volfm.io import affine as geo


@dataclass
class Volume:
    """A 3D image with channels.

    array:  (C, I, J, K); channel first, spatial axes in the file's voxel order.
    affine: 4x4 float64, voxel index (i, j, k) -> RAS+ world mm (voxel centres).
    meta:   provenance and acquisition facts (source path, sform/qform choice, SUV factor, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.array.ndim != 4:
            raise ValueError(f"Volume.array must be (C, I, J, K), got shape {self.array.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> np.ndarray:
        return geo.spacing_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        return geo.axcodes(self.affine)

    @property
    def is_oblique(self) -> bool:
        return geo.is_oblique(self.affine)

    @property
    def is_sheared(self) -> bool:
        return geo.is_sheared(self.affine)

    @property
    def source(self) -> str:
        return str(self.meta.get("path", "<in-memory volume>"))

    def replace(self, **changes) -> Volume:
        """A copy with some fields replaced; meta is shallow-copied so edits do not leak back."""
        changes.setdefault("meta", dict(self.meta))
        return replace(self, **changes)

    def world_of(self, ijk) -> np.ndarray:
        return geo.voxel_to_world(self.affine, ijk)

    def __repr__(self) -> str:
        sp = "x".join(f"{s:.3g}" for s in self.spacing)
        return (f"Volume(shape={self.array.shape}, dtype={self.array.dtype}, spacing={sp} mm, "
                f"orientation={self.orientation}{', oblique' if self.is_oblique else ''}"
                f"{', sheared' if self.is_sheared else ''}, source={self.source})")
