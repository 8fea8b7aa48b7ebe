"""Outbound delivery against real peers on 127.0.0.1 (DCMTK ``storescp``).

Every peer listens on a free ephemeral port and is killed at teardown. Time is injected
(``now``), backoff is short, so nothing here sleeps for a retry.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa

from dicom.synthetic import build_ct_series, write_datasets
from node.exporter import (
    Exporter,
    ExportSummary,
    OutputFile,
    all_delivered,
    job_delivery_state,
    pending_for_job,
    register_outputs,
    retry_dead,
)
from node.settings import DeliverySettings, Destination
from node.store import Store, deliveries, jobs
from node.store import outputs as outputs_table
from tests.fixtures.node_fixtures import dcmtk_env

T0 = 1_000_000.0
DELIVERY = DeliverySettings(max_attempts=3, backoff_initial_s=10.0, backoff_max_s=15.0, calling_ae="I3NODE")
# pynetdicom sometimes notices a peer's A-ABORT during a C-STORE only when the DIMSE timeout expires.
DIMSE_TIMEOUT = 2.0


# -- fixtures ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"storescp not listening on {port} after {timeout} s")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[Destination, Path]]]:
    """Start ``storescp -od DIR PORT`` (plus options); returns its Destination and DIR."""
    exe = shutil.which("storescp")
    if exe is None:
        pytest.skip("storescp not installed")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str, ae_title: str = "VIEWER") -> tuple[Destination, Path]:
        port = free_port()
        out = tmp_path / f"storescp-{port}"
        out.mkdir()
        proc = subprocess.Popen(
            [exe, "-aet", ae_title, *extra, "-od", str(out), str(port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        _wait_listening(port, proc)
        return Destination(ae_title=ae_title, host="127.0.0.1", port=port), out

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh state store on a temporary SQLite file."""
    s = Store(f"sqlite:///{tmp_path / 'state' / 'i3node.db'}")
    yield s
    s.close()


def add_job(store: Store) -> int:
    """Insert a job row (the outputs' foreign key)."""
    with store.engine.begin() as c:
        r = c.execute(
            jobs.insert().values(
                study_uid="1.2.3", series_uid="1.2.3.4", state="exporting", reason="", attempts=0, version=1,
                data="{}", created_at=T0, updated_at=T0, not_before=0.0,
            )
        )
        return int(r.inserted_primary_key[0])


@pytest.fixture
def make_outputs(tmp_path: Path) -> Callable[[int], list[OutputFile]]:
    """Write ``n`` small DICOM files (stand-ins for SEG files) and describe them as outputs."""
    counter = iter(range(1000))

    def make(n: int) -> list[OutputFile]:
        k = next(counter)
        image = np.random.default_rng(k).integers(-1000, 1000, size=(n, 8, 8)).astype(np.float32)
        datasets = build_ct_series(image, (2.0, 1.0, 1.0))
        paths = write_datasets(datasets, tmp_path / f"outputs-{k}")
        return [
            OutputFile(str(ds.SOPInstanceUID), "seg", str(ds.SeriesInstanceUID), p) for ds, p in zip(datasets, paths, strict=True)
        ]

    return make


