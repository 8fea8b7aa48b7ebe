"""Integration tests of the C-STORE fast path (dicom.fast_store) in a real StoreSCP.

Real sockets on 127.0.0.1; DCMTK's storescu and pynetdicom as peers. Every test checks
both what the peer was answered and what the SCP wrote and recorded, and whether the
instances went through the fast path (a spy around
:func:`dicom.pynetdicom_compat.install_fast_store`) or
pynetdicom's regular C-STORE handler.
"""
from __future__ import annotations

import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage as CTStorageSOP
from pynetdicom.sop_class import Verification

from dicom import fast_store, pynetdicom_compat, spool
from dicom.scp import (
    STATUS_BAD_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_RECORD_FAILED,
    STATUS_SUCCESS,
    StoredInstance,
    StoreSCP,
)
from dicom.synthetic import build_ct_series, write_datasets
from tests.integration.test_scp import ListSink, scp_factory

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
DESCRIPTION = "Thorax Übersicht"


# -- helpers -----------------------------------------------------------------------------


def ct_series(n: int, size: int = 64, seed: int = 0, description: str = DESCRIPTION) -> list[Dataset]:
    """`n` synthetic CT slices (SpecificCharacterSet ISO_IR 100), Explicit VR LE file meta."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 2000, size=(n, size, size)).astype(np.float64)
    return build_ct_series(image, (2.5, 0.8, 0.8), series_description=description, series_number=4)


def dataset_part(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (everything after the file meta group)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert struct.unpack_from("<HH2sH", raw, 132) == (0x0002, 0x0000, b"UL", 4)
    (group_length,) = struct.unpack_from("<L", raw, 140)
    return raw[144 + group_length :]


def spool_path(root: Path, ds: Dataset) -> Path:
    return spool.instance_path(root, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def spool_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@dataclass
class PathSpy:
    """What went through the fast path and what through pynetdicom's C-STORE handler."""

    assemblers: list[fast_store.StoreAssembler | None] = field(default_factory=list)
    fast: list[tuple[str, str, list[int]]] = field(default_factory=list)  # (sop, ts, fragment sizes)
    statuses: list[int] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def handled(self) -> int:
        return sum(a.handled for a in self.assemblers if a is not None)


@pytest.fixture
def path_spy(monkeypatch: pytest.MonkeyPatch) -> PathSpy:
    spy = PathSpy()
    original_install = pynetdicom_compat.install_fast_store
    original_on_c_store = StoreSCP._on_c_store

    def install(assoc: Any, classes: Any, store: Any, **kwargs: Any) -> fast_store.StoreAssembler | None:
        def wrapped(request: fast_store.StoreRequest, ts: str, fragments: Sequence[memoryview]) -> tuple[int, str]:
            status, comment = store(request, ts, fragments)
            with spy.lock:
                spy.fast.append((request.sop_instance_uid, ts, [len(f) for f in fragments]))
                spy.statuses.append(status)
            return status, comment

        assembler = original_install(assoc, classes, wrapped, **kwargs)
        with spy.lock:
            spy.assemblers.append(assembler)
        return assembler

    def on_c_store(self: StoreSCP, event: Any) -> Any:
        with spy.lock:
            spy.slow.append(str(event.request.AffectedSOPInstanceUID))
        return original_on_c_store(self, event)

    # scp.py calls install_fast_store through its module and binds _on_c_store at start().
    monkeypatch.setattr(pynetdicom_compat, "install_fast_store", install)
    monkeypatch.setattr(StoreSCP, "_on_c_store", on_c_store)
    return spy


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def make_scp(tmp_path: Path, sink: ListSink, path_spy: PathSpy) -> Iterator:
    """Factory starting a StoreSCP on an ephemeral port (after the spy is in place)."""
    yield from scp_factory(tmp_path, sink)


def associate(port: int, *contexts: tuple[str, str], max_pdu: int | None = None) -> Any:
    ae = AE(ae_title="TESTSCU")
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    for abstract, syntax in contexts or ((CTStorageSOP, ExplicitVRLittleEndian),):
        ae.add_requested_context(abstract, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="I3NODE", max_pdu=ae.maximum_pdu_size)
    assert assoc.is_established
    return assoc


