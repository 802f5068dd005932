"""DICOM in and out, in one place: which series of a folder is read (and the note saying so when the folder holds
several), and the findings and anomaly map written back as a DICOM Segmentation and a Parametric Map (highdicom)
that reference that series' images, so a PACS or a DICOM viewer shows them over the scan they came from; and such
a SEG read back as a label image on the series' grid.

Export is refused unless the results lie on the source series' own grid, image by image (same rows, columns,
pixel spacing, orientation, and each image's position that of the matching slice): a SEG frame then covers
exactly the pixels of the image it references, whatever the series' obliquity or slice spacing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import BadInputError

SEG_NAME = "findings_seg.dcm"
MAP_NAME = "anomaly_map_pm.dcm"
DICOM_OUTPUTS = (SEG_NAME, MAP_NAME)
SEGMENTS = ("findings", "anomaly")  # one segment per finding, or one "Anomaly" segment
# Series numbers of the derived series: after the source's, where viewers list derived series.
_SEG_SERIES, _MAP_SERIES = 901, 902
# Positions agree to well below any voxel; a DICOM decimal string keeps at most 16 characters.
_POSITION_TOL_MM = 1e-2
_DIRECTION_TOL = 1e-4


@dataclass
class Series:
    uid: str
    files: List[str]  # in slice order, as SimpleITK stacks them
    number: str = ""
    description: str = ""

    def label(self) -> str:
        parts = [f"series {self.number}" if self.number else "series",
                 f"'{self.description}'" if self.description else "", f"({len(self.files)} images, UID {self.uid})"]
        return " ".join(p for p in parts if p)


def _tag(path: str, key: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def find_series(folder) -> Tuple[Series, Optional[str]]:
    """The series of a DICOM folder to read: the only one, or the one with the most images (a localizer or a
    single derived image is never the scan); with several, also the note that tells the user which was taken."""
    folder = Path(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise BadInputError(f"no DICOM series found in folder {folder}")
    found = [Series(uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))) for uid in ids]
    for s in found:
        s.number, s.description = _tag(s.files[0], "0020|0011"), _tag(s.files[0], "0008|103e")
    # Most images first; a tie goes to the lower series number, then the UID, so the choice never varies.
    found.sort(key=lambda s: (-len(s.files), int(s.number) if s.number.isdigit() else 1 << 31, s.uid))
    chosen = found[0]
    if len(found) == 1:
        return chosen, None
    others = "; ".join(s.label() for s in found[1:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else "")
    return chosen, (f"folder {folder} holds {len(found)} DICOM series; read {chosen.label()}, the one with the "
                    f"most images (also there: {others}); give a folder with one series to choose another")


def read_series(folder) -> Tuple[sitk.Image, Optional[str]]:
    """The series `find_series` picks, read with its geometry; and its note."""
    series, note = find_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    return reader.Execute(), note


# ---------------------------------------------------------------------------------------------------- export
def _source_datasets(series: Series):
    import pydicom

    try:
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise BadInputError(f"cannot read the DICOM series {series.uid}: {exc}") from None
    if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
        raise BadInputError(f"DICOM series {series.uid} is one multi-frame image; export needs a series of "
                            "single-frame images")
    return datasets


def _check_grid(image: sitk.Image, datasets, series: Series, what: str = "the results are",
                need: str = "export needs the series the detection ran on") -> None:
    """Refuse an image that is not on the series' grid, image by image (see the module's docstring)."""
    why = _off_grid(image, datasets, series)
    if why:
        raise BadInputError(f"{what} not on the grid of DICOM series {series.uid} ({why}); {need}")


def _off_grid(image: sitk.Image, datasets, series: Series) -> Optional[str]:
    """How the first image that does not fit `image`'s grid differs from it; None when all fit."""
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if size[2] != len(datasets):
        return f"{size[2]} slices against the series' {len(datasets)} images"
    for k, ds in enumerate(datasets):
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            row_step, col_step = (float(v) for v in ds.PixelSpacing)
            orient = np.array([float(v) for v in ds.ImageOrientationPatient])
            pos = np.array([float(v) for v in ds.ImagePositionPatient])
        except (AttributeError, TypeError, ValueError):
            raise BadInputError(f"DICOM series {series.uid}: image {k + 1} lacks its size, pixel spacing, "
                                "orientation or position") from None
        if (cols, rows) != tuple(size[:2]) or not np.allclose((col_step, row_step), spacing[:2], atol=1e-4):
            return f"image {k + 1} is {cols} x {rows} pixels of {col_step:g} x {row_step:g} mm"
        if not np.allclose(orient, np.concatenate([direction[:, 0], direction[:, 1]]), atol=_DIRECTION_TOL):
            return f"image {k + 1} has another orientation"
        if not np.allclose(pos, image.TransformIndexToPhysicalPoint((0, 0, k)), atol=_POSITION_TOL_MM):
            return f"image {k + 1} lies elsewhere"
    return None


