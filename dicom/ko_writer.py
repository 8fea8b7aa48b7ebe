"""Key Object Selection: the slices the node asks a radiologist to correct.

The KOS references, for each pick, the image a viewer can open directly: the
source instance for an axial pick, the derived MPR image (see
:mod:`dicom.mpr`) for a coronal or sagittal pick; it also references the AI
SEG to edit.  A TEXT item (Key Object Description) lists every slice in plain
words, ranked by uncertainty, and then the review regions (AI advice, papers/003) with
the axial slices they span and their centre in patient coordinates; the review-regions
SEG is referenced too.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom.codes import OF_INTEREST
from dicom.mpr import locate_reformatted_image
from dicom.seg_writer import MANUFACTURER, SourceGeometry, review_region_label

__all__ = ["SlicePick", "build_key_object_selection", "describe_picks", "describe_review_regions"]

_AXIS_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}
_AXIS_COORD = {0: "z", 1: "y", 2: "x"}
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class SlicePick:
    """One slice selected for review.

    Parameters
    ----------
    axis : int
        0 axial (source slice), 1 coronal, 2 sagittal (volume axes, contracts.md).
    index : int
        0-based index along ``axis`` in the sorted volume.
    position_mm : float
        Position of the slice along ``axis`` in mm (for the text).
    rank : int
        1-based rank by uncertainty (1 = most uncertain), over all picks.
    uncertainty : float
        Slice uncertainty score (for the text).
    """

    axis: int
    index: int
    position_mm: float
    rank: int
    uncertainty: float

    def __post_init__(self) -> None:
        if self.axis not in _AXIS_NAMES:
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"index must be a non-negative int, got {self.index!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        for name in ("position_mm", "uncertainty"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")


def describe_picks(picks: Sequence[SlicePick], shape: Sequence[int], images: Sequence[Dataset] | None = None) -> str:
    """Plain-language list of the slices to review, in rank order.

    Parameters
    ----------
    picks : Sequence[SlicePick]
        The picks.
    shape : Sequence[int]
        ``(z, y, x)`` volume shape (for "slice i of n").
    images : Sequence[pydicom.dataset.Dataset] or None
        The referenced image per pick (same order), to name its series and
        image number as a viewer shows them.

    Returns
    -------
    str
        One line per pick, e.g. ``"Please review axial slice 15 of 32 (index 14,
        z = 35.0 mm; series 1, image 18), rank 1 of 9, uncertainty 0.412."``
    """
    order = _rank_order(picks)
    total = len(picks)
    lines = [f"i3node asks for review of {total} slice(s), most uncertain first (AI output, research use):"]
    for i in order:
        p = picks[i]
        where = ""
        if images is not None:
            img = images[i]
            where = f"; series {img.get('SeriesNumber', '?')}, image {img.get('InstanceNumber', '?')}"
        lines.append(
            f"Please review {_AXIS_NAMES[p.axis]} slice {p.index + 1} of {shape[p.axis]} "
            f"(index {p.index}, {_AXIS_COORD[p.axis]} = {p.position_mm:.1f} mm{where}), "
            f"rank {p.rank} of {total}, uncertainty {p.uncertainty:.3f}."
        )
    lines.append("Correct these slices in the referenced AI segmentation and save it as a new segmentation.")
    return "\n".join(lines)


def describe_review_regions(
    rank_map: npt.ArrayLike, confidences: Sequence[float], geometry: SourceGeometry
) -> str:
    """Plain-language list of the review regions: axial slices spanned and centre in mm.

    Parameters
    ----------
    rank_map : array_like
        Integer ``(z, y, x)`` map in the sorted order of ``geometry``: 0 outside every region,
        ``r`` inside region ``r`` (1 = least confident).
    confidences : Sequence[float]
        Mean ensemble confidence of region 1, 2, ...
    geometry : SourceGeometry
        The source series (patient coordinates of the voxels).

    Returns
    -------
    str
        One line per region, e.g. ``"check region 1 (confidence 0.58): axial slices 11-15 of 32
        (index 10-14), centre x = 12.3, y = -4.0, z = 35.0 mm (patient coordinates), 412 voxels."``

    Raises
    ------
    ValueError
        If ``rank_map`` has another shape than the series or a region is empty.
    """
    from scipy import ndimage

    ranks = np.asarray(rank_map)
    if ranks.shape != geometry.shape:
        raise ValueError(f"review rank_map must have shape {geometry.shape} (z, y, x), got {ranks.shape}")
    numbers = list(range(1, len(confidences) + 1))
    if ranks.size and (int(ranks.min()) < 0 or int(ranks.max()) > len(numbers)):
        raise ValueError(f"review rank_map values must lie in 0..{len(numbers)} (one confidence per region)")
    boxes = ndimage.find_objects(ranks.astype(np.int32), max_label=len(numbers))
    centres = ndimage.center_of_mass(np.ones(ranks.shape, dtype=np.uint8), ranks, numbers)
    sizes = ndimage.sum_labels(np.ones(ranks.shape, dtype=np.uint8), ranks, numbers)
    n = geometry.shape[0]
    lines = [
        f"i3node also marks {len(numbers)} region(s) where the AI ensemble is least confident, in the series "
        "'AI review regions (research use)'; check them first (AI advice, research use):"
    ]
    for r, confidence, box, centre, size in zip(numbers, confidences, boxes, centres, sizes, strict=True):
        if box is None:
            raise ValueError(f"review region {r} has no voxel in rank_map")
        z0, z1 = box[0].start, box[0].stop - 1
        x, y, z = geometry.patient_position(*(float(c) for c in centre))
        lines.append(
            f"{review_region_label(r, float(confidence))}: axial slices {z0 + 1}-{z1 + 1} of {n} "
            f"(index {z0}-{z1}), centre x = {x:.1f}, y = {y:.1f}, z = {z:.1f} mm (patient coordinates), "
            f"{int(size)} voxels."
        )
    return "\n".join(lines)


def build_key_object_selection(
    source_datasets: Sequence[Dataset],
    picks: Sequence[SlicePick],
    seg: Dataset,
    mpr_datasets: Sequence[Dataset] = (),
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    title: Code = OF_INTEREST,
    instance_number: int = 1,
    series_description: str = "AI slices to review (research use)",
    review_seg: Dataset | None = None,
    review_rank_map: npt.ArrayLike | None = None,
    review_confidences: Sequence[float] = (),
) -> hd.ko.KeyObjectSelectionDocument:
    """Build a KOS that references the slices to correct and the AI SEG.

    Parameters
    ----------
    source_datasets : Sequence[pydicom.dataset.Dataset]
        The source series, any order (metadata suffices).
    picks : Sequence[SlicePick]
        Slices to review; axial picks reference source instances, coronal and
        sagittal picks the matching image of ``mpr_datasets``.
    seg : pydicom.dataset.Dataset
        The AI Segmentation to edit (same study and frame of reference).
    mpr_datasets : Sequence[pydicom.dataset.Dataset]
        Derived reformatted images; matched to picks by geometry
        (:func:`dicom.mpr.locate_reformatted_image`), any order.
    series_uid, sop_uid : str
        UIDs of the new KOS series and instance.
    series_number : int
        SeriesNumber of the KOS series.
    title : pydicom.sr.coding.Code
        Document title (CID 7010), default (113000, DCM, "Of Interest").
    instance_number : int
        InstanceNumber.
    series_description : str
        SeriesDescription.
    review_seg : pydicom.dataset.Dataset or None
        The review-regions SEG (:func:`dicom.seg_writer.build_review_regions_segmentation`),
        referenced after the AI SEG.
    review_rank_map : array_like or None
        Its regions (``(z, y, x)``, 0 outside, ``r`` in region ``r``); with ``review_confidences``
        the text lists them after the slices (:func:`describe_review_regions`).
    review_confidences : Sequence[float]
        Mean confidence of region 1, 2, ...

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        The document (not yet written).

    Raises
    ------
    ValueError
        If an argument is malformed or a pick has no image to reference (the
        message names the argument).
    """
    geometry = SourceGeometry.from_datasets(source_datasets)
    _check_arguments(geometry, picks, seg, title, series_uid, sop_uid, series_number)
    if review_seg is not None:
        _check_seg(geometry, review_seg, "review_seg")
    images = _picked_images(geometry, picks, _mpr_by_location(geometry, mpr_datasets))
    referenced = _referenced_objects(picks, images, seg, review_seg)
    description = describe_picks(picks, geometry.shape, images)
    if review_rank_map is not None and len(review_confidences) > 0:
        description += "\n" + describe_review_regions(review_rank_map, review_confidences, geometry)
    content = hd.ko.KeyObjectSelection(
        document_title=title,
        referenced_objects=referenced,
        description=description,
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        series_description=series_description,
    )


def _rank_order(picks: Sequence[SlicePick]) -> list[int]:
    """Indices of ``picks`` by rank, then axis and index."""
    return sorted(range(len(picks)), key=lambda i: (picks[i].rank, picks[i].axis, picks[i].index))


def _check_arguments(
    geometry: SourceGeometry,
    picks: Sequence[SlicePick],
    seg: Dataset,
    title: Code,
    series_uid: str,
    sop_uid: str,
    series_number: int,
) -> None:
    """Validate the picks, the title, the new UIDs and series number, and the SEG."""
    if not picks:
        raise ValueError("picks must not be empty")
    if not all(isinstance(p, SlicePick) for p in picks):
        raise ValueError("picks must be SlicePick instances")
    if not isinstance(title, Code):
        raise ValueError("title must be a pydicom.sr.coding.Code")
    for name, value in (("series_uid", series_uid), ("sop_uid", sop_uid)):
        if not isinstance(value, str) or len(value) > 64 or not _UID_RE.fullmatch(value):
            raise ValueError(f"{name} must be a DICOM UID, got {value!r}")
    if not isinstance(series_number, int) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")
    _check_seg(geometry, seg, "seg")


def _check_seg(geometry: SourceGeometry, seg: Dataset, name: str) -> None:
    """Refuse a dataset that is not a SEG of the source series' study and frame of reference."""
    if not isinstance(seg, Dataset) or str(seg.get("Modality", "")) != "SEG":
        raise ValueError(f"{name} must be a Segmentation dataset (Modality SEG)")
    if str(seg.StudyInstanceUID) != geometry.study_uid:
        raise ValueError(f"{name} must belong to the study of source_datasets")
    if str(seg.get("FrameOfReferenceUID", "")) != geometry.frame_of_reference_uid:
        raise ValueError(f"{name} must share the FrameOfReferenceUID of source_datasets")


