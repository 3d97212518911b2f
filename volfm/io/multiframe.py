"""Enhanced and legacy-converted enhanced multi-frame DICOM images: one file, one volume.

Enhanced CT/MR/PET Image Storage and Legacy Converted Enhanced CT/MR/PET Image Storage put a whole series in one
file: NumberOfFrames frames of Rows x Columns pixels, each frame's geometry in functional groups. A group
(PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence, PixelValueTransformationSequence,
FrameContentSequence) sits in the SharedFunctionalGroupsSequence (one value for every frame) or in each frame's item
of the PerFrameFunctionalGroupsSequence; the per-frame item wins where both hold it (:func:`frame_group`).

:func:`read_multiframe` returns the Volume the series reader returns for the same images as single-frame slices:
array (1, I, J, K) with i along the columns (ImageOrientationPatient's row direction), j along the rows and k over
the frames sorted by their position along the slice normal (row x column direction), whatever order the file stores
them in; a RAS affine from the first sorted frame's position, the orientation and PixelSpacing, with the measured
frame step as its third column (:func:`slice_axis_from_positions`, shared with the series reader: gantry tilt gives a
sheared grid; uneven steps, i.e. missing frames, and duplicate positions are refused). Values are stored *
RescaleSlope + RescaleIntercept of each frame (PixelValueTransformationSequence, shared or per frame; the top-level
RescaleSlope/RescaleIntercept when no group holds them; 1 and 0 when neither does, as in most MR).

Refused with a one-line :class:`~volfm.io.errors.VolumeReadError` naming the file: a file holding more than one
volume (several StackIDs, several TemporalPositionIndex values, or frames repeating positions while another
dimension of the DimensionIndexSequence -- echo, b-value, ... -- varies), frames of different orientations or pixel
spacings, missing geometry (no per-frame PlanePositionSequence, no orientation, no PixelSpacing), colour images,
truncated pixel data and compressed transfer syntaxes no installed pydicom decoder handles (the message names what
to install). A single-frame image file is refused too: single-frame images are read as a series, from their folder.

Which files of a folder are DICOM (:func:`dicom_files`, for the folder dispatch of ``read_volume``, the DICOM SEG
writer and ``volfm predict``): every regular, non-hidden file directly in it, whatever its name (``*.dcm``, ``*.IMA``,
a SOPInstanceUID such as ``1.2.840.123``, a vendor number), that carries the DICOM preamble (``DICM`` after 128
bytes), DICOMDIR files excepted. A file without the preamble is not taken, as ``volfm scan``
(:mod:`volfm.io.dicomscan`: pydicom unforced) does not take it either.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from volfm.io import affine as geo
from volfm.io.errors import VolumeReadError, one_line
from volfm.io.volume import Volume

FORMAT = "dicom-multiframe"  # Volume.meta["format"] of a multi-frame file

ENHANCED_IMAGE_STORAGE = {  # the SOP classes this reader is written for (others with the same groups work too)
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
}

# dimension index pointers that place a frame within one stack (ImagePositionPatient, InStackPositionNumber) or are
# checked on their own by dimension_problem (StackID, TemporalPositionIndex)
_WITHIN_ONE_STACK = (0x00200032, 0x00209057, 0x00209056, 0x00209128)
_ORIENTATION_TOL = 1e-4  # largest difference between two frames' direction cosines
_SPACING_TOL = 1e-4  # mm
_DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle, or python-gdcm"


def is_dicom_file(path) -> bool:
    """Whether ``path`` is a file with the DICOM preamble (128 bytes, then ``DICM``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder) -> list[Path]:
    """The DICOM files directly in ``folder`` (not its subfolders), in name order: regular, non-hidden files of any
    name with the DICOM preamble (:func:`is_dicom_file`), DICOMDIR files excepted (see the module text)."""
    return [f for f in sorted(Path(folder).iterdir())
            if not f.name.startswith(".") and f.name.upper() != "DICOMDIR" and f.is_file() and is_dicom_file(f)]


