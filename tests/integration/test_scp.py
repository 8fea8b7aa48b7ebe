"""Integration tests of the Storage SCP (real sockets on 127.0.0.1, DCMTK as a peer)."""
from __future__ import annotations

import os
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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage as CTStorageSOP

from dicom import spool
from dicom.scp import (
    STATUS_BAD_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_RECORD_FAILED,
    ScpConfig,
    StoredInstance,
    StoreSCP,
    accepted_transfer_syntaxes,
)

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


# -- helpers ---------------------------------------------------------------------------


def make_ct_series(
    n: int,
    *,
    size: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """Return `n` axial CT slices with valid geometry (int16, `size` x `size`)."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "Test^Patient"
        ds.PatientID = "TEST01"
        ds.SeriesDescription = "Test CT"
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-50.0, -50.0, 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.5, 1.5]
        ds.SliceThickness = 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = rng.integers(-1000, 2000, size=(size, size), dtype=np.int16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def write_series(datasets: list[Dataset], out_dir: Path) -> list[Path]:
    """Write each dataset to ``out_dir/<index>.dcm``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = out_dir / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port}")


class ListSink:
    """Thread-safe list-backed sink; raises while ``fail`` is set."""

    def __init__(self) -> None:
        self.items: list[StoredInstance] = []
        self.fail = False
        self._lock = threading.Lock()

    def record(self, inst: StoredInstance) -> None:
        with self._lock:
            if self.fail:
                raise RuntimeError("sink unavailable")
            self.items.append(inst)

    def by_sop(self) -> dict[str, StoredInstance]:
        with self._lock:
            return {i.sop_uid: i for i in self.items}


class RecordingObserver:
    """Collects association outcomes."""

    def __init__(self) -> None:
        self.accepted_calls: list[tuple[str, str]] = []
        self.rejected_calls: list[tuple[str, str, str]] = []

    def accepted(self, calling_ae: str, address: str) -> None:
        self.accepted_calls.append((calling_ae, address))

    def rejected(self, calling_ae: str, address: str, reason: str) -> None:
        self.rejected_calls.append((calling_ae, address, reason))


def spool_files(root: Path) -> list[Path]:
    """All files (of any name) under the spool."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def pynetdicom_store(port: int, datasets: list[Dataset], calling_ae: str = "TESTSCU") -> list[int | None]:
    """Send `datasets` on one association with pynetdicom; return the statuses."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTStorageSOP, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="I3NODE")
    assert assoc.is_established
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(getattr(rsp, "Status", None))
    finally:
        assoc.release()
    return statuses


