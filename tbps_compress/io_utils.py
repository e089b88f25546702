"""Safe outputs and image inputs, shared by every command.

Outputs: files (``eval --out metrics.json``, ``synth --preview sheet.png``, ``search --sheet``), result folders
(``bench --out``) and artifact folders (:func:`tbps_compress.artifacts.write_artifact` is built on
:func:`atomic_folder`).

- Checked before any work (:func:`check_output_file`, :func:`check_output_folder`): an existing target is refused
  unless ``force``; a folder where a file is wanted, or anything but a folder where a folder is wanted, is refused
  even with ``force`` (it is never deleted); so is a location that cannot be created or written. Each refusal is
  one :class:`~tbps_compress.errors.UserError` line naming the path and the flag.
- Written under a hidden temporary sibling ``.NAME.tmp-PID-RANDOM`` and renamed onto ``NAME`` once complete
  (:func:`atomic_file`, :func:`write_text_atomic`, :func:`atomic_folder`): a crash or a full disk never leaves a
  half-written output, and the previous output stays as it was. A full disk, a quota, a read-only or forbidden
  location is one line (:data:`WRITE_ERRNOS`). Temporaries of a killed writer (its PID gone) are removed by the next
  writer of the same name; nothing else is deleted but the output that ``force`` replaces.
- Given the permissions the user's umask asks for (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders):
  ``tempfile`` creates its files 0600 and its folders 0700, which would otherwise stay.

Inputs: :func:`open_image_rgb` decodes an image file; any failure (a corrupt or truncated file, a decompression
bomb, which Pillow raises as ``Image.DecompressionBombError``, not an ``OSError``) is one
:class:`~tbps_compress.errors.DataError` line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError, UserError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "WRITE_ERRNOS",
    "apply_umask_modes",
    "atomic_file",
    "atomic_folder",
    "check_output_file",
    "check_output_folder",
    "current_umask",
    "open_image_rgb",
    "remove_stale_temporaries",
    "write_text_atomic",
]

# Errors of the output location (disk full, quota, read-only, permissions): reported as one-line UserErrors.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
# File name endings an image output (contact sheet, plot) may have: Pillow and matplotlib write all of them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_STEM_MAX = 100  # characters of the output's name kept in its temporaries' names (NAME_MAX is 255 bytes)


# ------------------------------------------------------------------------------------------------ permissions
def current_umask() -> int:
    """The process umask, read without changing it where the system allows (``/proc/self/status`` on Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(root: Path) -> None:
    """Give ``root`` (a file, or a folder and everything in it) the modes a plain ``open`` / ``mkdir`` would have
    given under the current umask. Symbolic links are left alone."""
    root = Path(root)
    umask = current_umask()
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    if root.is_symlink():
        return
    if not root.is_dir():
        os.chmod(root, file_mode)
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):  # contents before their folder
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode)
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dir_mode)
    os.chmod(root, dir_mode)


# ------------------------------------------------------------------------------------------------ checks
def _stem(path: Path) -> str:
    return path.name[:_STEM_MAX]


def _check_location(path: Path, flag: str, *, make_parents: bool) -> None:
    """The folder that is to hold ``path`` is a writable folder (or, with ``make_parents``, can be created)."""
    parent = path.parent
    probe = parent
    while not probe.exists():
        if probe.is_symlink():
            raise UserError(f"{path}: cannot be created: {probe} is a broken symbolic link; choose another {flag}")
        if not make_parents:
            raise UserError(f"{path}: folder {parent} does not exist; create it or choose another {flag}")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{path}: cannot be created: {probe} is not a folder; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be written: folder {probe} is not writable; choose a writable {flag}")


