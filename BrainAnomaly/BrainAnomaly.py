"""Brain Anomaly: unsupervised anomaly detection in brain MRI, as a 3D Slicer module.

This file is what Slicer loads at start-up, so it holds only the module's description, the widget shell and the
self-test hook. The panel is BrainAnomalySlicer.widget (imported when the module is first opened), the logic
BrainAnomalySlicer.widget.BrainAnomalyLogic on BrainAnomalySlicer.logic.DetectionLogic (no GUI), and inference runs
in a worker process, so neither torch nor the inference library is imported into Slicer; the Python packages
inference needs are installed on the first detection.
"""

import os
import sys
import unittest

import qt

from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)

_HERE = os.path.dirname(os.path.abspath(__file__))
# Installed, BrainAnomalySlicer and BrainAnomalyLib sit beside this file (qt-scripted-modules); in the source tree
# BrainAnomalySlicer is beside it and BrainAnomalyLib one folder up.
for _folder in (_HERE, os.path.dirname(_HERE)):
    if _folder not in sys.path and any(os.path.isfile(os.path.join(_folder, package, "__init__.py"))
                                       for package in ("BrainAnomalySlicer", "BrainAnomalyLib")):
        sys.path.insert(0, _folder)

TITLE = "Brain Anomaly"


class BrainAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = TITLE
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainAnomaly developers (BrainAnomaly project)"]
        self.parent.helpText = (
            "Unsupervised anomaly detection in brain MRI. A model of healthy brains flags what it cannot explain: "
            "a heatmap over the scan, a label map, a segmentation and a table of lesions (click a row to jump to it). "
            "For models calibrated for findings the threshold slider is in false findings per healthy scan (how many "
            "findings a healthy scan would get; each finding's healthy rate is in the table, rarest first); tick "
            "'Voxel threshold' for the healthy voxel false-positive rate instead (the only unit for other models). "
            "Moving it re-thresholds without running the model again. "
            "Inference runs in a separate process and can be cancelled. Research use only, not for diagnosis.")
        self.parent.acknowledgementText = (
            "Uses the MNI152 2009a template shipped with nilearn, deepbet for skull stripping, SimpleITK for N4 and "
            "registration, and PyTorch (through the PyTorch extension). The shipped models were trained on the IXI "
            "data set (brain-development.org).")
        for resources in (os.path.join(_HERE, "Resources"), os.path.join(os.path.dirname(_HERE), "Resources")):
            icon = os.path.join(resources, "Icons", "BrainAnomaly.png")
            if os.path.isfile(icon):  # Slicer finds it itself when installed; the source tree keeps it one level up
                self.parent.icon = qt.QIcon(icon)
                break


class BrainAnomalyWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from BrainAnomalySlicer.widget import BrainAnomalyWidgetBody

        self.body = BrainAnomalyWidgetBody(self.layout, lambda: self.parent.isEntered)
        self.body.setup()
        self.logic = self.body.logic  # what slicer.util.getModuleLogic("BrainAnomaly") returns

    def enter(self):
        self.body.enter()

    def exit(self):
        self.body.exit()

    def cleanup(self):
        self.body.cleanup()


class BrainAnomalyTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): the GUI-free checks of BrainAnomalySlicer.selftest."""

    def runTest(self):
        from BrainAnomalySlicer import selftest

        result = unittest.TextTestRunner(verbosity=2).run(
            unittest.defaultTestLoader.loadTestsFromTestCase(selftest.DetectionSelfTest))
        self.assertTrue(result.wasSuccessful(), f"{len(result.failures)} failed, {len(result.errors)} errors")
