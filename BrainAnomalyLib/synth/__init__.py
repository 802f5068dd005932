"""Seeded synthetic anomalies with exact ground-truth masks, for benchmarking scorers offline.

Lesions (textured blobs, tumour with mass effect, MS, stroke) follow per-contrast appearance rules relative to
the scan's own tissue statistics; artefacts (bias, ghosting, motion) change the whole image and have empty masks.
"""

from .appearance import RULES, TissueStats, target, tissue_stats
from .artefacts import ARTEFACT_KINDS
from .cohort import make_cohort
from .generate import KINDS, LESION_KINDS, SynthCase, displacement_image, synthesize
from .lesions import warp
from .noise import fractal_noise
from .tissue import Geometry, TissueMaps

__all__ = ["ARTEFACT_KINDS", "Geometry", "KINDS", "LESION_KINDS", "RULES", "SynthCase", "TissueMaps",
           "TissueStats", "displacement_image", "fractal_noise", "make_cohort", "synthesize", "target",
           "tissue_stats", "warp"]
