"""Storage SCP: receives instances over DICOM C-STORE into the durable spool.

A C-STORE request is answered *Success* only after the instance is on disk durably under
``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (see
:mod:`dicom.spool`) **and** the :class:`InstanceSink` has recorded it. The received bytes
are written as sent (file meta information + the peer's encoded data set); only the few
attributes needed to file and record the instance are decoded.

Failure statuses (all carry an ``ErrorComment``):

==========  ================================================================
``0xA700``  Out of resources: free space of the spool is below the reserve.
``0xA701``  Out of resources: the instance could not be written.
``0xA702``  Out of resources: the instance could not be recorded by the sink.
``0xA703``  Out of resources: the data set is larger than the configured maximum.
``0xA900``  Data set does not match the SOP class of the request or the context.
``0x0122``  SOP class not supported: a C-STORE on a non-storage context.
``0x0111``  Duplicate SOP instance: already stored with other content, or the
            SOP/Series Instance UID belongs to another study or series.
``0xC210``  Cannot understand: Study/Series/SOP Instance UID missing or invalid.
``0xC211``  Cannot understand: the data set is malformed (truncated, an element
            past its end, an unclosed sequence, pixel data of the wrong length).
``0xC212``  Cannot understand: the installed decoders cannot read the pixel data.
==========  ================================================================

A data set is acknowledged only when it parses to its end (:func:`dicom.header.inspect_dataset`);
a deflated one is inflated with a size cap first; a compressed image's first frame is
decoded before it is acknowledged.

A duplicate (an instance whose file already exists with the same content) is idempotent:
the existing file is kept, the sink is called with ``duplicate=True`` and the status is
*Success*; the same UID with other content is refused (``0x0111``), and so is an instance
the sink refuses as a conflict (:class:`InstanceConflict`: the UID is known under another
study or series).

Logging carries UIDs, AE titles, addresses, counts and statuses only, never patient
identifying attributes; pynetdicom's identifier logging is switched off.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast, runtime_checkable

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import (
    AE,
    evt,
)
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from dicom import fast_store, pynetdicom_compat, spool
from dicom.header import (
    DatasetFacts,
    DataSetTooLarge,
    HeaderError,
    ReceivedHeader,
    encode_file_head,
    read_received_header,
)

__all__ = [
    "STATUS_BAD_UID",
    "STATUS_CONFLICT",
    "STATUS_DECODE_FAILED",
    "STATUS_NOT_STORAGE",
    "STATUS_PIXELS_UNDECODABLE",
    "STATUS_SOP_CLASS_MISMATCH",
    "STATUS_TOO_LARGE",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_RECORD_FAILED",
    "STATUS_SUCCESS",
    "STATUS_WRITE_FAILED",
    "STORAGE_SOP_CLASSES",
    "VERIFICATION_SOP_CLASS",
    "AssociationObserver",
    "InstanceConflict",
    "InstanceSink",
    "ScpConfig",
    "StoreOutcome",
    "StoreSCP",
    "StoredInstance",
    "accepted_transfer_syntaxes",
    "store_instance",
]

log = logging.getLogger(__name__)

#: Verification SOP Class.
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")

STATUS_SUCCESS = 0x0000
#: Refused, out of resources: spool free space below the configured reserve.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Refused, out of resources: writing the file failed.
STATUS_WRITE_FAILED = 0xA701
#: Refused, out of resources: the sink did not record the instance.
STATUS_RECORD_FAILED = 0xA702
#: Error, cannot understand: a Study/Series/SOP Instance UID is missing or invalid.
STATUS_BAD_UID = 0xC210
#: Error, cannot understand: the data set could not be decoded.
STATUS_DECODE_FAILED = 0xC211
#: Error, cannot understand: the pixel data cannot be decoded by the installed decoders.
STATUS_PIXELS_UNDECODABLE = 0xC212
#: Refused, out of resources: the data set is larger than the configured maximum.
STATUS_TOO_LARGE = 0xA703
#: Error, data set does not match SOP class (of the request or the presentation context).
STATUS_SOP_CLASS_MISMATCH = 0xA900
#: Refused, SOP class not supported (a C-STORE on a non-storage context, e.g. Verification).
STATUS_NOT_STORAGE = 0x0122
#: Failure, duplicate SOP instance: the UID is already stored with other content or under
#: another study or series (or a Series UID is reused in another study).
STATUS_CONFLICT = 0x0111

#: Storage SOP classes accepted by the SCP.
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    MRImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    SegmentationStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)

_NATIVE_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)



def accepted_transfer_syntaxes() -> list[str]:
    """Return the transfer syntaxes the SCP accepts.

    The four native syntaxes plus every compressed syntax that an installed pydicom pixel
    decoder can read (RLE Lossless is always decodable by pydicom itself).

    Returns
    -------
    list of str
        Transfer syntax UIDs, native ones first.
    """
    from pydicom.pixels import get_decoder

    syntaxes = list(_NATIVE_SYNTAXES)
    for uid in pydicom.uid.AllTransferSyntaxes:
        tsyntax = UID(uid)
        if uid in syntaxes or not tsyntax.is_compressed:
            continue
        try:
            available = get_decoder(tsyntax).is_available
        except (NotImplementedError, ValueError):
            available = False
        if available or uid == RLELossless:
            syntaxes.append(uid)
    return syntaxes


@dataclass(frozen=True)
class StoredInstance:
    """An instance received and durably written to the spool.

    Attributes
    ----------
    study_uid, series_uid, sop_uid, sop_class_uid : str
        UIDs of the instance.
    modality : str
        Modality (``""`` if absent).
    path : pathlib.Path
        Spool file.
    size : int
        File size in bytes.
    calling_ae : str
        Calling AE title of the sender.
    peer_address : str
        IP address of the sender.
    series_description : str
        Series Description (``""`` if absent).
    series_number, instance_number : int or None
        Series Number and Instance Number if present and valid.
    duplicate : bool
        ``True`` if the file already existed (the instance was received before).
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    path: Path
    size: int
    calling_ae: str
    peer_address: str
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    duplicate: bool = False


