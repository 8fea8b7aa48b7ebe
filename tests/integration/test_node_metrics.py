"""The metrics endpoint on loopback: names, values, job counts from a real store."""
from __future__ import annotations

import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from dicom.scp import StoredInstance
from node.metrics import JOB_STATES, CountingSink, Metrics, stage_timer
from node.store import JobState, Store


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _store_with_jobs(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")

    for k in range(3):
        store.record_instance(
            StoredInstance(f"1.2.{k}", f"1.2.{k}.1", f"1.2.{k}.1.1", "1.2.840.10008.5.1.4.1.1.2", "CT", tmp_path / "x", 1,
                           "PACS", "127.0.0.1"),
            now=0.0,
        )
        store.mark_stable(f"1.2.{k}", 100.0, 1.0, [(f"1.2.{k}.1", 1)])
    jobs = store.jobs()
    store.set_job_state(jobs[0]["id"], JobState.DONE)
    store.set_job_state(jobs[1]["id"], JobState.FAILED, reason="test")
    return store


def test_scrape_after_incrementing(tmp_path: Path) -> None:
    store = _store_with_jobs(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    metrics = Metrics(store, spool)
    server = metrics.start_http(0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        before = _scrape(server.url)
        assert before[("instances_received_total", ())] == 0.0
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

    assert m[("instances_received_total", ())] == 3.0
    assert m[("deliveries_failed_total", ())] == 1.0
    assert m[("corrected_segs_total", ())] == 1.0
    assert m[("jobs_by_state", (("state", "done"),))] == 1.0
    assert m[("jobs_by_state", (("state", "failed"),))] == 1.0
    assert m[("jobs_by_state", (("state", "queued"),))] == 1.0
    assert {k[1][0][1] for k in m if k[0] == "jobs_by_state"} == set(JOB_STATES)
    assert m[("disk_free_bytes", ())] > 0
    assert m[("stage_duration_seconds_count", (("stage", "segment"),))] == 1.0
    assert m[("stage_duration_seconds_sum", (("stage", "segment"),))] == 3.0
    assert m[("stage_duration_seconds_bucket", (("le", "5.0"), ("stage", "segment")))] == 1.0
    assert m[("stage_duration_seconds_bucket", (("le", "2.5"), ("stage", "segment")))] == 0.0
    assert m[("stage_duration_seconds_count", (("stage", "select"),))] == 1.0
    assert m[("stage_duration_seconds_count", (("stage", "export"),))] == 1.0  # timed although it raised
    torch = sys.modules.get("torch")
    cuda_live = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    assert any(k[0] == "gpu_memory_bytes" for k in m) == cuda_live


def test_private_registry_and_stop(tmp_path: Path) -> None:
    a, b = Metrics(), Metrics()  # two nodes in one process do not collide
    a.instance_received()
    assert b.render().count(b"instances_received_total 0.0") == 1
    assert REGISTRY.get_sample_value("instances_received_total") is None
    server = a.start_http(0)
    port = server.port
    server.stop()
    server.stop()  # idempotent
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_listens_on_loopback_only(tmp_path: Path) -> None:
    metrics = Metrics(spool_dir=tmp_path)
    with metrics.start_http(0) as server:
        bound = server._server.socket.getsockname()[0]  # noqa: SLF001 - checking the bind address
        assert bound == "127.0.0.1"
        # Not reachable through a non-loopback address of this host, if it has one.
        try:
            other = socket.gethostbyname(socket.gethostname())
        except OSError:
            other = "127.0.0.1"
        if not other.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((other, server.port), timeout=2).close()


def test_counting_sink_and_broken_store(tmp_path: Path) -> None:
    class Inner:
        def record(self, inst: StoredInstance) -> None:
            pass

    class BrokenStore:
        def job_counts(self) -> dict[str, int]:
            raise RuntimeError("db down")

    metrics = Metrics(BrokenStore(), tmp_path)
    sink = CountingSink(Inner(), metrics)
    base = dict(study_uid="1.2", series_uid="1.2.1", sop_uid="1.2.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                modality="CT", path=tmp_path / "a.dcm", size=1, calling_ae="PACS", peer_address="127.0.0.1")
    sink.record(StoredInstance(**base))
    sink.record(StoredInstance(**base, duplicate=True))
    text = metrics.render().decode()
    assert "instances_received_total 1.0" in text
    assert "jobs_by_state" not in text and "disk_free_bytes" in text  # the rest still scrapes
    with pytest.raises(ValueError, match="seconds"):
        metrics.observe_stage("segment", -1.0)
    with pytest.raises(ValueError, match="port"):
        metrics.start_http(70000)
