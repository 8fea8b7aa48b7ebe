"""Synthetic CT series: valid CT Image Storage instances built from a numpy volume.

The builders here are used by tests, the demo and the benchmarks to produce
realistic single-frame CT series with consistent geometry, so that the rest of
the node (series assembly, SEG/KOS writers, the SCP) can be exercised without
patient data.  Every instance passes ``dciodvfy`` (dicom3tools) without errors.

Conventions (see ``docs/contracts.md``):

* ``image`` is ``(z, y, x)``; ``spacing`` is ``(z, y, x)`` in mm.
* ``orientation`` is ImageOrientationPatient: row cosines (direction of
  increasing ``x`` index) followed by column cosines (increasing ``y`` index).
* Slice ``k`` lies at ``origin + k * spacing_z * n`` with
  ``n = cross(row, col)``; ``PixelSpacing = (spacing_y, spacing_x)`` (row
  spacing first, i.e. the distance between rows).
* Stored values are signed 16-bit integers with ``RescaleSlope = 1`` and
  ``RescaleIntercept = 0``, so stored value == Hounsfield units.

Builders return :class:`pydicom.dataset.Dataset` objects; writing them is a
separate step (:func:`write_datasets`), following the highdicom style.
"""
from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from dicom.modules import (
    file_meta,
    set_frame_of_reference,
    set_general_equipment,
    set_general_series,
    set_image_pixel,
    set_image_plane,
    set_sop_common,
)
from dicom.values import format_ds

__all__ = [
    "UID_ROOT",
    "DEFAULT_ORIGIN",
    "DEFAULT_ORIENTATION",
    "PatientInfo",
    "build_ct_series",
    "centred_origin",
    "make_uid",
    "write_datasets",
    "write_study",
]

#: Organisational UID root used for every UID this module generates.
UID_ROOT = "1.2.826.0.1.3680043.10.1234"

#: Default ImagePositionPatient of the first (lowest) slice, mm.
DEFAULT_ORIGIN: tuple[float, float, float] = (-48.0, -48.0, 0.0)

#: Default ImageOrientationPatient (axial, patient LPS).
DEFAULT_ORIENTATION: tuple[float, float, float, float, float, float] = (
    1.0,
    0.0,
    0.0,
    0.0,
    1.0,
    0.0,
)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_INT16_MIN = int(np.iinfo(np.int16).min)
_INT16_MAX = int(np.iinfo(np.int16).max)
_ORTHO_TOL = 1e-4
#: Default VOI LUT window (soft tissue), HU.
_WINDOW_CENTER, _WINDOW_WIDTH = 40.0, 400.0


@dataclass(frozen=True)
class PatientInfo:
    """Patient module attributes for synthetic studies.

    The defaults identify an obviously synthetic phantom; never put real patient
    data in here for tests.

    Parameters
    ----------
    name : str
        PatientName (DICOM PN, ``Family^Given``).
    id : str
        PatientID.
    birth_date : str
        PatientBirthDate as ``YYYYMMDD`` (may be empty).
    sex : str
        PatientSex: ``"M"``, ``"F"``, ``"O"`` or empty.
    """

    name: str = "Phantom^Demo"
    id: str = "I3N-0001"
    birth_date: str = "19700101"
    sex: str = "O"

    def __post_init__(self) -> None:
        if self.sex not in ("M", "F", "O", ""):
            raise ValueError(f"PatientInfo.sex must be 'M', 'F', 'O' or '', got {self.sex!r}")
        if self.birth_date and not re.fullmatch(r"[0-9]{8}", self.birth_date):
            raise ValueError("PatientInfo.birth_date must be 'YYYYMMDD' or empty")
        if len(self.id) > 64:
            raise ValueError("PatientInfo.id must be at most 64 characters")


def make_uid(uid_root: str = UID_ROOT, *entropy: str) -> str:
    """Return a new UID below ``uid_root``.

    Parameters
    ----------
    uid_root : str
        UID root (digits and dots, no trailing dot).
    *entropy : str
        Optional entropy sources; when given the UID is deterministic
        (a hash of ``uid_root`` and the sources), otherwise random.

    Returns
    -------
    str
        A UID of at most 64 characters.
    """
    _check_uid("uid_root", uid_root, max_len=40)
    return str(generate_uid(prefix=uid_root + ".", entropy_srcs=list(entropy) or None))


