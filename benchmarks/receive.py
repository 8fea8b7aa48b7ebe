"""Receive benchmark: the node's Storage SCP against DCMTK ``storescp``.

Builds a 300-slice 512x512 int16 CT series once, then sends it with DCMTK ``storescu``
(same flags for both targets, ``TCP_NODELAY=1``) to

(a) the node's :class:`dicom.scp.StoreSCP` (durable writes: fsync of every file and its
    directory before each acknowledgement) with a trivial sqlite-backed sink, and
(b) DCMTK ``storescp -od DIR PORT`` on the same machine (no fsync),

alternating, several repetitions each. Prints MB/s and instances/s of each run and the
node's median throughput as a ratio of storescp's (target >= 0.5).

``--senders N`` (receive under concurrency): N series of ``--slices`` instances each
(distinct Study/Series/SOP Instance UIDs, same size) are sent by N concurrent ``storescu``
processes, one association each, started together; the time of a run is from the first
start to the last exit, and MB/s and instances/s are aggregates over all N. For N > 1
storescp runs with ``--fork`` (one child process per association; without it DCMTK
storescp serves one association at a time and the baseline would be serial). The
per-association sync bound is printed only for N = 1: concurrent fsyncs can share journal
commits, so it does not hold for N > 1.

Usage::

    python benchmarks/receive.py [--slices 300] [--reps 3] [--pdu 131072] [--senders 1]
                                 [--variants final|all|naive,raw-16k,...] [--no-fsync]
                                 [--profile out.html]
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicom.scp import ScpConfig, StoredInstance, StoreSCP  # noqa: E402

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
    """Trivial durable sink: one autocommitted sqlite row per instance (WAL, synchronous=FULL)."""

    def __init__(self, db_path: Path, synchronous: str = "FULL") -> None:
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
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


def _storescu_cmd(port: int, src: Path, pdu: int | None) -> list[str]:
    """Return the ``storescu`` command line that sends the directory `src` to `port`.

    Parameters
    ----------
    port : int
        Port of the Storage SCP on 127.0.0.1.
    src : Path
        Directory of DICOM files (sent with ``+sd``).
    pdu : int or None
        ``--max-send-pdu`` and ``--max-pdu``; None for DCMTK's defaults.

    Returns
    -------
    list of str
        The command line.
    """
    cmd = ["storescu", "-aet", "BENCH", "-aec", "ANY"]
    if pdu:
        cmd += ["--max-send-pdu", str(pdu), "--max-pdu", str(pdu)]
    return cmd + ["127.0.0.1", str(port), "+sd", str(src)]


def send_series(port: int, srcs: Sequence[Path], pdu: int | None) -> float:
    """Send each directory in `srcs` with its own ``storescu``, all at once.

    Parameters
    ----------
    port : int
        Port of the Storage SCP on 127.0.0.1.
    srcs : sequence of Path
        One directory per sender; each sender opens one association.
    pdu : int or None
        ``--max-send-pdu`` and ``--max-pdu``; None for DCMTK's defaults.

    Returns
    -------
    float
        Wall seconds from the first sender's start to the last sender's exit.

    Raises
    ------
    RuntimeError
        If any sender exits with a non-zero status.
    """
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            _storescu_cmd(port, src, pdu),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in srcs
    ]
    errors = [proc.communicate()[1] for proc in procs]
    elapsed = time.perf_counter() - t0
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err[-2000:]}")
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


def _children_cpu() -> float:
    """User + system CPU seconds of terminated child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_dcmtk(srcs: Sequence[Path], work: Path, pdu: int | None) -> float:
    """One run against DCMTK storescp, one concurrent sender per directory in `srcs`.

    Parameters
    ----------
    srcs : sequence of Path
        One series directory per sender. With more than one, storescp runs with
        ``--fork`` (a child process per association) so that it serves them concurrently.
    work : Path
        Scratch directory; storescp writes into ``work / "storescp"`` (removed after).
    pdu : int or None
        Max PDU of both sides; None for DCMTK's defaults.

    Returns
    -------
    float
        Wall seconds of the senders (see :func:`send_series`).
    """
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    cmd = ["storescp", "-od", str(out)]
    if len(srcs) > 1:
        cmd += ["--fork"]
    if pdu:
        cmd += ["--max-pdu", str(pdu)]
    cmd += [str(port)]
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        elapsed = send_series(port, srcs, pdu)
    finally:
        proc.terminate()
        proc.wait(10)
    expected = sum(len(list(src.iterdir())) for src in srcs)
    received = len(list(out.iterdir()))
    shutil.rmtree(out)
    if received != expected:
        raise RuntimeError(f"storescp: received {received} of {expected} instances")
    return elapsed


