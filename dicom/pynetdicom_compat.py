"""Everything the node does below pynetdicom's public API, in one place.

pynetdicom gives an acceptor association no deadline on a partly received PDU, reads a PDU
of any announced length, performs the TLS handshake in its accept loop with no timeout,
logs request identifiers (patient attributes) by default and polls with 1 ms sleeps. The
functions here fix that per association, from the SCP's ``EVT_CONN_OPEN`` and
``EVT_ACCEPTED`` handlers, and put C-STORE on the fast path of :mod:`dicom.fast_store`.
No other module of the node touches a private pynetdicom name.

Every name used is listed with where it was read in pynetdicom 3.0.4, the tested version
(``pyproject.toml`` pins ``>=3.0.4,<3.1``; a new minor release must be re-read against
this list):

* ``pynetdicom._config`` (documented, private module): ``LOG_HANDLER_LEVEL``,
  ``LOG_REQUEST_IDENTIFIERS``, ``LOG_RESPONSE_IDENTIFIERS`` (:func:`quiet_pynetdicom`);
* ``Association.dul``, ``Association.dimse``, ``Association.accepted_contexts``,
  ``Association.requestor.maximum_length`` (public);
* ``DULServiceProvider.socket`` (public, ``dul.py`` line 79): the
  :class:`pynetdicom.transport.AssociationSocket`; its ``socket`` attribute (public,
  ``transport.py`` line 346) is the raw :class:`socket.socket`; replacing it with a
  wrapped :class:`ssl.SSLSocket` is what pynetdicom's own requestor path does;
* ``AssociationSocket.recv`` (public, ``transport.py`` line 570): wrapped by
  :func:`guard_reads`, replaced by a ``recv_into`` reader in :func:`tune_association`;
* ``DULServiceProvider._read_pdu_data`` (private, ``dul.py`` line 245; calls
  ``recv(6)`` then ``recv(length)``), ``_decode_pdu`` (line 118), ``_recv_pdu`` (line 95),
  ``_run_loop_delay`` (line 107), ``_kill_thread`` (line 111), and the public
  ``event_queue``, ``to_provider_queue``, ``state_machine``, ``send_pdu``
  (:func:`install_fast_store`, :func:`tune_association`);
* ``DULServiceProvider.to_user_queue`` (public, ``dul.py`` line 92), read without
  taking items (:func:`unread_rejection`);
* ``DIMSEServiceProvider.get_msg``, ``send_msg``, ``msg_queue``, ``dimse_timeout``,
  ``maximum_pdu_size`` (``dimse.py`` lines 184-310), replaced per instance by
  :func:`tune_association`.

Every function declines (returns ``False`` or ``None``) when the objects are not as
expected, leaving the association as pynetdicom made it; the receive tests run with the
fast path on and off (``[dicom] fast_store``), so both paths stay correct.
"""
from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pynetdicom import _config
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dicom import fast_store

__all__ = [
    "A_ABORT_INVALID_PDU_PARAMETER",
    "DUL_POLL_INTERVAL_S",
    "FOLLOW_WAIT_S",
    "TLS_FAILURE_PREFIX",
    "describe_tls_failure",
    "encode_store_success_rsp",
    "guard_reads",
    "install_fast_store",
    "quiet_pynetdicom",
    "raw_socket",
    "set_deadline",
    "tls_handshake",
    "tune_association",
    "unread_rejection",
]

#: DIMSE status Success (PS3.7 C).
STATUS_SUCCESS = 0x0000

log = logging.getLogger(__name__)

#: A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8.
A_ABORT_INVALID_PDU_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"


def _association_socket(assoc: Any) -> Any:
    dul = getattr(assoc, "dul", None)
    return getattr(dul, "socket", None) if dul is not None else None


def raw_socket(assoc: Any) -> socket.socket | None:
    """The association's raw (or TLS-wrapped) socket, or ``None``."""
    sock = _association_socket(assoc)
    raw = getattr(sock, "socket", None) if sock is not None else None
    return raw if isinstance(raw, socket.socket) else None


