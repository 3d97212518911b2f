"""Fixtures for tests (here and in user code): rotations, centred grid affines, index grids, minimal valid
DICOM series (CT, or PET with the dose tags SUV needs), an Enhanced CT multi-frame file, an SR object, a small
study tree with a DICOMDIR and a study whose two series share one folder, written with pydicom."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about world axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def centred_affine(directions, spacing, shape, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine with unit ``directions`` (columns), ``spacing`` and its field-of-view centre at ``centre``."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(directions, float) * np.asarray(spacing, float)[None, :]
    a[:3, 3] = np.asarray(centre, float) - a[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2)
    return a


def index_grid(shape) -> np.ndarray:
    """(I, J, K, 3) array of voxel indices."""
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1)


def dicom_dataset(sop_class: str) -> Dataset:
    """An empty dataset of ``sop_class`` with a fresh SOPInstanceUID and its file meta (explicit VR little endian)."""
    fm = FileMetaDataset()
    sop = generate_uid()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = sop_class, sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    return ds


def write_dicom_series(folder, kji, origin, row_dir, col_dir, pixel_spacing, dz, *, modality="CT",
                       slopes=None, intercept=0.0, extra=None, series_uid=None, reverse_files=False, prefix=""):
    """Minimal valid single-frame series: one file per slice k, array kji[k] is (Rows, Columns).

    pixel_spacing = (row spacing, column spacing) as in DICOM PixelSpacing. Files are ``<prefix>000.dcm``, ... (a
    prefix lets several series share one folder).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, frame = generate_uid(), generate_uid()
    series_uid = series_uid or generate_uid()
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    nz, nr, nc = kji.shape
    sop_class = CT_STORAGE if modality == "CT" else PET_STORAGE
    for k in range(nz):
        ds = dicom_dataset(sop_class)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.Modality = modality
        ds.PatientID, ds.PatientName = "P001", "Test^Patient"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin, float) + k * dz * normal]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{pixel_spacing[0]}", f"{pixel_spacing[1]}"]
        ds.SliceThickness = f"{dz}"
        ds.Rows, ds.Columns = nr, nc
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = f"{1.0 if slopes is None else slopes[k]}"
        ds.RescaleIntercept = f"{intercept}"
        if extra is not None:
            extra(ds)
        ds.PixelData = kji[k].astype("<i2").tobytes()
        name = f"{prefix}{(nz - 1 - k) if reverse_files else k:03d}.dcm"
        pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
    return series_uid


# PET dose tags of :func:`pet_tags`: injection at 09:35:12.5, series at 10:30:00 (3287.5 s later), F-18
WEIGHT_KG, DOSE_BQ, HALF_LIFE_S = 72.5, 3.7e8, 6586.2
INJECTION, SERIES = "093512.50", "103000"


