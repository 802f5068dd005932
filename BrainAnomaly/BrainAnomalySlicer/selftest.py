"""The module's self-test, run inside Slicer by BrainAnomaly.BrainAnomalyTest (Reload and Test, or ctest through
slicer_add_python_unittest): the shipped default model on a synthetic scan with a known lesion, through the logic
on Slicer's own scene. Needs the Python packages inference uses; they are installed first if missing."""

import logging
import unittest

import vtk

import slicer

from .widget import BrainAnomalyLogic


class DetectionSelfTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def delayDisplay(self, message):
        logging.info(message)
        slicer.app.processEvents()

    def test_detection_on_demo_case(self):
        import numpy as np
        import SimpleITK as sitk

        from BrainAnomalySlicer import nodes, panel
        from BrainAnomalySlicer.dependencies import ensure_dependencies, slicer_installers
        from BrainAnomalySlicer.logic import DetectionError, DetectionOptions

        self.delayDisplay("Checking Python packages (installed on first use)")
        self.assertTrue(ensure_dependencies(logging.info, None, *slicer_installers()))
        from BrainAnomalyLib.synth.demo import make_demo_case

        scan, truth = make_demo_case()
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "BrainAnomalyDemo")
        nodes.update_node_from_image(volume, scan)
        # A user's node with an output's name: never to be touched.
        users = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", nodes.output_name(volume, "heatmap"))
        logic = BrainAnomalyLogic()

        self.delayDisplay("Detecting with the shipped default model")
        outputs = logic.detect(volume, DetectionOptions())
        self.assertNotEqual(outputs.heatmap.GetID(), users.GetID())
        self.assertIsNone(users.GetImageData())
        self.assertEqual(outputs.heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        outputs.heatmap.GetIJKToRASMatrix(a)
        volume.GetIJKToRASMatrix(b)
        self.assertTrue(all(abs(a.GetElement(r, c) - b.GetElement(r, c)) < 1e-4 for r in range(4) for c in range(4)))
        labels = nodes.node_array(outputs.labelmap) > 0
        self.assertTrue(labels.any(), "the label map is empty")
        self.assertTrue((labels & (sitk.GetArrayFromImage(truth) > 0)).any(), "no flagged voxel is in the lesion")
        self.assertGreater(outputs.table.GetNumberOfRows(), 0)
        self.assertGreater(outputs.segmentation.GetSegmentation().GetNumberOfSegments(), 0)

        self.delayDisplay("Re-thresholding without running the model")
        heat = nodes.node_array(outputs.heatmap).copy()
        logic.start = lambda *args, **kwargs: self.fail("re-thresholding started a model run")
        try:
            if panel.threshold_unit(logic.state(outputs), False) == panel.FINDINGS:
                # A default model calibrated for findings: the slider in false findings per healthy scan.
                reported = []
                for target in (0.1, 5.0):
                    rates = [les["healthy_rate"] for les in logic.apply_threshold(outputs, false_findings=target)[
                        "lesions"]]
                    self.assertTrue(all(r <= target for r in rates) and rates == sorted(rates), rates)
                    reported.append(len(rates))
                self.assertLessEqual(reported[0], reported[1], "more false findings allowed should report more")
            else:  # calibrated before findings were: only the voxel threshold
                with self.assertRaises(DetectionError):
                    logic.apply_threshold(outputs, false_findings=0.5)
            counts = []
            for fpr in (0.001, 0.1):
                logic.apply_threshold(outputs, fpr=fpr)
                counts.append(int((nodes.node_array(outputs.labelmap) > 0).sum()))
                self.assertAlmostEqual(logic.state(outputs)["fpr"], fpr)
        finally:
            del logic.start
        self.assertLess(counts[0], counts[1], "a stricter FPR should flag fewer voxels")
        self.assertTrue(np.array_equal(heat, nodes.node_array(outputs.heatmap)))

        self.delayDisplay("Running again: the outputs are reused, or new ones made on request")
        ids = {role: node.GetID() for role, node in outputs.nodes().items()}
        again = logic.detect(volume, DetectionOptions())
        self.assertEqual({role: node.GetID() for role, node in again.nodes().items()}, ids)
        fresh = logic.detect(volume, DetectionOptions(reuse_outputs=False))
        self.assertTrue(all(node.GetID() != ids[role] for role, node in fresh.nodes().items()))
        self.assertTrue(all(slicer.mrmlScene.GetNodeByID(i) is not None for i in ids.values()))
        self.delayDisplay("Test passed")
