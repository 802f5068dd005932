"""Core: I/O, errors and exit codes, progress and cancel, the Result, devices, the template, manifests and files."""
