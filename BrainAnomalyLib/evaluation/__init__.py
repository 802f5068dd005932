"""Evaluation: voxel, lesion and scan-level metrics on the same outputs `detect` produces."""
