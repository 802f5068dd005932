"""The module's logic with a fusion model: the input volume and the session's other contrasts exported, fused by
the real worker process, the outputs in the scene with the input volume (real MRML through slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="the slicer-core wheel is part of requirements.txt")

from BrainAnomalySlicer import nodes  # noqa: E402
from BrainAnomalySlicer.logic import DetectionError, DetectionLogic, DetectionOptions  # noqa: E402
from test_fusion import fusion_folder, session  # noqa: E402,F401  (fixtures)


def _node(scene, path, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    nodes.update_node_from_image(node, sitk.ReadImage(str(path)))
    return node


def _options(folder, modality):
    return DetectionOptions(model=str(folder), modality=modality, device="cpu", skull_strip="none",
                            bias_correction=False, registration=False)


def test_logic_fuses_the_input_with_the_other_contrasts(mrml_scene, session, fusion_folder):  # noqa: F811
    _, paths, lesion = session
    t2, flair = _node(mrml_scene, paths["T2"], "t2"), _node(mrml_scene, paths["FLAIR"], "flair")
    logic = DetectionLogic(mrml_scene)
    out = logic.detect(t2, _options(fusion_folder, "T2"), others={"FLAIR": flair})
    assert out.heatmap.GetImageData().GetDimensions() == t2.GetImageData().GetDimensions()
    summary = logic.state(out)
    assert summary["modality"] == "T2+FLAIR"
    assert summary["input"] == "T2=input.nrrd FLAIR=input-FLAIR.nrrd"
    labels = nodes.node_array(out.labelmap) > 0
    assert labels[lesion].mean() > 0.5
    assert logic.outputs_for(t2).heatmap is out.heatmap  # the results go with the input volume


def test_logic_wants_the_reference_contrast_as_the_input(mrml_scene, session, fusion_folder):  # noqa: F811
    _, paths, _ = session
    t2, flair = _node(mrml_scene, paths["T2"], "t2"), _node(mrml_scene, paths["FLAIR"], "flair")
    with pytest.raises(DetectionError, match="select the T1 volume as the input"):
        DetectionLogic(mrml_scene).start(flair, _options(fusion_folder, "FLAIR"), others={"T1": t2})
    assert np.all(nodes.node_array(flair) == sitk.GetArrayFromImage(sitk.ReadImage(paths["FLAIR"])))
