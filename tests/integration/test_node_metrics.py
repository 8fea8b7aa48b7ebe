"""The metrics and health endpoint over real HTTP: names, node info, queue gauges, /healthz, bind address."""
from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from dicom.scp import StoredInstance
from node import __version__
from node.exporter import Exporter, ExportSummary, OutputFile, register_outputs
from node.metrics import DELIVERY_STATES, JOB_STATES, PREFIX, CountingSink, Metrics, stage_timer
from node.settings import DeliverySettings, Destination
from node.store import JobState, Store

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str) -> tuple[int, str, str]:
    """Status, content type and body of a GET (also for 4xx/5xx answers)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def _scrape(url: str) -> Samples:
    status, content_type, text = _get(url)
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    out: Samples = {}
    nodes = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels)
            assert "node" in labels, f"{s.name} has no node label"
            if s.name != "i3node_node_info":  # keyed without the node label (checked once here)
                nodes.add(labels.pop("node"))
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    assert len(nodes) == 1, nodes  # one node per scrape
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _store_with_jobs(db: Path) -> tuple[Store, list[int]]:
    """A real store with three jobs: one done, one failed, one queued."""
    store = Store(f"sqlite:///{db}")
    for k in range(3):
        store.record_instance(
            StoredInstance(f"1.2.{k}", f"1.2.{k}.1", f"1.2.{k}.1.1", "1.2.840.10008.5.1.4.1.1.2", "CT", db.parent / "x", 1,
                           "PACS", "127.0.0.1"),
            now=0.0,
        )
        store.mark_stable(f"1.2.{k}", 100.0, 1.0, [(f"1.2.{k}.1", 1)])
    ids = [int(j["id"]) for j in store.jobs()]
    store.set_job_state(ids[0], JobState.DONE)
    store.set_job_state(ids[1], JobState.FAILED, reason="test")
    return store, ids


def _add_deliveries(store: Store, job_id: int, tmp_path: Path) -> None:
    """Three outputs x two destinations through the exporter's API; DOWN's three dead-lettered."""
    outs = [OutputFile(f"1.2.9.{i}", "seg", "1.2.9", tmp_path / f"seg{i}.dcm") for i in range(3)]
    down = Destination(ae_title="DOWN", host="127.0.0.1", port=_free_port())  # nothing listens: refused
    viewer = Destination(ae_title="VIEWER", host="127.0.0.1", port=_free_port())
    register_outputs(store, job_id, 1, outs, [down, viewer], now=0.0)
    once = DeliverySettings(max_attempts=1, backoff_initial_s=1.0, backoff_max_s=1.0)
    assert Exporter(store, [down], once).run_once(now=1.0) == ExportSummary(dead=3)


def test_scrape_names_info_and_values(tmp_path: Path) -> None:
    store, ids = _store_with_jobs(tmp_path / "state.db")
    spool = tmp_path / "spool"
    spool.mkdir()
    metrics = Metrics(store, spool, node_id="node-a")
    server = metrics.start_http("127.0.0.1", 0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        before = _scrape(server.url)
        assert before[("i3node_instances_received_total", ())] == 0.0
        assert before[("i3node_queue_deliveries", (("state", "pending"),))] == 0.0
        assert before[("i3node_queue_deliveries", (("state", "dead"),))] == 0.0
        _add_deliveries(store, ids[2], tmp_path)
        metrics.instance_received()
        metrics.instance_received(2)
        metrics.delivery_failed()
        metrics.corrected_seg()
        metrics.observe_stage("segment", 3.0)
        with metrics.time_stage("select"):
            time.sleep(0.01)
        with pytest.raises(KeyError):
            with stage_timer(metrics, "export"):
                raise KeyError("boom")
        with stage_timer(None, "export"):
            pass
        m = _scrape(server.url)
    finally:
        server.stop()
        store.close()

    assert all(name.startswith(PREFIX) for name, _ in m), sorted({n for n, _ in m if not n.startswith(PREFIX)})
    # No constant node label on the series: the node is named once, by the info metric.
    assert m[("i3node_node_info", (("node", "node-a"), ("version", __version__)))] == 1.0
    assert not any(dict(labels).get("node") for name, labels in m if name != "i3node_node_info")

    assert m[("i3node_instances_received_total", ())] == 3.0
    assert m[("i3node_delivery_failures_total", ())] == 1.0
    assert m[("i3node_corrected_segs_total", ())] == 1.0
    assert m[("i3node_state_database_up", ())] == 1.0
    assert m[("i3node_queue_jobs", (("state", "done"),))] == 1.0
    assert m[("i3node_queue_jobs", (("state", "failed"),))] == 1.0
    assert m[("i3node_queue_jobs", (("state", "queued"),))] == 1.0
    assert {k[1][0][1] for k in m if k[0] == "i3node_queue_jobs"} == set(JOB_STATES)
    # The rows the exporter's API wrote: 3 outputs x 2 destinations, DOWN's 3 dead-lettered.
    assert m[("i3node_queue_deliveries", (("state", "pending"),))] == 3.0
    assert m[("i3node_queue_deliveries", (("state", "dead"),))] == 3.0
    assert m[("i3node_queue_deliveries", (("state", "delivered"),))] == 0.0
    assert {k[1][0][1] for k in m if k[0] == "i3node_queue_deliveries"} == set(DELIVERY_STATES)
    assert m[("i3node_spool_free_bytes", ())] > 0
    assert m[("i3node_stage_seconds_count", (("stage", "segment"),))] == 1.0
    assert m[("i3node_stage_seconds_sum", (("stage", "segment"),))] == 3.0
    assert m[("i3node_stage_seconds_bucket", (("le", "5.0"), ("stage", "segment")))] == 1.0
    assert m[("i3node_stage_seconds_bucket", (("le", "2.5"), ("stage", "segment")))] == 0.0
    assert m[("i3node_stage_seconds_count", (("stage", "select"),))] == 1.0
    assert m[("i3node_stage_seconds_count", (("stage", "export"),))] == 1.0  # timed although it raised
    torch = sys.modules.get("torch")
    cuda_live = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    assert any(k[0] == "i3node_gpu_memory_bytes" for k in m) == cuda_live


def test_queue_gauges_are_cluster_wide(tmp_path: Path) -> None:
    """Two nodes on one database report the same queue (max(), not sum()) and their own counters."""
    db = tmp_path / "shared.db"
    store_a, ids = _store_with_jobs(db)
    store_b = Store(f"sqlite:///{db}", node_id="node-b")
    _add_deliveries(store_a, ids[2], tmp_path)
    assert store_b.claim_job() is not None  # node-b now runs one job
    a, b = Metrics(store_a, node_id="node-a"), Metrics(store_b, node_id="node-b")
    a.instance_received(5)
    try:
        with a.start_http("127.0.0.1", 0) as sa_, b.start_http("127.0.0.1", 0) as sb_:
            ma, mb = _scrape(sa_.url), _scrape(sb_.url)
    finally:
        store_a.close()
        store_b.close()
    queue_a = {k: v for k, v in ma.items() if k[0].startswith("i3node_queue_")}
    queue_b = {k: v for k, v in mb.items() if k[0].startswith("i3node_queue_")}
    assert queue_a == queue_b and queue_a[("i3node_queue_deliveries", (("state", "dead"),))] == 3.0
    assert ma[("i3node_instances_received_total", ())] == 5.0
    assert mb[("i3node_instances_received_total", ())] == 0.0
    assert ("i3node_node_info", (("node", "node-b"), ("version", __version__))) in mb
    held = ("i3node_jobs_held", (("state", "segmenting"),))
    assert mb[held] == 1.0 and ma[held] == 0.0  # per node: sum() over nodes is meaningful


def test_healthz_ok_then_503_when_the_database_is_gone(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store, _ = _store_with_jobs(db)
    metrics = Metrics(store, tmp_path, node_id="node-h")
    with metrics.start_http("127.0.0.1", 0) as server:
        status, content_type, body = _get(server.health_url)
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"status": "ok", "node": "node-h"}
        assert "i3node_" not in body  # /healthz is not a second metrics page

        # Really break it: release the connections, then remove the database (SQLite would
        # otherwise keep reading the unlinked file through a pooled connection).
        store.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        status, content_type, body = _get(server.health_url)
        assert (status, content_type) == (503, "application/json")
        doc = json.loads(body)
        assert doc["status"] == "unavailable" and doc["node"] == "node-h" and doc["error"]

        # /metrics still answers, without the queue gauges, and says the database is down.
        m = _scrape(server.url)
        assert m[("i3node_state_database_up", ())] == 0.0
        assert not any(name.startswith("i3node_queue_") for name, _ in m)
        assert m[("i3node_spool_free_bytes", ())] > 0
    store.close()


def test_healthz_503_when_the_state_directory_is_gone(tmp_path: Path) -> None:
    import shutil

    state = tmp_path / "state"
    store, _ = _store_with_jobs(state / "i3node.db")
    metrics = Metrics(store, node_id="node-h")
    with metrics.start_http("127.0.0.1", 0) as server:
        assert _get(server.health_url)[0] == 200
        store.close()
        shutil.rmtree(state)
        assert _get(server.health_url)[0] == 503
    assert not state.exists()  # the health check does not recreate it
    store.close()


def test_other_paths_are_404(tmp_path: Path) -> None:
    metrics = Metrics(node_id="node-x")
    with metrics.start_http("127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.port}"
        for path in ("/", "/metrics/extra", "/health", "/healthz/x", "/favicon.ico"):
            status, _, body = _get(base + path)
            assert status == 404, path
            assert "i3node_" not in body
        assert _get(base + "/metrics?x=1")[0] == 200  # a query string does not change the path
        # Without a store /healthz only says that the node answers.
        assert json.loads(_get(server.health_url)[2]) == {"status": "ok", "node": "node-x"}
        # HEAD: headers only.
        req = urllib.request.Request(server.url, method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0 and resp.read() == b""


def test_private_registry_and_stop(tmp_path: Path) -> None:
    a, b = Metrics(node_id="a"), Metrics(node_id="b")  # two nodes in one process do not collide
    a.instance_received()
    assert b.render().count(b'i3node_instances_received_total{node="b"} 0.0') == 1
    assert REGISTRY.get_sample_value("i3node_instances_received_total") is None
    server = a.start_http("127.0.0.1", 0)
    port = server.port
    server.stop()
    server.stop()  # idempotent
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with pytest.raises(ValueError, match="node_id"):
        Metrics(node_id="")


def test_bind_host_is_honoured(tmp_path: Path) -> None:
    metrics = Metrics(spool_dir=tmp_path)
    # Any 127.0.0.0/8 address is loopback on Linux: bound to 127.0.0.2, 127.0.0.1 is refused.
    with metrics.start_http("127.0.0.2", 0) as server:
        assert server._server is not None
        assert server._server.socket.getsockname()[0] == "127.0.0.2"  # noqa: SLF001 - the bind address
        assert server.host == "127.0.0.2" and server.url == f"http://127.0.0.2:{server.port}/metrics"
        assert _get(server.url)[0] == 200
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    # The default loopback address: not reachable through another address of this host.
    with metrics.start_http("127.0.0.1", 0) as server:
        try:
            other = socket.gethostbyname(socket.gethostname())
        except OSError:
            other = "127.0.0.1"
        if not other.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((other, server.port), timeout=2).close()
    # Every interface: reachable through loopback, URL points there.
    with metrics.start_http("0.0.0.0", 0) as server:
        assert server._server is not None
        assert server._server.socket.getsockname()[0] == "0.0.0.0"  # noqa: SLF001
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert _get(server.url)[0] == 200
    # A fixed port is used as given.
    port = _free_port()
    with metrics.start_http("127.0.0.1", port) as server:
        assert server.port == port
    with pytest.raises(ValueError, match="port"):
        metrics.start_http("127.0.0.1", 70000)
    with pytest.raises(OSError):
        metrics.start_http("192.0.2.1", 0)  # TEST-NET-1: not an address of this host


def test_counting_sink_and_broken_store(tmp_path: Path) -> None:
    class Inner:
        def record(self, inst: StoredInstance) -> None:
            pass

    class BrokenStore:
        @property
        def engine(self) -> object:
            raise RuntimeError("db down")

        def job_counts(self) -> dict[str, int]:
            raise RuntimeError("db down")

    metrics = Metrics(BrokenStore(), tmp_path)  # type: ignore[arg-type]
    sink = CountingSink(Inner(), metrics)
    base: dict[str, Any] = dict(study_uid="1.2", series_uid="1.2.1", sop_uid="1.2.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                modality="CT", path=tmp_path / "a.dcm", size=1, calling_ae="PACS", peer_address="127.0.0.1")
    sink.record(StoredInstance(**base))
    sink.record(StoredInstance(**base, duplicate=True))
    text = metrics.render().decode()
    assert 'i3node_instances_received_total{node="i3node"} 1.0' in text
    assert "i3node_queue_jobs" not in text and "i3node_spool_free_bytes" in text  # the rest still scrapes
    assert 'i3node_state_database_up{node="i3node"} 0.0' in text
    assert metrics.health()[0] is False
    with pytest.raises(ValueError, match="seconds"):
        metrics.observe_stage("segment", -1.0)
