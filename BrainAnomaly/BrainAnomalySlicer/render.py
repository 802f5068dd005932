"""Slice views rendered offscreen from MRML nodes with MRML's own slice logic (reslicing, colour tables, display
thresholds, layer blending and label outlines as in Slicer's slice viewers), without the Slicer application.
Used for the README picture where Slicer itself cannot run, and to check what a user would see."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from vtk.util import numpy_support

ORIENTATIONS = ("Axial", "Coronal", "Sagittal")


def render_views(scene, background, foreground=None, label=None, opacity: float = 0.6,
                 centre_ras: Optional[Sequence[float]] = None, size: int = 320,
                 orientations: Sequence[str] = ORIENTATIONS, label_outline: bool = True,
                 field_of_view_mm: Optional[float] = None) -> List[np.ndarray]:
    """One RGB image (size x size x 3, uint8) per orientation, centred on `centre_ras` (default: the volume),
    showing `field_of_view_mm` across (default: the whole background volume)."""
    import slicer

    default = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    if default is None or not default.HasSliceOrientationPreset("Axial"):
        # The application adds the standard orientations to new slice nodes; a bare scene has to be told.
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    images = []
    for k, orientation in enumerate(orientations):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        slice_node = logic.AddSliceNode(f"BrainAnomalyRender{k}")
        try:
            slice_node.SetOrientation(orientation)
            slice_node.SetDimensions(size, size, 1)
            slice_node.SetUseLabelOutline(bool(label_outline))
            composite = logic.GetSliceCompositeNode()
            composite.SetBackgroundVolumeID(background.GetID())
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(float(opacity))
            composite.SetLabelVolumeID(label.GetID() if label is not None else None)
            composite.SetLabelOpacity(1.0)
            logic.FitSliceToBackground(size, size)
            if field_of_view_mm:
                fov = slice_node.GetFieldOfView()
                slice_node.SetFieldOfView(float(field_of_view_mm), float(field_of_view_mm), fov[2])
            if centre_ras is not None:
                slice_node.JumpSliceByCentering(*(float(v) for v in centre_ras))
            producer = logic.GetImageDataConnection().GetProducer()
            producer.Update()
            data = producer.GetOutputDataObject(0)
            nx, ny, _ = data.GetDimensions()
            scalars = data.GetPointData().GetScalars()
            rgba = numpy_support.vtk_to_numpy(scalars).reshape(ny, nx, scalars.GetNumberOfComponents())
            images.append(np.ascontiguousarray(rgba[::-1, :, :3]))  # VTK rows start at the bottom
        finally:
            composite = logic.GetSliceCompositeNode()
            for node in (composite, slice_node):
                if node is not None and scene.GetNodeByID(node.GetID()) is not None:
                    scene.RemoveNode(node)
            logic.SetMRMLScene(None)
    return images
