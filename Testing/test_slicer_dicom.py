"""The module's 'Export to DICOM' (DetectionLogic.export_dicom) with real MRML (slicer-core): the SEG holds what the
label map and segmentation in the scene show, at the operating point in force, on the source series' grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

pytest.importorskip("slicer", reason="the slicer-core wheel is part of requirements.txt")

import highdicom as hd  # noqa: E402
from BrainAnomalyLib.core.dicom import MAP_NAME, SEG_NAME, find_series  # noqa: E402
from BrainAnomalyLib.core.io import read_volume  # noqa: E402
from BrainAnomalySlicer import nodes  # noqa: E402
from BrainAnomalySlicer.logic import DetectionError, DetectionLogic, DetectionOptions  # noqa: E402
from dicom_series import oblique_volume, write_series, write_worker_outputs  # noqa: E402


def _loaded(scene, tmp_path, per_lesion=True):
    """An oblique series, and a worker-style output folder for it loaded into the scene: (series folder,
    outputs, lesion table)."""
    series = tmp_path / "series"
    write_series(oblique_volume(), series)
    scan = read_volume(series)
    worker = tmp_path / "worker"
    lesions = write_worker_outputs(scan, worker)
    node = mrml_node(scene, scan)
    outputs = DetectionLogic(scene).load_outputs(node, worker, DetectionOptions(per_lesion_segments=per_lesion))
    return series, outputs, lesions


def mrml_node(scene, image):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    nodes.update_node_from_image(node, image)
    return node


def _seg_by_slice(path, series):
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in find_series(series)[0].files]
    seg = hd.seg.segread(path)
    return seg, seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)


def test_export_writes_what_the_label_map_shows(mrml_scene, tmp_path):
    series, outputs, lesions = _loaded(mrml_scene, tmp_path)
    logic = DetectionLogic(mrml_scene)
    paths = logic.export_dicom(outputs, series, tmp_path / "dicom")
    assert [p.name for p in paths] == [SEG_NAME, MAP_NAME] and all(p.is_file() for p in paths)
    seg, pixels = _seg_by_slice(paths[0], series)
    shown = nodes.node_array(outputs.labelmap)
    assert np.array_equal(pixels > 0, shown > 0)
    # One segment per lesion, named and numbered as the segmentation node's.
    segmentation = outputs.segmentation.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert [d.SegmentLabel for d in seg.SegmentSequence] == names == ["Lesion 1", "Lesion 2", "Lesion 3"]
    for les in lesions:
        assert int((pixels == les["label"]).sum()) == les["voxels"]

    # After a re-threshold the export follows the scene; one "Anomaly" segment when asked; an earlier export
    # is replaced only with overwrite.
    logic.apply_threshold(outputs, value=2.6)
    with pytest.raises(DetectionError, match="earlier result") as caught:
        logic.export_dicom(outputs, series, tmp_path / "dicom", per_lesion=False)
    assert caught.value.kind == "BadInputError"
    paths = logic.export_dicom(outputs, series, tmp_path / "dicom", per_lesion=False, overwrite=True)
    seg, pixels = _seg_by_slice(paths[0], series)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Anomaly"]
    assert np.array_equal(pixels, nodes.node_array(outputs.labelmap))
    assert int(pixels.sum()) == sum(les["voxels"] for les in lesions if les["max_score"] > 2.6)


def test_export_against_another_series_is_refused_and_writes_nothing(mrml_scene, tmp_path):
    _, outputs, _ = _loaded(mrml_scene, tmp_path)
    other = tmp_path / "other"
    write_series(oblique_volume(size=(64, 72, 20)), other)
    target = tmp_path / "dicom"
    with pytest.raises(DetectionError, match="not on the grid of DICOM series") as caught:
        DetectionLogic(mrml_scene).export_dicom(outputs, other, target)
    assert caught.value.kind == "BadInputError" and caught.value.exit_code == 2
    assert not target.exists()