def _naive_handler(spool_dir: Path, sink: SqliteSink):  # noqa: ANN202 - benchmark only
    """The 'before' handler: decode the dataset, save_as, fsync."""
    from pynetdicom import evt

    def handle(event: evt.Event) -> int:
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
        sink.record(
            StoredInstance(
                study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID,
                sop_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                modality=ds.get("Modality", ""),
                path=path,
                size=path.stat().st_size,
                calling_ae=event.assoc.requestor.ae_title,
                peer_address=event.assoc.requestor.address,
            )
        )
        return 0

    return handle


#: Set by --no-fsync (diagnostic): os.fsync no-op and sqlite synchronous=OFF.
NO_FSYNC = False
#: sqlite ``PRAGMA synchronous`` of the benchmark sink (--sink-sync).
SINK_SYNC = "FULL"

VARIANTS: dict[str, str] = {
    "naive": "plain pynetdicom handler: decode dataset, save_as, fsync; default 16 KiB PDU",
    "raw-16k": "StoreSCP: raw encoded bytes + 8 decoded tags, durable_write; 16 KiB PDU",
    "raw-bigpdu": "StoreSCP as raw-16k, unlimited max PDU advertised (peer sends --pdu)",
    "tuned": "StoreSCP as raw-bigpdu + low_latency association tuning, pynetdicom DIMSE path",
    "final": "StoreSCP as tuned + C-STORE fast path below pynetdicom's DIMSE (the default)",
    "node": "the whole node as `i3node serve` runs it (receive only): final + state DB + audit",
}


def run_node(srcs: Sequence[Path], work: Path, pdu: int | None, variant: str, n: int) -> float:
    """One run against the node (or the naive baseline handler); returns seconds.

    Parameters
    ----------
    srcs : sequence of Path
        One series directory per concurrent sender (see :func:`send_series`).
    work : Path
        Scratch directory (spool and state database, removed after).
    pdu : int or None
        Max PDU the senders use; None for DCMTK's defaults.
    variant : str
        A key of :data:`VARIANTS`.
    n : int
        Instances expected in all, checked against what the sink recorded.

    Returns
    -------
    float
        Wall seconds of the senders.
    """
    spool_dir = work / "spool"
    sink = SqliteSink(work / "state.sqlite", "OFF" if NO_FSYNC else SINK_SYNC)
    if variant == "node":
        return _run_whole_node(srcs, work, pdu, n)
    if variant == "naive":
        from pynetdicom import AE, evt

        from dicom.pynetdicom_compat import quiet_pynetdicom

        quiet_pynetdicom()
        ae = AE("I3NODE")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, _naive_handler(spool_dir, sink))],
        )
        if server is None:  # pragma: no cover - block=False always returns the server
            raise RuntimeError("pynetdicom did not return a server")
        port = server.server_address[1]
        try:
            elapsed = send_series(port, srcs, pdu)
        finally:
            server.shutdown()
            server.server_close()
    else:
        cfg = ScpConfig(
            port=0,
            spool_dir=spool_dir,
            min_free_bytes=0,
            maximum_pdu_size=16382 if variant == "raw-16k" else 1 << 20,
            low_latency=variant in ("tuned", "final"),
            fast_store=variant == "final",
        )
        scp = StoreSCP(cfg, sink)
        scp.start()
        try:
            elapsed = send_series(scp.port, srcs, pdu)
        finally:
            scp.stop()
    if sink.count != n:
        raise RuntimeError(f"{variant}: recorded {sink.count} of {n} instances")
    sink.close()
    shutil.rmtree(spool_dir)
    for db in work.glob("state.sqlite*"):
        db.unlink()
    return elapsed