class InstanceConflict(Exception):
    """Raised by an :class:`InstanceSink` for an instance whose UIDs clash with stored ones.

    The message names the UIDs and what they clash with (never patient attributes); the
    SCP answers ``0x0111`` (duplicate SOP instance) and removes the file it just wrote.
    """


@runtime_checkable
class InstanceSink(Protocol):
    """Receives every durably written instance; the node commits its state row here.

    Called from the association threads, possibly concurrently: implementations must be
    thread-safe. Returning means *recorded durably*; raising means *not recorded*, and the
    SCP then answers a failure status (and removes a newly written file):
    :class:`InstanceConflict` gives ``0x0111``, anything else ``0xA702``.
    """

    def record(self, inst: StoredInstance) -> None:
        """Record `inst` durably or raise."""


class AssociationObserver(Protocol):
    """Optional observer of association outcomes (for an audit log).

    An observer may also have ``tls_refused(address, reason)``: it is then told of a
    refused TLS handshake (no association, hence no AE title) instead of
    ``rejected("", address, reason)``.
    """

    def accepted(self, calling_ae: str, address: str) -> None:
        """An association from `calling_ae` at `address` was accepted."""

    def rejected(self, calling_ae: str, address: str, reason: str) -> None:
        """An association from `calling_ae` at `address` was rejected for `reason`."""


