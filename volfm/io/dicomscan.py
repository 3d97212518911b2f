"""Series discovery in a DICOM study tree (`volfm scan`): one summary row per series, headers only.

The tree is walked recursively, whatever its layout (patient/study/series folders, flat, vendor-numbered files
without a suffix). A DICOMDIR anywhere in the tree is read to list the files it references (those missing on disk
are counted in the scan's ``problems``); the walk finds every other file, so a tree without a DICOMDIR works the
same. Files that are not DICOM are skipped. Files are grouped by SeriesInstanceUID.

Only headers are read (``pydicom.dcmread(stop_before_pixels=True, specific_tags=HEADER_TAGS)``), and only these
tags, listed in :data:`HEADER_TAGS`:

- grouping and ids: PatientID, StudyInstanceUID, SeriesInstanceUID, SOPClassUID;
- what the series is: Modality, SeriesDescription, ImageType, ConvolutionKernel, ContrastBolusAgent,
  AcquisitionDate, SeriesDate, StudyDate;
- geometry: ImagePositionPatient, ImageOrientationPatient, SliceThickness, NumberOfFrames; for enhanced multi-frame
  images the SharedFunctionalGroupsSequence and PerFrameFunctionalGroupsSequence, of which only the plane position,
  plane orientation, pixel measures and frame content items are used (:mod:`volfm.io.multiframe`).

PatientName, PatientBirthDate, PatientSex, addresses, accession numbers, physicians, institution and every other
tag are never read, so they cannot reach the series table, the cohort table or anything built from them.
PatientID and the three UIDs are written as they are, or with ``hash_uids=True`` as the first 16 hex digits of
the SHA-256 of the value (:func:`hash_id`; a plain, unsalted digest: it hides the value from a casual reader and keeps
rows of one patient/study linkable, but anyone holding the original ids can recompute it; it is pseudonymisation,
not anonymisation). The DICOM reader (:func:`volfm.io.readers.read_volume` with ``series_id``) takes either form and
finds a hashed id by hashing the ids of the folder's series with the same :func:`hash_id`.

``acquisition_date`` (AcquisitionDate, else SeriesDate, else StudyDate) is written as ``dates="full"``
(``YYYYMMDD``, the default: inside the site the date orders a patient's studies and links them to clinical records),
``"year"`` (``YYYY``) or ``"none"`` (empty; the column stays so the table keeps its shape). Dates are identifying
under HIPAA; share ``year`` or ``none`` tables only. ``folder`` is the series folder relative to ``root`` (paths are
needed to read the files, so they are kept): a tree whose folder names hold patient names, ids or dates gives a table
that holds them too, whatever ``hash_uids`` and ``dates`` say.

``usable`` is False, with the reasons in ``reason`` (``; ``-joined), for: a non-image SOP class (SR, SEG, RT plan,
presentation state, ...), a multi-frame object that is not one volume with per-frame geometry (several files in
the series, no per-frame PlanePositionSequence, several stacks or temporal positions: an enhanced or
legacy-converted enhanced CT/MR/PET file holding one volume is usable, its frames counted as slices), a localizer
(ImageType holds LOCALIZER), a single slice, mixed orientations, missing slice positions or orientation, duplicated
or missing slices (a gap between neighbouring slice or frame positions larger than 1.5 times the median gap), and a
series whose files lie in several folders (the series reader reads one folder). ``folder_series`` counts the
series that share the series' folder, for information: a cohort row names its series (``<input>_series_uid``, see
:mod:`volfm.store.selection`), so a series that shares its folder with others is still usable.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from volfm import VolfmError
from volfm.io.multiframe import dimension_problem, floats, frame_group, frame_orientations, frame_positions
from volfm.utils import progress_bar

HEADER_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality", "SeriesDescription",
               "ImageType", "ConvolutionKernel", "ContrastBolusAgent", "AcquisitionDate", "SeriesDate", "StudyDate",
               "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "NumberOfFrames",
               "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")

SERIES_COLUMNS = ("patient_id", "study_uid", "series_uid", "modality", "series_description", "image_type",
                  "original", "localizer", "slice_count", "slice_thickness", "spacing_between_slices", "orientation",
                  "kernel", "contrast", "acquisition_date", "folder", "folder_series", "usable", "reason")

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
OBLIQUE_COS = float(np.cos(np.deg2rad(10.0)))  # slice normal within 10 degrees of a patient axis: not oblique
DATES = ("full", "year", "none")  # how acquisition_date is written (scan_tree's dates=)


class ScanError(VolfmError):
    pass


def hash_id(value: str) -> str:
    """First 16 hex digits of the SHA-256 of ``value`` (plain, unsalted); '' stays ''. The one id hash of volfm:
    ``volfm scan --hash-uids`` writes it and the DICOM reader matches a hashed series id with it."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:16] if value else ""


