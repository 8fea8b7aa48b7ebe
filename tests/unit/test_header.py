"""Unit tests for dicom.header.inspect_dataset (pure: data sets encoded with pydicom in memory)."""
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

from dicom.header import HeaderError, inspect_dataset

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


def sequence_tags(ds: Dataset) -> set[int]:
    return {int(elem.tag) for elem in ds if elem.VR == "SQ"}


def expected_values(ds: Dataset, buf: bytes, implicit: bool) -> dict[int, bytes]:
    """Raw values of every top-level non-sequence element, as pydicom reads them."""
    raw = read_dataset(BytesIO(buf), implicit, True)
    out: dict[int, bytes] = {}
    for elem in ds:
        tag = int(elem.tag)
        if elem.VR == "SQ":
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


# -- whole data sets -------------------------------------------------------------------


def fragments(buf: bytes, *cuts: int) -> list[memoryview]:
    """`buf` split at `cuts`, as views (how the fast path hands a received data set over)."""
    view = memoryview(buf)
    edges = [0, *cuts, len(buf)]
    return [view[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@VRS
def test_values_equal_pydicom_and_the_walk_reaches_the_end(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    facts = inspect_dataset([buf], implicit, wanted_for(ds))
    assert facts.values == expected_values(ds, buf, implicit)
    assert facts.elements == len(ds)
    # Decoded values are the data set's (nested look-alikes are not picked up).
    values = facts.values
    assert values[0x0020000D].rstrip(b"\x00").decode("ascii") == STUDY_UID
    assert values[0x0020000E].rstrip(b"\x00").decode("ascii") == SERIES_UID
    assert values[0x00080018].rstrip(b"\x00").decode("ascii") == SOP_UID
    assert values[0x00080060] == b"CT"
    assert values[0x0008103E].decode("latin-1").rstrip(" ") == "Thorax Übersicht"
    assert int(values[0x00200013]) == 17
    assert values[0x00091010] == b"\x00\x01\x02\x20\x00\x08\x00\x0d"
    for tag in ABSENT_OR_NESTED:
        assert tag not in values
    assert facts.sop_class_uid == CTImageStorage
    assert (facts.rows, facts.columns, facts.pixel_data_length, facts.encapsulated) == (2, 2, 8, False)


@VRS
def test_only_wanted_tags_returned_and_any_fragmenting_gives_the_same_answer(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    assert set(inspect_dataset([buf], implicit, {0x0020000D, 0x00200013}).values) == {0x0020000D, 0x00200013}
    assert inspect_dataset([buf], implicit).values == {}
    whole = inspect_dataset([buf], implicit, wanted_for(ds))
    assert inspect_dataset([bytearray(buf)], implicit, wanted_for(ds)) == whole
    for step in (1, 7, 64, 333):
        cuts = list(range(step, len(buf), step))
        assert inspect_dataset(fragments(buf, *cuts), implicit, wanted_for(ds)) == whole, step


@VRS
def test_defined_length_sequence_value_is_returned_raw(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    facts = inspect_dataset([buf], implicit, {0x00081140, 0x00081110})
    assert 0x00081110 not in facts.values  # undefined length: no raw value
    raw = facts.values[0x00081140]
    back = read_dataset(BytesIO(buf), implicit, True)
    assert raw == back.get_item(Tag(0x00081140)).value if isinstance(back.get_item(Tag(0x00081140)).value, bytes) \
        else len(raw) > 0


@VRS
def test_every_truncation_inside_an_element_raises(implicit: bool) -> None:
    ds = header_dataset()
    buf = encode(ds, implicit)
    top_level = {len(encode(top_level_subset(ds, lambda t, e=int(elem.tag): t <= e), implicit)) for elem in ds}
    for cut in range(1, len(buf)):
        if cut in top_level:  # a shorter data set: fewer elements, no error
            assert inspect_dataset([buf[:cut]], implicit).elements < len(ds)
            continue
        with pytest.raises(HeaderError):
            inspect_dataset([buf[:cut]], implicit)
        with pytest.raises(HeaderError):
            inspect_dataset(fragments(buf[:cut], cut // 2), implicit)


@VRS
def test_out_of_order_and_top_level_item_tags_raise(implicit: bool) -> None:
    study = encode(top_level_subset(header_dataset(), lambda t: t == 0x0020000D), implicit)
    sop = encode(top_level_subset(header_dataset(), lambda t: t == 0x00080018), implicit)
    with pytest.raises(HeaderError, match="out of order"):
        inspect_dataset([study + sop], implicit)
    with pytest.raises(HeaderError, match="out of order"):
        inspect_dataset([sop + sop], implicit)
    with pytest.raises(HeaderError, match="top level"):
        inspect_dataset([struct.pack("<HHL", 0xFFFE, 0xE000, 0)], implicit)
    assert inspect_dataset([sop + study], implicit, {0x00080018}).elements == 2


def test_undefined_length_on_a_non_sequence_explicit_vr_raises() -> None:
    bad = struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 0xFFFF)  # short VR: 0xFFFF is a length
    with pytest.raises(HeaderError):
        inspect_dataset([bad], False)
    bad = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFFF) + b"\x00" * 8
    with pytest.raises(HeaderError, match="undefined length"):
        inspect_dataset([bad], False)


def test_garbage_inside_an_undefined_length_sequence_raises() -> None:
    bad = (struct.pack("<HH2sHL", 0x0008, 0x1110, b"SQ", 0, 0xFFFFFFFF)
           + struct.pack("<HHL", 0x0008, 0x0060, 2) + b"CT")
    with pytest.raises(HeaderError, match="expected an item"):
        inspect_dataset([bad], False)


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
    facts = inspect_dataset([ok], True, {0x0020000D, 0x00080060})
    assert facts.values == {0x0020000D: b"1.2\x00"}  # (0008,0060) only occurs nested
    back = read_dataset(BytesIO(ok), True, True)
    assert back.StudyInstanceUID == "1.2"
    with pytest.raises(HeaderError, match="nested too deeply"):
        inspect_dataset([_nested_implicit(40)], True, {0x0020000D})


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
    facts = inspect_dataset([buf], False, wanted)
    assert facts.values[0x0020000D].rstrip(b"\x00") == STUDY_UID.encode()
    assert facts.values[0x0020000E].rstrip(b"\x00") == SERIES_UID.encode()
    assert int(facts.values[0x00200013]) == 17
    assert 0x00081155 not in facts.values
    for cut in range(len(before) + 1, len(before) + len(un)):  # every truncation inside the UN raises
        with pytest.raises(HeaderError):
            inspect_dataset([buf[:cut]], False, wanted)


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
    facts = inspect_dataset([buf], False, wanted)
    assert facts.values == expected_values(ds, buf, False)


@VRS
def test_pixel_data_length_must_match_the_image(implicit: bool) -> None:
    ds = header_dataset()
    ds.BitsAllocated = 16
    ds.SamplesPerPixel = 1
    assert inspect_dataset([encode(ds, implicit)], implicit).expected_pixel_bytes() == 8
    ds.Rows = 3
    with pytest.raises(HeaderError, match="Pixel Data holds 8 bytes"):
        inspect_dataset([encode(ds, implicit)], implicit)
    ds.Rows = 2
    ds.NumberOfFrames = 2
    with pytest.raises(HeaderError, match="make 16"):
        inspect_dataset([encode(ds, implicit)], implicit)
    del ds.NumberOfFrames
    buf = encode(ds, implicit)  # pydicom refuses to write "two" as IS: splice it in by hand
    at = buf.index(struct.pack("<HH", 0x0028, 0x0010))
    frames = struct.pack("<HHL", 0x0028, 0x0008, 4) if implicit else struct.pack("<HH2sH", 0x0028, 0x0008, b"IS", 4)
    with pytest.raises(HeaderError, match="Number of Frames"):
        inspect_dataset([buf[:at] + frames + b"two " + buf[at:]], implicit)


def test_encapsulated_pixel_data_is_walked_item_by_item() -> None:
    ds = header_dataset()
    del ds.PixelData
    frame = b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE000, len(frame)) + frame
    pixel = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + items
    good = encode(ds, False) + pixel + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    facts = inspect_dataset([good], False)
    assert facts.encapsulated and facts.pixel_data_length is None
    with pytest.raises(HeaderError):  # no sequence delimiter
        inspect_dataset([encode(ds, False) + pixel], False)
    bad = encode(ds, False) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) \
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    with pytest.raises(HeaderError, match="undefined length"):
        inspect_dataset([bad], False)
