"""Read a DICOM Segmentation back into a label map over its source series.

Viewers save edits as new SEG series with their own conventions (OHIF/dcmjs,
3D Slicer/dcmqi, highdicom, pydicom-seg): empty frames omitted, segments
renumbered or reordered, MANUAL algorithm type, sometimes only plane positions
and no per-frame source references.  :func:`read_segmentation` therefore places
every frame by geometry, never by frame order:

1. the per-frame source reference (``DerivationImageSequence`` >
   ``SourceImageSequence`` > ``ReferencedSOPInstanceUID`` in the Per-Frame
   Functional Groups), when it names one of the source instances; if the frame
   also has a plane position that lies on another slice, the SEG is refused
   (a broken writer; the corrections would land on the wrong slice);
2. otherwise the frame's ``PlanePositionSequence`` projected on the slice
   normal, matched to the nearest source slice within 30 % of the slice spacing
   (the in-plane offset must match the source slice as well).

Segments are mapped to the node's classes (:class:`~dicom.codes.SegmentSpec`)
by Segmented Property Type code (plus category when several classes share a
type), then by Segment Label (case-insensitive, also against the type's code
meaning).  Segments that match nothing are reported in
:attr:`SegReadResult.unknown_segments` and left out, never guessed.

Review regions (the node's AI advice, "check region N (confidence c)", see
:func:`dicom.seg_writer.build_review_regions_segmentation`) that a viewer saved together with
the edited classes are recognised first, by their Segmented Property Type
(:data:`dicom.codes.REVIEW_REGION_TYPE`) or their label, and never map to a class: they are
listed in :attr:`SegReadResult.review_regions`, their pixels are ignored and their frames do
not count in :attr:`SegReadResult.slices_with_frames`.

Segmentation types: BINARY; FRACTIONAL (a pixel belongs to a segment when its
value is at least half of MaximumFractionalValue); LABELMAP (Label Map
Segmentation Storage, pixel value = segment number), recognised by SOP Class
UID or by ``SegmentationType``. A FRACTIONAL SEG whose stored values never exceed 1
while MaximumFractionalValue is larger is a mis-typed BINARY one (dcmjs-based viewers
wrote such SEGs with RLE): its non-zero pixels count, and :attr:`SegReadResult.warnings`
says so.

A SEG without frames or without Pixel Data is refused (:class:`SegReadError`): an empty
read must never pass for "the radiologist erased everything".

Overlap rule: where segments overlap, the class with the **higher label value
wins** (with the default table lesion = 2 beats organ = 1, so a lesion drawn
inside the organ stays a lesion).  The result does not depend on frame order.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array as _decode_pixels
from pydicom.uid import SegmentationStorage

from dicom.codes import REVIEW_REGION_TYPE, SegmentSpec
from dicom.seg_writer import SourceGeometry

__all__ = [
    "LABELMAP_SEGMENTATION_STORAGE",
    "SEGMENTATION_STORAGE",
    "SegGeometryError",
    "SegReadError",
    "SegReadResult",
    "SegReferenceError",
    "UnknownSegment",
    "is_review_region",
    "read_segmentation",
]

SEGMENTATION_STORAGE = str(SegmentationStorage)
LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: A frame matches a source slice when its distance along the normal is within
#: this fraction of the slice spacing.
PLANE_TOLERANCE_FRACTION = 0.3
_INPLANE_TOL_FRACTION = 0.3
_ORIENTATION_TOL = 1e-3
#: SegmentLabel of a review region as the node writes it (a viewer may drop the codes).
_REVIEW_LABEL_RE = re.compile(r"^\s*check region\s+\d+\b", re.IGNORECASE)


class SegReadError(ValueError):
    """The dataset is not a Segmentation this reader can interpret."""


class SegReferenceError(SegReadError):
    """The Segmentation belongs to another series or frame of reference."""


class SegGeometryError(SegReadError):
    """A frame cannot be placed on a source slice (no reference, off-grid, resampled)."""


@dataclass(frozen=True)
class UnknownSegment:
    """A segment of the SEG that is not mapped to one of the node's classes.

    Attributes
    ----------
    segment_number : int
        SegmentNumber in the SEG.
    label : str
        SegmentLabel (may be empty).
    property_type : str
        Segmented Property Type as ``"(value, scheme, meaning)"`` (may be empty).
    """

    segment_number: int
    label: str
    property_type: str


@dataclass(frozen=True)
class SegReadResult:
    """Label map read from a Segmentation.

    Attributes
    ----------
    labels : numpy.ndarray
        ``uint8`` ``(z, y, x)`` in the source series' sorted order; 0 where no
        mapped segment covers a voxel.
    slices_with_frames : set[int]
        z indices that carry at least one frame of the SEG (any segment,
        mapped or not, except review regions).  With empty frames omitted,
        other slices were not stored by the writer.
    segment_mapping : dict[int, int]
        SEG SegmentNumber -> node label value, for every mapped segment.
    unknown_segments : tuple[UnknownSegment, ...]
        Segments that were not mapped (their pixels are ignored).
    warnings : tuple[str, ...]
        What was read leniently (e.g. a mis-typed FRACTIONAL SEG); no patient attribute.
    review_regions : tuple[UnknownSegment, ...]
        The node's own review regions (AI advice) found in the SEG: ignored, never a class.
    """

    labels: npt.NDArray[np.uint8]
    slices_with_frames: set[int]
    segment_mapping: dict[int, int]
    unknown_segments: tuple[UnknownSegment, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())
    review_regions: tuple[UnknownSegment, ...] = field(default=())


def _code_key(item: Dataset) -> tuple[str, str]:
    """``(code value, coding scheme)`` of a code item, for matching."""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
    return (str(value).strip(), str(item.get("CodingSchemeDesignator", "")).strip().upper())


def _first(seq: Iterable[Dataset] | None) -> Dataset | None:
    """First item of a sequence, ``None`` when absent or empty."""
    if seq is None:
        return None
    for item in seq:
        return item
    return None


def is_review_region(item: Dataset) -> bool:
    """Whether a SegmentSequence item is one of the node's review regions (AI advice).

    Parameters
    ----------
    item : pydicom.dataset.Dataset
        An item of a SEG's SegmentSequence.

    Returns
    -------
    bool
        True when its Segmented Property Type is :data:`dicom.codes.REVIEW_REGION_TYPE` or its
        SegmentLabel starts with ``"check region N"``.
    """
    type_item = _first(item.get("SegmentedPropertyTypeCodeSequence"))
    review_key = (REVIEW_REGION_TYPE.value, REVIEW_REGION_TYPE.scheme_designator.upper())
    if type_item is not None and _code_key(type_item) == review_key:
        return True
    return bool(_REVIEW_LABEL_RE.match(str(item.get("SegmentLabel", "") or "")))


def _describe_segment(item: Dataset) -> UnknownSegment:
    """Number, label and property type code of a segment, for reporting."""
    type_item = _first(item.get("SegmentedPropertyTypeCodeSequence"))
    code = ""
    if type_item is not None:
        value, scheme = _code_key(type_item)
        code = f"({value}, {scheme}, {type_item.get('CodeMeaning', '')!s})"
    return UnknownSegment(int(item.SegmentNumber), str(item.get("SegmentLabel", "") or ""), code)


def _map_segments(
    seg: Dataset, specs: Sequence[SegmentSpec]
) -> tuple[dict[int, int], list[UnknownSegment], list[UnknownSegment]]:
    """Map SEG segment numbers to node label values (by type code, category, label).

    Returns the mapping, the segments matching no class, and the review regions (never mapped).
    """
    if "SegmentSequence" not in seg or len(seg.SegmentSequence) == 0:
        raise SegReadError("seg has no SegmentSequence")
    by_type: dict[tuple[str, str], list[SegmentSpec]] = {}
    for spec in specs:
        key = (spec.property_type.value, spec.property_type.scheme_designator.upper())
        by_type.setdefault(key, []).append(spec)
    by_label: dict[str, SegmentSpec] = {}
    for spec in specs:
        by_label.setdefault(spec.label.casefold().strip(), spec)
    for spec in specs:
        by_label.setdefault(spec.property_type.meaning.casefold().strip(), spec)

    mapping: dict[int, int] = {}
    unknown: list[UnknownSegment] = []
    review: list[UnknownSegment] = []
    for item in seg.SegmentSequence:
        if is_review_region(item):
            review.append(_describe_segment(item))
            continue
        number = int(item.SegmentNumber)
        label = str(item.get("SegmentLabel", "") or "")
        type_item = _first(item.get("SegmentedPropertyTypeCodeSequence"))
        cat_item = _first(item.get("SegmentedPropertyCategoryCodeSequence"))
        match: SegmentSpec | None = None
        if type_item is not None:
            candidates = by_type.get(_code_key(type_item), [])
            if len(candidates) > 1 and cat_item is not None:
                cat = _code_key(cat_item)
                narrowed = [
                    s for s in candidates if (s.category.value, s.category.scheme_designator.upper()) == cat
                ]
                candidates = narrowed or candidates
            if len(candidates) > 1:
                by_name = [s for s in candidates if s.label.casefold() == label.casefold().strip()]
                candidates = by_name or candidates
            if len(candidates) == 1:
                match = candidates[0]
        if match is None and label.strip():
            match = by_label.get(label.casefold().strip())
        if match is None:
            unknown.append(_describe_segment(item))
        else:
            mapping[number] = match.label_value
    return mapping, unknown, review


def _check_references(seg: Dataset, geometry: SourceGeometry) -> None:
    """Refuse a SEG of another frame of reference or series, or referencing unknown instances."""
    seg_for = str(seg.get("FrameOfReferenceUID", "") or "")
    if seg_for and seg_for != geometry.frame_of_reference_uid:
        raise SegReferenceError(
            "seg is in another frame of reference (FrameOfReferenceUID differs from the source series)"
        )
    if "ReferencedSeriesSequence" in seg and len(seg.ReferencedSeriesSequence) > 0:
        ours = [s for s in seg.ReferencedSeriesSequence if str(s.get("SeriesInstanceUID", "")) == geometry.series_uid]
        if not ours:
            raise SegReferenceError(
                "seg references another series: the source SeriesInstanceUID is not in its ReferencedSeriesSequence"
            )
        known = set(geometry.sop_uids)
        missing = [
            str(inst.ReferencedSOPInstanceUID)
            for s in ours
            for inst in s.get("ReferencedInstanceSequence", [])
            if str(inst.ReferencedSOPInstanceUID) not in known
        ]
        if missing:
            raise SegReferenceError(
                f"seg references {len(missing)} instance(s) of the source series that are not in source_datasets"
            )


def _segmentation_type(seg: Dataset) -> str:
    """BINARY, FRACTIONAL or LABELMAP; refuse anything that is not a Segmentation."""
    sop_class = str(seg.get("SOPClassUID", ""))
    if sop_class == LABELMAP_SEGMENTATION_STORAGE:
        return "LABELMAP"
    if sop_class != SEGMENTATION_STORAGE and str(seg.get("Modality", "")) != "SEG":
        raise SegReadError(f"seg is not a Segmentation (SOPClassUID {sop_class!r})")
    seg_type = str(seg.get("SegmentationType", "")).upper()
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise SegReadError(f"seg has unsupported SegmentationType {seg_type!r}")
    return seg_type


def _shared(seg: Dataset) -> Dataset:
    """The Shared Functional Groups item (empty when absent)."""
    shared = _first(seg.get("SharedFunctionalGroupsSequence"))
    return shared if shared is not None else Dataset()


def _frame_attr(frame: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """First item of a functional group of a frame, falling back to the shared groups."""
    item = _first(frame.get(keyword))
    if item is None:
        item = _first(shared.get(keyword))
    return item


def _check_inplane(seg: Dataset, shared: Dataset, frames: Sequence[Dataset], geometry: SourceGeometry) -> None:
    """Refuse frames with another matrix size, orientation or pixel spacing than the source slices."""
    if int(seg.Rows) != geometry.rows or int(seg.Columns) != geometry.columns:
        raise SegGeometryError(
            f"seg frames are {seg.Rows}x{seg.Columns} but source slices are {geometry.rows}x{geometry.columns}"
            " (resampled segmentations are not supported)"
        )
    items = [_first(shared.get("PlaneOrientationSequence"))]
    items += [_first(f.get("PlaneOrientationSequence")) for f in frames]
    reference = np.asarray(geometry.orientation)
    for item in items:
        if item is None or "ImageOrientationPatient" not in item:
            continue
        iop = np.asarray([float(v) for v in item.ImageOrientationPatient])
        if iop.shape != (6,) or np.max(np.abs(iop - reference)) > _ORIENTATION_TOL:
            raise SegGeometryError("seg frames have another ImageOrientationPatient than the source slices")
    measures = _frame_attr(frames[0], shared, "PixelMeasuresSequence") if frames else None
    if measures is not None and "PixelSpacing" in measures:
        sy, sx = (float(v) for v in measures.PixelSpacing)
        if abs(sy - geometry.spacing[1]) > 1e-3 * max(1.0, sy) or abs(sx - geometry.spacing[2]) > 1e-3 * max(1.0, sx):
            raise SegGeometryError("seg PixelSpacing differs from the source slices (resampled segmentation)")


def _place_frames(
    seg: Dataset, frames: Sequence[Dataset], shared: Dataset, geometry: SourceGeometry
) -> list[int]:
    """Sorted source slice index of every frame, by per-frame reference or by plane position."""
    index_of = {uid: k for k, uid in enumerate(geometry.sop_uids)}
    sz = geometry.spacing[0]
    tol_normal = PLANE_TOLERANCE_FRACTION * sz
    tol_inplane = _INPLANE_TOL_FRACTION * min(geometry.spacing[1], geometry.spacing[2])
    placed: list[int] = []
    for f, frame in enumerate(frames):
        refs: list[str] = []
        for deriv in frame.get("DerivationImageSequence", []):
            for src in deriv.get("SourceImageSequence", []):
                if "ReferencedSOPInstanceUID" in src:
                    refs.append(str(src.ReferencedSOPInstanceUID))
        hits = [index_of[r] for r in refs if r in index_of]
        position = _first(frame.get("PlanePositionSequence"))
        if hits:
            if len(set(hits)) > 1:
                raise SegGeometryError(f"seg frame {f + 1} references several source slices")
            k = hits[0]
            if position is not None and "ImagePositionPatient" in position:
                d = float(np.asarray([float(v) for v in position.ImagePositionPatient]) @ geometry.normal)
                if abs(geometry.distances[k] - d) > tol_normal:
                    raise SegGeometryError(
                        f"seg frame {f + 1}: its plane position and its referenced source instance"
                        " disagree (broken writer); refusing to guess"
                    )
            placed.append(k)
            continue
        if position is None or "ImagePositionPatient" not in position:
            if refs:
                raise SegReferenceError(
                    f"seg frame {f + 1} references instances that are not in source_datasets (another series?)"
                )
            raise SegGeometryError(
                f"seg frame {f + 1} has neither a per-frame source reference nor a plane position"
            )
        ipp = np.asarray([float(v) for v in position.ImagePositionPatient])
        d = float(ipp @ geometry.normal)
        k = int(np.argmin(np.abs(geometry.distances - d)))
        if abs(geometry.distances[k] - d) > tol_normal:
            if refs:
                raise SegReferenceError(
                    f"seg frame {f + 1} references instances that are not in source_datasets (another series?)"
                )
            raise SegGeometryError(
                f"seg frame {f + 1} lies {abs(geometry.distances[k] - d):.3f} mm from the nearest source slice"
            )
        offset = ipp - geometry.positions[k]
        inplane = offset - (offset @ geometry.normal) * geometry.normal
        if float(np.linalg.norm(inplane)) > tol_inplane:
            raise SegGeometryError(
                f"seg frame {f + 1} is shifted in-plane by {np.linalg.norm(inplane):.3f} mm from its source slice"
            )
        placed.append(k)
    return placed


def read_segmentation(
    seg: Dataset,
    source_datasets: Sequence[Dataset],
    segments: Sequence[SegmentSpec],
) -> SegReadResult:
    """Read a Segmentation into a label map aligned with its source series.

    Parameters
    ----------
    seg : pydicom.dataset.Dataset
        A Segmentation (BINARY, FRACTIONAL or LABELMAP) with pixel data.
    source_datasets : Sequence[pydicom.dataset.Dataset]
        The whole source series, any order (metadata suffices).
    segments : Sequence[SegmentSpec]
        The node's classes; SEG segments are mapped onto them.

    Returns
    -------
    SegReadResult
        Labels in sorted order, slices carrying frames, segment mapping and
        unknown segments.

    Raises
    ------
    SegReferenceError
        The SEG references another series, instances that are not in
        ``source_datasets``, or another FrameOfReferenceUID.
    SegGeometryError
        A frame cannot be placed on a source slice.
    SegReadError
        ``seg`` is not a readable Segmentation.
    """
    if not isinstance(seg, Dataset):
        raise SegReadError(f"seg must be a pydicom Dataset, got {type(seg).__name__}")
    specs = tuple(segments)
    if not specs or not all(isinstance(s, SegmentSpec) for s in specs):
        raise ValueError("segments must be a non-empty sequence of SegmentSpec")
    geometry = SourceGeometry.from_datasets(source_datasets)
    seg_type = _segmentation_type(seg)
    _check_references(seg, geometry)
    mapping, unknown, review = _map_segments(seg, specs)
    frames = _per_frame_groups(seg)
    shared = _shared(seg)
    _check_inplane(seg, shared, frames, geometry)
    slice_index = _place_frames(seg, frames, shared, geometry)
    pixels = _frame_pixels(seg, len(frames))
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    if seg_type == "LABELMAP":
        _paint_labelmap(labels, pixels, slice_index, seg, mapping)
        return SegReadResult(labels, set(slice_index), mapping, tuple(unknown), review_regions=tuple(review))
    threshold, warnings = _inside_threshold(seg, seg_type, pixels)
    _paint_segment_frames(labels, pixels, slice_index, frames, shared, mapping, seg_type, threshold)
    review_numbers = {r.segment_number for r in review}
    with_frames = {k for f, k in enumerate(slice_index)
                   if _frame_segment_number(frames[f], shared, f) not in review_numbers}
    return SegReadResult(labels, with_frames, mapping, tuple(unknown), tuple(warnings), tuple(review))


# -- read_segmentation: frames and pixels ------------------------------------


def _per_frame_groups(seg: Dataset) -> list[Dataset]:
    """Per-frame functional groups; refuse a SEG without frames or Pixel Data, or with a group per frame missing."""
    raw_frames = seg.get("NumberOfFrames", None)
    n_frames = 1 if raw_frames is None or str(raw_frames).strip() == "" else int(raw_frames)
    if n_frames < 1:
        raise SegReadError(f"seg has NumberOfFrames {n_frames}: no frame to read corrections from")
    if "PixelData" not in seg or not seg.PixelData:
        raise SegReadError("seg has no Pixel Data: no frame to read corrections from")
    frames = list(seg.get("PerFrameFunctionalGroupsSequence", []))
    if len(frames) != n_frames:
        raise SegReadError(
            f"seg has {n_frames} frames but {len(frames)} PerFrameFunctionalGroupsSequence items"
        )
    return frames


def _frame_pixels(seg: Dataset, n_frames: int) -> npt.NDArray[np.generic]:
    """Decoded pixel data as ``(frames, rows, columns)``; refuse another number of frames."""
    pixels = _decode_pixels(seg)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape[0] != n_frames:
        raise SegReadError(f"seg pixel data holds {pixels.shape[0]} frames, NumberOfFrames is {n_frames}")
    return pixels


def _inside_threshold(seg: Dataset, seg_type: str, pixels: npt.NDArray[np.generic]) -> tuple[float, list[str]]:
    """Pixel value from which a frame pixel is inside its segment, and warnings on a mis-typed FRACTIONAL SEG."""
    threshold: float = 1.0
    warnings: list[str] = []
    if seg_type == "FRACTIONAL":
        max_value = float(seg.get("MaximumFractionalValue", 255) or 255)
        threshold = 0.5 * max_value
        if max_value > 1 and pixels.size and int(pixels.max()) <= 1:
            threshold = 1.0
            warnings.append(
                f"FRACTIONAL seg with MaximumFractionalValue {max_value:g} stores only 0 and 1: read as a "
                "mis-typed BINARY segmentation (non-zero = inside)"
            )
    return threshold, warnings


# -- read_segmentation: painting the label map -------------------------------


def _paint_labelmap(
    labels: npt.NDArray[np.uint8],
    pixels: npt.NDArray[np.generic],
    slice_index: Sequence[int],
    seg: Dataset,
    mapping: dict[int, int],
) -> None:
    """Paint LABELMAP frames (pixel value = segment number) into ``labels``; higher label values win."""
    lut = np.zeros(max([0, *[int(s.SegmentNumber) for s in seg.SegmentSequence]]) + 1, dtype=np.uint8)
    for number, value in mapping.items():
        lut[number] = value
    for f, k in enumerate(slice_index):
        frame = pixels[f]
        valid = frame < lut.shape[0]
        values = np.where(valid, lut[np.where(valid, frame, 0)], 0).astype(np.uint8)
        np.maximum(labels[k], values, out=labels[k])


def _frame_segment_number(frame: Dataset, shared: Dataset, f: int) -> int:
    """ReferencedSegmentNumber of a BINARY/FRACTIONAL frame (``f``: 0-based, for the message)."""
    ident = _frame_attr(frame, shared, "SegmentIdentificationSequence")
    if ident is None or "ReferencedSegmentNumber" not in ident:
        raise SegReadError(f"seg frame {f + 1} has no SegmentIdentificationSequence")
    return int(ident.ReferencedSegmentNumber)


def _paint_segment_frames(
    labels: npt.NDArray[np.uint8],
    pixels: npt.NDArray[np.generic],
    slice_index: Sequence[int],
    frames: Sequence[Dataset],
    shared: Dataset,
    mapping: dict[int, int],
    seg_type: str,
    threshold: float,
) -> None:
    """Paint BINARY/FRACTIONAL frames (one segment each) into ``labels``; higher label values win."""
    for f, k in enumerate(slice_index):
        label = mapping.get(_frame_segment_number(frames[f], shared, f))
        if label is None:
            continue
        frame = pixels[f]
        if seg_type == "BINARY":
            inside = frame if frame.dtype == np.uint8 else (frame != 0).astype(np.uint8)
            candidate = inside * np.uint8(label)
        else:
            candidate = (frame >= threshold).view(np.uint8) * np.uint8(label)
        np.maximum(labels[k], candidate, out=labels[k])
