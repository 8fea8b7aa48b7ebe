"""Derived multiplanar reformatted (MPR) images for coronal and sagittal picks.

A viewer shows the source series in its acquired orientation; to ask a
radiologist to review coronal slice ``j`` the node sends that slice as a
derived image (ImageType ``DERIVED\\SECONDARY\\REFORMATTED``) of its own series,
in the source study and frame of reference, and references it from the KOS.

Geometry (``docs/contracts.md`` conventions; ``n`` = slice normal, ``row``/``col`` =
source row/column cosines, sorted source slice ``k`` at ``origin + k*sz*n``):

* coronal pick at y index ``j`` (``axis=1``): columns follow the source x axis
  (``row``), rows follow the source z axis;
* sagittal pick at x index ``i`` (``axis=2``): columns follow the source y axis
  (``col``), rows follow the source z axis.

Rows run from head to feet when the normal has a patient-superior component
(``n[2] > 0`` in LPS, the usual axial case): the image's column cosine is then
``-n`` and its first row is the last sorted slice; otherwise the column cosine
is ``+n``.  PixelSpacing is ``(sz, sx)`` resp. ``(sz, sy)``; SliceThickness is the
source spacing along the fixed axis.
"""
from __future__ import annotations

import datetime as _dt
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom.modules import (
    file_meta,
    set_frame_of_reference,
    set_general_equipment,
    set_general_series,
    set_image_pixel,
    set_image_plane,
    set_sop_common,
)
from dicom.provenance import UidFactory
from dicom.seg_writer import MANUFACTURER, SourceGeometry
from dicom.values import format_ds

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "ReformatAxis",
    "VolumeValues",
    "build_reformatted_images",
    "locate_reformatted_image",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SUPPORTED = {CT_IMAGE_STORAGE: "CT", MR_IMAGE_STORAGE: "MR"}
_AXIS_NAMES = {1: "coronal", 2: "sagittal"}
_DIRECTION_TOL = 1e-3
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Patient and General Study attributes copied from the source (empty when absent).
_PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
#: Patient / study attributes copied only when the source has them.
_PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientWeight",
    "PatientSize", "StudyDescription", "BodyPartExamined", "PatientIdentityRemoved",
    "DeidentificationMethod",
)


class ReformatAxis(enum.IntEnum):
    """Volume axis that is held fixed by a reformatted image."""

    CORONAL = 1
    SAGITTAL = 2


class VolumeValues(enum.Enum):
    """What the values of the volume passed to :func:`build_reformatted_images` are."""

    RESCALED = "RESCALED"
    """Modality values (HU for CT): RescaleSlope/Intercept already applied."""
    STORED = "STORED"
    """Stored pixel values of the source slices (no rescale applied)."""


def _plane(geometry: SourceGeometry, axis: ReformatAxis) -> tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], bool
]:
    """Row cosine, column cosine and whether the z axis is flipped (head up)."""
    flip = bool(geometry.normal[2] > _DIRECTION_TOL)
    row_dir = geometry.row if axis is ReformatAxis.CORONAL else geometry.col
    col_dir = -geometry.normal if flip else geometry.normal
    return row_dir, col_dir, flip


def _reformat_position(geometry: SourceGeometry, axis: ReformatAxis, index: int, flip: bool) -> npt.NDArray[np.float64]:
    k0 = geometry.shape[0] - 1 if flip else 0
    if axis is ReformatAxis.CORONAL:
        return geometry.patient_position(k0, index, 0)
    return geometry.patient_position(k0, 0, index)


