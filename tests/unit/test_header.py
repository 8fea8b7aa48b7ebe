"""Unit tests for dicom.header.scan_header (pure: data sets encoded with pydicom in memory)."""
from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage

from dicom.header import LAST_TAG, HeaderError, HeaderScan, scan_header

STUDY_UID = "1.2.826.0.1.3680043.10.1234.99.1"
SERIES_UID = "1.2.826.0.1.3680043.10.1234.99.22"
SOP_UID = "1.2.826.0.1.3680043.10.1234.99.22.333"
#: A UID that only occurs inside the nested sequences (never at the top level).
NESTED_UID = "1.2.826.0.1.3680043.10.1234.99.7777"

VRS = pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])


def encode(ds: Dataset, implicit: bool) -> bytes:
    """`ds` encoded in Little Endian (implicit or explicit VR), no file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    from pydicom.filewriter import write_dataset

    write_dataset(fp, ds)
    return fp.getvalue()


def _undefined_item(**attrs: object) -> Dataset:
    item = Dataset()
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    item.is_undefined_length_sequence_item = True
    return item


def _set_undefined(ds: Dataset, keyword: str) -> None:
    ds[keyword].is_undefined_length = True
    seq = ds[keyword].value
    if hasattr(seq, "is_undefined_length"):  # older pydicom kept the flag on the Sequence
        seq.is_undefined_length = True


def header_dataset() -> Dataset:
    """A CT-like data set with sequences (undefined and defined length) before (0020,000D)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP_UID
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.SeriesDescription = "Thorax Übersicht"  # odd number of latin-1 bytes: padded

    # (0008,1110) undefined length; items of undefined length; one item holds a nested
    # undefined-length sequence whose item carries top-level-looking tags.
    nested_item = _undefined_item(
        SeriesInstanceUID=NESTED_UID, ReferencedSOPInstanceUID=NESTED_UID, InstanceNumber=99
    )
    deepest = _undefined_item(ReferencedSOPClassUID=CTImageStorage)
    nested_item.ReferencedImageSequence = Sequence([deepest])
    _set_undefined(nested_item, "ReferencedImageSequence")
    item1 = _undefined_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1")
    item1.ReferencedSOPInstanceUID = NESTED_UID
    item1.ReferencedSeriesSequence = Sequence([nested_item, _undefined_item(SeriesInstanceUID=NESTED_UID)])
    _set_undefined(item1, "ReferencedSeriesSequence")
    item2 = Dataset()  # a defined-length item inside the undefined-length sequence
    item2.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item2.ReferencedSOPInstanceUID = NESTED_UID + ".2"
    ds.ReferencedStudySequence = Sequence([item1, item2])
    _set_undefined(ds, "ReferencedStudySequence")

    # (0008,1140) defined length, defined-length items (one of them with a nested sequence).
    ref_a = Dataset()
    ref_a.ReferencedSOPClassUID = CTImageStorage
    ref_a.ReferencedSOPInstanceUID = NESTED_UID + ".3"
    ref_b = Dataset()
    ref_b.ReferencedSOPClassUID = CTImageStorage
    ref_b.ReferencedSOPInstanceUID = NESTED_UID + ".4"
    ref_b.ReferencedFrameNumber = "1"
    inner = Dataset()
    inner.StudyInstanceUID = NESTED_UID
    ref_b.ReferencedStudySequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([ref_a, ref_b])

    # Private block: OB and UT (4-byte lengths in explicit VR) before the wanted tags.
    ds.add_new(0x00090010, "LO", "I3NODE TEST")
    ds.add_new(0x00091010, "OB", b"\x00\x01\x02\x20\x00\x08\x00\x0d")
    ds.add_new(0x00091011, "UT", "x" * 301)
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "TEST01"
    ds.SliceThickness = "2.5"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 17
    # After (0020,0013): never part of the scan.
    ds.ImagePositionPatient = [-50.0, -50.0, 12.5]
    ds.Rows = 2
    ds.Columns = 2
    ds.PixelData = b"\x01\x00\x02\x00\x03\x00\x04\x00"
    ds["PixelData"].VR = "OW"
    return ds


def top_level_subset(ds: Dataset, predicate) -> Dataset:  # type: ignore[no-untyped-def]
    """A data set with the top-level elements of `ds` whose tag satisfies `predicate`."""
    out = Dataset()
    for elem in ds:
        if predicate(int(elem.tag)):
            out.add(elem)
    return out


def header_part(ds: Dataset) -> Dataset:
    return top_level_subset(ds, lambda tag: tag <= LAST_TAG)


def sequence_tags(ds: Dataset) -> set[int]:
    return {int(elem.tag) for elem in ds if elem.VR == "SQ"}


