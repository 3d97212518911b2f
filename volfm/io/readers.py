"""Read images into :class:`Volume` and write them back as NIfTI.

NIfTI (.nii, .nii.gz; NIfTI-1 and -2) is read with nibabel, DICOM series folders and NRRD/MHA/MHD
with SimpleITK. Every reader returns array (C, I, J, K) in native byte order plus a RAS affine.

sform/qform rule (NIfTI): the sform is used when its code is > 0, else the qform when its code
is > 0, else the pixdim-only fallback (with a warning). This is nibabel's and FSL's rule. When
both are set and disagree by more than 1e-3 mm anywhere in the unit cube, a warning names the file
and the difference; ``prefer="qform"`` makes the qform win instead (ITK's choice for some files).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import threading
import warnings
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from isal import igzip
from pydicom.dataset import Dataset

from volfm.io import affine as geo
from volfm.io.atomic import atomic_path
from volfm.io.dicomscan import hash_id, is_hashed_id
from volfm.io.errors import GeometryWarning, VolumeReadError
from volfm.io.multiframe import (
    dicom_files,
    image_headers,
    is_dicom_file,
    read_multiframe,
    slice_axis_from_positions,
    with_converted_attributes,
)
from volfm.io.volume import Volume

try:  # a volfm dependency, but kept optional at import (as MONAI does): a bare GPU node without it reads NIfTI
    import SimpleITK as sitk
except ImportError:  # pragma: no cover - depends on the environment
    sitk = None

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def is_image_path(path) -> bool:
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return bool(dicom_files(p))  # any DICOM file, whatever its name (multiframe.dicom_files)
    return name.endswith(IMAGE_SUFFIXES)


def read_volume(path, *, dtype=np.float32, prefer: str = "sform", series_id: str | None = None,
                writable: bool = True) -> Volume:
    """Read a NIfTI file, NRRD/MHA/MHD file, DICOM series folder or multi-frame DICOM file.

    A folder is read as a series of single-frame slices (SimpleITK/GDCM), or, when its image series is one
    enhanced or legacy-converted enhanced multi-frame file (or ``series_id`` names such a file's series), as that
    file (:mod:`volfm.io.multiframe`; its DICOM files are :func:`~volfm.io.multiframe.dicom_files`, whatever their
    names); ``meta["path"]`` is then the folder, as for a series. A file named ``*.dcm`` (or any DICOM file) is
    read as a multi-frame image.
    dtype: array dtype (float32 by default; ``None`` keeps the stored integer type, for label maps).
    writable: False allows a read-only array (a zero-copy view of an inflated .nii.gz) for callers
        that only read it, as the preprocessing pipeline does; the default returns an array you may
        edit in place. Either way the array keeps the file's memory order (NIfTI: i fastest).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: file not found; check the path in the cohort table")
    if path.is_dir():
        single = _multiframe_in_folder(path, series_id)
        if single is not None:
            vol = _read_multiframe(single[0], dtype, single[1], source=path)
        else:
            vol = _read_dicom_series(path, series_id=series_id)
    else:
        if path.stat().st_size == 0:
            raise VolumeReadError(f"{path}: empty file (0 bytes); re-export or re-copy it")
        name = path.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            vol = _read_nifti(path, prefer=prefer)
        elif name.endswith(ITK_SUFFIXES):
            vol = _read_sitk_file(path)
        elif name.endswith(".dcm") or is_dicom_file(path):
            vol = _read_multiframe(path, dtype, None)
        else:
            raise VolumeReadError(
                f"{path}: not a recognised image; expected one of {', '.join(IMAGE_SUFFIXES)}, a multi-frame "
                "DICOM file or a folder holding one DICOM series")
    arr = vol.array
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if writable and not arr.flags.writeable:
        arr = arr.copy(order="K")
    vol.array = arr  # the file's own memory order (NIfTI: i fastest); consumers must not assume C order
    return vol


def _one_line(text) -> str:
    """Collapse a (library) message onto one line: VolumeReadError messages are single-line."""
    return " ".join(str(text).split())


def _last_line(exc, default: str = "unreadable") -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else default


def _corrupt(path, exc) -> VolumeReadError:
    return VolumeReadError(_one_line(
        f"{path}: truncated or corrupt image data ({type(exc).__name__}: {exc}); re-export or re-copy the file"))


def _gzip_truncation(path: Path) -> Exception | None:
    """The error a .gz file raises when decompressed to the end, or None when it decompresses cleanly."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (EOFError, zlib.error, OSError) as exc:
        return exc
    return None


def _to_channels_first(data: np.ndarray, path) -> np.ndarray:
    """(I, J, K[, T or 1, C]) -> (C, I, J, K)."""
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return np.moveaxis(data, 3, 0)
    if data.ndim == 5 and data.shape[3] == 1:
        return np.moveaxis(data[:, :, :, 0, :], 3, 0)
    raise VolumeReadError(f"{path}: image has shape {data.shape}; volfm reads 3D images or 4D with channels last")


def choose_nifti_affine(header, path, prefer: str = "sform") -> tuple[np.ndarray, str]:
    """Pick the voxel-to-world affine of a NIfTI header by the module's documented rule."""
    if prefer not in ("sform", "qform"):
        raise ValueError(f"prefer must be 'sform' or 'qform', got {prefer!r}")
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    scode, qcode = int(scode or 0), int(qcode or 0)
    if scode > 0 and qcode > 0:
        corners = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float).T
        diff = float(np.abs((sform - qform) @ corners).max())
        if diff > 1e-3:
            warnings.warn(f"{path}: sform and qform disagree by up to {diff:.3g} mm; using the {prefer} "
                          "(pass prefer='qform'/'sform' to choose)", GeometryWarning, stacklevel=3)
        return (np.asarray(sform if prefer == "sform" else qform, float), prefer)
    if scode > 0:
        return np.asarray(sform, float), "sform"
    if qcode > 0:
        return np.asarray(qform, float), "qform"
    warnings.warn(f"{path}: neither sform nor qform is set; using voxel sizes only (orientation unknown, "
                  "assumed LAS as in the NIfTI standard's fallback)", GeometryWarning, stacklevel=3)
    return np.asarray(header.get_base_affine(), float), "pixdim"


