"""Check received data sets without decoding them, and read what the SCP files them by.

The storage SCP must not acknowledge a data set that does not parse to its end, and needs a
few attributes of each one (its UIDs, modality, series description and numbers) to file and
record it. :func:`inspect_dataset` walks every top-level element of a data set across its
received fragments (no join, no copy of values), skipping values by their lengths and
sequences item by item, returns the raw values of the wanted tags, and refuses one that is
truncated, has an element running past its end, an unclosed sequence, elements out of order
or native Pixel Data of the wrong length. It handles Explicit and Implicit VR Little Endian
(the caller inflates deflated data sets first and reads big endian ones with pydicom).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom.values import pad_even

__all__ = [
    "DataSetTooLarge",
    "DatasetFacts",
    "HeaderError",
    "ReceivedHeader",
    "decode_header",
    "encode_file_head",
    "inspect_dataset",
    "read_received_header",
]

#: Explicit VRs with a 4-byte length after two reserved bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_MAX_DEPTH = 32


class HeaderError(ValueError):
    """The encoded data set is malformed."""


class _Truncated(Exception):
    """The buffer ends inside an element."""


_PIXEL_DATA = 0x7FE00010
_FACT_TAGS = {
    0x00080016: "sop_class_uid",
    0x00280002: "samples_per_pixel",
    0x00280008: "number_of_frames",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "bits_allocated",
    0x00280101: "bits_stored",
}


@dataclass(frozen=True)
class DatasetFacts:
    """What :func:`inspect_dataset` learned while walking a whole data set.

    Attributes
    ----------
    sop_class_uid : str
        SOP Class UID (``""`` when absent).
    rows, columns, samples_per_pixel, bits_allocated, bits_stored, number_of_frames : int or None
        Image pixel attributes when present.
    pixel_data_length : int or None
        Length of a native (defined-length) Pixel Data value; ``None`` when absent or
        encapsulated.
    encapsulated : bool
        Pixel Data is encapsulated (compressed frames in items).
    elements : int
        Top-level elements walked.
    values : dict of int to bytes
        Raw values of the ``wanted`` top-level tags that are present.
    """

    sop_class_uid: str = ""
    rows: int | None = None
    columns: int | None = None
    samples_per_pixel: int | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    number_of_frames: int | None = None
    pixel_data_length: int | None = None
    encapsulated: bool = False
    elements: int = 0
    values: dict[int, bytes] = field(default_factory=dict)

    def expected_pixel_bytes(self) -> int | None:
        """Rows x Columns x frames x samples x bits allocated / 8 (rounded up), if known."""
        if None in (self.rows, self.columns, self.bits_allocated):
            return None
        bits = (int(self.rows or 0) * int(self.columns or 0) * int(self.number_of_frames or 1)
                * int(self.samples_per_pixel or 1) * int(self.bits_allocated or 0))
        return (bits + 7) // 8


class _Chunks:
    """Read-only byte access across the received fragments of one data set (no join)."""

    def __init__(self, fragments: Sequence[bytes | bytearray | memoryview]) -> None:
        self._parts = [memoryview(f).cast("B") for f in fragments if len(f)]
        self._starts: list[int] = []
        total = 0
        for p in self._parts:
            self._starts.append(total)
            total += len(p)
        self._size = total

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: slice) -> bytes:
        start, stop = index.start or 0, min(index.stop, self._size)
        if start >= stop:
            return b""
        i = bisect.bisect_right(self._starts, start) - 1
        part, base = self._parts[i], self._starts[i]
        if stop <= base + len(part):  # the common case: inside one fragment
            return part[start - base:stop - base].tobytes()
        out = bytearray()
        while start < stop:
            part, base = self._parts[i], self._starts[i]
            take = min(stop, base + len(part)) - start
            out += part[start - base:start - base + take]
            start += take
            i += 1
        return bytes(out)


def _unpack(fmt: str, buf: Any, offset: int) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if offset + size > len(buf):
        raise _Truncated
    return struct.unpack(fmt, buf[offset:offset + size])


def _element(buf: Any, offset: int, implicit: bool) -> tuple[int, int, int, bytes]:
    """(tag, value offset, value length, VR) of the element at `offset` of a sliceable buffer.

    The VR is ``b""`` for implicit VR and for item/delimiter tags.
    """
    group, elem = _unpack("<HH", buf, offset)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        (length,) = _unpack("<L", buf, offset + 4)
        return tag, offset + 8, length, b""
    vr = bytes(buf[offset + 4:offset + 6])
    if len(vr) < 2:
        raise _Truncated
    if vr in _LONG_VRS:
        (length,) = _unpack("<L", buf, offset + 8)
        return tag, offset + 12, length, vr
    (length,) = _unpack("<H", buf, offset + 6)
    return tag, offset + 8, length, vr


def _walk_items(buf: Any, offset: int, implicit: bool, depth: int, encapsulated: bool = False) -> int:
    """Walk the items of an undefined-length sequence (or encapsulated pixel data); return its end."""
    if depth > _MAX_DEPTH:
        raise HeaderError("sequences nested too deeply")
    size = len(buf)
    while True:
        tag, value, length, _ = _element(buf, offset, True)
        if tag == _SEQUENCE_END:
            return value
        if tag != _ITEM:
            raise HeaderError(f"expected an item in a sequence, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if length != _UNDEFINED:
            offset = value + length
            if offset > size:
                raise _Truncated
            continue
        if encapsulated:
            raise HeaderError("an encapsulated pixel data fragment has an undefined length")
        offset = value
        while True:  # the item's data set, up to its delimiter
            tag, value, length, vr = _element(buf, offset, implicit)
            if tag == _ITEM_END:
                offset = value
                break
            offset = _walk_value(buf, tag, value, length, vr, implicit, depth)


def _walk_value(buf: Any, tag: int, value: int, length: int, vr: bytes, implicit: bool, depth: int) -> int:
    if length != _UNDEFINED:
        end = value + length
        if end > len(buf):
            raise _Truncated
        return end
    if tag == _PIXEL_DATA and depth == 0:
        return _walk_items(buf, value, implicit, depth + 1, encapsulated=True)
    if not implicit and vr not in (b"SQ", b"UN"):
        raise HeaderError(f"undefined length on a {vr.decode('ascii', 'replace')} element")
    return _walk_items(buf, value, implicit or vr == b"UN", depth + 1)


def inspect_dataset(fragments: Sequence[bytes | bytearray | memoryview], implicit_vr: bool,
                    wanted: Collection[int] = ()) -> DatasetFacts:
    """Walk a whole little endian data set to its end and check it is well formed.

    Every element header is read, every value skipped by its length (sequences and
    encapsulated pixel data item by item), across the received fragments without joining
    them. The data set must end exactly after its last element, with every sequence
    closed and top-level tags ascending; native Pixel Data must be as long as Rows x
    Columns x frames x samples x bits allocated says (plus one pad byte).

    Parameters
    ----------
    fragments : sequence of bytes-like
        The encoded data set as received, in order.
    implicit_vr : bool
        Whether it is Implicit VR Little Endian.
    wanted : collection of int, optional
        Top-level tags whose raw values to return in :attr:`DatasetFacts.values`.

    Returns
    -------
    DatasetFacts

    Raises
    ------
    HeaderError
        Naming what is wrong: truncated, an element past the end, an unclosed sequence,
        elements out of order, a pixel data length that does not match the image.
    """
    buf: Any = memoryview(fragments[0]).cast("B") if len(fragments) == 1 else _Chunks(fragments)
    size = len(buf)
    facts: dict[str, Any] = {}
    values: dict[int, bytes] = {}
    offset, previous, n = 0, -1, 0
    try:
        while offset < size:
            tag, value, length, vr = _element(buf, offset, implicit_vr)
            if tag <= previous:
                raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order")
            if tag >> 16 == 0xFFFE:
                raise HeaderError(f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) at the top level")
            previous = tag
            end = _walk_value(buf, tag, value, length, vr, implicit_vr, 0)
            if tag in _FACT_TAGS and length != _UNDEFINED and length <= 64:
                facts[_FACT_TAGS[tag]] = bytes(buf[value:end])
            if tag in wanted and length != _UNDEFINED and length <= 1024:
                values[tag] = bytes(buf[value:end])
            if tag == _PIXEL_DATA:
                facts["encapsulated"] = length == _UNDEFINED
                facts["pixel_data_length"] = None if length == _UNDEFINED else length
            offset = end
            n += 1
    except _Truncated:
        raise HeaderError(f"data set truncated: element {n + 1} runs past the end ({size} bytes)") from None
    out = DatasetFacts(
        sop_class_uid=facts.get("sop_class_uid", b"").decode("ascii", "replace").strip("\x00 "),
        rows=_us(facts.get("rows"), implicit_vr),
        columns=_us(facts.get("columns"), implicit_vr),
        samples_per_pixel=_us(facts.get("samples_per_pixel"), implicit_vr),
        bits_allocated=_us(facts.get("bits_allocated"), implicit_vr),
        bits_stored=_us(facts.get("bits_stored"), implicit_vr),
        number_of_frames=_is(facts.get("number_of_frames")),
        pixel_data_length=facts.get("pixel_data_length"),
        encapsulated=bool(facts.get("encapsulated", False)),
        elements=n,
        values=values,
    )
    expected = out.expected_pixel_bytes()
    if out.pixel_data_length is not None and expected is not None and out.pixel_data_length not in (
            expected, expected + 1):
        raise HeaderError(f"Pixel Data holds {out.pixel_data_length} bytes but Rows x Columns x frames x "
                          f"samples x bits allocated make {expected}")
    return out


def _us(raw: bytes | None, implicit: bool) -> int | None:
    if raw is None or len(raw) < 2:
        return None
    return int(struct.unpack("<H", raw[:2])[0])


def _is(raw: bytes | None) -> int | None:
    if not raw:
        return None
    try:
        return int(raw.decode("ascii").strip("\x00 "))
    except ValueError:
        raise HeaderError("Number of Frames is not an integer") from None


# ----------------------------------------------------------------------------- filing attributes

#: Attributes decoded from a received data set (everything else stays encoded).
_TAGS = {
    "StudyInstanceUID": Tag(0x0020, 0x000D),
    "SeriesInstanceUID": Tag(0x0020, 0x000E),
    "SOPInstanceUID": Tag(0x0008, 0x0018),
    "SOPClassUID": Tag(0x0008, 0x0016),
    "Modality": Tag(0x0008, 0x0060),
    "SeriesDescription": Tag(0x0008, 0x103E),
    "SeriesNumber": Tag(0x0020, 0x0011),
    "InstanceNumber": Tag(0x0020, 0x0013),
}
_SPECIFIC_TAGS = list(_TAGS.values())


_CHARSET_TAG = 0x00080005
_SCANNED_TAGS = frozenset({int(t) for t in _SPECIFIC_TAGS} | {_CHARSET_TAG})


def _raw_text(raw: bytes | None) -> str:
    if not raw:
        return ""
    return raw.decode("ascii", "replace").strip("\x00 ")


def _to_int(text: str) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return int(float(text))
        except ValueError:
            return None


def _decode_text(raw: bytes | None, charset: bytes | None) -> str:
    """Decode a text value with the data set's Specific Character Set (never raises)."""
    if not raw:
        return ""
    from pydicom.charset import convert_encodings, decode_bytes

    try:
        terms = [t.strip() for t in _raw_text(charset).split("\\")] if charset else [""]
        return decode_bytes(raw, convert_encodings(terms or [""]), set()).strip("\x00 ")
    except Exception:  # undecodable text must not fail the store
        return raw.decode("latin-1").strip("\x00 ")


