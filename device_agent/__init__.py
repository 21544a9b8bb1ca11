"""Device agent: runs a verified bundle with its own runtime, no torch."""
