"""Arrays <-> MRML nodes for the BrainAnomaly module. Every function takes the scene it works on, so the same code
runs in the Slicer application and under plain pytest against the real MRML library of the slicer-core wheel.

Output nodes carry two attributes: their role and the ID of the input volume they were made from. Only nodes with
both are ever reused or changed; a user's own node of the same name is left alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

ROLE_ATTRIBUTE = "BrainAnomaly.Role"
SOURCE_ATTRIBUTE = "BrainAnomaly.Source"
CALIBRATION_ATTRIBUTE = "BrainAnomaly.Calibration"
HOT_COLOUR_NAME = "BrainAnomaly Hot"
# Heat colours that stay saturated (red -> yellow, no white end: a white top would vanish over bright white matter).
# Slicer's colour logic always makes the fMRI positive-activation table, meant for thresholded overlays; a scene
# without Slicer's colour tables gets our own equivalent.
HOT_COLOUR_IDS = ("vtkMRMLColorTableNodefMRIPA",)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

ROLES = {  # role: (node class, name suffix)
    "heatmap": ("vtkMRMLScalarVolumeNode", "anomaly map"),
    "labelmap": ("vtkMRMLLabelMapVolumeNode", "anomaly labels"),
    "segmentation": ("vtkMRMLSegmentationNode", "anomalies"),
    "table": ("vtkMRMLTableNode", "lesions"),
    "reconstruction": ("vtkMRMLScalarVolumeNode", "pseudo-healthy"),
}


class NodeError(ValueError):
    """A volume node that cannot be turned into an image (no image data, several components, warped)."""


# --- geometry -------------------------------------------------------------------------------------------------

def _matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def node_ijk_to_ras(node) -> np.ndarray:
    """The node's IJK -> world RAS matrix, through a linear parent transform if it has one."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = _matrix_to_numpy(m)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise NodeError(f"volume '{node.GetName()}' is under a non-linear transform; harden the transform "
                            "(Data module, right-click > Harden transform) and try again")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk = _matrix_to_numpy(to_world) @ ijk
    return ijk


def node_to_image(node) -> sitk.Image:
    """A scalar volume node as a SimpleITK image with the same voxels and world geometry."""
    data = node.GetImageData() if node is not None else None
    if data is None or data.GetPointData() is None or data.GetPointData().GetScalars() is None:
        raise NodeError(f"volume '{node.GetName() if node else None}' has no image data")
    scalars = data.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise NodeError(f"volume '{node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel; "
                        "a single-channel MRI volume is needed")
    nx, ny, nz = data.GetDimensions()
    array = numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx).copy()
    image = sitk.GetImageFromArray(array)
    m = node_ijk_to_ras(node)
    lps = LPS_TO_RAS @ m[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])
    image.SetOrigin([float(v) for v in LPS_TO_RAS @ m[:3, 3]])
    return image


def update_node_from_image(node, image: sitk.Image) -> None:
    """Replace a volume node's voxels and geometry with an image's (data copied, so the node owns its memory)."""
    from BrainAnomalyLib.detection.postprocess import ijk_to_ras

    update_node_from_array(node, sitk.GetArrayFromImage(image), ijk_to_ras(image))


def update_node_from_array(node, array: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Set a volume node's voxels ((k, j, i) array, or (k, j, i, c)) and IJK -> RAS matrix. Voxels of the same
    shape and type are written into the node's own memory (a re-threshold makes no new image); others replace it."""
    data = node.GetImageData()
    scalars = data.GetPointData().GetScalars() if data is not None else None
    components = array.shape[3] if array.ndim == 4 else 1
    if (scalars is not None and data.GetDimensions() == array.shape[2::-1]
            and scalars.GetNumberOfComponents() == components
            and scalars.GetDataType() == numpy_support.get_vtk_array_type(array.dtype)):
        numpy_support.vtk_to_numpy(scalars).reshape(array.shape)[...] = array
        scalars.Modified()
        data.Modified()
    else:
        data = vtk.vtkImageData()
        data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        flat = np.ascontiguousarray(array).reshape(-1, components) if components > 1 else np.ravel(array)
        data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
            flat, deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype)))
    node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras))
    node.SetAndObserveImageData(data)


def node_geometry(node) -> np.ndarray:
    """The node's own IJK -> RAS matrix (without parent transforms)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _matrix_to_numpy(m)


def node_array(node) -> np.ndarray:
    """A view of a volume node's voxels as a (k, j, i) array."""
    data = node.GetImageData()
    nx, ny, nz = data.GetDimensions()
    return numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(nz, ny, nx)


# --- output nodes ---------------------------------------------------------------------------------------------

@dataclass
class OutputNodes:
    heatmap: object = None
    labelmap: object = None
    segmentation: object = None
    table: object = None
    reconstruction: object = None

    def nodes(self) -> Dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def output_name(input_node, role: str) -> str:
    return f"{input_node.GetName()} {ROLES[role][1]}"


