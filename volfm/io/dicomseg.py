"""DICOM Segmentation (SEG) objects from volfm label maps, written with highdicom over the source series.

:func:`write_dicom_seg` turns a label map on a DICOM series' own grid (what ``volfm predict`` writes as
``<name>_seg.nii.gz`` for a DICOM input) into one SEG instance that a PACS, OHIF or 3D Slicer shows over the
original images:

- **Source series.** The headers of the series (pydicom, pixel data not read) are read from the folder (its DICOM
  files whatever their names, :func:`volfm.io.multiframe.dicom_files`; not subfolders) or from a list of files;
  ``series_id`` (the SeriesInstanceUID or its ``volfm scan --hash-uids`` hash, as ``Volume.meta["series_id"]`` of
  :func:`volfm.io.read_volume` holds it) picks one series. The series is chosen by the reader's own rule,
  :func:`volfm.io.readers.resolve_series`: without ``series_id`` the folder's series with the most files (ties:
  the first by UID), with a ``GeometryWarning`` when there are several; a series asked for by hash is named by
  its hash in every message. The series is single-frame slices (one file each) or one enhanced /
  legacy-converted enhanced multi-frame image, whose frames the SEG then references by number.
- **Alignment.** Nothing is assumed about file order or about how the label array is laid out: every slice's
  ImagePositionPatient, ImageOrientationPatient and PixelSpacing are mapped through the label map's RAS affine
  into its voxel indices. The series must cover the label grid exactly (one slice per index along one array
  axis, rows and columns along the two others, any order or flip, within :data:`GRID_TOL` of a voxel);
  otherwise :class:`DicomSegError` says so in one line and nothing is written. Each SEG frame is the label map's
  section through one source slice (slices in order along the slice normal; a multi-frame source's frames in
  file order) and references that slice's SOPInstanceUID (and frame number); the SEG shares the series'
  FrameOfReferenceUID, orientation and pixel spacing (highdicom copies them from the source images).
- **Segments.** One per foreground label (every name but label 0, background), numbered 1.. in label-value
  order, type BINARY (1 bit per pixel; read by every SEG viewer). Frames are stored only where a segment has
  voxels (highdicom's ``omit_empty_frames``); a segment with no voxels is described and has no frames. When the
  whole map is empty, every frame of every segment is kept (a SEG needs at least one frame): the SEG then records
  that the model found nothing. Each segment carries its label name, a DICOM category and type coded from
  pydicom's DICOM code dictionary (:func:`segment_code`: the name looked up in CID 7151 "Segmentation Property
  Types"; ``left``/``right`` in a name become a laterality modifier; a name not found there, and a foreground
  class named ``background``, get the generic Tissue/Tissue, 3D Slicer's default, and ``matched`` False), a
  recommended display colour (CIELab, distinct per
  segment), the algorithm (name, version, family "Artificial Intelligence", type AUTOMATIC) and
  ``SegmentDescription`` "volfm label <value>".
- **Identity.** As every DICOM object derived from an image must, the SEG carries the source's Patient and Study
  modules (highdicom copies patient name, id, birth date, sex, the study's uid, date, accession number, ...,
  and records the source's equipment as contributing equipment); nothing else is copied. Type 2 attributes
  missing from the source (e.g. PatientBirthDate) are written empty, as the standard allows. ContentQualification
  is RESEARCH.

The file is written atomically (write-then-rename), uncompressed (Explicit VR Little Endian). Whatever goes wrong
while highdicom builds or saves the SEG (a source header it cannot use, a full disk) is a one-line
:class:`DicomSegError` naming the folder, so ``volfm predict`` reports that input and goes on.
"""
from __future__ import annotations

import colorsys
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from volfm import VolfmError, __version__
from volfm.io.affine import LPS_RAS_FLIP
from volfm.io.atomic import atomic_path
from volfm.io.errors import one_line
from volfm.io.multiframe import dicom_files, floats, frame_group, number_of_frames
from volfm.io.readers import read_volume, resolve_series
from volfm.io.volume import Volume

__all__ = ["DicomSegError", "SegmentCode", "GRID_TOL", "segment_code", "segment_colour", "read_series_headers",
           "write_dicom_seg"]