def set_deadline(assoc: Any, seconds: float) -> bool:
    """Give every blocking read and write on the association's socket a deadline.

    An accepted socket inherits no timeout from pynetdicom's listening socket (Python makes
    it blocking), so a peer that stops in the middle of a PDU would hold its association
    thread and slot forever. With a deadline the read raises ``TimeoutError``, pynetdicom
    sees the transport close (Evt17) and the association ends.
    """
    raw = raw_socket(assoc)
    if raw is None:
        return False
    try:
        raw.settimeout(float(seconds))
    except OSError:
        return False
    return True


def guard_reads(assoc: Any, cap: int, on_refuse: Callable[[int], None] | None = None) -> bool:
    """Refuse any read longer than `cap` bytes: send an A-ABORT and close instead.

    pynetdicom (and a tuned reader) read a PDU by the length its header announces; a header
    announcing 4 GiB made the node allocate it. Called after any other replacement of
    ``recv`` (it wraps whatever ``recv`` the association socket has now).

    Parameters
    ----------
    assoc
        The association.
    cap
        Longest read allowed, in bytes.
    on_refuse
        Called with the announced length when a read is refused (for logging).
    """
    sock = _association_socket(assoc)
    inner = getattr(sock, "recv", None) if sock is not None else None
    if inner is None or not callable(inner):
        return False

    def recv(nr_bytes: int) -> Any:
        if nr_bytes > cap:
            if on_refuse is not None:
                on_refuse(nr_bytes)
            raw = raw_socket(assoc)
            if raw is not None:
                try:
                    raw.sendall(A_ABORT_INVALID_PDU_PARAMETER)
                except OSError:
                    pass
            raise OSError(f"peer announced a PDU of {nr_bytes} bytes, more than the maximum {cap}")
        return inner(nr_bytes)

    sock.recv = recv
    return True


#: Start of every reason :func:`tls_handshake` returns.
TLS_FAILURE_PREFIX = "TLS handshake failed: "

#: OpenSSL reason codes -> what an operator reads.
_TLS_REASONS: dict[str, str] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this node's certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused this node's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused this node's certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the peer refused this node's certificate",
    "WRONG_VERSION_NUMBER": "not a TLS connection (plain DICOM over TCP?)",
    "HTTP_REQUEST": "not a TLS connection (an HTTP request)",
    "UNKNOWN_PROTOCOL": "not a TLS connection",
    "UNSUPPORTED_PROTOCOL": "TLS version not allowed (TLS 1.2 or later required)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version not allowed (TLS 1.2 or later required)",
    "NO_PROTOCOLS_AVAILABLE": "TLS version not allowed (TLS 1.2 or later required)",
    "NO_SHARED_CIPHER": "no shared cipher suite",
    "UNEXPECTED_EOF_WHILE_READING": "connection closed during the handshake",
}


def describe_tls_failure(exc: BaseException) -> str:
    """Say in words why a TLS handshake failed.

    Parameters
    ----------
    exc : BaseException
        What ``do_handshake`` raised.

    Returns
    -------
    str
        ``"no client certificate"``, ``"certificate verify failed: <why>"``,
        ``"handshake timed out"``, ``"connection closed during the handshake"``, ... or
        OpenSSL's reason code when none of those applies. Never data from the peer
        beyond what OpenSSL reports about its certificate.
    """
    if isinstance(exc, TimeoutError | socket.timeout):
        return "handshake timed out"
    reason = str(getattr(exc, "reason", "") or "")
    if isinstance(exc, ssl.SSLCertVerificationError) or reason == "CERTIFICATE_VERIFY_FAILED":
        why = getattr(exc, "verify_message", "") or ""
        return f"certificate verify failed: {why}" if why else "certificate verify failed"
    if reason in _TLS_REASONS:
        return _TLS_REASONS[reason]
    if isinstance(exc, ssl.SSLEOFError | ConnectionError | ssl.SSLZeroReturnError):
        return "connection closed during the handshake"
    return reason or type(exc).__name__