def _run_whole_node(srcs: Sequence[Path], work: Path, pdu: int | None, n: int) -> float:
    """One run against the node built by node.app.build_app (its real state DB and audit)."""
    from node.app import build_app
    from node.settings import settings_from_mapping

    settings = settings_from_mapping(
        {
            "node": {"state_dir": str(work / "node"), "job_workers": 0},
            "dicom": {"port": 0, "min_free_mb": 0},
        },
        base_dir=work,
    )
    app = build_app(settings)
    app.start()
    try:
        elapsed = send_series(app.port, srcs, pdu)
        recorded = app.store.count_instances()
    finally:
        app.stop()
    if recorded != n:
        raise RuntimeError(f"node: recorded {recorded} of {n} instances")
    shutil.rmtree(work / "node")
    return elapsed


def fsync_cost(work: Path, size: int, n: int = 30) -> float:
    """Median seconds of one durable_write of `size` bytes (the per-instance floor)."""
    from dicom.spool import durable_write_bytes

    data = os.urandom(size)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        durable_write_bytes(work / "fsync-probe" / f"{i}.bin", data)
        times.append(time.perf_counter() - t0)
    shutil.rmtree(work / "fsync-probe")
    return statistics.median(times)


def plain_write_cost(work: Path, size: int, n: int = 30) -> float:
    """Median seconds of writing `size` bytes to a new file without any sync (what storescp does)."""
    data = os.urandom(size)
    probe = work / "write-probe"
    probe.mkdir()
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        with open(probe / f"{i}.bin", "wb") as fh:
            fh.write(data)
        times.append(time.perf_counter() - t0)
    shutil.rmtree(probe)
    return statistics.median(times)


