"""Unit tests for dicom.fast_store (pure: PDUs built in memory, pynetdicom as the reference)."""
from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from dicom.fast_store import (
    FastStoreError,
    StoreAssembler,
    StoreRequest,
    decode_command_set,
    encode_c_store_rsp,
    encode_command_pdus,
    encode_p_data_tf,
    parse_store_request,
    split_pdvs,
)

VERIFICATION = "1.2.840.10008.1.1"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Presentation contexts used below: 1 verification, 3 CT storage, 5 MR (not a storage
#: context of the assembler under test), 7 CT storage.
STORAGE_CONTEXTS = {3: "1.2.840.10008.1.2.1", 7: "1.2.840.10008.1.2"}
SOP_UID = "1.2.826.0.1.3680043.10.1234.99.5"  # even length
SOP_UID_ODD = "1.2.826.0.1.3680043.10.1234.99.55"  # odd length (padded)


# -- helpers -----------------------------------------------------------------------------


def store_rq(
    message_id: int, sop_uid: str = SOP_UID, sop_class: str = CTImageStorage, data: bytes = b""
) -> C_STORE_RQ:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 0x0000
    primitive.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    return msg


def echo_rq(message_id: int) -> C_ECHO_RQ:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    msg = C_ECHO_RQ()
    msg.primitive_to_message(primitive)
    return msg


def command_bytes(msg: DIMSEMessage) -> bytes:
    return bytes(encode(msg.command_set, True, True))


def pynetdicom_pdus(msg: DIMSEMessage, context_id: int, max_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs pynetdicom sends for `msg` (one PDV per PDU)."""
    out = []
    for pdata in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        out.append(bytes(pdu.encode()))
    return out


def body(pdu: bytes) -> memoryview:
    """The variable field of one PDU (as the DUL reader hands it to the assembler)."""
    pdu_type, _, length = struct.unpack_from(">BBL", pdu)
    assert pdu_type == 0x04 and length == len(pdu) - 6
    return memoryview(bytearray(pdu))[6:]


def split_stream(stream: bytes) -> list[bytes]:
    """Split concatenated PDUs."""
    pdus, offset = [], 0
    while offset < len(stream):
        (length,) = struct.unpack_from(">L", stream, offset + 2)
        pdus.append(stream[offset : offset + 6 + length])
        offset += 6 + length
    return pdus


def dataset_bytes(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


def items_as_bytes(items: list[tuple[int, int, memoryview]]) -> list[tuple[int, int, bytes]]:
    return [(ctx, ctrl, bytes(data)) for ctx, ctrl, data in items]


class Recorder:
    """Recording store callback."""

    def __init__(self, status: int = 0x0000, comment: str = "", exc: Exception | None = None) -> None:
        self.status = status
        self.comment = comment
        self.exc = exc
        self.calls: list[tuple[StoreRequest, bytes, int]] = []

    def __call__(self, request: StoreRequest, fragments: Any) -> tuple[int, str]:
        assert all(isinstance(f, memoryview) for f in fragments)
        self.calls.append((request, b"".join(bytes(f) for f in fragments), len(fragments)))
        if self.exc is not None:
            raise self.exc
        return self.status, self.comment


def make_assembler(recorder: Recorder, max_pdu: int = 0) -> tuple[StoreAssembler, list[bytes]]:
    sent: list[bytes] = []
    return StoreAssembler(STORAGE_CONTEXTS, recorder, sent.append, max_pdu), sent


def decode_responses(sent: list[bytes]) -> list[tuple[int, dict[int, bytes], Any]]:
    """Decode every command sent: (context, raw elements, pynetdicom-decoded data set).

    Checks the message control headers: command bit on every fragment, last bit only on
    the last fragment of each command.
    """
    out = []
    fragments: list[bytes] = []
    context = None
    for pdu in split_stream(b"".join(sent)):
        for ctx, ctrl, data in split_pdvs(body(pdu)):
            assert ctrl & 0x01, "response fragments are command fragments"
            assert ctrl & ~0x03 == 0
            assert context in (None, ctx)
            context = ctx
            fragments.append(bytes(data))
            if ctrl & 0x02:
                command = b"".join(fragments)
                out.append((ctx, decode_command_set(command), decode(BytesIO(command), True, True)))
                fragments, context = [], None
    assert not fragments, "a command was left without its last fragment"
    return out


def assert_store_rsp(
    response: tuple[int, dict[int, bytes], Any],
    *,
    context_id: int,
    message_id: int,
    status: int,
    comment: str | None = None,
    sop_uid: str = SOP_UID,
) -> None:
    ctx, elements, ds = response
    assert ctx == context_id
    assert struct.unpack("<H", elements[0x0100])[0] == 0x8001
    assert struct.unpack("<H", elements[0x0120])[0] == message_id
    assert struct.unpack("<H", elements[0x0900])[0] == status
    assert struct.unpack("<H", elements[0x0800])[0] == 0x0101
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == message_id
    assert ds.Status == status
    assert ds.AffectedSOPInstanceUID == sop_uid
    assert ds.AffectedSOPClassUID == CTImageStorage
    if comment is None:
        assert 0x0902 not in elements
    else:
        assert ds.ErrorComment == comment


# -- split_pdvs / encode_p_data_tf -------------------------------------------------------


def test_p_data_tf_round_trip() -> None:
    items = [(1, 0x03, b"\x01" * 12), (3, 0x00, b""), (3, 0x02, dataset_bytes(70001)), (255, 0x01, b"x")]
    pdu = encode_p_data_tf(items)
    assert pdu[0] == 0x04 and pdu[1] == 0x00
    assert struct.unpack_from(">L", pdu, 2)[0] == len(pdu) - 6 == sum(6 + len(d) for *_, d in items)
    view = body(pdu)
    got = split_pdvs(view)
    assert items_as_bytes(got) == items
    # Fragments are zero-copy views of the PDU.
    assert all(isinstance(d, memoryview) and d.obj is view.obj for *_, d in got)
    # Memoryview and bytearray fragments encode the same.
    assert encode_p_data_tf((c, m, memoryview(bytearray(d))) for c, m, d in items) == pdu
    assert split_pdvs(memoryview(b"")) == []


def test_p_data_tf_matches_pynetdicom() -> None:
    items = [(1, 0x03, b"\x01\x02\x03\x04"), (1, 0x02, dataset_bytes(513))]
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[ctx, bytes([ctrl]) + data] for ctx, ctrl, data in items]
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    assert encode_p_data_tf(items) == bytes(pdu.encode())


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00",  # fewer than 6 bytes left
        b"\x00\x00\x00\x02\x01\x03\x00",  # 1 trailing byte after a valid empty item
        b"\x00\x00\x00\x01\x01\x03",  # item length 1 < 2
        b"\x00\x00\x00\x00\x01\x03",  # item length 0
        b"\x00\x00\x00\x09\x01\x03abc",  # item length beyond the PDU
        b"\xff\xff\xff\xff\x01\x03abcdef",  # absurd length
    ],
)
def test_split_pdvs_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(FastStoreError):
        split_pdvs(memoryview(raw))
    # The assembler propagates the error (the reader aborts the association).
    assembler, sent = make_assembler(Recorder())
    with pytest.raises(FastStoreError):
        assembler.feed(memoryview(raw))
    assert sent == []


# -- command sets --------------------------------------------------------------------------


def test_decode_command_set_of_pynetdicom_store_rq() -> None:
    cmd = command_bytes(store_rq(0x1234, SOP_UID_ODD))
    elements = decode_command_set(cmd)
    assert struct.unpack("<L", elements[0x0000])[0] == len(cmd) - 12
    assert struct.unpack("<H", elements[0x0100])[0] == 0x0001
    assert struct.unpack("<H", elements[0x0110])[0] == 0x1234
    assert struct.unpack("<H", elements[0x0700])[0] == 0x0000
    assert struct.unpack("<H", elements[0x0800])[0] != 0x0101
    assert elements[0x0002] == CTImageStorage.encode() + b"\x00" * (len(CTImageStorage) % 2)
    assert elements[0x1000] == SOP_UID_ODD.encode() + b"\x00"
    # memoryview input, and the request it describes.
    assert decode_command_set(memoryview(cmd)) == elements
    assert parse_store_request(3, elements) == StoreRequest(3, 0x1234, CTImageStorage, SOP_UID_ODD)


def test_decode_command_set_rejects_malformed() -> None:
    cmd = command_bytes(store_rq(1))
    with pytest.raises(FastStoreError, match="truncated"):
        decode_command_set(cmd + b"\x00\x00\x00")
    with pytest.raises(FastStoreError, match="bad element"):
        decode_command_set(cmd[:-3])  # the last value overruns
    with pytest.raises(FastStoreError, match="bad element"):
        decode_command_set(struct.pack("<HHL", 0x0008, 0x0018, 2) + b"1\x00")
    assert decode_command_set(b"") == {}


def test_parse_store_request_declines_other_messages() -> None:
    assert parse_store_request(1, decode_command_set(command_bytes(echo_rq(3)))) is None
    base = decode_command_set(command_bytes(store_rq(9)))
    assert parse_store_request(3, base) == StoreRequest(3, 9, CTImageStorage, SOP_UID)
    for missing in (0x0100, 0x0110, 0x0800, 0x0002, 0x1000):
        elements = dict(base)
        del elements[missing]
        assert parse_store_request(3, elements) is None, hex(missing)
    no_data = dict(base)
    no_data[0x0800] = struct.pack("<H", 0x0101)
    assert parse_store_request(3, no_data) is None
    rsp = dict(base)
    rsp[0x0100] = struct.pack("<H", 0x8001)
    assert parse_store_request(3, rsp) is None
    bad_id = dict(base)
    bad_id[0x0110] = b"\x01"
    assert parse_store_request(3, bad_id) is None


@pytest.mark.parametrize(
    ("message_id", "sop_uid", "status", "comment"),
    [
        (1, SOP_UID, 0x0000, ""),
        (65535, SOP_UID_ODD, 0x0000, ""),
        (7, SOP_UID, 0xC210, "StudyInstanceUID invalid"),
        (8, SOP_UID_ODD, 0xA700, "Out of resources: disk reserve reached"),
        (9, SOP_UID, 0x0110, "Processing failure"),  # odd length comment: space padded
        (10, SOP_UID, 0xB000, "W"),
    ],
)
def test_encode_c_store_rsp_matches_pynetdicom(message_id: int, sop_uid: str, status: int, comment: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    expected = bytes(encode(msg.command_set, True, True))
    assert encode_c_store_rsp(message_id, CTImageStorage, sop_uid, status, comment) == expected
    # ... and the PDUs too, at any peer maximum PDU length.
    for max_pdu in (0, 16, 23, 64, 16384):
        assert encode_command_pdus(1, expected, max_pdu) == b"".join(pynetdicom_pdus(msg, 1, max_pdu))


def test_encode_c_store_rsp_truncates_long_comment() -> None:
    got = decode_command_set(encode_c_store_rsp(1, CTImageStorage, SOP_UID, 0xA701, "y" * 100))
    assert got[0x0902] == b"y" * 64


@pytest.mark.parametrize("max_pdu", [0, 7, 16, 50, 100, 4096])
def test_encode_command_pdus_fragments(max_pdu: int) -> None:
    command = encode_c_store_rsp(3, CTImageStorage, SOP_UID_ODD, 0xC210, "StudyInstanceUID invalid")
    stream = encode_command_pdus(5, command, max_pdu)
    pdus = split_stream(stream)
    if max_pdu == 0 or max_pdu - 6 >= len(command):
        assert len(pdus) == 1
    else:
        assert len(pdus) == -(-len(command) // (max_pdu - 6))
    fragments = []
    for k, pdu in enumerate(pdus):
        if max_pdu:
            assert len(pdu) - 6 <= max_pdu  # the peer's limit is on the variable field
        items = split_pdvs(body(pdu))
        assert len(items) == 1
        ctx, ctrl, data = items[0]
        assert ctx == 5
        assert len(data) > 0
        last = k == len(pdus) - 1
        assert ctrl == (0x03 if last else 0x01)
        fragments.append(bytes(data))
    assert b"".join(fragments) == command


# -- StoreAssembler ----------------------------------------------------------------------


def test_command_and_data_set_in_one_pdu() -> None:
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    data = dataset_bytes(300)
    pdu = encode_p_data_tf([(3, 0x03, command_bytes(store_rq(11, data=data))), (3, 0x02, data)])
    assert assembler.feed(body(pdu)) == []
    assert len(recorder.calls) == 1
    request, got, n = recorder.calls[0]
    assert request == StoreRequest(3, 11, CTImageStorage, SOP_UID)
    assert got == data and n == 1
    assert assembler.handled == 1
    assert not assembler.in_message
    assert len(sent) == 1
    (response,) = decode_responses(sent)
    assert_store_rsp(response, context_id=3, message_id=11, status=0x0000)
    # The response is what pynetdicom would have sent.
    assert sent[0] == encode_p_data_tf([(3, 0x03, encode_c_store_rsp(11, CTImageStorage, SOP_UID, 0))])


def test_data_set_over_many_pdus_and_command_over_two() -> None:
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    data = dataset_bytes(10_000, seed=3)
    msg = store_rq(12, SOP_UID_ODD, data=data)
    pdus = pynetdicom_pdus(msg, 7, 1000)
    command = command_bytes(msg)
    # pynetdicom's own fragmentation: one command PDU, 11 data PDUs; re-split the command.
    command_pdus = [p for p in pdus if split_pdvs(body(p))[0][1] & 0x01]
    data_pdus = [p for p in pdus if not split_pdvs(body(p))[0][1] & 0x01]
    assert len(command_pdus) == 1 and len(data_pdus) == 11
    half = len(command) // 2
    first = encode_p_data_tf([(7, 0x01, command[:half])])
    second = encode_p_data_tf([(7, 0x03, command[half:])])
    assert assembler.feed(body(first)) == []
    assert assembler.in_message and recorder.calls == []
    assert assembler.feed(body(second)) == []
    for k, pdu in enumerate(data_pdus):
        assert assembler.feed(body(pdu)) == []
        if k < len(data_pdus) - 1:
            assert recorder.calls == [] and sent == [] and assembler.in_message
    assert len(recorder.calls) == 1
    request, got, n = recorder.calls[0]
    assert request == StoreRequest(7, 12, CTImageStorage, SOP_UID_ODD)
    assert n == len(data_pdus)
    assert got == data
    (response,) = decode_responses(sent)
    assert_store_rsp(response, context_id=7, message_id=12, status=0, sop_uid=SOP_UID_ODD)
    assert not assembler.in_message and assembler.handled == 1


def test_fragments_reference_received_buffers() -> None:
    seen: list[list[memoryview]] = []

    def store(request: StoreRequest, fragments: Any) -> tuple[int, str]:
        seen.append(list(fragments))
        return 0, ""

    assembler = StoreAssembler(STORAGE_CONTEXTS, store, lambda data: None)
    data = dataset_bytes(3000)
    msg = store_rq(1, data=data)
    bodies = [body(p) for p in pynetdicom_pdus(msg, 3, 1024)]
    for b in bodies:
        assembler.feed(b)
    fragments = seen[0]
    assert [f.obj for f in fragments] == [b.obj for b in bodies[1:]]  # zero-copy


@pytest.mark.parametrize("context_id", [1, 3], ids=["verification-context", "storage-context"])
def test_c_echo_passes_through(context_id: int) -> None:
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    command = command_bytes(echo_rq(21))
    pdu = encode_p_data_tf([(context_id, 0x03, command)])
    passed = assembler.feed(body(pdu))
    assert items_as_bytes(passed) == [(context_id, 0x03, command)]
    assert not assembler.in_message
    assert recorder.calls == [] and sent == [] and assembler.handled == 0

    # Split over two PDUs: held until complete, then passed through in order.
    a = encode_p_data_tf([(context_id, 0x01, command[:10])])
    b = encode_p_data_tf([(context_id, 0x03, command[10:])])
    assert assembler.feed(body(a)) == []
    assert assembler.in_message
    passed = assembler.feed(body(b))
    assert items_as_bytes(passed) == [(context_id, 0x01, command[:10]), (context_id, 0x03, command[10:])]
    assert not assembler.in_message

    # The next C-STORE is handled on the fast path.
    data = dataset_bytes(64)
    for pdu in pynetdicom_pdus(store_rq(22, data=data), 3, 0):
        assert assembler.feed(body(pdu)) == []
    assert [(r.message_id, d) for r, d, _ in recorder.calls] == [(22, data)]
    (response,) = decode_responses(sent)
    assert_store_rsp(response, context_id=3, message_id=22, status=0)


def test_store_on_non_storage_context_passes_through_then_fast_path() -> None:
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    data = dataset_bytes(2500, seed=5)
    msg = store_rq(31, sop_class=MR_STORAGE, data=data)
    passed_all: list[tuple[int, int, bytes]] = []
    pdus = pynetdicom_pdus(msg, 5, 1000)
    assert len(pdus) == 4
    for k, pdu in enumerate(pdus):
        passed = assembler.feed(body(pdu))
        assert len(passed) == 1  # every item goes straight through, nothing is held
        passed_all += items_as_bytes(passed)
        assert assembler.in_message == (k < len(pdus) - 1)
    expected = [item for pdu in pdus for item in items_as_bytes(split_pdvs(body(pdu)))]
    assert passed_all == expected
    assert recorder.calls == [] and sent == []

    data2 = dataset_bytes(1500, seed=6)
    for pdu in pynetdicom_pdus(store_rq(32, data=data2), 3, 1000):
        assert assembler.feed(body(pdu)) == []
    assert [(r.message_id, r.context_id, d) for r, d, _ in recorder.calls] == [(32, 3, data2)]
    (response,) = decode_responses(sent)
    assert_store_rsp(response, context_id=3, message_id=32, status=0)
    assert assembler.handled == 1


def test_data_fragment_without_command_passes_through() -> None:
    assembler, sent = make_assembler(Recorder())
    pdu = encode_p_data_tf([(3, 0x02, b"stray")])
    assert items_as_bytes(assembler.feed(body(pdu))) == [(3, 0x02, b"stray")]
    assert not assembler.in_message and sent == []


def test_undecodable_command_on_storage_context_passes_through() -> None:
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    garbage = struct.pack("<HHL", 0x0000, 0x0100, 200) + b"\x01\x00"
    passed = assembler.feed(body(encode_p_data_tf([(3, 0x03, garbage)])))
    assert items_as_bytes(passed) == [(3, 0x03, garbage)]
    assert recorder.calls == [] and sent == [] and not assembler.in_message


def test_data_set_interrupted_by_a_new_command() -> None:
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    first = pynetdicom_pdus(store_rq(41, data=dataset_bytes(3000)), 3, 1000)
    for pdu in first[:3]:  # the command and two of four data fragments
        assert assembler.feed(body(pdu)) == []
    assert assembler.in_message
    data = dataset_bytes(2000, seed=9)
    for pdu in pynetdicom_pdus(store_rq(42, SOP_UID_ODD, data=data), 3, 1000):
        assert assembler.feed(body(pdu)) == []
    # The partial instance was dropped (never stored, never answered); the new one was.
    assert [(r.message_id, d) for r, d, _ in recorder.calls] == [(42, data)]
    (response,) = decode_responses(sent)
    assert_store_rsp(response, context_id=3, message_id=42, status=0, sop_uid=SOP_UID_ODD)
    assert assembler.handled == 1 and not assembler.in_message


def test_data_set_interrupted_by_c_echo_passes_the_echo() -> None:
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    for pdu in pynetdicom_pdus(store_rq(43, data=dataset_bytes(3000)), 3, 1000)[:2]:
        assembler.feed(body(pdu))
    command = command_bytes(echo_rq(44))
    passed = assembler.feed(body(encode_p_data_tf([(1, 0x03, command)])))
    assert items_as_bytes(passed) == [(1, 0x03, command)]
    assert recorder.calls == [] and sent == [] and not assembler.in_message


@pytest.mark.parametrize(
    ("kwargs", "status", "comment"),
    [
        ({"exc": RuntimeError("disk on fire")}, 0x0110, "Processing failure"),
        ({"exc": OSError("boom")}, 0x0110, "Processing failure"),
        ({"status": 0xA700, "comment": "Out of resources: disk reserve reached"}, 0xA700,
         "Out of resources: disk reserve reached"),
        ({"status": 0xC210, "comment": "StudyInstanceUID invalid"}, 0xC210, "StudyInstanceUID invalid"),
        ({"status": 0xB007}, 0xB007, None),
    ],
    ids=["raises", "raises-oserror", "a700", "c210", "warning-no-comment"],
)
def test_callback_status_and_failure_reach_the_response(
    kwargs: dict[str, Any], status: int, comment: str | None
) -> None:
    recorder = Recorder(**kwargs)
    assembler, sent = make_assembler(recorder)
    data = dataset_bytes(100)
    for pdu in pynetdicom_pdus(store_rq(51, data=data), 3, 0):
        assembler.feed(body(pdu))
    assert len(recorder.calls) == 1
    (response,) = decode_responses(sent)
    assert_store_rsp(response, context_id=3, message_id=51, status=status, comment=comment)
    assert assembler.handled == 1 and not assembler.in_message
    # The association carries on: a following store is handled.
    recorder.exc, recorder.status, recorder.comment = None, 0, ""
    for pdu in pynetdicom_pdus(store_rq(52, data=data), 3, 0):
        assembler.feed(body(pdu))
    assert_store_rsp(decode_responses(sent)[1], context_id=3, message_id=52, status=0)


def test_custom_failure_status() -> None:
    sent: list[bytes] = []
    assembler = StoreAssembler(
        STORAGE_CONTEXTS, Recorder(exc=ValueError()), sent.append, 0, failure_status=0xA701
    )
    for pdu in pynetdicom_pdus(store_rq(53, data=b"\x00\x00"), 3, 0):
        assembler.feed(body(pdu))
    assert_store_rsp(
        decode_responses(sent)[0], context_id=3, message_id=53, status=0xA701, comment="Processing failure"
    )


@pytest.mark.parametrize("max_pdu", [20, 64])
def test_responses_respect_the_peer_max_pdu(max_pdu: int) -> None:
    recorder = Recorder(status=0xC210, comment="SeriesInstanceUID missing")
    assembler, sent = make_assembler(recorder, max_pdu=max_pdu)
    for message_id in (61, 62, 63):
        for pdu in pynetdicom_pdus(store_rq(message_id, data=dataset_bytes(200)), 7, 0):
            assembler.feed(body(pdu))
    assert len(sent) == 3  # one send per response (possibly several PDUs)
    for stream in sent:
        pdus = split_stream(stream)
        assert len(pdus) > 1
        assert all(len(p) - 6 <= max_pdu for p in pdus)
    responses = decode_responses(sent)
    for response, message_id in zip(responses, (61, 62, 63), strict=True):
        assert_store_rsp(
            response, context_id=7, message_id=message_id, status=0xC210,
            comment="SeriesInstanceUID missing",
        )


def test_many_messages_in_one_pdu_and_mixed_order() -> None:
    """Echo, store, store, echo in a single PDU: stores handled, echoes passed in order."""
    recorder = Recorder()
    assembler, sent = make_assembler(recorder)
    d1, d2 = dataset_bytes(50, 1), dataset_bytes(60, 2)
    e1, e2 = command_bytes(echo_rq(70)), command_bytes(echo_rq(73))
    items = [
        (1, 0x03, e1),
        (3, 0x03, command_bytes(store_rq(71, data=d1))), (3, 0x00, d1[:20]), (3, 0x02, d1[20:]),
        (7, 0x03, command_bytes(store_rq(72, SOP_UID_ODD, data=d2))), (7, 0x02, d2),
        (1, 0x03, e2),
    ]
    passed = assembler.feed(body(encode_p_data_tf(items)))
    assert items_as_bytes(passed) == [(1, 0x03, e1), (1, 0x03, e2)]
    assert [(r.message_id, r.context_id, d, n) for r, d, n in recorder.calls] == [(71, 3, d1, 2), (72, 7, d2, 1)]
    r1, r2 = decode_responses(sent)
    assert_store_rsp(r1, context_id=3, message_id=71, status=0)
    assert_store_rsp(r2, context_id=7, message_id=72, status=0, sop_uid=SOP_UID_ODD)
