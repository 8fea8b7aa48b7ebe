"""Prometheus metrics and health endpoint of the node.

One small HTTP server (:meth:`Metrics.start_http`) answers three kinds of request:

* ``GET /metrics``: the Prometheus exposition (text 0.0.4, or OpenMetrics if asked for);
* ``GET /healthz``: ``200 {"status": "ok", "node": ...}`` when the state database answers a
  trivial query on the ``jobs`` table, ``503 {"status": "unavailable", ...}`` otherwise;
* anything else: ``404``.

It binds to ``metrics.host`` (default ``127.0.0.1``) and ``metrics.port``. The endpoint has
no authentication; it carries no UIDs or patient data.

Everything lives in the :class:`Metrics` object's own
:class:`prometheus_client.CollectorRegistry` (never the process-global one), so several
nodes in one test process do not collide.

Node identity: a ``node`` label on every series
-----------------------------------------------
Every series carries ``node="<node id>"`` (``node.name``, default the host name), and
``i3node_node_info{node, version} 1`` adds the package version. The Prometheus guide
"Writing exporters" prefers target labels set by the server (``instance``) to a constant
label set by the application; i3node sets one anyway because nodes of one cluster are
often scraped through one address (a reverse proxy, a federation) where ``instance`` does
not tell them apart, and because IT asked for dashboards per node without relabelling
rules. A relabelling rule can drop it where ``instance`` suffices::

    sum by (node) (rate(i3node_instances_received_total[5m]))

Cluster-wide versus per-node series
-----------------------------------
Several nodes may share one state database (PostgreSQL). The ``i3node_queue_*`` gauges
are read from that shared database at scrape time and describe the **whole cluster's
queue**: every node of a cluster exports the *same* value, so aggregate them with
``max()`` (or ``max by (state)``), **never** ``sum()``, which would count each job once per
node. All other series are this node's own work (process counters, its spool disk, its
GPU) and do add up across nodes with ``sum()``.

==================================  =========  ================================================
name                                type       meaning
==================================  =========  ================================================
``i3node_node_info{node,version}``  gauge      always 1; node id (``node.name`` or host name)
                                               and package version
``i3node_instances_received_total`` counter    instances acknowledged to a sender (new ones)
``i3node_delivery_failures_total``  counter    outbound C-STORE attempts of this node that
                                               failed
``i3node_corrected_segs_total``     counter    radiologist-corrected SEGs matched to a job
``i3node_stage_seconds{stage}``     histogram  duration of pipeline stages (segment, select,
                                               export, refine, ...) run by this node
``i3node_spool_free_bytes``         gauge      free bytes on the filesystem of this node's spool
``i3node_gpu_memory_bytes{device,   gauge      torch CUDA memory of this process; only when it
kind}``                                        has already initialised CUDA
``i3node_state_database_up``        gauge      1 if this node's queue queries succeeded at this
                                               scrape, 0 if they failed
``i3node_queue_jobs{state}``        gauge      **cluster-wide**: jobs per state in the shared
                                               database (``max()``, not ``sum()``)
``i3node_queue_deliveries{state}``  gauge      **cluster-wide**: deliveries per state
                                               (``pending``, ``delivered``, ``dead``) in the
                                               shared database (``max()``, not ``sum()``)
``i3node_jobs_held{state}``         gauge      jobs this node has claimed and runs, per state
                                               (``sum()`` over nodes is meaningful)
==================================  =========  ================================================

Every state is exported, also with a count of 0, so dashboards always see the series.
When the database cannot be read, the ``i3node_queue_*`` gauges are left out of that
scrape and ``i3node_state_database_up`` is 0; the rest still scrapes.

Labels never carry UIDs or any patient data.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import logging
import shutil
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from node import __version__
from node.store import CLAIMED_STATES, DeliveryState, JobState, deliveries, jobs

__all__ = [
    "Metrics",
    "MetricsServer",
    "CountingSink",
    "stage_timer",
    "delivery_counts",
    "database_answers",
    "JOB_STATES",
    "DELIVERY_STATES",
    "STAGE_BUCKETS",
    "PREFIX",
]

log = logging.getLogger(__name__)

#: Prefix of every metric name of the node.
PREFIX = "i3node_"

#: Every job state, exported even when its count is 0 (so dashboards see the series).
JOB_STATES: tuple[str, ...] = tuple(state.value for state in JobState)

#: Every delivery state, exported even when its count is 0.
DELIVERY_STATES: tuple[str, ...] = tuple(state.value for state in DeliveryState)

#: Histogram buckets (seconds) spanning a DICOM export to a CPU nnU-Net ensemble.
STAGE_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_CLUSTER_NOTE = "Cluster-wide (same value on every node sharing the database): aggregate with max(), not sum()."


class _StateStore(Protocol):
    """What the metrics need of :class:`node.store.Store`."""

    @property
    def engine(self) -> Engine: ...

    def job_counts(self) -> dict[str, int]: ...

    @property
    def node_id(self) -> str: ...


def held_job_counts(engine: Engine, node_id: str) -> dict[str, int]:
    """Number of jobs this node holds (claimed, lease running) per state; read-only."""
    with engine.connect() as c:
        rows = c.execute(
            sa.select(jobs.c.state, sa.func.count()).where(jobs.c.owner == node_id).group_by(jobs.c.state)
        ).all()
    return {str(r[0]): int(r[1]) for r in rows}


def delivery_counts(engine: Engine) -> dict[str, int]:
    """Number of deliveries per state in the (shared) state database; read-only.

    Parameters
    ----------
    engine : sqlalchemy.engine.Engine
        Engine of the state store (``Store.engine``).

    Returns
    -------
    dict of str to int
        ``{state: count}`` for the states that have at least one delivery.
    """
    with engine.connect() as c:
        rows = c.execute(sa.select(deliveries.c.state, sa.func.count()).group_by(deliveries.c.state)).all()
    return {str(r[0]): int(r[1]) for r in rows}


def database_answers(engine: Engine) -> None:
    """Run a trivial read of the ``jobs`` table; raise if the state database does not answer.

    A bare ``SELECT 1`` is not enough: SQLite opens (and creates) an empty database when
    the file has gone, so the query names a table of the schema.

    Parameters
    ----------
    engine : sqlalchemy.engine.Engine
        Engine of the state store.

    Raises
    ------
    sqlalchemy.exc.SQLAlchemyError
        If the database cannot be reached or lacks the schema.
    """
    with engine.connect() as c:
        c.execute(sa.select(jobs.c.id).limit(1)).all()


def _name(suffix: str) -> str:
    return PREFIX + suffix


class _StateCollector(Collector):
    """Reads queue counts, spool free space and GPU memory when Prometheus scrapes."""

    def __init__(self, store: _StateStore | None, spool_dir: Path | None) -> None:
        self._store = store
        self._spool_dir = spool_dir

    def collect(self) -> Iterable[Any]:
        if self._store is not None:
            yield from self._queue()
        if self._spool_dir is not None:
            free = _free_bytes(self._spool_dir)
            if free is not None:
                yield GaugeMetricFamily(
                    _name("spool_free_bytes"), "Free bytes on the filesystem of this node's spool.", value=float(free)
                )
        gpu = _gpu_memory()
        if gpu:
            g = GaugeMetricFamily(
                _name("gpu_memory_bytes"),
                "CUDA memory held by this process's torch allocator.",
                labels=["device", "kind"],
            )
            for device, kind, value in gpu:
                g.add_metric([device, kind], float(value))
            yield g

    def _queue(self) -> Iterator[GaugeMetricFamily]:
        assert self._store is not None
        try:
            job_counts = self._store.job_counts()
            delivery = delivery_counts(self._store.engine)
            held = held_job_counts(self._store.engine, self._store.node_id)
        except Exception as exc:  # a broken DB must not break the scrape of everything else
            log.warning("metrics: queue counts unavailable (%s)", type(exc).__name__)
            up = 0.0
        else:
            up = 1.0
            g = GaugeMetricFamily(
                _name("queue_jobs"), f"Jobs in each state. {_CLUSTER_NOTE}", labels=["state"]
            )
            for state in sorted(set(JOB_STATES) | set(job_counts)):
                g.add_metric([state], float(job_counts.get(state, 0)))
            yield g
            g = GaugeMetricFamily(
                _name("queue_deliveries"),
                f"Deliveries (output x destination) in each state: pending, delivered, dead. {_CLUSTER_NOTE}",
                labels=["state"],
            )
            for state in sorted(set(DELIVERY_STATES) | set(delivery)):
                g.add_metric([state], float(delivery.get(state, 0)))
            yield g
            g = GaugeMetricFamily(
                _name("jobs_held"),
                "Jobs this node holds (claimed and running here), per state; sum() over nodes is meaningful.",
                labels=["state"],
            )
            for state in sorted(s.value for s in CLAIMED_STATES):
                g.add_metric([state], float(held.get(state, 0)))
            yield g
        yield GaugeMetricFamily(
            _name("state_database_up"),
            "1 if this node read the state database at this scrape, 0 if it failed.",
            value=up,
        )

    def describe(self) -> Iterable[Any]:
        # Collected lazily: describing must not touch the database or CUDA.
        return []


class _NodeLabelled(Collector):
    """Every sample of another registry with a constant ``node`` label (kept where a sample has one)."""

    def __init__(self, inner: CollectorRegistry, node_id: str) -> None:
        self._inner = inner
        self._node = node_id

    def collect(self) -> Iterable[Any]:
        for family in self._inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = sample.labels if "node" in sample.labels else {**sample.labels, "node": self._node}
                out.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
            yield out

    def describe(self) -> Iterable[Any]:
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


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _server_class(host: str, port: int) -> type[_Server]:
    """A server class of the address family of `host` (IPv4 or IPv6)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family = infos[0][0]

    class Server(_Server):
        address_family = family

    return Server


