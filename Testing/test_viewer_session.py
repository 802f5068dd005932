"""The browser viewer's session without a browser or a web framework: loading, refusals in one line that leave the
scene as it was, and the registry's models on offer. Detection, threshold, table, jump, save and cancel are tested
through the page (test_viewer_browser.py)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.core.errors import BadInputError


@pytest.fixture
def session(mrml_scene):
    from BrainAnomalyViewer.session import ViewerSession

    return ViewerSession(mrml_scene)


def _ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_load_and_refusals_leave_the_scene_alone(session, demo_case, tmp_path):
    scan = tmp_path / "case one.nrrd"
    sitk.WriteImage(demo_case[0], str(scan))
    node = session.load(scan)
    assert node.GetName() == "case one" and session.input_node is node
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeGrey" and display.GetWindow() > 0
    before = _ids(session.scene)
    for bad in (tmp_path / "missing.nii.gz", tmp_path):  # no file; a folder without a DICOM series
        with pytest.raises(BadInputError) as info:
            session.load(bad)
        assert "\n" not in str(info.value)
    assert _ids(session.scene) == before and session.input_node is node
    with pytest.raises(BadInputError, match="run a detection first"):
        session.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_models_are_the_registry_single_contrast_ones(session):
    from BrainAnomalyLib.store.models import default_model_name, list_models

    offered = {m["id"]: m for m in session.models()}
    single = {e["id"] for e in list_models() if len(e.get("inputs") or [1]) == 1}
    assert set(offered) == single and "fusion-t1-t2-flair" not in offered
    assert offered[default_model_name()]["default"]
    assert "intensity scorer for T1" in offered["intensity-t1"]["details"]


def test_load_a_dicom_series_folder(session, tmp_path):
    """A folder of DICOM slices loads as one volume (BrainAnomalyLib's series reader), with its spacing."""
    from BrainAnomalySlicer.nodes import node_geometry as nodes_geometry

    folder = tmp_path / "series"
    folder.mkdir()
    volume = np.arange(12 * 20 * 16, dtype=np.int16).reshape(12, 20, 16) % 500
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(volume.shape[0]):
        image = sitk.GetImageFromArray(volume[k])
        image.SetSpacing((4.0, 4.0))
        for tag, value in (("0020|000e", series), ("0020|0013", str(k + 1)), ("0008|0060", "MR"),
                           ("0020|0032", f"0\\0\\{6.0 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0018|0050", "6.0")):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    node = session.load(folder)
    assert node.GetName() == "series"
    assert node.GetImageData().GetDimensions() == (16, 20, 12)
    assert np.allclose(np.linalg.norm(nodes_geometry(node)[:3, :3], axis=0), (4.0, 4.0, 6.0))


def _dicom_session_with_findings(session, tmp_path):
    """The session with an oblique DICOM series loaded and a detection's outputs on it (a worker-style folder
    read by the module's logic, as `poll` does after a run): (series folder, lesion table)."""
    from BrainAnomalySlicer.logic import DetectionOptions
    from dicom_series import oblique_volume, write_series, write_worker_outputs

    series = tmp_path / "series"
    write_series(oblique_volume(), series)
    node = session.load(series)
    lesions = write_worker_outputs(nodes_image(node), tmp_path / "worker")
    session.outputs = session.logic.load_outputs(node, tmp_path / "worker",
                                                 DetectionOptions(per_lesion_segments=True))
    session.lesions = lesions
    return series, lesions


def nodes_image(node):
    from BrainAnomalySlicer.nodes import node_to_image

    return node_to_image(node)


def test_export_to_dicom_and_load_the_seg_back_as_the_findings(session, tmp_path):
    """Export writes the SEG and the Parametric Map of the series the scan came from; the SEG loaded back is a
    label map on the scan's grid equal to the findings label map voxel for voxel, each finding its number."""
    from BrainAnomalyLib.core.dicom import MAP_NAME, SEG_NAME
    from BrainAnomalySlicer.nodes import node_array, node_geometry

    _, lesions = _dicom_session_with_findings(session, tmp_path)
    # A slice view's composite node, as the page's views have (a bare scene has none).
    composite = session.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    paths = session.export_dicom(tmp_path / "dicom")
    assert [p.name for p in paths] == [SEG_NAME, MAP_NAME] and all(p.is_file() for p in paths)

    node = session.load_segmentation(paths[0])
    assert node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetName() == "findings_seg"
    assert np.allclose(node_geometry(node), node_geometry(session.input_node))
    loaded, shown = node_array(node), node_array(session.outputs.labelmap)
    assert loaded.shape == shown.shape and np.array_equal(loaded > 0, shown > 0)
    assert sorted(set(np.unique(loaded).tolist()) - {0}) == [les["label"] for les in lesions]
    for les in lesions:
        assert int((loaded == les["label"]).sum()) == les["voxels"]
    assert composite.GetLabelVolumeID() == node.GetID()

    # After a re-threshold the export and the SEG read back follow the label map in force.
    session.logic.apply_threshold(session.outputs, value=2.6)
    again = session.load_segmentation(session.export_dicom(tmp_path / "dicom2")[0])
    assert np.array_equal(node_array(again) > 0, node_array(session.outputs.labelmap) > 0)
    assert 0 < int((node_array(again) > 0).sum()) < int((loaded > 0).sum())

    # A new scan takes the loaded SEGs out of the scene with it.
    session.clear()
    assert session.scene.GetNodeByID(node.GetID()) is None and session.dicom_folder is None


def test_dicom_refusals_are_one_line_and_add_nothing(session, demo_case, tmp_path):
    from BrainAnomalySlicer.logic import DetectionError
    from dicom_series import oblique_volume, write_series

    _, _ = _dicom_session_with_findings(session, tmp_path)
    seg = session.export_dicom(tmp_path / "dicom")[0]
    # A SEG of another series is refused, naming both.
    other = tmp_path / "other"
    write_series(oblique_volume(size=(64, 72, 20)), other)
    session.load(other)
    before = _ids(session.scene)
    with pytest.raises(BadInputError, match="not the open series") as info:
        session.load_segmentation(seg)
    assert "\n" not in str(info.value) and _ids(session.scene) == before
    for bad, why in ((tmp_path / "missing.dcm", "not found"), (next(other.iterdir()), "DICOM Segmentation")):
        with pytest.raises(BadInputError, match=why):
            session.load_segmentation(bad)
    assert _ids(session.scene) == before
    with pytest.raises(BadInputError, match="run a detection first"):
        session.export_dicom(tmp_path / "never")

    # A scan from a volume file has no DICOM series to export against or to segment.
    scan = tmp_path / "scan.nrrd"
    sitk.WriteImage(demo_case[0], str(scan))
    session.load(scan)
    with pytest.raises(BadInputError, match="not a DICOM series folder") as info:
        session.load_segmentation(seg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "never").exists()
    # Export into a folder holding other files is the module's refusal, as a one-line DetectionError.
    _dicom_session_with_findings(session, tmp_path / "again")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(DetectionError) as info:
        session.export_dicom(tmp_path / "busy")
    assert info.value.kind == "BadInputError" and "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["x.txt"]
