"""Calibration: score <-> healthy false-positive rate, the scan-adaptive move and the labelled refinement."""
