"""BrainAnomaly: unsupervised anomaly detection in brain MRI (library part, no Qt, no Slicer)."""

__version__ = "0.1.0"
