"""Attribute setters for the DICOM modules that the node's image builders share.

Following highdicom's constructors, an image object is assembled module by
module (SOP Common, General Series, Frame of Reference, General Equipment,
Image Plane, Image Pixel).  The synthetic CT builder (:mod:`dicom.synthetic`)
and the MPR builder (:mod:`dicom.mpr`) use these setters, so both write each
module the same way; what differs between them (patient/study source, image
type, modality-specific modules) stays in the builders.

Every setter writes its attributes into ``ds`` in place, in a fixed order.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from dicom.values import format_ds

__all__ = [
    "file_meta",
    "set_frame_of_reference",
    "set_general_equipment",
    "set_general_series",
    "set_image_pixel",
    "set_image_plane",
    "set_sop_common",
]


def file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    implementation_version_name: str | None = None,
) -> FileMetaDataset:
    """File meta information for an Explicit VR Little Endian instance.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        MediaStorageSOPClassUID and MediaStorageSOPInstanceUID.
    implementation_version_name : str or None, optional
        ImplementationVersionName; omitted when ``None``.

    Returns
    -------
    pydicom.dataset.FileMetaDataset
        The file meta information (pydicom's implementation class UID).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if implementation_version_name is not None:
        meta.ImplementationVersionName = implementation_version_name
    return meta


def set_sop_common(ds: Dataset, sop_class_uid: str, sop_instance_uid: str, date: str, time: str) -> None:
    """Set the SOP Common module (SpecificCharacterSet is left to the caller).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Data set to modify in place.
    sop_class_uid, sop_instance_uid : str
        SOPClassUID and SOPInstanceUID.
    date, time : str
        InstanceCreationDate (``YYYYMMDD``) and InstanceCreationTime (``HHMMSS``).
    """
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time


def set_general_series(
    ds: Dataset,
    *,
    modality: str,
    series_uid: str,
    series_number: int,
    date: str,
    time: str,
    description: str,
) -> None:
    """Set the General Series attributes every builder writes.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Data set to modify in place.
    modality : str
        Modality.
    series_uid : str
        SeriesInstanceUID.
    series_number : int
        SeriesNumber.
    date, time : str
        SeriesDate (``YYYYMMDD``) and SeriesTime (``HHMMSS``).
    description : str
        SeriesDescription.
    """
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = description


def set_frame_of_reference(ds: Dataset, frame_of_reference_uid: str, position_reference_indicator: str) -> None:
    """Set the Frame of Reference module.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Data set to modify in place.
    frame_of_reference_uid : str
        FrameOfReferenceUID.
    position_reference_indicator : str
        PositionReferenceIndicator (may be empty).
    """
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = position_reference_indicator


def set_general_equipment(ds: Dataset, manufacturer: str, model_name: str, software_versions: str) -> None:
    """Set the General Equipment module.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Data set to modify in place.
    manufacturer, model_name, software_versions : str
        Manufacturer, ManufacturerModelName and SoftwareVersions.
    """
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model_name
    ds.SoftwareVersions = software_versions


def set_image_plane(
    ds: Dataset,
    *,
    pixel_spacing: Sequence[float],
    orientation: Iterable[float],
    position: Iterable[float],
    thickness: float,
) -> None:
    """Set the Image Plane module, every value written as a Decimal String.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Data set to modify in place.
    pixel_spacing : Sequence[float]
        PixelSpacing (row spacing, column spacing) in mm.
    orientation : Iterable[float]
        ImageOrientationPatient: row cosines then column cosines.
    position : Iterable[float]
        ImagePositionPatient of the first pixel, mm.
    thickness : float
        SliceThickness in mm.
    """
    ds.PixelSpacing = [format_ds(pixel_spacing[0]), format_ds(pixel_spacing[1])]
    ds.ImageOrientationPatient = [format_ds(v) for v in orientation]
    ds.ImagePositionPatient = [format_ds(v) for v in position]
    ds.SliceThickness = format_ds(thickness)


def set_image_pixel(ds: Dataset, pixels: npt.NDArray[np.integer]) -> None:
    """Set the Image Pixel module of a 16-bit MONOCHROME2 frame.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Data set to modify in place.
    pixels : numpy.ndarray
        ``(rows, columns)`` stored values, little-endian ``int16`` (signed,
        PixelRepresentation 1) or ``uint16`` (0); written as OW PixelData.

    Raises
    ------
    ValueError
        If ``pixels`` is not a 2-D array of 16-bit integers.
    """
    if pixels.ndim != 2 or pixels.dtype.kind not in "iu" or pixels.dtype.itemsize != 2:
        raise ValueError(f"pixels must be a 2-D 16-bit integer array, got {pixels.dtype} {pixels.shape}")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes())
