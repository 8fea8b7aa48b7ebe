"""The job runner: one job at a time per device, bounded retries, reasons a human can act on.

:meth:`JobRunner.run_once` is called by the scheduler's single-worker ``models``
executor (so heavy model work never overlaps) and directly by tests.  Corrected SEGs
are handled before new presegmentation jobs: a radiologist waiting for a refinement
is the more urgent customer.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from types import TracebackType

from node.pipeline import (
    PermanentJobError,
    PipelineContext,
    ingest_correction,
    run_refinement,
    run_segmentation,
)
from node.store import CorrectionState, JobState

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

    def run_once(self, now: float | None = None) -> RunSummary:
        """Process every pending correction, then every due queued job."""
        summary = RunSummary()
        store = self.ctx.store
        while True:
            pending = store.corrections([CorrectionState.PENDING])
            if pending:
                self._correction(pending[0]["sop_uid"], summary)
                continue
            job = store.next_queued_job(time.time() if now is None else now)
            if job is None:
                return summary
            self._segment(int(job["id"]), summary)

    def _segment(self, job_id: int, summary: RunSummary) -> None:
        store = self.ctx.store
        try:
            run_segmentation(self.ctx, job_id)
            summary.segmented += 1
        except PermanentJobError as exc:
            store.set_job_state(job_id, JobState.FAILED, reason=str(exc))
            log.error("job %d failed: %s (input kept)", job_id, exc)
            summary.failed += 1
        except Exception as exc:  # retried: model, disk or transient failures
            job = store.job(job_id)
            attempts = int(job["attempts"]) if job else self.max_attempts
            reason = failure_reason(exc)
            log.error("job %d attempt %d failed: %s\n%s", job_id, attempts, reason, failure_trace(exc))
            if attempts >= self.max_attempts:
                store.set_job_state(job_id, JobState.FAILED, reason=f"gave up after {attempts} attempts: {reason}")
                summary.failed += 1
            else:
                delay = self.retry_delay_s * 2 ** (attempts - 1)
                store.set_job_state(
                    job_id,
                    JobState.QUEUED,
                    reason=f"attempt {attempts} failed ({reason}); retrying in {delay:.0f} s",
                    not_before=time.time() + delay,
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
        except PermanentJobError as exc:
            store.set_correction(sop_uid, CorrectionState.REJECTED, job_id=job_id, reason=str(exc))
            store.set_job_state(job_id, previous, reason=f"corrected SEG rejected: {exc}")
            summary.failed += 1
        except Exception as exc:
            data = store.job_data(job_id)
            # Counted per corrected SEG: failures of one SEG never shorten the next one's retries.
            by_sop = dict(data.get("refine_failures", {})) if isinstance(data.get("refine_failures"), dict) else {}
            failures = int(by_sop.get(sop_uid, 0)) + 1
            by_sop[sop_uid] = failures
            data["refine_failures"] = by_sop
            reason = failure_reason(exc)
            log.error("job %d refinement failed: %s\n%s", job_id, reason, failure_trace(exc))
            if failures >= self.max_attempts:
                store.set_correction(sop_uid, CorrectionState.FAILED, job_id=job_id, reason=f"gave up after {failures} attempts: {reason}")
                store.set_job_state(job_id, previous, data=data, reason=f"refinement failed: {reason}")
                summary.failed += 1
            else:
                store.set_correction(sop_uid, CorrectionState.PENDING, job_id=job_id, reason=f"attempt {failures} failed: {reason}")
                store.set_job_state(job_id, previous, data=data, reason=f"refinement attempt {failures} failed; retrying")
                summary.retried += 1
                time.sleep(min(self.retry_delay_s, 5.0))
