"""Storage SCU: C-STORE files, folders or in-memory datasets to a peer; C-ECHO.

:func:`send_paths` reads only the header of each file to learn its SOP Class and Transfer
Syntax, proposes exactly the presentation contexts needed (one per SOP Class and Transfer
Syntax pair, with the native little-endian syntaxes as alternatives for uncompressed
files), and sends every file, one association per group of at most 128 contexts. The
per-file outcome is reported in a :class:`SendReport`; an association that cannot be
established (refused connection, rejection, abort, timeout) raises
:class:`AssociationFailed`, which names the peer and carries the partial report.

Logging carries UIDs, AE titles, counts and statuses only.
"""
from __future__ import annotations

import copy
import logging
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE

from dicom.pynetdicom_compat import quiet_pynetdicom, unread_rejection
from dicom.scp import VERIFICATION_SOP_CLASS

__all__ = [
    "AssociationFailed",
    "FileResult",
    "SendReport",
    "StatusCategory",
    "echo",
    "iter_dicom_files",
    "send_datasets",
    "send_paths",
]

log = logging.getLogger(__name__)

#: pynetdicom accepts at most this many requested presentation contexts.
MAX_CONTEXTS = 128

ProgressCallback = Callable[[int, int], None]


class AssociationFailed(RuntimeError):
    """An association with the peer could not be established or was lost.

    Attributes
    ----------
    ae_title, host, port : str, str, int
        The peer.
    reason : str
        What happened.
    report : SendReport or None
        The outcome of the items handled before the failure (items not sent are
        reported as failures), when a send was in progress.
    """

    def __init__(
        self, ae_title: str, host: str, port: int, reason: str, report: SendReport | None = None
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.reason = reason
        self.report = report
        super().__init__(f"Association with {ae_title}@{host}:{port} failed: {reason}")


class StatusCategory(str, Enum):
    """Category of a C-STORE outcome."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"


def categorize(status: int | None) -> StatusCategory:
    """Return the category of a C-STORE status code (``None``: no response).

    Parameters
    ----------
    status : int or None
        DIMSE status.

    Returns
    -------
    StatusCategory
        Success for 0x0000, warning for 0x0001 and 0xBxxx, failure otherwise.
    """
    if status == 0x0000:
        return StatusCategory.SUCCESS
    if status is not None and (status == 0x0001 or 0xB000 <= status <= 0xBFFF):
        return StatusCategory.WARNING
    return StatusCategory.FAILURE


@dataclass(frozen=True)
class FileResult:
    """Outcome of one item.

    Attributes
    ----------
    source : str
        File path, or ``"dataset[i]"`` for an in-memory dataset.
    sop_instance_uid : str
        SOP Instance UID (``""`` if unreadable).
    status : int or None
        DIMSE status returned by the peer; ``None`` if none was received.
    category : StatusCategory
        Success, warning or failure.
    message : str
        Error comment from the peer or a local reason.
    """

    source: str
    sop_instance_uid: str
    status: int | None
    category: StatusCategory
    message: str = ""


@dataclass
class SendReport:
    """Per-item outcomes of a send.

    Attributes
    ----------
    results : list of FileResult
        One per item, in the order they were handled.
    """

    results: list[FileResult] = field(default_factory=list)

    def _count(self, category: StatusCategory) -> int:
        return sum(1 for r in self.results if r.category is category)

    @property
    def n_success(self) -> int:
        """Number of items stored with status Success."""
        return self._count(StatusCategory.SUCCESS)

    @property
    def n_warning(self) -> int:
        """Number of items stored with a warning status."""
        return self._count(StatusCategory.WARNING)

    @property
    def n_failure(self) -> int:
        """Number of items not stored."""
        return self._count(StatusCategory.FAILURE)

    @property
    def ok(self) -> bool:
        """Whether every item was stored (success or warning)."""
        return self.n_failure == 0

    @property
    def failures(self) -> list[FileResult]:
        """The failed items."""
        return [r for r in self.results if r.category is StatusCategory.FAILURE]


@dataclass
class _Item:
    source: str
    payload: Path | Dataset
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def iter_dicom_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """Yield the files named by `paths`, walking folders recursively (sorted).

    Parameters
    ----------
    paths : iterable of path-like
        Files and folders.

    Yields
    ------
    pathlib.Path
        Each regular file (DICOM or not; unreadable ones are reported by the sender).

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"paths: {path} does not exist")


def _context_syntaxes(tsyntax: str) -> list[str]:
    """Transfer syntaxes to propose for data encoded in `tsyntax`."""
    uid = UID(tsyntax)
    if uid.is_compressed or uid.is_deflated or not uid.is_little_endian:
        return [tsyntax]
    others = [ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts != tsyntax]
    return [tsyntax, *others]


