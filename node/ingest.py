"""From a received instance to its rows: the SCP's sink and the spool recovery at start.

:class:`StoreSink` is the :class:`dicom.scp.InstanceSink` of the node: it commits each
instance's row (and registers a corrected SEG from a viewer) before the SCP acknowledges
it. :func:`recover_spool` re-records, at start, instances whose files outlived their rows.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import SegmentationStorage

from dicom.scp import InstanceConflict, StoredInstance
from node.store import Store, instances

__all__ = ["StoreSink", "recover_spool"]

log = logging.getLogger(__name__)


class StoreSink:
    """Adapter from the SCP's stored-instance callback to the state store.

    A newly received Segmentation that this node did not create (by recorded SOP
    Instance UID, not by free text) is registered as a pending correction and
    ``on_correction`` is called so the job runner wakes up.
    """

    def __init__(self, store: Store, on_correction: Callable[[], None] | None = None) -> None:
        self._store = store
        self._on_correction = on_correction

    def record(self, inst: StoredInstance) -> None:
        """Commit the instance's row; raises if it cannot be committed."""
        outcome = self._store.record_instance(inst)
        if outcome.new and inst.sop_class_uid == SegmentationStorage and not self._store.is_own_output(inst.sop_uid):
            if self._store.add_correction(inst.sop_uid, inst.series_uid):
                log.info("corrected SEG %s received from %s", inst.sop_uid, inst.calling_ae)
                if self._on_correction is not None:
                    self._on_correction()


def recover_spool(store: Store, spool_dir: Path) -> int:
    """Record every spooled instance whose row is missing; returns how many.

    The SCP fsyncs each file before its row is committed, and the database runs in WAL
    mode with ``synchronous=NORMAL``: after a power loss the last rows may be gone while
    their files are on disk.  Those instances were acknowledged, so they are recorded
    again here before the node accepts new associations.  Only UIDs are read.
    """
    if not spool_dir.is_dir():
        return 0
    known = {str(r["path"]) for r in store.iter_rows(instances)}
    n = 0
    for path in sorted(spool_dir.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            rec = StoredInstance(
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                modality=str(ds.get("Modality", "")),
                path=path,
                size=path.stat().st_size,
                calling_ae=str(getattr(ds.file_meta, "SourceApplicationEntityTitle", "") or ""),
                peer_address="",
                series_description=str(ds.get("SeriesDescription", "")),
                series_number=int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
                instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
            )
        except Exception as exc:  # a file we cannot read is left in place and reported
            log.error("spooled file %s cannot be re-recorded (%s)", path, type(exc).__name__)
            continue
        try:
            store.record_instance(rec)
        except InstanceConflict as exc:  # e.g. a file an older version kept for a refused instance
            log.error("spooled file %s not re-recorded: %s", path, exc)
            continue
        n += 1
    if n:
        log.warning("re-recorded %d spooled instance(s) whose database rows were lost", n)
    return n