def number_of_frames(ds) -> int:
    """NumberOfFrames (1 when absent or unreadable)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def is_image_sop_class(sop: str) -> bool:
    """Whether a SOP Class UID is an image storage class (CT, MR, PET, their enhanced forms, ...)."""
    return bool(sop) and "Image Storage" in UID(sop).name


def frame_group(ds, keyword: str, frame: int) -> Dataset | None:
    """The first item of functional group ``keyword`` (e.g. ``PlanePositionSequence``) for frame ``frame``
    (0-based): the frame's own item of the PerFrameFunctionalGroupsSequence, else the shared one, else None."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame < len(per):
        seq = per[frame].get(keyword)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            return seq[0]
    return None


def floats(value, n: int) -> list[float] | None:
    """``value`` (a DICOM multi-valued number, e.g. ImagePositionPatient) as ``n`` floats; None when it is missing,
    unreadable or holds another count."""
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _frame_value(ds, group: str, keyword: str, frame: int, n: int) -> list[float] | None:
    item = frame_group(ds, group, frame)
    return None if item is None else floats(item.get(keyword), n)


def frame_orientations(ds) -> list[list[float] | None]:
    """ImageOrientationPatient (6 floats, LPS) of every frame, from the PlaneOrientationSequence; None where
    missing."""
    return [_frame_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient", f, 6)
            for f in range(number_of_frames(ds))]


