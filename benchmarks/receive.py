"""Receive benchmark: the node's Storage SCP against DCMTK ``storescp``.

Builds a 300-slice 512x512 int16 CT series once, then sends it with DCMTK ``storescu``
(same flags for both targets, ``TCP_NODELAY=1``) to

(a) the node's :class:`dicom.scp.StoreSCP` (durable writes: fsync of every file and its
    directory before each acknowledgement) with a trivial sqlite-backed sink, and
(b) DCMTK ``storescp -od DIR PORT`` on the same machine (no fsync),

alternating, several repetitions each. Prints MB/s and instances/s of each run and the
node's median throughput as a ratio of storescp's (target >= 0.5).

Usage::

    python benchmarks/receive.py [--slices 300] [--reps 3] [--pdu 131072]
                                 [--variant final|naive|final-16k] [--profile out.html]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicom.scp import InstanceSink, ScpConfig, StoredInstance, StoreSCP  # noqa: E402

LOGGER = logging.getLogger("benchmarks.receive")


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_series(out_dir: Path, n_slices: int, size: int = 512) -> list[Path]:
    """Write an axial int16 CT series of `n_slices` slices of `size` x `size`."""
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    base = rng.integers(-1000, 1500, size=(size, size), dtype=np.int16)
    for k in range(n_slices):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.PatientName = "Bench^Receive"
        ds.PatientID = "BENCH"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = np.roll(base, k, axis=0).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = out_dir / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class SqliteSink:
    """Trivial durable sink: one sqlite row per instance (WAL, synchronous=NORMAL)."""

    def __init__(self, db_path: Path) -> None:
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS inst (sop TEXT PRIMARY KEY, series TEXT, path TEXT)"
        )
        self._lock = threading.Lock()
        self.count = 0

    def record(self, inst: StoredInstance) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO inst VALUES (?, ?, ?)",
                (inst.sop_uid, inst.series_uid, str(inst.path)),
            )
            self.count += 1

    def close(self) -> None:
        self._conn.close()


def storescu(port: int, src: Path, pdu: int | None) -> float:
    """Send `src` with storescu and return the wall time in seconds."""
    cmd = ["storescu", "-aet", "BENCH", "-aec", "ANY"]
    if pdu:
        cmd += ["--max-send-pdu", str(pdu), "--max-pdu", str(pdu)]
    cmd += ["127.0.0.1", str(port), "+sd", str(src)]
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on port {port}")


def run_dcmtk(src: Path, work: Path, pdu: int | None) -> float:
    """One run against DCMTK storescp; returns seconds."""
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    cmd = ["storescp", "-od", str(out)]
    if pdu:
        cmd += ["--max-pdu", str(pdu)]
    cmd += [str(port)]
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        elapsed = storescu(port, src, pdu)
    finally:
        proc.terminate()
        proc.wait(10)
    shutil.rmtree(out)
    return elapsed


def _naive_handler(spool_dir: Path, sink: SqliteSink):  # noqa: ANN202 - benchmark only
    """The 'before' handler: decode the dataset, save_as, fsync."""
    from pynetdicom import evt

    def handle(event: "evt.Event") -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        sink.count += 1
        return 0

    return handle


def run_node(src: Path, work: Path, pdu: int | None, variant: str, n: int) -> float:
    """One run against the node's StoreSCP; returns seconds."""
    spool_dir = work / "spool"
    sink = SqliteSink(work / "state.sqlite")
    if variant == "naive":
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage as CT

        from dicom.scp import quiet_pynetdicom

        quiet_pynetdicom()
        ae = AE("I3NODE")
        ae.add_supported_context(CT, [ExplicitVRLittleEndian])
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, _naive_handler(spool_dir, sink))],
        )
        port = server.server_address[1]
        try:
            elapsed = storescu(port, src, pdu)
        finally:
            server.shutdown()
            server.server_close()
    else:
        max_pdu = 16382 if variant == "final-16k" else 0
        cfg = ScpConfig(
            port=0, spool_dir=spool_dir, min_free_bytes=0, maximum_pdu_size=max_pdu
        )
        scp = StoreSCP(cfg, sink)
        scp.start()
        try:
            elapsed = storescu(scp.port, src, pdu)
        finally:
            scp.stop()
    if sink.count != n:
        raise RuntimeError(f"node recorded {sink.count} of {n} instances")
    sink.close()
    shutil.rmtree(spool_dir)
    (work / "state.sqlite").unlink()
    for extra in work.glob("state.sqlite-*"):
        extra.unlink()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--pdu",
        type=int,
        default=131072,
        help="storescu --max-send-pdu/--max-pdu and storescp --max-pdu (0: DCMTK defaults)",
    )
    parser.add_argument("--variant", choices=["final", "naive", "final-16k"], default="final")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--profile", type=Path, default=None, help="pyinstrument HTML of node runs")
    args = parser.parse_args(argv)
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        parser.error("DCMTK storescu/storescp are required")
    pdu = args.pdu or None

    base = Path(tempfile.mkdtemp(prefix="i3node-bench-", dir=args.workdir))
    try:
        src = base / "series"
        src.mkdir()
        paths = build_series(src, args.slices)
        total = sum(p.stat().st_size for p in paths)
        print(
            f"series: {len(paths)} instances, {total / 1e6:.1f} MB; variant={args.variant}; "
            f"pdu={pdu or 'DCMTK default'}; workdir={base}"
        )
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled")
        node_t, dcmtk_t = [], []
        for rep in range(args.reps):
            work = base / f"rep{rep}"
            work.mkdir()
            dcmtk_t.append(run_dcmtk(src, work, pdu))
            if profiler is not None:
                profiler.start()
            node_t.append(run_node(src, work, pdu, args.variant, len(paths)))
            if profiler is not None:
                profiler.stop()
            for name, t in (("storescp", dcmtk_t[-1]), ("node", node_t[-1])):
                print(
                    f"rep {rep} {name:8s}: {t:6.2f} s  {total / 1e6 / t:7.1f} MB/s  "
                    f"{len(paths) / t:7.1f} inst/s"
                )
        med_node, med_dcmtk = statistics.median(node_t), statistics.median(dcmtk_t)
        print(
            f"median storescp: {total / 1e6 / med_dcmtk:.1f} MB/s {len(paths) / med_dcmtk:.1f} inst/s"
        )
        print(f"median node    : {total / 1e6 / med_node:.1f} MB/s {len(paths) / med_node:.1f} inst/s")
        print(f"ratio node/storescp: {med_dcmtk / med_node:.2f}x (target >= 0.5x)")
        if profiler is not None:
            args.profile.write_text(profiler.output_html())
            print(f"profile written to {args.profile}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
