"""Seeded synthetic anomalies with exact ground-truth masks, for benchmarking scorers offline.

Lesions (textured blobs, tumour with mass effect, MS, stroke) follow per-contrast appearance rules relative to
the scan's own tissue statistics; artefacts (bias, ghosting, motion) change the whole image and have empty masks.

The names below are imported on first use (PEP 562), so `synth.kinds` (what the command line lists) comes without
scipy and the generators.
"""

import importlib

_HOME = {"RULES": "appearance", "TissueStats": "appearance", "target": "appearance", "tissue_stats": "appearance",
         "make_cohort": "cohort", "cohort_key": "cohort", "kept_cohort": "cohort", "maker_digest": "cohort",
         "SynthCase": "generate", "displacement_image": "generate",
         "synthesize": "generate", "warp": "lesions", "fractal_noise": "noise", "Geometry": "tissue",
         "TissueMaps": "tissue", "KINDS": "kinds", "LESION_KINDS": "kinds", "ARTEFACT_KINDS": "kinds"}

__all__ = sorted(_HOME)


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
