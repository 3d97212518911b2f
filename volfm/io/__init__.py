"""Readers, writers and geometry: the only place that knows about LPS, sform/qform and file formats."""
from volfm.io.affine import (
                             axcodes,
                             is_oblique,
                             is_sheared,
                             lps_to_ras,
                             ras_to_lps,
                             sitk_geometry,
                             spacing_from_affine,
                             voxel_to_world,
                             world_to_voxel,
)
from volfm.io.readers import (
                             GeometryWarning,
                             VolumeReadError,
                             is_image_path,
                             read_volume,
                             write_nifti,
)
from volfm.io.volume import Volume

__all__ = ["Volume", "read_volume", "write_nifti", "VolumeReadError", "GeometryWarning", "is_image_path",
           "axcodes", "is_oblique", "is_sheared", "lps_to_ras", "ras_to_lps", "sitk_geometry",
           "spacing_from_affine", "voxel_to_world", "world_to_voxel"]
