"""Integration tests of the Storage SCU (real sockets on 127.0.0.1, DCMTK as a peer)."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless

from dicom.scp import STATUS_BAD_UID, ScpConfig, StoreSCP
from dicom.scu import AssociationFailed, StatusCategory, echo, send_datasets, send_paths
from tests.integration.test_scp import (
    DCMTK_ENV,
    ListSink,
    free_port,
    make_ct_series,
    wait_port,
    write_series,
)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[StoreSCP, ListSink]]:
    """A node StoreSCP accepting only calling AE ``I3NODE``."""
    sink = ListSink()
    server = StoreSCP(
        ScpConfig(
            port=0,
            spool_dir=tmp_path / "spool",
            min_free_bytes=0,
            allowed_callers={"I3NODE": frozenset()},
        ),
        sink,
    )
    server.start()
    yield server, sink
    server.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp accepting everything, writing to a folder."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.dcmtk
def test_send_paths_to_storescp_delivers_all(storescp, tmp_path: Path) -> None:
    port, out = storescp
    datasets = make_ct_series(12)
    rle = make_ct_series(3, seed=1)
    for ds in rle:
        ds.compress(RLELossless)
    write_series(datasets, tmp_path / "src" / "a")
    write_series(rle, tmp_path / "src" / "nested" / "b")
    seen: list[tuple[int, int]] = []
    report = send_paths(
        tmp_path / "src", ae_title="STORESCP", host="127.0.0.1", port=port,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert report.ok, report.failures
    assert report.n_success == 15 and report.n_warning == 0 and report.n_failure == 0
    assert seen[-1] == (15, 15)
    received = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert received == {ds.SOPInstanceUID for ds in datasets + rle}


@pytest.mark.dcmtk
def test_echo_against_storescp(storescp) -> None:
    port, _ = storescp
    assert echo("STORESCP", "127.0.0.1", port) is True


def test_send_paths_to_node_and_echo(scp, tmp_path: Path) -> None:
    server, sink = scp
    datasets = make_ct_series(5)
    paths = write_series(datasets, tmp_path / "src")
    (tmp_path / "src" / "README.txt").write_text("not dicom")
    report = send_paths(
        [tmp_path / "src"], ae_title="I3NODE", host="127.0.0.1", port=server.port
    )
    assert report.n_success == 5
    assert report.n_failure == 1
    assert report.failures[0].source.endswith("README.txt")
    assert {r.sop_instance_uid for r in report.results if r.category is StatusCategory.SUCCESS} == {
        ds.SOPInstanceUID for ds in datasets
    }
    assert len(sink.items) == 5
    assert echo("I3NODE", "127.0.0.1", server.port) is True
    # a single file path works too
    single = send_paths(paths[0], ae_title="I3NODE", host="127.0.0.1", port=server.port)
    assert single.n_success == 1


def test_send_datasets_reports_peer_failures(scp) -> None:
    server, sink = scp
    datasets = make_ct_series(3)
    datasets[1].StudyInstanceUID = "1.2.abc"
    plain = make_ct_series(1)[0]
    del plain.file_meta  # sent as Explicit VR Little Endian
    report = send_datasets(
        [*datasets, plain], ae_title="I3NODE", host="127.0.0.1", port=server.port
    )
    assert [r.status for r in report.results] == [0, STATUS_BAD_UID, 0, 0]
    assert report.results[1].category is StatusCategory.FAILURE
    assert "StudyInstanceUID" in report.results[1].message
    assert (report.n_success, report.n_failure) == (3, 1)
    assert len(sink.items) == 3
    assert not hasattr(plain, "file_meta") or "TransferSyntaxUID" not in plain.file_meta


def test_rejected_association_raises_naming_peer(scp, tmp_path: Path) -> None:
    server, sink = scp
    write_series(make_ct_series(2), tmp_path / "src")
    with pytest.raises(AssociationFailed) as info:
        send_paths(
            tmp_path / "src", ae_title="I3NODE", host="127.0.0.1", port=server.port,
            calling_ae="STRANGER",
        )
    err = info.value
    assert f"I3NODE@127.0.0.1:{server.port}" in str(err)
    assert "rejected" in err.reason
    assert err.report is not None and err.report.n_failure == 2
    assert sink.items == []
    assert echo("I3NODE", "127.0.0.1", server.port, calling_ae="STRANGER") is False


def test_connection_refused_raises(tmp_path: Path) -> None:
    write_series(make_ct_series(1), tmp_path / "src")
    port = free_port()
    with pytest.raises(AssociationFailed, match=f"PEER@127.0.0.1:{port}"):
        send_paths(tmp_path / "src", ae_title="PEER", host="127.0.0.1", port=port, acse_timeout=5)
    assert echo("PEER", "127.0.0.1", port, acse_timeout=5) is False


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        send_paths(tmp_path / "nope", ae_title="X", host="127.0.0.1", port=1)


@pytest.mark.dcmtk
def test_rejection_by_a_peer_that_closes_at_once_is_reported_as_rejection(tmp_path: Path) -> None:
    """DCMTK ``storescp --refuse`` rejects and closes in one go.

    pynetdicom 3.0 then reports an abort about one time in seven (its negotiating
    thread sees the closed socket before it reads the queued A-ASSOCIATE-RJ); the
    SCU must still tell IT the peer *rejected* the association.  Thirty tries make
    a miss of that race all but certain (0.86**30 < 1 %).
    """
    write_series(make_ct_series(1), tmp_path / "src")
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "--refuse", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        reasons = set()
        for _ in range(30):
            with pytest.raises(AssociationFailed) as info:
                send_paths(tmp_path / "src", ae_title="REFUSER", host="127.0.0.1", port=port)
            reasons.add(info.value.reason)
    finally:
        proc.terminate()
        proc.wait(10)
    assert reasons == {"association rejected (result 0x01, source 0x01, reason 0x01)"}