def received_uids(folder: Path) -> set[str]:
    """SOP Instance UIDs of the files a storescp wrote."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.iterdir() if p.is_file()}


def rows(store: Store) -> list[sa.Row]:
    with store.engine.connect() as c:
        return list(c.execute(sa.select(deliveries).order_by(deliveries.c.id)))


# -- registration (no network) ---------------------------------------------------------


def test_register_outputs_is_idempotent(store: Store, make_outputs) -> None:
    job = add_job(store)
    outs = make_outputs(3)
    dests = [Destination(ae_title="VIEWER", port=11113), Destination(ae_title="PACS", port=11114)]
    register_outputs(store, job, 1, outs, dests, now=T0)
    first = rows(store)
    assert len(first) == 6
    assert {(r.state, r.attempts, r.next_attempt_at) for r in first} == {("pending", 0, T0)}

    register_outputs(store, job, 1, outs, dests, now=T0 + 50)
    assert rows(store) == first
    assert len(list(store.iter_rows(outputs_table))) == 3
    assert job_delivery_state(store, job) == {"pending": 6, "delivered": 0, "dead": 0}
    assert len(pending_for_job(store, job)) == 6
    assert not all_delivered(store, job, 1)
    assert not all_delivered(store, job, 2)  # nothing registered for version 2

    other = add_job(store)
    with pytest.raises(ValueError, match="already recorded for job"):
        register_outputs(store, other, 1, outs[:1], dests, now=T0)
    bad = OutputFile(outs[0].sop_uid, "png", outs[0].series_uid, outs[0].path)
    with pytest.raises(ValueError, match=r"outputs\[0\]\.kind"):
        register_outputs(store, job, 1, [bad], dests, now=T0)
    assert rows(store) == first


def test_exporter_requires_tls_context_for_tls_destination(store: Store) -> None:
    with pytest.raises(ValueError, match=r"destinations\[0\]: tls"):
        Exporter(store, [Destination(tls=True)], DELIVERY)


# -- delivery against real peers -------------------------------------------------------


@pytest.mark.dcmtk
def test_delivers_to_storescp(store: Store, make_outputs, storescp) -> None:
    dest, folder = storescp()
    job = add_job(store)
    outs = make_outputs(4)
    register_outputs(store, job, 1, outs, [dest], now=T0)

    summary = Exporter(store, [dest], DELIVERY, clock=lambda: T0).run_once()

    assert summary == ExportSummary(delivered=4, retried=0, dead=0)
    assert received_uids(folder) == {o.sop_uid for o in outs}
    assert job_delivery_state(store, job) == {"pending": 0, "delivered": 4, "dead": 0}
    assert all_delivered(store, job, 1)
    assert pending_for_job(store, job) == []
    assert all(o.path.is_file() for o in outs)  # outputs are kept
    # nothing left to do: a second run sends nothing
    assert Exporter(store, [dest], DELIVERY).run_once(now=T0 + 1) == ExportSummary()


@pytest.mark.dcmtk
def test_peer_down_backs_off_then_dead_letters(store: Store, make_outputs) -> None:
    dest = Destination(ae_title="VIEWER", host="127.0.0.1", port=free_port())
    job = add_job(store)
    register_outputs(store, job, 1, make_outputs(2), [dest], now=T0)
    exporter = Exporter(store, [dest], DELIVERY)

    assert exporter.run_once(now=T0) == ExportSummary(retried=2)
    pend = pending_for_job(store, job)
    assert [(p.attempts, p.next_attempt_at) for p in pend] == [(1, T0 + 10.0)] * 2
    assert all("refused" in p.last_error.lower() for p in pend), pend[0].last_error

    assert exporter.run_once(now=T0 + 9.9) == ExportSummary()  # not yet due
    assert exporter.run_once(now=T0 + 10.0) == ExportSummary(retried=2)
    assert {p.next_attempt_at for p in pending_for_job(store, job)} == {T0 + 10.0 + 15.0}  # capped at backoff_max_s

    assert exporter.run_once(now=T0 + 25.0) == ExportSummary(dead=2)
    assert job_delivery_state(store, job) == {"pending": 0, "delivered": 0, "dead": 2}
    assert pending_for_job(store, job) == []
    assert exporter.run_once(now=T0 + 1000.0) == ExportSummary()  # dead letters are not retried
    assert not all_delivered(store, job, 1)


@pytest.mark.dcmtk
def test_one_destination_down_other_delivered(store: Store, make_outputs, storescp) -> None:
    up, folder = storescp(ae_title="VIEWER")
    down = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    job = add_job(store)
    outs = make_outputs(2)
    register_outputs(store, job, 1, outs, [up, down], now=T0)

    assert Exporter(store, [down, up], DELIVERY).run_once(now=T0) == ExportSummary(delivered=2, retried=2)
    assert received_uids(folder) == {o.sop_uid for o in outs}
    assert {p.destination for p in pending_for_job(store, job)} == {"PACS"}
    assert not all_delivered(store, job, 1)


@pytest.mark.dcmtk
def test_rejected_association_is_recorded_and_retried(store: Store, make_outputs, storescp) -> None:
    dest, folder = storescp("--refuse")
    job = add_job(store)
    register_outputs(store, job, 1, make_outputs(2), [dest], now=T0)

    assert Exporter(store, [dest], DELIVERY).run_once(now=T0) == ExportSummary(retried=2)
    pend = pending_for_job(store, job)
    assert [p.attempts for p in pend] == [1, 1]
    reason = pend[0].last_error
    assert "rejected" in reason.lower() and f"VIEWER@127.0.0.1:{dest.port}" in reason, reason
    assert received_uids(folder) == set()


@pytest.mark.dcmtk
def test_abort_after_first_request_then_delivered_to_normal_peer(store: Store, make_outputs, storescp) -> None:
    # storescp --abort-after aborts after receiving the first C-STORE-RQ, before answering it:
    # the peer acknowledged nothing, so every instance is retried (the first one again too).
    aborting, _ = storescp("--abort-after")
    job = add_job(store)
    outs = make_outputs(3)
    register_outputs(store, job, 1, outs, [aborting], now=T0)

    assert Exporter(store, [aborting], DELIVERY, dimse_timeout=DIMSE_TIMEOUT).run_once(now=T0) == ExportSummary(retried=3)
    pend = pending_for_job(store, job)
    assert [p.attempts for p in pend] == [1, 1, 1]
    assert all("aborted by VIEWER" in p.last_error and "after 0 of 3" in p.last_error for p in pend), pend[0].last_error

    normal, folder = storescp()  # same AE title, now answering
    assert Exporter(store, [normal], DELIVERY).run_once(now=T0 + 10.0) == ExportSummary(delivered=3)
    assert received_uids(folder) == {o.sop_uid for o in outs}
    assert all_delivered(store, job, 1)


@pytest.fixture
def partial_peer() -> Iterator[Callable[[int], Destination]]:
    """A pynetdicom storage SCP that acknowledges ``n_ok`` instances, then aborts the association."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    servers = []

    def start(n_ok: int) -> Destination:
        lock = threading.Lock()
        seen: list[str] = []

        def on_store(event: evt.Event) -> int:
            with lock:
                if len(seen) >= n_ok:
                    event.assoc.abort()
                    return 0xA700
                seen.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        ae = AE(ae_title="VIEWER")
        ae.add_supported_context(CTImageStorage)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]))
        return Destination(ae_title="VIEWER", host="127.0.0.1", port=port)

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.dcmtk
def test_instances_acknowledged_before_abort_are_delivered(
    store: Store, make_outputs, storescp, partial_peer
) -> None:
    flaky = partial_peer(2)
    job = add_job(store)
    outs = make_outputs(5)
    register_outputs(store, job, 1, outs, [flaky], now=T0)

    exporter = Exporter(store, [flaky], DELIVERY, dimse_timeout=DIMSE_TIMEOUT)
    assert exporter.run_once(now=T0) == ExportSummary(delivered=2, retried=3)
    state = {r.output_uid: r.state for r in rows(store)}
    assert sorted(state.values()) == ["delivered"] * 2 + ["pending"] * 3
    pend = pending_for_job(store, job)
    assert all("after 2 of 5 instance(s) were acknowledged" in p.last_error for p in pend), pend[0].last_error
    pending = {p.sop_uid for p in pend}

    normal, folder = storescp()
    assert Exporter(store, [normal], DELIVERY).run_once(now=T0 + 10.0) == ExportSummary(delivered=3)
    assert received_uids(folder) == pending  # only the unacknowledged ones are sent again
    assert all_delivered(store, job, 1)


@pytest.mark.dcmtk
def test_retry_dead_brings_dead_letters_back(store: Store, make_outputs, storescp) -> None:
    down = Destination(ae_title="VIEWER", host="127.0.0.1", port=free_port())
    job = add_job(store)
    outs = make_outputs(2)
    register_outputs(store, job, 1, outs, [down], now=T0)
    once = DeliverySettings(max_attempts=1, backoff_initial_s=1.0, backoff_max_s=1.0)
    assert Exporter(store, [down], once).run_once(now=T0) == ExportSummary(dead=2)
    assert job_delivery_state(store, job)["dead"] == 2

    assert retry_dead(store, job + 1, now=T0 + 5) == 0  # another job: untouched
    assert retry_dead(store, job, now=T0 + 5) == 2
    assert [(p.attempts, p.next_attempt_at) for p in pending_for_job(store, job)] == [(0, T0 + 5)] * 2

    up, folder = storescp()
    assert Exporter(store, [up], once).run_once(now=T0 + 5) == ExportSummary(delivered=2)
    assert received_uids(folder) == {o.sop_uid for o in outs}
    assert job_delivery_state(store, job) == {"pending": 0, "delivered": 2, "dead": 0}
    assert retry_dead(store, now=T0 + 6) == 0