def store_all(
    port: int, datasets: list[Dataset], *contexts: tuple[str, str], max_pdu: int | None = None
) -> list[Any]:
    """Send `datasets` with pynetdicom on one association; return the response data sets."""
    assoc = associate(port, *contexts, max_pdu=max_pdu)
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def assert_recorded(inst: StoredInstance, ds: Dataset) -> None:
    assert inst.study_uid == ds.StudyInstanceUID
    assert inst.series_uid == ds.SeriesInstanceUID
    assert inst.sop_uid == ds.SOPInstanceUID
    assert inst.sop_class_uid == CTImageStorage
    assert inst.modality == "CT"
    assert inst.series_description == DESCRIPTION
    assert inst.series_number == 4
    assert inst.instance_number == ds.InstanceNumber
    assert inst.size == inst.path.stat().st_size
    assert inst.duplicate is False


# -- DCMTK storescu ----------------------------------------------------------------------


@pytest.mark.dcmtk
def test_storescu_series_on_fast_path_byte_identical(
    make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path
) -> None:
    datasets = ct_series(20, size=160)
    src = write_datasets(datasets, tmp_path / "src")
    scp = make_scp()
    proc = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "I3NODE", "--max-send-pdu", "16384",
         "127.0.0.1", str(scp.port), "+sd", str(tmp_path / "src")],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr

    # Every instance went through the fast path, in many fragments (16 KiB PDUs).
    (assembler,) = path_spy.assemblers
    assert assembler is not None
    assert assembler._max_pdu == 16384  # noqa: SLF001 - storescu's default receive limit
    assert path_spy.handled == 20
    assert path_spy.slow == []
    assert sorted(sop for sop, _, _ in path_spy.fast) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert path_spy.statuses == [STATUS_SUCCESS] * 20
    for _, ts, sizes in path_spy.fast:
        assert ts == ExplicitVRLittleEndian
        assert len(sizes) >= 3
        assert max(sizes) <= 16384

    recorded = sink.by_sop()
    assert len(sink.items) == 20
    for ds, path in zip(datasets, src, strict=True):
        stored = spool_path(tmp_path / "spool", ds)
        assert stored.is_file()
        assert dataset_part(stored) == dataset_part(path)  # byte-identical data set
        got = pydicom.dcmread(stored)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert got.file_meta.SourceApplicationEntityTitle == "STORESCU"
        np.testing.assert_array_equal(got.pixel_array, ds.pixel_array)
        inst = recorded[ds.SOPInstanceUID]
        assert inst.path == stored
        assert inst.calling_ae == "STORESCU"
        assert inst.peer_address == "127.0.0.1"
        assert_recorded(inst, ds)
    assert len(spool_files(tmp_path / "spool")) == 20
    assert list(spool.iter_temp_files(tmp_path / "spool")) == []


@pytest.mark.dcmtk
def test_storescu_implicit_vr(make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path) -> None:
    datasets = ct_series(3, size=128, seed=1)
    write_datasets(datasets, tmp_path / "src")
    scp = make_scp(maximum_pdu_size=8192)  # storescu sends PDUs of at most 8 KiB
    proc = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "I3NODE", "-xi", "127.0.0.1", str(scp.port),
         "+sd", str(tmp_path / "src")],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert path_spy.handled == 3 and path_spy.slow == []
    assert {ts for _, ts, _ in path_spy.fast} == {ImplicitVRLittleEndian}
    for _, _, sizes in path_spy.fast:
        assert len(sizes) >= 4 and max(sizes) <= 8192 - 6
    recorded = sink.by_sop()
    for ds in datasets:
        inst = recorded[ds.SOPInstanceUID]
        assert_recorded(inst, ds)
        got = pydicom.dcmread(inst.path)
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert got.SeriesDescription == DESCRIPTION
        np.testing.assert_array_equal(got.pixel_array, ds.pixel_array)


# -- pynetdicom as SCU -------------------------------------------------------------------


