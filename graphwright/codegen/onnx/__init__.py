"""ONNX backend: translations of graphwright's ops to standard ONNX and the exporter.

``translations.py`` holds the registry; each other module here registers the lowering of one op
(or family) and is discovered automatically. ``export.py`` writes the artifact.
"""