def is_hashed_id(value: str) -> bool:
    """Whether ``value`` has the form :func:`hash_id` returns (16 lower-case hex digits). A DICOM UID is digits
    and dots with at least one dot, so the two forms do not overlap (the reader still tries a raw match first)."""
    return len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def _date(value: str, dates: str) -> str:
    return value if dates == "full" else value[:4] if dates == "year" else ""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _dicomdir_files(path: Path, problems: list[str]) -> set[Path]:
    """Files a DICOMDIR's records reference (ReferencedFileID, relative to its folder; resolved); those missing on
    disk are reported in ``problems``."""
    try:
        ds = pydicom.dcmread(str(path), specific_tags=["DirectoryRecordSequence"])
        ids = [rec.ReferencedFileID for rec in ds.DirectoryRecordSequence if "ReferencedFileID" in rec]
    except Exception as exc:  # noqa: BLE001 - a broken DICOMDIR: the walk still finds the files
        problems.append(f"{path}: DICOMDIR unreadable ({' '.join(str(exc).split())}); walked the tree instead")
        return set()
    out, missing = set(), 0
    for fid in ids:
        parts = [fid] if isinstance(fid, str) else list(fid)
        p = path.parent.joinpath(*(str(x).strip() for x in parts))
        if p.is_file():
            out.add(p.resolve())
        else:
            missing += 1
    if missing:
        problems.append(f"{path}: {missing} file(s) listed in the DICOMDIR are missing on disk")
    return out


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def find_dicom_files(root, problems: list[str] | None = None) -> list[Path]:
    """Every file under ``root`` to try as DICOM: those DICOMDIRs reference plus every file the walk finds."""
    root = Path(root)
    problems = problems if problems is not None else []
    walked = _walk(root)
    listed: set[Path] = set()
    for f in walked:
        if f.name.upper() == "DICOMDIR":
            listed |= _dicomdir_files(f, problems)
    seen = {f.resolve() for f in walked}
    return walked + sorted(p for p in listed if p not in seen)


def _read_header(path: Path):
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    sop = _text(getattr(ds, "SOPClassUID", None)) or _text(getattr(getattr(ds, "file_meta", None),
                                                                  "MediaStorageSOPClassUID", None))
    if sop == DICOMDIR_SOP_CLASS or not _text(getattr(ds, "SeriesInstanceUID", None)):
        return None
    return ds, sop


def orientation_name(iop) -> str:
    """axial / coronal / sagittal from the slice normal of ImageOrientationPatient, oblique beyond 10 degrees."""
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    norm = np.linalg.norm(normal)
    if norm == 0:
        return ""
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if normal[axis] < OBLIQUE_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _multiframe_reasons(files) -> list[str]:
    """Why a series holding multi-frame image objects is not one volume the reader takes (empty: it is)."""
    if len(files) > 1:
        return [f"multi-frame object among {len(files)} files (volfm reads one multi-frame file per series)"]
    ds = files[0][1]
    if "PerFrameFunctionalGroupsSequence" not in ds:
        out = ["multi-frame object without per-frame functional groups (no frame positions)"]
    elif any(p is None for p in frame_positions(ds)):
        out = ["multi-frame object without per-frame positions (PlanePositionSequence)"]
    else:
        out = []
    problem = dimension_problem(ds)
    if problem:
        out.append(f"multi-frame object with {problem}")
    return out