def centred_origin(
    shape: Sequence[int],
    spacing: Sequence[float],
    orientation: Sequence[float] = DEFAULT_ORIENTATION,
) -> tuple[float, float, float]:
    """Origin (IPP of slice 0) that puts the volume centre at patient (0, 0, 0).

    Parameters
    ----------
    shape : sequence of int
        Volume shape ``(z, y, x)``.
    spacing : sequence of float
        Voxel spacing ``(z, y, x)`` in mm.
    orientation : sequence of float
        ImageOrientationPatient (6 direction cosines).

    Returns
    -------
    tuple of float
        The origin in patient mm.
    """
    row, col, normal = _directions(orientation)
    nz, ny, nx = (int(v) for v in shape)
    sz, sy, sx = (float(v) for v in spacing)
    half = (nz - 1) * sz * normal + (ny - 1) * sy * col + (nx - 1) * sx * row
    origin = -0.5 * half
    return (float(origin[0]), float(origin[1]), float(origin[2]))


def build_ct_series(
    image: npt.ArrayLike,
    spacing: Sequence[float],
    *,
    origin: Sequence[float] | None = DEFAULT_ORIGIN,
    orientation: Sequence[float] = DEFAULT_ORIENTATION,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    uid_root: str = UID_ROOT,
    patient: PatientInfo = PatientInfo(),
    series_description: str = "Synthetic CT",
    series_number: int = 1,
    descending: bool = False,
    accession_number: str = "",
    study_description: str = "i3node synthetic study",
    study_datetime: _dt.datetime | None = None,
) -> list[Dataset]:
    """Build a single-frame CT Image Storage series from a volume.

    Parameters
    ----------
    image : array_like
        Volume ``(z, y, x)`` in Hounsfield units.  Values are rounded to the
        nearest integer and stored as signed 16-bit (slope 1, intercept 0).
    spacing : sequence of float
        Voxel spacing ``(z, y, x)`` in mm; all positive.
    origin : sequence of float or None, optional
        ImagePositionPatient of slice ``k = 0`` (mm).  ``None`` centres the
        volume on the patient coordinate origin (:func:`centred_origin`).
    orientation : sequence of float, optional
        ImageOrientationPatient: unit row cosines then unit column cosines,
        orthogonal to each other.  Oblique orientations are allowed.
    study_uid, series_uid, frame_of_reference_uid : str or None, optional
        UIDs to use; new UIDs below ``uid_root`` when ``None``.  SOP Instance
        UIDs are derived deterministically from the series UID and slice index.
    uid_root : str, optional
        Root for generated UIDs (default :data:`UID_ROOT`).
    patient : PatientInfo, optional
        Patient module values (synthetic defaults).
    series_description : str, optional
        SeriesDescription.
    series_number : int, optional
        SeriesNumber (>= 0).
    descending : bool, optional
        If ``True`` instance numbers (and the returned list order) run from
        the highest slice position to the lowest; the geometry is unchanged,
        so sorting along the normal still recovers ``image``.
    accession_number : str, optional
        AccessionNumber (may be empty).
    study_description : str, optional
        StudyDescription.
    study_datetime : datetime.datetime or None, optional
        Study/series/content date and time; now (UTC) when ``None``.

    Returns
    -------
    list of pydicom.dataset.Dataset
        One dataset per slice in instance-number order, each with file meta
        information (Explicit VR Little Endian).

    Raises
    ------
    ValueError
        If an argument is malformed; the message names the argument.
    """
    pixels = _check_image(image)
    sz, sy, sx = _check_spacing(spacing)
    row, col, normal = _directions(orientation)
    org = _check_origin(origin, pixels.shape, (sz, sy, sx), orientation)
    _check_series_args(series_number, patient)
    uids = _series_uids(uid_root, study_uid, series_uid, frame_of_reference_uid)
    series = _CtSeries(
        uids=uids, uid_root=uid_root, patient=patient, accession_number=accession_number,
        study_description=study_description, series_description=series_description, series_number=series_number,
        when=study_datetime if study_datetime is not None else _dt.datetime.now(_dt.UTC),
        spacing=(sz, sy, sx), origin=org, row=row, col=col, normal=normal,
    )
    order = range(pixels.shape[0] - 1, -1, -1) if descending else range(pixels.shape[0])
    return [_ct_slice(series, number, k, pixels[k]) for number, k in enumerate(order, start=1)]


