"""Outbound delivery: C-STORE of a job's outputs to every configured destination.

Each output (SEG, KOS, MPR image) gets one row in ``outputs`` and one row in
``deliveries`` per destination (:func:`register_outputs`).  :class:`Exporter` sends
the due deliveries of each destination over one association per batch and records
the outcome per instance:

* acknowledged with a success or warning status -> ``delivered``;
* not acknowledged (peer down, association rejected or aborted, failure status,
  file missing) -> ``attempts + 1``, ``last_error`` and
  ``next_attempt_at = now + min(backoff_max_s, backoff_initial_s * 2 ** (attempts - 1))``;
* after ``max_attempts`` failed attempts -> ``dead`` (dead letter), until
  :func:`retry_dead` (``i3node retry JOB``) makes it ``pending`` again.

Output files are never deleted here; retention removes them once delivered.
Logging carries AE titles, addresses, counts, states and UIDs only.
"""
from __future__ import annotations

import enum
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from node.settings import DeliverySettings, Destination
from node.store import DeliveryState, Store, claim_statement, deliveries
from node.store import outputs as outputs_table

__all__ = [
    "DeliveryRow",
    "DeliveryState",
    "ExportSummary",
    "Exporter",
    "OutputFile",
    "OutputKind",
    "OutputLike",
    "all_delivered",
    "job_delivery_state",
    "pending_for_job",
    "register_outputs",
    "retry_dead",
]

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_BATCH_SIZE = 500


class OutputKind(str, enum.Enum):
    """What an output file is."""

    SEG = "seg"
    KOS = "kos"
    MPR = "mpr"


@dataclass(frozen=True)
class OutputFile:
    """An output instance written by a job, ready to be sent.

    Parameters
    ----------
    sop_uid
        SOP Instance UID of the output.
    kind
        ``"seg"``, ``"kos"`` or ``"mpr"`` (or an :class:`OutputKind`).
    series_uid
        Series Instance UID of the output.
    path
        The DICOM file.
    """

    sop_uid: str
    kind: str
    series_uid: str
    path: Path


class OutputLike(Protocol):
    """What :func:`register_outputs` reads of an output (e.g. an :class:`OutputFile`)."""

    @property
    def sop_uid(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def series_uid(self) -> str: ...

    @property
    def path(self) -> Path: ...


@dataclass(frozen=True)
class ExportSummary:
    """Outcome of one :meth:`Exporter.run_once` (numbers of deliveries)."""

    delivered: int = 0
    retried: int = 0
    dead: int = 0

    def __add__(self, other: ExportSummary) -> ExportSummary:
        """Sum of two summaries."""
        return ExportSummary(self.delivered + other.delivered, self.retried + other.retried, self.dead + other.dead)


@dataclass(frozen=True)
class DeliveryRow:
    """One delivery of an output to a destination (as returned by :func:`pending_for_job`)."""

    id: int
    sop_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    path: Path


# -- registration -------------------------------------------------------------


def _check_output(index: int, out: OutputLike) -> OutputKind:
    for name in ("sop_uid", "series_uid"):
        uid = getattr(out, name)
        if not isinstance(uid, str) or not _UID_RE.fullmatch(uid) or len(uid) > 64:
            raise ValueError(f"outputs[{index}].{name}: {uid!r} is not a valid UID")
    try:
        return OutputKind(out.kind)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in OutputKind)
        raise ValueError(f"outputs[{index}].kind: {out.kind!r} is not allowed; choose one of {allowed}") from None