def _read_gz_in_memory(path: Path):
    """Fast path for .nii.gz: (image, data or None, sha256 of the file), or None to use nibabel's reader.

    The file is inflated with ISA-L (python-isal, ~2.5x Python's zlib) while a thread hashes the
    compressed bytes; nibabel parses the header from memory, and unscaled data is a zero-copy
    (read-only) view of the inflated bytes in the file's own (Fortran) order. Any problem (isal
    missing, truncated or unusual file) returns None, and nibabel's reader and its errors take over.
    """
    if not path.name.lower().endswith(".gz"):
        return None
    try:
        comp = path.read_bytes()
        digest: dict = {}
        hasher = threading.Thread(target=lambda: digest.setdefault("sha256", hashlib.sha256(comp).hexdigest()))
        hasher.start()
        try:
            raw = igzip.decompress(comp)
        finally:
            hasher.join()
        img = None
        for cls in (nib.Nifti1Image, nib.Nifti2Image):
            try:
                img = cls.from_bytes(raw)
                break
            except Exception:  # noqa: BLE001 - not this NIfTI flavour
                continue
        if img is None:
            return None
        # from_bytes resets vox_offset and scl_* in the image's copy of the header: use the file's own
        hdr = img.header_class.from_fileobj(io.BytesIO(raw))
        slope, inter = hdr.get_slope_inter()
        data = None
        if slope in (None, 1.0) and inter in (None, 0.0):
            shape = hdr.get_data_shape()
            data = np.frombuffer(raw, dtype=hdr.get_data_dtype(), count=int(np.prod(shape)),
                                 offset=int(hdr.get_data_offset())).reshape(shape, order="F")
        return img, data, digest.get("sha256")
    except Exception:  # noqa: BLE001 - fall back to nibabel's reader
        return None


