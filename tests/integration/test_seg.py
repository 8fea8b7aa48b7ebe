"""DICOM-SEG: the node's writer and reader, and SEGs written by other writers.

Other writers: highdicom configured like a third-party tool (empty frames
omitted, segments reordered, MANUAL, LABELMAP, FRACTIONAL), and SEGs assembled
frame by frame with plain pydicom the way a viewer saves an edit.  pydicom-seg
0.4.1 (latest) cannot be used as a writer here: it imports
``pydicom._storage_sopclass_uids`` (removed in pydicom 3) and pins numpy < 2.
"""
from __future__ import annotations

import copy
import io
import random
import tomllib
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dicom
from dicom.codes import (
    LESION,
    LIVER,
    SegmentSpec,
    default_segment_specs,
    load_segment_specs,
    segment_specs_from_mapping,
)
from dicom.provenance import UidFactory, created_by_node
from dicom.seg_reader import (
    SegGeometryError,
    SegReadError,
    SegReferenceError,
    read_segmentation,
)
from dicom.seg_writer import SegKind, SourceGeometry, SourceGeometryError, build_segmentation
from dicom.validate import dciodvfy
from tests.fixtures.dicom_data import OBLIQUE_ORIENTATION, TEST_UID_ROOT, CtCase, make_ct_case

REPO = Path(__file__).resolve().parents[2]
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
VESSEL = Code("59820001", "SCT", "Blood vessel")