def write_datasets(datasets: Sequence[Dataset], out_dir: str | Path) -> list[Path]:
    """Write each dataset to ``out_dir / f"{SOPInstanceUID}.dcm"``.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        Datasets with file meta information.
    out_dir : str or Path
        Target folder; created if missing.

    Returns
    -------
    list of Path
        The written paths, in the order of ``datasets``.

    Raises
    ------
    ValueError
        If a SOPInstanceUID is missing or not a valid UID (file names are
        built only from validated UIDs).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, ds in enumerate(datasets):
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if not _UID_RE.fullmatch(sop_uid) or len(sop_uid) > 64:
            raise ValueError(f"datasets[{index}] has no valid SOPInstanceUID")
        path = out / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_study(
    out_dir: str | Path,
    image: npt.ArrayLike,
    spacing: Sequence[float],
    **kwargs: object,
) -> list[Path]:
    """Build a synthetic CT series and write it to ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Target folder; created if missing.
    image : array_like
        Volume ``(z, y, x)`` in HU.
    spacing : sequence of float
        Voxel spacing ``(z, y, x)`` in mm.
    **kwargs
        Keyword arguments of :func:`build_ct_series`.

    Returns
    -------
    list of Path
        The written files in instance order.
    """
    datasets = build_ct_series(image, spacing, **kwargs)  # type: ignore[arg-type]
    return write_datasets(datasets, out_dir)


# -- helpers -----------------------------------------------------------------


class _SeriesUids(NamedTuple):
    """Study, series and frame of reference UIDs of a synthetic series."""

    study: str
    series: str
    frame_of_reference: str


@dataclass(frozen=True)
class _CtSeries:
    """What every slice of one synthetic CT series shares."""

    uids: _SeriesUids
    uid_root: str
    patient: PatientInfo
    accession_number: str
    study_description: str
    series_description: str
    series_number: int
    when: _dt.datetime
    spacing: tuple[float, float, float]
    origin: npt.NDArray[np.float64]
    row: npt.NDArray[np.float64]
    col: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]

    @property
    def date(self) -> str:
        """Study/series/content date, ``YYYYMMDD``."""
        return self.when.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        """Study/series/content time, ``HHMMSS``."""
        return self.when.strftime("%H%M%S")


def _ct_slice(series: _CtSeries, instance_number: int, k: int, pixels: npt.NDArray[np.int16]) -> Dataset:
    """Assemble the CT Image Storage instance of sorted slice ``k``, module by module."""
    sop_uid = make_uid(series.uid_root, series.uids.series, "slice", str(k))
    sz, sy, sx = series.spacing
    position = series.origin + k * sz * series.normal
    ds = Dataset()
    ds.file_meta = file_meta(CTImageStorage, sop_uid, implementation_version_name="I3NODE_0_1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    set_sop_common(ds, CTImageStorage, sop_uid, series.date, series.time)
    _set_patient_study(ds, series)
    set_general_series(
        ds, modality="CT", series_uid=series.uids.series, series_number=series.series_number,
        date=series.date, time=series.time, description=series.series_description,
    )
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    set_frame_of_reference(ds, series.uids.frame_of_reference, "")
    set_general_equipment(ds, "i3node", "synthetic", "i3node")
    # General Image / General Acquisition
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    ds.ContentDate = series.date
    ds.ContentTime = series.time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BurnedInAnnotation = "NO"
    set_image_plane(
        ds, pixel_spacing=(sy, sx), orientation=(*series.row, *series.col), position=position, thickness=sz
    )
    ds.SliceLocation = format_ds(float(np.dot(position, series.normal)))
    set_image_pixel(ds, pixels)
    _set_ct_image(ds)
    return ds


def _set_patient_study(ds: Dataset, series: _CtSeries) -> None:
    """Set the Patient and General Study modules."""
    ds.PatientName = series.patient.name
    ds.PatientID = series.patient.id
    ds.PatientBirthDate = series.patient.birth_date
    ds.PatientSex = series.patient.sex
    ds.StudyInstanceUID = series.uids.study
    ds.StudyDate = series.date
    ds.StudyTime = series.time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = series.accession_number
    ds.StudyDescription = series.study_description


def _set_ct_image(ds: Dataset) -> None:
    """Set the CT Image (stored value == HU) and VOI LUT (soft-tissue window) attributes."""
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.WindowCenter = format_ds(_WINDOW_CENTER)
    ds.WindowWidth = format_ds(_WINDOW_WIDTH)
    ds.VOILUTFunction = "LINEAR"


def _check_uid(name: str, uid: str, max_len: int = 64) -> None:
    if not isinstance(uid, str) or not _UID_RE.fullmatch(uid) or len(uid) > max_len:
        raise ValueError(f"{name} must be a UID of digits and dots (max {max_len} chars), got {uid!r}")


def _check_image(image: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Validate the volume; return it rounded to little-endian int16."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"image must be 3-D (z, y, x), got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise ValueError(f"image must not be empty, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"image must be real-valued, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values")
    stored = np.rint(arr.astype(np.float64))
    lo, hi = float(stored.min()), float(stored.max())
    if lo < _INT16_MIN or hi > _INT16_MAX:
        raise ValueError(
            f"image values must fit signed 16-bit after rounding, got range [{lo}, {hi}]"
        )
    pixels = stored.astype("<i2")
    _, ny, nx = pixels.shape
    if ny > 65535 or nx > 65535:
        raise ValueError(f"image in-plane size too large: {ny} x {nx}")
    return pixels


def _check_origin(
    origin: Sequence[float] | None,
    shape: Sequence[int],
    spacing: tuple[float, float, float],
    orientation: Sequence[float],
) -> npt.NDArray[np.float64]:
    """Validate ``origin``; ``None`` gives the centred origin."""
    if origin is None:
        return np.asarray(centred_origin(shape, spacing, orientation))
    org = np.asarray([float(v) for v in origin], dtype=np.float64)
    if org.shape != (3,) or not np.all(np.isfinite(org)):
        raise ValueError(f"origin must be 3 finite numbers, got {origin!r}")
    return org


def _check_series_args(series_number: int, patient: PatientInfo) -> None:
    """Validate ``series_number`` and ``patient``."""
    if not isinstance(series_number, int) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative int, got {series_number!r}")
    if not isinstance(patient, PatientInfo):
        raise ValueError("patient must be a PatientInfo")


def _series_uids(
    uid_root: str, study_uid: str | None, series_uid: str | None, frame_of_reference_uid: str | None
) -> _SeriesUids:
    """Validate the given UIDs; generate the missing ones below ``uid_root``."""
    _check_uid("uid_root", uid_root, max_len=40)
    study_uid = study_uid if study_uid is not None else make_uid(uid_root)
    series_uid = series_uid if series_uid is not None else make_uid(uid_root)
    for_uid = frame_of_reference_uid if frame_of_reference_uid is not None else make_uid(uid_root)
    _check_uid("study_uid", study_uid)
    _check_uid("series_uid", series_uid)
    _check_uid("frame_of_reference_uid", for_uid)
    return _SeriesUids(study_uid, series_uid, for_uid)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}") from exc
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}")
    return values[0], values[1], values[2]


def _directions(
    orientation: Sequence[float],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    try:
        iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"orientation must be 6 direction cosines, got {orientation!r}") from exc
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise ValueError(f"orientation must be 6 direction cosines, got {orientation!r}")
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > _ORTHO_TOL or abs(np.linalg.norm(col) - 1) > _ORTHO_TOL:
        raise ValueError("orientation row and column cosines must be unit vectors")
    if abs(float(np.dot(row, col))) > _ORTHO_TOL:
        raise ValueError("orientation row and column cosines must be orthogonal")
    return row, col, np.cross(row, col)