def register_outputs(
    store: Store,
    job_id: int,
    version: int,
    outputs: Sequence[OutputLike],
    destinations: Sequence[Destination],
    now: float,
) -> None:
    """Record a job's outputs and one pending delivery per destination, in one transaction.

    Idempotent: outputs whose SOP Instance UID is already recorded (a job re-run after
    a crash, with the UIDs fixed when the job started) and deliveries that already
    exist are left as they are, so nothing is sent twice.

    Parameters
    ----------
    store
        The state store.
    job_id
        The job the outputs belong to (must exist).
    version
        Output version (1 for the AI result, higher for refinements).
    outputs
        The output files (:class:`OutputFile` or any object with the same attributes).
    destinations
        Where each output is to be sent (AE titles must be unique).
    now
        Timestamp of registration; every new delivery is due at ``now``.

    Raises
    ------
    ValueError
        If a UID or kind is invalid, an SOP Instance UID repeats, destinations repeat
        an AE title, or an SOP Instance UID is already recorded for another job.
    """
    kinds = [_check_output(i, o) for i, o in enumerate(outputs)]
    uids = [o.sop_uid for o in outputs]
    if len(set(uids)) != len(uids):
        raise ValueError("outputs: SOP Instance UIDs must be unique")
    aes = [d.ae_title for d in destinations]
    if len(set(aes)) != len(aes):
        raise ValueError("destinations: AE titles must be unique")
    if not uids:
        return
    with store._write_lock, store.engine.begin() as c:
        known = {
            r.sop_uid: r.job_id
            for r in c.execute(sa.select(outputs_table.c.sop_uid, outputs_table.c.job_id).where(outputs_table.c.sop_uid.in_(uids)))
        }
        for uid, owner in known.items():
            if owner != job_id:
                raise ValueError(f"outputs: {uid} is already recorded for job {owner}, not job {job_id}")
        new = [
            dict(sop_uid=o.sop_uid, job_id=job_id, version=version, kind=k.value, series_uid=o.series_uid,
                 path=str(o.path), created_at=now)
            for o, k in zip(outputs, kinds, strict=True)
            if o.sop_uid not in known
        ]
        if new:
            c.execute(outputs_table.insert(), new)
        existing = {
            (r.output_uid, r.destination)
            for r in c.execute(
                sa.select(deliveries.c.output_uid, deliveries.c.destination).where(deliveries.c.output_uid.in_(uids))
            )
        }
        rows = [
            dict(output_uid=uid, destination=ae, state=DeliveryState.PENDING.value, attempts=0,
                 next_attempt_at=now, last_error="", updated_at=now)
            for uid in uids
            for ae in aes
            if (uid, ae) not in existing
        ]
        if rows:
            c.execute(deliveries.insert(), rows)
    log.info("job %s v%s: %d new output(s), %d new delivery(ies)", job_id, version, len(new), len(rows))


# -- queries ------------------------------------------------------------------


def _with_path() -> sa.Select[Any]:
    """Deliveries with the path of their output file."""
    return sa.select(deliveries, outputs_table.c.path).join(
        outputs_table, outputs_table.c.sop_uid == deliveries.c.output_uid
    )


def _row(r: Any) -> DeliveryRow:
    return DeliveryRow(
        id=int(r.id), sop_uid=r.output_uid, destination=r.destination, state=r.state, attempts=int(r.attempts),
        next_attempt_at=float(r.next_attempt_at), last_error=r.last_error, path=Path(r.path),
    )


def pending_for_job(store: Store, job_id: int) -> list[DeliveryRow]:
    """Deliveries of a job still waiting to be sent (state ``pending``), due first.

    Dead letters are not included; see :func:`job_delivery_state`.
    """
    q = _with_path().where(outputs_table.c.job_id == job_id, deliveries.c.state == DeliveryState.PENDING.value)
    with store.engine.connect() as c:
        rows = c.execute(q.order_by(deliveries.c.next_attempt_at, deliveries.c.id)).all()
    return [_row(r) for r in rows]


def job_delivery_state(store: Store, job_id: int) -> dict[str, int]:
    """Number of deliveries of a job per state (every state present, 0 if none)."""
    q = (
        sa.select(deliveries.c.state, sa.func.count())
        .join(outputs_table, outputs_table.c.sop_uid == deliveries.c.output_uid)
        .where(outputs_table.c.job_id == job_id)
        .group_by(deliveries.c.state)
    )
    counts = {s.value: 0 for s in DeliveryState}
    with store.engine.connect() as c:
        for state, n in c.execute(q):
            counts[state] = int(n)
    return counts


def all_delivered(store: Store, job_id: int, version: int) -> bool:
    """Whether every output of a job version is delivered to every destination.

    ``False`` while no output of that version is registered; ``True`` for registered
    outputs without any destination (nothing to send).
    """
    with store.engine.connect() as c:
        n_outputs = c.execute(
            sa.select(sa.func.count()).select_from(outputs_table).where(outputs_table.c.job_id == job_id, outputs_table.c.version == version)
        ).scalar_one()
        if not n_outputs:
            return False
        undelivered = c.execute(
            sa.select(sa.func.count())
            .select_from(deliveries.join(outputs_table, outputs_table.c.sop_uid == deliveries.c.output_uid))
            .where(
                outputs_table.c.job_id == job_id,
                outputs_table.c.version == version,
                deliveries.c.state != DeliveryState.DELIVERED.value,
            )
        ).scalar_one()
    return int(undelivered) == 0


