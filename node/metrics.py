"""Prometheus metrics of the node, served on 127.0.0.1 only.

Everything lives in the :class:`Metrics` object's own
:class:`prometheus_client.CollectorRegistry` (never the process-global one), so several
nodes in one test process do not collide.

==============================  =========  ====================================================
name                            type       meaning
==============================  =========  ====================================================
``instances_received_total``    counter    instances acknowledged to a sender (new ones)
``deliveries_failed_total``     counter    outbound C-STORE attempts that failed
``corrected_segs_total``        counter    radiologist-corrected SEGs matched to a job
``jobs_by_state{state}``        gauge      jobs per state, read from the store at scrape time
``disk_free_bytes``             gauge      free bytes on the spool's filesystem, at scrape time
``gpu_memory_bytes{device,      gauge      torch CUDA memory; only when this process has
kind}``                                    already initialised CUDA (absent otherwise)
``stage_duration_seconds        histogram  duration of pipeline stages (segment, select,
{stage}``                                  export, refine, ...)
==============================  =========  ====================================================

Labels never carry UIDs or any patient data.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.store import JobState

__all__ = ["Metrics", "MetricsServer", "CountingSink", "stage_timer", "JOB_STATES", "STAGE_BUCKETS"]

log = logging.getLogger(__name__)

#: Every job state, exported even when its count is 0 (so dashboards see the series).
JOB_STATES: tuple[str, ...] = tuple(state.value for state in JobState)

#: Histogram buckets (seconds) spanning a DICOM export to a CPU nnU-Net ensemble.
STAGE_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _JobCounts(Protocol):
    def job_counts(self) -> dict[str, int]: ...


class _StateCollector(Collector):
    """Reads job counts, spool free space and GPU memory when Prometheus scrapes."""

    def __init__(self, store: _JobCounts | None, spool_dir: Path | None) -> None:
        self._store = store
        self._spool_dir = spool_dir

    def collect(self) -> Iterable[Any]:
        if self._store is not None:
            try:
                counts = self._store.job_counts()
            except Exception as exc:  # a broken DB must not break the scrape of everything else
                log.warning("metrics: job counts unavailable (%s)", type(exc).__name__)
            else:
                g = GaugeMetricFamily("jobs_by_state", "Number of jobs in each state.", labels=["state"])
                for state in sorted(set(JOB_STATES) | set(counts)):
                    g.add_metric([state], float(counts.get(state, 0)))
                yield g
        if self._spool_dir is not None:
            free = _free_bytes(self._spool_dir)
            if free is not None:
                yield GaugeMetricFamily(
                    "disk_free_bytes", "Free bytes on the filesystem of the spool.", value=float(free)
                )
        gpu = _gpu_memory()
        if gpu:
            g = GaugeMetricFamily(
                "gpu_memory_bytes", "CUDA memory held by this process's torch allocator.", labels=["device", "kind"]
            )
            for device, kind, value in gpu:
                g.add_metric([device, kind], float(value))
            yield g

    def describe(self) -> Iterable[Any]:
        # Collected lazily: describing must not touch the database or CUDA.
        return []


def _free_bytes(path: Path) -> int | None:
    current = path
    while not current.exists() and current.parent != current:
        current = current.parent
    try:
        return int(shutil.disk_usage(current).free)
    except OSError:
        return None


def _gpu_memory() -> list[tuple[str, str, int]]:
    """torch CUDA memory per device, only if torch is already imported and CUDA initialised."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        cuda = torch.cuda
        if not cuda.is_available() or not cuda.is_initialized():
            return []
        out: list[tuple[str, str, int]] = []
        for i in range(cuda.device_count()):
            out.append((f"cuda:{i}", "allocated", int(cuda.memory_allocated(i))))
            out.append((f"cuda:{i}", "reserved", int(cuda.memory_reserved(i))))
        return out
    except Exception as exc:  # CUDA errors must never break a scrape
        log.debug("metrics: GPU memory unavailable (%s)", type(exc).__name__)
        return []


