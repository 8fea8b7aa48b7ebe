"""The composition root: the one place that wires ``dicom`` and ``models`` into a node.

:func:`build_app` turns :class:`~node.settings.Settings` into a running :class:`App`
(state store, DICOM receiver, periodic sweep).  Nothing else in the code base builds
these objects, so tests and the CLI get exactly the node that production runs.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom.codes import SegmentSpec, default_segment_specs, load_segment_specs
from dicom.scp import ScpConfig, StoreSCP
from dicom.values import quiet_pydicom
from node import systemd
from node.audit import AuditingSink, AuditLog, AuditObserver
from node.exporter import Exporter, OutputFile, register_outputs
from node.ingest import StoreSink, recover_spool
from node.metrics import CountingSink, Metrics, MetricsServer
from node.pipeline import PipelineContext, Refiner, Segmenter
from node.retention import purge_once
from node.runner import JobRunner
from node.scheduler import NodeScheduler
from node.settings import Settings, resolve_database_url
from node.store import Store
from node.studies import sweep_stable_studies
from node.tls import client_context, server_context

__all__ = ["App", "build_app", "allowed_callers_map"]

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


@dataclass
class App:
    """A running (or ready to run) node."""

    settings: Settings
    store: Store
    scp: StoreSCP
    scheduler: NodeScheduler
    runner: JobRunner
    exporter: Exporter
    models: LazyModels
    audit: AuditLog | None = None
    metrics: Metrics | None = None
    audit_sink: AuditingSink | None = None
    _metrics_server: MetricsServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _started: bool = False

    @property
    def port(self) -> int:
        """The TCP port the DICOM receiver listens on."""
        return self.scp.port

    def sweep(self, now: float | None = None) -> list[int]:
        """Run the stable-study sweep once; returns the ids of the jobs created."""
        s = self.settings
        ids = sweep_stable_studies(self.store, s.selection, s.study.stable_after_s, time.time() if now is None else now)
        if ids and self._started:
            self.scheduler.wake("jobs")  # start now, not at the next poll
        return ids

    def start(self) -> None:
        """Start receiving and the periodic work; returns immediately."""
        for d in (self.settings.spool_dir, self.settings.outputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        s = self.settings
        if self.audit is not None:
            self.audit.config_loaded(s.source or "(embedded defaults)", s.source_sha256)
        recover_spool(self.store, s.spool_dir)
        if self.audit_sink is not None:  # instances acknowledged before a stop or crash
            late = self.audit_sink.flush(force=True, backlog=True)
            if late:
                log.warning("audit: wrote %d instances_stored event(s) left from before the start", late)
        self.store.restart_stability_clocks()
        # Only this node's own work: another node's running job is that node's business
        # until its lease runs out (then the "leases" task of any node requeues it).
        resumed = self.store.release_own("requeued: the node holding it restarted")
        if resumed:
            log.info("resuming %d job(s) this node held before its restart: %s", len(resumed), resumed)
        self.scp.start()
        if self.metrics is not None:
            self._metrics_server = self.metrics.start_http(s.metrics.host, s.metrics.port)
        self.scheduler.every("sweep", s.study.sweep_interval_s, self.sweep)
        self.scheduler.every("leases", s.node.lease_s / 3.0, self.keep_leases)
        if s.node.job_workers > 0:
            self.scheduler.soon("warm-up", self.models.warm_up, executor="models")
            self.scheduler.every("jobs", 1.0, self.runner.run_once, executor="models")
        self.scheduler.every("export", 1.0, self.exporter.run_once)
        if self.audit_sink is not None:
            self.scheduler.every("audit-flush", 5.0, self.audit_sink.flush)
        if s.retention.spool_days or s.retention.outputs_days:
            self.scheduler.every(
                "retention",
                3600.0,
                lambda: purge_once(
                    self.store, time.time(), s.retention.spool_days, s.retention.outputs_days, audit=self.audit
                ),
            )
        self.scheduler.start()
        if self.audit is not None:
            self.audit.node_started(port=self.port, tls=s.dicom.tls)
        self._started = True
        log.info(
            "i3node listening as %s on %s:%d", self.settings.dicom.ae_title, self.settings.dicom.host, self.port
        )

    def keep_leases(self, now: float | None = None) -> None:
        """Renew the leases of the work this node holds; requeue work whose node stopped renewing."""
        self.store.renew_leases(now)
        taken = self.store.reap_expired(now)
        if taken and self._started:
            self.scheduler.wake("jobs")

    def stop(self) -> bool:
        """Stop accepting associations and work; release resources.

        A running job gets ``node.stop_timeout_s`` to finish.  If it is still running
        then, it is handed back to the queue (state ``queued``, or the refinement's SEG
        ``pending`` again) for this or another node to run, and this returns False: the
        caller should end the process, the model thread cannot be interrupted.
        """
        self._stop.set()
        finished = True
        if self._started:
            self.runner.stopping.set()
            self.scp.stop()
            finished = self.scheduler.shutdown(timeout=self.settings.node.stop_timeout_s)
            if not finished:
                handed = self.store.release_own("handed back: the node stopped before the job finished")
                log.warning("stopping with work unfinished: job(s) %s handed back to the queue", handed)
            if self.audit_sink is not None:
                self.audit_sink.flush(force=True)
            if self._metrics_server is not None:
                self._metrics_server.stop()
            if self.audit is not None:
                self.audit.node_stopped()
            self._started = False
        if self.audit is not None:
            self.audit.close()
        self.store.close()
        return finished

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
            if not self.stop():
                # A model thread cannot be interrupted and the interpreter would wait for it
                # at exit; its job is handed back, so end the process now.
                logging.shutdown()
                os._exit(0)


def model_tag(folder: Path) -> str:
    """A short version for SEG provenance: the model's version (``i3node train preseg --from``) or its
    dataset folder's name, and a hash of the model files."""
    import hashlib
    import json

    from node.dataset import MODEL_INFO

    h = hashlib.sha256()
    for name in ("dataset.json", "plans.json"):
        f = folder / name
        if f.is_file():
            h.update(f.read_bytes())
    for ckpt in sorted(folder.glob("fold_*/checkpoint_final.pth")):
        h.update(f"{ckpt.parent.name}:{ckpt.stat().st_size}".encode())
    name = folder.parent.name
    info = folder / MODEL_INFO
    if info.is_file():
        name = str(json.loads(info.read_text()).get("version", name))
    return f"{name[:40]}-{h.hexdigest()[:10]}"