def test_echo_and_store_alternate_on_one_association(
    make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path
) -> None:
    datasets = ct_series(2, size=96, seed=2)
    scp = make_scp()
    assoc = associate(scp.port, (Verification, ExplicitVRLittleEndian), (CTStorageSOP, ExplicitVRLittleEndian))
    try:
        statuses = [
            assoc.send_c_echo().Status,
            assoc.send_c_store(datasets[0]).Status,
            assoc.send_c_echo().Status,
            assoc.send_c_store(datasets[1]).Status,
            assoc.send_c_echo().Status,
        ]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0, 0]
    assert assoc.is_released
    assert path_spy.handled == 2 and path_spy.slow == []
    recorded = sink.by_sop()
    assert len(sink.items) == 2
    for ds in datasets:
        assert_recorded(recorded[ds.SOPInstanceUID], ds)
        assert dataset_part(spool_path(tmp_path / "spool", ds)) == encode(ds, False, True)


def test_small_max_pdu_both_ways(make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path) -> None:
    datasets = ct_series(3, size=96, seed=3)
    scp = make_scp(maximum_pdu_size=4096)
    responses = store_all(scp.port, datasets, max_pdu=4096)
    assert [r.Status for r in responses] == [0, 0, 0]
    (assembler,) = path_spy.assemblers
    assert assembler is not None and assembler.handled == 3
    assert assembler._max_pdu == 4096  # noqa: SLF001 - the peer's limit is applied to responses
    for _, _, sizes in path_spy.fast:
        # 96 x 96 x 2 bytes of pixel data in PDVs of at most 4096 - 6 bytes.
        assert len(sizes) >= 5
        assert max(sizes) <= 4096 - 6
    for ds in datasets:
        assert dataset_part(spool_path(tmp_path / "spool", ds)) == encode(ds, False, True)
    assert len(sink.items) == 3


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_fast_store_disabled_uses_pynetdicom_path(
    make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path
) -> None:
    datasets = ct_series(3, size=96, seed=4)
    datasets[2].StudyInstanceUID = "1.2.abc"  # a failure status on the regular path too
    scp = make_scp(fast_store=False)
    responses = store_all(scp.port, datasets)
    assert [r.Status for r in responses] == [0, 0, STATUS_BAD_UID]
    assert responses[2].ErrorComment == "StudyInstanceUID invalid"
    assert path_spy.assemblers == [] and path_spy.fast == []
    assert sorted(path_spy.slow) == sorted(ds.SOPInstanceUID for ds in datasets)
    recorded = sink.by_sop()
    assert len(recorded) == 2
    for ds in datasets[:2]:
        assert_recorded(recorded[ds.SOPInstanceUID], ds)
        assert dataset_part(spool_path(tmp_path / "spool", ds)) == encode(ds, False, True)
    assert len(spool_files(tmp_path / "spool")) == 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_bad_study_uid_refused_on_fast_path(make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path) -> None:
    datasets = ct_series(2, size=32, seed=5)
    datasets[0].StudyInstanceUID = "1.2.abc"
    scp = make_scp()
    responses = store_all(scp.port, datasets)
    assert responses[0].Status == STATUS_BAD_UID
    assert responses[0].ErrorComment == "StudyInstanceUID invalid"
    assert responses[1].Status == STATUS_SUCCESS
    assert "ErrorComment" not in responses[1]
    assert path_spy.handled == 2 and path_spy.slow == []
    assert path_spy.statuses == [STATUS_BAD_UID, STATUS_SUCCESS]
    assert [i.sop_uid for i in sink.items] == [datasets[1].SOPInstanceUID]
    assert spool_files(tmp_path / "spool") == [spool_path(tmp_path / "spool", datasets[1])]


def test_disk_reserve_refused_on_fast_path(make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path) -> None:
    reserve = spool.free_bytes(tmp_path) + (1 << 40)
    scp = make_scp(min_free_bytes=reserve)
    responses = store_all(scp.port, ct_series(2, size=32, seed=6))
    assert [r.Status for r in responses] == [STATUS_OUT_OF_RESOURCES] * 2
    assert [r.ErrorComment for r in responses] == ["Out of resources: disk reserve reached"] * 2
    assert path_spy.handled == 2 and path_spy.slow == []
    assert sink.items == []
    assert spool_files(tmp_path / "spool") == []