@dataclass(frozen=True)
class ScpConfig:
    """Configuration of the :class:`StoreSCP`.

    Attributes
    ----------
    ae_title : str
        Our AE title.
    host : str
        Address to bind.
    port : int
        Port to bind; ``0`` binds an ephemeral port (see :attr:`StoreSCP.port`).
    spool_dir : pathlib.Path
        Spool root directory (created if missing).
    allowed_callers : Mapping[str, frozenset[str]] or None
        Calling AE title -> allowed peer addresses (an empty set allows any host).
        ``None`` accepts any caller.
    min_free_bytes : int
        Reserve: C-STORE is refused with ``0xA700`` while the spool's free space is
        below this many bytes.
    max_associations : int
        Maximum concurrent associations.
    acse_timeout, dimse_timeout, network_timeout : float
        Timeouts in seconds.
    ssl_context : ssl.SSLContext or None
        Server-side TLS context; ``None`` for plain TCP.
    maximum_pdu_size : int
        Maximum PDU length we advertise for receiving (1 MiB by default; must be finite).
        A large value lets peers send bigger P-DATA PDUs, which cuts pynetdicom's per-PDU
        cost; a peer announcing a longer PDU of any type is aborted before a byte of it
        is buffered (every read is capped at ``max(maximum_pdu_size, 64 KiB)``).
    max_dataset_bytes : int
        Largest data set accepted; a C-STORE growing past it is aborted (fast path) or
        refused with ``0xA703``, and a deflated data set is never inflated past it.
    low_latency : bool
        Tune each accepted association for throughput (see :func:`dicom.pynetdicom_compat.tune_association`):
        event-driven dispatch of received messages, a shorter DUL poll interval and
        large socket reads. Behaviour is unchanged; only latency per message drops.
    fast_store : bool
        Handle C-STORE requests on storage contexts below pynetdicom's DIMSE layer
        (:mod:`dicom.fast_store`): same statuses and files, a fraction of the CPU per
        instance. Other messages keep pynetdicom's path either way.
    """

    ae_title: str = "I3NODE"
    host: str = "127.0.0.1"
    port: int = 11112
    spool_dir: Path = field(default_factory=lambda: Path("spool"))
    allowed_callers: Mapping[str, frozenset[str]] | None = None
    min_free_bytes: int = 1 << 30
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    ssl_context: ssl.SSLContext | None = None
    maximum_pdu_size: int = 1 << 20
    max_dataset_bytes: int = 1 << 30
    low_latency: bool = True
    fast_store: bool = True

    def __post_init__(self) -> None:
        if not self.ae_title or len(self.ae_title) > 16:
            raise ValueError(f"ae_title must be 1 to 16 characters, got {self.ae_title!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {self.min_free_bytes}")
        if self.max_associations < 1:
            raise ValueError(f"max_associations must be >= 1, got {self.max_associations}")
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 4096 <= self.maximum_pdu_size <= 1 << 28:
            raise ValueError(f"maximum_pdu_size must be in 4096..{1 << 28} bytes, got {self.maximum_pdu_size}")
        if self.max_dataset_bytes < 1024:
            raise ValueError(f"max_dataset_bytes must be >= 1024, got {self.max_dataset_bytes}")

    @property
    def read_cap(self) -> int:
        """The longest PDU body read from a peer (any PDU type)."""
        return max(self.maximum_pdu_size, 1 << 16)

    def caller_rejection(self, calling_ae: str, address: str) -> str | None:
        """Return why a caller is not allowed, or ``None`` if it is.

        Parameters
        ----------
        calling_ae : str
            Calling AE title (surrounding spaces are ignored).
        address : str
            Peer IP address.

        Returns
        -------
        str or None
            The rejection reason.
        """
        if self.allowed_callers is None:
            return None
        hosts = self.allowed_callers.get(calling_ae.strip())
        if hosts is not None and (not hosts or address in hosts):
            return None
        # The key "*" allows any AE title from the listed addresses.
        any_ae = self.allowed_callers.get("*")
        if any_ae is not None and (not any_ae or address in any_ae):
            return None
        if hosts is None:
            return "calling AE title not recognised"
        return "calling AE title not allowed from this address"


@dataclass(frozen=True)
class StoreOutcome:
    """Result of :func:`store_instance`.

    Attributes
    ----------
    status : int
        DIMSE status code.
    comment : str
        Error comment for a failure (``""`` on success).
    instance : StoredInstance or None
        The stored instance on success.
    """

    status: int
    comment: str = ""
    instance: StoredInstance | None = None