def expected_values(ds: Dataset, buf: bytes, implicit: bool) -> dict[int, bytes]:
    """Raw values of every top-level non-sequence element up to (0020,0013), as pydicom reads them."""
    raw = read_dataset(BytesIO(buf), implicit, True)
    out: dict[int, bytes] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag > LAST_TAG or elem.VR == "SQ":
            continue
        raw_elem = raw.get_item(Tag(tag))
        assert isinstance(raw_elem.value, bytes)
        out[tag] = raw_elem.value
    return out


def all_top_level_tags(ds: Dataset) -> set[int]:
    return {int(elem.tag) for elem in ds}


#: Tags that are not top-level elements of header_dataset(): absent or only nested.
ABSENT_OR_NESTED = {0x00080070, 0x00081150, 0x00081155, 0x00081160}


def wanted_for(ds: Dataset) -> set[int]:
    return (all_top_level_tags(ds) - sequence_tags(ds)) | ABSENT_OR_NESTED


# -- the data sets are what the tests claim ----------------------------------------------


@VRS
def test_fixture_has_undefined_lengths(implicit: bool) -> None:
    buf = encode(header_dataset(), implicit)
    # Sequence delimiters (undefined-length SQs) and item delimiters (undefined-length items)
    # occur before (0020,000D); the defined-length sequence has none of its own.
    study_tag = struct.pack("<HH", 0x0020, 0x000D)
    head = buf[: buf.index(study_tag)]
    assert head.count(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00") == 3  # 3 undefined-length sequences
    assert head.count(b"\xfe\xff\x0d\xe0\x00\x00\x00\x00") == 4  # 4 undefined-length items
    assert b"\xff\xff\xff\xff" in head
    back = read_dataset(BytesIO(buf), implicit, True)
    assert back.ReferencedStudySequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == NESTED_UID
    assert back.SeriesDescription == "Thorax Übersicht"


# -- full scans ------------------------------------------------------------------------


@VRS
def test_values_equal_pydicom_and_end_is_next_element(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    scan = scan_header(buf, implicit, wanted_for(ds))
    assert isinstance(scan, HeaderScan)
    assert scan.values == expected_values(ds, buf, implicit)

    # end = offset of the first element after (0020,0013): (0020,0032) ImagePositionPatient.
    assert scan.end == len(encode(header_part(ds), implicit))
    assert struct.unpack_from("<HH", buf, scan.end) == (0x0020, 0x0032)

    # Decoded values are the data set's (nested look-alikes are not picked up).
    values = scan.values
    assert values[0x0020000D].rstrip(b"\x00").decode("ascii") == STUDY_UID
    assert values[0x0020000E].rstrip(b"\x00").decode("ascii") == SERIES_UID
    assert values[0x00080018].rstrip(b"\x00").decode("ascii") == SOP_UID
    assert values[0x00080016].rstrip(b"\x00").decode("ascii") == CTImageStorage
    assert values[0x00080060] == b"CT"
    assert values[0x0008103E].decode("latin-1").rstrip(" ") == "Thorax Übersicht"
    assert values[0x00080005].rstrip(b" ") == b"ISO_IR 100"
    assert int(values[0x00200011]) == 3
    assert int(values[0x00200013]) == 17
    assert values[0x00091010] == b"\x00\x01\x02\x20\x00\x08\x00\x0d"
    assert values[0x00091011] == b"x" * 301 + b" "
    for tag in ABSENT_OR_NESTED:
        assert tag not in values
    # Tags after (0020,0013) are never found even when wanted.
    for tag in (0x00200032, 0x00280010, 0x7FE00010):
        assert tag not in values


@VRS
def test_only_wanted_tags_returned(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    scan = scan_header(buf, implicit, {0x0020000D, 0x00200013})
    assert scan is not None
    assert set(scan.values) == {0x0020000D, 0x00200013}
    assert scan_header(buf, implicit, set()).values == {}  # type: ignore[union-attr]
    assert scan_header(buf, implicit, set()).end == scan.end  # type: ignore[union-attr]


@VRS
def test_defined_length_sequence_value_is_returned_raw(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    scan = scan_header(buf, implicit, {0x00081140, 0x00081110})
    assert scan is not None
    # The undefined-length sequence has no raw value to return.
    assert 0x00081110 not in scan.values
    only = top_level_subset(ds, lambda tag: tag == 0x00081140)
    encoded = encode(only, implicit)
    header_len = 8 if implicit else 12
    assert scan.values[0x00081140] == encoded[header_len:]


@VRS
def test_scan_of_memoryview_and_bytearray(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    wanted = wanted_for(ds)
    expected = scan_header(buf, implicit, wanted)
    assert scan_header(memoryview(buf), implicit, wanted) == expected
    assert scan_header(bytearray(buf), implicit, wanted) == expected
    # A view into a larger buffer (as a received PDU fragment is).
    framed = b"\xaa" * 7 + buf + b"\xbb" * 5
    assert scan_header(memoryview(framed)[7 : 7 + len(buf)], implicit, wanted) == expected


@VRS
def test_header_without_sequences_or_private(implicit: bool) -> None:
    keep = {0x00080005, 0x00080018, 0x0020000D, 0x00200013, 0x00280010}
    ds = top_level_subset(header_dataset(), keep.__contains__)
    buf = encode(ds, implicit)
    scan = scan_header(buf, implicit, wanted_for(ds))
    assert scan is not None
    assert scan.values == expected_values(ds, buf, implicit)
    assert struct.unpack_from("<HH", buf, scan.end) == (0x0028, 0x0010)


# -- truncated buffers -------------------------------------------------------------------


def top_level_boundaries(ds: Dataset, implicit: bool) -> dict[int, int]:
    """Offset of each top-level element -> its tag (plus the data set's length -> -1)."""
    out: dict[int, int] = {}
    for elem in ds:
        tag = int(elem.tag)
        out[len(encode(top_level_subset(ds, lambda t, tag=tag: t < tag), implicit))] = tag
    out[len(encode(ds, implicit))] = -1
    return out


@VRS
def test_every_prefix_incomplete_is_none_or_the_full_result(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    wanted = wanted_for(ds)
    full = scan_header(buf, implicit, wanted)
    assert full is not None
    n_found = 0
    for cut in range(0, full.end + 64):
        got = scan_header(buf[:cut], implicit, wanted, complete=False)
        if cut <= full.end:
            # The buffer ends before the first element after (0020,0013): not enough.
            assert got is None, cut
        elif cut >= full.end + 12:
            assert got == full, cut
        else:
            assert got is None or got == full, cut
        n_found += got is not None
    assert n_found >= 52


@VRS
def test_every_truncation_with_complete_raises(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    wanted = wanted_for(ds)
    full = scan_header(buf, implicit, wanted)
    assert full is not None
    boundaries = top_level_boundaries(ds, implicit)
    assert boundaries[full.end] == 0x00200032
    n_raised = 0
    for cut in range(1, full.end):
        if cut in boundaries:
            continue
        with pytest.raises(HeaderError):
            scan_header(buf[:cut], implicit, wanted, complete=True)
        n_raised += 1
    assert n_raised > 500


@VRS
def test_data_set_ending_before_instance_number(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    wanted = wanted_for(ds)
    expected = expected_values(ds, buf, implicit)
    boundaries = top_level_boundaries(ds, implicit)
    full_end = scan_header(buf, implicit, wanted).end  # type: ignore[union-attr]
    checked = 0
    for offset, next_tag in sorted(boundaries.items()):
        if offset > full_end:
            break
        got = scan_header(buf[:offset], implicit, wanted, complete=True)
        assert got is not None
        if offset == full_end:
            assert got.values == expected
        else:
            # A complete data set that stops here: everything before the cut, end = its length.
            assert got.values == {t: v for t, v in expected.items() if t < next_tag}, hex(next_tag)
            assert got.end == offset
        checked += 1
    assert checked >= 20

    # A whole data set without (0020,0013) and nothing after it.
    short = top_level_subset(ds, lambda tag: tag <= 0x00200011)
    short_buf = encode(short, implicit)
    got = scan_header(short_buf, implicit, wanted)
    assert got is not None
    assert got.end == len(short_buf)
    assert got.values == {t: v for t, v in expected.items() if t <= 0x00200011}
    assert 0x00200013 not in got.values
    # The same bytes as a first fragment: the header may continue, so no answer yet.
    assert scan_header(short_buf, implicit, wanted, complete=False) is None
    # An empty data set.
    assert scan_header(b"", implicit, wanted) == HeaderScan({}, 0)
    assert scan_header(b"", implicit, wanted, complete=False) is None


# -- malformed encodings -----------------------------------------------------------------


def _one(tag: int, vr: str, value: object, implicit: bool) -> bytes:
    ds = Dataset()
    ds.add_new(tag, vr, value)
    return encode(ds, implicit)


@VRS
def test_out_of_order_tags_raise(implicit: bool) -> None:
    study = _one(0x0020000D, "UI", STUDY_UID, implicit)
    sop = _one(0x00080018, "UI", SOP_UID, implicit)
    number = _one(0x00200013, "IS", "5", implicit)
    with pytest.raises(HeaderError, match="out of order"):
        scan_header(study + sop + number, implicit, {0x00080018})
    with pytest.raises(HeaderError, match="out of order"):
        scan_header(study + sop + number, implicit, {0x00080018}, complete=False)
    # A repeated tag is out of order too.
    with pytest.raises(HeaderError, match="out of order"):
        scan_header(sop + sop + number, implicit, {0x00080018})
    # In order it scans.
    scan = scan_header(sop + study + number, implicit, {0x00080018})
    assert scan is not None
    assert scan.values[0x00080018].rstrip(b"\x00") == SOP_UID.encode()
    assert set(scan.values) == {0x00080018}


def test_undefined_length_on_a_non_sequence_explicit_vr_raises() -> None:
    bad = struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 2) + b"CT"
    bad += struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFFF) + b"\x00" * 16
    with pytest.raises(HeaderError, match="undefined length"):
        scan_header(bad, False, {0x00080060})


def test_garbage_inside_an_undefined_length_sequence_raises() -> None:
    # An undefined-length SQ whose content is not an item.
    bad = struct.pack("<HH2sHL", 0x0008, 0x1110, b"SQ", 0, 0xFFFFFFFF)
    bad += struct.pack("<HH2sH", 0x0008, 0x1150, b"UI", 4) + b"1.2\x00"
    bad += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    with pytest.raises(HeaderError, match="expected an item"):
        scan_header(bad, False, set())


def _nested_implicit(depth: int) -> bytes:
    """`depth` undefined-length sequences nested in undefined-length items (implicit VR)."""
    body = struct.pack("<HHL", 0x0008, 0x0060, 2) + b"CT"
    for _ in range(depth):
        body = (
            struct.pack("<HHL", 0x0008, 0x1115, 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + body
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        )
    tail = struct.pack("<HHL", 0x0020, 0x000D, 4) + b"1.2\x00"
    tail += struct.pack("<HHL", 0x0020, 0x0013, 2) + b"1 "
    tail += struct.pack("<HHL", 0x0020, 0x0032, 2) + b"0 "
    return body + tail


def test_deep_nesting_within_limit_and_beyond() -> None:
    ok = _nested_implicit(10)
    scan = scan_header(ok, True, {0x0020000D, 0x00080060})
    assert scan is not None
    assert scan.values == {0x0020000D: b"1.2\x00"}  # (0008,0060) only occurs nested
    back = read_dataset(BytesIO(ok), True, True)
    assert back.StudyInstanceUID == "1.2"
    with pytest.raises(HeaderError, match="nested too deeply"):
        scan_header(_nested_implicit(40), True, {0x0020000D})


def test_explicit_un_of_undefined_length_has_implicit_items() -> None:
    """An undefined-length UN (a sequence of unknown VR): its items are Implicit VR (PS3.5 6.2.2)."""
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = NESTED_UID
    item.is_undefined_length_sequence_item = True
    seq_ds = Dataset()
    seq_ds.add_new(0x00091020, "SQ", Sequence([item]))
    _set_undefined_tag(seq_ds, 0x00091020)
    implicit_seq = encode(seq_ds, True)  # tag, FFFFFFFF, items..., delimiter
    un = struct.pack("<HH2sHL", 0x0009, 0x1020, b"UN", 0, 0xFFFFFFFF) + implicit_seq[8:]
    sequences = {0x00081110, 0x00081140}
    before = encode(
        top_level_subset(header_dataset(), lambda t: t <= 0x00090010 and t not in sequences), False
    )
    after_ds = top_level_subset(header_dataset(), lambda t: t >= 0x00100010)
    buf = before + un + encode(after_ds, False)
    wanted = {0x0020000D, 0x0020000E, 0x00200013, 0x00081155}
    scan = scan_header(buf, False, wanted)
    assert scan is not None
    assert scan.values[0x0020000D].rstrip(b"\x00") == STUDY_UID.encode()
    assert scan.values[0x0020000E].rstrip(b"\x00") == SERIES_UID.encode()
    assert int(scan.values[0x00200013]) == 17
    assert 0x00081155 not in scan.values
    assert struct.unpack_from("<HH", buf, scan.end) == (0x0020, 0x0032)
    # Every prefix: never a wrong answer.
    for cut in range(len(before), scan.end + 16):
        got = scan_header(buf[:cut], False, wanted, complete=False)
        assert got is None or got == scan


def _set_undefined_tag(ds: Dataset, tag: int) -> None:
    ds[tag].is_undefined_length = True


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [(0x0008040C, "UV", 7), (0x00091012, "SV", -3)],
    ids=["UV-FileOffsetInContainer", "SV-private"],
)
def test_explicit_sv_uv_elements_are_skipped(tag: int, vr: str, value: int) -> None:
    ds = top_level_subset(header_dataset(), lambda t: t not in {0x00081110, 0x00081140})
    ds.add_new(tag, vr, value)
    buf = encode(ds, False)
    wanted = wanted_for(ds)
    scan = scan_header(buf, False, wanted)
    assert scan is not None
    assert scan.values == expected_values(ds, buf, False)