@dataclass(frozen=True)
class ReceivedHeader:
    """The attributes of a received data set that the SCP files and records.

    Attributes
    ----------
    study_uid, series_uid, sop_uid, sop_class_uid, modality, series_description : str
        Values as text (``""`` when absent).
    series_number, instance_number : int or None
        Integer values when present and valid.
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    series_description: str
    series_number: int | None
    instance_number: int | None

    @classmethod
    def from_raw(cls, values: Mapping[int, bytes]) -> ReceivedHeader:
        """Build from raw element values keyed by tag (as :func:`dicom.header.inspect_dataset` returns them)."""

        def text(keyword: str) -> str:
            return _raw_text(values.get(int(_TAGS[keyword])))

        return cls(
            study_uid=text("StudyInstanceUID"),
            series_uid=text("SeriesInstanceUID"),
            sop_uid=text("SOPInstanceUID"),
            sop_class_uid=text("SOPClassUID"),
            modality=text("Modality"),
            series_description=_decode_text(
                values.get(int(_TAGS["SeriesDescription"])), values.get(_CHARSET_TAG)
            ),
            series_number=_to_int(text("SeriesNumber")),
            instance_number=_to_int(text("InstanceNumber")),
        )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ReceivedHeader:
        """Build from a (partially) decoded pydicom data set (see :func:`decode_header`)."""
        raw: dict[int, bytes] = {}
        for keyword, tag in _TAGS.items():
            elem = ds.get_item(tag)
            if elem is None or elem.value is None or keyword == "SeriesDescription":
                continue
            value = elem.value
            raw[int(tag)] = value if isinstance(value, bytes) else str(value).encode("ascii", "replace")
        header = cls.from_raw(raw)
        try:
            elem = ds.get(_TAGS["SeriesDescription"])
            description = "" if elem is None or elem.value is None else str(elem.value).strip()
        except Exception:  # undecodable text must not fail the store
            description = ""
        return dataclasses.replace(header, series_description=description)


@functools.lru_cache(maxsize=64)
def _syntax_traits(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(little endian, implicit VR, deflated) of a transfer syntax (cached: UID() validates)."""
    tsyntax = UID(transfer_syntax)
    return tsyntax.is_little_endian, tsyntax.is_implicit_VR, tsyntax.is_deflated


