"""The audit trail: valid JSON lines, append-only, thread-safe, and free of patient data."""
from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom.scp import STATUS_SUCCESS, StoredInstance, store_instance
from dicom.synthetic import PatientInfo, build_ct_series, write_datasets
from node.audit import EVENT_CODES, AuditingSink, AuditLog, AuditObserver
from node.ingest import StoreSink
from node.store import Store

PATIENT = PatientInfo(name="Doe^Jane^Q", id="PID-98765-XYZ", birth_date="19650312", sex="F")
PATIENT_STRINGS = ("Doe", "Jane", "PID-98765-XYZ", "98765", "19650312", "1965-03-12")


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="ascii")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_every_event_is_one_valid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    with AuditLog(path, ae_title="I3NODE") as audit:
        audit.config_loaded("/etc/i3node/i3node.toml", "ab" * 32)
        audit.node_started(port=11112, tls=True)
        audit.association_accepted("PACS", "10.1.2.3")
        audit.association_rejected("INTRUDER", "10.9.9.9", "calling AE title not recognised")
        audit.instances_stored("1.2.3.4", 120, "PACS", address="10.1.2.3", duplicates=2)
        audit.output_delivered("VIEWER", "1.2.3.4.5", "seg", study_uid="1.2.3.4", address="10.1.2.4:104")
        audit.output_delivered("VIEWER", "1.2.3.4.6", "kos", success=False, reason="dead-lettered after 8 attempts")
        audit.corrected_seg_ingested("1.2.3.4.7", 42, study_uid="1.2.3.4")
        audit.node_stopped()
    records = _records(path)
    assert [r["event"] for r in records] == [
        "config_loaded", "node_started", "association_accepted", "association_rejected", "instances_stored",
        "output_delivered", "output_delivered", "corrected_seg_ingested", "node_stopped",
    ]
    for r in records:
        assert set(r) >= {"timestamp", "event", "event_id", "action", "outcome", "outcome_code", "participants", "objects"}
        ts = dt.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00"))
        assert ts.utcoffset() == dt.timedelta(0)
        assert r["event_id"]["code"] == EVENT_CODES[r["event"]][0][0]
        local = r["participants"][0]
        assert local["role"] == "local" and local["ae_title"] == "I3NODE" and local["pid"] > 0
    by_event = {r["event"]: r for r in records}
    acc = by_event["association_accepted"]
    assert acc["outcome"] == "success" and acc["participants"][1] == {
        "role": "remote", "ae_title": "PACS", "address": "10.1.2.3", "requestor": True,
    }
    rej = by_event["association_rejected"]
    assert rej["outcome_code"] == 4 and rej["detail"]["reason"] == "calling AE title not recognised"
    stored = by_event["instances_stored"]
    assert stored["objects"] == [{"type": "study", "study_instance_uid": "1.2.3.4"}]
    assert stored["detail"] == {"count": 120, "duplicates": 2} and stored["action"] == "C"
    failed = [r for r in records if r["event"] == "output_delivered"][1]
    assert failed["outcome_code"] == 8 and failed["objects"][0]["sop_instance_uid"] == "1.2.3.4.6"
    assert by_event["corrected_seg_ingested"]["detail"] == {"job_id": 42}
    assert by_event["config_loaded"]["detail"]["sha256"] == "ab" * 32


def test_appends_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as a:
        a.node_started()
        a.node_stopped()
    first = path.read_bytes()
    with AuditLog(path) as b:
        b.node_started()
    after = path.read_bytes()
    assert after.startswith(first) and len(_records(path)) == 3
    assert (path.stat().st_mode & 0o777) == 0o640