def build_reformatted_images(
    source_datasets: Sequence[Dataset],
    volume: npt.ArrayLike,
    axis: int | ReformatAxis,
    indices: Sequence[int],
    *,
    series_uid: str,
    uid_root: str,
    series_number: int,
    series_description: str | None = None,
    values: VolumeValues = VolumeValues.RESCALED,
    content_datetime: _dt.datetime | None = None,
) -> list[Dataset]:
    """Build derived reformatted images of the source series, one per index.

    Parameters
    ----------
    source_datasets : Sequence[pydicom.dataset.Dataset]
        The single-frame CT or MR source series, any order (metadata suffices).
    volume : array_like
        ``(z, y, x)`` volume in the sorted order of the source series.
    axis : int or ReformatAxis
        1 (coronal: fixed y index) or 2 (sagittal: fixed x index).
    indices : Sequence[int]
        Indices along ``axis``; one image per index, in this order.
    series_uid : str
        SeriesInstanceUID of the new derived series.
    uid_root : str
        Root for the SOP Instance UIDs, derived deterministically from
        ``series_uid``, axis and index (a re-run yields the same UIDs).
    series_number : int
        SeriesNumber of the derived series.
    series_description : str or None
        Defaults to ``"AI review: coronal MPR (research use)"`` (or sagittal).
    values : VolumeValues
        RESCALED (default: HU/modality values, re-encoded with the source's
        RescaleSlope/Intercept) or STORED (stored values, written as they are).
    content_datetime : datetime.datetime or None
        ContentDate/Time and InstanceCreationDate/Time; now (UTC) if ``None``.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        CT or MR Image Storage instances (same SOP class as the source), with
        file meta information; the caller writes them.

    Raises
    ------
    ValueError
        If an argument is malformed (the message names it), the source is not
        CT/MR Image Storage, or values do not fit the source's pixel encoding.
    """
    geometry = SourceGeometry.from_datasets(source_datasets)
    axis_enum = _check_source(geometry, axis)
    arr, idx = _check_volume(geometry, volume, values, axis_enum, indices)
    uids, description = _check_series(geometry, axis_enum, series_uid, uid_root, series_number, series_description)
    when = content_datetime or _dt.datetime.now(_dt.UTC)
    series = _DerivedSeries.create(geometry, axis_enum, series_uid, series_number, description, when)
    stored_all = series.stored_volume(arr, values)
    out: list[Dataset] = []
    for number, index in enumerate(idx, start=1):
        pixels = series.pixels(stored_all, index)
        sop_uid = uids.derive(series_uid, "mpr", str(int(axis_enum)), str(index))
        out.append(_reformatted_image(series, number, index, pixels, sop_uid))
    return out


# -- argument checks -----------------------------------------------------------------------------


def _check_source(geometry: SourceGeometry, axis: int | ReformatAxis) -> ReformatAxis:
    """Validate ``axis`` and the source SOP class; return the axis."""
    try:
        axis_enum = ReformatAxis(int(axis))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"axis must be 1 (coronal) or 2 (sagittal), got {axis!r}") from exc
    sop_class = str(geometry.datasets[0].SOPClassUID)
    if sop_class not in _SUPPORTED or any(str(ds.SOPClassUID) != sop_class for ds in geometry.datasets):
        raise ValueError("source_datasets must all be CT Image Storage or all MR Image Storage")
    return axis_enum