def run_storescu(port: int, src: Path, calling_ae: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu on a folder."""
    return subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", "I3NODE", "127.0.0.1", str(port), "+sd", str(src)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


#: The receive paths every SCP test runs on: the node's hooks (C-STORE fast path, tuned
#: reactor) and stock pynetdicom (``[dicom] fast_store = false, low_latency = false``).
RECEIVE_PATHS = {"hooked": {"fast_store": True, "low_latency": True},
                 "stock": {"fast_store": False, "low_latency": False}}


def scp_factory(
    tmp_path: Path, sink: ListSink, observer: RecordingObserver | None = None, receive_path: str = "hooked"
) -> Iterator[Callable[..., StoreSCP]]:
    """Yield a factory starting StoreSCPs on ephemeral ports; stops them afterwards."""
    started: list[StoreSCP] = []

    def factory(**overrides: object) -> StoreSCP:
        kwargs: dict[str, object] = dict(
            port=0,
            spool_dir=tmp_path / "spool",
            min_free_bytes=0,
            acse_timeout=10,
            dimse_timeout=10,
            network_timeout=10,
            **RECEIVE_PATHS[receive_path],
        )
        kwargs.update(overrides)
        scp = StoreSCP(ScpConfig(**kwargs), sink, observer)  # type: ignore[arg-type]
        scp.start()
        started.append(scp)
        return scp

    yield factory
    for scp in started:
        scp.stop()


@pytest.fixture(params=sorted(RECEIVE_PATHS))
def make_scp(request: pytest.FixtureRequest, tmp_path: Path, sink: ListSink, observer: RecordingObserver) -> Iterator:
    """Factory starting a StoreSCP on an ephemeral port (each receive path); stopped at teardown."""
    yield from scp_factory(tmp_path, sink, observer, request.param)


# -- spool helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1.2.840.10008.1.2", True),
        ("1", True),
        ("1.2.abc", False),
        ("", False),
        ("1..2", False),
        ("1.2.", False),
        ("../1.2", False),
        ("1." + "2" * 63, False),
        (None, False),
    ],
)
def test_is_valid_uid(value: object, ok: bool) -> None:
    assert spool.is_valid_uid(value) is ok


def test_instance_path_rejects_bad_uid(tmp_path: Path) -> None:
    assert spool.instance_path(tmp_path, "1.2", "1.3", "1.4") == tmp_path / "1.2" / "1.3" / "1.4.dcm"
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        spool.instance_path(tmp_path, "1.2", "../etc", "1.4")


def test_durable_write_creates_dirs_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    spool.durable_write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc"
    spool.durable_write_bytes(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert list(spool.iter_temp_files(tmp_path)) == []

    def boom(fh: object) -> None:
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        spool.durable_write(tmp_path / "a" / "b" / "y.dcm", boom)
    assert not (tmp_path / "a" / "b" / "y.dcm").exists()
    assert list(spool.iter_temp_files(tmp_path)) == []
    assert spool.free_bytes(tmp_path / "missing" / "dir") > 0


def test_accepted_transfer_syntaxes_include_native_and_rle() -> None:
    syntaxes = accepted_transfer_syntaxes()
    assert syntaxes[0] == ExplicitVRLittleEndian
    assert RLELossless in syntaxes
    assert len(set(syntaxes)) == len(syntaxes)


def test_start_removes_leftover_temp_files(make_scp, tmp_path: Path) -> None:
    leftover = tmp_path / "spool" / "1.2" / "1.3" / ".1.4.dcm.abc.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    make_scp()
    assert not leftover.exists()


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ae_title"):
        ScpConfig(ae_title="X" * 17, spool_dir=tmp_path)
    with pytest.raises(ValueError, match="max_associations"):
        ScpConfig(max_associations=0, spool_dir=tmp_path)
    cfg = ScpConfig(spool_dir=tmp_path, allowed_callers={"PACS": frozenset({"10.0.0.5"}), "ANY": frozenset()})
    assert cfg.caller_rejection("PACS", "10.0.0.5") is None
    assert cfg.caller_rejection("ANY", "192.168.1.1") is None
    assert cfg.caller_rejection("PACS", "10.0.0.6") is not None
    assert cfg.caller_rejection("NOBODY", "10.0.0.5") == "calling AE title not recognised"


# -- DCMTK peers -----------------------------------------------------------------------


@pytest.mark.dcmtk
def test_storescu_series_lands_in_spool(make_scp, sink: ListSink, observer, tmp_path: Path) -> None:
    datasets = make_ct_series(100)
    write_series(datasets, tmp_path / "src")
    scp = make_scp(allowed_callers={"STORESCU": frozenset({"127.0.0.1"})})
    proc = run_storescu(scp.port, tmp_path / "src")
    assert proc.returncode == 0, proc.stderr

    assert len(sink.items) == 100
    assert {i.sop_uid for i in sink.items} == {ds.SOPInstanceUID for ds in datasets}
    assert observer.accepted_calls == [("STORESCU", "127.0.0.1")]
    for ds in datasets:
        path = spool.instance_path(
            tmp_path / "spool", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert path.is_file()
        got = pydicom.dcmread(path)
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        np.testing.assert_array_equal(got.pixel_array, ds.pixel_array)
    inst = sink.items[0]
    assert inst.modality == "CT"
    assert inst.series_description == "Test CT"
    assert inst.series_number == 3
    assert inst.calling_ae == "STORESCU"
    assert inst.peer_address == "127.0.0.1"
    assert inst.sop_class_uid == CTImageStorage
    assert inst.size == inst.path.stat().st_size
    assert inst.duplicate is False
    assert len(spool_files(tmp_path / "spool")) == 100


@pytest.mark.dcmtk
def test_echoscu(make_scp) -> None:
    scp = make_scp()
    proc = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "I3NODE", "127.0.0.1", str(scp.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.dcmtk
def test_unknown_calling_ae_rejected(make_scp, sink: ListSink, observer, tmp_path: Path) -> None:
    write_series(make_ct_series(3), tmp_path / "src")
    scp = make_scp(allowed_callers={"PACS": frozenset()})
    proc = run_storescu(scp.port, tmp_path / "src", calling_ae="INTRUDER")
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr
    assert sink.items == []
    assert spool_files(tmp_path / "spool") == []
    assert observer.rejected_calls == [
        ("INTRUDER", "127.0.0.1", "calling AE title not recognised")
    ]


@pytest.mark.dcmtk
def test_rle_compressed_instance_accepted(make_scp, sink: ListSink, tmp_path: Path) -> None:
    datasets = make_ct_series(2)
    for ds in datasets:
        ds.compress(RLELossless)
    write_series(datasets, tmp_path / "src")
    scp = make_scp()
    proc = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "I3NODE", "-xr", "127.0.0.1", str(scp.port),
         "+sd", str(tmp_path / "src")],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(sink.items) == 2
    got = pydicom.dcmread(sink.items[0].path)
    assert got.file_meta.TransferSyntaxUID == RLELossless


# -- pynetdicom as SCU (precise control of the association) ------------------------------


def test_disallowed_host_rejected(make_scp, sink: ListSink, observer, tmp_path: Path) -> None:
    scp = make_scp(allowed_callers={"TESTSCU": frozenset({"10.9.9.9"})})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTStorageSOP, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="I3NODE")
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x03)
    assert observer.rejected_calls[0][0] == "TESTSCU"
    assert "address" in observer.rejected_calls[0][2]
    assert sink.items == []


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("SOPInstanceUID", "1.2.abc"), ("StudyInstanceUID", "1.2.abc"), ("SeriesInstanceUID", None)],
)
def test_bad_uid_refused_nothing_written(
    make_scp, sink: ListSink, tmp_path: Path, attribute: str, value: str | None
) -> None:
    scp = make_scp()
    ds = make_ct_series(1)[0]
    if value is None:
        delattr(ds, attribute)
    else:
        setattr(ds, attribute, value)
        if attribute == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTStorageSOP, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="I3NODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp.Status == STATUS_BAD_UID
    assert attribute in rsp.ErrorComment
    assert sink.items == []
    assert spool_files(tmp_path / "spool") == []


def test_disk_reserve_refuses_with_a700(make_scp, sink: ListSink, tmp_path: Path) -> None:
    reserve = spool.free_bytes(tmp_path) + (1 << 40)
    scp = make_scp(min_free_bytes=reserve)
    statuses = pynetdicom_store(scp.port, make_ct_series(2))
    assert statuses == [STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES]
    assert sink.items == []
    assert spool_files(tmp_path / "spool") == []


def test_duplicate_is_idempotent(make_scp, sink: ListSink, tmp_path: Path) -> None:
    scp = make_scp()
    datasets = make_ct_series(4)
    assert pynetdicom_store(scp.port, datasets) == [0, 0, 0, 0]
    before = {p: p.read_bytes() for p in spool_files(tmp_path / "spool")}
    assert pynetdicom_store(scp.port, datasets) == [0, 0, 0, 0]
    after = {p: p.read_bytes() for p in spool_files(tmp_path / "spool")}
    assert before == after
    assert len(after) == 4
    assert [i.duplicate for i in sink.items] == [False] * 4 + [True] * 4
    assert [i.sop_uid for i in sink.items[4:]] == [ds.SOPInstanceUID for ds in datasets]


def test_abort_mid_series_keeps_exactly_acknowledged(make_scp, sink: ListSink, tmp_path: Path) -> None:
    scp = make_scp()
    datasets = make_ct_series(10)
    k = 6
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTStorageSOP, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="I3NODE")
    assert assoc.is_established
    acked = []
    for ds in datasets[:k]:
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == 0x0000
        acked.append(ds.SOPInstanceUID)
    assoc.abort()
    # Give the acceptor a moment to notice the abort.
    deadline = time.monotonic() + 5
    while scp._server.active_associations and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.05)
    files = spool_files(tmp_path / "spool")
    assert sorted(p.stem for p in files) == sorted(acked)
    assert sorted(i.sop_uid for i in sink.items) == sorted(acked)
    assert list(spool.iter_temp_files(tmp_path / "spool")) == []


def test_sink_failure_refuses_and_removes_file(make_scp, sink: ListSink, tmp_path: Path) -> None:
    scp = make_scp()
    datasets = make_ct_series(3)
    sink.fail = True
    statuses = pynetdicom_store(scp.port, datasets)
    assert statuses == [STATUS_RECORD_FAILED] * 3
    assert spool_files(tmp_path / "spool") == []
    sink.fail = False
    # A later retry succeeds and is not flagged duplicate (nothing was kept).
    assert pynetdicom_store(scp.port, datasets) == [0, 0, 0]
    assert [i.duplicate for i in sink.items] == [False] * 3
    assert len(spool_files(tmp_path / "spool")) == 3


def test_stop_is_idempotent_and_port_reported(make_scp) -> None:
    scp = make_scp()
    assert scp.port > 0
    assert scp.is_running
    scp.stop()
    scp.stop()
    assert not scp.is_running


def test_pynetdicom_logger_kept_quiet(make_scp) -> None:
    import logging

    make_scp()
    assert logging.getLogger("pynetdicom").getEffectiveLevel() >= logging.WARNING


@pytest.mark.skipif(shutil.which("storescu") is None, reason="storescu not installed")
def test_dcmtk_available_for_ci() -> None:
    assert shutil.which("storescp") is not None


# -- encoding helpers, TLS -------------------------------------------------------------


@pytest.mark.parametrize(
    "tsyntax",
    [
        ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
    ],
)
def test_decode_header_and_file_head_roundtrip(tsyntax: str, tmp_path: Path) -> None:
    from dicom.header import decode_header, encode_file_head

    ds = make_ct_series(1)[0]
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.save_as(tmp_path / "src.dcm", enforce_file_format=True)
    raw = (tmp_path / "src.dcm").read_bytes()
    body = raw[128 + 4 + 12 + int.from_bytes(raw[140:144], "little") :]
    head = decode_header(body, tsyntax)
    assert head.SOPInstanceUID == ds.SOPInstanceUID
    assert head.SeriesInstanceUID == ds.SeriesInstanceUID
    assert "PixelData" not in head
    data = encode_file_head(ds.SOPClassUID, ds.SOPInstanceUID, tsyntax, "PACS") + body
    (tmp_path / "x.dcm").write_bytes(data)
    got = pydicom.dcmread(tmp_path / "x.dcm")
    assert got.file_meta.TransferSyntaxUID == tsyntax
    assert got.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert got.file_meta.SourceApplicationEntityTitle == "PACS"
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == pydicom.dcmread(tmp_path / "src.dcm").PixelData


def test_low_latency_tuning_applied(make_scp, sink: ListSink) -> None:
    from dicom import pynetdicom_compat as compat

    tuned: list[bool] = []
    original = compat.tune_association

    def spy(assoc: object) -> bool:
        result = original(assoc)
        tuned.append(result)
        return result

    compat.tune_association = spy  # type: ignore[assignment]
    try:
        server = make_scp(low_latency=True)
        assert pynetdicom_store(server.port, make_ct_series(3)) == [0, 0, 0]
    finally:
        compat.tune_association = original  # type: ignore[assignment]
    assert tuned == [True]
    assert len(sink.items) == 3


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return key, cert


def test_tls_round_trip(make_scp, sink: ListSink, tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    import ssl

    from dicom.scu import echo, send_paths

    key, cert = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    server = make_scp(ssl_context=server_ctx)
    write_series(make_ct_series(4, size=256), tmp_path / "src")
    report = send_paths(
        tmp_path / "src", ae_title="I3NODE", host="127.0.0.1", port=server.port,
        ssl_context=client_ctx,
    )
    assert report.n_success == 4
    assert len(sink.items) == 4
    assert echo("I3NODE", "127.0.0.1", server.port, ssl_context=client_ctx)


def test_fast_store_response_matches_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from dicom.pynetdicom_compat import encode_store_success_rsp

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
    rsp.Status = 0x0000
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert encode_store_success_rsp(rsp) == encode(msg.command_set, True, True)
    rsp.Status = 0xA700
    assert encode_store_success_rsp(rsp) is None


def test_stop_aborts_active_associations(make_scp, sink: ListSink) -> None:
    server = make_scp()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTStorageSOP, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="I3NODE")
    assert assoc.is_established
    assert assoc.send_c_store(make_ct_series(1)[0]).Status == 0
    server.stop()
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established
    assert len(sink.items) == 1


def test_association_limit(make_scp, observer: RecordingObserver) -> None:
    server = make_scp(max_associations=1)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTStorageSOP, ExplicitVRLittleEndian)
    first = ae.associate("127.0.0.1", server.port, ae_title="I3NODE")
    try:
        assert first.is_established
        second = ae.associate("127.0.0.1", server.port, ae_title="I3NODE")
        assert second.is_rejected
        assert observer.rejected_calls[-1][2] == "association limit reached"
    finally:
        first.release()


def test_logs_carry_no_patient_identifiers(
    make_scp, sink: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    server = make_scp()
    datasets = make_ct_series(2)
    datasets[1].StudyInstanceUID = "1.2.abc"  # a failure path logs too
    with caplog.at_level(logging.DEBUG):
        statuses = pynetdicom_store(server.port, datasets)
    assert statuses == [0, STATUS_BAD_UID]
    text = caplog.text
    assert "Test^Patient" not in text and "TEST01" not in text
    assert any(r.name.startswith("dicom.scp") for r in caplog.records)