def _roundtrip(ds: Dataset) -> Dataset:
    """Write to bytes and read back, as a receiving node would."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def _node_seg(case: CtCase, uids: UidFactory, **kwargs: object) -> hd.seg.Segmentation:
    args: dict[str, object] = dict(
        model_id="i3deep-demo",
        model_version="0.1",
        series_uid=uids.new(),
        sop_uid=uids.new(),
        series_number=900,
    )
    args.update(kwargs)
    return build_segmentation(case.datasets, case.labels, default_segment_specs(), **args)  # type: ignore[arg-type]


# -- the package under test ----------------------------------------------------------------


def test_dicom_package_is_this_repository() -> None:
    assert Path(dicom.__file__).resolve().is_relative_to(REPO)


# -- codes -------------------------------------------------------------------------------------


def test_default_specs_match_config_file() -> None:
    assert load_segment_specs(REPO / "config" / "segments.toml") == default_segment_specs()


def test_segment_specs_from_mapping_names_the_bad_key() -> None:
    text = """
    [[segments]]
    label_value = 1
    label = "organ"
    category = { code = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
    type = { code = "10200004", scheme = "SCT" }
    """
    with pytest.raises(ValueError, match=r"segments\[0\]\.type\.meaning"):
        segment_specs_from_mapping(tomllib.loads(text))
    with pytest.raises(ValueError, match="label_value"):
        SegmentSpec(0, "x", LIVER, LIVER)


# -- the node's writer and reader ----------------------------------------------------------


@pytest.mark.parametrize(
    "geometry",
    [
        {},
        {"descending": True},
        {"orientation": OBLIQUE_ORIENTATION},
        {"orientation": OBLIQUE_ORIENTATION, "descending": True},
    ],
    ids=["axial-ascending", "axial-descending", "oblique", "oblique-descending"],
)
def test_roundtrip_node_seg(geometry: dict[str, object], uid_factory: UidFactory) -> None:
    case = make_ct_case(**geometry)  # type: ignore[arg-type]
    shuffled = list(case.datasets)
    random.Random(3).shuffle(shuffled)
    specs = default_segment_specs()
    seg = build_segmentation(
        shuffled,
        case.labels,
        specs,
        model_id="i3deep-demo",
        model_version="0.1",
        series_uid=uid_factory.new(),
        sop_uid=uid_factory.new(),
        series_number=900,
    )
    nz = case.labels.shape[0]
    assert int(seg.NumberOfFrames) == nz * len(specs)  # empty frames kept
    received = _roundtrip(seg)
    result = read_segmentation(received, list(reversed(case.datasets)), specs)
    np.testing.assert_array_equal(result.labels, case.labels)
    assert result.slices_with_frames == set(range(nz))
    assert result.segment_mapping == {1: 1, 2: 2}
    assert result.unknown_segments == ()


def test_node_seg_attributes(ct_case: CtCase, uid_factory: UidFactory) -> None:
    series_uid, sop_uid = uid_factory.new(), uid_factory.new()
    seg = _node_seg(ct_case, uid_factory, series_uid=series_uid, sop_uid=sop_uid)
    src = ct_case.datasets[0]
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID == series_uid != src.SeriesInstanceUID
    assert seg.SOPInstanceUID == sop_uid
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesNumber == 900
    assert seg.SeriesDescription == "AI presegmentation (research use)"
    assert seg.ContentLabel == "AI_PRESEG"
    assert seg.Manufacturer == "i3node"
    assert str(seg.ContentCreatorName).rstrip("^") == "i3node"
    for number, item in enumerate(seg.SegmentSequence, start=1):
        assert item.SegmentNumber == number
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "i3deep-demo"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "0.1"
    lesion = seg.SegmentSequence[1]
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == LESION.value
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    referenced = {
        inst.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for inst in series.ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in ct_case.datasets}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    per_frame_refs = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert per_frame_refs == referenced


def test_refined_seg_is_semiautomatic_and_versioned(ct_case: CtCase, uid_factory: UidFactory) -> None:
    seg = _node_seg(ct_case, uid_factory, kind=SegKind.REFINED, version=2)
    assert seg.SeriesDescription == "AI refined v2 (research use)"
    assert seg.ContentLabel == "AI_REFINED_V2"
    assert {item.SegmentAlgorithmType for item in seg.SegmentSequence} == {"SEMIAUTOMATIC"}


def test_omitting_empty_frames_still_reads_back(ct_case: CtCase, uid_factory: UidFactory) -> None:
    seg = _node_seg(ct_case, uid_factory, keep_empty_frames=False)
    nz = ct_case.labels.shape[0]
    assert int(seg.NumberOfFrames) < 2 * nz
    result = read_segmentation(_roundtrip(seg), ct_case.datasets, default_segment_specs())
    np.testing.assert_array_equal(result.labels, ct_case.labels)
    assert result.slices_with_frames == {k for k in range(nz) if ct_case.labels[k].any()}


def test_writer_rejects_bad_arguments(ct_case: CtCase, uid_factory: UidFactory) -> None:
    with pytest.raises(ValueError, match="labels must have shape"):
        build_segmentation(
            ct_case.datasets, ct_case.labels[1:], default_segment_specs(), model_id="m", model_version="1",
            series_uid=uid_factory.new(), sop_uid=uid_factory.new(), series_number=1,
        )
    bad = ct_case.labels.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels contain values \[7\]"):
        build_segmentation(
            ct_case.datasets, bad, default_segment_specs(), model_id="m", model_version="1",
            series_uid=uid_factory.new(), sop_uid=uid_factory.new(), series_number=1,
        )
    with pytest.raises(ValueError, match="series_uid"):
        _node_seg(ct_case, uid_factory, series_uid=ct_case.datasets[0].SeriesInstanceUID)
    with pytest.raises(ValueError, match="sop_uid"):
        _node_seg(ct_case, uid_factory, sop_uid="not-a-uid")
    with pytest.raises(ValueError, match="version"):
        _node_seg(ct_case, uid_factory, version=0)
    other = make_ct_case()
    with pytest.raises(SourceGeometryError, match="SeriesInstanceUID"):
        build_segmentation(
            [*ct_case.datasets, other.datasets[0]], ct_case.labels, default_segment_specs(), model_id="m",
            model_version="1", series_uid=uid_factory.new(), sop_uid=uid_factory.new(), series_number=1,
        )


@pytest.mark.dciodvfy
@pytest.mark.parametrize("kind", [SegKind.PRESEG, SegKind.REFINED])
@pytest.mark.parametrize("orientation", [None, OBLIQUE_ORIENTATION], ids=["axial", "oblique"])
def test_node_seg_passes_dciodvfy(kind: SegKind, orientation: Sequence[float] | None, uid_factory: UidFactory) -> None:
    case = make_ct_case(descending=True) if orientation is None else make_ct_case(orientation=orientation)
    seg = _node_seg(case, uid_factory, kind=kind, version=1 if kind is SegKind.PRESEG else 3)
    report = dciodvfy(seg)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output


# -- SEGs from highdicom configured like a third-party tool ----------------------------------


def _hd_descriptions(
    order: Sequence[tuple[str, Code, Code]], algorithm_type: str = "MANUAL"
) -> list[hd.seg.SegmentDescription]:
    out = []
    for number, (label, category, prop) in enumerate(order, start=1):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=algorithm_type,
            )
        )
    return out


LESION_FIRST = [
    ("Lesion", Code("49755003", "SCT", "Morphologically Altered Structure"), LESION),
    ("Liver", Code("123037004", "SCT", "Anatomical Structure"), LIVER),
]


def _hd_seg(
    sources: Sequence[Dataset], pixel_array: np.ndarray, seg_type: str, **kwargs: object
) -> Dataset:
    args: dict[str, object] = dict(
        source_images=list(sources),
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=_hd_descriptions(LESION_FIRST),
        series_instance_uid=generate_uid(),
        series_number=1001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Other Vendor",
        manufacturer_model_name="viewer",
        software_versions="9",
        device_serial_number="x",
        omit_empty_frames=True,
    )
    args.update(kwargs)
    return _roundtrip(hd.seg.Segmentation(**args))  # type: ignore[arg-type]


def _sorted(case: CtCase) -> list[Dataset]:
    return list(SourceGeometry.from_datasets(case.datasets).datasets)


@pytest.mark.parametrize("descending", [False, True])
def test_highdicom_third_party_binary_renumbered(descending: bool) -> None:
    """Empty frames omitted, lesion = segment 1, organ = segment 2, MANUAL, sources given descending."""
    case = make_ct_case(descending=descending)
    sources = _sorted(case)[::-1]
    stacked = np.stack([case.labels == 2, case.labels >= 1], axis=-1).astype(np.uint8)[::-1]
    seg = _hd_seg(sources, stacked, "BINARY")
    result = read_segmentation(seg, case.datasets, default_segment_specs())
    assert result.segment_mapping == {1: 2, 2: 1}
    np.testing.assert_array_equal(result.labels, case.labels)  # overlap: lesion (2) wins over organ
    assert result.slices_with_frames == {k for k in range(case.labels.shape[0]) if case.labels[k].any()}


def test_highdicom_labelmap_sop_class() -> None:
    case = make_ct_case(orientation=OBLIQUE_ORIENTATION)
    relabel = np.array([0, 2, 1], dtype=np.uint8)[case.labels]  # lesion -> 1, organ -> 2
    seg = _hd_seg(_sorted(case), relabel, "LABELMAP")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    result = read_segmentation(seg, case.datasets, default_segment_specs())
    np.testing.assert_array_equal(result.labels, case.labels)


def test_highdicom_fractional_thresholded_at_half() -> None:
    case = make_ct_case()
    rng = np.random.default_rng(1)
    lesion_p = np.where(case.labels == 2, rng.uniform(0.55, 1.0, case.labels.shape), rng.uniform(0, 0.45, case.labels.shape))
    organ_p = np.where(case.labels >= 1, rng.uniform(0.55, 1.0, case.labels.shape), rng.uniform(0, 0.45, case.labels.shape))
    stacked = np.stack([lesion_p, organ_p], axis=-1).astype(np.float32)
    seg = _hd_seg(_sorted(case), stacked, "FRACTIONAL", omit_empty_frames=False, max_fractional_value=200)
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 200
    result = read_segmentation(seg, case.datasets, default_segment_specs())
    np.testing.assert_array_equal(result.labels, case.labels)


def test_partial_series_seg() -> None:
    case = make_ct_case()
    sources = _sorted(case)[3:7]
    stacked = np.stack([case.labels == 2, case.labels == 1], axis=-1).astype(np.uint8)[3:7]
    seg = _hd_seg(sources, stacked, "BINARY", omit_empty_frames=False)
    result = read_segmentation(seg, case.datasets, default_segment_specs())
    expected = np.zeros_like(case.labels)
    expected[3:7] = case.labels[3:7]
    np.testing.assert_array_equal(result.labels, expected)
    assert result.slices_with_frames == {3, 4, 5, 6}


# -- SEGs built frame by frame as a viewer saves an edit -----------------------------------


def viewer_style_seg(
    case: CtCase,
    frames: Sequence[tuple[int, int, np.ndarray]],
    segments: Sequence[tuple[str, Code, Code]],
    *,
    per_frame_references: bool = True,
    plane_positions: bool = True,
    seg_type: str = "BINARY",
) -> Dataset:
    """A Segmentation as OHIF/dcmjs or Slicer/dcmqi save an edit, built with plain pydicom.

    ``frames`` are ``(z index in sorted order, segment number, 2-D mask)`` in any order.
    """
    geometry = SourceGeometry.from_datasets(case.datasets)
    src = geometry.datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SEGMENTATION_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "FrameOfReferenceUID"):
        setattr(ds, key, src.get(key, ""))
    ds.PositionReferenceIndicator = ""
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 42
    ds.SeriesDescription = "Edited segmentation"
    ds.Manufacturer = "Viewer"
    ds.ManufacturerModelName = "viewer"
    ds.DeviceSerialNumber = "1"
    ds.SoftwareVersions = "1"
    ds.InstanceNumber = 1
    ds.ContentDate = src.StudyDate
    ds.ContentTime = src.StudyTime
    ds.ContentLabel = "EDIT"
    ds.ContentDescription = "edited"
    ds.ContentCreatorName = "Reader^Radiology"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geometry.rows, geometry.columns
    ds.SegmentationType = seg_type
    if seg_type == "BINARY":
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit = 0
    else:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.SegmentationFractionalType = "PROBABILITY"
        ds.MaximumFractionalValue = 255
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.SegmentsOverlap = "UNDEFINED"
    seq = []
    for number, (label, category, prop) in enumerate(segments, start=1):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = label
        item.SegmentAlgorithmType = "MANUAL"
        for keyword, code in (("SegmentedPropertyCategoryCodeSequence", category),
                              ("SegmentedPropertyTypeCodeSequence", prop)):
            c = Dataset()
            c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = code.value, code.scheme_designator, code.meaning
            setattr(item, keyword, [c])
        seq.append(item)
    ds.SegmentSequence = seq
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = geometry.series_uid
    instances = []
    for s in geometry.datasets:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = s.SOPClassUID, s.SOPInstanceUID
        instances.append(r)
    ref_series.ReferencedInstanceSequence = instances
    ds.ReferencedSeriesSequence = [ref_series]
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(src.PixelSpacing)
    measures.SliceThickness = src.SliceThickness
    shared.PixelMeasuresSequence = [measures]
    orient = Dataset()
    orient.ImageOrientationPatient = list(src.ImageOrientationPatient)
    shared.PlaneOrientationSequence = [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    dim_uid = generate_uid()
    dims = []
    for pointer, group, label in (((0x0062, 0x000B), (0x0062, 0x000A), "Segment"),
                                  ((0x0020, 0x0032), (0x0020, 0x9113), "Position")):
        d = Dataset()
        d.DimensionOrganizationUID = dim_uid
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = group
        d.DimensionDescriptionLabel = label
        dims.append(d)
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionIndexSequence = dims
    per_frame = []
    pixels = []
    for k, number, mask in frames:
        fg = Dataset()
        if per_frame_references:
            source_item = Dataset()
            source_item.ReferencedSOPClassUID = geometry.datasets[k].SOPClassUID
            source_item.ReferencedSOPInstanceUID = geometry.sop_uids[k]
            purpose = Dataset()
            purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
            purpose.CodeMeaning = "Source image for image processing operation"
            source_item.PurposeOfReferenceCodeSequence = [purpose]
            derivation_code = Dataset()
            derivation_code.CodeValue, derivation_code.CodingSchemeDesignator = "113076", "DCM"
            derivation_code.CodeMeaning = "Segmentation"
            derivation = Dataset()
            derivation.SourceImageSequence = [source_item]
            derivation.DerivationCodeSequence = [derivation_code]
            fg.DerivationImageSequence = [derivation]
        content = Dataset()
        content.DimensionIndexValues = [number, k + 1]
        fg.FrameContentSequence = [content]
        if plane_positions:
            position = Dataset()
            position.ImagePositionPatient = [f"{v:.6g}" for v in geometry.positions[k]]
            fg.PlanePositionSequence = [position]
        ident = Dataset()
        ident.ReferencedSegmentNumber = number
        fg.SegmentIdentificationSequence = [ident]
        per_frame.append(fg)
        pixels.append(mask)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.NumberOfFrames = len(per_frame)
    stack = np.stack(pixels).astype(np.uint8)
    if seg_type == "BINARY":
        ds.PixelData = pack_bits(stack)
    else:
        ds.PixelData = stack.tobytes()
    ds["PixelData"].VR = "OB"
    return _roundtrip(ds)


def _viewer_frames(case: CtCase, lesion_number: int, organ_number: int, rng_seed: int) -> list[tuple[int, int, np.ndarray]]:
    """Overlapping masks (organ includes the lesion), empty frames omitted, shuffled order."""
    frames = []
    for k in range(case.labels.shape[0]):
        if (case.labels[k] == 2).any():
            frames.append((k, lesion_number, (case.labels[k] == 2).astype(np.uint8)))
        if (case.labels[k] >= 1).any():
            frames.append((k, organ_number, (case.labels[k] >= 1).astype(np.uint8)))
    random.Random(rng_seed).shuffle(frames)
    return frames


@pytest.mark.parametrize(
    ("per_frame_references", "plane_positions"),
    [(True, True), (True, False), (False, True)],
    ids=["refs+positions", "refs-only", "positions-only"],
)
@pytest.mark.parametrize("geometry", [{}, {"descending": True}, {"orientation": OBLIQUE_ORIENTATION}],
                         ids=["ascending", "descending", "oblique"])
def test_viewer_style_seg(per_frame_references: bool, plane_positions: bool, geometry: dict[str, object]) -> None:
    case = make_ct_case(**geometry)  # type: ignore[arg-type]
    segments = [*LESION_FIRST[:1], ("Blood vessel", Code("123037004", "SCT", "Anatomical Structure"), VESSEL),
                ("liver", Code("123037004", "SCT", "Anatomical Structure"), LIVER)]
    frames = _viewer_frames(case, lesion_number=1, organ_number=3, rng_seed=5)
    vessel_k = int(np.argmax([(case.labels[k] == 0).sum() for k in range(case.labels.shape[0])]))
    frames.append((vessel_k, 2, (case.labels[vessel_k] == 0).astype(np.uint8)))  # unknown class
    seg = viewer_style_seg(
        case, frames, segments, per_frame_references=per_frame_references, plane_positions=plane_positions
    )
    result = read_segmentation(seg, list(reversed(case.datasets)), default_segment_specs())
    np.testing.assert_array_equal(result.labels, case.labels)
    assert result.segment_mapping == {1: 2, 3: 1}
    assert [(u.segment_number, u.label) for u in result.unknown_segments] == [(2, "Blood vessel")]
    assert "59820001" in result.unknown_segments[0].property_type
    assert result.slices_with_frames == {k for k, _, _ in frames}


def test_segments_mapped_by_label_when_codes_are_generic() -> None:
    """dcmjs-style generic codes ("Tissue"): the label decides."""
    case = make_ct_case()
    tissue = Code("85756007", "SCT", "Tissue")
    segments = [("organ", tissue, tissue), ("Lesion", tissue, tissue)]
    seg = viewer_style_seg(case, _viewer_frames(case, lesion_number=2, organ_number=1, rng_seed=1), segments)
    result = read_segmentation(seg, case.datasets, default_segment_specs())
    assert result.segment_mapping == {1: 1, 2: 2}
    np.testing.assert_array_equal(result.labels, case.labels)


@pytest.mark.parametrize("order", ["organ-first", "lesion-first"])
def test_overlap_rule_higher_label_wins(order: str) -> None:
    case = make_ct_case()
    k = int(np.argmax([(case.labels[i] == 2).sum() for i in range(case.labels.shape[0])]))
    organ = np.ones(case.labels[k].shape, dtype=np.uint8)
    lesion = (case.labels[k] == 2).astype(np.uint8)
    frames = [(k, 1, organ), (k, 2, lesion)]
    if order == "lesion-first":
        frames.reverse()
    segments = [("organ", Code("123037004", "SCT", "Anatomical Structure"), LIVER), LESION_FIRST[0]]
    result = read_segmentation(viewer_style_seg(case, frames, segments), case.datasets, default_segment_specs())
    expected = np.where(lesion > 0, 2, 1)
    np.testing.assert_array_equal(result.labels[k], expected)
    assert result.slices_with_frames == {k}


def test_viewer_fractional_frames() -> None:
    case = make_ct_case()
    k = 5
    prob = np.where(case.labels[k] >= 1, 128, 127).astype(np.uint8)  # 128 >= 127.5 -> organ
    segments = [("organ", Code("123037004", "SCT", "Anatomical Structure"), LIVER)]
    seg = viewer_style_seg(case, [(k, 1, prob)], segments, seg_type="FRACTIONAL")
    result = read_segmentation(seg, case.datasets, default_segment_specs())
    np.testing.assert_array_equal(result.labels[k], (case.labels[k] >= 1).astype(np.uint8))


def test_mistyped_fractional_rle_seg_from_dcmjs_is_read_as_binary() -> None:
    """dcmjs-based viewers saved FRACTIONAL SEGs (max 255) with RLE that store 0/1: not empty."""
    from pydicom.uid import RLELossless

    case = make_ct_case()
    frames = [(k, 1, (case.labels[k] >= 1).astype(np.uint8)) for k in (4, 5, 6)]
    segments = [("organ", Code("123037004", "SCT", "Anatomical Structure"), LIVER)]
    seg = viewer_style_seg(case, frames, segments, seg_type="FRACTIONAL")
    assert seg.MaximumFractionalValue == 255
    stack = np.frombuffer(seg.PixelData, np.uint8).reshape(3, case.labels.shape[1], case.labels.shape[2])
    seg.compress(RLELossless, stack)
    seg = _roundtrip(seg)
    assert seg.file_meta.TransferSyntaxUID == RLELossless
    result = read_segmentation(seg, case.datasets, default_segment_specs())
    for k in (4, 5, 6):
        np.testing.assert_array_equal(result.labels[k], (case.labels[k] >= 1).astype(np.uint8))
    assert result.warnings and "mis-typed BINARY" in result.warnings[0]
    # a genuine fractional SEG (values up to 255) is still thresholded at half, without a warning
    genuine = viewer_style_seg(case, [(5, 1, np.where(case.labels[5] >= 1, 200, 40).astype(np.uint8))], segments,
                               seg_type="FRACTIONAL")
    result = read_segmentation(genuine, case.datasets, default_segment_specs())
    assert not result.warnings
    np.testing.assert_array_equal(result.labels[5], (case.labels[5] >= 1).astype(np.uint8))


def test_seg_without_frames_or_pixel_data_is_unusable(ct_case: CtCase, uid_factory: UidFactory) -> None:
    """An empty read must never pass for "the radiologist erased everything"."""
    seg = _roundtrip(_node_seg(ct_case, uid_factory))
    no_frames = copy.deepcopy(seg)
    no_frames.NumberOfFrames = 0
    del no_frames.PixelData
    with pytest.raises(SegReadError, match="NumberOfFrames 0"):
        read_segmentation(no_frames, ct_case.datasets, default_segment_specs())
    no_pixels = copy.deepcopy(seg)
    del no_pixels.PixelData
    with pytest.raises(SegReadError, match="no Pixel Data"):
        read_segmentation(no_pixels, ct_case.datasets, default_segment_specs())


# -- SEGs that do not belong to the series -----------------------------------------------------


def test_seg_for_another_series_is_refused(ct_case: CtCase, uid_factory: UidFactory) -> None:
    seg = _roundtrip(_node_seg(ct_case, uid_factory))
    same_frame = make_ct_case(
        study_uid=ct_case.datasets[0].StudyInstanceUID,
        frame_of_reference_uid=ct_case.datasets[0].FrameOfReferenceUID,
    )
    with pytest.raises(SegReferenceError, match="another series"):
        read_segmentation(seg, same_frame.datasets, default_segment_specs())
    with pytest.raises(SegReferenceError, match="frame of reference"):
        read_segmentation(seg, make_ct_case().datasets, default_segment_specs())


def test_seg_with_foreign_frame_references_is_refused(ct_case: CtCase) -> None:
    other = make_ct_case(frame_of_reference_uid=ct_case.datasets[0].FrameOfReferenceUID)
    seg = viewer_style_seg(other, _viewer_frames(other, 2, 1, 0), LESION_FIRST[::-1], plane_positions=False)
    del seg.ReferencedSeriesSequence
    with pytest.raises(SegReferenceError, match="not in source_datasets"):
        read_segmentation(seg, ct_case.datasets, default_segment_specs())


def test_seg_in_another_frame_of_reference_is_refused(ct_case: CtCase, uid_factory: UidFactory) -> None:
    seg = _roundtrip(_node_seg(ct_case, uid_factory))
    seg.FrameOfReferenceUID = generate_uid()
    with pytest.raises(SegReferenceError, match="FrameOfReferenceUID"):
        read_segmentation(seg, ct_case.datasets, default_segment_specs())


def test_frame_off_the_slice_grid_is_refused(ct_case: CtCase) -> None:
    seg = viewer_style_seg(ct_case, [(4, 1, np.ones((24, 28), np.uint8))], LESION_FIRST, per_frame_references=False)
    ipp = [float(v) for v in seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 1.25]
    with pytest.raises(SegGeometryError, match="from the nearest source slice"):
        read_segmentation(seg, ct_case.datasets, default_segment_specs())


# -- provenance and validation -------------------------------------------------------------------


def test_uid_factory_and_created_by_node(ct_case: CtCase) -> None:
    uids = UidFactory(TEST_UID_ROOT)
    a, b = uids.new(), uids()
    assert a != b and a.startswith(TEST_UID_ROOT + ".") and len(a) <= 64
    assert uids.derive("job-1", "seg") == uids.derive("job-1", "seg") != uids.derive("job-1", "kos")
    for bad in ("1.2.", "abc", "1." * 30 + "1", "1.02.3"):
        with pytest.raises(ValueError, match="root"):
            UidFactory(bad)
    seg = _node_seg(ct_case, uids)
    assert created_by_node(seg, {seg.SOPInstanceUID})
    edited = viewer_style_seg(ct_case, [(0, 1, np.zeros((24, 28), np.uint8))], LESION_FIRST)
    edited.Manufacturer = "i3node"  # free text copied by a viewer does not count
    assert not created_by_node(edited, {seg.SOPInstanceUID})


@pytest.mark.dciodvfy
def test_dciodvfy_reports_errors(ct_case: CtCase) -> None:
    broken = copy.deepcopy(ct_case.datasets[0])
    del broken.Rows
    report = dciodvfy(broken)
    assert report.errors and not report.ok
    assert dciodvfy(ct_case.datasets[0]).ok


@pytest.mark.parametrize("geometry", [{"descending": True}, {"orientation": OBLIQUE_ORIENTATION}], ids=["descending", "oblique"])
def test_sorted_order_matches_series_loader(geometry: dict[str, object]) -> None:
    """The SEG/MPR/KOS builders and dicom.series agree on the z order (contracts.md)."""
    series = pytest.importorskip("dicom.series")
    case = make_ct_case(**geometry)  # type: ignore[arg-type]
    volume = series.load_series(case.datasets)
    ours = SourceGeometry.from_datasets(case.datasets)
    assert tuple(volume.sop_instance_uids) == ours.sop_uids
    assert [ds.SOPInstanceUID for ds in series.sort_datasets(case.datasets)] == list(ours.sop_uids)
    np.testing.assert_allclose(volume.origin, ours.positions[0], atol=1e-4)
    np.testing.assert_allclose(volume.spacing, ours.spacing, atol=1e-4)
    np.testing.assert_array_equal(volume.array, case.image)


def test_reference_and_position_disagreeing_is_refused(ct_case: CtCase) -> None:
    seg = viewer_style_seg(ct_case, [(4, 1, np.ones((24, 28), np.uint8))], LESION_FIRST)
    other = SourceGeometry.from_datasets(ct_case.datasets).positions[5]
    seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient = [f"{v:.6g}" for v in other]
    with pytest.raises(SegGeometryError, match="disagree"):
        read_segmentation(seg, ct_case.datasets, default_segment_specs())


@pytest.mark.dciodvfy
def test_viewer_style_seg_is_itself_valid(ct_case: CtCase) -> None:
    """The hand-built 'viewer' SEG is a conformant Segmentation, so the reader is tested on valid input."""
    seg = viewer_style_seg(ct_case, _viewer_frames(ct_case, 1, 2, 0), LESION_FIRST)
    report = dciodvfy(seg)
    assert report.errors == [], report.output
