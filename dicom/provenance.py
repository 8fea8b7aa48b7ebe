"""Provenance of the node's outputs: UIDs from one root, and "did we make this?".

Every UID the node creates comes from one configurable root through
:class:`UidFactory`.  Whether an inbound object was created by the node is
decided by the UIDs the node recorded when it created its outputs
(:func:`created_by_node`), never by free text such as Manufacturer or
SeriesDescription, which viewers copy when they save an edit.
"""
from __future__ import annotations

import re
from collections.abc import Container

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

__all__ = ["UidFactory", "created_by_node"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Longest root that still leaves room for a unique suffix in a 64-character UID.
MAX_ROOT_LENGTH = 40


class UidFactory:
    """Produce UIDs below one organisational root.

    Parameters
    ----------
    root : str
        UID root without trailing dot, digits and dots only, at most
        :data:`MAX_ROOT_LENGTH` characters (e.g. ``"1.2.826.0.1.3680043.10.1234"``).

    Raises
    ------
    ValueError
        If ``root`` is not a valid UID root.
    """

    def __init__(self, root: str) -> None:
        if not isinstance(root, str) or not _UID_RE.fullmatch(root) or len(root) > MAX_ROOT_LENGTH:
            raise ValueError(
                f"root must be a UID root of digits and dots (at most {MAX_ROOT_LENGTH} characters), got {root!r}"
            )
        if any(len(part) > 1 and part.startswith("0") for part in root.split(".")):
            raise ValueError(f"root must not contain components with leading zeros, got {root!r}")
        self._root = root

    @property
    def root(self) -> str:
        """The configured root."""
        return self._root

    def new(self) -> str:
        """Return a fresh random UID below the root."""
        return str(generate_uid(prefix=self._root + "."))

    def derive(self, *keys: str) -> str:
        """Return a UID determined by ``keys`` (same keys, same UID).

        Use it to fix a job's output UIDs when the job starts, so that a re-run
        after a crash produces the same SEG/KOS instead of a second one.

        Parameters
        ----------
        *keys : str
            At least one non-empty string, e.g. ``(job_id, "seg", "1")``.

        Returns
        -------
        str
            The derived UID.
        """
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("keys must be one or more non-empty strings")
        return str(generate_uid(prefix=self._root + ".", entropy_srcs=[self._root, *keys]))

    def __call__(self) -> str:
        """Same as :meth:`new`."""
        return self.new()

    def owns(self, uid: str) -> bool:
        """Whether ``uid`` lies below this root (a hint only, not provenance)."""
        return isinstance(uid, str) and uid.startswith(self._root + ".")

    def __repr__(self) -> str:
        return f"UidFactory({self._root!r})"


def created_by_node(ds: Dataset, known_sop_uids: Container[str]) -> bool:
    """Whether ``ds`` is one of the node's own outputs.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        An inbound instance.
    known_sop_uids : Container[str]
        SOP Instance UIDs of every object the node has created (from the state DB).

    Returns
    -------
    bool
        ``True`` if the dataset's SOPInstanceUID is a recorded node output.
        A viewer that saves an edit creates a new instance, so its SEG is
        never taken for the node's own, whatever its descriptive attributes say.
    """
    uid = ds.get("SOPInstanceUID")
    if uid is None:
        return False
    return str(uid) in known_sop_uids