def tls_handshake(assoc: Any, context: ssl.SSLContext, timeout: float) -> str | None:
    """Wrap the association's socket with TLS and complete the handshake within `timeout`.

    pynetdicom's server wraps (and handshakes) in its accept loop, where a client that
    never finishes the handshake blocks every other connection. The SCP starts its server
    without TLS and calls this from ``EVT_CONN_OPEN`` instead, in the connection's thread.

    Returns
    -------
    str or None
        ``None`` on success; otherwise why the handshake failed (the socket is then
        closed): :data:`TLS_FAILURE_PREFIX` followed by :func:`describe_tls_failure`.
    """
    sock = _association_socket(assoc)
    raw = raw_socket(assoc)
    if sock is None or raw is None:
        return "no socket"
    try:
        raw.settimeout(timeout)
        wrapped = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        wrapped.do_handshake()
    except (OSError, ssl.SSLError, ValueError) as exc:
        try:
            raw.close()
        except OSError:
            pass
        return TLS_FAILURE_PREFIX + describe_tls_failure(exc)
    sock.socket = wrapped
    return None


def unread_rejection(assoc: Any) -> Any | None:
    """Return an A-ASSOCIATE-RJ primitive pynetdicom received but never read.

    pynetdicom 3.0 races when a peer rejects and closes at once (DCMTK
    ``storescp --refuse`` does): the DUL thread queues the rejection and closes
    the socket, and the negotiating thread, seeing the closed socket first,
    reports an abort.  The rejection is still in the DUL's user queue.
    """
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    items = list(getattr(queue, "queue", ()))
    for item in items:
        if getattr(item, "result", None) in (0x01, 0x02) and hasattr(item, "result_source"):
            return item
    return None


def quiet_pynetdicom() -> None:
    """Switch off pynetdicom's identifier logging and keep its logger at WARNING.

    pynetdicom's standard handlers log request/response identifiers (which may contain
    patient attributes) at DEBUG/INFO; this node never enables them.
    """
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    pn_logger = logging.getLogger("pynetdicom")
    if pn_logger.getEffectiveLevel() < logging.WARNING:
        pn_logger.setLevel(logging.WARNING)


#: DUL reactor poll interval used by :func:`tune_association` (pynetdicom default 1 ms).
DUL_POLL_INTERVAL_S = 0.0002
#: How long the association reactor blocks waiting for a message (tuned mode).
_MSG_WAIT_S = 0.005


