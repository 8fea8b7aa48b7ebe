"""The job runner: one job at a time per device, bounded retries, reasons a human can act on.

:meth:`JobRunner.run_once` is called by the scheduler's single-worker ``models``
executor (so heavy model work never overlaps) and directly by tests.  Corrected SEGs
are handled before new presegmentation jobs: a radiologist waiting for a refinement
is the more urgent customer.

Work is *claimed* in the state store (:meth:`node.store.Store.claim_job`,
:meth:`~node.store.Store.claim_correction`), so several nodes on one database each
run a job exactly once; a node whose claim was taken over (its lease ran out) stops
working on that job and leaves it alone (:class:`node.store.LeaseLost`).
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from node.pipeline import (
    JobBusy,
    PermanentJobError,
    PipelineContext,
    ingest_correction,
    run_refinement,
    run_segmentation,
)
from node.store import CorrectionState, JobState, LeaseLost

__all__ = ["JobRunner", "RunSummary", "failure_reason", "failure_trace"]

log = logging.getLogger(__name__)


def _own_exception_types() -> tuple[type[BaseException], ...]:
    """Exceptions whose messages this code base writes itself: UIDs, counts, keys, never values."""
    from dicom.seg_reader import SegReadError
    from dicom.series import SeriesError
    from models.nnunet import ModelError
    from models.refinement import RefinementModelError

    return (PermanentJobError, SeriesError, SegReadError, ModelError, RefinementModelError)


def failure_reason(exc: BaseException) -> str:
    """What went wrong, for the job's reason, the status and the log - without attribute values.

    Messages of this code base's own exceptions are kept; an ``OSError`` keeps its error text
    (not its file name); any other exception (pydicom, highdicom, torch, ...) may quote the data
    it choked on - a patient's name or birth date - so only its type and the place it was raised
    are given.
    """
    if isinstance(exc, _own_exception_types()):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__} at {_where(exc.__traceback__)} (message withheld: it may quote patient data)"


def _where(tb: TracebackType | None) -> str:
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/site-packages/" not in f.filename] or frames
    if not ours:
        return "?"
    f = ours[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"


def failure_trace(exc: BaseException, limit: int = 6) -> str:
    """The stack of ``exc`` (files, lines, code) ending in :func:`failure_reason`, never the raw message."""
    lines = traceback.format_list(traceback.extract_tb(exc.__traceback__)[-limit:])
    return "".join(lines) + failure_reason(exc)


@dataclass
class RunSummary:
    """What one :meth:`JobRunner.run_once` did."""

    segmented: int = 0
    refined: int = 0
    failed: int = 0
    retried: int = 0
    unmatched: int = 0
    lost: int = 0  #: jobs another node took over (this node's lease ran out)
    busy: int = 0  #: corrected SEGs put back because their job was being refined


class JobRunner:
    """Runs queued jobs and pending corrections, one at a time.

    Parameters
    ----------
    ctx
        The pipeline context.
    max_attempts
        Attempts per job before it is marked ``failed``.
    retry_delay_s
        First retry delay; doubles per attempt.
    """

    def __init__(self, ctx: PipelineContext, *, max_attempts: int = 3, retry_delay_s: float = 30.0) -> None:
        self.ctx = ctx
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        #: Set when the node stops: no new work is claimed (the running job goes on).
        self.stopping = threading.Event()

    def run_once(self, now: float | None = None) -> RunSummary:
        """Claim and process every pending correction, then every due queued job, one at a time."""
        summary = RunSummary()
        store = self.ctx.store
        while not self.stopping.is_set():
            t = time.time() if now is None else now
            correction = store.claim_correction(t)
            if correction is not None:
                self._guarded(self._correction, str(correction["sop_uid"]), summary)
                continue
            job = store.claim_job(t)
            if job is None:
                break
            if int(job["attempts"]) > self.max_attempts:
                self._guarded(self._give_up, int(job["id"]), summary)
                continue
            self._guarded(self._segment, int(job["id"]), summary)
        return summary

    def _guarded(self, step: Any, key: Any, summary: RunSummary) -> None:
        try:
            step(key, summary)
        except LeaseLost as exc:
            log.warning("%s; this node leaves it to the node that took it over", exc)
            summary.lost += 1

    def _give_up(self, job_id: int, summary: RunSummary) -> None:
        """A job claimed more often than allowed: its earlier runs ended without a result (node lost)."""
        self.ctx.store.set_job_state(
            job_id, JobState.FAILED, owned=True,
            reason=f"gave up after {self.max_attempts} attempts: the node running it stopped or died each time",
        )
        log.error("job %d failed: %d attempts ended without a result", job_id, self.max_attempts)
        summary.failed += 1

    def _segment(self, job_id: int, summary: RunSummary) -> None:
        store = self.ctx.store
        try:
            run_segmentation(self.ctx, job_id)
            summary.segmented += 1
        except LeaseLost:
            raise
        except PermanentJobError as exc:
            store.set_job_state(job_id, JobState.FAILED, reason=str(exc), owned=True)
            log.error("job %d failed: %s (input kept)", job_id, exc)
            summary.failed += 1
        except Exception as exc:  # retried: model, disk or transient failures
            job = store.job(job_id)
            attempts = int(job["attempts"]) if job else self.max_attempts
            reason = failure_reason(exc)
            log.error("job %d attempt %d failed: %s\n%s", job_id, attempts, reason, failure_trace(exc))
            if attempts >= self.max_attempts:
                store.set_job_state(job_id, JobState.FAILED, reason=f"gave up after {attempts} attempts: {reason}",
                                    owned=True)
                summary.failed += 1
            else:
                delay = self.retry_delay_s * 2 ** (attempts - 1)
                store.set_job_state(
                    job_id,
                    JobState.QUEUED,
                    reason=f"attempt {attempts} failed ({reason}); retrying in {delay:.0f} s",
                    not_before=time.time() + delay,
                    owned=True,
                )
                summary.retried += 1

    def _correction(self, sop_uid: str, summary: RunSummary) -> None:
        store = self.ctx.store
        try:
            job_id = ingest_correction(self.ctx, sop_uid)
        except Exception as exc:
            reason = failure_reason(exc)
            store.set_correction(sop_uid, CorrectionState.REJECTED, reason=f"cannot read: {reason}")
            log.error("corrected SEG %s rejected: %s", sop_uid, reason)
            return
        if job_id is None:
            summary.unmatched += 1
            return
        job = store.job(job_id)
        previous = JobState(job["state"]) if job else JobState.AWAITING_CORRECTION
        try:
            run_refinement(self.ctx, job_id, sop_uid)
            summary.refined += 1
        except LeaseLost:
            raise
        except JobBusy as exc:
            store.set_correction(sop_uid, CorrectionState.PENDING, job_id=job_id, reason=f"waiting: {exc}",
                                 not_before=time.time() + min(self.retry_delay_s, 5.0))
            summary.busy += 1
        except PermanentJobError as exc:
            store.set_correction(sop_uid, CorrectionState.REJECTED, job_id=job_id, reason=str(exc))
            self._hand_back(job_id, previous, f"corrected SEG rejected: {exc}")
            summary.failed += 1
        except Exception as exc:
            # Counted per corrected SEG: failures of one SEG never shorten the next one's retries.
            failures = store.count_correction_failure(sop_uid)
            reason = failure_reason(exc)
            log.error("job %d refinement failed: %s\n%s", job_id, reason, failure_trace(exc))
            if failures >= self.max_attempts:
                self._hand_back(job_id, previous, f"refinement failed: {reason}")
                store.set_correction(sop_uid, CorrectionState.FAILED, job_id=job_id,
                                     reason=f"gave up after {failures} attempts: {reason}")
                summary.failed += 1
            else:
                self._hand_back(job_id, previous, f"refinement attempt {failures} failed; retrying")
                store.set_correction(sop_uid, CorrectionState.PENDING, job_id=job_id,
                                     reason=f"attempt {failures} failed: {reason}",
                                     not_before=time.time() + min(self.retry_delay_s, 5.0))
                summary.retried += 1

    def _hand_back(self, job_id: int, previous: JobState, reason: str) -> None:
        """Return a job this node was refining to the state it had; a job it does not hold is left alone."""
        try:
            self.ctx.store.set_job_state(job_id, previous, reason=reason, owned=True)
        except LeaseLost:
            log.debug("job %d: not held by this node, state left as it is", job_id)
