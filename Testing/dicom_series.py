"""Writes a SimpleITK volume as a DICOM MR series of single-frame images (pydicom), with the geometry the volume
has: the tests' stand-in for a scanner's series, oblique and anisotropic where the volume is."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def _ds(values) -> list:
    return [f"{float(v):.10g}" for v in values]


def write_series(image: sitk.Image, folder, number: int = 3, description: str = "T1 oblique",
                 study_uid: Optional[str] = None, frame_uid: Optional[str] = None, shuffle: bool = True) -> str:
    """Write `image` (rounded to int16) as one file per slice into `folder`; returns the series UID. File names
    are shuffled against slice order (`shuffle`), as a scanner's often are, so readers must sort by position."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.round(sitk.GetArrayFromImage(image)).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    order = np.random.default_rng(number).permutation(arr.shape[0]) if shuffle else np.arange(arr.shape[0])
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "A1"
        ds.ContentDate, ds.ContentTime = "20260101", "120000"
        ds.BodyPartExamined, ds.PatientPosition = "HEAD", "HFS"
        ds.Modality, ds.Manufacturer, ds.ReferringPhysicianName = "MR", "Test", ""
        ds.SeriesDescription = description
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Subject", "P1", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID = study_uid, series_uid, "1"
        ds.SeriesNumber, ds.InstanceNumber = number, k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "8.1", "3.7", "1"
        ds.SliceThickness = f"{image.GetSpacing()[2]:.6g}"
        ds.ImagePositionPatient = _ds(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImageOrientationPatient = _ds(np.concatenate([direction[:, 0], direction[:, 1]]))
        ds.PixelSpacing = _ds([image.GetSpacing()[1], image.GetSpacing()[0]])  # row step, then column step
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = arr[k].tobytes()
        ds.save_as(str(folder / f"S{number}IM{order[k]:04d}.dcm"), enforce_file_format=True)
    return series_uid


def oblique_volume(size=(64, 72, 18), spacing=(1.1, 0.9, 4.0), seed: int = 0) -> sitk.Image:
    """A small oblique, anisotropic volume (thick slices, non-square pixels, rotated about every axis)."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(400, 40, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    a, b, c = np.deg2rad([17.0, -11.0, 23.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    image.SetDirection((rz @ ry @ rx).ravel().tolist())
    image.SetOrigin((-31.5, 12.25, -40.75))
    return image


def findings_on(scan: sitk.Image):
    """A heatmap on the scan's grid with three blobs (one across slices), and its findings at 1.0 as
    label_lesions makes them: (heatmap, numbered findings, lesion table)."""
    from BrainAnomalyLib.detection.postprocess import label_lesions

    heat = np.zeros(sitk.GetArrayViewFromImage(scan).shape, np.float32)
    heat[2:5, 5:12, 4:9] = 3.0
    heat[9:11, 20:30, 25:31] = 5.0
    heat[14, 30:33, 2:5] = 2.0
    heat += np.random.default_rng(0).random(heat.shape).astype(np.float32) * 0.5
    image = sitk.GetImageFromArray(heat)
    image.CopyInformation(scan)
    numbered, lesions = label_lesions(image, 1.0, 0.0, numbered=True)
    assert len(lesions) == 3
    return image, numbered, lesions


def write_worker_outputs(scan: sitk.Image, folder) -> list:
    """A worker-style output folder (anomaly map and result.json at threshold 1.0) with `findings_on(scan)`'s
    heatmap, as DetectionLogic.load_outputs reads it after a run; returns the lesion table."""
    import json

    heat, _, lesions = findings_on(scan)
    folder = Path(folder)
    folder.mkdir(parents=True)
    sitk.WriteImage(heat, str(folder / "anomaly_map.nrrd"))
    summary = {"threshold": {"value": 1.0, "fpr": None, "source": "user value"}, "lesions": lesions,
               "min_lesion_ml": 0.0, "display_range": [1.0, 5.0], "peak_score": 5.5, "model": {"name": "m"}}
    (folder / "result.json").write_text(json.dumps(summary), encoding="utf-8")
    return lesions
