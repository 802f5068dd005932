"""The names of the synthetic anomalies, apart from the code that makes them: the command line lists them without
importing scipy and the generators (see the package's lazy attributes)."""

LESION_KINDS = ["blob-hyper", "blob-hypo", "blob-iso", "tumour", "ms", "stroke"]
ARTEFACT_KINDS = ["artefact-bias", "artefact-ghosting", "artefact-motion"]
KINDS = LESION_KINDS + ARTEFACT_KINDS
