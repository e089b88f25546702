"""Error types.

``UserError`` is for problems the user can fix (bad recipe, missing file, corrupt artifact). The CLI turns it
into a single line on stderr and exit code 2, without a traceback. Messages should name the file, field or key,
say what was wrong and how to fix it.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


class ConfigError(UserError):
    """A recipe or configuration value is invalid."""


class DataError(UserError):
    """A dataset file or entry is malformed."""


class ArtifactError(UserError):
    """An artifact folder is missing, incomplete or corrupt."""


class CheckpointError(UserError):
    """A checkpoint file cannot be loaded into the requested architecture."""


class ParityError(UserError):
    """An exported or quantised model disagrees with its reference beyond tolerance."""

    def __init__(self, message: str, diffs: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.diffs = dict(diffs or {})


def where(path: str | Path, detail: str | None = None) -> str:
    """Format a location prefix such as ``data/reid_raw.json: entry 3, field 'captions'``."""
    text = str(path)
    return f"{text}: {detail}" if detail else text