class DatasetRejected(Exception):
    """A received data set that must not be acknowledged: status and a comment (<= 64 chars)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


def _remove_durably(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    spool.fsync_dir(path.parent)


def _check_sop_class(request_class: str, context_class: str | None, dataset_class: str) -> None:
    """The request, its presentation context and the data set must name one storage SOP class."""
    request_class = request_class.strip("\x00 ")
    if context_class is not None and context_class not in STORAGE_SOP_CLASSES:
        raise DatasetRejected(STATUS_NOT_STORAGE, "C-STORE on a non-storage presentation context")
    if context_class is not None and request_class != context_class:
        raise DatasetRejected(STATUS_SOP_CLASS_MISMATCH, "Affected SOP Class differs from the context's")
    if dataset_class and dataset_class != request_class:
        raise DatasetRejected(STATUS_SOP_CLASS_MISMATCH, "Data set SOP Class differs from the request's")


#: Storage SOP classes whose data sets must carry Pixel Data (Type 1).
_IMAGE_SOP_CLASSES = frozenset(STORAGE_SOP_CLASSES) - {KeyObjectSelectionDocumentStorage}


def _check_has_pixels(facts: DatasetFacts | None) -> None:
    """An image cut off before its Pixel Data parses (a shorter data set) but is no image."""
    if facts is None or facts.sop_class_uid not in _IMAGE_SOP_CLASSES:
        return
    if facts.pixel_data_length is None and not facts.encapsulated:
        raise DatasetRejected(STATUS_DECODE_FAILED, "Malformed: an image without Pixel Data")


def _check_pixels_decodable(fragments: Sequence[bytes | bytearray | memoryview], transfer_syntax: str,
                            facts: DatasetFacts | None) -> None:
    """Decode the first frame of a compressed image (the installed decoders must read it)."""
    if facts is None or not facts.encapsulated or not UID(transfer_syntax).is_compressed:
        return
    from pydicom.pixels import pixel_array

    head = encode_file_head(facts.sop_class_uid or "1.2", "1.2", transfer_syntax)
    try:
        pixel_array(BytesIO(head + _leading_bytes(fragments)), index=0)
    except Exception as exc:  # decoders raise many types; none may reach the peer as success
        log.warning("pixel data of transfer syntax %s not decodable (%s)", transfer_syntax, type(exc).__name__)
        raise DatasetRejected(STATUS_PIXELS_UNDECODABLE, "Pixel data not decodable by this node") from None


def _same_content(path: Path, fragments: Sequence[bytes | bytearray | memoryview]) -> bool:
    """Whether the spool file holds exactly these data set bytes (after its file meta)."""
    size = sum(len(f) for f in fragments)
    with open(path, "rb") as fh:
        head = fh.read(132 + 12)
        if len(head) < 144 or head[128:132] != b"DICM":
            return False
        (meta_length,) = struct.unpack("<L", head[140:144])
        fh.seek(144 + meta_length)
        if os.fstat(fh.fileno()).st_size - (144 + meta_length) != size:
            return False
        for fragment in fragments:
            if fh.read(len(fragment)) != bytes(fragment):
                return False
    return True


def store_instance(
    *,
    dataset_bytes: bytes | Sequence[bytes | bytearray | memoryview],
    transfer_syntax: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    spool_dir: Path,
    min_free_bytes: int,
    sink: InstanceSink,
    calling_ae: str,
    peer_address: str,
    context_sop_class: str | None = None,
    max_dataset_bytes: int = 1 << 30,
) -> StoreOutcome:
    """Check one received instance, file it durably and record it.

    Parameters
    ----------
    dataset_bytes : bytes or sequence of bytes-like
        The encoded data set exactly as received (no file meta), whole or as the
        received fragments in order.
    transfer_syntax : str
        Transfer syntax of the presentation context it came on.
    sop_class_uid, sop_instance_uid : str
        Affected SOP Class/Instance UID of the request (file meta; the data set's own
        SOP Class UID must agree).
    spool_dir : pathlib.Path
        Spool root.
    min_free_bytes : int
        Free-space reserve of the spool filesystem.
    sink : InstanceSink
        Records the instance.
    calling_ae, peer_address : str
        The sender.
    context_sop_class : str or None
        Abstract syntax of the presentation context (``None``: not checked).
    max_dataset_bytes : int
        Largest data set accepted (and inflation cap of a deflated one).

    Returns
    -------
    StoreOutcome
        Status (and the instance on success). Nothing is kept on disk for a failure.
    """
    if min_free_bytes and spool.free_bytes(spool_dir) < min_free_bytes:
        log.warning("Refusing C-STORE from %s: spool free space below reserve of %d bytes", calling_ae, min_free_bytes)
        return StoreOutcome(STATUS_OUT_OF_RESOURCES, "Out of resources: disk reserve reached")

    fragments: Sequence[bytes | bytearray | memoryview] = (
        (dataset_bytes,) if isinstance(dataset_bytes, bytes) else dataset_bytes)
    try:
        header, uids = _checked_dataset(fragments, transfer_syntax, sop_class_uid, context_sop_class,
                                        max_dataset_bytes)
    except DatasetRejected as exc:
        log.warning("C-STORE of %s from %s refused (0x%04X): %s", _safe_uid(sop_instance_uid), calling_ae,
                    exc.status, exc.comment)
        return StoreOutcome(exc.status, exc.comment)

    if uids["SOPInstanceUID"] != sop_instance_uid.strip("\x00 "):
        log.warning("C-STORE from %s: Affected SOP Instance UID differs from the data set's; "
                    "filing under the data set's %s", calling_ae, uids["SOPInstanceUID"])
    try:
        path, size, duplicate = _file_instance(spool_dir, uids, fragments, sop_class_uid, transfer_syntax, calling_ae)
    except DatasetRejected as exc:
        return StoreOutcome(exc.status, exc.comment)

    inst = StoredInstance(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=header.sop_class_uid or str(sop_class_uid),
        modality=header.modality,
        path=path,
        size=size,
        calling_ae=calling_ae,
        peer_address=peer_address,
        series_description=header.series_description,
        series_number=header.series_number,
        instance_number=header.instance_number,
        duplicate=duplicate,
    )
    return _record(sink, inst)


def _checked_dataset(
    fragments: Sequence[bytes | bytearray | memoryview], transfer_syntax: str, sop_class_uid: str,
    context_sop_class: str | None, max_dataset_bytes: int,
) -> tuple[ReceivedHeader, dict[str, str]]:
    """Every check a data set passes before a byte of it is filed; raises :class:`DatasetRejected`."""
    if sum(len(f) for f in fragments) > max_dataset_bytes:
        raise DatasetRejected(STATUS_TOO_LARGE, "Data set larger than the maximum size")
    try:
        header, facts = read_received_header(fragments, transfer_syntax, max_dataset_bytes=max_dataset_bytes)
    except DataSetTooLarge as exc:
        raise DatasetRejected(STATUS_TOO_LARGE, str(exc).capitalize()) from None
    except HeaderError as exc:
        reason = str(exc)
        raise DatasetRejected(STATUS_DECODE_FAILED, reason.capitalize() if reason.startswith("cannot")
                              else f"Malformed: {reason}") from None
    _check_sop_class(sop_class_uid, context_sop_class, header.sop_class_uid)
    _check_has_pixels(facts)
    uids = _checked_uids(header)
    _check_pixels_decodable(fragments, transfer_syntax, facts)
    return header, uids


def _file_instance(
    spool_dir: Path, uids: Mapping[str, str], fragments: Sequence[bytes | bytearray | memoryview],
    sop_class_uid: str, transfer_syntax: str, calling_ae: str,
) -> tuple[Path, int, bool]:
    """File the instance under its UIDs (once); returns path, size and whether it was there already."""
    path = spool.instance_path(
        spool_dir, uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]
    )
    if path.exists():
        return path, _check_same_content(path, fragments, calling_ae), True
    head = encode_file_head(sop_class_uid, uids["SOPInstanceUID"], transfer_syntax, calling_ae)
    return path, _write_spool_file(path, head, fragments, calling_ae), False


def _check_same_content(path: Path, fragments: Sequence[bytes | bytearray | memoryview], calling_ae: str) -> int:
    """A re-sent instance must match the filed one byte for byte; returns the file's size."""
    try:
        same = _same_content(path, fragments)
    except OSError:
        same = False
    if not same:
        log.warning("C-STORE of %s from %s refused: already stored with other content", path.stem, calling_ae)
        raise DatasetRejected(STATUS_CONFLICT, "SOP Instance UID already stored with other content")
    return path.stat().st_size