def _summarise(files: list[tuple[Path, object, str]], root: Path, hash_uids: bool, dates: str = "full") -> dict:
    ds0 = files[0][1]
    sop = files[0][2]
    reasons = []
    ident = hash_id if hash_uids else (lambda v: v)
    image_type = _text(getattr(ds0, "ImageType", None)).upper()
    image_type_parts = [p.strip() for p in image_type.split("\\")]
    frames = [int(getattr(ds, "NumberOfFrames", 1) or 1) for _, ds, _ in files]
    sop_name = UID(sop).name if sop else "no SOP class"
    is_image = "Image Storage" in sop_name
    n = sum(frames)
    if not is_image:
        reasons.append(f"non-image SOP class ({sop_name})")
    elif max(frames) > 1:
        reasons.extend(_multiframe_reasons(files))
    if "LOCALIZER" in image_type_parts:
        reasons.append("localizer")
    if is_image and n == 1:
        reasons.append("single slice")
    folders = sorted({str(f.parent) for f, _, _ in files})
    if len(folders) > 1:
        reasons.append(f"files in {len(folders)} folders")
    iops, ipps = [], []  # one per slice: a single-frame file's, or each frame's of a multi-frame file
    for (_, ds, _), nf in zip(files, frames):
        if nf > 1:
            iops += frame_orientations(ds)
            ipps += frame_positions(ds)
        else:
            iops.append(floats(getattr(ds, "ImageOrientationPatient", None), 6))
            ipps.append(floats(getattr(ds, "ImagePositionPatient", None), 3))
    orientation, spacing = "", None
    if is_image and any(v is None for v in iops):
        reasons.append("no ImageOrientationPatient")
    elif is_image:
        arr = np.asarray(iops)
        if np.abs(arr - arr[0]).max() > 1e-3:
            reasons.append("mixed orientations")
            orientation = "mixed"
        else:
            orientation = orientation_name(arr[0])
            if len(ipps) > 1:
                if any(p is None for p in ipps):
                    if max(frames) == 1:  # a multi-frame object's missing positions are in its reason already
                        reasons.append("no ImagePositionPatient")
                else:
                    normal = np.cross(arr[0, :3], arr[0, 3:])
                    along = np.sort(np.asarray(ipps) @ normal)
                    gaps = np.diff(along)
                    med = float(np.median(gaps))
                    spacing = med
                    if gaps.min() <= 1e-3:
                        reasons.append("duplicate slice positions")
                    elif gaps.max() > 1.5 * med:
                        reasons.append(f"missing slices ({int(np.sum(gaps > 1.5 * med))} gap(s) of up to "
                                       f"{gaps.max():.4g} mm, spacing {med:.4g} mm)")
    thick = _text(getattr(ds0, "SliceThickness", None))
    if not thick and frames[0] > 1:
        thick = _text(getattr(frame_group(ds0, "PixelMeasuresSequence", 0), "SliceThickness", None))
    try:
        thickness = float(thick) if thick else None
    except ValueError:
        thickness = None
    date = next((_text(getattr(ds0, k, None)) for k in ("AcquisitionDate", "SeriesDate", "StudyDate")
                 if _text(getattr(ds0, k, None))), "")
    folder = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    rel = os.path.relpath(folder, root)
    return {"patient_id": ident(_text(getattr(ds0, "PatientID", None))),
            "study_uid": ident(_text(getattr(ds0, "StudyInstanceUID", None))),
            "series_uid": ident(_text(ds0.SeriesInstanceUID)),
            "modality": _text(getattr(ds0, "Modality", None)).upper(),
            "series_description": _text(getattr(ds0, "SeriesDescription", None)),
            "image_type": image_type, "original": image_type_parts[0] == "ORIGINAL",
            "localizer": "LOCALIZER" in image_type_parts, "slice_count": n,
            "slice_thickness": thickness, "spacing_between_slices": None if spacing is None else round(spacing, 4),
            "orientation": orientation, "kernel": _text(getattr(ds0, "ConvolutionKernel", None)),
            "contrast": bool(_text(getattr(ds0, "ContrastBolusAgent", None))), "acquisition_date": _date(date, dates),
            "folder": rel, "folder_series": 0, "usable": not reasons, "reason": "; ".join(reasons)}


def scan_tree(root, *, hash_uids: bool = False, dates: str = "full",
              progress: bool = False) -> tuple[list[dict], list[str]]:
    """Series rows (columns :data:`SERIES_COLUMNS`, ``folder`` relative to ``root``) and a list of problems.

    Rows are sorted by patient, study, folder. ``dates``: ``full``, ``year`` or ``none`` (see the module text).
    ``progress`` shows a bar (callers pass it only on a terminal).
    """
    root = Path(root)
    if dates not in DATES:
        raise ScanError(f"dates={dates!r}: expected one of {', '.join(DATES)}")
    if not root.is_dir():
        raise ScanError(f"{root}: not a folder; volfm scan needs the root of a DICOM tree")
    problems: list[str] = []
    files = find_dicom_files(root, problems)
    groups: dict[str, list] = defaultdict(list)
    for f in progress_bar(files, desc="scan", unit="file", disable=not progress):
        got = _read_header(f)
        if got is not None:
            groups[_text(got[0].SeriesInstanceUID)].append((f, got[0], got[1]))
    if not groups:
        raise ScanError(f"{root}: no DICOM files with a SeriesInstanceUID found under this folder")
    rows = [_summarise(members, root, hash_uids, dates) for members in groups.values()]
    per_folder: dict[str, int] = defaultdict(int)
    for r in rows:
        per_folder[r["folder"]] += 1
    for r in rows:
        r["folder_series"] = per_folder[r["folder"]]
    rows.sort(key=lambda r: (r["patient_id"], r["study_uid"], r["folder"], r["series_uid"]))
    return rows, problems
