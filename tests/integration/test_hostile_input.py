"""Hostile and broken input over real sockets against the composed node (issue 12).

Each case is what an independent tester sent to ``i3node serve``: hand-built PDUs on raw
sockets, hand-built data sets sent with pynetdicom (files whose bytes after the file meta
are sent as they are). For every case the node must answer as the conformance statement
says, keep nothing malformed, keep its memory bounded, free association slots within the
configured deadlines, and still serve afterwards.
"""
from __future__ import annotations

import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)

from dicom.header import encode_file_head
from dicom.scp import (
    STATUS_CONFLICT,
    STATUS_DECODE_FAILED,
    STATUS_NOT_STORAGE,
    STATUS_PIXELS_UNDECODABLE,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SUCCESS,
    STATUS_TOO_LARGE,
)
from dicom.synthetic import build_ct_series

VERIFICATION = "1.2.840.10008.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
LIMITS = {"max_pdu_kb": 64, "max_dataset_mb": 2, "acse_timeout_s": 1.5, "network_timeout_s": 2.0,
          "max_associations": 4}


# ------------------------------------------------------------------------------------ helpers


def rss_mib() -> float:
    """Resident memory of this process (the node runs in it), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def associate_rq(port: int, calling: str = "HOSTILE", abstract: str = CTImageStorage,
                 syntax: str = ExplicitVRLittleEndian) -> bytes:
    """An encoded A-ASSOCIATE-RQ PDU proposing one context (pynetdicom's encoder)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = "I3NODE"
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    prim.called_presentation_address = AddressInformation("127.0.0.1", port)
    cx = build_context(abstract, [syntax])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.10.1234.99"
    prim.user_information = [ml, ic]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def raw_c_store(port: int, body: bytes, *, sop_class: str, sop_uid: str, abstract: str | None = None,
                syntax: str = ExplicitVRLittleEndian, fragment: int = 16000) -> int:
    """Send `body` byte for byte as the data set of a C-STORE-RQ on a raw association.

    pynetdicom's SCU decodes and re-encodes what it sends (a truncated value comes out
    repaired), so malformed data sets go out through this hand-built DIMSE exchange instead.
    Returns the response status.
    """
    from pydicom.filewriter import write_dataset as write_ds

    from dicom.fast_store import decode_command_set, encode_p_data_tf

    s = connect(port)
    try:
        s.sendall(associate_rq(port, abstract=abstract or sop_class, syntax=syntax))
        head = recv_exact(s, 6)
        assert head[0] == 0x02, f"association refused (PDU type 0x{head[0]:02X})"
        ac = recv_exact(s, struct.unpack(">L", head[2:6])[0])
        item = ac.index(b"\x21\x00")  # the presentation context item of the AC
        assert ac[item + 6] == 0, "the presentation context was not accepted"
        cmd = Dataset()
        cmd.AffectedSOPClassUID = sop_class
        cmd.CommandField = 0x0001
        cmd.MessageID = 7
        cmd.Priority = 0
        cmd.CommandDataSetType = 0x0000
        cmd.AffectedSOPInstanceUID = sop_uid
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = True
        write_ds(fp, cmd)
        rest = fp.getvalue()
        command = struct.pack("<HHLL", 0, 0, 4, len(rest)) + rest
        s.sendall(encode_p_data_tf([(1, 0x03, command)]))
        chunks = [body[i:i + fragment] for i in range(0, len(body), fragment)] or [b""]
        for k, chunk in enumerate(chunks):
            s.sendall(encode_p_data_tf([(1, 0x02 if k == len(chunks) - 1 else 0x00, chunk)]))
        head = recv_exact(s, 6)
        assert head and head[0] == 0x04, f"expected a P-DATA-TF response, got {head!r}"
        pdu = recv_exact(s, struct.unpack(">L", head[2:6])[0])
        status = decode_command_set(pdu[6:])[0x00000900]
        s.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        return int(struct.unpack("<H", status)[0])
    finally:
        s.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def established(port: int) -> socket.socket:
    """A raw socket with an accepted association (A-ASSOCIATE-AC read)."""
    s = connect(port)
    s.sendall(associate_rq(port))
    head = recv_exact(s, 6)
    assert head[0] == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{head[0]:02X}"
    recv_exact(s, struct.unpack(">L", head[2:6])[0])
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def closed_by_peer(s: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the node closed the connection within `within` seconds; what it sent before."""
    s.settimeout(0.2)
    got = b""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def echo_ok(port: int) -> bool:
    from dicom.scu import echo

    return bool(echo("I3NODE", "127.0.0.1", port, calling_ae="PACS"))


def encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def ct_slice(rows: int = 32, study: str | None = None, series: str | None = None, seed: int = 0) -> Dataset:
    image = np.random.default_rng(seed).normal(40, 10, (1, rows, rows)).astype(np.float32)
    ds = build_ct_series(image, (2.0, 1.0, 1.0))[0]
    if study:
        ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    return ds


def craft(path: Path, body: bytes, *, sop_class: str, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> Path:
    """A file whose data set bytes (after a valid file meta) are exactly `body`."""
    path.write_bytes(encode_file_head(sop_class, sop_uid, syntax) + body)
    return path


def store_file(port: int, path: Path, contexts: list[tuple[str, str]] | None = None) -> int:
    """C-STORE a file (its data set bytes as they are) with pynetdicom; the response status."""
    from pynetdicom import AE

    meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title="PACS")
    for abstract, syntax in contexts or [(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))]:
        ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="I3NODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def spool_files(app: Any) -> list[Path]:
    return sorted(app.settings.spool_dir.rglob("*.dcm"))


@pytest.fixture(params=["hooked", "stock"])
def node(request: pytest.FixtureRequest, node_factory: Any) -> Any:
    """A node with tight limits, on the node's receive hooks and on stock pynetdicom."""
    hooked = request.param == "hooked"
    return node_factory(dicom={**LIMITS, "fast_store": hooked, "low_latency": hooked},
                        study={"stable_after_s": 3600.0}, node={"job_workers": 0})


# ------------------------------------------------------------------------- denial of service


def test_pdu_claiming_4_gib_is_aborted_before_it_is_buffered(node: Any) -> None:
    before = rss_mib()
    s = established(node.port)
    s.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\x00" * 64)
    closed, got = closed_by_peer(s, 5.0)
    s.close()
    assert closed
    assert got.startswith(b"\x07"), "an A-ABORT is sent before the connection closes"
    # before association too: an A-ASSOCIATE-RQ claiming 4 GiB
    s = connect(node.port)
    s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF) + b"\x00" * 64)
    assert closed_by_peer(s, 5.0)[0]
    s.close()
    assert rss_mib() - before < 200, "no 4 GiB allocation"
    assert echo_ok(node.port)