class DataSetTooLarge(HeaderError):
    """A deflated data set would inflate past the allowed size (a zip bomb)."""


def _inflate(fragments: Sequence[bytes | bytearray | memoryview], cap: int) -> bytes:
    """Inflate a deflated data set, refusing one that would exceed `cap` bytes (a zip bomb)."""
    import zlib

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        for fragment in fragments:
            out += inflater.decompress(fragment, cap + 1 - len(out))
            if len(out) > cap or inflater.unconsumed_tail:
                raise DataSetTooLarge("deflated data set inflates past the maximum size")
        out += inflater.flush()
    except zlib.error:
        raise HeaderError("deflated data set is corrupt") from None
    if len(out) > cap:
        raise DataSetTooLarge("deflated data set inflates past the maximum size")
    return bytes(out)


def read_received_header(
    fragments: Sequence[bytes | bytearray | memoryview], transfer_syntax: str, *,
    max_dataset_bytes: int = 1 << 30,
) -> tuple[ReceivedHeader, DatasetFacts | None]:
    """Check a received data set to its end and read its filing attributes.

    Little endian data sets are walked without decoding (:func:`dicom.header.inspect_dataset`)
    across the received fragments; a deflated one is inflated first (never past
    `max_dataset_bytes`); a big endian one is parsed whole by pydicom.

    Parameters
    ----------
    fragments : sequence of bytes-like
        The encoded data set as received, in order.
    transfer_syntax : str
        Its transfer syntax.
    max_dataset_bytes : int
        Inflation cap of a deflated data set.

    Returns
    -------
    header, facts
        The filing values (empty strings for absent ones) and what the walk learned
        (``None`` for big endian data sets).

    Raises
    ------
    DataSetTooLarge
        When a deflated data set inflates past `max_dataset_bytes`.
    HeaderError
        When the data set is malformed (the message says how).
    """
    little_endian, implicit, deflated = _syntax_traits(transfer_syntax)
    try:
        if not little_endian:
            joined = fragments[0] if len(fragments) == 1 and isinstance(fragments[0], bytes) else b"".join(fragments)
            ds = decode_header(joined, transfer_syntax, whole=True)
            return ReceivedHeader.from_dataset(ds), None
        data = [_inflate(fragments, max_dataset_bytes)] if deflated else fragments
        facts = inspect_dataset(data, implicit, _SCANNED_TAGS)
    except HeaderError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise HeaderError(f"cannot decode data set ({type(exc).__name__})") from None
    return ReceivedHeader.from_raw(facts.values), facts