def _write_spool_file(path: Path, head: bytes, fragments: Sequence[bytes | bytearray | memoryview],
                      calling_ae: str) -> int:
    """Write file meta and data set durably (fsync file and folders); returns the size."""
    try:
        spool.durable_write(path, _writer(head, fragments))
    except OSError as exc:
        log.error("C-STORE of %s from %s: write failed (%s)", path.stem, calling_ae,
                  exc.strerror or type(exc).__name__)
        raise DatasetRejected(STATUS_WRITE_FAILED, "Out of resources: write failed") from None
    return len(head) + sum(len(f) for f in fragments)


def _safe_uid(uid: str) -> str:
    uid = uid.strip("\x00 ")
    return uid if spool.is_valid_uid(uid) else "(invalid UID)"


def _checked_uids(header: ReceivedHeader) -> dict[str, str]:
    uids = {
        "StudyInstanceUID": header.study_uid,
        "SeriesInstanceUID": header.series_uid,
        "SOPInstanceUID": header.sop_uid,
    }
    for keyword, value in uids.items():
        if not spool.is_valid_uid(value):
            state = "missing" if not value else "invalid"
            raise DatasetRejected(STATUS_BAD_UID, f"{keyword} {state}")
    return uids


def _record(sink: InstanceSink, inst: StoredInstance) -> StoreOutcome:
    """Record via the sink; a refusal removes a file this request wrote."""
    try:
        sink.record(inst)
        return StoreOutcome(STATUS_SUCCESS, "", inst)
    except InstanceConflict as exc:
        log.warning("C-STORE of %s from %s refused: %s", inst.sop_uid, inst.calling_ae, exc)
        outcome = StoreOutcome(STATUS_CONFLICT, str(exc)[:64])
    except Exception as exc:  # the sink's failure must never reach the peer as success
        log.error(
            "C-STORE of %s from %s: sink failed to record (%s)",
            inst.sop_uid,
            inst.calling_ae,
            type(exc).__name__,
        )
        outcome = StoreOutcome(STATUS_RECORD_FAILED, "Out of resources: could not record")
    if not inst.duplicate:
        try:
            _remove_durably(inst.path)
        except OSError:
            log.exception("Could not remove unrecorded spool file %s", inst.path)
    return outcome