def test_stalled_peers_free_their_slots_within_the_deadlines(node: Any) -> None:
    # an association stalled inside a PDU, then more stalled connections than slots
    mid_pdu = established(node.port)
    mid_pdu.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)  # a P-DATA-TF cut short
    stalled = []
    for _ in range(6):
        s = connect(node.port)
        s.sendall(associate_rq(node.port)[:6])  # the header of an A-ASSOCIATE-RQ, nothing more
        stalled.append(s)
    assert not echo_ok(node.port), "every slot is taken while they stall"
    t0 = time.monotonic()
    assert all(closed_by_peer(s, LIMITS["acse_timeout_s"] + 3.0)[0] for s in stalled)
    assert closed_by_peer(mid_pdu, LIMITS["network_timeout_s"] + 3.0)[0]
    assert time.monotonic() - t0 < LIMITS["network_timeout_s"] + 4.0
    for s in [*stalled, mid_pdu]:
        s.close()
    assert echo_ok(node.port)  # slots are free again


def test_stop_does_not_wait_for_stalled_peers(node_factory: Any) -> None:
    app = node_factory(dicom={**LIMITS, "acse_timeout_s": 30.0, "network_timeout_s": 60.0}, node={"job_workers": 0})
    s = established(app.port)
    s.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
    time.sleep(0.3)
    t0 = time.monotonic()
    app.stop()
    assert time.monotonic() - t0 < 15.0, "SIGTERM would be answered within the unit's stop timeout"
    s.close()


