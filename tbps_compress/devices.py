"""Device names, checked without importing torch: commands refuse a bad ``--device`` before loading anything.

Accepted: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` and ``cuda:N`` (N a GPU index). Whether
CUDA is actually available is the business of :func:`tbps_compress.engine.train.resolve_device`, which needs torch.
"""

from __future__ import annotations

import re

from .errors import UserError

__all__ = ["check_device"]

_CUDA_INDEX = re.compile(r"cuda:[0-9]+")


def check_device(name: str, *, flag: str = "--device", allow_auto: bool = True) -> str:
    """Return ``name`` when it is a device this package runs on, else raise one :class:`UserError` line naming
    ``flag`` and listing the accepted names (``auto`` only with ``allow_auto``)."""
    text = str(name)
    if text in ("cpu", "cuda") or (allow_auto and text == "auto") or _CUDA_INDEX.fullmatch(text):
        return text
    choices = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
    raise UserError(f"{flag} {text!r}: not a device; choose {choices} (N: a GPU index, e.g. cuda:0)")
