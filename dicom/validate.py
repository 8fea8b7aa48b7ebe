"""Run dicom3tools' ``dciodvfy`` on a file or dataset and parse its findings."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

__all__ = ["DciodvfyNotFoundError", "ValidationReport", "dciodvfy"]


class DciodvfyNotFoundError(RuntimeError):
    """The ``dciodvfy`` executable (Debian package ``dicom3tools``) is not on PATH."""


@dataclass(frozen=True)
class ValidationReport:
    """Findings of one ``dciodvfy`` run.

    Attributes
    ----------
    errors : list[str]
        Lines starting with ``Error``.
    warnings : list[str]
        Lines starting with ``Warning``.
    output : str
        The complete output, for diagnostics.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        """``True`` when there is no error line."""
        return not self.errors


def _parse(text: str) -> ValidationReport:
    errors: list[str] = []
    warnings: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Error"):
            errors.append(stripped)
        elif stripped.startswith("Warning"):
            warnings.append(stripped)
    return ValidationReport(errors=errors, warnings=warnings, output=text)


def dciodvfy(path_or_dataset: str | Path | Dataset, *, timeout_s: float = 120.0) -> ValidationReport:
    """Validate a DICOM object against its IOD with ``dciodvfy -new``.

    Parameters
    ----------
    path_or_dataset : str, pathlib.Path or pydicom.dataset.Dataset
        A DICOM Part 10 file, or a dataset (written to a temporary file with
        file meta information first).
    timeout_s : float
        Seconds before the run is abandoned.

    Returns
    -------
    ValidationReport
        Error and warning lines.

    Raises
    ------
    DciodvfyNotFoundError
        If ``dciodvfy`` is not installed.
    FileNotFoundError
        If the path does not exist.
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise DciodvfyNotFoundError("dciodvfy not found on PATH; install dicom3tools (apt-get install dicom3tools)")
    if isinstance(path_or_dataset, Dataset):
        fd, tmp = tempfile.mkstemp(suffix=".dcm")
        os.close(fd)
        try:
            path_or_dataset.save_as(tmp, enforce_file_format=True)
            return dciodvfy(tmp, timeout_s=timeout_s)
        finally:
            os.unlink(tmp)
    path = Path(path_or_dataset)
    if not path.is_file():
        raise FileNotFoundError(f"path_or_dataset: no such file {path}")
    proc = subprocess.run(  # noqa: S603 - fixed executable, no shell
        [exe, "-new", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        check=False,
    )
    return _parse(proc.stdout + proc.stderr)
