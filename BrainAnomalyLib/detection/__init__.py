"""Detection: the one path from a volume (or a session's contrasts, fusion) to a Result, post-processing, the lesion
table and writing."""

from . import fusion  # noqa: F401  (importing registers the fusion detector in pipeline.DETECTORS)
