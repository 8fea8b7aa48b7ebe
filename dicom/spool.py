"""Pure helpers for the on-disk instance spool.

The spool stores every received instance at
``<spool_root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Paths are
built only from UIDs that match ``^[0-9]+(\\.[0-9]+)*$`` (at most 64 characters), never
from any other attribute, so a hostile dataset cannot escape the spool directory.

Writes are durable: the data goes to a temporary file in the destination directory, is
flushed and fsync'ed, renamed over the final name with :func:`os.replace`, and the
directory (and any directory created on the way) is fsync'ed too. A crash therefore leaves
either the complete old file, the complete new file, or a stray ``*.tmp`` file that
:func:`remove_temp_files` cleans up.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TEMP_SUFFIX",
    "UID_PATTERN",
    "durable_write",
    "durable_write_bytes",
    "free_bytes",
    "fsync_dir",
    "instance_path",
    "is_valid_uid",
    "iter_temp_files",
    "remove_temp_files",
]

log = logging.getLogger(__name__)

#: Regular expression a UID must match to be used in a path.
UID_PATTERN: re.Pattern[str] = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Maximum UID length (PS3.5 section 9).
MAX_UID_LENGTH = 64
#: Suffix of temporary files written by :func:`durable_write`.
TEMP_SUFFIX = ".tmp"


def is_valid_uid(value: object) -> bool:
    """Return whether `value` is a UID that may be used to build a path.

    Parameters
    ----------
    value : object
        Candidate UID. Anything that is not a :class:`str` is invalid.

    Returns
    -------
    bool
        ``True`` if `value` matches ``^[0-9]+(\\.[0-9]+)*$`` and is at most 64 characters.
    """
    if not isinstance(value, str):
        return False
    return 0 < len(value) <= MAX_UID_LENGTH and UID_PATTERN.fullmatch(value) is not None


def instance_path(spool_root: Path | str, study: str, series: str, sop: str) -> Path:
    """Return the spool path of an instance: ``<root>/<study>/<series>/<sop>.dcm``.

    Parameters
    ----------
    spool_root : pathlib.Path or str
        Root directory of the spool.
    study, series, sop : str
        Study Instance UID, Series Instance UID and SOP Instance UID.

    Returns
    -------
    pathlib.Path
        The path (not created).

    Raises
    ------
    ValueError
        If any UID is not valid; the message names the offending attribute.
    """
    for name, value in (
        ("StudyInstanceUID", study),
        ("SeriesInstanceUID", series),
        ("SOPInstanceUID", sop),
    ):
        if not is_valid_uid(value):
            raise ValueError(
                f"{name} {value!r} is not a valid UID (must match "
                f"{UID_PATTERN.pattern} and be at most {MAX_UID_LENGTH} characters)"
            )
    return Path(spool_root) / study / series / f"{sop}.dcm"


def _fdatasync(fd: int) -> None:
    """Flush file data and the metadata needed to read it back (size, blocks)."""
    sync = getattr(os, "fdatasync", None)
    if sync is None:  # pragma: no cover - macOS/Windows
        os.fsync(fd)
    else:
        sync(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(directory: Path) -> None:
    """Create `directory` and its missing parents, fsync'ing every parent that changed."""
    if directory.is_dir():
        return
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        parent = current.parent
        if parent == current:
            break
        current = parent
    directory.mkdir(parents=True, exist_ok=True)
    # Every directory that received a new entry: the parents of the created ones.
    for created in reversed(missing):
        fsync_dir(created.parent)
    fsync_dir(directory)


_TEMP_COUNTER = itertools.count()


def _create_temp(directory: Path, name: str) -> tuple[int, str]:
    """Create a new, exclusive temporary file next to `name` (cheaper than mkstemp).

    The name is unique per process, thread and call; a leftover of that name (from a
    crashed process with the same PID) makes it fall back to :func:`tempfile.mkstemp`.
    """
    tmp_name = os.path.join(
        directory,
        f".{name}.{os.getpid()}-{threading.get_ident()}-{next(_TEMP_COUNTER)}{TEMP_SUFFIX}",
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(tmp_name, flags, 0o600), tmp_name
    except FileExistsError:
        return tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=directory)


def durable_write(path: Path | str, write_fn: Callable[[BinaryIO], object]) -> Path:
    """Durably write a file: temp file, write, flush, fsync, rename, directory fsync.

    Parameters
    ----------
    path : pathlib.Path or str
        Final path. Missing parent directories are created (and fsync'ed).
    write_fn : callable
        Called with the open binary temporary file; writes the content.

    Returns
    -------
    pathlib.Path
        The final path.

    Raises
    ------
    OSError
        On any I/O failure; the temporary file is removed and `path` is untouched.
    """
    final = Path(path)
    directory = final.parent
    _makedirs_durable(directory)
    fd, tmp_name = _create_temp(directory, final.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write_fn(fh)
            fh.flush()
            _fdatasync(fh.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
    return final


def durable_write_bytes(path: Path | str, data: bytes | bytearray | memoryview) -> Path:
    """Durably write `data` to `path` (see :func:`durable_write`).

    Parameters
    ----------
    path : pathlib.Path or str
        Final path.
    data : bytes-like
        Content.

    Returns
    -------
    pathlib.Path
        The final path.
    """
    return durable_write(path, lambda fh: fh.write(data))


def free_bytes(path: Path | str) -> int:
    """Return the bytes available to an unprivileged user on the filesystem of `path`.

    Parameters
    ----------
    path : pathlib.Path or str
        A path on the filesystem; the nearest existing ancestor is used if it is missing.

    Returns
    -------
    int
        Free bytes.
    """
    current = Path(path)
    while not current.exists() and current.parent != current:
        current = current.parent
    return int(shutil.disk_usage(current).free)


def iter_temp_files(spool_root: Path | str) -> Iterator[Path]:
    """Yield the leftover temporary files under `spool_root`.

    Parameters
    ----------
    spool_root : pathlib.Path or str
        Root directory of the spool.

    Yields
    ------
    pathlib.Path
        Every ``*.tmp`` file below the root.
    """
    root = Path(spool_root)
    if not root.is_dir():
        return
    yield from root.rglob(f"*{TEMP_SUFFIX}")


def remove_temp_files(spool_root: Path | str) -> int:
    """Remove leftover temporary files (from a crash) under `spool_root`.

    Parameters
    ----------
    spool_root : pathlib.Path or str
        Root directory of the spool.

    Returns
    -------
    int
        Number of files removed.
    """
    removed = 0
    for tmp in list(iter_temp_files(spool_root)):
        try:
            tmp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log.info("Removed %d leftover temporary file(s) from the spool", removed)
    return removed