class MetricsServer:
    """Handle of a running metrics HTTP endpoint (see :meth:`Metrics.start_http`).

    Attributes
    ----------
    host : str
        Bound address (always ``127.0.0.1``).
    port : int
        Bound port (the ephemeral one if 0 was asked for).
    """

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = "127.0.0.1"
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        """URL of the metrics page."""
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Metrics:
    """The node's Prometheus metrics in a private registry.

    Parameters
    ----------
    store : object with ``job_counts() -> dict[str, int]``, optional
        The state store (:class:`node.store.Store`); ``jobs_by_state`` is read from it at
        scrape time. ``None`` leaves the gauge out.
    spool_dir : pathlib.Path, optional
        Spool directory for ``disk_free_bytes``; ``None`` leaves the gauge out.

    Examples
    --------
    >>> metrics = Metrics(store, settings.spool_dir)  # doctest: +SKIP
    >>> server = metrics.start_http(9464)  # doctest: +SKIP
    >>> with metrics.time_stage("segment"):  # doctest: +SKIP
    ...     run_ensemble()
    >>> server.stop()  # doctest: +SKIP
    """

    def __init__(self, store: _JobCounts | None = None, spool_dir: Path | str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.instances_received = Counter(
            "instances_received", "Instances received and acknowledged (duplicates excluded).", registry=self.registry
        )
        self.deliveries_failed = Counter(
            "deliveries_failed", "Outbound C-STORE attempts that failed.", registry=self.registry
        )
        self.corrected_segs = Counter(
            "corrected_segs", "Corrected SEGs from radiologists matched to a job.", registry=self.registry
        )
        self.stage_duration = Histogram(
            "stage_duration_seconds", "Duration of pipeline stages in seconds.", ["stage"],
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.registry.register(_StateCollector(store, Path(spool_dir) if spool_dir is not None else None))

    # -- recording ---------------------------------------------------------------------
    def instance_received(self, n: int = 1) -> None:
        """Count `n` received instances.

        Raises
        ------
        ValueError
            If `n` is negative.
        """
        self.instances_received.inc(n)

    def delivery_failed(self, n: int = 1) -> None:
        """Count `n` failed delivery attempts."""
        self.deliveries_failed.inc(n)

    def corrected_seg(self, n: int = 1) -> None:
        """Count `n` corrected SEGs ingested."""
        self.corrected_segs.inc(n)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one duration of `stage`.

        Parameters
        ----------
        stage : str
            Stage name (a fixed word such as ``"segment"``, never a UID).
        seconds : float
            Duration, >= 0.

        Raises
        ------
        ValueError
            If `stage` is empty or `seconds` is negative.
        """
        if not stage:
            raise ValueError("stage must be a non-empty name")
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self.stage_duration.labels(stage=stage).observe(seconds)

    @contextlib.contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """Context manager recording the duration of `stage` (also when it raises).

        Parameters
        ----------
        stage : str
            Stage name.
        """
        if not stage:
            raise ValueError("stage must be a non-empty name")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - start)

    # -- exposition ----------------------------------------------------------------------
    def render(self) -> bytes:
        """The current exposition text (what a scrape returns)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def start_http(self, port: int) -> MetricsServer:
        """Serve ``/metrics`` on ``127.0.0.1:port`` in a daemon thread.

        Parameters
        ----------
        port : int
            TCP port; ``0`` picks a free one (see :attr:`MetricsServer.port`).

        Returns
        -------
        MetricsServer
            Handle with ``stop()``.

        Raises
        ------
        ValueError
            If `port` is outside 0..65535.
        OSError
            If the port cannot be bound.
        """
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        server, thread = start_http_server(int(port), addr="127.0.0.1", registry=self.registry)
        handle = MetricsServer(server, thread)
        log.info("metrics endpoint on %s", handle.url)
        return handle


class _Sink(Protocol):
    def record(self, inst: Any) -> None: ...


class CountingSink:
    """Wrap an instance sink; count each instance it records (duplicates excluded).

    Parameters
    ----------
    inner : InstanceSink
        The real sink.
    metrics : Metrics
        Where ``instances_received_total`` is incremented.
    """

    def __init__(self, inner: _Sink, metrics: Metrics) -> None:
        if not callable(getattr(inner, "record", None)):
            raise TypeError("inner must have a callable 'record(inst)' method")
        self.inner = inner
        self.metrics = metrics

    def record(self, inst: Any) -> None:
        """Record via the inner sink, then count (nothing is counted if it raises)."""
        self.inner.record(inst)
        if not getattr(inst, "duplicate", False):
            self.metrics.instance_received()


def stage_timer(metrics: Metrics | None, stage: str) -> contextlib.AbstractContextManager[None]:
    """``metrics.time_stage(stage)``, or a no-op context when metrics are disabled.

    Parameters
    ----------
    metrics : Metrics or None
        The metrics, if enabled.
    stage : str
        Stage name.

    Returns
    -------
    contextlib.AbstractContextManager
        The timer.
    """
    if metrics is None:
        return contextlib.nullcontext()
    return metrics.time_stage(stage)

