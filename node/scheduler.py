"""Periodic work driven by apscheduler: the stable-study sweep and, later, retries.

Heavy model work is not run by these periodic jobs directly: they only find work and
hand it to the single-worker job runner (one job at a time per device).
"""
from __future__ import annotations

import logging
import threading
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

    Stopping never waits inside apscheduler: its ``shutdown(wait=True)`` holds the
    scheduler's locks while it joins the task threads, and a task that calls
    :meth:`wake` (which needs those locks) would deadlock it.  This class counts its
    running tasks itself, stops apscheduler without waiting, and then waits for the
    tasks with a deadline (:meth:`shutdown`).
    """

    def __init__(self) -> None:
        # A periodic task still running when its next run is due is skipped by design
        # (max_instances=1); apscheduler would log a warning every interval of a long job.
        logging.getLogger("apscheduler.scheduler").addFilter(_drop_expected_skips)
        self._running: dict[str, int] = {}
        self._idle = threading.Condition()
        self._stopping = False
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4), "models": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )

    def every(self, name: str, seconds: float, fn: Callable[[], object], *, executor: str = "default") -> None:
        """Run ``fn`` every ``seconds`` (first run immediately)."""

        self._sched.add_job(
            self._guard(name, fn), "interval", seconds=seconds, id=name, name=name, executor=executor,
            next_run_time=_now_dt(),
        )

    def soon(self, name: str, fn: Callable[[], object], *, executor: str = "default") -> None:
        """Run ``fn`` once, as soon as the scheduler runs."""

        self._sched.add_job(self._guard(name, fn), "date", run_date=_now_dt(), id=name, name=name, executor=executor)

    def _begin(self, name: str) -> bool:
        """Count a task as running; False once shutdown began (the task must not start)."""
        with self._idle:
            if self._stopping:
                return False
            self._running[name] = self._running.get(name, 0) + 1
            return True

    def _end(self, name: str) -> None:
        with self._idle:
            self._running[name] -= 1
            if not self._running[name]:
                del self._running[name]
            self._idle.notify_all()

    def _guard(self, name: str, fn: Callable[[], object]) -> Callable[[], None]:
        """``fn`` counted while it runs, its exceptions logged (a failing task must not kill the scheduler)."""

        def guarded() -> None:
            if not self._begin(name):
                return
            try:
                fn()
            except Exception:
                log.exception("task %s failed", name)
            finally:
                self._end(name)

        return guarded

    def running(self) -> list[str]:
        """Names of the tasks running now."""
        with self._idle:
            return sorted(self._running)

    def wake(self, name: str) -> None:
        """Run a periodic task as soon as possible (e.g. after new work arrived); no-op when stopping."""
        if self._stopping or not self._sched.running:
            return
        try:
            job = self._sched.get_job(name)
            if job is not None:
                job.modify(next_run_time=_now_dt())
        except Exception:  # the scheduler stopped between the check and the call
            log.debug("wake(%s) ignored: scheduler stopping", name)

    def start(self) -> None:
        """Start the background thread."""
        self._sched.start()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop scheduling and wait up to ``timeout`` seconds (None: forever) for running tasks.

        Returns
        -------
        bool
            True when no task is running any more; False when the deadline passed first
            (the tasks go on in their threads).
        """
        with self._idle:
            self._stopping = True
        if self._sched.running:
            self._sched.shutdown(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.warning("stop: task(s) still running after %.0f s: %s", timeout, ", ".join(sorted(self._running)))
                    return False
                self._idle.wait(left)
        return True


def _drop_expected_skips(record: logging.LogRecord) -> bool:
    """Logging filter: False for apscheduler's "skipped: maximum number of running instances" records."""
    return "maximum number of running instances reached" not in record.getMessage()


def _now_dt():  # type: ignore[no-untyped-def]
    from datetime import datetime

    return datetime.fromtimestamp(time.time(), tz=UTC)
