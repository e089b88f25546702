"""Device names, checked without importing torch: commands refuse a bad ``--device`` before loading anything.

Accepted: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` and ``cuda:N`` (N a GPU index). Whether
CUDA is actually available is checked by :func:`resolve_device`, which imports torch when called.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch

__all__ = ["check_device", "resolve_device"]

_CUDA_INDEX = re.compile(r"cuda:[0-9]+")


def check_device(name: str, *, flag: str = "--device", allow_auto: bool = True) -> str:
    """Return ``name`` when it is a device this package runs on, else raise one :class:`UserError` line naming
    ``flag`` and listing the accepted names (``auto`` only with ``allow_auto``)."""
    text = str(name)
    if text in ("cpu", "cuda") or (allow_auto and text == "auto") or _CUDA_INDEX.fullmatch(text):
        return text
    choices = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
    raise UserError(f"{flag} {text!r}: not a device; choose {choices} (N: a GPU index, e.g. cuda:0)")


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name`` (checked by :func:`check_device`): ``auto`` is CUDA when available, else the
    CPU; an explicit CUDA device without CUDA is a :class:`ConfigError`."""
    import torch

    check_device(name, flag="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but CUDA is not available; use device: cpu or auto")
    return dev