GRID_TOL = 0.1  # largest distance (in voxels) between a source pixel centre and the label voxel it is matched to

# Type 2 attributes highdicom reads from the source; written empty (allowed for type 2) when a source lacks them
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
             "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
# common label spellings that are not the dictionary's keywords (keywords, never code values)
_SYNONYMS = {"tumor": "Neoplasm", "tumour": "Neoplasm", "cancer": "Neoplasm", "vessel": "BloodVessel",
             "vessels": "BloodVessel", "fat": "AdiposeTissue", "muscle": "MuscleTissue", "lungs": "Lung",
             "kidneys": "Kidney", "urinarybladder": "Bladder", "vertebrae": "Vertebra", "ribs": "Rib",
             "smallbowel": "SmallIntestine"}
_LATERALITY = {"left": "Left", "right": "Right"}


class DicomSegError(VolfmError):
    pass


class SegmentCode(NamedTuple):
    """How a label name is coded in the SEG: category and type (pydicom ``Code``), an optional laterality
    modifier, and whether the whole name was found in the dictionary (False: the generic Tissue/Tissue, or the
    type of a numbered part, ``rib_left_3`` -> Rib, whose number is not coded)."""

    category: Code
    type: Code
    modifier: Code | None
    matched: bool

    def describe(self) -> str:
        side = f" ({self.modifier.meaning})" if self.modifier is not None else ""
        how = "" if self.matched else (", generic: name not in DICOM CID 7151" if self.type == codes.SCT.Tissue
                                       else ", partial: the number in the name is not coded")
        return (f"{self.category.meaning} / {self.type.meaning}{side} "
                f"[{self.type.scheme_designator} {self.type.value}{how}]")


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


@cache
def _type_index() -> dict[str, Code]:
    """CID 7151 (Segmentation Property Types) by normalised keyword and meaning."""
    index: dict[str, Code] = {}
    for keyword, code in codes.cid7151.concepts.items():
        index.setdefault(_norm(keyword), code)
        index.setdefault(_norm(code.meaning), code)
    return index


@cache
def _category_groups() -> tuple[tuple[frozenset, Code], ...]:
    """(code values of a CID 7151 sub-group, the CID 7150 category its types belong to), first match wins."""
    def values(cid):
        return frozenset((c.scheme_designator, c.value) for c in getattr(codes, f"cid{cid}").concepts.values())
    return ((values(7159), codes.SCT.MorphologicallyAbnormalStructure),  # lesion types
            (values(7192), codes.SCT.AnatomicalStructure),  # anatomical structure types
            (values(7166), codes.SCT.Tissue),  # common tissue types
            (values(7193) | values(7157) | values(7158), codes.SCT.PhysicalObject))  # objects, devices, artifacts