def _mpr_by_location(geometry: SourceGeometry, mpr_datasets: Sequence[Dataset]) -> dict[tuple[int, int], Dataset]:
    """Map (axis, index) to the reformatted image of the source series at that location."""
    by_location: dict[tuple[int, int], Dataset] = {}
    for i, ds in enumerate(mpr_datasets):
        if str(ds.get("StudyInstanceUID", "")) != geometry.study_uid:
            raise ValueError(f"mpr_datasets[{i}] belongs to another study")
        location = locate_reformatted_image(ds, geometry.datasets)
        if location is None:
            raise ValueError(f"mpr_datasets[{i}] is not a coronal/sagittal reformat of source_datasets")
        by_location[(int(location[0]), location[1])] = ds
    return by_location


def _picked_images(
    geometry: SourceGeometry, picks: Sequence[SlicePick], mpr_by_location: dict[tuple[int, int], Dataset]
) -> list[Dataset]:
    """The image to reference per pick: a source instance (axial) or a reformatted image."""
    images: list[Dataset] = []
    for i, pick in enumerate(picks):
        n = geometry.shape[pick.axis]
        if pick.index >= n:
            raise ValueError(f"picks[{i}].index {pick.index} is outside 0..{n - 1} along axis {pick.axis}")
        if pick.axis == 0:
            images.append(geometry.datasets[pick.index])
        else:
            image = mpr_by_location.get((pick.axis, pick.index))
            if image is None:
                raise ValueError(
                    f"mpr_datasets has no {_AXIS_NAMES[pick.axis]} image at index {pick.index} for picks[{i}]"
                )
            images.append(image)
    return images


def _referenced_objects(
    picks: Sequence[SlicePick], images: Sequence[Dataset], seg: Dataset, review_seg: Dataset | None = None
) -> list[Dataset]:
    """The picked images in rank order, then the SEG (and the review-regions SEG), each instance once."""
    referenced: list[Dataset] = []
    seen: set[str] = set()
    extra = [] if review_seg is None else [review_seg]
    for ds in [*(images[i] for i in _rank_order(picks)), seg, *extra]:
        uid = str(ds.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            referenced.append(ds)
    return referenced
