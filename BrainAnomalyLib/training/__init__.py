"""Training models from a healthy cohort: splits, fitting, calibration on held-out scans, reports."""
