"""Data files shipped inside the package (read with importlib.resources; see README.md here for provenance)."""
