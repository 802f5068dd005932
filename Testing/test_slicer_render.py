"""What a user would see: slice views rendered offscreen by MRML's slice logic from the module's output nodes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="the slicer-core wheel is part of requirements.txt")

from BrainAnomalySlicer import nodes  # noqa: E402
from BrainAnomalySlicer.logic import DetectionLogic, DetectionOptions  # noqa: E402
from BrainAnomalySlicer.render import render_views  # noqa: E402


def _hot(image: np.ndarray) -> np.ndarray:
    """Pixels the heat colours make: red well above blue (the grey scan has r == g == b)."""
    return image[..., 0].astype(int) - image[..., 2].astype(int) > 60


def test_heatmap_shows_over_the_scan_at_the_lesion_only(mrml_scene, worker_output, tmp_path):
    scan_node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    nodes.update_node_from_image(scan_node, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    scan_node.CreateDefaultDisplayNodes()
    shutil.copytree(worker_output / "out", tmp_path / "out")
    logic = DetectionLogic(mrml_scene)
    out = logic.load_outputs(scan_node, tmp_path / "out", DetectionOptions())
    lesion = logic.apply_threshold(out)["lesions"][0]
    views = render_views(mrml_scene, scan_node, out.heatmap, out.labelmap, 0.8, lesion["centroid_ras"], size=200,
                         field_of_view_mm=200.0)
    assert len(views) == 3 and all(v.shape == (200, 200, 3) and v.dtype == np.uint8 for v in views)
    for view in views:
        hot = _hot(view)
        assert hot.sum() > 20
        rows, cols = np.nonzero(hot)
        # Centred on the lesion: the heat sits in the middle of each view.
        assert abs(rows.mean() - 100) < 25 and abs(cols.mean() - 100) < 25
    plain = render_views(mrml_scene, scan_node, None, None, 0.8, lesion["centroid_ras"], size=200)
    assert not any(_hot(v).any() for v in plain)
    # Raising the threshold above the peak hides the heatmap: the display threshold is live.
    logic.apply_threshold(out, value=lesion["max_score"] + 1.0)
    hidden = render_views(mrml_scene, scan_node, out.heatmap, None, 0.8, lesion["centroid_ras"], size=200)
    assert not any(_hot(v).any() for v in hidden)
    # Rendering leaves no slice nodes behind in the user's scene.
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 0
