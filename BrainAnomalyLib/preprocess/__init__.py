"""Preprocessing steps; each is optional, timed and recorded, and none loses the way back to the input grid."""