def _meta_element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    """Explicit VR little endian encoding of one short-form file meta element."""
    return struct.pack("<HH2sH", 0x0002, group_elem, vr, len(value)) + value


def encode_file_head(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = ""
) -> bytes:
    """Return preamble, ``DICM`` prefix and encoded File Meta Information.

    Equivalent to pydicom's ``write_file_meta_info`` for these elements, but without
    building a data set (it runs once per received instance).

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        Media Storage SOP Class and Instance UIDs.
    transfer_syntax : str
        Transfer Syntax UID of the data set that follows.
    source_ae : str
        Source Application Entity Title (the calling AE); omitted when empty.

    Returns
    -------
    bytes
        128 zero bytes, ``b"DICM"``, then group 0002 in Explicit VR Little Endian.
    """
    body = b"".join(
        (
            struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _meta_element(0x0002, b"UI", pad_even(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", pad_even(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", pad_even(transfer_syntax, b"\x00")),
            _meta_element(0x0012, b"UI", pad_even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _meta_element(0x0013, b"SH", pad_even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
            _meta_element(0x0016, b"AE", pad_even(source_ae[:16], b" ")) if source_ae else b"",
        )
    )
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _stop_after_instance_number(tag: int, vr: str | None, length: int) -> bool:
    return tag > 0x00200013


def decode_header(dataset_bytes: bytes, transfer_syntax: str, *, whole: bool = False) -> Dataset:
    """Decode the top-level elements up to (0020,0013) of an encoded data set (or all of it).

    Parameters
    ----------
    dataset_bytes : bytes
        The data set as received (no file meta).
    transfer_syntax : str
        Its transfer syntax.
    whole : bool
        Read every element to the end (a truncated data set then raises).

    Returns
    -------
    pydicom.dataset.Dataset
        Elements up to Instance Number, or all (values still raw where possible).
    """
    tsyntax = UID(transfer_syntax)
    if tsyntax.is_deflated:
        head = encode_file_head("1.2", "1.2", transfer_syntax)
        return pydicom.dcmread(
            BytesIO(head + dataset_bytes), stop_before_pixels=True, specific_tags=_SPECIFIC_TAGS
        )
    ds = read_dataset(
        BytesIO(dataset_bytes),
        tsyntax.is_implicit_VR,
        tsyntax.is_little_endian,
        stop_when=None if whole else _stop_after_instance_number,
    )
    if whole:
        for _elem in ds.iterall():  # raw elements are parsed lazily: touch them all
            pass
    return ds
