"""Cloud toolchain: train, compress, export, build and verify edge bundles.

This package's top level stays import-light (no torch) so that the device side
can use `edgecore.errors` without pulling in the training stack.
"""

__version__ = "0.1.0"
