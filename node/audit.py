"""Append-only audit trail of security-relevant events (JSON lines).

Each event is one JSON object on one line, modelled on the DICOM audit message
(PS3.15 Annex A.5): *when* (``timestamp``, UTC ISO 8601), *what* (``event``, with the
DICOM ``event_id`` / ``event_type`` codes and the ``action``), *how it ended*
(``outcome`` and the PS3.15 ``outcome_code`` 0/4/8/12), *who* (``participants``: this
node's process and the remote AE title with its network address) and *on what*
(``objects``: Study Instance UID and/or SOP Instance UID only).

Patient name, ID, birth date and every other identifying attribute are never written:
the API has no parameter that could carry them, and free text (reasons, paths, AE
titles) is length-limited. A reader who needs the patient looks the Study Instance UID
up in the PACS, which has its own access control.

Durability: the file is opened with ``O_APPEND`` (existing lines are never rewritten,
and concurrent writers never interleave within a line), each event is written with one
``write`` call and ``fsync``'ed before the call returns, under a lock (thread-safe).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from dicom.spool import fsync_dir

__all__ = [
    "AuditLog",
    "AuditObserver",
    "AuditingSink",
    "EVENT_CODES",
    "OUTCOME_SUCCESS",
    "OUTCOME_MINOR_FAILURE",
    "OUTCOME_SERIOUS_FAILURE",
    "OUTCOME_MAJOR_FAILURE",
]

log = logging.getLogger(__name__)

#: PS3.15 A.5.1 EventOutcomeIndicator values.
OUTCOME_SUCCESS = 0
OUTCOME_MINOR_FAILURE = 4
OUTCOME_SERIOUS_FAILURE = 8
OUTCOME_MAJOR_FAILURE = 12
_OUTCOME_NAMES = {0: "success", 4: "minor_failure", 8: "serious_failure", 12: "major_failure"}

_Code = tuple[str, str, str]  # (value, scheme, meaning)

#: event -> (EventID, EventTypeCode or None, EventActionCode), codes from DCMR (PS3.16).
EVENT_CODES: Mapping[str, tuple[_Code, _Code | None, str]] = {
    "association_accepted": (("110114", "DCM", "User Authentication"), ("110122", "DCM", "Login"), "E"),
    "association_rejected": (("110114", "DCM", "User Authentication"), ("110122", "DCM", "Login"), "E"),
    "instances_stored": (("110104", "DCM", "DICOM Instances Transferred"), None, "C"),
    "output_delivered": (("110104", "DCM", "DICOM Instances Transferred"), None, "R"),
    "corrected_seg_ingested": (("110103", "DCM", "DICOM Instances Accessed"), None, "U"),
    "data_purged": (("110105", "DCM", "DICOM Study Deleted"), None, "D"),
    "config_loaded": (("110113", "DCM", "Security Alert"), ("110131", "DCM", "Software Configuration"), "E"),
    "node_started": (("110100", "DCM", "Application Activity"), ("110120", "DCM", "Application Start"), "E"),
    "node_stopped": (("110100", "DCM", "Application Activity"), ("110121", "DCM", "Application Stop"), "E"),
}

_MAX_TEXT = 256


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    """Coerce to a single-line string of at most `limit` characters."""
    s = str(value)
    s = "".join(ch if ch.isprintable() else " " for ch in s)
    return s[:limit]


def _code(c: _Code | None) -> dict[str, str] | None:
    return None if c is None else {"code": c[0], "scheme": c[1], "meaning": c[2]}


def _utc_iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, tz=_dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


class AuditLog:
    """Append-only, fsync'ed JSON-lines audit file.

    Parameters
    ----------
    path : str or os.PathLike
        The audit file; created (mode ``0o640``) with its parent directory if missing.
        Existing content is kept; new events are appended.
    ae_title : str, default "I3NODE"
        This node's AE title, recorded as the local participant of every event.
    process_name : str, default "i3node"
        Name of the local process, recorded with its PID and host name.
    clock : callable, optional
        Returns the current time as POSIX seconds (tests).

    Raises
    ------
    OSError
        If the file cannot be opened for appending (the message names it).

    Examples
    --------
    >>> audit = AuditLog(tmp / "audit.jsonl")  # doctest: +SKIP
    >>> audit.association_accepted("PACS", "10.0.0.7")  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ae_title: str = "I3NODE",
        process_name: str = "i3node",
        clock: Any = None,
    ) -> None:
        self.path = Path(path)
        self._ae_title = _text(ae_title, 16)
        self._process = {"process": _text(process_name, 64), "pid": os.getpid(), "host": _text(socket.gethostname(), 255)}
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        try:
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640
            )
        except OSError as exc:
            raise OSError(exc.errno, f"audit file {str(self.path)!r} cannot be opened for appending: {exc.strerror}") from None
        if not existed:
            fsync_dir(self.path.parent)

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Close the file (idempotent); later events raise :class:`RuntimeError`."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer ----------------------------------------------------------------------
    def _write(
        self,
        event: str,
        *,
        outcome: int = OUTCOME_SUCCESS,
        remote: Mapping[str, Any] | None = None,
        objects: list[dict[str, Any]] | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        event_id, event_type, action = EVENT_CODES[event]
        local: dict[str, Any] = {"role": "local", "ae_title": self._ae_title, **self._process}
        participants: list[dict[str, Any]] = [local]
        if remote is not None:
            participants.append({"role": "remote", **remote})
        record: dict[str, Any] = {
            "timestamp": _utc_iso(self._clock()),
            "event": event,
            "event_id": _code(event_id),
            "event_type": _code(event_type),
            "action": action,
            "outcome": _OUTCOME_NAMES[outcome],
            "outcome_code": outcome,
            "participants": participants,
            "objects": objects or [],
        }
        if detail:
            record["detail"] = dict(detail)
        line = (json.dumps(record, ensure_ascii=True, separators=(",", ":"), sort_keys=False) + "\n").encode("ascii")
        with self._lock:
            if self._fd is None:
                raise RuntimeError(f"audit log {str(self.path)!r} is closed")
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        return record

    # -- events ------------------------------------------------------------------------------
    def association_accepted(self, calling_ae: str, address: str) -> dict[str, Any]:
        """A DICOM association was accepted.

        Parameters
        ----------
        calling_ae : str
            Calling AE title of the peer.
        address : str
            Peer network address.

        Returns
        -------
        dict
            The record written.
        """
        return self._write(
            "association_accepted",
            remote={"ae_title": _text(calling_ae, 16), "address": _text(address, 64), "requestor": True},
        )

    def association_rejected(self, calling_ae: str, address: str, reason: str) -> dict[str, Any]:
        """A DICOM association was refused (allow-list, limit, TLS ...).

        Parameters
        ----------
        calling_ae : str
            Calling AE title the peer claimed.
        address : str
            Peer network address.
        reason : str
            Why it was refused.

        Returns
        -------
        dict
            The record written.
        """
        return self._write(
            "association_rejected",
            outcome=OUTCOME_MINOR_FAILURE,
            remote={"ae_title": _text(calling_ae, 16), "address": _text(address, 64), "requestor": True},
            detail={"reason": _text(reason)},
        )

    def tls_handshake_refused(self, address: str, reason: str) -> dict[str, Any]:
        """A peer's TLS handshake failed, so no association could be requested.

        Written as an ``association_rejected`` event (User Authentication, Login, minor
        failure) without a remote AE title, with ``detail.stage = "tls"``.

        Parameters
        ----------
        address : str
            Peer network address.
        reason : str
            Why the handshake failed (``"TLS handshake failed: no client certificate"``).

        Returns
        -------
        dict
            The record written.
        """
        return self._write(
            "association_rejected",
            outcome=OUTCOME_MINOR_FAILURE,
            remote={"address": _text(address, 64), "requestor": True},
            detail={"reason": _text(reason), "stage": "tls"},
        )

    def instances_stored(
        self,
        study_uid: str,
        count: int,
        calling_ae: str,
        *,
        address: str = "",
        duplicates: int = 0,
        backlog: bool = False,
    ) -> dict[str, Any]:
        """Instances of one study were received from a peer and stored.

        Parameters
        ----------
        study_uid : str
            Study Instance UID.
        count : int
            Number of instances acknowledged (duplicates included).
        calling_ae : str
            Calling AE title of the sender.
        address : str, optional
            Network address of the sender.
        duplicates : int, optional
            How many of `count` had been received before.
        backlog : bool, optional
            Written late: at a start, for instances acknowledged before a stop or crash.

        Returns
        -------
        dict
            The record written.

        Raises
        ------
        ValueError
            If `count` or `duplicates` is negative or `duplicates` exceeds `count`.
        """
        if count < 0 or duplicates < 0 or duplicates > count:
            raise ValueError(f"count and duplicates must satisfy 0 <= duplicates <= count, got {count}, {duplicates}")
        remote: dict[str, Any] = {"ae_title": _text(calling_ae, 16), "requestor": True, "role_id": "source"}
        if address:
            remote["address"] = _text(address, 64)
        return self._write(
            "instances_stored",
            remote=remote,
            objects=[{"type": "study", "study_instance_uid": _text(study_uid, 64)}],
            detail={"count": int(count), "duplicates": int(duplicates), **({"backlog": True} if backlog else {})},
        )

    def output_delivered(
        self,
        destination: str,
        sop_uid: str,
        kind: str,
        *,
        study_uid: str = "",
        address: str = "",
        success: bool = True,
        reason: str = "",
    ) -> dict[str, Any]:
        """An output (SEG, KOS, MPR image) was sent to a destination.

        Parameters
        ----------
        destination : str
            Destination AE title.
        sop_uid : str
            SOP Instance UID of the output.
        kind : str
            ``"seg"``, ``"kos"`` or ``"mpr"``.
        study_uid : str, optional
            Study Instance UID of the output.
        address : str, optional
            ``host:port`` of the destination.
        success : bool, default True
            ``False`` records a dead-lettered delivery (serious failure).
        reason : str, optional
            Failure reason.

        Returns
        -------
        dict
            The record written.
        """
        objects: list[dict[str, Any]] = [{"type": "sop_instance", "sop_instance_uid": _text(sop_uid, 64), "kind": _text(kind, 16)}]
        if study_uid:
            objects.insert(0, {"type": "study", "study_instance_uid": _text(study_uid, 64)})
        remote: dict[str, Any] = {"ae_title": _text(destination, 16), "requestor": False, "role_id": "destination"}
        if address:
            remote["address"] = _text(address, 64)
        return self._write(
            "output_delivered",
            outcome=OUTCOME_SUCCESS if success else OUTCOME_SERIOUS_FAILURE,
            remote=remote,
            objects=objects,
            detail={"reason": _text(reason)} if reason else None,
        )

    def corrected_seg_ingested(self, sop_uid: str, job_id: int, *, study_uid: str = "") -> dict[str, Any]:
        """A radiologist's corrected SEG was matched to a job and read.

        Parameters
        ----------
        sop_uid : str
            SOP Instance UID of the corrected SEG.
        job_id : int
            The job it corrects.
        study_uid : str, optional
            Study Instance UID.

        Returns
        -------
        dict
            The record written.
        """
        objects: list[dict[str, Any]] = [{"type": "sop_instance", "sop_instance_uid": _text(sop_uid, 64), "kind": "seg"}]
        if study_uid:
            objects.insert(0, {"type": "study", "study_instance_uid": _text(study_uid, 64)})
        return self._write("corrected_seg_ingested", objects=objects, detail={"job_id": int(job_id)})

    def data_purged(self, study_uid: str, instances: int, outputs: int) -> dict[str, Any]:
        """Retention deleted received instances and/or delivered outputs of a study.

        Parameters
        ----------
        study_uid : str
            Study Instance UID.
        instances : int
            Received instances deleted from the spool.
        outputs : int
            Delivered outputs deleted.

        Returns
        -------
        dict
            The record written.
        """
        return self._write(
            "data_purged",
            objects=[{"type": "study", "study_instance_uid": _text(study_uid, 64)}],
            detail={"instances": int(instances), "outputs": int(outputs)},
        )

    def config_loaded(self, path: str | os.PathLike[str], sha256: str) -> dict[str, Any]:
        """The node's configuration was loaded.

        Parameters
        ----------
        path : str or os.PathLike
            Settings file (``""`` for the embedded defaults).
        sha256 : str
            Hex SHA-256 of the file's bytes.

        Returns
        -------
        dict
            The record written.
        """
        return self._write("config_loaded", detail={"path": _text(os.fspath(path), 1024), "sha256": _text(sha256, 64)})

    def node_started(self, **detail: str | int | float | bool) -> dict[str, Any]:
        """The node started (call once it listens).

        Parameters
        ----------
        **detail
            Non-identifying facts worth keeping (port, TLS on/off, version).

        Returns
        -------
        dict
            The record written.
        """
        return self._write("node_started", detail={k: v if isinstance(v, (int, float, bool)) else _text(v) for k, v in detail.items()} or None)

    def node_stopped(self) -> dict[str, Any]:
        """The node is stopping (call before closing the log).

        Returns
        -------
        dict
            The record written.
        """
        return self._write("node_stopped")


class AuditObserver:
    """Adapter from :class:`dicom.scp.AssociationObserver` to an :class:`AuditLog`.

    Parameters
    ----------
    audit : AuditLog
        Where the events go.

    Examples
    --------
    >>> StoreSCP(config, sink, observer=AuditObserver(audit))  # doctest: +SKIP
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def accepted(self, calling_ae: str, address: str) -> None:
        """Record an accepted association."""
        self.audit.association_accepted(calling_ae, address)

    def rejected(self, calling_ae: str, address: str, reason: str) -> None:
        """Record a rejected association."""
        self.audit.association_rejected(calling_ae, address, reason)

    def tls_refused(self, address: str, reason: str) -> None:
        """Record a refused TLS handshake (see :meth:`AuditLog.tls_handshake_refused`)."""
        self.audit.tls_handshake_refused(address, reason)


class _Sink(Protocol):
    def record(self, inst: Any) -> None: ...


class _Unaudited(Protocol):
    def unaudited_instances(self, limit: int = ...) -> list[Any]: ...

    def mark_audited(self, sop_uids: Any) -> None: ...


class AuditingSink:
    """Wrap an :class:`dicom.scp.InstanceSink`; write ``instances_stored`` events from the state database.

    Durability: every instance the inner sink records is a state-database row marked
    *not audited*, committed (and its spool file fsynced) before the C-STORE is
    acknowledged; that row and file are what the audit event is made of, so the
    acknowledgement never waits for the audit file and nothing acknowledged can be missing
    from it. :meth:`flush` (every few seconds, at start and at shutdown) writes one
    ``instances_stored`` event per ``(study, calling AE, address)`` for the rows not audited
    yet and marks them. After ``kill -9`` the rows are still unaudited and are written at the
    next start; after a power cut the spool recovery re-records lost rows (unaudited) first.
    Re-sent duplicates (no new row) are counted in memory and reported with their study's
    next event. Instances whose recording failed are not counted.

    Parameters
    ----------
    inner : InstanceSink
        The real sink (the state store adapter).
    audit : AuditLog
        The audit log.
    store : object
        The state store (``unaudited_instances``, ``mark_audited``).
    """

    def __init__(self, inner: _Sink, audit: AuditLog, store: _Unaudited) -> None:
        if not callable(getattr(inner, "record", None)):
            raise TypeError("inner must have a callable 'record(inst)' method")
        self.inner = inner
        self.audit = audit
        self.store = store
        self._lock = threading.Lock()
        self._duplicates: dict[tuple[str, str, str], int] = {}

    def record(self, inst: Any) -> None:
        """Record via the inner sink (raises if it does); count a duplicate."""
        self.inner.record(inst)
        if getattr(inst, "duplicate", False):
            key = (str(inst.study_uid), str(inst.calling_ae), str(getattr(inst, "peer_address", "")))
            with self._lock:
                self._duplicates[key] = self._duplicates.get(key, 0) + 1

    def flush(self, force: bool = False, *, backlog: bool = False) -> int:
        """Write events for every instance recorded but not yet audited.

        Parameters
        ----------
        force : bool, default False
            Also report pending duplicate counts of studies without new instances.
        backlog : bool, default False
            Mark the events as written late (at start, for instances recorded before a stop
            or crash).

        Returns
        -------
        int
            Number of events written.
        """
        rows = self.store.unaudited_instances()
        groups: dict[tuple[str, str, str], list[str]] = {}
        for r in rows:
            groups.setdefault((str(r["study_uid"]), str(r["calling_ae"]), str(r["peer_address"])), []).append(
                str(r["sop_uid"]))
        with self._lock:
            dups = dict(self._duplicates) if force else {k: v for k, v in self._duplicates.items() if k in groups}
            for k in dups:
                self._duplicates.pop(k, None)
        written = 0
        for key in sorted(set(groups) | set(dups)):
            study_uid, calling_ae, address = key
            sops = groups.get(key, [])
            n_dup = dups.get(key, 0)
            try:
                self.audit.instances_stored(study_uid, len(sops) + n_dup, calling_ae, address=address,
                                            duplicates=n_dup, backlog=backlog)
            except (OSError, RuntimeError):
                log.exception("audit: could not write instances_stored for study %s", study_uid)
                if n_dup:
                    with self._lock:
                        self._duplicates[key] = self._duplicates.get(key, 0) + n_dup
                continue
            self.store.mark_audited(sops)
            written += 1
        return written

    @property
    def pending(self) -> int:
        """Instances recorded but not yet audited."""
        return len(self.store.unaudited_instances())