def frame_positions(ds) -> list[list[float] | None]:
    """ImagePositionPatient (3 floats, LPS) of every frame from its own PlanePositionSequence; None where a frame
    has none. A position in the shared groups only is no per-frame position (every frame would sit there)."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    out: list[list[float] | None] = []
    for f in range(number_of_frames(ds)):
        seq = per[f].get("PlanePositionSequence") if per is not None and f < len(per) else None
        out.append(floats(seq[0].get("ImagePositionPatient"), 3) if seq else None)
    return out


def _frame_content(ds, keyword: str) -> list:
    values = []
    for f in range(number_of_frames(ds)):
        item = frame_group(ds, "FrameContentSequence", f)
        value = None if item is None else item.get(keyword)
        values.append(None if value in (None, "") else str(value).strip())
    return values


def dimension_problem(ds) -> str | None:
    """Why a multi-frame object holds more than one volume (several StackIDs, several temporal positions), or
    None. Frames repeating positions along another dimension (echoes, b-values) are found by the reader."""
    stacks = sorted({v for v in _frame_content(ds, "StackID") if v is not None})
    if len(stacks) > 1:
        shown = ", ".join(stacks[:5]) + (", ..." if len(stacks) > 5 else "")
        return f"{len(stacks)} stacks (StackID {shown})"
    times = {v for v in _frame_content(ds, "TemporalPositionIndex") if v is not None}
    if len(times) > 1:
        return f"{len(times)} temporal positions (TemporalPositionIndex)"
    return None


def _varying_dimensions(ds) -> list[str]:
    """Names of the DimensionIndexSequence's dimensions, other than position in one stack, whose index values
    differ between frames (echo, b-value, ...)."""
    dims = ds.get("DimensionIndexSequence") or []
    values: list[set] = [set() for _ in dims]
    for f in range(number_of_frames(ds)):
        item = frame_group(ds, "FrameContentSequence", f)
        idx = None if item is None else item.get("DimensionIndexValues")
        if idx is None:
            continue
        idx = list(idx) if isinstance(idx, pydicom.multival.MultiValue | list | tuple) else [idx]
        for d, v in enumerate(idx[:len(dims)]):
            values[d].add(v)
    out = []
    for dim, seen in zip(dims, values):
        pointer = dim.get("DimensionIndexPointer")
        if pointer is None or int(pointer) in _WITHIN_ONE_STACK or len(seen) < 2:
            continue
        label = str(dim.get("DimensionDescriptionLabel", "") or "").strip()
        out.append(label or keyword_for_tag(int(pointer)) or f"{int(pointer):08X}")
    return out


def slice_axis_from_positions(affine: np.ndarray, positions: np.ndarray, what: str, meta: dict, *,
                              unit: str = "slices",
                              duplicate_fix: str = "remove duplicated files or split the series",
                              gap_fix: str = "re-export the complete series") -> np.ndarray:
    """Check slice (or frame) positions and make the slice axis of the affine follow them.

    ``positions``: (K, 3) LPS positions in array order (sorted along the slice normal); ``what`` starts the messages
    (e.g. ``"FOLDER: DICOM series UID"``); ``unit`` is ``slices`` or ``frames``. Readers build a DICOM grid from one
    orientation and assume slices stacked along its normal. With gantry tilt the slices are offset along the rows, so
    the true grid is sheared: the third column becomes the measured slice step (``meta["gantry_tilt_deg"]`` records
    the angle), and the spec's ``shear:`` policy then refuses or resamples it. Duplicate positions and uneven gaps
    (missing slices) raise a one-line VolumeReadError.
    """
    steps = np.diff(positions, axis=0)
    gaps = np.linalg.norm(steps, axis=1)
    if gaps.min() <= 1e-6:
        raise VolumeReadError(f"{what} has two {unit} at the same position; {duplicate_fix}")
    if gaps.max() - gaps.min() > max(0.01 * gaps.mean(), 1e-3):
        raise VolumeReadError(f"{what} has uneven {unit[:-1]} gaps ({gaps.min():.4g} to {gaps.max():.4g} mm): "
                              f"{unit} are missing; {gap_fix}")
    step_ras = geo.LPS_RAS_FLIP[:3, :3] @ ((positions[-1] - positions[0]) / (len(positions) - 1))
    if np.abs(step_ras - affine[:3, 2]).max() > 1e-3:
        affine = affine.copy()
        affine[:3, 2] = step_ras
        affine[:3, 3] = geo.LPS_RAS_FLIP[:3, :3] @ positions[0]
        normal = np.cross(affine[:3, 0], affine[:3, 1])
        cosang = abs(float(normal @ step_ras)) / (np.linalg.norm(normal) * np.linalg.norm(step_ras))
        meta["gantry_tilt_deg"] = float(np.degrees(np.arccos(min(1.0, cosang))))
    return affine


def with_converted_attributes(ds) -> Dataset:
    """The top-level attributes of ``ds`` (without pixel data and functional groups) plus those a legacy
    conversion moved into the shared UnassignedSharedConvertedAttributesSequence (e.g. PET dose tags and Units;
    top-level values win), as one flat Dataset for readers of series-level tags."""
    out = Dataset()
    for elem in ds:
        if elem.keyword not in ("PixelData", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            out.add(elem)
    shared = ds.get("SharedFunctionalGroupsSequence")
    unassigned = shared[0].get("UnassignedSharedConvertedAttributesSequence") if shared else None
    for elem in unassigned[0] if unassigned else ():
        if elem.tag not in out:
            out.add(elem)
    return out


def image_headers(folder) -> Iterator[tuple[Path, str, int]]:
    """(path, SeriesInstanceUID, NumberOfFrames) of each DICOM image file directly in ``folder`` (:func:`dicom_files`;
    non-image objects are skipped), in name order, reading three header tags of each file as it goes."""
    for f in dicom_files(folder):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SeriesInstanceUID", "NumberOfFrames"])
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        sop = str(ds.get("SOPClassUID", "") or "").strip()
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if uid and is_image_sop_class(sop):
            yield f, uid, number_of_frames(ds)


def _dcmread(path: Path, where: str):
    try:
        return pydicom.dcmread(str(path))
    except InvalidDicomError as exc:
        raise VolumeReadError(one_line(f"{where}: not a DICOM file ({exc}); point at an image file or a DICOM "
                                       "series folder")) from exc
    except (EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise VolumeReadError(one_line(f"{where}: truncated or corrupt DICOM file ({type(exc).__name__}: {exc}); "
                                       "re-export or re-copy the file")) from exc


def _require_decoder(where: str, ds) -> None:
    """A one-line error when the pixel data is compressed in a transfer syntax no installed decoder reads."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not UID(ts).is_compressed:
        return
    ts = UID(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise VolumeReadError(f"{where}: pixel data compressed as {ts.name} ({ts}), which pydicom cannot decode; "
                              "re-export the file uncompressed (Explicit VR Little Endian)") from None
    if not decoder.is_available:
        options = []
        for dep in decoder.missing_dependencies:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
            names = [re.split(r"[<>=!~ ]", req.strip())[0] for req in dep.split(" - requires ")[-1].split(" and ")]
            options.append("pip install " + " ".join("python-gdcm" if n == "gdcm" else n for n in names))
        raise VolumeReadError(one_line(
            f"{where}: pixel data compressed as {ts.name}, which no installed decoder reads; "
            f"{' or '.join(options) or _DECODER_HINT}, or re-export the file uncompressed"))


def _pixels(where: str, ds, frames: int) -> np.ndarray:
    """The stored pixel values, (frames, rows, columns)."""
    _require_decoder(where, ds)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for short or corrupt pixel data
        raise VolumeReadError(one_line(f"{where}: truncated or corrupt pixel data ({type(exc).__name__}: {exc}); "
                                       "re-export or re-copy the file")) from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    if pixels.size != frames * rows * cols:
        raise VolumeReadError(f"{where}: pixel data holds {pixels.size} values for {frames} frames of {rows}x{cols}; "
                              "re-export or re-copy the file")
    return pixels.reshape(frames, rows, cols)


def _rescale(ds, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (RescaleSlope, RescaleIntercept)."""
    top_slope, top_inter = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slopes, inters = np.ones(frames), np.zeros(frames)
    for f in range(frames):
        item = frame_group(ds, "PixelValueTransformationSequence", f)
        slope = item.get("RescaleSlope") if item is not None else None
        inter = item.get("RescaleIntercept") if item is not None else None
        slope, inter = (top_slope if slope is None else slope), (top_inter if inter is None else inter)
        slopes[f] = float(slope) if slope not in (None, "") else 1.0
        inters[f] = float(inter) if inter not in (None, "") else 0.0
    return slopes, inters


def _one_value(where: str, values: list, what: str, tol: float, fix: str) -> np.ndarray:
    """The value every frame shares (``values``: one list of floats or None per frame)."""
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise VolumeReadError(f"{where}: multi-frame DICOM has no {what} for frame {missing[0] + 1} "
                              f"({len(missing)} of {len(values)} frames lack it); {fix}")
    arr = np.asarray(values, dtype=np.float64)
    if np.abs(arr - arr[0]).max() > tol:
        raise VolumeReadError(f"{where}: multi-frame DICOM frames differ in {what} (more than one volume in one file); "
                              "export one volume per file")
    return arr[0]


def read_multiframe(path, *, dtype=np.float32, series_id: str | None = None, source=None) -> Volume:
    """Read one enhanced (or legacy-converted enhanced) multi-frame DICOM file into a Volume.

    dtype: array dtype (``None``: the stored integer type when no frame is rescaled, int32 for integer rescales,
        else float64). Rescaling is computed in float64 and cast once, as the series reader does.
    series_id: the name recorded in ``meta["series_id"]`` (default: the file's SeriesInstanceUID); a caller that
        was asked for a hashed id passes it so the raw UID stays out of manifests.
    source: what ``meta["path"]`` records and messages name (default: ``path``); ``read_volume`` passes the folder
        it found the file in, so a cohort cell (the folder) matches meta.json and a file named by its SOPInstanceUID
        stays out of it.
    """
    path = Path(path)
    where = str(path if source is None else source)
    ds = _dcmread(path, where)
    frames = number_of_frames(ds)
    sop = str(ds.get("SOPClassUID", "") or "")
    sop_name = UID(sop).name if sop else "no SOP class"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise VolumeReadError(f"{where}: no pixel data ({sop_name}): the file is truncated or holds no image; "
                              "re-export or re-copy it")
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None:
        if frames == 1:
            raise VolumeReadError(f"{where}: a single-frame DICOM image ({sop_name}); volfm reads single-frame images "
                                  "as a series: point at the folder that holds all slices of the series")
        raise VolumeReadError(f"{where}: multi-frame DICOM ({sop_name}) without a PerFrameFunctionalGroupsSequence, so "
                              "frame positions are unknown; volfm reads enhanced and legacy-converted enhanced CT/MR/PET "
                              "multi-frame images or single-frame series: re-export the images as one of those")
    if len(per) != frames:
        raise VolumeReadError(f"{where}: NumberOfFrames is {frames} but the PerFrameFunctionalGroupsSequence has "
                              f"{len(per)} items; re-export or re-copy the file")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeReadError(f"{where}: colour image ({ds.get('PhotometricInterpretation', '')}, "
                              f"{ds.SamplesPerPixel} samples per pixel); volfm reads greyscale CT/MR/PET images")
    problem = dimension_problem(ds)
    if problem:
        raise VolumeReadError(f"{where}: multi-frame DICOM holds more than one volume ({problem}); volfm reads one "
                              "volume per file: export each stack or time point as its own file or series")
    fix = "the file carries no usable patient geometry; re-export it with geometry (enhanced or single-frame images)"
    iop = _one_value(where, frame_orientations(ds), "ImageOrientationPatient (PlaneOrientationSequence)",
                     _ORIENTATION_TOL, fix)
    spacing = _one_value(where, [_frame_value(ds, "PixelMeasuresSequence", "PixelSpacing", f, 2)
                                for f in range(frames)], "PixelSpacing (PixelMeasuresSequence)", _SPACING_TOL, fix)
    raw_positions = frame_positions(ds)
    missing = [i for i, p in enumerate(raw_positions) if p is None]
    if missing:
        raise VolumeReadError(f"{where}: multi-frame DICOM has no per-frame ImagePositionPatient "
                              f"(PlanePositionSequence) for frame {missing[0] + 1} ({len(missing)} of {frames} frames "
                              f"lack it); {fix}")
    positions = np.asarray(raw_positions, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    if frames > 1 and np.linalg.norm(np.diff(positions, axis=0), axis=1).min() <= 1e-6:
        varying = _varying_dimensions(ds)
        if varying:
            raise VolumeReadError(f"{where}: multi-frame DICOM holds {frames} frames at "
                                  f"{len(np.unique(np.round(along, 4)))} positions, varying in {', '.join(varying)} "
                                  "(more than one volume in one file); export one volume per file")

    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    meta = {"path": where, "format": FORMAT, "series_id": series_id or series_uid, "num_frames": frames,
            "modality": str(ds.get("Modality", "") or ""), "sop_class": sop_name}
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]  # i runs along a row: the column spacing, PixelSpacing[1]
    lps[:3, 1] = col * spacing[0]
    if frames > 1:
        lps[:3, 2] = normal * (along[-1] - along[0]) / (frames - 1)
    else:
        item = frame_group(ds, "PixelMeasuresSequence", 0)
        thick = None if item is None else (item.get("SpacingBetweenSlices") or item.get("SliceThickness"))
        lps[:3, 2] = normal * (float(thick) if thick not in (None, "") else 1.0)
    lps[:3, 3] = positions[0]
    affine = geo.lps_to_ras(lps)
    if frames > 1:
        affine = slice_axis_from_positions(
            affine, positions, f"{where}: multi-frame DICOM", meta, unit="frames",
            duplicate_fix="the file holds more than one volume or repeats frames; export one volume per file",
            gap_fix="re-export the complete volume")

    pixels = _pixels(where, ds, frames)
    try:
        slopes, inters = _rescale(ds, frames)
    except (TypeError, ValueError) as exc:
        raise VolumeReadError(one_line(f"{where}: unreadable RescaleSlope/RescaleIntercept ({exc}); re-export the "
                                       "file")) from exc
    slopes, inters = slopes[order], inters[order]
    identity = bool(np.all(slopes == 1.0) and np.all(inters == 0.0))
    integral = bool(np.all(slopes == np.round(slopes)) and np.all(inters == np.round(inters)))
    if dtype is not None:
        out_dtype = np.dtype(dtype)
    elif identity:
        out_dtype = pixels.dtype.newbyteorder("=")
    else:
        out_dtype = np.dtype(np.int32 if integral and np.issubdtype(pixels.dtype, np.integer) else np.float64)
    kji = np.empty(pixels.shape, dtype=out_dtype)
    for k, f in enumerate(order):
        kji[k] = pixels[f] if identity else pixels[f].astype(np.float64) * slopes[k] + inters[k]
    del pixels
    return Volume(np.ascontiguousarray(kji.transpose(2, 1, 0))[None], affine, meta)