def test_closed_log_refuses_events(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl")
    audit.close()
    audit.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        audit.node_stopped()


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)

    def work(i: int) -> None:
        for j in range(40):
            audit.association_accepted(f"AE{i}", f"10.0.{i}.{j}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    records = _records(path)
    assert len(records) == 320
    assert len({(r["participants"][1]["ae_title"], r["participants"][1]["address"]) for r in records}) == 320


def test_free_text_is_single_line_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.association_rejected("EVIL\nAE", "1.2.3.4", "x" * 5000 + "\n{\"event\":\"forged\"}")
    (rec,) = _records(path)
    assert len(rec["detail"]["reason"]) <= 256 and "\n" not in rec["participants"][1]["ae_title"]


def test_rejects_bad_counts(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl") as audit:
        with pytest.raises(ValueError, match="duplicates"):
            audit.instances_stored("1.2", 1, "PACS", duplicates=2)


def _encoded(path: Path) -> tuple[bytes, bytes]:
    """Split a Part 10 file into (preamble + DICM + file meta, data set) as the SCP sees it."""
    raw = path.read_bytes()
    meta_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    cut = 132 + 12 + meta_len
    return raw[:cut], raw[cut:]


def test_full_flow_never_writes_patient_attributes(tmp_path: Path) -> None:
    """Receive a study whose patient module is filled, deliver, correct: the trail has UIDs only."""
    image = np.zeros((3, 8, 8), dtype=np.float32)
    datasets = build_ct_series(image, (2.0, 1.0, 1.0), patient=PATIENT, accession_number="ACC-5551234")
    files = write_datasets(datasets, tmp_path / "in")
    assert PATIENT.id.encode() in files[0].read_bytes()  # the input really carries patient data
    study_uid = str(datasets[0].StudyInstanceUID)

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.config_loaded(tmp_path / "i3node.toml", "0" * 64)
    audit.node_started(port=11112)
    observer = AuditObserver(audit)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    sink = AuditingSink(StoreSink(store), audit, store)

    observer.accepted("PACS", "127.0.0.1")
    for f in files + files[:1]:  # the last one is a duplicate
        out = store_instance(
            dataset_bytes=_encoded(f)[1], transfer_syntax=str(pydicom.dcmread(f).file_meta.TransferSyntaxUID),
            sop_class_uid=str(datasets[0].SOPClassUID), sop_instance_uid=str(pydicom.dcmread(f).SOPInstanceUID),
            spool_dir=tmp_path / "spool", min_free_bytes=0, sink=sink, calling_ae="PACS", peer_address="127.0.0.1",
        )
        assert out.status == STATUS_SUCCESS
    observer.rejected("ROGUE", "127.0.0.2", "calling AE title not recognised")
    assert sink.pending == 3  # recorded (and acknowledged), not yet in the audit file
    assert sink.flush() == 1 and sink.pending == 0
    assert sink.flush() == 0

    audit.output_delivered("VIEWER", "1.2.826.0.1.3680043.10.1.1", "seg", study_uid=study_uid)
    audit.corrected_seg_ingested("1.2.826.0.1.3680043.10.1.2", 1, study_uid=study_uid)
    audit.node_stopped()
    audit.close()

    text = path.read_text(encoding="ascii")
    for needle in PATIENT_STRINGS + ("ACC-5551234", "PatientName", "PatientID", "PatientBirthDate"):
        assert needle not in text, needle
    records = _records(path)
    stored = [r for r in records if r["event"] == "instances_stored"]
    assert len(stored) == 1
    assert stored[0]["objects"] == [{"type": "study", "study_instance_uid": study_uid}]
    assert stored[0]["detail"] == {"count": 4, "duplicates": 1}
    assert stored[0]["participants"][1]["ae_title"] == "PACS"
    assert [r["event"] for r in records if r["event"].startswith("association")] == [
        "association_accepted", "association_rejected",
    ]
    # No field name anywhere refers to patient attributes.
    keys: set[str] = set()

    def walk(v: object) -> None:
        if isinstance(v, dict):
            keys.update(v)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(records)
    assert not {k for k in keys if "patient" in k.lower() or "birth" in k.lower() or "name" in k.lower()}


def test_auditing_sink_counts_only_recorded_and_survives_a_crash(tmp_path: Path) -> None:
    """Rows recorded before an acknowledgement are audited even when the process dies before a flush."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")

    class _Failing:
        def record(self, inst: StoredInstance) -> None:
            raise RuntimeError("database down")

    failing = AuditingSink(_Failing(), audit, store)
    inst = StoredInstance("1.2.3", "1.2.3.1", "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", "CT", tmp_path / "x.dcm", 1,
                          "PACS", "10.0.0.1")
    with pytest.raises(RuntimeError):
        failing.record(inst)
    assert failing.pending == 0
    crashed = AuditingSink(StoreSink(store), audit, store)
    crashed.record(inst)
    crashed.record(StoredInstance("1.2.4", "1.2.4.1", "1.2.4.1.1", "1.2.840.10008.5.1.4.1.1.2", "CT",
                                  tmp_path / "y.dcm", 1, "PACS", "10.0.0.1"))
    del crashed  # the process dies: nothing was flushed
    store.close()
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")  # the next start
    restarted = AuditingSink(StoreSink(store), audit, store)
    assert restarted.pending == 2
    assert restarted.flush(force=True, backlog=True) == 2
    audit.close()
    records = _records(path)
    assert sorted(r["objects"][0]["study_instance_uid"] for r in records) == ["1.2.3", "1.2.4"]
    assert all(r["detail"]["backlog"] is True and r["participants"][1]["address"] == "10.0.0.1" for r in records)
