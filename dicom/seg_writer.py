"""Build the node's DICOM Segmentations (AI presegmentation and refined versions).

:func:`build_segmentation` turns a label map ``(z, y, x)`` in the source series'
sorted order into a highdicom :class:`~highdicom.seg.Segmentation`: BINARY, one
segment per foreground class, one frame per source slice and segment (empty
frames kept by default for the widest viewer compatibility), every source
instance referenced, a new series in the source study.  The builder returns
the object; the caller writes and sends it.

:class:`SourceGeometry` is the shared view of a single-frame source series
(sorted along the slice normal) that the SEG reader, the MPR and KOS builders
use too.

:func:`build_review_regions_segmentation` writes the AI advice (papers/003): the least
confident supervoxels as segments "check region N (confidence c)", in a series of their own
that never maps onto the node's classes when it comes back (:mod:`dicom.seg_reader`).
"""
from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TypedDict

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as _sr_codes

from dicom.codes import REVIEW_REGION_CATEGORY, REVIEW_REGION_TYPE, SegmentSpec

__all__ = [
    "MANUFACTURER",
    "MAX_REVIEW_REGIONS",
    "REVIEW_CONTENT_LABEL",
    "SegKind",
    "SourceGeometry",
    "SourceGeometryError",
    "build_review_regions_segmentation",
    "build_segmentation",
    "review_region_label",
    "review_region_specs",
    "segment_descriptions",
]

#: Manufacturer / content creator recorded in every object the node creates.
MANUFACTURER = "i3node"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ORIENTATION_TOL = 1e-3
_POSITION_TOL_MM = 1e-3


class SegKind(enum.Enum):
    """Which node output a Segmentation is."""

    PRESEG = "PRESEG"
    """AI presegmentation (SegmentAlgorithmType AUTOMATIC)."""
    REFINED = "REFINED"
    """Refined segmentation from expert corrections (SEMIAUTOMATIC)."""
    REVIEW_REGIONS = "REVIEW_REGIONS"
    """AI advice: low-confidence regions to check first (AUTOMATIC), not classes."""


_ALGORITHM_TYPES: dict[SegKind, hd.seg.SegmentAlgorithmTypeValues] = {
    SegKind.PRESEG: hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
    SegKind.REFINED: hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
    SegKind.REVIEW_REGIONS: hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
}

#: ContentLabel of the review-regions SEG.
REVIEW_CONTENT_LABEL = "AI_REVIEW"
#: Most review regions one SEG holds (one distinct display colour each).
MAX_REVIEW_REGIONS = 20
# Distinct, saturated colours (none equal to the default class colours), region 1 first.
_REVIEW_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 255), (0, 255, 255), (255, 128, 0), (0, 128, 255), (128, 255, 0),
    (255, 0, 128), (0, 255, 128), (128, 0, 255), (255, 64, 64), (64, 64, 255),
    (192, 192, 0), (0, 192, 192), (192, 0, 192), (255, 160, 160), (160, 160, 255),
    (160, 255, 160), (128, 64, 0), (0, 64, 128), (64, 128, 0), (128, 0, 64),
)


class SourceGeometryError(ValueError):
    """The source datasets do not form one consistent single-frame series."""


