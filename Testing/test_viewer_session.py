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
