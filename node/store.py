"""State store: studies, series, instances, jobs, outputs and deliveries.

One database behind SQLAlchemy Core.  SQLite in WAL mode is the default; PostgreSQL
serves several nodes sharing work.  The schema is managed by Alembic
(:mod:`node.migrations`), upgraded when a store is opened.

Several nodes, exactly once: work (a queued job, a pending corrected SEG, a due
delivery) is *claimed* by one atomic statement that sets its ``owner`` (the node's
name) and a ``lease_until`` time - ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
LOCKED LIMIT 1) RETURNING`` on PostgreSQL; on SQLite the same statement is atomic
because SQLite runs one writer at a time.  Every later transition of claimed work is
guarded by the owner (a node that lost its claim gets :class:`LeaseLost` and stops).
The owner renews its leases while it works (:meth:`Store.renew_leases`); work whose
lease ran out - its node died - goes back to the queue (:meth:`Store.reap_expired`).
Lease times come from the nodes' clocks: keep them synchronised (NTP).

Durability: the SCP acknowledges an instance only after its file is fsynced and its
row committed.  SQLite runs with ``synchronous=NORMAL`` (a commit survives a crash of
the process, not necessarily a power loss); rows lost to a power loss are rebuilt
from the fsynced spool files when the node starts (:func:`node.app.recover_spool`),
so nothing acknowledged is lost and one flush per instance is saved.

Only UIDs, AE titles, counts, paths built from UIDs and timestamps are stored here:
no patient attributes.
"""
from __future__ import annotations

import enum
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dicom.scp import InstanceConflict, StoredInstance
from node import migrations

__all__ = [
    "JobState",
    "CLAIMED_STATES",
    "LeaseLost",
    "claim_statement",
    "StoreMissing",
    "UNFINISHED_STATES",
    "CorrectionState",
    "DeliveryState",
    "StudyState",
    "RecordOutcome",
    "Store",
    "metadata",
]

log = logging.getLogger(__name__)

#: A result row read by column name (SQLAlchemy's ``RowMapping`` is keyed by names and columns).
Row = Mapping[Any, Any]


class JobState(str, enum.Enum):
    """States of a job, in the order a job normally passes them."""

    RECEIVED = "received"
    QUEUED = "queued"
    SEGMENTING = "segmenting"
    SELECTING = "selecting"
    EXPORTING = "exporting"
    AWAITING_CORRECTION = "awaiting_correction"
    REFINING = "refining"
    DONE = "done"
    FAILED = "failed"


class StudyState(str, enum.Enum):
    """States of a study: receiving instances, or quiet for ``study.stable_after_s``."""

    RECEIVING = "receiving"
    STABLE = "stable"


class CorrectionState(str, enum.Enum):
    """States of an inbound corrected SEG."""

    PENDING = "pending"  #: recorded, waiting for the job runner
    PROCESSING = "processing"  #: a refinement is running on it
    APPLIED = "applied"  #: a refined SEG was produced from it
    UNMATCHED = "unmatched"  #: its series has no job awaiting corrections
    REJECTED = "rejected"  #: unreadable, or refused by the refinement (will not succeed on retry)
    FAILED = "failed"  #: refinement failed ``node.max_attempts`` times