def _leading_bytes(fragments: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """The data set as one bytes object (joined once when it came in fragments)."""
    if len(fragments) == 1 and isinstance(fragments[0], bytes):
        return fragments[0]
    return b"".join(fragments)


def _writer(head: bytes, fragments: Sequence[bytes | bytearray | memoryview]) -> Any:
    def write(fh: BinaryIO) -> None:
        fh.write(head)
        fh.writelines(fragments)

    return write



def _shut(assoc: Any) -> None:
    """Shut the socket of an association down (its reader wakes up and the association ends)."""
    raw = pynetdicom_compat.raw_socket(assoc)
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class StoreSCP:
    """Storage (and Verification) SCP writing into the spool.

    Parameters
    ----------
    config : ScpConfig
        Configuration.
    sink : InstanceSink
        Records each stored instance (thread-safe).
    observer : AssociationObserver or None
        Notified of accepted and rejected associations.

    Examples
    --------
    >>> scp = StoreSCP(ScpConfig(port=0, spool_dir=tmp), sink)  # doctest: +SKIP
    >>> scp.start(); port = scp.port; ...; scp.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: ScpConfig,
        sink: InstanceSink,
        observer: AssociationObserver | None = None,
    ) -> None:
        if not callable(getattr(sink, "record", None)):
            raise TypeError("sink must have a callable 'record(inst)' method")
        self.config = config
        self.sink = sink
        self.observer = observer
        self._server: Any = None
        self._lock = threading.Lock()
        self._spool_dir = Path(config.spool_dir)

    # -- lifecycle -------------------------------------------------------------------
    def _make_ae(self) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        ae.maximum_pdu_size = cfg.maximum_pdu_size
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def start(self) -> None:
        """Start listening (non-blocking); leftover ``*.tmp`` files are removed first.

        Raises
        ------
        RuntimeError
            If already started.
        OSError
            If the port cannot be bound or the spool cannot be created.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("StoreSCP already started")
            pynetdicom_compat.quiet_pynetdicom()
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            spool.remove_temp_files(self._spool_dir)
            ae = self._make_ae()
            handlers: list[Any] = [
                (evt.EVT_CONN_OPEN, self._on_conn_open),
                (evt.EVT_C_STORE, self._on_c_store),
                (evt.EVT_C_ECHO, _on_c_echo),
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_REJECTED, self._on_rejected),
            ]
            # TLS is negotiated in each connection's own thread (_on_conn_open), with a
            # deadline: pynetdicom would handshake in its accept loop, where one silent
            # client blocks every other connection.
            self._server = ae.start_server(
                (self.config.host, self.config.port),
                block=False,
                ssl_context=None,
                evt_handlers=handlers,
            )
            log.info(
                "Storage SCP %s listening on %s:%d (TLS %s)",
                self.config.ae_title,
                self.config.host,
                self.port,
                "on" if self.config.ssl_context else "off",
            )

    def stop(self) -> None:
        """Stop listening and close active associations (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        active = list(server.active_associations)
        server.shutdown()  # no new associations; closes the listening socket
        for assoc in active:
            # A C-STORE being handled completes (and is acknowledged or not) first.
            assoc.abort()
        for assoc in active:
            if assoc.is_established:
                assoc.join(timeout=self.config.dimse_timeout)
            # Still alive: blocked in a read - of a peer that connected and never asked for an
            # association (a port probe, a stalled peer), or mid-PDU. End it now rather than
            # at its ACSE or network deadline.
            if assoc.is_alive():
                _shut(assoc)
                assoc.join(timeout=5.0)
        # Clean up any temp file left by an association killed mid-write.
        spool.remove_temp_files(self._spool_dir)
        log.info("Storage SCP %s stopped", self.config.ae_title)

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the ephemeral one when it was 0)."""
        server = self._server
        if server is None:
            return self.config.port
        return int(server.server_address[1])

    @property
    def is_running(self) -> bool:
        """Whether the server is listening."""
        return self._server is not None

    def __enter__(self) -> StoreSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event handlers (thin) ------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        """Deadline for association setup, TLS in this thread, and the PDU read cap."""
        assoc = event.assoc
        peer = getattr(event, "address", None)
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
        pynetdicom_compat.set_deadline(assoc, self.config.acse_timeout)
        if self.config.ssl_context is not None:
            failure = pynetdicom_compat.tls_handshake(assoc, self.config.ssl_context, self.config.acse_timeout)
            if failure is not None:
                where = f"{address}:{peer[1]}" if isinstance(peer, tuple) and len(peer) > 1 else address
                log.warning("Connection from %s refused: %s", where, failure)
                self._notify_tls_refused(address, failure)
                return
        self._guard(assoc, address)

    def _guard(self, assoc: Any, address: str) -> None:
        cap = self.config.read_cap

        def refused(length: int) -> None:
            log.warning("Aborting association from %s: it announced a PDU of %d bytes (maximum %d)",
                           address, length, cap)

        pynetdicom_compat.guard_reads(assoc, cap, refused)

    def _on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        calling_ae = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        address = str(requestor.address)
        reason = self.config.caller_rejection(calling_ae, address)
        if reason is None:
            return
        log.warning("Rejecting association from %s at %s: %s", calling_ae, address, reason)
        # rejected-permanent, service-user, calling AE title not recognised
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        self._notify_rejected(calling_ae, address, reason)
        event.assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        requestor = assoc.requestor
        if self.config.low_latency:
            pynetdicom_compat.tune_association(assoc)
            self._guard(assoc, str(requestor.address))  # tuning replaced the guarded reader
        pynetdicom_compat.set_deadline(assoc, self.config.network_timeout)
        calling_ae = str(requestor.ae_title).strip()
        if self.config.fast_store:
            contexts = {int(cx.context_id or 0): str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            pynetdicom_compat.install_fast_store(
                assoc,
                STORAGE_SOP_CLASSES,
                self._fast_store_handler(calling_ae, str(requestor.address), contexts),
                max_dataset_bytes=self.config.max_dataset_bytes,
            )
        log.info("Association accepted from %s at %s", calling_ae, requestor.address)
        if self.observer is not None:
            try:
                self.observer.accepted(calling_ae, str(requestor.address))
            except Exception:
                log.exception("Association observer failed")

    def _on_rejected(self, event: evt.Event) -> None:
        # Rejections decided by pynetdicom itself (e.g. association limit reached).
        requestor = event.assoc.requestor
        primitive = event.assoc.acceptor.primitive
        diag = getattr(primitive, "diagnostic", None)
        reason = "association limit reached" if diag == 0x02 else f"rejected (diagnostic {diag})"
        calling_ae = str(requestor.ae_title).strip()
        log.warning("Association from %s at %s rejected: %s", calling_ae, requestor.address, reason)
        self._notify_rejected(calling_ae, str(requestor.address), reason)

    def _notify_tls_refused(self, address: str, reason: str) -> None:
        hook = getattr(self.observer, "tls_refused", None)
        if not callable(hook):
            self._notify_rejected("", address, reason)
            return
        try:
            hook(address, reason)
        except Exception:
            log.exception("Association observer failed")

    def _notify_rejected(self, calling_ae: str, address: str, reason: str) -> None:
        if self.observer is None:
            return
        try:
            self.observer.rejected(calling_ae, address, reason)
        except Exception:
            log.exception("Association observer failed")

    def _fast_store_handler(
        self, calling_ae: str, address: str, contexts: Mapping[int, str]
    ) -> Callable[[fast_store.StoreRequest, str, Sequence[memoryview]], tuple[int, str]]:
        def handle(
            request: fast_store.StoreRequest, transfer_syntax: str, fragments: Sequence[memoryview]
        ) -> tuple[int, str]:
            outcome = store_instance(
                dataset_bytes=fragments,
                transfer_syntax=transfer_syntax,
                sop_class_uid=request.sop_class_uid,
                sop_instance_uid=request.sop_instance_uid,
                spool_dir=self._spool_dir,
                min_free_bytes=self.config.min_free_bytes,
                sink=self.sink,
                calling_ae=calling_ae,
                peer_address=address,
                context_sop_class=contexts.get(request.context_id),
                max_dataset_bytes=self.config.max_dataset_bytes,
            )
            return outcome.status, outcome.comment[:64]

        return handle

    def _on_c_store(self, event: evt.Event) -> Dataset | int:
        requestor = event.assoc.requestor
        request = cast(C_STORE, event.request)
        outcome = store_instance(
            dataset_bytes=cast(BytesIO, request.DataSet).getvalue(),
            transfer_syntax=str(event.context.transfer_syntax),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            spool_dir=self._spool_dir,
            min_free_bytes=self.config.min_free_bytes,
            sink=self.sink,
            calling_ae=str(requestor.ae_title).strip(),
            peer_address=str(requestor.address),
            context_sop_class=str(event.context.abstract_syntax),
            max_dataset_bytes=self.config.max_dataset_bytes,
        )
        if outcome.status == STATUS_SUCCESS:
            return STATUS_SUCCESS
        status = Dataset()
        status.Status = outcome.status
        status.ErrorComment = outcome.comment[:64]
        return status


def _on_c_echo(event: evt.Event) -> int:
    # pynetdicom hands any request on the Verification context to this handler, a C-STORE
    # naming the Verification SOP Class included: only a real C-ECHO succeeds.
    if not isinstance(event.request, C_ECHO):
        log.warning("Refusing a %s on the Verification context", type(event.request).__name__)
        return STATUS_NOT_STORAGE
    return STATUS_SUCCESS
