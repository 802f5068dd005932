"""BrainAnomaly scripted module for 3D Slicer.

Placeholder until the Slicer panel is built (see the project's issue on the Slicer module): it registers the
module so the extension builds and loads; detection runs today through the `brainanomaly` CLI, whose library
(BrainAnomalyLib) the panel will call.
"""

from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class BrainAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainAnomaly"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["BrainAnomaly developers"]
        self.parent.helpText = ("Unsupervised anomaly detection in brain MRI. The panel is not built yet; use the "
                                "brainanomaly command line meanwhile.")
        self.parent.acknowledgementText = ("Uses the MNI152 2009a template shipped with nilearn and deepbet for "
                                           "skull stripping.")
