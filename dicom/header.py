"""Check encoded little endian data sets without decoding them.

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
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DatasetFacts", "HeaderError", "inspect_dataset"]

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
