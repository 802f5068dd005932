"""Detection: the one path from a volume (or a session's contrasts, fusion) to a Result, post-processing, the lesion
table and writing."""

# Importing fusion registers the fusion detector in pipeline.DETECTORS. A training-only host (the GPU image
# scripts/gpu_train.sh runs on) has torch but not SimpleITK; `train` imports detection.request for its options and
# must start there, while anything that detects imports SimpleITK itself and fails with the real cause.
try:
    from . import fusion  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != "SimpleITK":
        raise
