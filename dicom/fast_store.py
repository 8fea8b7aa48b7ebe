"""C-STORE fast path: storage requests handled directly on received P-DATA-TF PDUs.

pynetdicom turns every received P-DATA-TF PDU into a PDU object, a primitive, a state
machine event and a DIMSE message; it decodes each command set with pydicom, dispatches
an event to a handler in another thread and encodes the response through pydicom again.
For a synchronous storage peer that per-message work costs several times what writing the
instance does. This module handles the one message the node receives in bulk, C-STORE-RQ,
below that layer:

* :func:`split_pdvs` parses the presentation data value items of one PDU;
* :class:`StoreAssembler` follows the DIMSE message boundaries (PS3.8 E.2 message control
  header) and collects the data set fragments of a C-STORE-RQ received on a storage
  context, zero-copy, as views of the received PDUs;
* a complete request is handed to a callback, which returns the DIMSE status; the
  C-STORE-RSP is encoded directly (:func:`encode_c_store_rsp`) and sent as one PDU.

Every other message (C-ECHO, a request with an unexpected command set, a message on a
non-storage context) and every other PDU (release, abort) is passed through to pynetdicom
unchanged, in order. :func:`dicom.pynetdicom_compat.install_fast_store` hooks the assembler into an accepted
pynetdicom association (this module itself never touches pynetdicom).

What the fast path does not do: it does not trigger pynetdicom's ``EVT_DATA_RECV``,
``EVT_PDU_RECV``, ``EVT_DIMSE_RECV`` or ``EVT_C_STORE`` events for the messages it handles
(the node's SCP calls the same storing function from both paths).
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from dicom.values import pad_even

__all__ = [
    "FastStoreError",
    "StoreAssembler",
    "StoreRequest",
    "decode_command_set",
    "encode_c_store_rsp",
    "encode_command_pdus",
    "encode_p_data_tf",
    "parse_store_request",
    "split_pdvs",
]

log = logging.getLogger(__name__)

#: PDU type of P-DATA-TF (PS3.8 9.3.5).
P_DATA_TF = 0x04
#: Message control header bits (PS3.8 E.2).
_CTRL_COMMAND = 0x01
_CTRL_LAST = 0x02

#: Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
#: Command Data Set Type meaning "no data set".
NO_DATA_SET = 0x0101

# Command set element numbers (group 0000).
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000


class FastStoreError(ValueError):
    """A received PDU or command set is malformed (the association should be aborted)."""


PresentationDataValue = tuple[int, int, memoryview]


def split_pdvs(body: memoryview) -> list[PresentationDataValue]:
    """Split the variable field of a P-DATA-TF PDU into its PDV items.

    Parameters
    ----------
    body : memoryview
        The PDU without its 6-byte header.

    Returns
    -------
    list of (int, int, memoryview)
        Presentation context ID, message control header and the fragment (a view of
        `body`) of each item, in order.

    Raises
    ------
    FastStoreError
        If an item's length is inconsistent with the PDU.
    """
    items: list[PresentationDataValue] = []
    offset, size = 0, len(body)
    while offset < size:
        if size - offset < 6:
            raise FastStoreError(f"P-DATA-TF: {size - offset} trailing bytes are not a PDV item")
        (length,) = struct.unpack_from(">L", body, offset)
        end = offset + 4 + length
        if length < 2 or end > size:
            raise FastStoreError(f"P-DATA-TF: PDV item length {length} does not fit the PDU")
        items.append((body[offset + 4], body[offset + 5], body[offset + 6 : end]))
        offset = end
    return items


def encode_p_data_tf(items: Iterable[tuple[int, int, bytes | bytearray | memoryview]]) -> bytes:
    """Encode PDV items as one P-DATA-TF PDU.

    Parameters
    ----------
    items : iterable of (int, int, bytes-like)
        Presentation context ID, message control header and fragment of each item.

    Returns
    -------
    bytes
        The encoded PDU.
    """
    parts: list[bytes | bytearray | memoryview] = []
    for context_id, control, data in items:
        parts.append(struct.pack(">LBB", len(data) + 2, context_id, control))
        parts.append(data)
    body = b"".join(parts)
    return struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body


def decode_command_set(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Decode a DIMSE command set (Implicit VR Little Endian, group 0000).

    Parameters
    ----------
    data : bytes-like
        The encoded command set.

    Returns
    -------
    dict of int to bytes
        Element number -> raw value.

    Raises
    ------
    FastStoreError
        If an element is not in group 0000 or overruns the data.
    """
    elements: dict[int, bytes] = {}
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < 8:
            raise FastStoreError("command set: truncated element header")
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > size:
            raise FastStoreError(f"command set: bad element ({group:04X},{element:04X})")
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    return elements


