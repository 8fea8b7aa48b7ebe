"""Periodic work driven by apscheduler: the stable-study sweep and, later, retries.

Heavy model work is not run by these periodic jobs directly: they only find work and
hand it to the single-worker job runner (one job at a time per device).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

__all__ = ["NodeScheduler"]

log = logging.getLogger(__name__)


class NodeScheduler:
    """A thin wrapper around a background apscheduler.

    Each periodic task runs in its own executor so a slow task (a model job) never
    delays the sweep.  Tasks do not overlap themselves (``max_instances=1``) and missed
    runs are coalesced.
    """

    def __init__(self) -> None:
        # A periodic task still running when its next run is due is skipped by design
        # (max_instances=1); apscheduler would log a warning every interval of a long job.
        logging.getLogger("apscheduler.scheduler").addFilter(_drop_expected_skips)
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4), "models": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )

    def every(self, name: str, seconds: float, fn: Callable[[], object], *, executor: str = "default") -> None:
        """Run ``fn`` every ``seconds`` (first run immediately)."""

        def guarded() -> None:
            try:
                fn()
            except Exception:  # a failing periodic task must not kill the scheduler
                log.exception("periodic task %s failed", name)

        self._sched.add_job(
            guarded, "interval", seconds=seconds, id=name, name=name, executor=executor,
            next_run_time=_now_dt(),
        )

    def soon(self, name: str, fn: Callable[[], object], *, executor: str = "default") -> None:
        """Run ``fn`` once, as soon as the scheduler runs."""

        def guarded() -> None:
            try:
                fn()
            except Exception:
                log.exception("task %s failed", name)

        self._sched.add_job(guarded, "date", run_date=_now_dt(), id=name, name=name, executor=executor)

    def wake(self, name: str) -> None:
        """Run a periodic task as soon as possible (e.g. after new work arrived)."""
        job = self._sched.get_job(name)
        if job is not None:
            job.modify(next_run_time=_now_dt())

    def start(self) -> None:
        """Start the background thread."""
        self._sched.start()

    def shutdown(self, wait: bool = True) -> None:
        """Stop; with ``wait`` the running tasks finish first."""
        if self._sched.running:
            self._sched.shutdown(wait=wait)


def _drop_expected_skips(record: logging.LogRecord) -> bool:
    """Logging filter: False for apscheduler's "skipped: maximum number of running instances" records."""
    return "maximum number of running instances reached" not in record.getMessage()


def _now_dt():  # type: ignore[no-untyped-def]
    from datetime import datetime

    return datetime.fromtimestamp(time.time(), tz=UTC)