class MetricsServer:
    """Handle of a running metrics and health HTTP endpoint (see :meth:`Metrics.start_http`).

    Attributes
    ----------
    host : str
        Bound address (as asked for, e.g. ``127.0.0.1`` or ``0.0.0.0``).
    port : int
        Bound port (the ephemeral one if 0 was asked for).
    """

    def __init__(self, server: http.server.HTTPServer, thread: threading.Thread) -> None:
        self._server: http.server.HTTPServer | None = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    def _base(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """URL of the metrics page (loopback if bound to every interface)."""
        return self._base() + "/metrics"

    @property
    def health_url(self) -> str:
        """URL of the health endpoint (loopback if bound to every interface)."""
        return self._base() + "/healthz"

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
    """The node's Prometheus metrics in a private registry, and its health check.

    Parameters
    ----------
    store : node.store.Store, optional
        The state store: the ``i3node_queue_*`` gauges are read from it at scrape time and
        ``/healthz`` queries it. ``None`` leaves the gauges out and makes ``/healthz``
        report only that the process answers.
    spool_dir : pathlib.Path, optional
        Spool directory for ``i3node_spool_free_bytes``; ``None`` leaves the gauge out.
    node_id : str
        This node's identity (``settings.node_id``), exported by ``i3node_node_info``.
    version : str
        Software version exported by ``i3node_node_info`` (default: the package's).

    Examples
    --------
    >>> metrics = Metrics(store, settings.spool_dir, node_id=settings.node_id)  # doctest: +SKIP
    >>> server = metrics.start_http("127.0.0.1", 9464)  # doctest: +SKIP
    >>> with metrics.time_stage("segment"):  # doctest: +SKIP
    ...     run_ensemble()
    >>> server.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        store: _StateStore | None = None,
        spool_dir: Path | str | None = None,
        *,
        node_id: str = "i3node",
        version: str = __version__,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be a non-empty name")
        self.store = store
        self.node_id = node_id
        self.registry = CollectorRegistry(auto_describe=False)
        self.node_info = Info(_name("node"), "Identity of this node (value always 1).", registry=self.registry)
        self.node_info.info({"node": node_id, "version": version})
        self.instances_received = Counter(
            _name("instances_received"),
            "Instances received and acknowledged (duplicates excluded).",
            registry=self.registry,
        )
        self.deliveries_failed = Counter(
            _name("delivery_failures"), "Outbound C-STORE attempts of this node that failed.", registry=self.registry
        )
        self.corrected_segs = Counter(
            _name("corrected_segs"), "Corrected SEGs from radiologists matched to a job.", registry=self.registry
        )
        self.stage_duration = Histogram(
            _name("stage_seconds"),
            "Duration of pipeline stages run by this node, in seconds.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(store, Path(spool_dir) if spool_dir is not None else None))
        # What a scrape returns: every series of the registry with the node label added.
        self.exposition_registry = CollectorRegistry(auto_describe=False)
        self.exposition_registry.register(_NodeLabelled(self.registry, node_id))

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
        return generate_latest(self.exposition_registry)

    def health(self) -> tuple[bool, dict[str, str]]:
        """Whether the state database answers a trivial query.

        Returns
        -------
        tuple of (bool, dict)
            ``(True, {"status": "ok", "node": ...})``, or ``(False, {"status":
            "unavailable", "node": ..., "error": <exception type>})``.
        """
        if self.store is not None:
            try:
                database_answers(self.store.engine)
            except Exception as exc:  # any failure of the database is "unhealthy", not a crash
                log.warning("healthz: state database does not answer (%s)", type(exc).__name__)
                return False, {"status": "unavailable", "node": self.node_id, "error": type(exc).__name__}
        return True, {"status": "ok", "node": self.node_id}

    def start_http(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` and ``/healthz`` on ``host:port`` in a daemon thread.

        Parameters
        ----------
        host : str
            Address to bind (``settings.metrics.host``): ``127.0.0.1`` for loopback only,
            ``0.0.0.0`` / ``::`` for every interface, or one address of this host.
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
            If the address cannot be resolved or bound.
        """
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        server = _server_class(host, int(port))((host, int(port)), _handler(self))
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="i3node-metrics", daemon=True
        )
        thread.start()
        handle = MetricsServer(server, thread)
        log.info("metrics endpoint on %s:%d (/metrics, /healthz)", handle.host, handle.port)
        return handle


def _handler(metrics: Metrics) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handler class serving `metrics`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "i3node-metrics"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = urllib.parse.urlsplit(self.path).path
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                try:
                    body = encoder(metrics.exposition_registry)
                except Exception as exc:  # never leave a scrape without an answer
                    log.exception("metrics: scrape failed")
                    self._send(500, "text/plain; charset=utf-8", f"scrape failed: {type(exc).__name__}\n".encode())
                    return
                self._send(200, content_type, body)
            elif path == "/healthz":
                ok, doc = metrics.health()
                self._send(200 if ok else 503, "application/json", (json.dumps(doc) + "\n").encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._head_only = True
            self.do_GET()

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not getattr(self, "_head_only", False):
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("metrics http: " + format, *args)

    return Handler


class _Sink(Protocol):
    def record(self, inst: Any) -> None: ...


class CountingSink:
    """Wrap an instance sink; count each instance it records (duplicates excluded).

    Parameters
    ----------
    inner : InstanceSink
        The real sink.
    metrics : Metrics
        Where ``i3node_instances_received_total`` is incremented.
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