def _us(elements: Mapping[int, bytes], element: int) -> int | None:
    raw = elements.get(element)
    if raw is None or len(raw) != 2:
        return None
    return int(struct.unpack("<H", raw)[0])


def _ui(elements: Mapping[int, bytes], element: int) -> str:
    raw = elements.get(element)
    if raw is None:
        return ""
    return raw.decode("ascii", "replace").strip("\x00 ")


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ command set as far as the fast path needs it.

    Attributes
    ----------
    context_id : int
        Presentation context the request came on.
    message_id : int
        Message ID (answered in Message ID Being Responded To).
    sop_class_uid, sop_instance_uid : str
        Affected SOP Class/Instance UID.
    """

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def parse_store_request(context_id: int, elements: Mapping[int, bytes]) -> StoreRequest | None:
    """Return the C-STORE-RQ in `elements`, or ``None`` if it is anything else.

    Parameters
    ----------
    context_id : int
        Presentation context ID of the message.
    elements : Mapping[int, bytes]
        Decoded command set (:func:`decode_command_set`).

    Returns
    -------
    StoreRequest or None
        ``None`` for other commands, and for a C-STORE-RQ without a data set or without
        a Message ID or an Affected SOP Class/Instance UID (pynetdicom then answers it).
    """
    if _us(elements, _COMMAND_FIELD) != C_STORE_RQ:
        return None
    data_set_type = _us(elements, _DATA_SET_TYPE)
    message_id = _us(elements, _MESSAGE_ID)
    sop_class = _ui(elements, _AFFECTED_SOP_CLASS)
    sop_instance = _ui(elements, _AFFECTED_SOP_INSTANCE)
    if data_set_type in (None, NO_DATA_SET) or message_id is None:
        return None
    if not sop_class or not sop_instance:
        return None
    return StoreRequest(context_id, message_id, sop_class, sop_instance)


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def encode_c_store_rsp(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, comment: str = ""
) -> bytes:
    """Encode the command set of a C-STORE-RSP (Implicit VR Little Endian).

    Byte for byte what pynetdicom encodes for the same response.

    Parameters
    ----------
    message_id : int
        Message ID of the request.
    sop_class_uid, sop_instance_uid : str
        Affected SOP Class/Instance UID of the request.
    status : int
        DIMSE status.
    comment : str
        Error Comment (0000,0902), at most 64 characters; omitted when empty.

    Returns
    -------
    bytes
        The encoded command set including its group length.
    """
    parts = [
        _implicit(_AFFECTED_SOP_CLASS, pad_even(sop_class_uid, b"\x00")),
        _implicit(_COMMAND_FIELD, struct.pack("<H", C_STORE_RSP)),
        _implicit(_MESSAGE_ID_RESPONDED, struct.pack("<H", message_id)),
        _implicit(_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _implicit(_STATUS, struct.pack("<H", status)),
    ]
    if comment:
        parts.append(_implicit(_ERROR_COMMENT, pad_even(comment[:64], b" ")))
    parts.append(_implicit(_AFFECTED_SOP_INSTANCE, pad_even(sop_instance_uid, b"\x00")))
    body = b"".join(parts)
    return _implicit(_GROUP_LENGTH, struct.pack("<L", len(body))) + body


def encode_command_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """Encode a command set (no data set follows) as P-DATA-TF PDUs.

    Parameters
    ----------
    context_id : int
        Presentation context ID.
    command : bytes
        Encoded command set.
    max_pdu : int
        The peer's maximum PDU length (variable field); ``0`` means unlimited.

    Returns
    -------
    bytes
        One or more encoded PDUs, concatenated.
    """
    chunk = len(command) if not max_pdu else max(1, max_pdu - 6)
    pdus = []
    for start in range(0, len(command), chunk):
        last = start + chunk >= len(command)
        control = _CTRL_COMMAND | (_CTRL_LAST if last else 0)
        pdus.append(encode_p_data_tf([(context_id, control, command[start : start + chunk])]))
    return b"".join(pdus)


#: Callback storing one complete request: (request, data set fragments) -> (status, comment).
StoreCallback = Callable[[StoreRequest, Sequence[memoryview]], tuple[int, str]]


class StoreAssembler:
    """Follows DIMSE message boundaries and completes C-STORE-RQs on storage contexts.

    Parameters
    ----------
    storage_contexts : Mapping[int, str]
        Accepted presentation context IDs of storage SOP classes -> transfer syntax.
    store : callable
        Called with each complete request and its data set fragments; returns the DIMSE
        status and error comment. Exceptions are answered with ``failure_status``.
    send : callable
        Sends encoded PDUs to the peer.
    max_pdu : int
        The peer's maximum PDU length (``0`` = unlimited).
    failure_status : int
        Status answered when `store` raises (default ``0x0110``, processing failure).
    max_dataset_bytes : int
        A data set growing past this many bytes raises :class:`FastStoreError` from
        :meth:`feed` (the caller aborts the association; memory stays bounded). ``0``: no cap.

    Notes
    -----
    :meth:`feed` returns the PDV items that belong to messages the fast path does not
    handle; the caller passes them to pynetdicom in the same order.
    """

    def __init__(
        self,
        storage_contexts: Mapping[int, str],
        store: StoreCallback,
        send: Callable[[bytes], None],
        max_pdu: int = 0,
        failure_status: int = 0x0110,
        max_dataset_bytes: int = 0,
    ) -> None:
        self._contexts = dict(storage_contexts)
        self._store = store
        self._send = send
        self._max_pdu = max_pdu
        self._failure_status = failure_status
        self._max_dataset = int(max_dataset_bytes)
        self._collected = 0
        self._state = "idle"  # idle | command | fast-data | pass-data
        self._command_context = -1
        self._command = bytearray()
        self._held: list[PresentationDataValue] = []
        self._request: StoreRequest | None = None
        self._fragments: list[memoryview] = []
        #: Number of requests completed on the fast path.
        self.handled = 0

    @property
    def in_message(self) -> bool:
        """Whether a message is partly received."""
        return self._state != "idle"

    def feed(self, body: memoryview) -> list[PresentationDataValue]:
        """Process the variable field of one received P-DATA-TF PDU.

        Parameters
        ----------
        body : memoryview
            The PDU without its 6-byte header (kept referenced while a data set is being
            collected; the caller must not reuse the buffer).

        Returns
        -------
        list of (int, int, memoryview)
            PDV items to pass through to pynetdicom, in order (empty when the fast path
            consumed the whole PDU).

        Raises
        ------
        FastStoreError
            If the PDU's items are malformed.
        """
        passed: list[PresentationDataValue] = []
        for item in split_pdvs(body):
            self._item(item, passed)
        return passed

    def _item(self, item: PresentationDataValue, passed: list[PresentationDataValue]) -> None:
        context_id, control, data = item
        is_command = bool(control & _CTRL_COMMAND)
        is_last = bool(control & _CTRL_LAST)
        state = self._state
        if state == "fast-data":
            if is_command or context_id != self._command_context:
                # Protocol violation: a new message before the data set ended. Drop the
                # partial instance (nothing was written) and let pynetdicom judge the rest.
                log.warning(
                    "C-STORE data set interrupted by another message; partial instance dropped"
                )
                self._reset()
                self._item(item, passed)
                return
            self._fragments.append(data)
            self._collected += len(data)
            if self._max_dataset and self._collected > self._max_dataset:
                uid = self._request.sop_instance_uid if self._request else "?"
                self._reset()
                raise FastStoreError(f"C-STORE of {uid}: data set larger than the maximum of "
                                     f"{self._max_dataset} bytes")
            if is_last:
                self._complete()
            return
        if state == "pass-data":
            passed.append(item)
            if not is_command and is_last:
                self._state = "idle"
            return
        if not is_command:
            # A data fragment with no command before it: pynetdicom's business.
            passed.append(item)
            return
        if state == "command" and context_id != self._command_context:
            passed.extend(self._held)
            self._reset()
        self._state = "command"
        self._command_context = context_id
        self._command += data
        self._held.append(item)
        if is_last:
            self._command_done(passed)

    def _command_done(self, passed: list[PresentationDataValue]) -> None:
        context_id = self._command_context
        try:
            elements = decode_command_set(self._command)
        except FastStoreError:
            elements = {}
        request = None
        if context_id in self._contexts:
            request = parse_store_request(context_id, elements)
        if request is not None:
            self._request = request
            self._state = "fast-data"
            self._held = []
            self._command = bytearray()
            return
        passed.extend(self._held)
        has_data = _us(elements, _DATA_SET_TYPE) not in (None, NO_DATA_SET)
        self._reset()
        if has_data:
            self._state = "pass-data"

    def _complete(self) -> None:
        request = self._request
        fragments = self._fragments
        self._reset()
        if request is None:  # pragma: no cover - guarded by the state machine
            return
        try:
            status, comment = self._store(request, fragments)
        except Exception:
            log.exception("C-STORE of %s: storing failed", request.sop_instance_uid)
            status, comment = self._failure_status, "Processing failure"
        command = encode_c_store_rsp(
            request.message_id, request.sop_class_uid, request.sop_instance_uid, status, comment
        )
        self._send(encode_command_pdus(request.context_id, command, self._max_pdu))
        self.handled += 1

    def _reset(self) -> None:
        self._state = "idle"
        self._collected = 0
        self._command_context = -1
        self._command = bytearray()
        self._held = []
        self._request = None
        self._fragments = []