class DeliveryState(str, enum.Enum):
    """States of one (output, destination) delivery."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


UNFINISHED_STATES = frozenset(
    {JobState.RECEIVED, JobState.QUEUED, JobState.SEGMENTING, JobState.SELECTING, JobState.EXPORTING, JobState.REFINING}
)
#: Job states in which a node holds the job (``owner`` and ``lease_until`` are set).
CLAIMED_STATES = frozenset({JobState.SEGMENTING, JobState.SELECTING, JobState.EXPORTING, JobState.REFINING})
_PRESEG_STATES = [JobState.SEGMENTING.value, JobState.SELECTING.value, JobState.EXPORTING.value]


class LeaseLost(RuntimeError):
    """This node no longer holds the work: its lease ran out and another node took it over."""


class StoreMissing(RuntimeError):
    """The state database does not exist or has no i3node schema (and may not be created)."""

metadata = sa.MetaData()

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("study_uid", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # StudyState
    sa.Column("n_instances", sa.Integer, nullable=False, default=0),
    sa.Column("first_received_at", sa.Float, nullable=False),
    sa.Column("last_received_at", sa.Float, nullable=False),
    sa.Column("stable_at", sa.Float),
    sa.Column("reopened", sa.Integer, nullable=False, default=0),
)

series = sa.Table(
    "series",
    metadata,
    sa.Column("series_uid", sa.String(64), primary_key=True),
    sa.Column("study_uid", sa.String(64), sa.ForeignKey("studies.study_uid"), nullable=False, index=True),
    sa.Column("modality", sa.String(16), nullable=False, default=""),
    sa.Column("sop_class_uid", sa.String(64), nullable=False, default=""),
    sa.Column("description", sa.String(64), nullable=False, default=""),
    sa.Column("series_number", sa.Integer),
    sa.Column("n_instances", sa.Integer, nullable=False, default=0),
    sa.Column("last_received_at", sa.Float, nullable=False),
    sa.Column("jobbed_instances", sa.Integer, nullable=False, default=0),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("sop_uid", sa.String(64), primary_key=True),
    sa.Column("series_uid", sa.String(64), sa.ForeignKey("series.series_uid"), nullable=False, index=True),
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("calling_ae", sa.String(16), nullable=False, default=""),
    sa.Column("instance_number", sa.Integer),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("peer_address", sa.String(64), nullable=False, server_default=""),
    # 0 until the instance's ``instances_stored`` audit event is written (node.audit).
    sa.Column("audited", sa.Boolean, nullable=False, server_default=sa.true(), index=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_uid", sa.String(64), nullable=False, index=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("version", sa.Integer, nullable=False, default=1),
    sa.Column("data", sa.Text, nullable=False, default="{}"),  # JSON: picks, output UIDs, ...
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("not_before", sa.Float, nullable=False, default=0.0),
    sa.Column("owner", sa.String(64), index=True),  # the node holding the job (CLAIMED_STATES)
    sa.Column("lease_until", sa.Float),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("node", sa.String(64), nullable=False, server_default=""),  # who made the transition
)

outputs = sa.Table(
    "outputs",
    metadata,
    sa.Column("sop_uid", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # seg | kos | mpr
    sa.Column("series_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("output_uid", sa.String(64), sa.ForeignKey("outputs.sop_uid"), nullable=False, index=True),
    sa.Column("destination", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),  # DeliveryState
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False, default=0.0),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("owner", sa.String(64), index=True),  # the node sending it right now
    sa.Column("lease_until", sa.Float),
    sa.UniqueConstraint("output_uid", "destination"),
)

corrections = sa.Table(
    "corrections",
    metadata,
    sa.Column("sop_uid", sa.String(64), primary_key=True),  # the inbound corrected SEG
    sa.Column("series_uid", sa.String(64), nullable=False),  # the SEG's own series
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
    sa.Column("state", sa.String(16), nullable=False, index=True),  # CorrectionState
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("owner", sa.String(64), index=True),  # the node processing it
    sa.Column("lease_until", sa.Float),
    sa.Column("not_before", sa.Float, nullable=False, server_default="0"),  # retry delay
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),  # refinement attempts that failed
)


@dataclass(frozen=True)
class RecordOutcome:
    """Result of :meth:`Store.record_instance`."""

    new: bool
    reopened_study: bool


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


# -- prebuilt statements of the receive path (see Store.record_instance) -------------
_P = sa.bindparam
_Q_INSTANCE_EXISTS = sa.select(instances.c.study_uid, instances.c.series_uid).where(instances.c.sop_uid == _P("sop"))
_Q_TOUCH_RECEIVING = (
    studies.update()
    .where(studies.c.study_uid == _P("study"), studies.c.state == StudyState.RECEIVING.value)
    .values(last_received_at=_P("now"))
)
_Q_STUDY_STATE = sa.select(studies.c.state).where(studies.c.study_uid == _P("study"))
_STUDY_INSERT_VALUES = dict(
    study_uid=_P("study"), state=StudyState.RECEIVING.value, n_instances=1,
    first_received_at=_P("now"), last_received_at=_P("now"), reopened=0,
)
_Q_STUDY_RECEIVE = (
    studies.update()
    .where(studies.c.study_uid == _P("study"))
    .values(
        state=StudyState.RECEIVING.value,
        n_instances=studies.c.n_instances + 1,
        last_received_at=_P("now"),
        reopened=studies.c.reopened + _P("reopened"),
    )
)
_Q_SERIES_EXISTS = sa.select(series.c.study_uid).where(series.c.series_uid == _P("series"))
_SERIES_INSERT_VALUES = dict(
    series_uid=_P("series"), study_uid=_P("study"), modality=_P("modality"),
    sop_class_uid=_P("sop_class"), description=_P("description"),
    series_number=_P("number"), n_instances=1, last_received_at=_P("now"), jobbed_instances=0,
)
_Q_SERIES_RECEIVE = (
    series.update()
    .where(series.c.series_uid == _P("series"))
    .values(n_instances=series.c.n_instances + 1, last_received_at=_P("now"))
)
_Q_INSTANCE_INSERT = instances.insert().values(
    sop_uid=_P("sop"), series_uid=_P("series"), study_uid=_P("study"),
    sop_class_uid=_P("sop_class"), path=_P("path"), size=_P("size"),
    calling_ae=_P("calling_ae"), instance_number=_P("number"), received_at=_P("now"),
    peer_address=_P("peer"), audited=False,
)


def claim_statement(table: sa.Table, key: sa.Column[Any], where: Sequence[Any], order_by: Sequence[Any],
                    values: Mapping[str, Any], *, limit: int = 1, returning: Sequence[Any] = ()) -> Any:
    """The claim: ``UPDATE table SET values WHERE key IN (SELECT key WHERE ... ORDER BY ... LIMIT n
    FOR UPDATE SKIP LOCKED) AND ... RETURNING``.

    One statement, so two nodes never claim the same row: on PostgreSQL the sub-select
    locks the rows it picks and skips rows another transaction holds, and the conditions
    are checked again on the rows updated; SQLite runs one writer at a time.  Returns
    ``returning`` (default: every column) of the rows claimed.
    """
    pick = (sa.select(key).where(*where).order_by(*order_by).limit(limit)
            .with_for_update(skip_locked=True).scalar_subquery())
    # `key = (SELECT ... LIMIT 1)` is one InitPlan on PostgreSQL; `IN` for a batch.
    chosen = key == pick if limit == 1 else key.in_(pick)
    return table.update().where(chosen, *where).values(**values).returning(*(returning or table.c))


def _insert_if_absent(engine: Engine, table: sa.Table) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING <key>`` in the engine's dialect (PostgreSQL, SQLite).

    A row comes back only when the insert happened (``rowcount`` is not reliable for
    this statement with every driver).
    """
    key = list(table.primary_key.columns)
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing().returning(*key)
    if engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing().returning(*key)
    raise ValueError(f"storage.database_url: unsupported database {engine.dialect.name!r} (use sqlite or postgresql)")


