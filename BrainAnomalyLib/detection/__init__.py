"""Detection: the one path from a volume to a Result (pipeline), post-processing, the lesion table and writing."""