class LazyModels:
    """Loads the nnU-Net models on first use (startup stays fast; a missing model fails the job, not the node).

    Empty ``models.preseg_dir`` and ``models.refine_dir`` use the tiny demo models, built into
    ``models.cache_dir`` on first use. A configured ``preseg_dir`` with an empty
    ``refine_dir`` means no refinement model: ``refinement.method`` then falls back (see
    :func:`models.refiners.resolve_method`).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.RLock()
        self._segmenter: Any = None
        self._refiner: Refiner | None = None
        self._preseg_version: str | None = None

    def _dirs(self) -> tuple[Path, Path | None]:
        m = self._settings.models
        if m.preseg_dir:
            return Path(m.preseg_dir), (Path(m.refine_dir) if m.refine_dir else None)
        from models.demo import build_demo_models

        log.info("no model folders configured: using the demo models in %s", self._settings.model_cache_dir)
        demo = build_demo_models(self._settings.model_cache_dir)
        return Path(demo.preseg_dir), (Path(m.refine_dir) if m.refine_dir else demo.refine_dir)

    def _device(self) -> str | None:
        d = self._settings.models.device
        return None if d == "auto" else d

    def preseg_version(self) -> str:
        """Version of the presegmentation ensemble (folder name and a hash of its files), for SEG provenance."""
        with self._lock:
            if self._preseg_version is None:
                self._preseg_version = model_tag(self._dirs()[0])
            return self._preseg_version

    def segmenter(self) -> Segmenter:
        """The presegmentation ensemble."""
        with self._lock:
            if self._segmenter is None:
                from models.nnunet import EnsemblePredictor

                preseg, _ = self._dirs()
                self._segmenter = EnsemblePredictor(preseg, device=self._device(), tta=self._settings.models.tta)
            return self._segmenter  # type: ignore[no-any-return]

    def refiner(self) -> Refiner:
        """The refiner ``refinement.method`` asks for, or its fallback (logged)."""
        with self._lock:
            if self._refiner is None:
                self._refiner = self._build_refiner()
            return self._refiner

    def _build_refiner(self) -> Refiner:
        from models.refinement import RefinementModel, RefinementModelError
        from models.refiners import make_refiner, resolve_method

        r = self._settings.refinement
        preseg, refine = self._dirs()
        method, why = resolve_method(r.method, have_model=refine is not None, have_ensemble=True)
        model = None
        if method in ("model", "model+rw") and refine is not None:
            try:
                model = RefinementModel(refine, device=self._device())
                model.load()
            except RefinementModelError as exc:
                method, why = resolve_method("tta", have_model=False, have_ensemble=True)[0], f"refinement model unusable: {exc}"
                log.error("refinement model %s cannot be used (%s); falling back to %s", refine, exc, method)
        if why:
            log.warning("refinement.method %s: %s; the node refines with %s", r.method, why, method)
        adapt = None
        if method == "tta":
            ensemble = self.segmenter()

            def adapt(image: Any, spacing: Any, expert: Any, reviewed: Any) -> Any:
                return ensemble.adapted_probabilities(image, spacing, expert, reviewed, steps=r.tta_steps,  # type: ignore[attr-defined]
                                                      lr=r.tta_lr)

        refiner = make_refiner(method, model=model, model_version=model_tag(refine) if refine is not None else "",
                               adapt=adapt, adapt_version=f"{model_tag(preseg)};steps={r.tta_steps}", gamma=r.gamma)
        log.info("refinement: %s (%s)", refiner.name, refiner.version)
        return refiner

    def warm_up(self) -> None:
        """Load the models ahead of the first job (only when model folders are configured)."""
        m = self._settings.models
        if m.preseg_dir:
            self.segmenter()
            self.refiner()
            log.info("models loaded: %s, %s", m.preseg_dir, m.refine_dir or "(no refinement model)")


def load_segments(settings: Settings) -> tuple[SegmentSpec, ...]:
    """Segment labels and codes per class: the configured TOML file, else the defaults."""
    f = settings.outputs.segments_file
    return tuple(load_segment_specs(f)) if f else default_segment_specs()


def scp_config_from(settings: Settings, ssl_context: ssl.SSLContext | None) -> ScpConfig:
    """The receiver's configuration from ``[dicom]`` (sizes in bytes, allow-list as a map)."""
    d = settings.dicom
    return ScpConfig(
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
        ssl_context=ssl_context,
        maximum_pdu_size=d.max_pdu_kb * 1024,
        max_dataset_bytes=d.max_dataset_mb * 1024 * 1024,
        fast_store=d.fast_store,
        low_latency=d.low_latency,
    )