def pet_tags(ds, *, weight=True, units="BQML", decay="START"):
    ds.Units = units
    ds.DecayCorrection = decay
    ds.SeriesTime = SERIES
    if weight:
        ds.PatientWeight = f"{WEIGHT_KG}"
    info = Dataset()
    info.RadionuclideTotalDose = f"{DOSE_BQ}"
    info.RadionuclideHalfLife = f"{HALF_LIFE_S}"
    info.RadiopharmaceuticalStartTime = INJECTION
    ds.RadiopharmaceuticalInformationSequence = [info]


ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def write_multiframe(path, kji, origin, row_dir, col_dir, pixel_spacing, dz, *, frame_order=None, slopes=None,
                     intercepts=None, per_frame_geometry=False, positions=True, stack_ids=None, series_uid=None,
                     extra=None):
    """Minimal Enhanced CT multi-frame file written by hand with pydicom; returns its SeriesInstanceUID.

    Slice k of ``kji`` (k along the normal; geometry as in :func:`write_dicom_series`) is stored as frame f where
    ``frame_order[f] == k`` (default: in order; a permutation shuffles the frames, a subset leaves some out, a repeat
    duplicates one). ``slopes``/``intercepts``: one per slice k, written in each frame's
    PixelValueTransformationSequence (None and None: one shared slope 1, intercept -1024). ``per_frame_geometry``:
    orientation and pixel measures in every frame's groups instead of the shared ones. ``positions=False`` leaves
    out the PlanePositionSequence (a file without geometry). ``stack_ids``: one StackID per stored frame.
    ``extra(ds)`` edits the dataset before it is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nz, nr, nc = kji.shape
    order = list(range(nz)) if frame_order is None else list(frame_order)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    ds = dicom_dataset(ENHANCED_CT_STORAGE)
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "P001", "Test^Patient"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = nr, nc
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    def item(**values):
        out = Dataset()
        for key, value in values.items():
            setattr(out, key, value)
        return out

    measures = item(PixelSpacing=[f"{pixel_spacing[0]}", f"{pixel_spacing[1]}"], SliceThickness=f"{dz}")
    orientation = item(ImageOrientationPatient=[f"{v:.6f}" for v in (*row_dir, *col_dir)])
    shared = Dataset()
    if not per_frame_geometry:
        shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    per_frame_rescale = slopes is not None or intercepts is not None
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = [item(RescaleSlope="1", RescaleIntercept="-1024", RescaleType="HU")]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for f, k in enumerate(order):
        groups = Dataset()
        if positions:
            groups.PlanePositionSequence = [item(ImagePositionPatient=[
                f"{v:.6f}" for v in np.asarray(origin, float) + k * dz * normal])]
        if per_frame_geometry:
            groups.PixelMeasuresSequence = [item(PixelSpacing=measures.PixelSpacing, SliceThickness=f"{dz}")]
            groups.PlaneOrientationSequence = [item(ImageOrientationPatient=orientation.ImageOrientationPatient)]
        if per_frame_rescale:
            groups.PixelValueTransformationSequence = [item(
                RescaleSlope=f"{1.0 if slopes is None else slopes[k]}",
                RescaleIntercept=f"{-1024.0 if intercepts is None else intercepts[k]}", RescaleType="HU")]
        content = item(InStackPositionNumber=f + 1)
        if stack_ids is not None:
            content.StackID = str(stack_ids[f])
        groups.FrameContentSequence = [content]
        frames.append(groups)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack([kji[k] for k in order]).astype("<i2").tobytes()
    if extra is not None:
        extra(ds)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds.SeriesInstanceUID


SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


def write_sr(path, *, study_uid, patient_id="P001", patient_name="Test^Patient"):
    """A minimal Comprehensive SR object (no pixels) in ``study_uid``: a non-image series for discovery tests."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = dicom_dataset(SR_STORAGE)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "SR", patient_id, patient_name
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds.SeriesInstanceUID