def _check_volume(
    geometry: SourceGeometry,
    volume: npt.ArrayLike,
    values: VolumeValues,
    axis: ReformatAxis,
    indices: Sequence[int],
) -> tuple[npt.NDArray[Any], list[int]]:
    """Validate ``values``, ``volume`` and ``indices``; return the array and the indices as ints."""
    if not isinstance(values, VolumeValues):
        raise ValueError(f"values must be a VolumeValues, got {values!r}")
    arr = np.asarray(volume)
    if arr.shape != geometry.shape:
        raise ValueError(f"volume must have shape {geometry.shape} (z, y, x) of the source series, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError("volume must be real-valued and finite")
    n_axis = geometry.shape[int(axis)]
    idx = list(indices)
    if not idx:
        raise ValueError("indices must not be empty")
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n_axis:
            raise ValueError(f"indices must be integers in 0..{n_axis - 1} along axis {int(axis)}, got {i!r}")
    if len(set(int(i) for i in idx)) != len(idx):
        raise ValueError("indices must not repeat")
    return arr, [int(i) for i in idx]


def _check_series(
    geometry: SourceGeometry,
    axis: ReformatAxis,
    series_uid: str,
    uid_root: str,
    series_number: int,
    series_description: str | None,
) -> tuple[UidFactory, str]:
    """Validate the new series' number and UIDs; return the UID factory and the description."""
    if not isinstance(series_number, int) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")
    uids = UidFactory(uid_root)
    if not isinstance(series_uid, str) or series_uid == geometry.series_uid:
        raise ValueError("series_uid must be a string that differs from the source SeriesInstanceUID")
    if not isinstance(series_uid, str) or not _UID_RE.fullmatch(series_uid) or len(series_uid) > 64:
        raise ValueError(f"series_uid must be a DICOM UID, got {series_uid!r}")
    description = series_description or f"AI review: {_AXIS_NAMES[int(axis)]} MPR (research use)"
    if len(description) > 64:
        raise ValueError("series_description must be at most 64 characters")
    return uids, description


# -- the derived series ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _DerivedSeries:
    """What every image of one derived reformatted series shares."""

    geometry: SourceGeometry
    axis: ReformatAxis
    sop_class: str
    series_uid: str
    series_number: int
    description: str
    date: str
    time: str
    dtype: np.dtype[Any]
    slope: float
    intercept: float
    references: list[Dataset]
    """SourceImageSequence items, one per source instance (shared by all images)."""

    @classmethod
    def create(
        cls,
        geometry: SourceGeometry,
        axis: ReformatAxis,
        series_uid: str,
        series_number: int,
        description: str,
        when: _dt.datetime,
    ) -> _DerivedSeries:
        """Series attributes; the pixel encoding follows the first source instance."""
        first = geometry.datasets[0]
        signed = int(first.get("PixelRepresentation", 1)) == 1
        return cls(
            geometry=geometry,
            axis=axis,
            sop_class=str(first.SOPClassUID),
            series_uid=series_uid,
            series_number=series_number,
            description=description,
            date=when.strftime("%Y%m%d"),
            time=when.strftime("%H%M%S"),
            dtype=np.dtype("<i2") if signed else np.dtype("<u2"),
            slope=float(first.get("RescaleSlope", 1) or 1),
            intercept=float(first.get("RescaleIntercept", 0) or 0),
            references=[_source_image_reference(ds) for ds in geometry.datasets],
        )

    @property
    def first(self) -> Dataset:
        """First sorted source instance (the source of copied attributes)."""
        return self.geometry.datasets[0]

    @property
    def modality(self) -> str:
        """Modality of the source and the derived series."""
        return _SUPPORTED[self.sop_class]

    @property
    def name(self) -> str:
        """``"coronal"`` or ``"sagittal"``."""
        return _AXIS_NAMES[int(self.axis)]

    def stored_volume(self, arr: npt.NDArray[Any], values: VolumeValues) -> npt.NDArray[np.float64]:
        """Rounded stored values of the whole volume (not yet range-checked)."""
        if values is VolumeValues.RESCALED:
            return np.rint((arr.astype(np.float64) - self.intercept) / self.slope)
        return np.rint(arr.astype(np.float64))

    def pixels(self, stored_all: npt.NDArray[np.float64], index: int) -> npt.NDArray[Any]:
        """Stored pixels of the image at ``index`` (head at the top), in the source encoding."""
        stored = stored_all[:, index, :] if self.axis is ReformatAxis.CORONAL else stored_all[:, :, index]
        if _plane(self.geometry, self.axis)[2]:
            stored = stored[::-1]
        info = np.iinfo(self.dtype)
        if stored.min() < info.min or stored.max() > info.max:
            raise ValueError(
                f"volume values at {self.name} index {index} do not fit the source pixel encoding "
                f"({self.dtype.name}, slope {self.slope:g}, intercept {self.intercept:g})"
            )
        return np.ascontiguousarray(stored.astype(self.dtype))


# -- one image, module by module -------------------------------------------------------------------


def _reformatted_image(series: _DerivedSeries, number: int, index: int, pixels: npt.NDArray[Any], sop_uid: str) -> Dataset:
    """Assemble one derived image of ``series`` showing ``pixels`` at ``index``."""
    first, geometry = series.first, series.geometry
    ds = Dataset()
    ds.file_meta = file_meta(series.sop_class, sop_uid)
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    set_sop_common(ds, series.sop_class, sop_uid, series.date, series.time)
    _copy_patient_study(ds, first)
    set_general_series(
        ds, modality=series.modality, series_uid=series.series_uid, series_number=series.series_number,
        date=series.date, time=series.time, description=series.description,
    )
    ds.PatientPosition = first.get("PatientPosition", "")
    set_frame_of_reference(ds, geometry.frame_of_reference_uid, first.get("PositionReferenceIndicator", ""))
    set_general_equipment(ds, MANUFACTURER, MANUFACTURER, MANUFACTURER)
    _set_derived_image(ds, series, number, index)
    # Common Instance Reference
    ds.ReferencedSeriesSequence = [_referenced_series(geometry)]
    _set_reformat_plane(ds, geometry, series.axis, index)
    set_image_pixel(ds, pixels)
    if series.modality == "CT":
        _set_ct_image(ds, series)
    else:
        _set_mr_image(ds, series)
    # VOI LUT
    for key in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if key in first:
            ds[key] = first[key]
    return ds


def _copy_patient_study(ds: Dataset, source: Dataset) -> None:
    """Copy the Patient and General Study attributes of ``source`` (values are never logged)."""
    for key in _PATIENT_STUDY_TYPE2:
        setattr(ds, key, source.get(key, ""))
    for key in _PATIENT_STUDY_OPTIONAL:
        if key in source:
            ds[key] = source[key]


def _set_derived_image(ds: Dataset, series: _DerivedSeries, number: int, index: int) -> None:
    """Set the General Image and General Reference attributes of a derived reformat."""
    first = series.first
    ds.InstanceNumber = number
    ds.ContentDate, ds.ContentTime = series.date, series.time
    ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = first.get("LossyImageCompression", "00")
    ds.DerivationDescription = (
        f"Multiplanar reformat ({series.name}, index {index} of {series.geometry.shape[int(series.axis)]}) of series "
        f"{first.get('SeriesNumber', '')} for review; research use"
    )[:1024]
    ds.DerivationCodeSequence = [_code_item("113072", "DCM", "Multiplanar reformatting")]
    ds.SourceImageSequence = series.references


def _set_reformat_plane(ds: Dataset, geometry: SourceGeometry, axis: ReformatAxis, index: int) -> None:
    """Set the Image Plane module of the reformat at ``index`` along ``axis``."""
    row_dir, col_dir, flip = _plane(geometry, axis)
    sz, sy, sx = geometry.spacing
    set_image_plane(
        ds,
        pixel_spacing=(sz, sx) if axis is ReformatAxis.CORONAL else (sz, sy),
        orientation=(*row_dir, *col_dir),
        position=_reformat_position(geometry, axis, index, flip),
        thickness=sy if axis is ReformatAxis.CORONAL else sx,
    )


def _set_ct_image(ds: Dataset, series: _DerivedSeries) -> None:
    """Set the CT Image attributes (rescale in the source encoding, acquisition copied)."""
    first = series.first
    ds.RescaleIntercept = format_ds(series.intercept)
    ds.RescaleSlope = format_ds(series.slope)
    ds.RescaleType = first.get("RescaleType", "HU")
    ds.KVP = first.get("KVP", "")
    ds.AcquisitionNumber = first.get("AcquisitionNumber", "")


def _set_mr_image(ds: Dataset, series: _DerivedSeries) -> None:
    """Set the MR Image attributes copied from the source."""
    first = series.first
    ds.ScanningSequence = first.get("ScanningSequence", "RM")
    ds.SequenceVariant = first.get("SequenceVariant", "NONE")
    for key in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime"):
        setattr(ds, key, first.get(key, ""))
    for key in ("MagneticFieldStrength", "ImagedNucleus", "SequenceName", "FlipAngle"):
        if key in first:
            ds[key] = first[key]
    if "RescaleSlope" in first:
        ds.RescaleSlope, ds.RescaleIntercept = format_ds(series.slope), format_ds(series.intercept)
    ds.AcquisitionNumber = first.get("AcquisitionNumber", "")


# -- references ------------------------------------------------------------------------------------


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = value, scheme
    item.CodeMeaning = meaning
    return item


def _instance_reference(source: Dataset) -> Dataset:
    """Referenced SOP Class/Instance UID item for one source instance."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _source_image_reference(source: Dataset) -> Dataset:
    """SourceImageSequence item: the instance, purpose "source image for image processing"."""
    item = _instance_reference(source)
    item.PurposeOfReferenceCodeSequence = [
        _code_item("121322", "DCM", "Source image for image processing operation")
    ]
    return item


def _referenced_series(geometry: SourceGeometry) -> Dataset:
    """ReferencedSeriesSequence item listing every source instance (sorted order)."""
    item = Dataset()
    item.SeriesInstanceUID = geometry.series_uid
    item.ReferencedInstanceSequence = [_instance_reference(src) for src in geometry.datasets]
    return item


def locate_reformatted_image(ds: Dataset, source_datasets: Sequence[Dataset]) -> tuple[ReformatAxis, int] | None:
    """Find which coronal/sagittal index of the source series an image shows.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A reformatted image (e.g. from :func:`build_reformatted_images`).
    source_datasets : Sequence[pydicom.dataset.Dataset]
        The source series.

    Returns
    -------
    tuple[ReformatAxis, int] or None
        Axis and index, or ``None`` if the image is not a coronal/sagittal
        reformat on the source's voxel grid (other frame of reference,
        orientation or an off-grid position).
    """
    geometry = SourceGeometry.from_datasets(source_datasets)
    if str(ds.get("FrameOfReferenceUID", "")) != geometry.frame_of_reference_uid:
        return None
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        return None
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    for axis in ReformatAxis:
        row_dir, col_dir, _ = _plane(geometry, axis)
        if np.max(np.abs(iop - np.concatenate([row_dir, col_dir]))) > 10 * _DIRECTION_TOL:
            continue
        offset = ipp - geometry.positions[0]
        direction = geometry.col if axis is ReformatAxis.CORONAL else geometry.row
        step = geometry.spacing[1] if axis is ReformatAxis.CORONAL else geometry.spacing[2]
        exact = float(offset @ direction) / step
        index = int(round(exact))
        n = geometry.shape[int(axis)]
        if abs(exact - index) <= 0.1 and 0 <= index < n:
            return axis, index
    return None
