"""tbps_compress: text-based person search with a TBPS-CLIP teacher and compressed students."""

__version__ = "0.1.0"
