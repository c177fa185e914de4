"""The imatrix stage: the importance matrix of the source with the calibration text (stage.py)."""