@dataclass(frozen=True)
class SourceGeometry:
    """Geometry of a single-frame image series sorted along the slice normal.

    Use :meth:`from_datasets`; attributes follow ``docs/contracts.md``.

    Attributes
    ----------
    datasets : tuple[pydicom.dataset.Dataset, ...]
        Source datasets sorted ascending along ``normal``.
    row, col, normal : numpy.ndarray
        Row cosine (increasing x index), column cosine (increasing y index)
        and ``cross(row, col)``.
    positions : numpy.ndarray
        ``(z, 3)`` ImagePositionPatient of each sorted slice.
    distances : numpy.ndarray
        ``(z,)`` projection of each position on ``normal`` (ascending).
    spacing : tuple[float, float, float]
        ``(z, y, x)`` mm; z is the median slice distance (1.0 for one slice
        without SliceThickness).
    rows, columns : int
        In-plane size.
    study_uid, series_uid, frame_of_reference_uid : str
        UIDs shared by all slices.
    sop_uids : tuple[str, ...]
        SOP Instance UIDs in sorted order.
    """

    datasets: tuple[Dataset, ...]
    row: npt.NDArray[np.float64]
    col: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]
    positions: npt.NDArray[np.float64]
    distances: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]
    rows: int
    columns: int
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: tuple[str, ...]

    @classmethod
    def from_datasets(cls, source_datasets: Sequence[Dataset], *, name: str = "source_datasets") -> SourceGeometry:
        """Validate and sort single-frame source datasets.

        Parameters
        ----------
        source_datasets : Sequence[pydicom.dataset.Dataset]
            One series of single-frame images, any order (pixel data not needed).
        name : str
            Argument name used in error messages.

        Returns
        -------
        SourceGeometry
            The sorted geometry.

        Raises
        ------
        SourceGeometryError
            Empty input, multi-frame images, several series / frames of
            reference / orientations / matrix sizes, duplicate instances or
            duplicate slice positions.
        """
        if isinstance(source_datasets, Dataset) or len(source_datasets) == 0:
            raise SourceGeometryError(f"{name} must be a non-empty sequence of datasets")
        first = source_datasets[0]
        for key in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "ImageOrientationPatient",
                    "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
            missing = [i for i, ds in enumerate(source_datasets) if key not in ds]
            if missing:
                raise SourceGeometryError(f"{name}[{missing[0]}] has no {key}")
        if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in source_datasets):
            raise SourceGeometryError(f"{name} must be single-frame images (multi-frame sources are not supported)")
        for key in ("SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
            values = {str(ds[key].value) for ds in source_datasets}
            if len(values) > 1:
                raise SourceGeometryError(f"{name} must share one {key}, found {len(values)} different values")
        fors = {str(ds.get("FrameOfReferenceUID", "")) for ds in source_datasets}
        if len(fors) > 1 or "" in fors:
            raise SourceGeometryError(f"{name} must share one non-empty FrameOfReferenceUID")
        iop = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
        for i, ds in enumerate(source_datasets):
            other = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
            if other.shape != (6,) or np.max(np.abs(other - iop)) > _ORIENTATION_TOL:
                raise SourceGeometryError(f"{name}[{i}] has a different ImageOrientationPatient (mixed orientation)")
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        if abs(np.linalg.norm(normal) - 1.0) > 1e-2:
            raise SourceGeometryError(f"{name} ImageOrientationPatient cosines are not orthonormal")
        normal = normal / np.linalg.norm(normal)
        uids = [str(ds.SOPInstanceUID) for ds in source_datasets]
        if len(set(uids)) != len(uids):
            raise SourceGeometryError(f"{name} contains the same SOPInstanceUID more than once")
        positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in source_datasets])
        distances = positions @ normal
        order = np.argsort(distances, kind="stable")
        distances = distances[order]
        if len(distances) > 1 and np.min(np.diff(distances)) < _POSITION_TOL_MM:
            raise SourceGeometryError(f"{name} contains two slices at the same position")
        if len(distances) > 1:
            sz = float(np.median(np.diff(distances)))
        else:
            sz = float(first.get("SliceThickness", 1.0) or 1.0)
        sy, sx = (float(v) for v in first.PixelSpacing)
        sorted_ds = tuple(source_datasets[int(i)] for i in order)
        return cls(
            datasets=sorted_ds,
            row=row,
            col=col,
            normal=normal,
            positions=positions[order],
            distances=distances,
            spacing=(sz, sy, sx),
            rows=int(first.Rows),
            columns=int(first.Columns),
            study_uid=str(first.StudyInstanceUID),
            series_uid=str(first.SeriesInstanceUID),
            frame_of_reference_uid=fors.pop(),
            sop_uids=tuple(str(ds.SOPInstanceUID) for ds in sorted_ds),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` shape of the volume."""
        return (len(self.datasets), self.rows, self.columns)

    @property
    def orientation(self) -> tuple[float, ...]:
        """ImageOrientationPatient as 6 floats."""
        return tuple(float(v) for v in (*self.row, *self.col))

    def patient_position(self, k: float, j: float, i: float) -> npt.NDArray[np.float64]:
        """Patient coordinates (mm) of voxel ``(k, j, i)`` (contracts.md convention)."""
        sz, sy, sx = self.spacing
        return self.positions[0] + k * sz * self.normal + j * sy * self.col + i * sx * self.row


def _software_version() -> str:
    """Installed i3node version ("0" in a source checkout without install)."""
    try:
        return metadata.version("i3node")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0"


def _check_uid(name: str, value: str) -> None:
    """Refuse anything but a DICOM UID (digits and dots, at most 64 characters)."""
    if not isinstance(value, str) or len(value) > 64 or not _UID_RE.fullmatch(value):
        raise ValueError(f"{name} must be a DICOM UID (digits and dots, at most 64 characters), got {value!r}")


def segment_descriptions(
    segments: Sequence[SegmentSpec],
    *,
    algorithm_type: hd.seg.SegmentAlgorithmTypeValues,
    model_id: str,
    model_version: str,
) -> list[hd.seg.SegmentDescription]:
    """Segment descriptions numbered 1..n in the order of ``segments``.

    Parameters
    ----------
    segments : Sequence[SegmentSpec]
        Foreground classes.
    algorithm_type : highdicom.seg.SegmentAlgorithmTypeValues
        AUTOMATIC, SEMIAUTOMATIC or MANUAL.
    model_id, model_version : str
        Algorithm name and version (ignored for MANUAL).

    Returns
    -------
    list[highdicom.seg.SegmentDescription]
        One description per spec.
    """
    algorithm = None
    if algorithm_type != hd.seg.SegmentAlgorithmTypeValues.MANUAL:
        algorithm = hd.AlgorithmIdentificationSequence(
            name=model_id,
            family=_sr_codes.cid7162.ArtificialIntelligence,
            version=model_version,
        )
    out = []
    for number, spec in enumerate(segments, start=1):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=spec.label,
                segmented_property_category=spec.category,
                segmented_property_type=spec.property_type,
                algorithm_type=algorithm_type,
                algorithm_identification=algorithm,
                anatomic_regions=None if spec.anatomic_region is None else [spec.anatomic_region],
                display_color=hd.color.CIELabColor.from_rgb(*spec.color_rgb),
            )
        )
    return out


def build_segmentation(
    source_datasets: Sequence[Dataset],
    labels: npt.ArrayLike,
    segments: Sequence[SegmentSpec],
    *,
    model_id: str,
    model_version: str,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    kind: SegKind = SegKind.PRESEG,
    version: int = 1,
    instance_number: int = 1,
    series_description: str | None = None,
    content_label: str | None = None,
    keep_empty_frames: bool = True,
    device_serial_number: str = "1",
    uid_root: str | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY Segmentation of a label map over a single-frame series.

    Parameters
    ----------
    source_datasets : Sequence[pydicom.dataset.Dataset]
        The source series, any order (metadata suffices).  They are sorted along
        the slice normal so that ``labels[k]`` maps to the k-th sorted slice.
    labels : array_like
        Integer label map ``(z, y, x)`` in sorted order; 0 is background and
        every other value must be the ``label_value`` of one of ``segments``.
    segments : Sequence[SegmentSpec]
        Foreground classes; each becomes one segment (numbered 1..n in the
        given order), present in ``labels`` or not.
    model_id, model_version : str
        Algorithm name and version recorded in every segment.
    series_uid, sop_uid : str
        UIDs of the new series and instance (fixed by the caller per job).
    series_number : int
        SeriesNumber of the new series.
    kind : SegKind
        PRESEG (SegmentAlgorithmType AUTOMATIC), REFINED (SEMIAUTOMATIC) or REVIEW_REGIONS
        (AUTOMATIC; prefer :func:`build_review_regions_segmentation`).
    version : int
        Output version (1 for the presegmentation, 2, 3, ... for refinements);
        used in the default series description and content label.
    instance_number : int
        InstanceNumber.
    series_description : str or None
        Overrides the default ``"AI presegmentation (research use)"`` /
        ``"AI refined v{version} (research use)"``.
    content_label : str or None
        Overrides the default ContentLabel ``"AI_PRESEG"`` / ``"AI_REFINED_V{version}"``.
    keep_empty_frames : bool
        Keep one frame per source slice and segment even if empty (default;
        widest viewer compatibility).  ``False`` omits empty frames.
    device_serial_number : str
        DeviceSerialNumber (e.g. the node's id).
    uid_root : str or None
        When given, the DimensionOrganizationUID is generated below this root
        instead of highdicom's.

    Returns
    -------
    highdicom.seg.Segmentation
        The Segmentation (not yet written).

    Raises
    ------
    ValueError
        If an argument is malformed; the message names the argument.
    """
    geometry = SourceGeometry.from_datasets(source_datasets)
    _check_arguments(kind, version, series_number, instance_number, model_id, model_version)
    _check_uids(series_uid, sop_uid, uid_root, source_series_uid=geometry.series_uid)
    specs = _check_segments(segments)
    segment_numbers = _segment_numbers(labels, specs, geometry.shape)
    content = _content_identification(kind, version, series_description, content_label)
    seg = hd.seg.Segmentation(
        source_images=list(geometry.datasets),
        **_segmentation_image(segment_numbers, specs, kind, model_id, model_version, keep_empty_frames),
        **_series_identification(series_uid, series_number, sop_uid, instance_number),
        **_general_equipment(model_id, model_version, device_serial_number),
        **content,
    )
    _apply_post_fixes(seg, sop_uid=sop_uid, uid_root=uid_root)
    return seg


def review_region_label(rank: int, confidence: float) -> str:
    """SegmentLabel of a review region, e.g. ``"check region 1 (confidence 0.58)"``.

    Parameters
    ----------
    rank : int
        1 = the least confident region.
    confidence : float
        Mean ensemble confidence (maximum class probability) over the region, 0..1.

    Returns
    -------
    str
        The label.
    """
    return f"check region {rank} (confidence {confidence:.2f})"


def review_region_specs(confidences: Sequence[float]) -> tuple[SegmentSpec, ...]:
    """Segment specs of review regions ranked 1..k (label value = rank).

    Parameters
    ----------
    confidences : Sequence[float]
        Mean confidence of region 1, 2, ... (ascending: least confident first).

    Returns
    -------
    tuple[SegmentSpec, ...]
        One spec per region, coded as a region of interest (:data:`dicom.codes.REVIEW_REGION_TYPE`),
        never as one of the node's classes.

    Raises
    ------
    ValueError
        If there are no or more than :data:`MAX_REVIEW_REGIONS` confidences, or one is outside 0..1.
    """
    values = [float(c) for c in confidences]
    if not 1 <= len(values) <= MAX_REVIEW_REGIONS:
        raise ValueError(f"confidences must hold 1..{MAX_REVIEW_REGIONS} values, got {len(values)}")
    if not all(0.0 <= c <= 1.0 for c in values):
        raise ValueError(f"confidences must lie in 0..1, got {values}")
    return tuple(
        SegmentSpec(rank, review_region_label(rank, c), REVIEW_REGION_CATEGORY, REVIEW_REGION_TYPE,
                    _REVIEW_COLORS[rank - 1])
        for rank, c in enumerate(values, start=1)
    )


def build_review_regions_segmentation(
    source_datasets: Sequence[Dataset],
    rank_map: npt.ArrayLike,
    confidences: Sequence[float],
    *,
    model_id: str,
    model_version: str,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    keep_empty_frames: bool = True,
    uid_root: str | None = None,
) -> hd.seg.Segmentation:
    """Build the SEG of review regions (AI advice): one segment per low-confidence region.

    Parameters
    ----------
    source_datasets : Sequence[pydicom.dataset.Dataset]
        The source series, any order (metadata suffices).
    rank_map : array_like
        Integer ``(z, y, x)`` map in sorted order: 0 outside every region, ``r`` inside region ``r``
        (1 = least confident).
    confidences : Sequence[float]
        Mean confidence of region 1, 2, ...; segment ``r`` is labelled
        :func:`review_region_label` ``(r, confidences[r - 1])``.
    model_id, model_version : str
        Algorithm name and version recorded in every segment.
    series_uid, sop_uid : str
        UIDs of the new series and instance (fixed by the caller per job).
    series_number : int
        SeriesNumber of the new series.
    keep_empty_frames : bool
        Keep one frame per source slice and segment even if empty (default).
    uid_root : str or None
        Root of the DimensionOrganizationUID (see :func:`build_segmentation`).

    Returns
    -------
    highdicom.seg.Segmentation
        SeriesDescription "AI review regions (research use)", ContentLabel ``AI_REVIEW``.

    Raises
    ------
    ValueError
        If an argument is malformed (the message names it), e.g. a rank without a confidence.
    """
    return build_segmentation(
        source_datasets,
        rank_map,
        review_region_specs(confidences),
        model_id=model_id,
        model_version=model_version,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        kind=SegKind.REVIEW_REGIONS,
        keep_empty_frames=keep_empty_frames,
        uid_root=uid_root,
    )


# -- build_segmentation: argument checks -------------------------------------


def _check_arguments(
    kind: SegKind, version: int, series_number: int, instance_number: int, model_id: str, model_version: str
) -> None:
    """Refuse a malformed kind, version, series or instance number, model id or model version."""
    if not isinstance(kind, SegKind):
        raise ValueError(f"kind must be a SegKind, got {kind!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")
    if not isinstance(series_number, int) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")
    if not isinstance(instance_number, int) or instance_number < 1:
        raise ValueError(f"instance_number must be a positive int, got {instance_number!r}")
    for name, value in (("model_id", model_id), ("model_version", model_version)):
        if not isinstance(value, str) or not value.strip() or len(value) > 64:
            raise ValueError(f"{name} must be a non-empty string of at most 64 characters, got {value!r}")


def _check_uids(series_uid: str, sop_uid: str, uid_root: str | None, *, source_series_uid: str) -> None:
    """Refuse malformed UIDs, and a series UID equal to that of the source series."""
    _check_uid("series_uid", series_uid)
    _check_uid("sop_uid", sop_uid)
    if uid_root is not None:
        _check_uid("uid_root", uid_root)
    if series_uid == source_series_uid:
        raise ValueError("series_uid must differ from the source SeriesInstanceUID (SEG is a new series)")


def _check_segments(segments: Sequence[SegmentSpec]) -> tuple[SegmentSpec, ...]:
    """Segments as a tuple; refuse an empty sequence, other items than SegmentSpec and repeated label values."""
    specs = tuple(segments)
    if not specs or not all(isinstance(s, SegmentSpec) for s in specs):
        raise ValueError("segments must be a non-empty sequence of SegmentSpec")
    values = [s.label_value for s in specs]
    if len(set(values)) != len(values):
        raise ValueError(f"segments must have unique label values, got {values}")
    return specs


def _check_labels(labels: npt.ArrayLike, shape: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """Label map as uint8; refuse another shape than the source series', non-integer dtypes, values outside 0..255."""
    arr = np.asarray(labels)
    if arr.shape != shape:
        raise ValueError(f"labels must have shape {shape} (z, y, x) of the source series, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"labels must be an integer array, got dtype {arr.dtype}")
    if arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"labels must lie in 0..255, got range [{lo}, {hi}]")
        arr = arr.astype(np.uint8)
    return arr


def _segment_numbers(
    labels: npt.ArrayLike, specs: Sequence[SegmentSpec], shape: tuple[int, int, int]
) -> npt.NDArray[np.uint8]:
    """Label map of segment numbers 1..n in the order of ``specs`` (highdicom expands it to frames)."""
    arr = _check_labels(labels, shape)
    values = [s.label_value for s in specs]
    # Avoid full-volume passes where possible.
    if values == list(range(1, len(values) + 1)):
        segment_numbers = arr
        invalid = int(arr.max()) > len(values)
    else:
        lut = np.zeros(256, dtype=np.uint8)
        for number, spec in enumerate(specs, start=1):
            lut[spec.label_value] = number
        segment_numbers = np.take(lut, arr)
        invalid = np.count_nonzero(segment_numbers) != np.count_nonzero(arr)
    if invalid:
        unknown = sorted(set(np.unique(arr).tolist()) - {0, *values})
        raise ValueError(f"labels contain values {unknown} that are not a label_value of segments")
    return segment_numbers


# -- build_segmentation: highdicom arguments by DICOM module -----------------
# highdicom derives the rest from the sorted source images: one frame per slice and segment with its
# Derivation Image and Plane Position items, the shared Pixel Measures and Plane Orientation, the
# referenced series and the patient/study modules.


class _SegmentationImageArgs(TypedDict):
    """Segmentation Image: BINARY pixel data and segment descriptions."""

    pixel_array: npt.NDArray[np.uint8]
    segmentation_type: hd.seg.SegmentationTypeValues
    segment_descriptions: list[hd.seg.SegmentDescription]
    omit_empty_frames: bool


class _SeriesArgs(TypedDict):
    """General Series and SOP Common: the new series and instance."""

    series_instance_uid: str
    series_number: int
    sop_instance_uid: str
    instance_number: int


class _EquipmentArgs(TypedDict):
    """(Enhanced) General Equipment: the node and the model."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


class _ContentArgs(TypedDict):
    """Content Identification and SeriesDescription."""

    content_description: str
    content_creator_name: str
    content_label: str
    series_description: str


def _segmentation_image(
    segment_numbers: npt.NDArray[np.uint8],
    specs: Sequence[SegmentSpec],
    kind: SegKind,
    model_id: str,
    model_version: str,
    keep_empty_frames: bool,
) -> _SegmentationImageArgs:
    """Segmentation Image arguments: one frame per slice and segment, segments described in the order of ``specs``."""
    return _SegmentationImageArgs(
        pixel_array=segment_numbers,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(
            specs, algorithm_type=_ALGORITHM_TYPES[kind], model_id=model_id, model_version=model_version
        ),
        omit_empty_frames=not keep_empty_frames,
    )


def _series_identification(series_uid: str, series_number: int, sop_uid: str, instance_number: int) -> _SeriesArgs:
    """General Series and SOP Common arguments."""
    return _SeriesArgs(
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
    )


def _general_equipment(model_id: str, model_version: str, device_serial_number: str) -> _EquipmentArgs:
    """(Enhanced) General Equipment arguments; SoftwareVersions names the node and the model (64 characters max)."""
    return _EquipmentArgs(
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=f"{MANUFACTURER} {_software_version()}; model {model_id} {model_version}"[:64],
        device_serial_number=device_serial_number,
    )


def _content_identification(
    kind: SegKind, version: int, series_description: str | None, content_label: str | None
) -> _ContentArgs:
    """Content Identification and SeriesDescription, defaults by kind and version; refuse malformed overrides."""
    if kind is SegKind.PRESEG:
        default_description = "AI presegmentation (research use)"
        default_label = "AI_PRESEG"
    elif kind is SegKind.REVIEW_REGIONS:
        default_description = "AI review regions (research use)"
        default_label = REVIEW_CONTENT_LABEL
    else:
        default_description = f"AI refined v{version} (research use)"
        default_label = f"AI_REFINED_V{version}"
    label = content_label if content_label is not None else default_label
    if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", label):
        raise ValueError(f"content_label must be 1-16 of A-Z, 0-9, '_' or space, got {label!r}")
    description = series_description if series_description is not None else default_description
    if not isinstance(description, str) or len(description) > 64:
        raise ValueError("series_description must be a string of at most 64 characters")
    return _ContentArgs(
        content_description=description,
        content_creator_name=f"{MANUFACTURER}^",
        content_label=label,
        series_description=description,
    )


# -- build_segmentation: post-fixes ------------------------------------------


def _apply_post_fixes(seg: hd.seg.Segmentation, *, sop_uid: str, uid_root: str | None) -> None:
    """Set SegmentsOverlap NO and, with ``uid_root``, a DimensionOrganizationUID below that root."""
    # Derived from a label map: segments cannot overlap.
    seg.SegmentsOverlap = "NO"
    if uid_root is not None and "DimensionOrganizationSequence" in seg:
        from pydicom.uid import generate_uid

        new_uid = generate_uid(prefix=uid_root + ".", entropy_srcs=[sop_uid, "dimension-organization"])
        for item in seg.DimensionOrganizationSequence:
            item.DimensionOrganizationUID = new_uid
        for item in seg.get("DimensionIndexSequence", []):
            item.DimensionOrganizationUID = new_uid