def test_sink_failure_refused_on_fast_path(make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path) -> None:
    scp = make_scp()
    sink.fail = True
    responses = store_all(scp.port, ct_series(1, size=32, seed=7))
    assert responses[0].Status == STATUS_RECORD_FAILED
    assert responses[0].ErrorComment == "Out of resources: could not record"
    assert path_spy.handled == 1
    assert spool_files(tmp_path / "spool") == []


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
    ids=["implicit-le", "explicit-be", "deflated"],
)
def test_other_native_transfer_syntaxes(
    make_scp, sink: ListSink, path_spy: PathSpy, tmp_path: Path, syntax: str
) -> None:
    datasets = ct_series(3, size=96, seed=8)
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = syntax
    scp = make_scp()
    responses = store_all(scp.port, datasets, (CTStorageSOP, syntax))
    assert [r.Status for r in responses] == [0, 0, 0]
    assert path_spy.handled == 3 and path_spy.slow == []
    assert {ts for _, ts, _ in path_spy.fast} == {syntax}
    little = syntax != ExplicitVRBigEndian
    implicit = syntax == ImplicitVRLittleEndian
    recorded = sink.by_sop()
    for ds in datasets:
        inst = recorded[ds.SOPInstanceUID]
        assert_recorded(inst, ds)
        assert dataset_part(inst.path) == encode(ds, implicit, little, syntax == DeflatedExplicitVRLittleEndian)
        got = pydicom.dcmread(inst.path)
        assert got.file_meta.TransferSyntaxUID == syntax
        assert got.SeriesDescription == DESCRIPTION
        assert got.InstanceNumber == ds.InstanceNumber


def test_concurrent_associations(make_scp, sink: ListSink, path_spy: PathSpy) -> None:
    series = [ct_series(4, size=64, seed=10 + k) for k in range(3)]
    scp = make_scp()
    results: dict[int, list[int]] = {}

    def send(k: int) -> None:
        results[k] = [r.Status for r in store_all(scp.port, series[k])]

    threads = [threading.Thread(target=send, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {k: [0, 0, 0, 0] for k in range(3)}
    assert len(path_spy.assemblers) == 3
    assert path_spy.handled == 12 and path_spy.slow == []
    assert sorted(sink.by_sop()) == sorted(ds.SOPInstanceUID for s in series for ds in s)


def test_install_after_first_request_falls_back_cleanly(
    make_scp, sink: ListSink, path_spy: PathSpy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A request read before the assembler is installed stays on pynetdicom's path.

    The EVT_ACCEPTED handler that installs the assembler races the peer's first PDUs
    (the A-ASSOCIATE-AC is queued before the handler runs); delaying the handler makes the
    first request arrive before the hook: it must be stored by pynetdicom's handler, and
    the requests after it on the fast path.
    """
    spy_install = pynetdicom_compat.install_fast_store

    def late_install(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return spy_install(*args, **kwargs)

    monkeypatch.setattr(pynetdicom_compat, "install_fast_store", late_install)
    datasets = ct_series(3, size=128, seed=20)
    scp = make_scp(maximum_pdu_size=4096)
    responses = store_all(scp.port, datasets)
    assert [r.Status for r in responses] == [0, 0, 0]
    assert path_spy.slow == [datasets[0].SOPInstanceUID]
    assert path_spy.handled == 2
    assert [sop for sop, _, _ in path_spy.fast] == [ds.SOPInstanceUID for ds in datasets[1:]]
    for ds in datasets:
        assert dataset_part(spool_path(tmp_path / "spool", ds)) == encode(ds, False, True)
        assert_recorded(sink.by_sop()[ds.SOPInstanceUID], ds)


def test_instance_with_private_sv_element_is_stored(make_scp, sink: ListSink, path_spy: PathSpy) -> None:
    ds = ct_series(1, size=32, seed=21)[0]
    ds.add_new(0x00090010, "LO", "I3NODE TEST")
    ds.add_new(0x00091001, "SV", -3)
    scp = make_scp()
    (response,) = store_all(scp.port, [ds])
    assert path_spy.handled == 1
    assert response.Status == STATUS_SUCCESS, hex(response.Status)
    assert_recorded(sink.by_sop()[ds.SOPInstanceUID], ds)