def build_senders(base: Path, senders: int, slices: int) -> list[Path]:
    """Write one series per sender under `base`, each with its own UIDs.

    Parameters
    ----------
    base : Path
        Directory to write into (``base / "series-<k>"`` per sender).
    senders : int
        Number of series (one per concurrent sender).
    slices : int
        Instances per series; every series has the same size.

    Returns
    -------
    list of Path
        The series directories.
    """
    srcs = []
    for k in range(senders):
        src = base / f"series-{k}"
        src.mkdir()
        build_series(src, slices)
        srcs.append(src)
    return srcs


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the benchmark."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--senders",
        type=_positive_int,
        default=1,
        help="concurrent storescu associations, each sending its own series of --slices "
        "instances (storescp runs with --fork when > 1)",
    )
    parser.add_argument(
        "--pdu",
        type=int,
        default=131072,
        help="storescu --max-send-pdu/--max-pdu and storescp --max-pdu (0: DCMTK defaults)",
    )
    parser.add_argument(
        "--variants",
        default="tuned,final,node",
        help=f"comma-separated node variants to run, interleaved (from {', '.join(VARIANTS)}; 'all')",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="DIAGNOSTIC ONLY: make os.fsync a no-op to measure the Python-side cost",
    )
    parser.add_argument(
        "--sink-sync",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="sqlite synchronous mode of the benchmark sink (WAL journal)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="pyinstrument HTML of node runs")
    return parser


def _positive_int(text: str) -> int:
    """Parse a positive integer command-line value."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    global NO_FSYNC, SINK_SYNC
    parser = build_parser()
    args = parser.parse_args(argv)
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        parser.error("DCMTK storescu/storescp are required")
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    pdu = args.pdu or None
    logging.basicConfig(level=logging.WARNING)

    base = Path(tempfile.mkdtemp(prefix="i3node-bench-", dir=args.workdir))
    try:
        srcs = build_senders(base, args.senders, args.slices)
        paths = [p for src in srcs for p in src.iterdir()]
        total = sum(p.stat().st_size for p in paths)
        per_inst = total / len(paths)
        # Settle the disk (the series was just written) and warm the page cache with one
        # untimed storescp run, so the first repetition is not penalised.
        os.sync()
        warm = base / "warmup"
        warm.mkdir()
        run_dcmtk(srcs, warm, pdu)
        shutil.rmtree(warm)
        os.sync()
        floor = fsync_cost(base, int(per_inst))
        # The part of a durable write that storescp does not do (fdatasync, rename,
        # directory fsync): with a synchronous peer it cannot overlap anything.
        sync_only = max(0.0, floor - plain_write_cost(base, int(per_inst)))
        SINK_SYNC = args.sink_sync
        if args.no_fsync:
            NO_FSYNC = True
            os.fsync = lambda fd: None  # type: ignore[assignment]
            os.fdatasync = lambda fd: None  # type: ignore[assignment]
        print(
            f"{args.senders} concurrent sender(s) x {args.slices} instances: "
            f"{len(paths)} instances, {total / 1e6:.1f} MB in all"
            + (" (storescp --fork)" if args.senders > 1 else "")
            + "; "
            f"pdu={pdu or 'DCMTK default'}; sink sqlite synchronous={SINK_SYNC}; "
            f"cpus={os.cpu_count()}; workdir={base}"
        )
        print(
            f"durable_write of one {per_inst / 1e3:.0f} kB instance: {floor * 1e3:.2f} ms "
            f"(floor {1 / floor:.0f} inst/s per association)"
            + ("; fsync DISABLED (diagnostic)" if args.no_fsync else "")
        )
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled")
        times: dict[str, list[float]] = {"storescp": [], **{v: [] for v in variants}}
        # CPU seconds of the receiver: the node runs in this process (all its threads);
        # storescp's is the children's CPU of a storescp run minus storescu's share,
        # estimated from the node runs (where storescu is the only child).
        cpu: dict[str, list[float]] = {k: [] for k in times}
        scu_cpu: list[float] = []
        for rep in range(args.reps):
            work = base / f"rep{rep}"
            work.mkdir()
            c0 = _children_cpu()
            times["storescp"].append(run_dcmtk(srcs, work, pdu))
            cpu["storescp"].append(_children_cpu() - c0)
            for v in variants:
                if profiler is not None:
                    profiler.start()
                c0, p0 = _children_cpu(), time.process_time()
                times[v].append(run_node(srcs, work, pdu, v, len(paths)))
                cpu[v].append(time.process_time() - p0)
                scu_cpu.append(_children_cpu() - c0)
                if profiler is not None:
                    profiler.stop()
            print(
                f"rep {rep}: "
                + "  ".join(f"{k} {len(paths) / t[-1]:.0f} inst/s" for k, t in times.items())
            )
        ref = statistics.median(times["storescp"])
        scu = statistics.median(scu_cpu) if scu_cpu else 0.0
        cpu["storescp"] = [max(0.0, c - scu) for c in cpu["storescp"]]
        print(
            f"{'target':12s} {'MB/s':>8s} {'inst/s':>8s} {'ratio':>6s} {'cpu ms/inst':>12s}"
            f"  (aggregate over {args.senders} sender(s), medians of {args.reps};"
            f" storescu itself: {scu / len(paths) * 1e3:.2f} cpu ms/inst)"
        )
        for name, ts in times.items():
            med = statistics.median(ts)
            cpu_ms = statistics.median(cpu[name]) / len(paths) * 1e3
            print(
                f"{name:12s} {total / 1e6 / med:8.1f} {len(paths) / med:8.1f} {ref / med:6.2f}x"
                f" {cpu_ms:12.2f}"
                + ("" if name == "storescp" else f"  {VARIANTS[name]}")
            )
        if not args.no_fsync and args.senders == 1:
            # Upper bound for any receiver that acknowledges only durable instances: the
            # storescp time per instance plus the sync work it skips.
            t_ref = ref / len(paths)
            bound = t_ref / (t_ref + sync_only)
            print(
                f"sync work per instance (durable_write minus plain write): {sync_only * 1e3:.2f} ms;"
                f" a receiver as fast as storescp that syncs as required reaches at most"
                f" {bound:.2f}x"
            )
            for name in variants:
                ratio = ref / statistics.median(times[name])
                print(f"  {name}: {ratio / bound:.0%} of that bound")
        elif args.senders > 1:
            print("(no sync bound for concurrent senders: their fsyncs can share journal commits)")
        if profiler is not None:
            args.profile.write_text(profiler.output_html())
            print(f"profile written to {args.profile}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