def _read_nifti(path: Path, prefer: str) -> Volume:
    fast = _read_gz_in_memory(path)
    try:
        img = fast[0] if fast else nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:
        # a .nii.gz cut inside its first 348 header bytes fails nibabel's sniffing; say it is truncated
        gz_exc = _gzip_truncation(path) if path.name.lower().endswith(".gz") else None
        if isinstance(gz_exc, EOFError):
            raise _corrupt(path, gz_exc) from exc
        raise VolumeReadError(_one_line(f"{path}: not a readable NIfTI file ({exc}); check that it is an image "
                                        "and not e.g. an HTML error page or a DICOM")) from exc
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    try:
        proxy = img.dataobj
        slope, inter = proxy.slope, proxy.inter
        scaled = not (slope in (1, None) or (isinstance(slope, float) and math.isnan(slope))) or \
            not (inter in (0, None) or (isinstance(inter, float) and math.isnan(inter)))
        # applies scl_slope/scl_inter, handles big-endian
        data = fast[1] if fast and fast[1] is not None else np.asanyarray(proxy)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    if isinstance(data, np.memmap):
        data = np.array(data)
    affine, which = choose_nifti_affine(img.header, path, prefer=prefer)
    array = _to_channels_first(data, path)
    meta = {"path": str(path), "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
            "affine_source": which, "scaled": bool(scaled), "on_disk_dtype": str(img.get_data_dtype())}
    if fast and fast[2]:
        meta["sha256"] = fast[2]
    return Volume(array, affine, meta)


def _sitk_to_volume(image, path, meta) -> Volume:
    arr = sitk.GetArrayFromImage(image)  # (K, J, I[, C]) for 3D, (T, K, J, I) for 4D
    dim = image.GetDimension()
    if dim == 3:
        if image.GetNumberOfComponentsPerPixel() > 1:
            arr = np.moveaxis(arr, 3, 0).transpose(0, 3, 2, 1)
        else:
            arr = arr.transpose(2, 1, 0)[None]
        affine = geo.affine_from_sitk(image)
    elif dim == 4:
        arr = arr.transpose(0, 3, 2, 1)
        d = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3]
        sp = np.asarray(image.GetSpacing())[:3]
        lps = np.eye(4)
        lps[:3, :3] = d * sp[None, :]
        lps[:3, 3] = image.GetOrigin()[:3]
        affine = geo.lps_to_ras(lps)
    else:
        raise VolumeReadError(f"{path}: {dim}D image; volfm reads 3D images (optionally with channels)")
    return Volume(np.ascontiguousarray(arr), affine, meta)


def require_simpleitk(path, what: str) -> None:
    """A one-line error when ``what`` (DICOM, NRRD/MHA) is read on a host without SimpleITK."""
    if sitk is None:
        raise VolumeReadError(f"{path}: reading {what} needs SimpleITK, which is not installed here; "
                              "pip install SimpleITK (a volfm dependency), or convert the images to NIfTI")


def _read_sitk_file(path: Path) -> Volume:
    require_simpleitk(path, f"{path.suffix.lstrip('.').upper()} files")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = _last_line(exc)
        raise VolumeReadError(f"{path}: SimpleITK could not read it ({first}); the file is corrupt, truncated or "
                              "not an image") from exc
    return _sitk_to_volume(image, path, {"path": str(path), "format": path.suffix.lstrip(".").lower()})