def retry_dead(store: Store, job_id: int | None = None, *, now: float | None = None) -> int:
    """Make dead deliveries pending again, with no attempts and due at ``now``.

    Parameters
    ----------
    store
        The state store.
    job_id
        Only this job's deliveries; every dead delivery when ``None``.
    now
        Timestamp (default: the current time).

    Returns
    -------
    int
        Number of deliveries revived.
    """
    now = time.time() if now is None else now
    stmt = deliveries.update().where(deliveries.c.state == DeliveryState.DEAD.value)
    if job_id is not None:
        stmt = stmt.where(
            deliveries.c.output_uid.in_(sa.select(outputs_table.c.sop_uid).where(outputs_table.c.job_id == job_id))
        )
    stmt = stmt.values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=now, updated_at=now)
    with store._write_lock, store.engine.begin() as c:
        n = int(c.execute(stmt).rowcount)
    log.info("retry: %d dead delivery(ies) pending again%s", n, "" if job_id is None else f" (job {job_id})")
    return n


# -- sending ------------------------------------------------------------------


@dataclass(frozen=True)
class _BatchOutcome:
    """What the peer acknowledged of a batch; ``failed`` maps SOP UID -> reason."""

    acknowledged: frozenset[str]
    failed: Mapping[str, str]


def _backoff(delivery: DeliverySettings, attempts: int) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (``attempts >= 1``)."""
    return float(min(delivery.backoff_max_s, delivery.backoff_initial_s * 2 ** (attempts - 1)))


def _peer(dest: Destination) -> str:
    """``AE@host:port`` of a destination, as logged and recorded."""
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


class Exporter:
    """Sends due deliveries to their destinations, with retries, backoff and dead letters.

    Parameters
    ----------
    store
        The state store.
    destinations
        The configured destinations; deliveries are matched by AE title.
    delivery
        Calling AE title, attempts and backoff.
    ssl_context_for
        TLS client context of a destination (``None`` for plain TCP); required when a
        destination has ``tls = true``.
    clock
        Time source used when :meth:`run_once` is not given ``now``.
    dimse_timeout
        Seconds to wait for each C-STORE response.  pynetdicom may notice a peer's
        abort during a C-STORE only when this expires, so it also bounds how long an
        aborted transfer holds the export loop.
    on_outcome
        Called after each batch is recorded, per instance, with ``(destination,
        sop_uid, delivered, dead, reason)`` (audit trail and metrics).

    Raises
    ------
    ValueError
        If destination AE titles repeat, a destination needs TLS and no
        ``ssl_context_for`` is given, or ``dimse_timeout`` is not positive.
    """

    def __init__(
        self,
        store: Store,
        destinations: Sequence[Destination],
        delivery: DeliverySettings,
        *,
        ssl_context_for: Callable[[Destination], ssl.SSLContext | None] | None = None,
        clock: Callable[[], float] = time.time,
        dimse_timeout: float = 60.0,
        on_outcome: Callable[[Destination, str, bool, bool, str], None] | None = None,
    ) -> None:
        if not dimse_timeout > 0:
            raise ValueError(f"dimse_timeout: must be positive, got {dimse_timeout!r}")
        aes = [d.ae_title for d in destinations]
        if len(set(aes)) != len(aes):
            raise ValueError("destinations: AE titles must be unique")
        for i, d in enumerate(destinations):
            if d.tls and ssl_context_for is None:
                raise ValueError(f"destinations[{i}]: tls is set but no ssl_context_for was given")
        self.store = store
        self.destinations = tuple(destinations)
        self.delivery = delivery
        self._ssl_context_for = ssl_context_for
        self._clock = clock
        self._dimse_timeout = float(dimse_timeout)
        self._on_outcome = on_outcome
        self._lock = threading.Lock()  # one run at a time: a delivery is never sent twice concurrently

    def run_once(self, now: float | None = None) -> ExportSummary:
        """Send every due pending delivery once.

        For each destination, its deliveries due at ``now`` are sent over one
        association per batch.  A destination that cannot be reached is not tried
        again in this run; its remaining batches stay due.

        Parameters
        ----------
        now
            Timestamp deciding what is due and when failures are retried (default: the clock).

        Returns
        -------
        ExportSummary
            How many deliveries were delivered, scheduled for a retry, or dead-lettered.
        """
        now = self._clock() if now is None else now
        total = ExportSummary()
        with self._lock:
            for dest in self.destinations:
                done: set[int] = set()
                while True:
                    batch = [r for r in self._due(dest, now) if r.id not in done]
                    if not batch:
                        break
                    done.update(r.id for r in batch)
                    summary = self._send(dest, batch, now)
                    total += summary
                    if summary.retried or summary.dead:
                        break
        return total

    # -- internals ---------------------------------------------------------
    def _due(self, dest: Destination, now: float) -> list[DeliveryRow]:
        """Claim a batch of due deliveries for this node (one atomic statement; see :mod:`node.store`).

        A delivery held by another node is skipped until that node records it or its
        lease runs out, so several nodes on one database never send one output twice
        at once.
        """
        store = self.store
        claim = claim_statement(
            deliveries, deliveries.c.id,
            [deliveries.c.destination == dest.ae_title, deliveries.c.state == DeliveryState.PENDING.value,
             deliveries.c.next_attempt_at <= now, sa.or_(deliveries.c.owner.is_(None), deliveries.c.lease_until < now)],
            [deliveries.c.next_attempt_at, deliveries.c.id],
            dict(owner=store.node_id, lease_until=now + store.lease_s), limit=_BATCH_SIZE, returning=[deliveries.c.id],
        )
        with store._write_lock, store.engine.begin() as c:
            ids = [int(r.id) for r in c.execute(claim)]
            if not ids:
                return []
            rows = c.execute(_with_path().where(deliveries.c.id.in_(ids))).all()
        return sorted((_row(r) for r in rows), key=lambda r: (r.next_attempt_at, r.id))

    def _send(self, dest: Destination, batch: Sequence[DeliveryRow], now: float) -> ExportSummary:
        missing = {r.sop_uid: f"output file missing: {r.path}" for r in batch if not r.path.is_file()}
        sendable = [r for r in batch if r.sop_uid not in missing]
        if sendable:
            outcome = self._transfer(dest, sendable)
        else:
            outcome = _BatchOutcome(frozenset(), {})
        failed = {**outcome.failed, **missing}
        for r in sendable:
            if r.sop_uid not in outcome.acknowledged and r.sop_uid not in failed:
                failed[r.sop_uid] = f"not acknowledged by {_peer(dest)}"
        return self._record(dest, batch, outcome.acknowledged, failed, now)

    def _record(
        self,
        dest: Destination,
        batch: Sequence[DeliveryRow],
        acknowledged: frozenset[str],
        failed: Mapping[str, str],
        now: float,
    ) -> ExportSummary:
        delivered = retried = dead = 0
        with self.store._write_lock, self.store.engine.begin() as c:
            for r in batch:
                if r.sop_uid in acknowledged:
                    values: dict[str, Any] = dict(state=DeliveryState.DELIVERED.value, last_error="", updated_at=now)
                    delivered += 1
                else:
                    attempts = r.attempts + 1
                    values = dict(attempts=attempts, last_error=failed[r.sop_uid], updated_at=now)
                    if attempts >= self.delivery.max_attempts:
                        values["state"] = DeliveryState.DEAD.value
                        dead += 1
                    else:
                        values["next_attempt_at"] = now + _backoff(self.delivery, attempts)
                        retried += 1
                self._update(c, r.id, values)
        if self._on_outcome is not None:
            for r in batch:
                ok = r.sop_uid in acknowledged
                is_dead = not ok and r.attempts + 1 >= self.delivery.max_attempts
                self._on_outcome(dest, r.sop_uid, ok, is_dead, "" if ok else failed[r.sop_uid])
        if delivered:
            log.info("delivered %d instance(s) to %s", delivered, _peer(dest))
        if retried or dead:
            reasons = sorted(set(failed.values()))
            log.warning(
                "%d instance(s) not delivered to %s (%d to retry, %d dead): %s",
                retried + dead, _peer(dest), retried, dead, "; ".join(reasons[:3]),
            )
        return ExportSummary(delivered=delivered, retried=retried, dead=dead)

    def _update(self, c: Connection, delivery_id: int, values: Mapping[str, Any]) -> None:
        c.execute(
            deliveries.update()
            .where(
                deliveries.c.id == delivery_id,
                deliveries.c.state == DeliveryState.PENDING.value,
                deliveries.c.owner == self.store.node_id,
            )
            .values(owner=None, lease_until=None, **values)
        )

    def _transfer(self, dest: Destination, batch: Sequence[DeliveryRow]) -> _BatchOutcome:
        """C-STORE a batch over one association; what was acknowledged and why the rest was not."""
        from dicom.scu import AssociationFailed, SendReport, StatusCategory, send_paths

        peer = _peer(dest)
        context = self._ssl_context_for(dest) if self._ssl_context_for is not None else None
        if dest.tls and context is None:
            return _BatchOutcome(frozenset(), {r.sop_uid: f"no TLS context for {peer}" for r in batch})
        by_path: dict[str, list[str]] = {}
        for r in batch:
            by_path.setdefault(str(r.path), []).append(r.sop_uid)
        broken: str | None = None
        try:
            report: SendReport | None = send_paths(
                [Path(p) for p in by_path], ae_title=dest.ae_title, host=dest.host, port=dest.port,
                calling_ae=self.delivery.calling_ae, ssl_context=context, dimse_timeout=self._dimse_timeout,
            )
        except AssociationFailed as exc:
            report, broken = exc.report, exc.reason
        except FileNotFoundError as exc:
            return _BatchOutcome(frozenset(), {r.sop_uid: f"output file missing: {exc}" for r in batch})
        except Exception as exc:  # the network layer must not stop the export loop; counted as an attempt
            log.exception("sending to %s failed unexpectedly", peer)
            return _BatchOutcome(frozenset(), {r.sop_uid: f"unexpected error sending to {peer}: {exc!r}" for r in batch})

        results = report.results if report is not None else []
        acknowledged = {
            uid
            for res in results
            if res.category in (StatusCategory.SUCCESS, StatusCategory.WARNING)
            for uid in by_path.get(res.source, [])
        }
        lost = "" if broken is None else _association_problem(broken, dest, len(acknowledged), len(batch))
        failed: dict[str, str] = {}
        for res in results:
            if res.category in (StatusCategory.SUCCESS, StatusCategory.WARNING):
                continue
            if res.status is not None:
                reason = f"C-STORE failed at {peer} with status 0x{res.status:04X}"
                reason += f": {res.message}" if res.message else ""
            else:
                reason = lost or f"{res.message or 'not sent'} ({peer})"
            failed.update((uid, reason) for uid in by_path.get(res.source, []))
        if lost:
            failed.update((r.sop_uid, lost) for r in batch if r.sop_uid not in acknowledged and r.sop_uid not in failed)
        return _BatchOutcome(frozenset(acknowledged), failed)


def _association_problem(reason: str, dest: Destination, n_acknowledged: int, n_batch: int) -> str:
    """A human-readable reason for a failed or lost association with ``dest``.

    The SCU reports a refused connection like an abort; a plain connect tells them apart.
    """
    peer = _peer(dest)
    if reason.startswith("association rejected"):
        return "association rejected by " + peer + reason[len("association rejected"):]
    if reason.startswith(("association aborted", "connection failed")):
        unreachable = _connection_problem(dest)
        if unreachable is not None:
            return unreachable
        if reason.startswith("association aborted"):
            return f"association aborted by {peer} after {n_acknowledged} of {n_batch} instance(s) were acknowledged"
    return f"{reason} ({peer})"


def _connection_problem(dest: Destination, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to ``dest`` fails (refused, unknown host, timeout), or ``None`` if it succeeds now."""
    peer = _peer(dest)
    try:
        socket.create_connection((dest.host, dest.port), timeout=timeout).close()
    except ConnectionRefusedError:
        return f"connection refused by {peer}"
    except socket.gaierror:
        return f"host not found: {dest.host} ({dest.ae_title})"
    except TimeoutError:
        return f"connection to {peer} timed out"
    except OSError as exc:
        return f"connection to {peer} failed: {os.strerror(exc.errno) if exc.errno else exc}"
    return None
