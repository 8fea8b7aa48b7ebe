"""``i3node demo``: the node on loopback with embedded defaults, end to end.

The demo plays every role around the node with real DICOM over 127.0.0.1:
a PACS that sends a synthetic CT study, and (once the node produces outputs) a
viewer that receives them.  It ends by itself and leaves its state, the report and
the pictures under ``workdir``.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from node.settings import Settings, default_settings

__all__ = ["DemoReport", "run_demo", "demo_settings"]

Progress = Callable[..., None]


@dataclass
class DemoReport:
    """What the demo measured; :meth:`render` gives the text shown to the user."""

    workdir: Path
    study_uid: str = ""
    n_sent: int = 0
    n_received: int = 0
    jobs: list[tuple[int, str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    status_text: str = ""
    ok: bool = False
    problems: list[str] = field(default_factory=list)

    def render(self) -> str:
        """A short human-readable report."""
        lines = ["", "i3node demo report", "==================", f"workdir: {self.workdir}"]
        lines.append(f"study {self.study_uid}: sent {self.n_sent} instances, node recorded {self.n_received}")
        for name, secs in self.timings.items():
            lines.append(f"  {name:<32} {secs:7.2f} s")
        for jid, series_uid, state in self.jobs:
            lines.append(f"job {jid}: series {series_uid} -> {state}")
        if self.status_text:
            lines += ["", "i3node status:", self.status_text]
        lines.append("")
        lines.append("RESULT: " + ("OK" if self.ok else "FAILED: " + "; ".join(self.problems)))
        return "\n".join(lines)


def demo_settings(workdir: Path) -> Settings:
    """Embedded defaults, with state under ``workdir``, an ephemeral port and a short stability wait."""
    s = default_settings(
        node={"state_dir": str(workdir / "state")},
        dicom={"port": 0, "min_free_mb": 64},
        study={"stable_after_s": 2.0, "sweep_interval_s": 0.5},
    )
    return dataclasses.replace(s, base_dir=Path.cwd())


def _wait(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def run_demo(
    workdir: Path,
    *,
    size: tuple[int, int, int] | None = None,
    keep: bool = False,
    progress: Progress | None = None,
) -> DemoReport:
    """Run the demo and return its report (never raises for a failed step: the report says)."""
    from dicom.scu import send_paths
    from node.app import build_app
    from node.cli import status_snapshot, write_synthetic_study

    say = progress or (lambda *a: None)
    workdir = workdir.resolve()
    if workdir.exists() and not keep:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = DemoReport(workdir=workdir)
    settings = demo_settings(workdir)
    shape = size or (32, 64, 64)

    t0 = time.monotonic()
    say(f"writing a synthetic CT study of {shape[0]}x{shape[1]}x{shape[2]} voxels")
    paths, _gt = write_synthetic_study(workdir / "study", seed=7, shape=shape)
    report.n_sent = len(paths)
    report.timings["make synthetic study"] = time.monotonic() - t0

    app = build_app(settings)
    app.start()
    try:
        say(f"node listening as {settings.dicom.ae_title} on 127.0.0.1:{app.port}; PACS stand-in sends the study")
        t0 = time.monotonic()
        sent = send_paths(paths, ae_title=settings.dicom.ae_title, host="127.0.0.1", port=app.port, calling_ae="DEMO_PACS")
        report.timings["C-STORE study to node"] = time.monotonic() - t0
        if sent.failed:
            report.problems.append(f"{sent.failed} instance(s) were refused by the node")
        report.n_received = app.store.count_instances()
        report.study_uid = app.store.studies()[0]["study_uid"] if app.store.studies() else ""
        t0 = time.monotonic()
        say(f"waiting for the study to become stable ({settings.study.stable_after_s:.0f} s without new instances)")
        if not _wait(lambda: bool(app.store.jobs()), settings.study.stable_after_s + 30):
            report.problems.append("no job was created after the study became stable")
        report.timings["study stable -> job queued"] = time.monotonic() - t0
        report.jobs = [(j["id"], j["series_uid"], j["state"]) for j in app.store.jobs()]
    finally:
        app.stop()

    snap = status_snapshot(settings)
    report.status_text = (
        f"  studies: {len(snap['studies'])}, series: {len(snap['series'])}, jobs: {snap['job_counts']}"
    )
    if report.n_received != report.n_sent:
        report.problems.append(f"node recorded {report.n_received} of {report.n_sent} instances")
    report.ok = not report.problems
    return report