class Store:
    """The node's state database.

    Parameters
    ----------
    url
        SQLAlchemy URL.  ``sqlite:///path`` creates the parent directory.
    node_id
        This node's name: the owner of the work it claims, recorded with every job event.
    lease_s
        Lease on claimed work, in seconds.
    create
        Create or upgrade the schema (a node starting).  False (``i3node status``):
        raise :class:`StoreMissing` when there is no i3node database there, rather than
        creating an empty one.
    """

    def __init__(self, url: str, *, node_id: str = "i3node", lease_s: float = 60.0, create: bool = True) -> None:
        self.url = url
        self.node_id = node_id
        self.lease_s = float(lease_s)
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            db_path = url.split("///", 1)[-1]
            if db_path and db_path != ":memory:":
                if not create and not Path(db_path).is_file():
                    raise StoreMissing(f"no state database at {db_path}")
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True  # a database restart must not fail the next query
        self.engine: Engine = sa.create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if create:
            migrations.upgrade(self.engine)
        else:
            with self.engine.connect() as c:
                if not sa.inspect(c).has_table("jobs"):
                    self.engine.dispose()
                    raise StoreMissing("the database has no i3node tables")
        self._q_study_insert = _insert_if_absent(self.engine, studies).values(**_STUDY_INSERT_VALUES)
        self._q_series_insert = _insert_if_absent(self.engine, series).values(**_SERIES_INSERT_VALUES)
        # SQLite allows one writer; serialising writers here avoids busy retries.
        self._write_lock = threading.Lock()

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    # -- helpers ---------------------------------------------------------
    def _tx(self) -> Any:
        return self.engine.begin()

    # -- instances -------------------------------------------------------
    def record_instance(self, rec: StoredInstance, now: float | None = None) -> RecordOutcome:
        """Record a received instance; idempotent for a SOP Instance UID already known.

        The row, its series and study are committed before this returns, so a
        caller may acknowledge the instance afterwards.  A new instance for a study
        that was already stable re-opens it (it is swept again later).

        Raises
        ------
        dicom.scp.InstanceConflict
            When the SOP Instance UID is recorded under another series or study, or the
            Series Instance UID belongs to another study (nothing is recorded; a job must
            never mix the slices of two studies).
        """
        now = time.time() if now is None else now
        # Prebuilt statements with bound parameters: this runs once per received
        # instance, before its C-STORE is acknowledged, and building SQLAlchemy
        # statements per call cost more than the database work.
        for attempt in range(3):
            try:
                with self._write_lock, self._tx() as c:
                    outcome = self._record(c, rec, now)
                break
            except sa.exc.IntegrityError:
                # Another receiver recorded the same instance at the same moment (several
                # nodes on one database): look again, it is a duplicate now.
                if attempt == 2:
                    raise
        if outcome.reopened_study:
            log.info("late instance re-opened stable study %s", rec.study_uid)
        return outcome

    def _record(self, c: Connection, rec: StoredInstance, now: float) -> RecordOutcome:
        known = c.execute(_Q_INSTANCE_EXISTS, {"sop": rec.sop_uid}).first()
        if known is not None:
            if (known.study_uid, known.series_uid) != (rec.study_uid, rec.series_uid):
                raise InstanceConflict(f"SOP Instance UID already stored in series {known.series_uid}")
            # A re-sent instance shows the sender is still at work on a study that is
            # receiving: it keeps the stability clock from running out mid-resend.
            c.execute(_Q_TOUCH_RECEIVING, {"study": rec.study_uid, "now": now})
            return RecordOutcome(new=False, reopened_study=False)
        # A missing study or series row is inserted with ON CONFLICT DO NOTHING, so two
        # receivers starting the same study at once both succeed; the common case (the row
        # exists) costs one look-up and one update, as before.
        reopened = False
        st = c.execute(_Q_STUDY_STATE, {"study": rec.study_uid}).first()
        if st is None and c.execute(self._q_study_insert, {"study": rec.study_uid, "now": now}).first() is None:
            st = c.execute(_Q_STUDY_STATE, {"study": rec.study_uid}).first()  # another receiver was first
        if st is not None:
            reopened = st.state == StudyState.STABLE.value
            c.execute(_Q_STUDY_RECEIVE, {"study": rec.study_uid, "now": now, "reopened": 1 if reopened else 0})
        series_row = {
            "series": rec.series_uid, "study": rec.study_uid, "modality": rec.modality,
            "sop_class": rec.sop_class_uid, "description": rec.series_description[:64],
            "number": rec.series_number, "now": now,
        }
        owner = c.execute(_Q_SERIES_EXISTS, {"series": rec.series_uid}).first()
        if owner is None and c.execute(self._q_series_insert, series_row).first() is None:
            owner = c.execute(_Q_SERIES_EXISTS, {"series": rec.series_uid}).first()
        if owner is not None:
            if owner.study_uid != rec.study_uid:
                raise InstanceConflict(f"Series Instance UID already used in study {owner.study_uid}")
            c.execute(_Q_SERIES_RECEIVE, {"series": rec.series_uid, "now": now})
        c.execute(
            _Q_INSTANCE_INSERT,
            {
                "sop": rec.sop_uid, "series": rec.series_uid, "study": rec.study_uid,
                "sop_class": rec.sop_class_uid, "path": str(rec.path), "size": rec.size,
                "calling_ae": rec.calling_ae, "number": rec.instance_number, "now": now,
                "peer": rec.peer_address[:64],
            },
        )
        return RecordOutcome(new=True, reopened_study=reopened)

    def unaudited_instances(self, limit: int = 10000) -> list[Row]:
        """Recorded instances whose audit event is not written yet, oldest first.

        Rows: ``sop_uid, study_uid, calling_ae, peer_address, received_at``.
        """
        q = (sa.select(instances.c.sop_uid, instances.c.study_uid, instances.c.calling_ae,
                       instances.c.peer_address, instances.c.received_at)
             .where(instances.c.audited == sa.false()).order_by(instances.c.received_at).limit(int(limit)))
        with self.engine.connect() as c:
            return [r._mapping for r in c.execute(q)]

    def mark_audited(self, sop_uids: Sequence[str]) -> None:
        """Note that these instances' audit events are written."""
        if not sop_uids:
            return
        with self._write_lock, self._tx() as c:
            for start in range(0, len(sop_uids), 500):
                chunk = list(sop_uids[start:start + 500])
                c.execute(instances.update().where(instances.c.sop_uid.in_(chunk)).values(audited=True))

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Paths of every recorded instance of a series."""
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(instances.c.path).where(instances.c.series_uid == series_uid).order_by(instances.c.path)
            ).all()
        return [Path(r.path) for r in rows]

    def count_instances(self, series_uid: str | None = None) -> int:
        """Number of recorded instances (of one series, or all)."""
        q = sa.select(sa.func.count()).select_from(instances)
        if series_uid is not None:
            q = q.where(instances.c.series_uid == series_uid)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar_one())

    def has_instance(self, sop_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is recorded."""
        with self.engine.connect() as c:
            return c.execute(sa.select(instances.c.sop_uid).where(instances.c.sop_uid == sop_uid)).first() is not None

    # -- studies and series ------------------------------------------------
    def studies(self) -> list[Row]:
        """All studies, newest first."""
        with self.engine.connect() as c:
            return [r._mapping for r in c.execute(sa.select(studies).order_by(studies.c.last_received_at.desc()))]

    def series_rows(self, study_uid: str | None = None) -> list[Row]:
        """Series rows, of one study or all."""
        q = sa.select(series).order_by(series.c.study_uid, series.c.series_number)
        if study_uid is not None:
            q = q.where(series.c.study_uid == study_uid)
        with self.engine.connect() as c:
            return [r._mapping for r in c.execute(q)]

    def series_row(self, series_uid: str) -> Row | None:
        """One series row, or None."""
        with self.engine.connect() as c:
            r = c.execute(sa.select(series).where(series.c.series_uid == series_uid)).first()
        return None if r is None else r._mapping

    def due_studies(self, now: float, stable_after_s: float) -> list[str]:
        """Study UIDs still receiving whose last instance is older than ``stable_after_s``."""
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(studies.c.study_uid).where(
                    studies.c.state == StudyState.RECEIVING.value, studies.c.last_received_at <= now - stable_after_s
                )
            ).all()
        return [r.study_uid for r in rows]

    def mark_stable(
        self,
        study_uid: str,
        now: float,
        stable_after_s: float,
        new_jobs: Sequence[tuple[str, int]],
    ) -> list[int]:
        """Mark a study stable and create its jobs, in one transaction.

        Parameters
        ----------
        new_jobs
            ``(series_uid, n_instances)`` of each series that gets a job.

        Returns
        -------
        list of int
            The new job ids.  Nothing happens (empty list) if an instance arrived
            after the sweep looked, i.e. the study is no longer due.
        """
        ids: list[int] = []
        with self._write_lock, self._tx() as c:
            res = c.execute(
                studies.update()
                .where(
                    studies.c.study_uid == study_uid,
                    studies.c.state == StudyState.RECEIVING.value,
                    studies.c.last_received_at <= now - stable_after_s,
                )
                .values(state=StudyState.STABLE.value, stable_at=now)
            )
            if res.rowcount != 1:
                return []
            for series_uid, n in new_jobs:
                upd = c.execute(
                    series.update()
                    .where(series.c.series_uid == series_uid, series.c.n_instances == n)
                    .values(jobbed_instances=n)
                )
                if upd.rowcount != 1:
                    continue
                jid = self._create_job(c, study_uid, series_uid, now)
                ids.append(jid)
        return ids

    # -- jobs --------------------------------------------------------------
    def _create_job(self, c: Connection, study_uid: str, series_uid: str, now: float) -> int:
        r = c.execute(
            jobs.insert().values(
                study_uid=study_uid, series_uid=series_uid, state=JobState.QUEUED.value, reason="",
                attempts=0, version=1, data="{}", created_at=now, updated_at=now, not_before=0.0,
            )
        )
        jid = int(r.inserted_primary_key[0])  # type: ignore[index]  # always set for one insert
        self._event(c, jid, JobState.QUEUED.value, "study stable", now)
        return jid

    def job(self, job_id: int) -> Row | None:
        """One job row, or None."""
        with self.engine.connect() as c:
            r = c.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return None if r is None else r._mapping

    def jobs(self, states: Sequence[str] | None = None) -> list[Row]:
        """Jobs, optionally only those in ``states``, oldest first."""
        q = sa.select(jobs).order_by(jobs.c.id)
        if states is not None:
            q = q.where(jobs.c.state.in_([str(getattr(s, "value", s)) for s in states]))
        with self.engine.connect() as c:
            return [r._mapping for r in c.execute(q)]

    def job_data(self, job_id: int) -> dict[str, Any]:
        """The JSON data of a job."""
        row = self.job(job_id)
        if row is None:
            raise KeyError(f"job {job_id} does not exist")
        return dict(json.loads(row["data"]))

    def set_job_state(
        self,
        job_id: int,
        state: JobState,
        *,
        reason: str = "",
        attempts: int | None = None,
        data: Mapping[str, Any] | None = None,
        version: int | None = None,
        not_before: float | None = None,
        now: float | None = None,
        owned: bool = False,
    ) -> None:
        """Move a job to ``state`` and record the transition with its timestamp and this node.

        A job moving into one of :data:`CLAIMED_STATES` is held by this node (owner and a
        fresh lease); any other state releases it.  The transition is guarded: with
        ``owned`` the job must be held by this node, without it the job must be held by
        this node or by none, so one node never overwrites work another node holds.

        Raises
        ------
        LeaseLost
            With ``owned``, when this node no longer holds the job.
        KeyError
            Without ``owned``, when the job does not exist or another node holds it.
        """
        now = time.time() if now is None else now
        values: dict[str, Any] = {"state": state.value, "reason": reason, "updated_at": now}
        values.update(self._claim_values(state in CLAIMED_STATES, now))
        if attempts is not None:
            values["attempts"] = attempts
        if data is not None:
            values["data"] = json.dumps(dict(data), sort_keys=True)
        if version is not None:
            values["version"] = version
        if not_before is not None:
            values["not_before"] = not_before
        held = jobs.c.owner == self.node_id
        guard = held if owned else sa.or_(held, jobs.c.owner.is_(None))
        with self._write_lock, self._tx() as c:
            res = c.execute(jobs.update().where(jobs.c.id == job_id, guard).values(**values))
            if res.rowcount != 1:
                if owned:
                    raise LeaseLost(f"job {job_id} is no longer held by node {self.node_id}")
                raise KeyError(f"job {job_id} does not exist or another node holds it")
            self._event(c, job_id, state.value, reason, now)

    def _claim_values(self, hold: bool, now: float) -> dict[str, Any]:
        if hold:
            return {"owner": self.node_id, "lease_until": now + self.lease_s}
        return {"owner": None, "lease_until": None}

    def _event(self, c: Connection, job_id: int, state: str, reason: str, now: float) -> None:
        c.execute(job_events.insert().values(job_id=job_id, state=state, reason=reason, at=now, node=self.node_id))

    def job_events(self, job_id: int) -> list[Row]:
        """State transitions of a job, oldest first."""
        with self.engine.connect() as c:
            return [
                r._mapping
                for r in c.execute(sa.select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id))
            ]

    def job_counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
        return {r[0]: int(r[1]) for r in rows}

    def iter_rows(self, table: sa.Table) -> Iterator[Row]:
        """Every row of a table (status and tests)."""
        with self.engine.connect() as c:
            for r in c.execute(sa.select(table)):
                yield r._mapping

    # -- outputs and corrections ------------------------------------------
    def is_own_output(self, sop_uid: str) -> bool:
        """Whether ``sop_uid`` is an object this node created (by recorded UID)."""
        with self.engine.connect() as c:
            return c.execute(sa.select(outputs.c.sop_uid).where(outputs.c.sop_uid == sop_uid)).first() is not None

    def outputs_of_job(self, job_id: int, version: int | None = None) -> list[Row]:
        """Output rows of a job (one version or all)."""
        q = sa.select(outputs).where(outputs.c.job_id == job_id).order_by(outputs.c.version, outputs.c.kind)
        if version is not None:
            q = q.where(outputs.c.version == version)
        with self.engine.connect() as c:
            return [r._mapping for r in c.execute(q)]

    def add_correction(self, sop_uid: str, series_uid: str, now: float | None = None) -> bool:
        """Record an inbound corrected SEG as pending; False if it was already known."""
        now = time.time() if now is None else now
        with self._write_lock, self._tx() as c:
            inserted = c.execute(
                _insert_if_absent(self.engine, corrections).values(
                    sop_uid=sop_uid, series_uid=series_uid, job_id=None, state=CorrectionState.PENDING.value,
                    reason="", received_at=now, not_before=0.0,
                )
            ).first()
        return inserted is not None

    def count_correction_failure(self, sop_uid: str) -> int:
        """Count one failed refinement of a corrected SEG; returns its failures so far."""
        with self._write_lock, self._tx() as c:
            c.execute(corrections.update().where(corrections.c.sop_uid == sop_uid)
                      .values(failures=corrections.c.failures + 1))
            return int(c.execute(sa.select(corrections.c.failures).where(corrections.c.sop_uid == sop_uid)).scalar_one())

    def corrections(self, states: Sequence[CorrectionState] | None = None) -> list[Row]:
        """Corrected-SEG rows, oldest first."""
        q = sa.select(corrections).order_by(corrections.c.received_at)
        if states is not None:
            q = q.where(corrections.c.state.in_([CorrectionState(s).value for s in states]))
        with self.engine.connect() as c:
            return [r._mapping for r in c.execute(q)]

    def set_correction(
        self,
        sop_uid: str,
        state: CorrectionState,
        *,
        job_id: int | None = None,
        reason: str = "",
        not_before: float | None = None,
    ) -> None:
        """Update the state of a corrected SEG (``processing`` holds it for this node, others release it).

        Like :meth:`set_job_state`, a SEG another node is processing is left alone.
        """
        state = CorrectionState(state)
        values: dict[str, Any] = {"state": state.value, "reason": reason}
        values.update(self._claim_values(state is CorrectionState.PROCESSING, time.time()))
        if job_id is not None:
            values["job_id"] = job_id
        if not_before is not None:
            values["not_before"] = not_before
        with self._write_lock, self._tx() as c:
            c.execute(
                corrections.update()
                .where(corrections.c.sop_uid == sop_uid,
                       sa.or_(corrections.c.owner.is_(None), corrections.c.owner == self.node_id))
                .values(**values)
            )

    def instance_path(self, sop_uid: str) -> Path | None:
        """Spool path of a recorded instance."""
        with self.engine.connect() as c:
            r = c.execute(sa.select(instances.c.path).where(instances.c.sop_uid == sop_uid)).first()
        return None if r is None else Path(r.path)

    def latest_job_for_series(self, series_uid: str, states: Sequence[str]) -> Row | None:
        """The newest job of a series in one of ``states``."""
        with self.engine.connect() as c:
            r = c.execute(
                sa.select(jobs)
                .where(jobs.c.series_uid == series_uid, jobs.c.state.in_(list(states)))
                .order_by(jobs.c.id.desc())
            ).first()
        return None if r is None else r._mapping

    def restart_stability_clocks(self, now: float | None = None) -> int:
        """Restart the stability wait of every study still receiving (at node start).

        While the node was down it could not see whether the sender went on, so a study
        interrupted mid-transfer must not count as complete the moment the node is back.
        """
        now = time.time() if now is None else now
        with self._write_lock, self._tx() as c:
            res = c.execute(
                studies.update().where(studies.c.state == StudyState.RECEIVING.value).values(last_received_at=now)
            )
        return int(res.rowcount or 0)

    # -- claims: several nodes on one database ------------------------------
    def claim_job(self, now: float | None = None) -> Row | None:
        """Claim the oldest queued job whose retry delay has passed; None when there is none.

        One atomic statement moves it to ``segmenting``, held by this node with a fresh
        lease, and counts the attempt; two nodes never claim the same job.
        """
        now = time.time() if now is None else now
        stmt = claim_statement(
            jobs, jobs.c.id, [jobs.c.state == JobState.QUEUED.value, jobs.c.not_before <= now], [jobs.c.id],
            dict(state=JobState.SEGMENTING.value, reason="", updated_at=now, attempts=jobs.c.attempts + 1,
                 **self._claim_values(True, now)),
        )
        with self._write_lock, self._tx() as c:
            row = c.execute(stmt).first()
            if row is None:
                return None
            self._event(c, int(row.id), JobState.SEGMENTING.value, f"claimed (attempt {row.attempts})", now)
        return row._mapping

    def claim_for_refinement(self, job_id: int, reason: str, now: float | None = None) -> bool:
        """Hold a job that awaits corrections (or is done) for a refinement; False if it is busy.

        The job moves to ``refining`` only if no node holds it, so two corrected SEGs of
        one job are never refined at once.
        """
        now = time.time() if now is None else now
        with self._write_lock, self._tx() as c:
            res = c.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id,
                    jobs.c.owner.is_(None),
                    jobs.c.state.in_([JobState.AWAITING_CORRECTION.value, JobState.DONE.value]),
                )
                .values(state=JobState.REFINING.value, reason=reason, updated_at=now, **self._claim_values(True, now))
            )
            if res.rowcount != 1:
                return False
            self._event(c, job_id, JobState.REFINING.value, reason, now)
        return True

    def claim_correction(self, now: float | None = None) -> Row | None:
        """Claim the oldest pending corrected SEG (state ``processing``, held by this node)."""
        now = time.time() if now is None else now
        stmt = claim_statement(
            corrections, corrections.c.sop_uid,
            [corrections.c.state == CorrectionState.PENDING.value, corrections.c.not_before <= now],
            [corrections.c.received_at, corrections.c.sop_uid],
            dict(state=CorrectionState.PROCESSING.value, **self._claim_values(True, now)),
        )
        with self._write_lock, self._tx() as c:
            row = c.execute(stmt).first()
        return None if row is None else row._mapping

    def renew_leases(self, now: float | None = None) -> int:
        """Extend the lease of all work this node holds; returns the number of rows renewed."""
        now = time.time() if now is None else now
        n = 0
        with self._write_lock, self._tx() as c:
            for table in (jobs, corrections, deliveries):
                res = c.execute(
                    table.update().where(table.c.owner == self.node_id).values(lease_until=now + self.lease_s)
                )
                n += int(res.rowcount or 0)
        return n

    def reap_expired(self, now: float | None = None) -> list[int]:
        """Give back work whose lease ran out (its node died or hung); returns the job ids requeued.

        A presegmentation job goes back to ``queued`` (its attempt stays counted), a
        refinement back to where it was, with its corrected SEG pending again; deliveries
        are released (they stay pending).  Any node may run this.
        """
        now = time.time() if now is None else now
        expired = sa.and_(jobs.c.owner.is_not(None), jobs.c.lease_until < now)
        return self._release(expired, now, "lease of node {owner} expired", corrections.c.lease_until < now,
                             deliveries.c.lease_until < now)

    def release_own(self, reason: str, now: float | None = None) -> list[int]:
        """Give back all work this node holds (at start, for work of its previous run; at stop)."""
        now = time.time() if now is None else now
        mine = jobs.c.owner == self.node_id
        return self._release(mine, now, reason, corrections.c.owner == self.node_id,
                             deliveries.c.owner == self.node_id)

    def _release(self, job_filter: Any, now: float, reason: str, corr_filter: Any, deliv_filter: Any) -> list[int]:
        ids: list[int] = []
        why: list[str] = []
        with self._write_lock, self._tx() as c:
            rows = c.execute(
                sa.select(jobs.c.id, jobs.c.state, jobs.c.owner, jobs.c.lease_until, jobs.c.data).where(job_filter)
            ).all()
            for r in rows:
                back = JobState.QUEUED
                if r.state == JobState.REFINING.value:
                    back = JobState.DONE if json.loads(r.data).get("refined_versions") else JobState.AWAITING_CORRECTION
                elif r.state not in _PRESEG_STATES:
                    back = JobState(r.state)
                res = c.execute(
                    jobs.update()
                    .where(jobs.c.id == r.id, jobs.c.owner == r.owner, jobs.c.lease_until == r.lease_until)
                    .values(state=back.value, updated_at=now, not_before=0.0, **self._claim_values(False, now))
                )
                if res.rowcount == 1:  # not renewed in the meantime
                    ids.append(int(r.id))
                    why.append(reason.format(owner=r.owner))
                    self._event(c, int(r.id), back.value, why[-1], now)
            c.execute(
                corrections.update()
                .where(corr_filter, corrections.c.state == CorrectionState.PROCESSING.value)
                .values(state=CorrectionState.PENDING.value, **self._claim_values(False, now))
            )
            c.execute(deliveries.update().where(deliv_filter).values(**self._claim_values(False, now)))
        for jid, text in zip(ids, why, strict=True):
            log.warning("job %d requeued: %s", jid, text)
        return ids