@dataclass(frozen=True)
class _Peer:
    """Where and how :func:`_send_items` associates."""

    ae_title: str
    host: str
    port: int
    calling_ae: str
    ssl_context: ssl.SSLContext | None
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_pdu: int

    def associate(self, contexts: Sequence[tuple[str, str]]) -> Any:
        """Request an association proposing each (SOP Class, transfer syntax) pair."""
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.maximum_pdu_size = self.max_pdu
        for sop_class, tsyntax in contexts:
            ae.add_requested_context(sop_class, _context_syntaxes(tsyntax))
        tls_args = (self.ssl_context, self.host) if self.ssl_context is not None else None
        return ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args)

    def failed(self, reason: str, report: SendReport, unsent: Iterable[_Item]) -> AssociationFailed:
        """Record `unsent` as failed with `reason`; the exception to raise."""
        report.results.extend(
            FileResult(it.source, it.sop_instance, None, StatusCategory.FAILURE, reason) for it in unsent
        )
        return AssociationFailed(self.ae_title, self.host, self.port, reason, report)


def _batches(items: Sequence[_Item]) -> list[tuple[list[tuple[str, str]], list[_Item]]]:
    """Items grouped per association: one presentation context per (SOP Class, transfer syntax)."""
    groups: dict[tuple[str, str], list[_Item]] = {}
    for item in items:
        groups.setdefault((item.sop_class, item.transfer_syntax), []).append(item)
    keys = list(groups)
    out = []
    for i in range(0, len(keys), MAX_CONTEXTS):
        contexts = keys[i : i + MAX_CONTEXTS]
        out.append((contexts, [it for key in contexts for it in groups[key]]))
    return out


def _send_items(
    items: list[_Item], pre_failed: list[FileResult], *, progress: ProgressCallback | None, **peer: Any
) -> SendReport:
    """Send `items` over as few associations as the context limit allows (see :func:`send_paths`)."""
    quiet_pynetdicom()
    dest = _Peer(**peer)
    report = SendReport(results=list(pre_failed))
    total = len(items) + len(pre_failed)
    if progress is not None and pre_failed:
        progress(len(pre_failed), total)
    batches = _batches(items)
    for batch_no, (contexts, batch_items) in enumerate(batches):
        later = [it for _, its in batches[batch_no + 1 :] for it in its]
        assoc = dest.associate(contexts)
        if not assoc.is_established:
            reason = _association_reason(assoc)
            log.error("Association with %s@%s:%d failed: %s", dest.ae_title, dest.host, dest.port, reason)
            raise dest.failed(reason, report, batch_items + later)
        log.info("Association with %s@%s:%d established (%d instance(s))", dest.ae_title, dest.host, dest.port,
                 len(batch_items))
        try:
            for index, item in enumerate(batch_items):
                if not assoc.is_established:
                    raise dest.failed(_association_reason(assoc), report, batch_items[index:] + later)
                result = _store_one(assoc, item)
                report.results.append(result)
                if result.category is StatusCategory.FAILURE:
                    log.warning("C-STORE of %s to %s failed: status %s %s", item.sop_instance, dest.ae_title,
                                "none" if result.status is None else f"0x{result.status:04X}", result.message)
                if progress is not None:
                    progress(len(report.results), total)
        finally:
            if assoc.is_established:
                assoc.release()
    log.info("Sent to %s@%s:%d: %d success, %d warning, %d failure", dest.ae_title, dest.host, dest.port,
             report.n_success, report.n_warning, report.n_failure)
    return report


def _association_reason(assoc: Any) -> str:
    rejection = assoc.acceptor.primitive if assoc.is_rejected else None
    if rejection is None and assoc.is_aborted and not assoc.is_established:
        rejection = unread_rejection(assoc)
    if assoc.is_rejected or rejection is not None:
        if rejection is not None and getattr(rejection, "result", None) is not None:
            return (
                f"association rejected (result 0x{rejection.result:02X}, "
                f"source 0x{rejection.result_source:02X}, reason 0x{rejection.diagnostic:02X})"
            )
        return "association rejected"
    if assoc.is_aborted:
        return "association aborted"
    if assoc.is_released:
        return "association released by the peer"
    return "connection failed or timed out"


def _store_one(assoc: Any, item: _Item) -> FileResult:
    try:
        status_ds = assoc.send_c_store(item.payload)
    except (ValueError, AttributeError, OSError, InvalidDicomError) as exc:
        # No accepted context for this SOP class / transfer syntax, or an unreadable file.
        return FileResult(
            item.source, item.sop_instance, None, StatusCategory.FAILURE, f"not sent: {exc}"
        )
    status = getattr(status_ds, "Status", None)
    if status is None:
        return FileResult(
            item.source,
            item.sop_instance,
            None,
            StatusCategory.FAILURE,
            "no response (timeout or association lost)",
        )
    comment = str(getattr(status_ds, "ErrorComment", "") or "")
    return FileResult(item.source, item.sop_instance, int(status), categorize(int(status)), comment)