def check_output_file(path: Path, *, force: bool, flag: str = "--out", suffixes: Sequence[str] | None = None,
                      example: str = "metrics.json", make_parents: bool = False) -> Path:
    """Refuse, before any work, an output file that cannot or must not be written.

    Refused: a name without one of ``suffixes`` (when given), a folder or other non-file at ``path`` (even with
    ``force``), an existing file without ``force``, a missing parent folder (unless ``make_parents``: then the
    nearest existing ancestor must be a folder) and an unwritable one. Returns ``path``."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        got = f"'{path.suffix}'" if path.suffix else "none"
        raise UserError(f"{path}: {flag} needs an image file name ending in {', '.join(suffixes)} (extension: "
                        f"{got}); use e.g. {path.parent / (path.stem + suffixes[0])}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a file; give {flag} a file path such as {path / example}")
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: exists and is not a regular file; choose another {flag}")
    if (path.exists() or path.is_symlink()) and not force:
        raise UserError(f"{path}: file already exists; choose another {flag} or pass --force to replace it")
    _check_location(path, flag, make_parents=make_parents)
    return path


def _is_empty_dir(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def check_output_folder(out: Path, *, force: bool, flag: str = "--out", owned: Collection[str] | None = None) -> Path:
    """Refuse, before any work, an output folder that cannot or must not be written: anything but a folder at
    ``out`` (even with ``force``), an existing non-empty folder without ``force`` (with ``force`` too when
    ``owned`` is given and the folder holds an entry not named in it: ``force`` then replaces only an earlier
    output of the same command), and a location whose nearest existing ancestor is not a writable folder (missing
    parents are created when writing). An empty folder is accepted (e.g. made by a job scheduler). Returns
    ``out``."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another {flag} (it is not replaced, even with "
                        "--force)")
    if out.is_dir() and not _is_empty_dir(out):
        if not force:
            raise UserError(f"{out}: output already exists; choose another {flag} or pass --force to replace it")
        if owned is not None:
            foreign = sorted(p.name for p in out.iterdir() if p.name not in owned or p.is_dir())
            if foreign:
                raise UserError(f"{out}: holds files it was not written with (e.g. {foreign[0]}); --force replaces "
                                f"only a folder holding {', '.join(sorted(owned))}; move them away or choose "
                                f"another {flag}")
    _check_location(out, flag, make_parents=True)
    return out