def build_app(settings: Settings) -> App:
    """Compose a node from its settings (the only place that does so)."""
    quiet_pydicom()
    store = Store(resolve_database_url(settings), node_id=settings.node_id, lease_s=settings.node.lease_s)
    scheduler = NodeScheduler()
    models = LazyModels(settings)
    d = settings.dicom
    audit = AuditLog(settings.audit_path, ae_title=d.ae_title) if settings.audit.enabled else None
    metrics = Metrics(store, settings.spool_dir, node_id=settings.node_id) if settings.metrics.enabled else None
    # TLS contexts are built now so that a bad certificate stops the node at start.
    t = settings.tls
    server_ssl = server_context(t.certificate, t.private_key, t.ca_file, t.require_client_certificate) if d.tls else None
    client_ssl = (
        client_context(t.ca_file, t.certificate or None, t.private_key or None)
        if any(dest.tls for dest in settings.destinations)
        else None
    )

    def outputs_ready(job_id: int, version: int, files: Sequence[OutputFile]) -> None:
        register_outputs(store, job_id, version, files, settings.destinations, time.time())
        scheduler.wake("export")  # deliver now, not at the next poll

    def correction_matched(sop_uid: str, job_id: int) -> None:
        if metrics is not None:
            metrics.corrected_seg()
        if audit is not None:
            row = store.job(job_id)
            audit.corrected_seg_ingested(sop_uid, job_id, study_uid=str(row["study_uid"]) if row else "")

    ctx = PipelineContext(
        store=store,
        settings=settings,
        segments=load_segments(settings),
        segmenter=models.segmenter,
        refiner=models.refiner,
        model_version=models.preseg_version,
        register_outputs=outputs_ready,
        stage_timer=metrics.observe_stage if metrics is not None else (lambda stage, secs: None),
        on_correction=correction_matched,
    )
    runner = JobRunner(ctx)

    def delivery_outcome(dest: Any, sop_uid: str, delivered: bool, dead: bool, reason: str) -> None:
        if metrics is not None and not delivered:
            metrics.delivery_failed()
        if audit is not None and (delivered or dead):
            audit.output_delivered(
                dest.ae_title, sop_uid, "", address=f"{dest.host}:{dest.port}", success=delivered, reason=reason
            )

    exporter = Exporter(
        store,
        settings.destinations,
        settings.delivery,
        ssl_context_for=lambda dest: client_ssl if dest.tls else None,
        on_outcome=delivery_outcome,
    )
    scp_config = scp_config_from(settings, server_ssl)
    sink: Any = StoreSink(store, on_correction=lambda: scheduler.wake("jobs"))
    if metrics is not None:
        sink = CountingSink(sink, metrics)
    audit_sink = AuditingSink(sink, audit, store) if audit is not None else None
    scp = StoreSCP(
        scp_config,
        audit_sink or sink,
        observer=AuditObserver(audit) if audit is not None else None,
    )
    return App(
        settings=settings,
        store=store,
        scp=scp,
        scheduler=scheduler,
        runner=runner,
        exporter=exporter,
        models=models,
        audit=audit,
        metrics=metrics,
        audit_sink=audit_sink,
    )