def resolve_series(series: Mapping[str, int] | Iterable[str], series_id: str | None, where,
                   *, error: type[Exception] = VolumeReadError) -> tuple[str, str]:
    """The SeriesInstanceUID to take among a folder's DICOM series and the name to show for it (in messages and
    ``meta["series_id"]``): the one rule of the series reader and the DICOM SEG writer
    (:func:`volfm.io.dicomseg.read_series_headers`).

    series: the folder's SeriesInstanceUIDs with their number of files (a mapping), or just the ids when
    ``series_id`` is given or there is one series. series_id: a SeriesInstanceUID or its
    :func:`~volfm.io.dicomscan.hash_id` (what ``volfm scan --hash-uids`` writes), found by hashing each id; a hashed
    request is shown, and its misses listed, hashed, so the raw UIDs stay out of manifests, meta.json and messages.
    None: the series with the most files (ties: the first by UID), with a :class:`GeometryWarning` when there are
    several. A miss raises ``error`` (one line naming ``where``).
    """
    ids = list(series)
    if series_id is None:
        if len(ids) == 1:
            return ids[0], ids[0]
        sizes = dict(series) if isinstance(series, Mapping) else None
        if sizes is None:
            raise TypeError("resolve_series needs the number of files of each series to choose among several")
        uid = max(sorted(sizes), key=sizes.get)  # the first of the largest, in UID order
        # stacklevel: the caller of read_volume, read_series_headers or write_dicom_seg (two calls below them)
        warnings.warn(f"{where}: {len(ids)} DICOM series found; reading the largest ({uid}, {sizes[uid]} files); "
                      "give series_id to choose", GeometryWarning, stacklevel=4)
        return uid, uid
    wanted = str(series_id).strip()
    if wanted in ids:
        return wanted, wanted
    if is_hashed_id(wanted.lower()):
        hashed = {hash_id(sid): sid for sid in ids}
        if wanted.lower() in hashed:
            return hashed[wanted.lower()], wanted.lower()
        raise error(f"{where}: no DICOM series here hashes to {wanted}; hashed ids of the series present: "
                    f"{', '.join(sorted(hashed))}; rescan the tree or fix the series column")
    raise error(f"{where}: DICOM series {wanted} not found; series present: {', '.join(ids)}")


