"""Retention: purge received instances and delivered outputs once they are no longer needed.

Two independent rules (``[retention]`` in the settings; ``0`` days keeps data forever):

**Spool** (``spool_days``): a received instance is purged when

* its study is *stable* (not receiving; a late instance re-opens a study and blocks it);
* every job of its series is final (``done`` or ``failed``) and was last updated before
  the cut-off; a series without a job of its own (a localizer, a SEG the radiologist sent
  back, ...) needs every job of its *study* to be final and older than the cut-off;
* it was received before the cut-off, and it is not a corrected SEG still *pending*.

A job ``awaiting_correction`` is not final: its images are kept, since refinement needs
them. A correction arriving after the purge can no longer be applied; choose
``spool_days`` longer than the radiologists' review time.

**Outputs** (``outputs_days``): an output (SEG, KOS, MPR image) is purged when it has at
least one delivery row, *every* delivery is ``delivered`` (never ``pending`` or ``dead``,
never an output without deliveries), the last delivery and the output itself are older
than the cut-off, and its job is final.

:func:`plan_purge` only reads; :func:`dry_run` renders a plan as text;
:func:`execute_purge` re-checks every item against the database, deletes the files
(fsync'ing their directories), and then deletes the rows in one transaction, so a crash
in between leaves rows whose files are already gone, which the next purge removes.
Instance rows are deleted (series/study counters are kept, so a study sent again after
its purge is recognised as new instances and gets a new job).

Paths and UIDs only are logged, never patient attributes.

:func:`disk_pressure` tells whether the spool is below its free-space reserve (the SCP
then answers C-STORE with ``0xA700``).
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from dicom import spool as _spool
from node.store import CorrectionState, Store, StudyState, corrections, deliveries, instances, jobs, outputs, studies

__all__ = [
    "DAY_S",
    "FINAL_JOB_STATES",
    "PurgeInstance",
    "PurgeOutput",
    "PurgePlan",
    "PurgeResult",
    "plan_purge",
    "execute_purge",
    "dry_run",
    "purge_once",
    "disk_pressure",
]

log = logging.getLogger(__name__)

DAY_S = 86400.0
#: Job states after which a job's source images may be purged.
FINAL_JOB_STATES: frozenset[str] = frozenset({"done", "failed"})
_CHUNK = 500


@dataclass(frozen=True)
class PurgeInstance:
    """A received instance to purge.

    Attributes
    ----------
    sop_uid, series_uid, study_uid : str
        UIDs.
    path : pathlib.Path
        Spool file.
    size : int
        Size recorded at reception, in bytes.
    received_at : float
        POSIX time of reception.
    """

    sop_uid: str
    series_uid: str
    study_uid: str
    path: Path
    size: int
    received_at: float


@dataclass(frozen=True)
class PurgeOutput:
    """A delivered output to purge.

    Attributes
    ----------
    sop_uid : str
        SOP Instance UID of the output.
    job_id : int
        Its job.
    study_uid : str
        Study of the job.
    kind : str
        ``seg``, ``kos`` or ``mpr``.
    path : pathlib.Path
        Output file.
    size : int
        File size at planning time (0 if the file is already gone).
    delivered_to : tuple of str
        Destination AE titles it was delivered to.
    last_delivered_at : float
        POSIX time of the last delivery.
    """

    sop_uid: str
    job_id: int
    study_uid: str
    kind: str
    path: Path
    size: int
    delivered_to: tuple[str, ...]
    last_delivered_at: float


@dataclass(frozen=True)
class PurgePlan:
    """What a purge would delete (see :func:`plan_purge`).

    Attributes
    ----------
    now : float
        Reference time (POSIX seconds).
    spool_days, outputs_days : float
        Retention periods used (``0`` = keep forever).
    instances : tuple of PurgeInstance
        Received instances to delete.
    outputs : tuple of PurgeOutput
        Delivered outputs to delete.
    """

    now: float
    spool_days: float
    outputs_days: float
    instances: tuple[PurgeInstance, ...] = ()
    outputs: tuple[PurgeOutput, ...] = ()

    @property
    def paths(self) -> list[Path]:
        """Every file the plan deletes."""
        return [i.path for i in self.instances] + [o.path for o in self.outputs]

    @property
    def total_bytes(self) -> int:
        """Bytes the plan frees (recorded sizes)."""
        return sum(i.size for i in self.instances) + sum(o.size for o in self.outputs)

    @property
    def empty(self) -> bool:
        """Whether there is nothing to purge."""
        return not self.instances and not self.outputs


@dataclass
class PurgeResult:
    """What :func:`execute_purge` did.

    Attributes
    ----------
    files_deleted : int
        Files removed.
    files_missing : int
        Files already gone (their rows are removed too).
    instance_rows, output_rows, delivery_rows : int
        Rows deleted.
    bytes_freed : int
        Sizes of the files removed.
    skipped : int
        Planned items no longer eligible when executing (e.g. a delivery re-queued).
    errors : list of str
        Files that could not be removed (their rows are kept).
    """

    files_deleted: int = 0
    files_missing: int = 0
    instance_rows: int = 0
    output_rows: int = 0
    delivery_rows: int = 0
    bytes_freed: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


class _PurgeAudit(Protocol):
    def data_purged(self, study_uid: str, instances: int, outputs: int) -> Any: ...


def _check_days(name: str, value: float) -> float:
    v = float(value)
    if v != v or v < 0:  # NaN or negative
        raise ValueError(f"{name} must be >= 0 days (0 keeps data forever), got {value!r}")
    return v


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _spool_candidates(store: Store, cutoff: float, final_states: frozenset[str]) -> list[PurgeInstance]:
    with store.engine.connect() as c:
        job_rows = c.execute(sa.select(jobs.c.study_uid, jobs.c.series_uid, jobs.c.state, jobs.c.updated_at)).all()
        blocked_series: set[str] = set()
        series_with_jobs: set[str] = set()
        blocked_studies: set[str] = set()
        for r in job_rows:
            series_with_jobs.add(r.series_uid)
            if r.state not in final_states or r.updated_at > cutoff:
                blocked_series.add(r.series_uid)
                blocked_studies.add(r.study_uid)
        pending = {
            r.sop_uid for r in c.execute(sa.select(corrections.c.sop_uid).where(corrections.c.state == CorrectionState.PENDING.value))
        }
        q = (
            sa.select(
                instances.c.sop_uid, instances.c.series_uid, instances.c.study_uid, instances.c.path,
                instances.c.size, instances.c.received_at,
            )
            .select_from(instances.join(studies, studies.c.study_uid == instances.c.study_uid))
            .where(instances.c.received_at <= cutoff, studies.c.state == StudyState.STABLE.value)
            .order_by(instances.c.study_uid, instances.c.series_uid, instances.c.sop_uid)
        )
        out: list[PurgeInstance] = []
        for row in c.execute(q):
            if row.sop_uid in pending:
                continue
            if row.series_uid in series_with_jobs:
                if row.series_uid in blocked_series:
                    continue
            elif row.study_uid in blocked_studies:
                continue
            out.append(
                PurgeInstance(
                    row.sop_uid, row.series_uid, row.study_uid, Path(row.path), int(row.size), float(row.received_at)
                )
            )
    return out


def _output_candidates(store: Store, cutoff: float, final_states: frozenset[str]) -> list[PurgeOutput]:
    with store.engine.connect() as c:
        q = (
            sa.select(
                outputs.c.sop_uid, outputs.c.job_id, outputs.c.kind, outputs.c.path, outputs.c.created_at,
                jobs.c.study_uid, jobs.c.state.label("job_state"),
                deliveries.c.destination, deliveries.c.state.label("delivery_state"), deliveries.c.updated_at,
            )
            .select_from(
                outputs.join(jobs, jobs.c.id == outputs.c.job_id).outerjoin(
                    deliveries, deliveries.c.output_uid == outputs.c.sop_uid
                )
            )
            .where(outputs.c.created_at <= cutoff)
            .order_by(outputs.c.job_id, outputs.c.sop_uid)
        )
        grouped: dict[str, list[Any]] = defaultdict(list)
        for r in c.execute(q):
            grouped[r.sop_uid].append(r)
    out: list[PurgeOutput] = []
    for sop_uid, rows in grouped.items():
        first = rows[0]
        if first.job_state not in final_states:
            continue
        if any(r.destination is None or r.delivery_state != "delivered" for r in rows):
            continue  # no delivery at all, or one pending / dead: never purge
        last = max(float(r.updated_at) for r in rows)
        if last > cutoff:
            continue
        path = Path(first.path)
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        out.append(
            PurgeOutput(
                sop_uid, int(first.job_id), str(first.study_uid), str(first.kind), path, int(size),
                tuple(sorted(str(r.destination) for r in rows)), last,
            )
        )
    return out


def plan_purge(
    store: Store,
    now: float,
    spool_days: float,
    outputs_days: float,
    *,
    final_states: Iterable[str] = FINAL_JOB_STATES,
) -> PurgePlan:
    """Find what retention allows to delete (reads only).

    Parameters
    ----------
    store : node.store.Store
        The state store.
    now : float
        Reference time, POSIX seconds.
    spool_days : float
        Keep received instances this many days after reception and after their jobs
        finished; ``0`` keeps them forever.
    outputs_days : float
        Keep delivered outputs this many days after their last delivery; ``0`` keeps
        them forever. Undelivered outputs are always kept.
    final_states : iterable of str, optional
        Job states counted as finished (default ``done`` and ``failed``).

    Returns
    -------
    PurgePlan
        The instances and outputs to delete.

    Raises
    ------
    ValueError
        If a period is negative or NaN.
    """
    sd = _check_days("spool_days", spool_days)
    od = _check_days("outputs_days", outputs_days)
    finals = frozenset(str(getattr(s, "value", s)) for s in final_states)
    inst = _spool_candidates(store, now - sd * DAY_S, finals) if sd > 0 else []
    outs = _output_candidates(store, now - od * DAY_S, finals) if od > 0 else []
    return PurgePlan(float(now), sd, od, tuple(inst), tuple(outs))


def dry_run(plan: PurgePlan) -> str:
    """Render a plan as text, one line per file, then a summary; deletes nothing.

    Parameters
    ----------
    plan : PurgePlan
        The plan.

    Returns
    -------
    str
        The listing (ends with a newline).
    """
    lines = [
        f"retention dry run: spool_days={plan.spool_days:g} outputs_days={plan.outputs_days:g}",
    ]
    for i in plan.instances:
        lines.append(f"instance {i.path} study={i.study_uid} series={i.series_uid} bytes={i.size}")
    for o in plan.outputs:
        lines.append(
            f"output   {o.path} kind={o.kind} job={o.job_id} study={o.study_uid} "
            f"delivered_to={','.join(o.delivered_to)} bytes={o.size}"
        )
    lines.append(
        f"would delete {len(plan.instances)} instance(s) and {len(plan.outputs)} output(s), "
        f"{plan.total_bytes} bytes"
    )
    return "\n".join(lines) + "\n"


def _remove(path: Path, result: PurgeResult, dirs: set[Path]) -> bool:
    """Unlink one file; returns whether its rows may go."""
    try:
        if path.is_dir():
            result.errors.append(f"{path}: is a directory, not removed")
            return False
        path.unlink()
    except FileNotFoundError:
        result.files_missing += 1
        return True
    except OSError as exc:
        result.errors.append(f"{path}: {exc.strerror or type(exc).__name__}")
        log.error("retention: could not remove %s (%s)", path, exc.strerror or type(exc).__name__)
        return False
    result.files_deleted += 1
    dirs.add(path.parent)
    return True


def _prune_empty(directory: Path, expected_name: str) -> Path | None:
    """Remove `directory` if empty and named `expected_name`; return its parent if removed."""
    if directory.name != expected_name:
        return None
    try:
        directory.rmdir()
    except OSError:
        return None
    return directory.parent


def execute_purge(store: Store, plan: PurgePlan, *, audit: _PurgeAudit | None = None) -> PurgeResult:
    """Delete what `plan` lists and is still eligible now, files first, then rows.

    Every item is checked again against the database (with the plan's ``now`` and
    periods), so an output whose delivery was re-queued after planning is kept.

    Parameters
    ----------
    store : node.store.Store
        The state store.
    plan : PurgePlan
        From :func:`plan_purge`.
    audit : object with ``data_purged(study_uid, instances, outputs)``, optional
        Receives one call per study purged (e.g. :meth:`node.audit.AuditLog.data_purged`).

    Returns
    -------
    PurgeResult
        Counts and errors.
    """
    result = PurgeResult()
    if plan.empty:
        return result
    fresh = plan_purge(store, plan.now, plan.spool_days, plan.outputs_days)
    ok_inst = {i.sop_uid for i in fresh.instances}
    ok_out = {o.sop_uid for o in fresh.outputs}
    dirs: set[Path] = set()
    gone_inst: list[PurgeInstance] = []
    gone_out: list[PurgeOutput] = []
    for i in plan.instances:
        if i.sop_uid not in ok_inst:
            result.skipped += 1
        elif _remove(i.path, result, dirs):
            gone_inst.append(i)
    for o in plan.outputs:
        if o.sop_uid not in ok_out:
            result.skipped += 1
        elif _remove(o.path, result, dirs):
            gone_out.append(o)
    result.bytes_freed = sum(i.size for i in gone_inst) + sum(o.size for o in gone_out)

    # Make the unlinks durable before the rows go; then drop emptied spool directories.
    for d in sorted(dirs):
        with contextlib.suppress(OSError):
            _spool.fsync_dir(d)
    parents: set[Path] = set()
    for i in gone_inst:
        series_dir = i.path.parent
        study_dir = _prune_empty(series_dir, i.series_uid)
        if study_dir is not None:
            root = _prune_empty(study_dir, i.study_uid)
            parents.add(root if root is not None else study_dir)
    for d in sorted(parents):
        with contextlib.suppress(OSError):
            _spool.fsync_dir(d)

    inst_uids = [i.sop_uid for i in gone_inst]
    out_uids = [o.sop_uid for o in gone_out]
    lock = getattr(store, "_write_lock", None) or contextlib.nullcontext()
    with lock, store.engine.begin() as c:
        for chunk in _chunks(out_uids):
            result.delivery_rows += c.execute(deliveries.delete().where(deliveries.c.output_uid.in_(chunk))).rowcount
            result.output_rows += c.execute(outputs.delete().where(outputs.c.sop_uid.in_(chunk))).rowcount
        for chunk in _chunks(inst_uids):
            result.instance_rows += c.execute(instances.delete().where(instances.c.sop_uid.in_(chunk))).rowcount

    per_study: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i in gone_inst:
        per_study[i.study_uid][0] += 1
    for o in gone_out:
        per_study[o.study_uid][1] += 1
    for study_uid, (n_inst, n_out) in sorted(per_study.items()):
        log.info("retention: study %s purged (%d instance(s), %d output(s))", study_uid, n_inst, n_out)
        if audit is not None:
            try:
                audit.data_purged(study_uid, n_inst, n_out)
            except Exception:
                log.exception("retention: audit record for study %s failed", study_uid)
    return result


def purge_once(
    store: Store,
    now: float,
    spool_days: float,
    outputs_days: float,
    *,
    audit: _PurgeAudit | None = None,
) -> PurgeResult:
    """Plan and execute one purge (the periodic retention task).

    Parameters
    ----------
    store : node.store.Store
        The state store.
    now : float
        Reference time, POSIX seconds.
    spool_days, outputs_days : float
        Retention periods in days (``0`` keeps forever).
    audit : object with ``data_purged``, optional
        Audit sink, see :func:`execute_purge`.

    Returns
    -------
    PurgeResult
        What was deleted.
    """
    return execute_purge(store, plan_purge(store, now, spool_days, outputs_days), audit=audit)


def disk_pressure(spool_dir: Path | str, min_free_bytes: int) -> bool:
    """Whether the spool's filesystem has less than `min_free_bytes` free.

    The same test the Storage SCP applies before every C-STORE (it answers ``0xA700``
    while this is true).

    Parameters
    ----------
    spool_dir : pathlib.Path or str
        Spool directory (its nearest existing ancestor if missing).
    min_free_bytes : int
        Reserve in bytes; ``0`` disables the check.

    Returns
    -------
    bool
        ``True`` when below the reserve.

    Raises
    ------
    ValueError
        If `min_free_bytes` is negative.
    """
    if min_free_bytes < 0:
        raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
    if min_free_bytes == 0:
        return False
    return _spool.free_bytes(spool_dir) < min_free_bytes
