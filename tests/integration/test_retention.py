"""Retention on a real store and real files; the disk reserve against a real SCP."""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom import spool
from dicom.scp import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, ScpConfig, StoredInstance, StoreSCP
from dicom.synthetic import build_ct_series, write_datasets
from node.audit import AuditLog
from node.retention import DAY_S, disk_pressure, dry_run, execute_purge, plan_purge, purge_once
from node.store import JobState, Store, corrections, deliveries, outputs

CT = "1.2.840.10008.5.1.4.1.1.2"
NOW = 1_000.0 * DAY_S  # a fixed "now", far from 0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def _receive(store: Store, root: Path, study: str, series: str, n: int, at: float) -> list[Path]:
    paths = []
    for k in range(n):
        sop = f"{series}.{k + 1}"
        p = spool.instance_path(root, study, series, sop)
        spool.durable_write_bytes(p, b"x" * 100)
        store.record_instance(StoredInstance(study, series, sop, CT, "CT", p, 100, "PACS", "127.0.0.1"), now=at)
        paths.append(p)
    return paths


def _job(store: Store, study: str, series: str, n: int, state: JobState, at: float) -> int:
    (jid,) = store.mark_stable(study, at, 0.0, [(series, n)])
    store.set_job_state(jid, state, now=at)
    return jid


def _output(store: Store, root: Path, job_id: int, sop: str, at: float, states: list[str], size: int = 10) -> Path:
    p = root / str(job_id) / f"{sop}.dcm"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"o" * size)
    with store.engine.begin() as c:
        c.execute(outputs.insert().values(sop_uid=sop, job_id=job_id, version=1, kind="seg", series_uid="9.9",
                                          path=str(p), created_at=at))
        for k, st in enumerate(states):
            c.execute(deliveries.insert().values(output_uid=sop, destination=f"DEST{k}", state=st, attempts=1,
                                                 next_attempt_at=0.0, last_error="", updated_at=at))
    return p