# ------------------------------------------------------------------------------------------------ writing
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` siblings of ``out`` left by a killed writer (PID gone)."""
    out = Path(out)
    stem = _stem(out)
    for p in out.parent.glob(f".{glob.escape(stem)}.*"):
        rest = p.name[len(stem) + 2:]
        kind, _, tail = rest.partition("-")
        pid = tail.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted writer", p)
            _remove(p)


def _remove(p: Path) -> None:
    """Remove a temporary this module made (a file, a link or a folder tree), ignoring errors."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def _make_parents(folder: Path, target: Path, flag: str) -> list[Path]:
    """Create ``folder`` and its missing ancestors; return those created (outermost first)."""
    missing = []
    probe = folder
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    created = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_created(created)
            raise UserError(f"{target}: cannot create the folder {p} ({exc.strerror or exc}); choose another "
                            f"{flag}") from exc
        created.append(p)
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove folders this writer created for its output, innermost first, when they are still empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            return


def _write_error(target: Path, exc: OSError, flag: str, tmp: Path, *, existed: bool, kind: str) -> UserError:
    what = ""
    if exc.filename:
        name = str(exc.filename)
        if name == str(tmp) or name.startswith(str(tmp) + os.sep):  # the hidden temporary: name the output instead
            name = str(target) + name[len(str(tmp)):]
        what = f"{name}: " if name != str(target) else ""
    kept = f"the previous {kind} is unchanged" if existed else f"no partial {kind} was left"
    return UserError(f"{target}: not written ({what}{exc.strerror or exc}); {kept}; free space or choose a "
                     f"writable {flag}")


@contextlib.contextmanager
def atomic_file(path: Path, *, force: bool, flag: str = "--out", suffixes: Sequence[str] | None = None,
                make_parents: bool = False) -> Iterator[Path]:
    """Yield a temporary path (same folder, same extension) to write the whole file to; on success it gets the
    umask's mode and is renamed onto ``path``. On any error it is removed and ``path`` is left as it was; a full
    disk or an unwritable location becomes one :class:`UserError` line. ``path`` is checked as
    :func:`check_output_file` does."""
    path = Path(path)
    check_output_file(path, force=force, flag=flag, suffixes=suffixes, make_parents=make_parents)
    existed = path.exists()
    created = _make_parents(path.parent, path, flag) if make_parents else []
    remove_stale_temporaries(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{_stem(path)}.tmp-{os.getpid()}-", suffix=path.suffix,
                                    dir=path.parent)
        os.close(fd)
    except OSError as exc:
        _remove_created(created)
        raise UserError(f"{path}: cannot write in {path.parent} ({exc.strerror or exc}); choose a writable "
                        f"{flag}") from exc
    tmp = Path(name)
    try:
        yield tmp
        apply_umask_modes(tmp)
        if not force and (path.exists() or path.is_symlink()):  # appeared while the work ran
            raise UserError(f"{path}: file already exists; choose another {flag} or pass --force to replace it")
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        _remove_created(created)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise _write_error(path, exc, flag, tmp, existed=existed, kind="file") from exc
        raise


def write_text_atomic(path: Path, text: str, *, force: bool, flag: str = "--out") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`; returns ``path``."""
    with atomic_file(path, force=force, flag=flag) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_folder(out: Path, *, force: bool, flag: str = "--out", owned: Collection[str] | None = None
                  ) -> Iterator[Path]:
    """Yield a temporary folder (a hidden sibling of ``out``) to fill; on success it gets the umask's modes and
    is renamed onto ``out``, replacing an existing folder only with ``force``. On any error it is removed, and so
    are the parent folders made for it; ``out`` is left as it was. A full disk or an unwritable location becomes
    one :class:`UserError` line. ``out`` is checked as :func:`check_output_folder` does (``owned``: see there)."""
    out = Path(out)
    check_output_folder(out, force=force, flag=flag, owned=owned)
    created = _make_parents(out.parent, out, flag)
    remove_stale_temporaries(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        _remove_created(created)
        raise UserError(f"{out.parent}: cannot write the output folder ({exc.strerror or exc}); choose a writable "
                        f"{flag}") from exc
    existed = out.is_dir() and not _is_empty_dir(out)
    try:
        yield tmp
        apply_umask_modes(tmp)
        if out.exists() or out.is_symlink():
            if not out.is_dir() or not _is_empty_dir(out):  # checked again: it may have changed meanwhile
                check_output_folder(out, force=force, flag=flag, owned=owned)
            trash = out.parent / f".{_stem(out)}.old-{os.getpid()}"
            os.replace(out, trash)
            try:
                os.replace(tmp, out)
            except BaseException:
                try:
                    os.replace(trash, out)
                except OSError as exc:
                    raise UserError(f"{out}: not written, and the previous folder could not be put back "
                                    f"({exc.strerror or exc}); it is at {trash}: rename it to {out}") from exc
                raise
            _remove(trash)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        _remove(tmp)
        _remove_created(created)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise _write_error(out, exc, flag, tmp, existed=existed, kind="folder") from exc
        raise


# ------------------------------------------------------------------------------------------------ images
def open_image_rgb(path: str | Path) -> Image.Image:
    """Decode the image file at ``path`` into an RGB ``PIL.Image``; any failure is one :class:`DataError` line
    naming the file (Pillow raises many types: ``OSError``, ``SyntaxError``, ``ValueError``, and
    ``DecompressionBombError`` for images over twice ``PIL.Image.MAX_IMAGE_PIXELS``)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        detail = " ".join(str(exc).split()).rstrip(".")
        raise DataError(f"{path}: cannot read image: refused as a possible decompression bomb ({detail}); shrink "
                        "or remove the file") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as any of several exception types
        detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        raise DataError(f"{path}: cannot read image ({detail}); fix or remove the file") from exc