def write_study_tree(root, staging) -> dict:
    """A small hospital-style DICOM tree under ``root`` for discovery tests; returns {name: SeriesInstanceUID} plus
    ``study_a``, ``study_b``, ``study_c``.

    Study A (patient P001) is written through a DICOMDIR (pydicom's FileSet layout PT*/ST*/SE*/IM*; the files are
    staged in ``staging``, outside ``root``): a coronal localizer (one slice), two 1 mm axial series that differ in
    kernel (``thin_sharp`` B70f, ``thin_soft`` B30f, with contrast) and a 5 mm one (``thick``). Studies B (P002) and C
    (P003) sit in nested folders without a DICOMDIR: B holds ``gap`` (2 mm axial, slice 4 of 8 missing), ``coronal``,
    ``derived`` (axial, DERIVED), ``ok`` (2.5 mm axial, STANDARD) and an SR object (``sr``); C holds only
    ``mixed`` (one slice tilted). Every file carries PatientName ``Doe^Jane`` and PatientBirthDate 19700101.
    """
    root, staging = Path(root), Path(staging)
    rng = np.random.default_rng(0)
    out = {"study_a": generate_uid(), "study_b": generate_uid(), "study_c": generate_uid()}
    axial, coronal = ((1, 0, 0), (0, 1, 0)), ((1, 0, 0), (0, 0, -1))

    def series(folder, name, study, patient, n, dz, dirs, *, image_type="ORIGINAL\\PRIMARY\\AXIAL", kernel="B30f",
               contrast=False, tilt_instance=None):
        def extra(ds):
            ds.StudyInstanceUID, ds.PatientID = study, patient
            ds.PatientName, ds.PatientBirthDate = "Doe^Jane", "19700101"
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AcquisitionDate = "20240102", "101500", "1", "20240102"
            ds.ImageType, ds.ConvolutionKernel, ds.SeriesDescription = image_type.split("\\"), kernel, name
            if contrast:
                ds.ContrastBolusAgent = "IODINE"
            if tilt_instance is not None and ds.InstanceNumber == tilt_instance:
                ds.ImageOrientationPatient = ["1", "0", "0", "0", "0.9", "0.4358899"]

        kji = (rng.integers(-200, 200, (n, 8, 8)) + 40).astype(np.int16)
        out[name] = write_dicom_series(folder, kji, (-7.0, -7.0, 0.0), dirs[0], dirs[1], (2.0, 2.0), dz,
                                       intercept=-1024.0, extra=extra)

    a = staging / "a"
    series(a / "loc", "loc", out["study_a"], "P001", 1, 2.0, coronal, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    series(a / "thin_sharp", "thin_sharp", out["study_a"], "P001", 12, 1.0, axial, kernel="B70f")
    series(a / "thin_soft", "thin_soft", out["study_a"], "P001", 12, 1.0, axial, contrast=True)
    series(a / "thick", "thick", out["study_a"], "P001", 4, 5.0, axial)
    fs = FileSet()
    for f in sorted(a.rglob("*.dcm")):
        fs.add(f)
    (root / "cdrom").mkdir(parents=True, exist_ok=True)
    fs.write(root / "cdrom")

    b = root / "P002" / "20240102" / "series"
    series(b / "gap", "gap", out["study_b"], "P002", 8, 2.0, axial)
    (b / "gap" / "004.dcm").unlink()
    series(b / "coronal", "coronal", out["study_b"], "P002", 6, 2.0, coronal)
    series(b / "derived", "derived", out["study_b"], "P002", 6, 1.5, axial, image_type="DERIVED\\SECONDARY\\AXIAL")
    series(b / "ok" / "deeper", "ok", out["study_b"], "P002", 6, 2.5, axial, kernel="STANDARD")
    out["sr"] = write_sr(b / "reports" / "sr.dcm", study_uid=out["study_b"], patient_id="P002",
                         patient_name="Doe^Jane")
    (b / "notes.txt").write_text("not DICOM")
    series(root / "P003" / "mixed", "mixed", out["study_c"], "P003", 5, 2.0, axial, tilt_instance=3)
    return out


def write_shared_folder_study(folder, *, patient_id="P010") -> dict:
    """One CT study whose two axial series share ``folder`` (as many PACS exports write them): ``thin`` (10 slices of
    1 mm, files ``thin*.dcm``, voxels 100) and ``thick`` (4 slices of 3 mm, files ``thick*.dcm``, voxels -100, so a
    store shows which one was read), both 4x4 pixels of 2 mm, with PatientName ``Doe^Jane``. Returns
    {"study", "thin", "thick"} -> UIDs."""
    folder = Path(folder)
    out = {"study": generate_uid()}

    def extra(ds):
        ds.StudyInstanceUID, ds.PatientID = out["study"], patient_id
        ds.PatientName, ds.PatientBirthDate = "Doe^Jane", "19700101"
        ds.StudyDate, ds.AcquisitionDate = "20240305", "20240305"
        ds.ImageType, ds.ConvolutionKernel = ["ORIGINAL", "PRIMARY", "AXIAL"], "B30f"

    for name, n, dz, value in (("thin", 10, 1.0, 100), ("thick", 4, 3.0, -100)):
        kji = np.full((n, 4, 4), value, np.int16)
        out[name] = write_dicom_series(folder, kji, (-3.0, -3.0, 0.0), (1, 0, 0), (0, 1, 0), (2.0, 2.0), dz,
                                       extra=extra, prefix=name)
    return out