def find_outputs(scene, input_node) -> OutputNodes:
    """The nodes an earlier run made from this input (by attribute, never by name alone)."""
    found = OutputNodes()
    for role, (cls, _) in ROLES.items():
        for i in range(scene.GetNumberOfNodesByClass(cls)):
            node = scene.GetNthNodeByClass(i, cls)
            if (node.GetClassName() == cls and node.GetAttribute(ROLE_ATTRIBUTE) == role
                    and node.GetAttribute(SOURCE_ATTRIBUTE) == input_node.GetID()):
                setattr(found, role, node)
    return found


class NodeTransaction:
    """Remembers the nodes it creates; `rollback` removes them, so a failed or cancelled run leaves none behind."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.created: List[object] = []

    def add(self, cls: str, name: str):
        node = self.scene.AddNewNodeByClass(cls, self.scene.GenerateUniqueName(name))
        self.created.append(node)
        return node

    def rollback(self) -> None:
        for node in reversed(self.created):
            remove_node(self.scene, node)
        self.created.clear()


def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes."""
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        return
    extra = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetStorageNode"):
        extra.append(node.GetStorageNode())
    for other in extra:
        if other is not None and scene.GetNodeByID(other.GetID()) is not None:
            scene.RemoveNode(other)
    scene.RemoveNode(node)


@contextlib.contextmanager
def transaction(scene):
    """Nodes created inside are removed again if the block raises (including a cancel)."""
    tx = NodeTransaction(scene)
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise


def prepare_outputs(scene, input_node, tx: NodeTransaction, roles: Sequence[str], reuse: bool = True) -> OutputNodes:
    """Output nodes for `roles`: an earlier run's (when `reuse`), else new ones named after the input and placed
    beside it in the subject hierarchy."""
    outputs = find_outputs(scene, input_node) if reuse else OutputNodes()
    for role in ROLES:
        if role not in roles:
            setattr(outputs, role, None)
            continue
        if getattr(outputs, role) is None:
            cls, _ = ROLES[role]
            node = tx.add(cls, output_name(input_node, role))
            node.SetAttribute(ROLE_ATTRIBUTE, role)
            node.SetAttribute(SOURCE_ATTRIBUTE, input_node.GetID())
            place_beside(scene, node, input_node)
            setattr(outputs, role, node)
    return outputs


def place_beside(scene, node, input_node) -> None:
    """Put an output node under the input's parent item (Slicer makes the items; a bare scene may have none)."""
    sh = scene.GetSubjectHierarchyNode()
    input_item = sh.GetItemByDataNode(input_node) if sh is not None else 0
    if not input_item:
        return
    parent = sh.GetItemParent(input_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


# --- display --------------------------------------------------------------------------------------------------

def hot_colour_node(scene):
    """A hot colour table: Slicer's own when the scene has one, else ours (made once per scene)."""
    for node_id in HOT_COLOUR_IDS:
        node = scene.GetNodeByID(node_id)
        if node is not None:
            return node
    nodes = scene.GetNodesByName(HOT_COLOUR_NAME)
    if nodes.GetNumberOfItems():
        return nodes.GetItemAsObject(0)
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HOT_COLOUR_NAME)
    node.SetTypeToUser()
    n = 256
    node.SetNumberOfColors(n)
    node.SetNamesInitialised(True)
    for i in range(n):
        t = i / (n - 1)  # dark red -> red -> yellow
        node.SetColor(i, f"{t:.3f}", min(1.0, 0.5 + 1.5 * t), max(0.0, 1.5 * (t - 1.0 / 3.0)), 0.0,
                      1.0)
    node.SetAttribute("Category", "BrainAnomaly")
    return node


def _display_node(scene, node):
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node.GetDisplayNode()


def show_heatmap(scene, heatmap, threshold: float, window: Sequence[float], peak: Optional[float] = None) -> None:
    """Hot colours from `window`; voxels below the threshold transparent, so only the finding shows over the scan."""
    display = _display_node(scene, heatmap)
    display.SetAndObserveColorNodeID(hot_colour_node(scene).GetID())
    display.SetAutoWindowLevel(0)
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        hi = lo + 1e-3
    display.SetWindowLevelMinMax(lo, hi)
    set_display_threshold(heatmap, threshold, peak)


def set_display_threshold(heatmap, threshold: float, peak: Optional[float] = None) -> None:
    """Voxels below `threshold` transparent. `peak` (the map's maximum, when known) spares a pass over the map on
    every slider step."""
    display = heatmap.GetDisplayNode()
    display.SetAutoThreshold(0)
    display.SetApplyThreshold(1)
    peak = float(node_array(heatmap).max()) if peak is None else float(peak)
    display.SetThreshold(float(threshold), max(peak, float(threshold)) + 1e6)


def show_in_slice_views(scene, background, foreground, opacity: float) -> None:
    """The scan as background and the heatmap as foreground in every slice view of the scene."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))


def show_label_layer(scene, labelmap) -> None:
    """`labelmap` as the label layer of every slice view, over whatever background and foreground they show."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetLabelVolumeID(labelmap.GetID())