def tune_association(assoc: Any) -> bool:
    """Cut pynetdicom's per-message latency on an accepted association.

    pynetdicom polls: its DUL thread sleeps 1 ms whenever nothing is pending (so each
    response leaves, and each new request is noticed, up to 1 ms late), its association
    thread sleeps 1 ms between non-blocking checks for a decoded message, and it reads
    each PDU in 4 KiB ``recv`` calls. With a synchronous C-STORE peer these waits add up
    per instance; and it builds and encodes a pydicom data set (twice) for every
    response. This function, applied once per association, (1) makes the association
    thread wait on the message queue (woken as soon as a message is complete),
    (2) shortens the DUL poll interval, (3) reads whole PDUs with ``recv_into`` and
    (4) encodes plain C-STORE success responses directly
    (:func:`encode_store_success_rsp`; ``EVT_DIMSE_SENT`` is not triggered for those). It relies on pynetdicom internals and does nothing (returns
    ``False``) when they are not as expected.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        An acceptor association (called from its own thread before the reactor runs).

    Returns
    -------
    bool
        Whether the association was tuned.
    """
    try:
        dimse = assoc.dimse
        msg_queue = dimse.msg_queue
        dul = assoc.dul
        sock = dul.socket
        raw = sock.socket
        if not hasattr(dul, "_run_loop_delay") or raw is None:
            return False
    except AttributeError:
        return False

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        timeout = dimse.dimse_timeout if block else _MSG_WAIT_S
        try:
            return msg_queue.get(block=True, timeout=timeout)  # type: ignore[no-any-return]
        except queue.Empty:
            return None, None

    def recv(nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        nr_read = 0
        with memoryview(buf) as view:
            while nr_read < nr_bytes:
                n = raw.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not n:
                    break
                nr_read += n
        if nr_read < nr_bytes:
            del buf[nr_read:]
        return buf

    original_send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        encoded = encode_store_success_rsp(primitive)
        max_pdu = dimse.maximum_pdu_size
        if encoded is None or (max_pdu and len(encoded) + 7 > max_pdu):
            original_send(primitive, context_id)
            return
        pdata = P_DATA()
        # Control header 0x03: command, last fragment (PS3.8 E.2)
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
        dul.send_pdu(pdata)

    dimse.get_msg = get_msg
    dimse.send_msg = send_msg
    sock.recv = recv
    dul._run_loop_delay = DUL_POLL_INTERVAL_S
    return True


def encode_store_success_rsp(primitive: Any) -> bytes | None:
    """Encode the command set of a plain C-STORE-RSP with status Success.

    The same bytes pynetdicom produces (Implicit VR Little Endian, group 0000), without
    building and encoding a pydicom data set twice for every acknowledged instance.

    Parameters
    ----------
    primitive : pynetdicom.dimse_primitives.C_STORE
        The response primitive.

    Returns
    -------
    bytes or None
        The encoded command set, or ``None`` when `primitive` is not a success C-STORE
        response without optional elements (the caller then uses pynetdicom's encoder).
    """
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status != STATUS_SUCCESS:
        return None
    for optional in ("ErrorComment", "OffendingElement", "ErrorID"):
        if getattr(primitive, optional, None) is not None:
            return None
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if not sop_class or not sop_instance:
        return None
    return fast_store.encode_c_store_rsp(
        primitive.MessageIDBeingRespondedTo, str(sop_class), str(sop_instance), STATUS_SUCCESS
    )


#: How long the fast reader waits for the peer's next PDU before handing control back to
#: pynetdicom's reactor (which then polls); bounds how late a locally queued primitive
#: (an abort from :meth:`StoreSCP.stop`) is sent.
FOLLOW_WAIT_S = 0.005


def _readable(sock: Any, timeout: float) -> bool:
    raw = sock.socket
    if raw is None:
        return False
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return True
    try:
        ready, _, _ = select.select([raw], [], [], timeout)
    except (OSError, ValueError):
        return False
    return bool(ready)


def install_fast_store(
    assoc: Any,
    storage_sop_classes: Iterable[str],
    store: Callable[[fast_store.StoreRequest, str, Sequence[memoryview]], tuple[int, str]],
    max_dataset_bytes: int = 0,
) -> fast_store.StoreAssembler | None:
    """Put an accepted pynetdicom association's C-STOREs on the fast path.

    Replaces the association's DUL ``_read_pdu_data`` with a reader that feeds P-DATA-TF
    PDUs (in state Sta6, data transfer) to a :class:`dicom.fast_store.StoreAssembler` and passes everything
    else, and every item the assembler does not consume, on to pynetdicom exactly as its
    own reader would.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        An accepted acceptor association (from its ``EVT_ACCEPTED`` handler).
    storage_sop_classes : iterable of str
        SOP classes whose accepted contexts take the fast path.
    store : callable
        ``store(request, transfer_syntax, fragments) -> (status, comment)``; runs in the
        association's DUL thread.
    max_dataset_bytes : int
        A C-STORE data set growing past this aborts the association (``0``: no cap).

    Returns
    -------
    dicom.fast_store.StoreAssembler or None
        The installed assembler, or ``None`` when pynetdicom's internals are not as
        expected (the association then stays on pynetdicom's path).
    """
    try:
        dul = assoc.dul
        sock = dul.socket
        original = dul._read_pdu_data
        for name in ("event_queue", "_recv_pdu", "to_provider_queue", "_decode_pdu", "state_machine", "_kill_thread"):
            getattr(dul, name)
        contexts = assoc.accepted_contexts
        peer_max_pdu = int(assoc.requestor.maximum_length or 0)
    except AttributeError:
        return None
    if sock is None or not callable(original):
        return None
    classes = set(storage_sop_classes)
    syntaxes: dict[int, str] = {
        int(cx.context_id): str(cx.transfer_syntax[0])
        for cx in contexts
        if str(cx.abstract_syntax) in classes and cx.transfer_syntax
    }
    if not syntaxes:
        return None

    def store_request(request: fast_store.StoreRequest, fragments: Sequence[memoryview]) -> tuple[int, str]:
        return store(request, syntaxes[request.context_id], fragments)

    assembler = fast_store.StoreAssembler(syntaxes, store_request, sock.send, peer_max_pdu,
                                          max_dataset_bytes=max_dataset_bytes)
    dul._read_pdu_data = _FastReader(dul, assembler, original)
    return assembler


#: PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ .. A-ABORT).
_PDU_TYPES = frozenset(range(0x01, 0x08))


class _FastReader:
    """The replacement of one association's ``DULServiceProvider._read_pdu_data``.

    In data transfer (state Sta6) it reads whole PDUs, feeds P-DATA-TF PDUs to the
    assembler and hands pynetdicom what the assembler passes through, and every other PDU,
    exactly as pynetdicom's reader would: a decoded PDU on ``_recv_pdu`` and its event on
    ``event_queue`` (Evt17 for a closed or short read, Evt19 for an invalid PDU).
    """

    def __init__(self, dul: Any, assembler: fast_store.StoreAssembler, original: Callable[[], None]) -> None:
        self._dul = dul
        self._sock = dul.socket
        self._assembler = assembler
        self._original = original

    def __call__(self) -> None:
        dul = self._dul
        if dul.state_machine.current_state != "Sta6":
            self._original()
            return
        # Keep reading while the peer streams: returning to pynetdicom's reactor after a
        # PDU that produced no event makes it sleep one poll interval, per PDU.
        while self._read_one():
            if dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize():
                return
            if not _readable(self._sock, FOLLOW_WAIT_S):
                return

    def _event(self, event: str) -> bool:
        self._dul.event_queue.put(event)
        return False

    def _read_pdu(self) -> tuple[bytes, int, bytes] | None:
        """Header, type and body of the next PDU; ``None`` after queueing Evt17/Evt19."""
        try:
            header = bytes(self._sock.recv(6))
            if len(header) != 6:
                self._event("Evt17")
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                log.error("Unknown PDU type received 0x%02X", pdu_type)
                self._event("Evt19")
                return None
            body = self._sock.recv(length)
        except (OSError, TimeoutError):
            log.warning("Connection closed before the entire PDU was received")
            self._event("Evt17")
            return None
        if len(body) != length:
            log.warning("Received PDU shorter than announced (%d of %d bytes)", len(body), length)
            self._event("Evt17")
            return None
        return header, pdu_type, body

    def _read_one(self) -> bool:
        """Read one PDU; ``True`` if the fast path consumed all of it."""
        pdu = self._read_pdu()
        if pdu is None:
            return False
        header, pdu_type, body = pdu
        if pdu_type != fast_store.P_DATA_TF:
            return self._hand_over(header + bytes(body))
        try:
            passed = self._assembler.feed(memoryview(body))
        except fast_store.FastStoreError as exc:
            log.error("Invalid P-DATA-TF PDU received: %s", exc)
            return self._event("Evt19")
        if not passed:
            return True
        return self._hand_over(fast_store.encode_p_data_tf(passed))

    def _hand_over(self, raw: bytes) -> bool:
        """Give pynetdicom a PDU to handle (decoded, with its event); always ``False``."""
        try:
            pdu, event = self._dul._decode_pdu(bytearray(raw))
        except Exception:
            log.exception("Unable to decode the received PDU")
            return self._event("Evt19")
        self._dul.event_queue.put(event)
        self._dul._recv_pdu.put(pdu)
        return False
