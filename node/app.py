"""The composition root: the one place that wires ``dicom`` and ``models`` into a node.

:func:`build_app` turns :class:`~node.settings.Settings` into a running :class:`App`
(state store, DICOM receiver, periodic sweep).  Nothing else in the code base builds
these objects, so tests and the CLI get exactly the node that production runs.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from dicom.scp import ScpConfig, StoredInstance, StoreSCP
from node import systemd
from node.settings import Settings
from node.store import InstanceRecord, Store
from node.studies import sweep_stable_studies
from node.scheduler import NodeScheduler

__all__ = ["App", "build_app", "allowed_callers_map", "StoreSink"]

log = logging.getLogger(__name__)


def allowed_callers_map(entries: tuple[str, ...]) -> Mapping[str, frozenset[str]] | None:
    """Turn ``dicom.allowed_callers`` entries into the SCP's allow-list.

    ``'*'`` alone accepts any caller (returns None); ``'AE'`` accepts that AE from any
    host; ``'AE@host'`` only from that host; ``'*@host'`` any AE from that host (key ``'*'``).
    """
    if "*" in entries:
        return None
    out: dict[str, set[str]] = {}
    for entry in entries:
        ae, sep, host = entry.partition("@")
        hosts = out.setdefault(ae, set())
        if sep:
            hosts.add(host)
        else:
            hosts.clear()
            hosts.add("")  # marker: any host
    return {ae: frozenset() if "" in hosts else frozenset(hosts) for ae, hosts in out.items()}


class StoreSink:
    """Adapter from the SCP's stored-instance callback to the state store."""

    def __init__(self, store: Store, on_new: "callable[[StoredInstance], None] | None" = None) -> None:  # type: ignore[valid-type]
        self._store = store
        self._on_new = on_new

    def record(self, inst: StoredInstance) -> None:
        """Commit the instance's row; raises if it cannot be committed."""
        outcome = self._store.record_instance(
            InstanceRecord(
                study_uid=inst.study_uid,
                series_uid=inst.series_uid,
                sop_uid=inst.sop_uid,
                sop_class_uid=inst.sop_class_uid,
                modality=inst.modality,
                path=Path(inst.path),
                size=inst.size,
                calling_ae=inst.calling_ae,
                series_description=inst.series_description or "",
                series_number=inst.series_number,
                instance_number=inst.instance_number,
            )
        )
        if outcome.new and self._on_new is not None:
            self._on_new(inst)


@dataclass
class App:
    """A running (or ready to run) node."""

    settings: Settings
    store: Store
    scp: StoreSCP
    scheduler: NodeScheduler
    _stop: threading.Event = field(default_factory=threading.Event)
    _started: bool = False

    @property
    def port(self) -> int:
        """The TCP port the DICOM receiver listens on."""
        return self.scp.port

    def sweep(self, now: float | None = None) -> list[int]:
        """Run the stable-study sweep once; returns the ids of the jobs created."""
        s = self.settings
        return sweep_stable_studies(
            self.store, s.selection, s.study.stable_after_s, time.time() if now is None else now
        )

    def start(self) -> None:
        """Start receiving and the periodic work; returns immediately."""
        for d in (self.settings.spool_dir, self.settings.outputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.scp.start()
        self.scheduler.every("sweep", self.settings.study.sweep_interval_s, self.sweep)
        self.scheduler.start()
        self._started = True
        log.info(
            "i3node listening as %s on %s:%d", self.settings.dicom.ae_title, self.settings.dicom.host, self.port
        )

    def stop(self) -> None:
        """Stop accepting associations, let running work finish, release resources."""
        self._stop.set()
        if self._started:
            self.scp.stop()
            self.scheduler.shutdown(wait=True)
            self._started = False
        self.store.close()

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (signal handlers call this)."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Start, tell systemd we are ready, feed its watchdog, and stop on request."""
        self.start()
        systemd.notify("READY=1\nSTATUS=receiving")
        interval = systemd.watchdog_interval_s() or 5.0
        try:
            while not self._stop.wait(interval):
                systemd.notify("WATCHDOG=1")
        finally:
            systemd.notify("STOPPING=1")
            self.stop()


def build_app(settings: Settings) -> App:
    """Compose a node from its settings (the only place that does so)."""
    store = Store(settings.database_url)
    d = settings.dicom
    scp_config = ScpConfig(
        ae_title=d.ae_title,
        host=d.host,
        port=d.port,
        spool_dir=settings.spool_dir,
        allowed_callers=allowed_callers_map(d.allowed_callers),
        min_free_bytes=d.min_free_mb * 1024 * 1024,
        max_associations=d.max_associations,
        acse_timeout=d.acse_timeout_s,
        dimse_timeout=d.dimse_timeout_s,
        network_timeout=d.network_timeout_s,
    )
    scp = StoreSCP(scp_config, StoreSink(store))
    return App(settings=settings, store=store, scp=scp, scheduler=NodeScheduler())