def set_opacity(scene, opacity: float, heatmap=None) -> None:
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if heatmap is None or composite.GetForegroundVolumeID() == heatmap.GetID():
            composite.SetForegroundOpacity(float(opacity))


def jump_to(scene, ras: Sequence[float]) -> None:
    """Centre every slice view on a point (a lesion's centroid)."""
    import slicer

    r, a, s = (float(v) for v in ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


# --- label map, segmentation, table ----------------------------------------------------------------------------

def update_labelmap(scene, labelmap, mask: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    update_node_from_array(labelmap, mask, ijk_to_ras)
    display = _display_node(scene, labelmap)
    labels = scene.GetNodeByID("vtkMRMLColorTableNodeLabels")
    if labels is not None:
        display.SetAndObserveColorNodeID(labels.GetID())


ANOMALY_COLOUR = (1.0, 0.85, 0.1)


def update_segmentation(scene, segmentation, numbered: np.ndarray, ijk_to_ras: np.ndarray, lesions: List[dict],
                        per_lesion: bool) -> None:
    """One "Anomaly" segment, or one segment per lesion named after its row in the table. `numbered` holds each
    lesion's number (its label in `lesions`), 0 elsewhere."""
    import slicer

    seg = segmentation.GetSegmentation()
    seg.RemoveAllSegments()
    converter = slicer.vtkSegmentationConverter
    matrix = _numpy_to_matrix(ijk_to_ras)
    whole = slicer.vtkOrientedImageData()  # the segments' geometry is the whole grid's
    whole.SetExtent(0, numbered.shape[2] - 1, 0, numbered.shape[1] - 1, 0, numbered.shape[0] - 1)
    whole.SetImageToWorldMatrix(matrix)
    seg.SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                               converter.SerializeImageGeometry(whole))
    if not lesions:
        return
    # Segments are made straight from the lesions' bounding box, as one labelmap they share (each segment its
    # label value), in a fraction of the time an import of the whole grid takes, and with no temporary node.
    spans = [np.flatnonzero(numbered.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    (k0, k1), (j0, j1), (i0, i1) = ((int(s[0]), int(s[-1])) for s in spans)
    box = numbered[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
    values = box if per_lesion else (box > 0).view(np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ravel(values), deep=True, array_type=numpy_support.get_vtk_array_type(values.dtype)))
    image.SetImageToWorldMatrix(matrix)
    labels = sorted(les["label"] for les in lesions) if per_lesion else [1]
    for number in labels:
        segment = slicer.vtkSegment()
        if per_lesion:
            segment.SetName(f"Lesion {number}")
            segment.SetColor(*_hsv_to_rgb((0.61803 * number) % 1.0, 0.8, 1.0))
        else:
            segment.SetName("Anomaly")
            segment.SetColor(*ANOMALY_COLOUR)
        segment.SetLabelValue(int(number))
        segment.AddRepresentation(converter.GetBinaryLabelmapRepresentationName(), image)
        seg.AddSegment(segment)
    display = _display_node(scene, segmentation)
    # Outlines only in 2D, so the heatmap under them stays visible.
    display.SetOpacity2DFill(0.0)
    display.SetOpacity2DOutline(1.0)


def _hsv_to_rgb(h: float, s: float, v: float):
    import colorsys

    return colorsys.hsv_to_rgb(h, s, v)


def update_table(table, lesions: List[dict]) -> None:
    """The lesion table with the columns every BrainAnomaly front end writes (lesions.csv)."""
    # Imported here: the module must load before its Python dependencies are installed.
    from BrainAnomalyLib.detection.postprocess import INTEGER_COLUMNS, LESION_COLUMN_NAMES, lesion_row

    t = table.GetTable()
    t.Initialize()
    rows = [lesion_row(les) for les in lesions]
    for c, name in enumerate(LESION_COLUMN_NAMES):
        column = vtk.vtkIntArray() if name in INTEGER_COLUMNS else vtk.vtkDoubleArray()
        column.SetName(name)
        for row in rows:
            # a finding's healthy rate is empty at a plain voxel threshold
            column.InsertNextValue(float("nan") if row[c] is None else row[c])
        t.AddColumn(column)
    table.SetUseColumnTitleAsColumnHeader(True)
    table.SetLocked(True)
    table.Modified()


def lesion_position(table, row: int) -> Optional[List[float]]:
    """The RAS centroid in a lesion table row (None for a row out of range)."""
    t = table.GetTable()
    if row < 0 or row >= t.GetNumberOfRows():
        return None
    return [float(t.GetValueByName(row, axis).ToDouble()) for axis in ("centroid_r", "centroid_a", "centroid_s")]


def output_volume_ids(scene) -> List[str]:
    """IDs of the volumes this module made (heatmaps, label maps, pseudo-healthy images): hidden from the input
    selector, so a run is never started on an earlier run's output."""
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLVolumeNode")
        if node.GetAttribute(ROLE_ATTRIBUTE):
            out.append(node.GetID())
    return out