def _read_dicom_series(folder: Path, series_id: str | None) -> Volume:
    require_simpleitk(folder, "a DICOM series")
    reader = sitk.ImageSeriesReader()
    shown = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # GDCM's multi-line warnings; we raise one-line errors
    try:
        ids = list(reader.GetGDCMSeriesIDs(str(folder)) or [])
    finally:
        sitk.ProcessObject_SetGlobalWarningDisplay(shown)
    if not ids:
        raise VolumeReadError(f"{folder}: no DICOM series found in this folder; point the table at the folder "
                              "that holds the .dcm files of one series")
    # from here on series_id is the name shown; files are counted only to choose among several series
    sizes = ids if series_id is not None or len(ids) == 1 else \
        {sid: len(reader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in ids}
    uid, series_id = resolve_series(sizes, series_id, folder)
    files = reader.GetGDCMSeriesFileNames(str(folder), uid)
    reader.SetFileNames(files)
    positions, rescale_varies = _slice_headers(files)
    if rescale_varies:
        # ITK takes the pixel type from the first slice: with per-slice RescaleSlope/Intercept (usual in
        # PET) an integer first slice would truncate/wrap the others, so read into float64 instead
        reader.SetOutputPixelType(sitk.sitkFloat64)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(f"{folder}: DICOM series {series_id} could not be read "
                              f"({_last_line(exc)}); check for missing or corrupt slices") from exc
    meta = {"path": str(folder), "format": "dicom", "series_id": series_id, "num_files": len(files)}
    meta.update(dicom_pet_meta(files[0]))
    vol = _sitk_to_volume(image, folder, meta)
    if positions is not None and len(files) > 1:
        vol.affine = slice_axis_from_positions(vol.affine, positions, f"{folder}: DICOM series {series_id}", meta)
    return vol


def _multiframe_in_folder(folder: Path, series_id: str | None) -> tuple[Path, str | None] | None:
    """The multi-frame file to read for a DICOM folder and the series name to show for it, or None to read the
    folder as a series of single-frame slices.

    Without ``series_id`` the folder's only image series must be one multi-frame file; headers are read until a
    series with two single-frame files shows that the folder holds slices. With ``series_id`` (a
    SeriesInstanceUID or its :func:`~volfm.io.dicomscan.hash_id`, shown hashed as the series reader does) the
    series' file is read when it is one multi-frame file.
    """
    wanted = None if series_id is None else str(series_id).strip()
    hashed = wanted is not None and is_hashed_id(wanted.lower())
    series: dict[str, list[tuple[Path, int]]] = {}
    for f, uid, frames in image_headers(folder):
        if wanted is not None and wanted != uid and not (hashed and hash_id(uid) == wanted.lower()):
            continue
        members = series.setdefault(uid, [])
        members.append((f, frames))
        if frames == 1 and (wanted is not None or sum(n == 1 for _, n in members) >= 2):
            return None  # single-frame slices: the series reader's
    multi = [(uid, f) for uid, members in series.items() for f, n in members if n > 1]
    if not multi:
        return None
    if len(series) == 1 and len(multi) == 1 and len(series[multi[0][0]]) == 1:
        shown = None if wanted is None else (wanted.lower() if wanted != multi[0][0] else wanted)
        return multi[0][1], shown
    if wanted is not None:
        raise VolumeReadError(f"{folder}: DICOM series {wanted} is {sum(map(len, series.values()))} files, "
                              "multi-frame among them; volfm reads one multi-frame file: point the table at the file")
    raise VolumeReadError(f"{folder}: {len(series)} image series here, with {len(multi)} multi-frame file(s) among "
                          "them; give series_id (the table's <input>_series_uid column) or point at the multi-frame "
                          "file")


def _read_multiframe(path: Path, dtype, series_id: str | None, source=None) -> Volume:
    vol = read_multiframe(path, dtype=dtype, series_id=series_id, source=source)
    if vol.meta.get("modality") == "PT":  # dose tags: top level, or where a legacy conversion put them
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - tags are optional extras; the pixels were read already
            return vol
        vol.meta.update(dicom_pet_meta(with_converted_attributes(header)))
    return vol


def _slice_headers(files) -> tuple[np.ndarray | None, bool]:
    """Per-slice ImagePositionPatient (LPS, in file order; None if any is missing) and whether the
    slices differ in (RescaleSlope, RescaleIntercept)."""
    pairs, positions = set(), []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True,
                                 specific_tags=["RescaleSlope", "RescaleIntercept", "ImagePositionPatient"])
            pairs.add((float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)))
            ipp = getattr(ds, "ImagePositionPatient", None)
            positions.append([float(v) for v in ipp] if ipp is not None and len(ipp) == 3 else None)
        except Exception:  # noqa: BLE001 - unreadable headers: let SimpleITK report it
            return None, False
    pos = None if any(p is None for p in positions) else np.asarray(positions, dtype=np.float64)
    return pos, len(pairs) > 1


def _dicom_time(value) -> float | None:
    """Seconds since midnight of a DICOM TM string (HHMMSS.ffffff)."""
    if not value:
        return None
    s = str(value).strip()
    try:
        hh, mm, ss = int(s[0:2]), int(s[2:4] or 0), float(s[4:] or 0)
    except ValueError:
        return None
    return hh * 3600 + mm * 60 + ss


