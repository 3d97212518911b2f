"""Fixtures for tests (here and in user code): rotations, centred grid affines, index grids, and minimal valid
DICOM series (CT, or PET with the dose tags SUV needs) written with pydicom."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
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


def write_dicom_series(folder, kji, origin, row_dir, col_dir, pixel_spacing, dz, *, modality="CT",
                       slopes=None, intercept=0.0, extra=None, series_uid=None, reverse_files=False):
    """Minimal valid single-frame series: one file per slice k, array kji[k] is (Rows, Columns).

    pixel_spacing = (row spacing, column spacing) as in DICOM PixelSpacing.
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
        fm = FileMetaDataset()
        sop = generate_uid()
        fm.MediaStorageSOPClassUID = sop_class
        fm.MediaStorageSOPInstanceUID = sop
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = fm
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
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
        name = f"{(nz - 1 - k) if reverse_files else k:03d}.dcm"
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
