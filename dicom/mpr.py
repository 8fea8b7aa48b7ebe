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

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

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
    try:
        axis_enum = ReformatAxis(int(axis))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"axis must be 1 (coronal) or 2 (sagittal), got {axis!r}") from exc
    first = geometry.datasets[0]
    sop_class = str(first.SOPClassUID)
    if sop_class not in _SUPPORTED or any(str(ds.SOPClassUID) != sop_class for ds in geometry.datasets):
        raise ValueError("source_datasets must all be CT Image Storage or all MR Image Storage")
    modality = _SUPPORTED[sop_class]
    if not isinstance(values, VolumeValues):
        raise ValueError(f"values must be a VolumeValues, got {values!r}")
    arr = np.asarray(volume)
    if arr.shape != geometry.shape:
        raise ValueError(f"volume must have shape {geometry.shape} (z, y, x) of the source series, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError("volume must be real-valued and finite")
    n_axis = geometry.shape[int(axis_enum)]
    idx = list(indices)
    if not idx:
        raise ValueError("indices must not be empty")
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n_axis:
            raise ValueError(f"indices must be integers in 0..{n_axis - 1} along axis {int(axis_enum)}, got {i!r}")
    if len(set(int(i) for i in idx)) != len(idx):
        raise ValueError("indices must not repeat")
    if not isinstance(series_number, int) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")
    uids = UidFactory(uid_root)
    if not isinstance(series_uid, str) or series_uid == geometry.series_uid:
        raise ValueError("series_uid must be a string that differs from the source SeriesInstanceUID")
    if not isinstance(series_uid, str) or not _UID_RE.fullmatch(series_uid) or len(series_uid) > 64:
        raise ValueError(f"series_uid must be a DICOM UID, got {series_uid!r}")
    name = _AXIS_NAMES[int(axis_enum)]
    description = series_description or f"AI review: {name} MPR (research use)"
    if len(description) > 64:
        raise ValueError("series_description must be at most 64 characters")

    # Pixel encoding follows the source.
    signed = int(first.get("PixelRepresentation", 1)) == 1
    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    slope = float(first.get("RescaleSlope", 1) or 1)
    intercept = float(first.get("RescaleIntercept", 0) or 0)
    if values is VolumeValues.RESCALED:
        stored_all = np.rint((arr.astype(np.float64) - intercept) / slope)
    else:
        stored_all = np.rint(arr.astype(np.float64))
    info = np.iinfo(dtype)
    when = content_datetime or _dt.datetime.now(_dt.UTC)
    date_str, time_str = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    row_dir, col_dir, flip = _plane(geometry, axis_enum)
    sz, sy, sx = geometry.spacing
    pixel_spacing = (sz, sx) if axis_enum is ReformatAxis.CORONAL else (sz, sy)
    thickness = sy if axis_enum is ReformatAxis.CORONAL else sx

    references = []
    for ds in geometry.datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
        purpose.CodeMeaning = "Source image for image processing operation"
        ref.PurposeOfReferenceCodeSequence = [purpose]
        references.append(ref)

    out: list[Dataset] = []
    for number, index in enumerate((int(i) for i in idx), start=1):
        stored = stored_all[:, index, :] if axis_enum is ReformatAxis.CORONAL else stored_all[:, :, index]
        if flip:
            stored = stored[::-1]
        if stored.min() < info.min or stored.max() > info.max:
            raise ValueError(
                f"volume values at {name} index {index} do not fit the source pixel encoding "
                f"({dtype.name}, slope {slope:g}, intercept {intercept:g})"
            )
        pixels = np.ascontiguousarray(stored.astype(dtype))
        sop_uid = uids.derive(series_uid, "mpr", str(int(axis_enum)), str(index))
        position = _reformat_position(geometry, axis_enum, index, flip)

        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        # SOP Common
        if "SpecificCharacterSet" in first:
            ds.SpecificCharacterSet = first.SpecificCharacterSet
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate, ds.InstanceCreationTime = date_str, time_str
        # Patient / study (copied; never logged)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            setattr(ds, key, first.get(key, ""))
        for key in ("IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientWeight",
                    "PatientSize", "StudyDescription", "BodyPartExamined", "PatientIdentityRemoved",
                    "DeidentificationMethod"):
            if key in first:
                ds[key] = first[key]
        # General Series
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDate, ds.SeriesTime = date_str, time_str
        ds.SeriesDescription = description
        ds.PatientPosition = first.get("PatientPosition", "")
        # Frame of Reference
        ds.FrameOfReferenceUID = geometry.frame_of_reference_uid
        ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
        # General Equipment
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MANUFACTURER
        ds.SoftwareVersions = MANUFACTURER
        # General Image / General Reference
        ds.InstanceNumber = number
        ds.ContentDate, ds.ContentTime = date_str, time_str
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = first.get("LossyImageCompression", "00")
        ds.DerivationDescription = (
            f"Multiplanar reformat ({name}, index {index} of {n_axis}) of series "
            f"{first.get('SeriesNumber', '')} for review; research use"
        )[:1024]
        derivation = Dataset()
        derivation.CodeValue, derivation.CodingSchemeDesignator = "113072", "DCM"
        derivation.CodeMeaning = "Multiplanar reformatting"
        ds.DerivationCodeSequence = [derivation]
        ds.SourceImageSequence = references
        # Common Instance Reference
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = geometry.series_uid
        instances = []
        for src in geometry.datasets:
            item = Dataset()
            item.ReferencedSOPClassUID = src.SOPClassUID
            item.ReferencedSOPInstanceUID = src.SOPInstanceUID
            instances.append(item)
        ref_series.ReferencedInstanceSequence = instances
        ds.ReferencedSeriesSequence = [ref_series]
        # Image Plane
        ds.PixelSpacing = [format_ds(pixel_spacing[0]), format_ds(pixel_spacing[1])]
        ds.ImageOrientationPatient = [format_ds(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [format_ds(v) for v in position]
        ds.SliceThickness = format_ds(thickness)
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.add_new(0x7FE00010, "OW", pixels.tobytes())
        # Modality image module
        if modality == "CT":
            ds.RescaleIntercept = format_ds(intercept)
            ds.RescaleSlope = format_ds(slope)
            ds.RescaleType = first.get("RescaleType", "HU")
            ds.KVP = first.get("KVP", "")
            ds.AcquisitionNumber = first.get("AcquisitionNumber", "")
        else:
            ds.ScanningSequence = first.get("ScanningSequence", "RM")
            ds.SequenceVariant = first.get("SequenceVariant", "NONE")
            for key in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime"):
                setattr(ds, key, first.get(key, ""))
            for key in ("MagneticFieldStrength", "ImagedNucleus", "SequenceName", "FlipAngle"):
                if key in first:
                    ds[key] = first[key]
            if "RescaleSlope" in first:
                ds.RescaleSlope, ds.RescaleIntercept = format_ds(slope), format_ds(intercept)
            ds.AcquisitionNumber = first.get("AcquisitionNumber", "")
        # VOI LUT
        for key in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            if key in first:
                ds[key] = first[key]
        out.append(ds)
    return out


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
