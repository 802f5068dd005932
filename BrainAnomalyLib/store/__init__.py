"""Model folders, the registry, importing and the preprocessing cache."""
