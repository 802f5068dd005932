"""The module's MRML node code against the real MRML library (slicer-core wheel), without the Slicer application."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import new_scene

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is part of requirements.txt")

from BrainAnomalySlicer import nodes  # noqa: E402


def oblique_image(shape=(14, 17, 20), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(100, 10, shape).astype(np.float32))
    angle = np.deg2rad(17.0)
    rot_z = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    angle = np.deg2rad(-9.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    image.SetDirection((rot_z @ rot_x).ravel().tolist())
    image.SetSpacing((1.2, 0.9, 2.5))
    image.SetOrigin((-31.5, 12.25, 7.0))
    return image


def test_geometry_round_trip_oblique(mrml_scene):
    image = oblique_image()
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    nodes.update_node_from_image(node, image)
    # The node holds the geometry in RAS: an LPS origin (x, y, z) is RAS (-x, -y, z).
    assert np.allclose(node.GetOrigin(), (31.5, -12.25, 7.0))
    assert np.allclose(node.GetSpacing(), (1.2, 0.9, 2.5))
    back = nodes.node_to_image(node)
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetSpacing(), image.GetSpacing())
    assert np.allclose(back.GetOrigin(), image.GetOrigin())
    assert np.allclose(back.GetDirection(), image.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    # A voxel lands at the same physical point through MRML's matrix and SimpleITK's.
    ijk = (3, 5, 7)
    lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
    ras = nodes.node_ijk_to_ras(node) @ np.array([*ijk, 1.0])
    assert np.allclose(ras[:3], lps * [-1, -1, 1])


def test_volume_under_linear_transform_is_read_in_world_coordinates(mrml_scene):
    image = oblique_image()
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    nodes.update_node_from_image(node, image)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.0)  # RAS
    transform.SetMatrixTransformToParent(nodes._numpy_to_matrix(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = nodes.node_to_image(node)
    assert np.allclose(np.array(moved.GetOrigin()) - np.array(image.GetOrigin()), (-10.0, 5.0, 2.0))


def test_multicomponent_and_empty_volumes_are_refused(mrml_scene):
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(nodes.NodeError, match="no image data"):
        nodes.node_to_image(empty)
    rgb = mrml_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    nodes.update_node_from_image(rgb, vec)
    with pytest.raises(nodes.NodeError, match="3 components"):
        nodes.node_to_image(rgb)


def test_hot_colour_prefers_slicer_table_and_falls_back_to_own():
    with_colours = new_scene()
    assert nodes.hot_colour_node(with_colours).GetID() == "vtkMRMLColorTableNodefMRIPA"
    bare = slicer.vtkMRMLScene()  # no colour logic: no built-in tables at all
    own = nodes.hot_colour_node(bare)
    assert own.GetName() == nodes.HOT_COLOUR_NAME and own.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    own.GetColor(0, rgba)
    assert rgba[:3] == pytest.approx([0.5, 0.0, 0.0], abs=0.01)  # dark red at the threshold
    own.GetColor(255, rgba)
    assert rgba[:3] == pytest.approx([1.0, 1.0, 0.0], abs=0.01)  # yellow at the top, never white
    assert nodes.hot_colour_node(bare) is own  # made once, then found again


def test_heatmap_display_settings(mrml_scene):
    heat = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "heat")
    nodes.update_node_from_image(heat, sitk.GetImageFromArray(np.linspace(0, 9, 600, dtype=np.float32)
                                                               .reshape(6, 10, 10)))
    nodes.show_heatmap(mrml_scene, heat, threshold=2.5, window=(2.5, 8.0))
    display = heat.GetDisplayNode()
    assert display.GetColorNodeID() == nodes.hot_colour_node(mrml_scene).GetID()
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(2.5) and display.GetWindowLevelMax() == pytest.approx(8.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(2.5)
    nodes.set_display_threshold(heat, 4.0)
    assert display.GetLowerThreshold() == pytest.approx(4.0)
    assert display.GetUpperThreshold() > 9.0


def test_slice_views_show_heatmap_as_foreground(mrml_scene):
    scan = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    heat = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "heat")
    composites = [mrml_scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    nodes.show_in_slice_views(mrml_scene, scan, heat, 0.6)
    for c in composites:
        assert c.GetBackgroundVolumeID() == scan.GetID() and c.GetForegroundVolumeID() == heat.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.6)
    nodes.set_opacity(mrml_scene, 0.25, heat)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.25) for c in composites)


def _numbered_labels():
    arr = np.zeros((12, 14, 16), np.uint8)
    arr[2:5, 3:7, 4:8] = 1
    arr[8:10, 9:12, 10:14] = 2
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(oblique_image((12, 14, 16)))
    # A voxel threshold's table: no finding score or healthy rate.
    lesions = [{"label": 1, "voxels": 48, "volume_ml": 0.1, "max_score": 9.0, "mean_score": 5.0,
                "centroid_ras": [1.0, 2.0, 3.0], "centroid_ijk": [5.5, 4.5, 3.0], "finding_score": None,
                "healthy_rate": None},
               {"label": 2, "voxels": 24, "volume_ml": 0.05, "max_score": 4.0, "mean_score": 3.0,
                "centroid_ras": [-4.0, 5.5, -6.0], "centroid_ijk": [11.5, 10.0, 8.5], "finding_score": None,
                "healthy_rate": None}]
    return image, lesions


def test_segmentation_one_anomaly_segment_or_one_per_lesion(mrml_scene):
    from BrainAnomalyLib.detection.postprocess import ijk_to_ras

    image, lesions = _numbered_labels()
    numbered, geometry = sitk.GetArrayFromImage(image), ijk_to_ras(image)
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    nodes.update_segmentation(mrml_scene, seg, numbered, geometry, lesions, per_lesion=False)
    s = seg.GetSegmentation()
    assert s.GetNumberOfSegments() == 1 and s.GetNthSegment(0).GetName() == "Anomaly"
    nodes.update_segmentation(mrml_scene, seg, numbered, geometry, lesions, per_lesion=True)
    assert [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())] == ["Lesion 1", "Lesion 2"]
    # The segments' voxels are the label map's, on its oblique grid (only the lesions' box was imported).
    labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "check")
    reference = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "reference")
    nodes.update_node_from_image(reference, image)
    exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        seg, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    assert exported
    back = sitk.GetArrayFromImage(nodes.node_to_image(labelmap))
    assert back.shape == numbered.shape and np.array_equal(back, numbered)  # each lesion its own segment
    assert np.allclose(nodes.node_ijk_to_ras(labelmap), geometry, atol=1e-5)
    # No temporary volume in the scene (only the two made here), and no segments for an empty result.
    volumes = [mrml_scene.GetNthNodeByClass(i, "vtkMRMLVolumeNode")
               for i in range(mrml_scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode"))]
    assert sorted(v.GetName() for v in volumes) == ["check", "reference"]
    nodes.update_segmentation(mrml_scene, seg, numbered * 0, geometry, [], per_lesion=True)
    assert s.GetNumberOfSegments() == 0


def test_lesion_table_contents_and_jump(mrml_scene):
    _, lesions = _numbered_labels()
    table = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "lesions")
    nodes.update_table(table, lesions)
    t = table.GetTable()
    assert t.GetNumberOfRows() == 2
    names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    assert names == "label,voxels,volume_ml,centroid_r,centroid_a,centroid_s,centroid_i,centroid_j,centroid_k," \
                    "mean_score,max_score,finding_score,healthy_rate".split(",")  # lesions.csv's columns
    assert t.GetValueByName(1, "max_score").ToDouble() == pytest.approx(4.0)
    assert np.isnan(t.GetValueByName(0, "healthy_rate").ToDouble())  # empty at a voxel threshold
    assert nodes.lesion_position(table, 1) == [-4.0, 5.5, -6.0]
    assert nodes.lesion_position(table, 2) is None
    red = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    nodes.jump_to(mrml_scene, nodes.lesion_position(table, 0))
    centre = red.GetSliceToRAS()
    assert [centre.GetElement(r, 3) for r in range(3)] == pytest.approx([1.0, 2.0, 3.0])
    nodes.update_table(table, [])
    assert table.GetTable().GetNumberOfRows() == 0


def test_outputs_named_after_input_beside_it_and_never_a_users_node(mrml_scene):
    sh = mrml_scene.GetSubjectHierarchyNode()
    scan = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient7")
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Study")
    sh.CreateItem(folder, scan)
    users = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient7 anomaly map")  # the user's own
    with nodes.transaction(mrml_scene) as tx:
        out = nodes.prepare_outputs(mrml_scene, scan, tx, ["heatmap", "table"])
    assert out.heatmap is not users and out.heatmap.GetName().startswith("patient7 anomaly map")
    assert out.table.GetName() == "patient7 lesions"
    assert out.labelmap is None
    for node in out.nodes().values():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder
    assert users.GetAttribute(nodes.ROLE_ATTRIBUTE) is None
    # A second run finds the same nodes (by attribute), unless new ones are asked for.
    with nodes.transaction(mrml_scene) as tx:
        again = nodes.prepare_outputs(mrml_scene, scan, tx, ["heatmap", "table"])
        assert not tx.created
    assert again.heatmap is out.heatmap and again.table is out.table
    with nodes.transaction(mrml_scene) as tx:
        fresh = nodes.prepare_outputs(mrml_scene, scan, tx, ["heatmap"], reuse=False)
    assert fresh.heatmap is not out.heatmap


def test_transaction_removes_created_nodes_on_failure(mrml_scene):
    scan = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    mrml_scene.GetSubjectHierarchyNode()  # the scene's singleton, made on first use (always there in Slicer)
    before = mrml_scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="boom"):
        with nodes.transaction(mrml_scene) as tx:
            out = nodes.prepare_outputs(mrml_scene, scan, tx, list(nodes.ROLES))
            nodes.update_node_from_image(out.heatmap, oblique_image())
            nodes.show_heatmap(mrml_scene, out.heatmap, 1.0, (1.0, 2.0))  # adds a display node too
            raise RuntimeError("boom")
    assert mrml_scene.GetNumberOfNodes() == before
    assert not nodes.find_outputs(mrml_scene, scan).nodes()


def test_rewriting_a_label_map_of_the_same_shape_reuses_its_memory(mrml_scene):
    # The threshold slider rewrites the label map on every rest: in place, no new image each time.
    from BrainAnomalyLib.detection.postprocess import ijk_to_ras

    image, _ = _numbered_labels()
    mask = (sitk.GetArrayFromImage(image) > 0).astype(np.uint8)
    labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    nodes.update_labelmap(mrml_scene, labelmap, mask, ijk_to_ras(image))
    data = labelmap.GetImageData()
    nodes.update_labelmap(mrml_scene, labelmap, 1 - mask, ijk_to_ras(image))
    assert labelmap.GetImageData() is data
    assert np.array_equal(nodes.node_array(labelmap), 1 - mask)
    nodes.update_labelmap(mrml_scene, labelmap, np.zeros((3, 4, 5), np.uint8), ijk_to_ras(image))
    assert labelmap.GetImageData().GetDimensions() == (5, 4, 3)


def test_lesion_table_of_the_findings_operating_point(mrml_scene):
    """The table node of label_array's findings at a lesion-level operating point: the reported findings only,
    their finding score and healthy rate, rarest first."""
    from BrainAnomalyLib.calibration import CalibrationCurve, FindingCalibration
    from BrainAnomalyLib.calibration.findings import FindingRule
    from BrainAnomalyLib.detection.postprocess import label_array

    arr = np.zeros((20, 20, 20), np.float32)
    arr[2:6, 2:6, 2:6] = 2.5  # big and strong
    arr[10:12, 10:12, 10:12] = 2.2  # small and weak
    arr[15:19, 2:5, 12:18] = 2.4
    curve = CalibrationCurve(np.array([1e-3, 1e-2, 1e-1]), np.array([3.0, 2.0, 1.0]))
    healthy = FindingCalibration.from_scans([[0.5, 0.05], [0.2], [0.02, 0.01], [0.1]])
    index_to_ras = np.diag([2.0, 2.0, 2.0, 1.0])
    _, everything = label_array(arr, index_to_ras, curve.threshold(0.01), 0.0, rule=FindingRule(curve, healthy))
    assert len(everything) == 3
    numbered, lesions = label_array(arr, index_to_ras, curve.threshold(0.01), 0.0, numbered=True,
                                    rule=FindingRule(curve, healthy, 1.0))
    assert len(lesions) == 2  # the weak finding is as common in healthy scans as more than once per scan
    table = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "lesions")
    nodes.update_table(table, lesions)
    t = table.GetTable()
    assert t.GetNumberOfRows() == len(lesions)
    rates = [t.GetValueByName(r, "healthy_rate").ToDouble() for r in range(t.GetNumberOfRows())]
    scores = [t.GetValueByName(r, "finding_score").ToDouble() for r in range(t.GetNumberOfRows())]
    assert rates == pytest.approx([les["healthy_rate"] for les in lesions]) and all(r <= 1.0 for r in rates)
    assert rates == sorted(rates) and scores == sorted(scores, reverse=True)
    assert [t.GetValueByName(r, "label").ToInt() for r in range(t.GetNumberOfRows())] == [1, 2]
    assert int((numbered > 0).sum()) == sum(les["voxels"] for les in lesions)
