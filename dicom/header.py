"""Scan the leading top-level elements of an encoded little endian data set.

The storage SCP needs eight attributes of each received instance (its UIDs, modality,
series description and numbers), all in groups 0008 and 0020 near the start of the data
set. :func:`scan_header` walks the encoded elements up to (0020,0013) Instance Number,
skipping every value (and nested sequences) without decoding them, and returns the raw
values of the wanted tags. It works on the first received fragment of a data set and
says when that fragment ends before the header does, so the caller can fall back to the
whole data set; it handles Explicit and Implicit VR Little Endian only (the caller uses
pydicom for big endian and deflated data sets).
"""
from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["HeaderError", "HeaderScan", "scan_header"]

#: Explicit VRs with a 4-byte length after two reserved bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
#: The scan stops at the first top-level element after this tag.
LAST_TAG = 0x00200013
_MAX_DEPTH = 32


class HeaderError(ValueError):
    """The encoded data set is malformed."""


class _Truncated(Exception):
    """The buffer ends before the scan is complete."""


@dataclass(frozen=True)
class HeaderScan:
    """Result of :func:`scan_header`.

    Attributes
    ----------
    values : dict of int to bytes
        Raw value of each wanted tag that is present (tag as ``0xGGGGEEEE``).
    end : int
        Offset of the first top-level element after (0020,0013), or the buffer length
        when the data set ends before one.
    """

    values: dict[int, bytes]
    end: int


def _element(buf: memoryview, offset: int, implicit: bool) -> tuple[int, int, int, bytes]:
    """Return (tag, value offset, value length, VR) of the element at `offset`.

    The VR is ``b""`` for implicit VR and for item/delimiter tags.
    """
    size = len(buf)
    if offset + 8 > size:
        raise _Truncated
    group, elem = struct.unpack_from("<HH", buf, offset)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<L", buf, offset + 4)
        return tag, offset + 8, length, b""
    vr = bytes(buf[offset + 4 : offset + 6])
    if vr in _LONG_VRS:
        if offset + 12 > size:
            raise _Truncated
        (length,) = struct.unpack_from("<L", buf, offset + 8)
        return tag, offset + 12, length, vr
    (length,) = struct.unpack_from("<H", buf, offset + 6)
    return tag, offset + 8, length, vr


def _skip_value(buf: memoryview, value: int, length: int, vr: bytes, implicit: bool, depth: int) -> int:
    """Return the offset after an element's value (skipping undefined-length sequences)."""
    if length != _UNDEFINED:
        return value + length
    if not implicit and vr not in (b"SQ", b"UN"):
        raise HeaderError(f"undefined length on a {vr.decode('ascii', 'replace')} element")
    # Items of an undefined-length UN are Implicit VR (PS3.5 6.2.2); in Implicit VR an
    # undefined length only occurs on sequences before the pixel data.
    return _skip_sequence(buf, value, implicit or vr == b"UN", depth + 1)


def _skip_sequence(buf: memoryview, offset: int, implicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length sequence starting at `offset`; return its end."""
    if depth > _MAX_DEPTH:
        raise HeaderError("sequences nested too deeply")
    while True:
        tag, value, length, _ = _element(buf, offset, True)
        if tag == _SEQUENCE_END:
            return value
        if tag != _ITEM:
            raise HeaderError(
                f"expected an item in a sequence, found ({tag >> 16:04X},{tag & 0xFFFF:04X})"
            )
        if length != _UNDEFINED:
            offset = value + length
            continue
        offset = value
        while True:  # the item's data set, up to its delimiter
            tag, value, length, vr = _element(buf, offset, implicit)
            if tag == _ITEM_END:
                offset = value
                break
            offset = _skip_value(buf, value, length, vr, implicit, depth)


def scan_header(
    buf: bytes | bytearray | memoryview,
    implicit_vr: bool,
    wanted: Collection[int],
    complete: bool = True,
) -> HeaderScan | None:
    """Collect the raw values of `wanted` top-level tags up to (0020,0013).

    Parameters
    ----------
    buf : bytes-like
        The start of an encoded data set (Little Endian, no file meta).
    implicit_vr : bool
        Whether it is Implicit VR.
    wanted : collection of int
        Tags (``0xGGGGEEEE``) whose values to return; tags after (0020,0013) are never
        found.
    complete : bool
        Whether `buf` is the whole data set (``False`` for a first fragment).

    Returns
    -------
    HeaderScan or None
        ``None`` when `buf` is not `complete` and ends before the first element after
        (0020,0013) (the caller then scans more of the data set).

    Raises
    ------
    HeaderError
        If the encoding is malformed (including a complete data set that is truncated).
    """
    view = memoryview(buf)
    size = len(view)
    values: dict[int, bytes] = {}
    offset = 0
    previous = -1
    try:
        while offset < size:
            tag, value, length, vr = _element(view, offset, implicit_vr)
            if tag > LAST_TAG:
                return HeaderScan(values, offset)
            if tag <= previous:
                raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order")
            previous = tag
            end = _skip_value(view, value, length, vr, implicit_vr, 0)
            if end > size:
                raise _Truncated
            if tag in wanted and length != _UNDEFINED:
                values[tag] = bytes(view[value:end])
            offset = end
    except _Truncated:
        if complete:
            raise HeaderError("data set ends inside an element") from None
        return None
    return HeaderScan(values, size) if complete else None
