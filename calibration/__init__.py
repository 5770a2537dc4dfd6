"""The default calibration corpus (data files only; see MANIFEST.json)."""