def dicom_pet_meta(first_file) -> dict:
    """Modality and, for PET in Bq/ml, the body-weight SUV factor (SUV = value * suv_factor).

    SUVbw = activity * weight[g] / (injected dose [Bq] decayed to the series start). Missing tags
    leave ``suv_factor`` out, with the reason in ``suv_missing``. ``first_file``: a DICOM file (its header
    is read) or a pydicom Dataset.
    """
    if isinstance(first_file, Dataset):
        ds = first_file
    else:
        try:
            ds = pydicom.dcmread(str(first_file), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - tags are optional extras; the pixels were read by SimpleITK
            return {}
    out: dict = {"modality": str(getattr(ds, "Modality", "") or "")}
    if out["modality"] != "PT":
        return out
    units = str(getattr(ds, "Units", "") or "")
    out["pet_units"] = units
    try:
        info = ds.RadiopharmaceuticalInformationSequence[0]
        dose = float(info.RadionuclideTotalDose)
        half_life = float(info.RadionuclideHalfLife)
        start = _dicom_time(getattr(info, "RadiopharmaceuticalStartTime", None))
        weight = float(ds.PatientWeight)
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        out["suv_missing"] = f"missing PET dose/weight tags ({exc})"
        return out
    if units.upper() != "BQML":
        out["suv_missing"] = f"Units is {units!r}, SUV needs BQML"
        return out
    scan = _dicom_time(getattr(ds, "SeriesTime", None) or getattr(ds, "AcquisitionTime", None))
    decay = 1.0
    if start is not None and scan is not None and str(getattr(ds, "DecayCorrection", "START")).upper() == "START":
        dt = (scan - start) % 86400
        decay = math.exp(-math.log(2) * dt / half_life)
    out["suv_factor"] = weight * 1000.0 / (dose * decay)
    return out


def write_nifti(volume: Volume, path, dtype=None, description: str | None = None) -> Path:
    """Write a Volume as NIfTI-1 with sform and qform (code 1, scanner) set to its affine.

    A sheared affine cannot be a qform: the qform code is then 0 and only the sform carries it.
    Multi-channel volumes are written 4D (I, J, K, C). ``description`` goes into the header's ``descrip``
    field (NIfTI-1 keeps 79 characters). The write is atomic.
    """
    path = Path(path)
    arr = volume.array if dtype is None else volume.array.astype(dtype)
    arr, out_dtype = _nifti_storable(arr)
    data = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, 3)
    img = nib.Nifti1Image(np.asarray(data), volume.affine, dtype=out_dtype)
    img.header.set_xyzt_units("mm", "sec")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    img.set_sform(volume.affine, code=1)
    if geo.is_sheared(volume.affine):
        img.set_qform(None, code=0)
    else:
        img.set_qform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _nifti_storable(arr: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """An array and on-disk dtype NIfTI-1 (and nibabel 5) accept: bool -> uint8, float16 -> float32,
    64-bit integers -> 32-bit when the values fit (nibabel refuses int64 without an explicit dtype)."""
    dt = arr.dtype.newbyteorder("=")
    if dt == np.bool_:
        return arr.astype(np.uint8), np.dtype(np.uint8)
    if dt == np.float16:
        return arr.astype(np.float32), np.dtype(np.float32)
    if dt in (np.dtype(np.int64), np.dtype(np.uint64)):
        small = np.dtype(np.int32 if dt == np.int64 else np.uint32)
        info = np.iinfo(small)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(small), small
    return arr, dt


def describe_nifti_header(path) -> dict:
    """sform/qform codes and the affines they hold, for ``volfm inspect``."""
    img = nib.load(str(path))
    h = img.header
    sform, scode = h.get_sform(coded=True)
    qform, qcode = h.get_qform(coded=True)
    # nibabel resets scl_slope/scl_inter in a loaded header to NaN (the scaling moves to the data proxy),
    # so report the scaling the proxy applies: 1/0 when the file is unscaled
    proxy = img.dataobj
    slope = getattr(proxy, "slope", h["scl_slope"] if "scl_slope" in h else None)
    inter = getattr(proxy, "inter", h["scl_inter"] if "scl_inter" in h else None)
    return {"sform_code": int(scode or 0), "qform_code": int(qcode or 0),
            "qfac": float(h["pixdim"][0]) if "pixdim" in h else None,
            "scl_slope": None if slope is None else float(slope),
            "scl_inter": None if inter is None else float(inter),
            "datatype": str(h.get_data_dtype()), "byteorder": h.endianness}