def test_deflate_bomb_is_refused_without_inflating_it(node: Any, tmp_path: Path) -> None:
    ds = ct_slice(rows=32)
    ds.Rows = ds.Columns = 1200  # 2.9 MB of zeros: more than max_dataset_mb = 2 once inflated
    ds.PixelData = b"\x00" * (1200 * 1200 * 2)
    raw = encode(ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(raw) + deflater.flush()
    assert len(body) < 64 * 1024
    path = craft(tmp_path / "bomb.dcm", body, sop_class=CTImageStorage, sop_uid=str(ds.SOPInstanceUID),
                 syntax=DeflatedExplicitVRLittleEndian)
    before = rss_mib()
    assert store_file(node.port, path) == STATUS_TOO_LARGE
    assert rss_mib() - before < 100
    assert not spool_files(node)


# ---------------------------------------------------------------------------- malformed data


def _malformed_bodies() -> dict[str, tuple[bytes, str]]:
    from pydicom.data import get_testdata_file

    ds = ct_slice(rows=32)
    raw = encode(ds)
    uid = str(ds.SOPInstanceUID)
    truncated_file = pydicom.dcmread(get_testdata_file("MR_truncated.dcm"), stop_before_pixels=True)
    with open(get_testdata_file("MR_truncated.dcm"), "rb") as fh:
        data = fh.read()
    meta_end = 132 + 12 + struct.unpack("<L", data[140:144])[0]
    pixel = raw.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, explicit VR: OW, 4-byte length
    past_end = raw[:pixel + 8] + struct.pack("<L", 32 * 32 * 2 + 64) + raw[pixel + 12:]
    huge = raw[:pixel + 8] + struct.pack("<L", 0xFFFFFFF0) + raw[pixel + 12:]
    short_pixels = raw[:pixel + 8] + struct.pack("<L", 100) + raw[pixel + 12:pixel + 12 + 100]
    # a sequence of undefined length whose item is never closed, after (0020,0013) where the
    # old header scan stopped reading
    seq = (b"\x20\x00\x21\x92" + b"SQ\x00\x00" + b"\xff\xff\xff\xff"  # (0020,9221) Dimension Organization
           + b"\xfe\xff\x00\xe0" + b"\xff\xff\xff\xff"                  # item, undefined length
           + b"\x20\x00\x64\x91" + b"UI" + struct.pack("<H", 4) + b"1.2\x00")
    unclosed = raw[:raw.index(b"\x28\x00\x02\x00")] + seq  # cut before (0028,0002)
    return {
        "MR_truncated.dcm (pydicom test file)": (data[meta_end:], str(truncated_file.SOPInstanceUID)),
        "an image cut off before its Pixel Data": (raw[:pixel], uid),
        "Pixel Data runs past the end": (past_end, uid),
        "a 4 GB length claim": (huge, uid),
        "Pixel Data shorter than the image": (short_pixels, uid),
        "an unclosed sequence": (unclosed, uid),
    }


@pytest.mark.parametrize("case", list(_malformed_bodies()))
def test_malformed_data_sets_are_refused_and_not_kept(node: Any, tmp_path: Path, case: str) -> None:
    body, uid = _malformed_bodies()[case]
    sop_class = "1.2.840.10008.5.1.4.1.1.4" if case.startswith("MR") else CTImageStorage
    assert raw_c_store(node.port, body, sop_class=sop_class, sop_uid=uid) == STATUS_DECODE_FAILED
    assert not spool_files(node) and node.store.count_instances() == 0
    assert echo_ok(node.port)


def test_pixel_data_the_decoders_cannot_read_is_refused(node: Any, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    twelve_bit = Path(get_testdata_file("JPEG-lossy.dcm"))  # JPEG Extended, 12-bit
    assert store_file(node.port, twelve_bit) == STATUS_PIXELS_UNDECODABLE
    assert not spool_files(node)
    eight_bit = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG Baseline, 8-bit: decodable
    assert store_file(node.port, eight_bit) == STATUS_SUCCESS
    assert len(spool_files(node)) == 1


def test_sop_class_must_match_the_context(node: Any, tmp_path: Path) -> None:
    ds = ct_slice()
    uid = str(ds.SOPInstanceUID)
    # a C-STORE of a CT on the Verification context
    assert raw_c_store(node.port, encode(ds), sop_class=CTImageStorage, sop_uid=uid,
                       abstract=VERIFICATION) == STATUS_NOT_STORAGE
    assert raw_c_store(node.port, encode(ds), sop_class=VERIFICATION, sop_uid=uid,
                       abstract=VERIFICATION) == STATUS_NOT_STORAGE
    sr = ct_slice(seed=1)
    sr.SOPClassUID = BASIC_TEXT_SR  # an SR data set sent on a CT context
    assert raw_c_store(node.port, encode(sr), sop_class=CTImageStorage,
                       sop_uid=str(sr.SOPInstanceUID)) == STATUS_SOP_CLASS_MISMATCH
    assert not spool_files(node)
    assert raw_c_store(node.port, encode(ds), sop_class=CTImageStorage, sop_uid=uid) == STATUS_SUCCESS


# --------------------------------------------------------------------------------- identities


def test_uid_conflicts_are_refused_and_logged(node: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = ct_slice(seed=1)
    uid = str(first.SOPInstanceUID)
    ok = craft(tmp_path / "a.dcm", encode(first), sop_class=CTImageStorage, sop_uid=uid)
    assert store_file(node.port, ok) == STATUS_SUCCESS
    assert store_file(node.port, ok) == STATUS_SUCCESS  # a true duplicate stays idempotent
    original = spool_files(node)[0].read_bytes()

    other = ct_slice(seed=2, study=str(first.StudyInstanceUID), series=str(first.SeriesInstanceUID))
    other.SOPInstanceUID = uid  # same UID, other pixels
    changed = craft(tmp_path / "b.dcm", encode(other), sop_class=CTImageStorage, sop_uid=uid)
    assert store_file(node.port, changed) == STATUS_CONFLICT
    assert spool_files(node)[0].read_bytes() == original
    assert "already stored with other content" in caplog.text

    elsewhere = ct_slice(seed=1)
    elsewhere.SOPInstanceUID = uid  # same UID under another study and series
    moved = craft(tmp_path / "c.dcm", encode(elsewhere), sop_class=CTImageStorage, sop_uid=uid)
    assert store_file(node.port, moved) == STATUS_CONFLICT
    assert len(spool_files(node)) == 1, "no orphan file under the other study"

    reused = ct_slice(seed=3, series=str(first.SeriesInstanceUID))  # the series UID in a new study
    mixed = craft(tmp_path / "d.dcm", encode(reused), sop_class=CTImageStorage, sop_uid=str(reused.SOPInstanceUID))
    assert store_file(node.port, mixed) == STATUS_CONFLICT
    assert node.store.count_instances() == 1 and len(spool_files(node)) == 1
    assert echo_ok(node.port)