def test_undelivered_outputs_are_never_purged(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    _receive(store, tmp_path / "spool", "1.1", "1.1.1", 1, at=0.0)
    jid = _job(store, "1.1", "1.1.1", 1, JobState.DONE, at=1.0)
    old = 2.0
    delivered = _output(store, out, jid, "2.1", old, ["delivered", "delivered"])
    pending = _output(store, out, jid, "2.2", old, ["pending"])
    dead = _output(store, out, jid, "2.3", old, ["dead"])
    mixed = _output(store, out, jid, "2.4", old, ["delivered", "pending"])
    nowhere = _output(store, out, jid, "2.5", old, [])
    recent = _output(store, out, jid, "2.6", NOW - 1.0 * DAY_S, ["delivered"])

    plan = plan_purge(store, NOW, spool_days=0, outputs_days=30)
    assert [o.sop_uid for o in plan.outputs] == ["2.1"] and plan.instances == ()
    assert plan.outputs[0].delivered_to == ("DEST0", "DEST1")
    res = execute_purge(store, plan)
    assert res.files_deleted == 1 and res.output_rows == 1 and res.delivery_rows == 2 and res.errors == []
    assert not delivered.exists()
    for p in (pending, dead, mixed, nowhere, recent):
        assert p.exists()
    remaining = {r["sop_uid"] for r in store.iter_rows(outputs)}
    assert remaining == {"2.2", "2.3", "2.4", "2.5", "2.6"}
    # Forever: outputs_days = 0 purges nothing, however old.
    assert plan_purge(store, NOW * 10, spool_days=0, outputs_days=0).outputs == ()


def test_outputs_of_unfinished_jobs_are_kept(store: Store, tmp_path: Path) -> None:
    _receive(store, tmp_path / "spool", "1.1", "1.1.1", 1, at=0.0)
    jid = _job(store, "1.1", "1.1.1", 1, JobState.AWAITING_CORRECTION, at=1.0)
    p = _output(store, tmp_path / "outputs", jid, "2.1", 2.0, ["delivered"])
    assert plan_purge(store, NOW, 30, 30).empty
    assert p.exists()


def test_dry_run_lists_without_deleting(store: Store, tmp_path: Path) -> None:
    files = _receive(store, tmp_path / "spool", "1.1", "1.1.1", 2, at=0.0)
    jid = _job(store, "1.1", "1.1.1", 2, JobState.DONE, at=1.0)
    out = _output(store, tmp_path / "outputs", jid, "2.1", 2.0, ["delivered"])
    plan = plan_purge(store, NOW, 30, 30)
    text = dry_run(plan)
    for p in files + [out]:
        assert str(p) in text
    assert "would delete 2 instance(s) and 1 output(s), 210 bytes" in text
    assert all(p.exists() for p in files + [out])
    assert store.count_instances() == 2 and len(list(store.iter_rows(outputs))) == 1


def test_spool_rules(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    done = _receive(store, root, "1.1", "1.1.1", 2, at=0.0)
    # A job-less series (localizer) in a finished study goes with it.
    localizer = _receive(store, root, "1.1", "1.1.2", 1, at=0.0)
    _job(store, "1.1", "1.1.1", 2, JobState.DONE, at=1.0)
    failed = _receive(store, root, "1.2", "1.2.1", 1, at=0.0)
    # A pending corrected SEG is never purged, even in a finished study.
    pending_seg = _receive(store, root, "1.2", "1.2.9", 1, at=0.0)
    with store.engine.begin() as c:
        c.execute(corrections.insert().values(sop_uid="1.2.9.1", series_uid="1.2.9", job_id=None, state="pending",
                                              reason="", received_at=0.0))
    _job(store, "1.2", "1.2.1", 1, JobState.FAILED, at=1.0)
    # Awaiting correction: its images and the SEG the radiologist sent back are kept.
    waiting = _receive(store, root, "1.3", "1.3.1", 1, at=0.0)
    waiting_seg = _receive(store, root, "1.3", "1.3.9", 1, at=0.5)  # job-less series in that study
    _job(store, "1.3", "1.3.1", 1, JobState.AWAITING_CORRECTION, at=1.0)
    # Finished too recently (a refinement ran yesterday on old images).
    fresh_job = _receive(store, root, "1.4", "1.4.1", 1, at=0.0)
    _job(store, "1.4", "1.4.1", 1, JobState.DONE, at=NOW - DAY_S)
    # Study still receiving (no sweep yet).
    receiving = _receive(store, root, "1.5", "1.5.1", 1, at=0.0)
    # A late instance re-opens a finished study: it is kept until the study is stable again.
    late = _receive(store, root, "1.6", "1.6.1", 1, at=0.0)
    _job(store, "1.6", "1.6.1", 1, JobState.DONE, at=1.0)
    late += _receive(store, root, "1.6", "1.6.2", 1, at=2.0)
    assert {r["study_uid"]: r["state"] for r in store.studies()}["1.6"] == "receiving"

    plan = plan_purge(store, NOW, spool_days=30, outputs_days=0)
    assert {i.sop_uid for i in plan.instances} == {"1.1.1.1", "1.1.1.2", "1.2.1.1", "1.1.2.1"}
    res = execute_purge(store, plan)
    assert res.files_deleted == 4 and res.instance_rows == 4 and res.bytes_freed == 400
    for p in done + failed + localizer:
        assert not p.exists()
    assert not (root / "1.1").exists()  # emptied series and study directories are removed
    assert root.is_dir()
    for p in waiting + waiting_seg + fresh_job + receiving + pending_seg + late:
        assert p.exists()
    assert not store.has_instance("1.1.1.1") and store.has_instance("1.3.1.1")
    assert plan_purge(store, NOW, 0, 0).empty  # 0 days = keep forever
    assert plan_purge(store, NOW, 30, 0).instances == ()  # idempotent


def test_execute_rechecks_and_tolerates_missing_files(store: Store, tmp_path: Path) -> None:
    files = _receive(store, tmp_path / "spool", "1.1", "1.1.1", 2, at=0.0)
    jid = _job(store, "1.1", "1.1.1", 2, JobState.DONE, at=1.0)
    out = _output(store, tmp_path / "outputs", jid, "2.1", 2.0, ["delivered"])
    plan = plan_purge(store, NOW, 30, 30)
    with store.engine.begin() as c:  # delivery re-queued after planning
        c.execute(deliveries.update().values(state="pending"))
    files[0].unlink()  # a crash after unlinking, before the rows went
    audit_path = tmp_path / "audit.jsonl"
    with AuditLog(audit_path) as audit:
        res = execute_purge(store, plan, audit=audit)
    assert res.skipped == 1 and out.exists()
    assert res.files_missing == 1 and res.files_deleted == 1 and res.instance_rows == 2
    (rec,) = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert rec["event"] == "data_purged" and rec["detail"] == {"instances": 2, "outputs": 0}
    assert rec["objects"] == [{"type": "study", "study_instance_uid": "1.1"}]


def test_bad_periods_rejected(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spool_days"):
        plan_purge(store, NOW, -1, 30)
    with pytest.raises(ValueError, match="outputs_days"):
        plan_purge(store, NOW, 30, float("nan"))
    with pytest.raises(ValueError, match="min_free_bytes"):
        disk_pressure(tmp_path, -1)
    assert disk_pressure(tmp_path, 0) is False


class _Sink:
    def __init__(self) -> None:
        self.items: list[StoredInstance] = []
        self._lock = threading.Lock()

    def record(self, inst: StoredInstance) -> None:
        with self._lock:
            self.items.append(inst)


def _c_store(port: int, path: Path) -> int:
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="I3NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def _allocate(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            block = b"\0" * (1 << 20)
            for _ in range(size // len(block)):
                os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_full_disk_answers_a700_until_a_purge_frees_space(store: Store, tmp_path: Path) -> None:
    """Reserve set just above the free space: A700; purging a big delivered output frees it: success."""
    spool_dir, outputs_dir = tmp_path / "spool", tmp_path / "outputs"
    spool_dir.mkdir()
    big_size = 512 << 20
    margin = big_size // 2
    _receive(store, spool_dir, "1.1", "1.1.1", 1, at=0.0)
    jid = _job(store, "1.1", "1.1.1", 1, JobState.DONE, at=1.0)
    big = outputs_dir / str(jid) / "2.1.dcm"
    if spool.free_bytes(tmp_path) < 4 * big_size:
        pytest.skip("not enough free disk space for the simulation")
    _allocate(big, big_size)
    with store.engine.begin() as c:
        c.execute(outputs.insert().values(sop_uid="2.1", job_id=jid, version=1, kind="seg", series_uid="9.9",
                                          path=str(big), created_at=2.0))
        c.execute(deliveries.insert().values(output_uid="2.1", destination="PACS", state="delivered", attempts=1,
                                             next_attempt_at=0.0, last_error="", updated_at=3.0))
    reserve = spool.free_bytes(spool_dir) + margin  # "the disk is full": free space below the reserve
    assert disk_pressure(spool_dir, reserve)

    ct = write_datasets(build_ct_series(np.zeros((2, 8, 8), np.float32), (2.0, 1.0, 1.0)), tmp_path / "ct")
    sink = _Sink()
    scp = StoreSCP(ScpConfig(port=0, spool_dir=spool_dir, min_free_bytes=reserve), sink)
    scp.start()
    try:
        assert _c_store(scp.port, ct[0]) == STATUS_OUT_OF_RESOURCES
        assert sink.items == [] and not list((spool_dir).rglob(f"{ct[0].stem}.dcm"))

        res = purge_once(store, time.time(), spool_days=0, outputs_days=30)
        assert res.files_deleted == 1 and res.bytes_freed == big_size and not big.exists()
        assert not disk_pressure(spool_dir, reserve)

        assert _c_store(scp.port, ct[1]) == STATUS_SUCCESS
        assert len(sink.items) == 1 and sink.items[0].path.is_file()
    finally:
        scp.stop()