def send_paths(
    paths: Iterable[Path | str] | Path | str,
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str = "I3NODE",
    ssl_context: ssl.SSLContext | None = None,
    progress: ProgressCallback | None = None,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    max_pdu: int = 0,
) -> SendReport:
    """C-STORE DICOM files (folders are walked recursively) to a peer.

    Parameters
    ----------
    paths : path-like or iterable of path-like
        Files and/or folders. Non-DICOM files are reported as failures and not sent.
    ae_title, host, port : str, str, int
        The peer (called AE title, address, port).
    calling_ae : str
        Our AE title.
    ssl_context : ssl.SSLContext or None
        Client-side TLS context; ``None`` for plain TCP.
    progress : callable or None
        Called as ``progress(done, total)`` after each item.
    acse_timeout, dimse_timeout, network_timeout : float
        Timeouts in seconds.
    max_pdu : int
        Maximum PDU we receive (``0``: unlimited).

    Returns
    -------
    SendReport
        Per-file outcome and counts.

    Raises
    ------
    AssociationFailed
        If an association cannot be established or is lost (carries the partial report).
    FileNotFoundError
        If a path does not exist.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    items: list[_Item] = []
    bad: list[FileResult] = []
    for path in iter_dicom_files(paths):
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=[(0x0008, 0x0016), (0x0008, 0x0018)],
            )
            tsyntax = str(ds.file_meta.TransferSyntaxUID)
            sop_class = str(ds.SOPClassUID)
            sop_instance = str(ds.SOPInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, KeyError) as exc:
            bad.append(
                FileResult(
                    str(path), "", None, StatusCategory.FAILURE, f"not a readable DICOM file: {type(exc).__name__}"
                )
            )
            continue
        items.append(_Item(str(path), path, sop_class, sop_instance, tsyntax))
    return _send_items(
        items,
        bad,
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae=calling_ae,
        ssl_context=ssl_context,
        progress=progress,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        network_timeout=network_timeout,
        max_pdu=max_pdu,
    )


def send_datasets(
    datasets: Sequence[Dataset] | Iterable[Dataset],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str = "I3NODE",
    ssl_context: ssl.SSLContext | None = None,
    progress: ProgressCallback | None = None,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    max_pdu: int = 0,
) -> SendReport:
    """C-STORE in-memory datasets to a peer.

    A dataset without ``file_meta.TransferSyntaxUID`` is sent as Explicit VR Little Endian
    (the caller's dataset is not modified).

    Parameters
    ----------
    datasets : iterable of pydicom.dataset.Dataset
        Datasets with SOPClassUID and SOPInstanceUID.
    ae_title, host, port, calling_ae, ssl_context, progress, acse_timeout, dimse_timeout,
    network_timeout, max_pdu
        As for :func:`send_paths`.

    Returns
    -------
    SendReport
        Per-dataset outcome (``source`` is ``"dataset[i]"``).

    Raises
    ------
    AssociationFailed
        If an association cannot be established or is lost.
    ValueError
        If a dataset lacks SOPClassUID or SOPInstanceUID.
    """
    items: list[_Item] = []
    for index, ds in enumerate(datasets):
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise ValueError(f"datasets[{index}] lacks SOPClassUID or SOPInstanceUID")
        meta = getattr(ds, "file_meta", None)
        tsyntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        payload = ds
        if tsyntax is None:
            payload = copy.copy(ds)
            new_meta = FileMetaDataset()
            if meta is not None:
                new_meta.update(meta)
            new_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            payload.file_meta = new_meta
            tsyntax = ExplicitVRLittleEndian
        items.append(
            _Item(f"dataset[{index}]", payload, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(tsyntax))
        )
    return _send_items(
        items,
        [],
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae=calling_ae,
        ssl_context=ssl_context,
        progress=progress,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        network_timeout=network_timeout,
        max_pdu=max_pdu,
    )


def echo(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae: str = "I3NODE",
    ssl_context: ssl.SSLContext | None = None,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 30.0,
    network_timeout: float = 30.0,
) -> bool:
    """C-ECHO a peer.

    Parameters
    ----------
    ae_title, host, port : str, str, int
        The peer.
    calling_ae : str
        Our AE title.
    ssl_context : ssl.SSLContext or None
        Client-side TLS context.
    acse_timeout, dimse_timeout, network_timeout : float
        Timeouts in seconds.

    Returns
    -------
    bool
        ``True`` if the association was accepted and the echo answered Success.
    """
    quiet_pynetdicom()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    tls_args = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        log.warning(
            "C-ECHO to %s@%s:%d: %s", ae_title, host, port, _association_reason(assoc)
        )
        return False
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    return getattr(status, "Status", None) == 0x0000
