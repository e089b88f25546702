"""Evaluation of a PyTorch model lives in :mod:`tbps_compress.retrieval.encoders` (:class:`TorchEncoder`,
:func:`evaluate`); this module keeps the name ``_normalize`` (uint8 images to the model input) for its importers."""

from __future__ import annotations

from ..retrieval.encoders import normalize_pixels as _normalize

__all__ = ["_normalize"]
