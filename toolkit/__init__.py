# FaceCL: large-scale face-recognition training toolkit (package root).
"""FaceCL: recipes -> config -> builders -> trainer for face-recognition embedding models."""

__version__ = "0.1.0"