def _algorithm(model_name: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    return hd.AlgorithmIdentificationSequence(name="BrainAnomaly", family=codes.cid7162.ArtificialIntelligence,
                                              version=__version__, parameters={"model": model_name[:60]}
                                              if model_name else None)


def _segment_descriptions(lesions: Sequence[dict], per_finding: bool, model_name: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def segment(number: int, label: str):
        return hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model_name), tracking_uid=hd.UID(), tracking_id=label)

    if per_finding and lesions:
        # Named as the Slicer module names its segments, so both show the same list.
        return [segment(int(les["label"]), f"Lesion {int(les['label'])}") for les in lesions]
    return [segment(1, "Anomaly")]


def export_dicom(findings: sitk.Image, lesions: Sequence[dict], anomaly_map: sitk.Image, source, folder,
                 per_finding: bool = True, model_name: str = "", display_range: Optional[Sequence[float]] = None
                 ) -> List[Path]:
    """Write SEG_NAME and MAP_NAME into `folder` (which must exist; the caller stages it) from results on the grid
    of the DICOM series `find_series` picks in `source`: `findings` holds each finding's number (its `label` in
    `lesions`), 0 elsewhere; `per_finding` makes one segment per finding, else one "Anomaly" segment. With no
    finding the SEG holds one empty "Anomaly" segment, which says so to a viewer. Returns the two paths."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    series, _ = find_series(source)
    datasets = _source_datasets(series)
    for image in (findings, anomaly_map):
        _check_grid(image, datasets, series)
    labels = sitk.GetArrayFromImage(findings)
    known = {int(les["label"]) for les in lesions}
    present = set(np.unique(labels).tolist()) - {0}
    if not present <= known:
        raise ValueError(f"finding numbers {sorted(present - known)} are not in the lesion table")
    per_finding = per_finding and bool(lesions)
    pixels = labels.astype(np.uint16 if labels.max() > 255 else np.uint8) if per_finding else \
        (labels > 0).astype(np.uint8)
    common = dict(manufacturer="BrainAnomaly", manufacturer_model_name=(model_name or "BrainAnomaly")[:64],
                  software_versions=__version__, device_serial_number="none")
    name = f" ({model_name})" if model_name else ""
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(lesions, per_finding, model_name),
        series_instance_uid=hd.UID(), series_number=_SEG_SERIES, sop_instance_uid=hd.UID(), instance_number=1,
        series_description=f"BrainAnomaly findings{name}"[:64], content_label="FINDINGS",
        omit_empty_frames=bool(pixels.any()), **common)  # an empty SEG keeps every frame: it cannot have none
    heat = sitk.GetArrayFromImage(anomaly_map).astype(np.float32)
    low, high = (float(v) for v in (display_range or (float(heat.min()), float(heat.max()))))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY", lut_explanation="anomaly score; higher is less like healthy brain",
        unit=codes.UCUM.NoUnits, value_range=(float(heat.min()), float(heat.max())), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=datasets, pixel_array=heat, series_instance_uid=hd.UID(), series_number=_MAP_SERIES,
        sop_instance_uid=hd.UID(), instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=(low + high) / 2.0, window_width=max(high - low, 1e-6),
            window_explanation="threshold to display top",
            # a score window can be under 1 wide, which only LINEAR_EXACT allows
            voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT)],
        series_description=f"BrainAnomaly anomaly map{name}"[:64],
        content_label="ANOMALYMAP", **common)
    for dataset in (seg, pm):
        # Laterality is asked of a series unless its body part is known to be unpaired: carry the source's.
        for keyword in ("BodyPartExamined", "Laterality"):
            if keyword in datasets[0] and keyword not in dataset:
                setattr(dataset, keyword, getattr(datasets[0], keyword))
    folder = Path(folder)
    paths = [folder / SEG_NAME, folder / MAP_NAME]
    for dataset, path in zip((seg, pm), paths):
        dataset.save_as(os.fspath(path), enforce_file_format=True)
    return paths


# ---------------------------------------------------------------------------------------------------- SEG in
def read_segmentation(path, source, grid: sitk.Image) -> sitk.Image:
    """The DICOM SEG at `path` as a label image on `grid` (the scan read from the series `find_series` picks in
    `source`): each voxel its segment's number, 0 elsewhere, so a SEG this module exported gives back the findings
    as numbered. Refused (BadInputError) when it is no SEG, references another series, has overlapping segments,
    or `grid` is not that series' own grid."""
    import highdicom as hd
    import pydicom

    path = Path(path)
    series, _ = find_series(source)
    datasets = _source_datasets(series)
    _check_grid(grid, datasets, series, "the scan is", "open it again from its DICOM folder")
    try:
        seg = hd.seg.segread(os.fspath(path))
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"cannot read {path} as a DICOM Segmentation: {reason}") from None
    referenced = {item.SeriesInstanceUID for item in getattr(seg, "ReferencedSeriesSequence", [])}
    if series.uid not in referenced:
        raise BadInputError(f"{path.name} segments DICOM series {', '.join(sorted(referenced)) or '(none named)'}, "
                            f"not the open series {series.uid}; open the series it was made on")
    try:
        pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in datasets], combine_segments=True,
                                                   relabel=False, assert_missing_frames_are_empty=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        # e.g. overlapping segments, which one label map cannot hold
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"cannot place {path.name} on the open series: {reason}") from None
    labels = sitk.GetImageFromArray(np.ascontiguousarray(pixels, dtype=np.uint16))
    labels.CopyInformation(grid)
    return labels