def segment_code(name: str) -> SegmentCode:
    """The DICOM category and type of a label name, looked up by name in pydicom's DICOM code dictionary.

    The name is matched to CID 7151 (Segmentation Property Types) by keyword or meaning, ignoring case, spaces and
    punctuation (``adrenal_gland``, ``Adrenal gland``, ``AdrenalGland``); a word ``left``/``right`` becomes a
    laterality modifier (``kidney_left``: Kidney, Left), and a few common spellings map to the dictionary's word
    (``tumor`` -> Neoplasm). The category is the CID 7150 category of the CID 7151 sub-group holding the type
    (lesion -> Morphologically Abnormal Structure, anatomy -> Anatomical Structure, tissue -> Tissue, object ->
    Physical Object). A name not found gets Tissue/Tissue (3D Slicer's default) and ``matched`` False, and so does
    ``background`` (a foreground class of that name is not CID 7151's lesion-group "Background"); a numbered part
    gets its part's type with ``matched`` False (the number is not coded; the segment label keeps the name).
    """
    if _norm(name) == "background":
        return SegmentCode(codes.SCT.Tissue, codes.SCT.Tissue, None, False)
    words = [w for w in re.split(r"[^0-9a-z]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()) if w]
    index, found, modifier, partial = _type_index(), None, None, False
    whole = "".join(words)
    if whole in index:  # a type with its side in its name (right_ventricle)
        found = index[whole]
    else:
        sides = [w for w in words if w in _LATERALITY]
        if len(set(sides)) == 1:
            modifier = getattr(codes.SCT, _LATERALITY[sides[0]])
        key = "".join(w for w in words if w not in _LATERALITY)
        key = _norm(_SYNONYMS.get(key, key))
        found = index.get(key) if key else None
        if found is None and key.rstrip("0123456789") != key:  # numbered parts (rib_left_3): the part's type
            found = index.get(key.rstrip("0123456789"))
            partial = found is not None
        if found is None:
            modifier = None
    if found is None:
        return SegmentCode(codes.SCT.Tissue, codes.SCT.Tissue, None, False)
    category = next((cat for group, cat in _category_groups() if (found.scheme_designator, found.value) in group),
                    codes.SCT.Tissue)
    return SegmentCode(category, found, modifier, not partial)


def segment_colour(index: int) -> tuple[int, int, int]:
    """A distinct RGB colour for the index-th segment (0-based): hues a golden angle apart, saturated, bright."""
    r, g, b = colorsys.hsv_to_rgb((0.02 + index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


_COUNTS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}


def _vector(item, tag: str, name) -> np.ndarray:
    """A geometry attribute as floats (:func:`~volfm.io.multiframe.floats`); a one-line error naming ``name`` when
    it does not hold the right count of numbers."""
    value = floats(item.get(tag), _COUNTS[tag])
    if value is None:
        raise DicomSegError(f"{name}: {tag} is not {_COUNTS[tag]} numbers ({item.get(tag)!r}); a SEG needs the "
                            "source images' geometry: re-export the series")
    return np.asarray(value, dtype=np.float64)


def _is_image(ds) -> bool:
    if "Rows" not in ds or "SeriesInstanceUID" not in ds:
        return False
    return "ImagePositionPatient" in ds or number_of_frames(ds) > 1


def _source_files(source) -> tuple[list[Path], str]:
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise DicomSegError(f"{folder}: not a folder; a DICOM SEG is written over a DICOM series folder "
                                "(or a list of its files)")
        return dicom_files(folder), str(folder)  # the files the folder dispatch of read_volume looks at
    files = [Path(p) for p in source]
    if not files:
        raise DicomSegError("no source files given for the DICOM SEG; pass the series folder or its files")
    return files, str(files[0].parent)


def read_series_headers(source, series_id: str | None = None) -> list[pydicom.Dataset]:
    """The headers (no pixel data) of one DICOM image series: its single-frame images ordered along the slice
    normal, or its one multi-frame image (enhanced or legacy-converted enhanced) as a one-item list.

    source: a series folder (its DICOM files whatever their names, :func:`~volfm.io.multiframe.dicom_files`;
    subfolders are not searched) or a list of files. series_id: the SeriesInstanceUID to take (or its
    ``volfm scan --hash-uids`` hash, which every message then shows instead of the UID); without it the series with
    the most files, with a ``GeometryWarning`` when there are several (:func:`~volfm.io.readers.resolve_series`, the
    series reader's rule). Files that are not DICOM, or DICOM objects without an image plane (SR, SEG, ...), are
    skipped.
    """
    return _series_headers(source, series_id)[0]


def _series_headers(source, series_id: str | None) -> tuple[list[pydicom.Dataset], str]:
    """:func:`read_series_headers` and the name its messages give the series (the hash when asked by hash)."""
    files, where = _source_files(source)
    series: dict[str, list[pydicom.Dataset]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, KeyError, AttributeError):
            continue
        if not _is_image(ds) or str(ds.get("Modality", "")).upper() in ("SEG", "RTSTRUCT", "SR"):
            continue
        ds.filename = str(f)
        series.setdefault(str(ds.SeriesInstanceUID).strip(), []).append(ds)
    if not series:
        raise DicomSegError(f"{where}: no DICOM image series found; a DICOM SEG needs the folder of the series the "
                            "labels were predicted from")
    uid, shown = resolve_series({k: len(v) for k, v in series.items()}, series_id, where, error=DicomSegError)
    slices = series[uid]
    if any(number_of_frames(ds) > 1 for ds in slices) and len(slices) > 1:
        raise DicomSegError(f"{where}: DICOM series {shown} mixes a multi-frame image with other files; a SEG is "
                            "written over one multi-frame image or over single-frame slices")
    required = _REQUIRED if number_of_frames(slices[0]) == 1 else _REQUIRED[:5] + ("Rows", "Columns")
    for ds in slices:
        missing = [t for t in required if t not in ds]
        if missing:
            raise DicomSegError(f"{ds.filename}: DICOM attribute(s) {', '.join(missing)} missing; a SEG needs them "
                                "in every source image")
    if len(slices) == 1:
        return slices, shown
    first = slices[0]
    iop, ps = _vector(first, "ImageOrientationPatient", first.filename), _vector(first, "PixelSpacing", first.filename)
    along = {}
    for ds in slices:
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns) \
                or np.abs(_vector(ds, "ImageOrientationPatient", ds.filename) - iop).max() > 1e-4 \
                or np.abs(_vector(ds, "PixelSpacing", ds.filename) - ps).max() > 1e-4 \
                or ds.FrameOfReferenceUID != first.FrameOfReferenceUID:
            raise DicomSegError(f"{ds.filename}: size, orientation, pixel spacing or frame of reference differs from "
                                f"{first.filename} in series {shown}; a SEG needs one image plane geometry")
        along[id(ds)] = float(_vector(ds, "ImagePositionPatient", ds.filename) @ np.cross(iop[:3], iop[3:]))
    return sorted(slices, key=lambda d: along[id(d)]), shown


class _Planes(NamedTuple):
    """The source image planes in the order of the SEG's source frames: positions (LPS), names for messages, and
    the shared orientation, pixel spacing and size."""

    positions: list[np.ndarray]
    names: list[str]
    iop: np.ndarray
    ps: np.ndarray
    rows: int
    cols: int


def _planes(slices: list[pydicom.Dataset]) -> _Planes:
    first = slices[0]
    rows, cols = int(first.Rows), int(first.Columns)
    if number_of_frames(first) == 1:
        return _Planes([_vector(ds, "ImagePositionPatient", ds.filename) for ds in slices],
                       [str(ds.filename) for ds in slices], _vector(first, "ImageOrientationPatient", first.filename),
                       _vector(first, "PixelSpacing", first.filename), rows, cols)
    positions, iops, pss = [], [], []
    for i in range(number_of_frames(first)):
        pos, ori, meas = (frame_group(first, k, i) for k in ("PlanePositionSequence", "PlaneOrientationSequence",
                                                         "PixelMeasuresSequence"))
        if pos is None or ori is None or meas is None or "ImagePositionPatient" not in pos \
                or "ImageOrientationPatient" not in ori or "PixelSpacing" not in meas:
            raise DicomSegError(f"{first.filename}: frame {i + 1} has no plane position, orientation or pixel "
                                "spacing; a SEG needs each frame's geometry")
        name = f"{first.filename} frame {i + 1}"
        positions.append(_vector(pos, "ImagePositionPatient", name))
        iops.append(_vector(ori, "ImageOrientationPatient", name))
        pss.append(_vector(meas, "PixelSpacing", name))
    if np.abs(np.asarray(iops) - iops[0]).max() > 1e-4 or np.abs(np.asarray(pss) - pss[0]).max() > 1e-4:
        raise DicomSegError(f"{first.filename}: frames differ in orientation or pixel spacing; a SEG needs one "
                            "image plane geometry")
    names = [f"{first.filename} frame {i + 1}" for i in range(len(positions))]
    return _Planes(positions, names, iops[0], pss[0], rows, cols)


def _signed_axis(vec: np.ndarray) -> tuple[int, int] | None:
    """(axis, sign) when ``vec`` is +-1 along one index axis (within GRID_TOL), else None."""
    r = np.rint(vec)
    if np.abs(r).sum() != 1 or np.abs(vec - r).max() > GRID_TOL:
        return None
    axis = int(np.flatnonzero(r)[0])
    return axis, int(r[axis])


def _section_frames(label: np.ndarray, affine: np.ndarray, planes: _Planes) -> tuple[np.ndarray | None, str]:
    """The label map's section through every source plane, (n_planes, Rows, Columns), or None and the reason."""
    inv = np.linalg.inv(affine)
    flip = LPS_RAS_FLIP[:3, :3]
    rows, cols, n = planes.rows, planes.cols, len(planes.positions)
    step_c = inv[:3, :3] @ flip @ (planes.iop[:3] * planes.ps[1])  # index step along a row (column index + 1)
    step_r = inv[:3, :3] @ flip @ (planes.iop[3:] * planes.ps[0])  # index step down a column (row index + 1)
    ax_c, ax_r = _signed_axis(step_c), _signed_axis(step_r)
    if ax_c is None or ax_r is None or ax_c[0] == ax_r[0]:
        return None, ("the image rows/columns do not run along the label grid's axes with its voxel size "
                      f"(index steps {np.round(step_c, 3).tolist()} per column, {np.round(step_r, 3).tolist()} per row)")
    (a, sa), (b, sb) = ax_c, ax_r
    w = 3 - a - b
    shape = label.shape
    if (shape[a], shape[b], shape[w]) != (cols, rows, n):
        return None, (f"the label grid {tuple(shape)} has {shape[a]} x {shape[b]} voxels in the image plane and "
                      f"{shape[w]} slices, the series {cols} x {rows} pixels and {n} slices")
    ks, worst = [], 0.0
    for pos, name in zip(planes.positions, planes.names):
        o = inv @ np.append(flip @ pos, 1.0)
        far = o[:3] + (cols - 1) * step_c + (rows - 1) * step_r  # the plane's last pixel
        want = np.rint(o[:3])
        worst = max(worst, float(np.abs(o[:3] - want).max()), float(np.abs(far - np.rint(far)).max()))
        if want[a] != (0 if sa > 0 else shape[a] - 1) or want[b] != (0 if sb > 0 else shape[b] - 1):
            return None, f"{name} starts at label voxel {want.astype(int).tolist()}, not at a corner of the grid"
        ks.append(int(want[w]))
    if worst > GRID_TOL:
        return None, f"source pixels lie up to {worst:.3g} voxels off the label grid's voxel centres"
    if sorted(ks) != list(range(shape[w])):
        return None, "the slice positions do not match the label grid's slices one to one"
    grid = np.transpose(label, (w, b, a))[:, :: sb, :: sa]
    return np.ascontiguousarray(grid[ks]), ""


def _label_names(labels, where, model: str) -> dict[int, str]:
    """Foreground names by label value; a one-line error naming the label map and the model otherwise."""
    try:
        if isinstance(labels, Mapping):
            out = {int(k): str(v) for k, v in labels.items()}
        elif isinstance(labels, Sequence) and not isinstance(labels, str):
            out = {i: str(n) for i, n in enumerate(labels)}
        else:
            raise TypeError(type(labels).__name__)
    except (TypeError, ValueError):
        raise DicomSegError(f"{where}: the label names of model {model} must be a list (index = label value) or a "
                            f"dict value -> name, got {type(labels).__name__} {str(labels)[:80]!r}") from None
    return {v: n for v, n in out.items() if v != 0}


def write_dicom_seg(label_image, source, labels, out_path, *, series_id: str | None = None,
                    algorithm_name: str = "volfm", algorithm_version: str = __version__,
                    series_description: str = "volfm segmentation", series_number: int = 300,
                    content_description: str | None = None) -> Path:
    """Write the DICOM SEG of a label map over its source DICOM series (see the module docstring).

    label_image: a :class:`Volume` (``(1, I, J, K)`` or ``(I, J, K)`` integer labels with its RAS affine) or a
        label image file (NIfTI, ...); it must lie on the series' grid (any axis order or flip).
    source: the series folder or its files. labels: names by label value (a list, index = value, or a dict
        value -> name); label 0 is background and gets no segment. series_id: the SeriesInstanceUID in a folder
        holding several series. algorithm_name/version: the model, recorded in every segment.
    Returns ``out_path``. Raises :class:`DicomSegError` (one line) when the label map does not lie on the series'
    grid, holds values without a name, names no foreground label, the source is not a usable DICOM series, or
    highdicom cannot build or save the SEG (whatever it raises). A series asked for by hash is named by its hash.
    """
    out_path = Path(out_path)
    if not isinstance(label_image, Volume):
        label_image = read_volume(label_image, dtype=None)
    where = label_image.meta.get("path") or "the label map"
    arr = np.asarray(label_image.array)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise DicomSegError(f"{where}: {arr.shape[0]} channels; a DICOM SEG is written from one label map")
        arr = arr[0]
    if arr.ndim != 3:
        raise DicomSegError(f"{where}: label array of shape {arr.shape}; expected (I, J, K) or (1, I, J, K)")
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.rint(arr)):
            raise DicomSegError(f"{where}: label map holds non-integer values; write labels, not probabilities")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    names = _label_names(labels, where, algorithm_name)
    if not names:
        raise DicomSegError(f"{where}: no foreground label names (only background); nothing to write as a SEG")
    present = {int(v) for v in np.unique(arr)} - {0}
    unnamed = sorted(present - set(names))
    if unnamed:
        raise DicomSegError(f"{where}: label value(s) {unnamed} have no name in labels {names}; name every value")
    if min(present | set(names)) < 0:
        raise DicomSegError(f"{where}: negative label values; labels are 0 (background) and positive integers")

    slices, shown = _series_headers(source, series_id)
    folder = Path(slices[0].filename).parent
    frames, why = _section_frames(arr, np.asarray(label_image.affine, dtype=np.float64), _planes(slices))
    if frames is None:
        raise DicomSegError(f"{where}: label grid does not match DICOM series {shown} in "
                            f"{folder}: {why}; pass labels on the series' own grid (volfm predict writes them so)")

    values = sorted(names)
    lut = np.zeros(max(values) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    lut[values] = np.arange(1, len(values) + 1)
    pixels = lut[frames]
    uid = str(slices[0].SeriesInstanceUID).strip()
    try:
        seg = _segmentation(slices, pixels, names, values, algorithm_name, algorithm_version, series_description,
                            series_number, content_description)
    except Exception as exc:  # noqa: BLE001 - highdicom/pydicom raise many types for a source header they cannot use
        raise DicomSegError(one_line(f"{folder}: highdicom could not build the SEG of DICOM series {shown} "
                                     f"({type(exc).__name__}: {str(exc).replace(uid, shown)}); its headers are incomplete "
                                     "or malformed: re-export the series, or use the NIfTI labels")) from exc
    try:
        with atomic_path(out_path) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - OSError (disk full, permissions) or a value pydicom cannot encode
        raise DicomSegError(one_line(f"{folder}: the SEG of DICOM series {shown} could not be written to {out_path} "
                                     f"({type(exc).__name__}: {str(exc).replace(uid, shown)}); check the output "
                                     "folder")) from exc
    return out_path


def _segmentation(slices, pixels, names, values, algorithm_name, algorithm_version, series_description,
                  series_number, content_description):
    """The highdicom Segmentation of the frames ``pixels`` (segment numbers 1.. for label ``values``)."""
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name[:64], version=str(algorithm_version)[:64],
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, value in enumerate(values, start=1):
        code = segment_code(names[value])
        d = hd.seg.SegmentDescription(
            segment_number=number, segment_label=names[value][:64], segmented_property_category=code.category,
            segmented_property_type=code.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=hd.color.CIELabColor.from_rgb(*segment_colour(number - 1)))
        if code.modifier is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(code.modifier)]
        d.SegmentDescription = f"volfm label {value}"
        descriptions.append(d)
    for ds in slices:
        for tag in _TYPE2:
            if tag not in ds:
                setattr(ds, tag, "")
    return hd.seg.Segmentation(
        source_images=slices, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="volfm",
        manufacturer_model_name=algorithm_name[:64], software_versions=__version__, device_serial_number="none",
        series_description=series_description[:64], content_label="VOLFM_SEG",
        content_description=(content_description or f"{algorithm_name} labels")[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        omit_empty_frames=bool(pixels.any()))
