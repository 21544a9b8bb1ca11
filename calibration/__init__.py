"""Calibration: representative sets for INT8, confidence calibration, routing thresholds.

Torch-free at import: `calibration.confidence` runs on devices.
"""
