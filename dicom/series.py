"""Series -> volume: assemble single-frame CT/MR instances into a 3-D array.

:func:`load_series` reads the instances of one series, sorts them along the
slice normal, checks that they form a regular grid and returns a
:class:`Volume`.  Anything that would make the volume wrong raises a
:class:`SeriesError` subclass naming the series and the problem, so the job
can be failed with a clear reason while the data are kept.

Conventions (``docs/contracts.md``): arrays are ``(z, y, x)``; ``z`` follows
the slices sorted ascending along ``n = cross(IOP[:3], IOP[3:])``; spacing is
``(z, y, x)`` in mm with ``y`` = PixelSpacing[0] (row spacing, the distance
between rows) and ``x`` = PixelSpacing[1]; voxel ``(k, j, i)`` lies at
``origin + k*sz*n + j*sy*col + i*sx*row`` with ``row = IOP[:3]`` and
``col = IOP[3:]``.

Log records and error messages name UIDs, instance numbers and geometry only,
never patient attributes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    CTImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

__all__ = [
    "SUPPORTED_SOP_CLASSES",
    "DuplicatePositionError",
    "EmptySeriesError",
    "InconsistentGeometryError",
    "MissingPixelDataError",
    "MissingSlicesError",
    "MixedFrameOfReferenceError",
    "MixedOrientationError",
    "MultipleSeriesError",
    "NonUniformSpacingError",
    "SeriesError",
    "UnreadableInstanceError",
    "UnsupportedSeriesError",
    "Volume",
    "load_series",
    "sort_datasets",
]

log = logging.getLogger(__name__)

#: Single-frame image storage SOP classes that :func:`load_series` accepts.
SUPPORTED_SOP_CLASSES: frozenset[str] = frozenset(
    {str(CTImageStorage), str(MRImageStorage), str(PositronEmissionTomographyImageStorage)}
)

_ORIENTATION_TOL = 1e-4  # absolute, per direction cosine
_UNIT_TOL = 1e-3  # |row|, |col| deviation from 1 and row.col


# -- errors ------------------------------------------------------------------


class SeriesError(ValueError):
    """A set of instances cannot be assembled into a volume.

    Parameters
    ----------
    message : str
        What is wrong (no patient attributes).
    series_uid : str or None, optional
        SeriesInstanceUID concerned; prefixed to the message when given.

    Attributes
    ----------
    series_uid : str or None
        SeriesInstanceUID concerned.
    reason : str
        The message without the series prefix.
    """

    def __init__(self, message: str, *, series_uid: str | None = None) -> None:
        self.series_uid = series_uid
        self.reason = message
        prefix = f"series {series_uid}: " if series_uid else ""
        super().__init__(prefix + message)


class EmptySeriesError(SeriesError):
    """No instances were given."""


class UnreadableInstanceError(SeriesError):
    """A source file is missing or not a DICOM file."""


class UnsupportedSeriesError(SeriesError):
    """Instances are not single-frame CT/MR/PET images (e.g. multi-frame, SEG, colour)."""


class MultipleSeriesError(SeriesError):
    """Instances belong to more than one series (or study)."""


class MissingPixelDataError(SeriesError):
    """An instance has no Pixel Data."""


class InconsistentGeometryError(SeriesError):
    """Missing/malformed geometry attributes, or matrix size / pixel spacing / in-plane offset differ."""


class MixedOrientationError(SeriesError):
    """Instances have different ImageOrientationPatient."""


class MixedFrameOfReferenceError(SeriesError):
    """Instances have different FrameOfReferenceUID."""


class DuplicatePositionError(SeriesError):
    """Two instances lie at the same position along the normal (or one is given twice)."""


class MissingSlicesError(SeriesError):
    """A gap between consecutive slices is a multiple (>= 2) of the typical spacing."""


class NonUniformSpacingError(SeriesError):
    """Slice spacing varies beyond the tolerance (and is not explained by missing slices)."""


# -- volume ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D image on a regular grid with its DICOM geometry and provenance.

    Parameters
    ----------
    array : numpy.ndarray
        float32 ``(z, y, x)``, rescale (slope/intercept) applied.
    spacing : tuple of float
        ``(z, y, x)`` voxel spacing in mm.
    origin : tuple of float
        ImagePositionPatient of sorted slice 0 (mm).
    orientation : tuple of float
        ImageOrientationPatient, 6 floats (row then column cosines).
    sop_instance_uids : tuple of str
        SOP Instance UIDs in sorted order, one per ``z``.
    study_instance_uid, series_instance_uid, frame_of_reference_uid : str
        UIDs of the source series.
    modality : str, optional
        Modality of the source series (``"CT"``, ``"MR"`` ...).
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, ...]
    sop_instance_uids: tuple[str, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray) or self.array.ndim != 3:
            raise ValueError("Volume.array must be a 3-D numpy array (z, y, x)")
        if len(self.spacing) != 3 or not all(float(s) > 0 for s in self.spacing):
            raise ValueError(f"Volume.spacing must be 3 positive numbers, got {self.spacing!r}")
        if len(self.origin) != 3:
            raise ValueError(f"Volume.origin must have 3 values, got {self.origin!r}")
        if len(self.orientation) != 6:
            raise ValueError(f"Volume.orientation must have 6 values, got {self.orientation!r}")
        if len(self.sop_instance_uids) != self.array.shape[0]:
            raise ValueError(
                "Volume.sop_instance_uids must have one UID per z slice: "
                f"{len(self.sop_instance_uids)} UIDs for {self.array.shape[0]} slices"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        nz, ny, nx = self.array.shape
        return int(nz), int(ny), int(nx)

    @property
    def row_direction(self) -> npt.NDArray[np.float64]:
        """Unit vector of increasing ``x`` index (IOP[:3])."""
        row = np.asarray(self.orientation[:3], dtype=np.float64)
        return row / np.linalg.norm(row)

    @property
    def column_direction(self) -> npt.NDArray[np.float64]:
        """Unit vector of increasing ``y`` index (IOP[3:])."""
        col = np.asarray(self.orientation[3:], dtype=np.float64)
        return col / np.linalg.norm(col)

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        """Unit slice normal ``cross(row, col)``: direction of increasing ``z`` index."""
        n = np.cross(self.row_direction, self.column_direction)
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping ``(k, j, i, 1)`` (voxel index) to patient mm (LPS).

        Returns
        -------
        numpy.ndarray
            ``A`` with ``A @ (k, j, i, 1) = (px, py, pz, 1)``.
        """
        sz, sy, sx = (float(s) for s in self.spacing)
        a = np.eye(4, dtype=np.float64)
        a[:3, 0] = sz * self.normal
        a[:3, 1] = sy * self.column_direction
        a[:3, 2] = sx * self.row_direction
        a[:3, 3] = np.asarray(self.origin, dtype=np.float64)
        return a

    def slice_position(self, axis: int, index: int) -> float:
        """Position (mm) of a slice centre along that slice's normal.

        Parameters
        ----------
        axis : int
            0 (slices of constant ``k``, normal ``n``), 1 (constant ``j``,
            normal = column direction) or 2 (constant ``i``, normal = row
            direction).
        index : int
            Slice index along ``axis``.

        Returns
        -------
        float
            ``dot(centre, d)`` where ``d`` is the unit direction of ``axis``.

        Raises
        ------
        ValueError
            If ``axis`` or ``index`` is out of range.
        """
        return float(np.dot(self.slice_centre(axis, index), self._axis_direction(axis)))

    def slice_centre(self, axis: int, index: int) -> npt.NDArray[np.float64]:
        """Patient coordinates (mm) of the centre of a slice.

        Parameters
        ----------
        axis : int
            0, 1 or 2 (see :meth:`slice_position`).
        index : int
            Slice index along ``axis``.

        Returns
        -------
        numpy.ndarray
            ``(3,)`` patient position in mm.

        Raises
        ------
        ValueError
            If ``axis`` or ``index`` is out of range.
        """
        self._axis_direction(axis)
        n = self.shape[axis]
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < n:
            raise ValueError(f"index must be an int in [0, {n}) for axis {axis}, got {index!r}")
        centre = [(s - 1) / 2.0 for s in self.shape]
        centre[axis] = float(index)
        return np.asarray((self.affine() @ np.array([*centre, 1.0]))[:3], dtype=np.float64)

    def _axis_direction(self, axis: int) -> npt.NDArray[np.float64]:
        """Unit direction of increasing index along ``axis``."""
        if axis == 0:
            return self.normal
        if axis == 1:
            return self.column_direction
        if axis == 2:
            return self.row_direction
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")


# -- sorting -----------------------------------------------------------------


def sort_datasets(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Sort datasets ascending along the slice normal.

    The normal is that of the first dataset's ImageOrientationPatient; ties
    are broken by InstanceNumber then SOPInstanceUID so the result is
    deterministic.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        Single-frame image datasets with ImagePositionPatient and
        ImageOrientationPatient.

    Returns
    -------
    list of pydicom.dataset.Dataset
        A new list, lowest position along the normal first.

    Raises
    ------
    InconsistentGeometryError
        If a dataset lacks or has malformed position/orientation.
    """
    if not datasets:
        return []
    series_uid = _series_uid_of(datasets[0])
    _, _, normal = _directions(_orientation(datasets[0], 0, series_uid), series_uid)
    keyed = []
    for index, ds in enumerate(datasets):
        pos = _position(ds, index, series_uid)
        keyed.append((float(np.dot(pos, normal)), _instance_number(ds), str(ds.get("SOPInstanceUID", "")), index))
    keyed.sort()
    return [datasets[item[3]] for item in keyed]


# -- loading -----------------------------------------------------------------


def load_series(
    sources: Sequence[Path | str | Dataset],
    *,
    spacing_tolerance: float = 0.01,
    spacing_tolerance_mm: float = 1e-3,
    require_single_series: bool = True,
) -> Volume:
    """Read the instances of one series and assemble them into a :class:`Volume`.

    Parameters
    ----------
    sources : sequence of Path, str or pydicom.dataset.Dataset
        Files (read completely, pixel data included) or datasets, in any order.
    spacing_tolerance : float, optional
        Relative tolerance on slice spacing: a gap between consecutive slices
        may differ from the typical gap by ``spacing_tolerance * typical``
        (default 1 %).  The same tolerance applies to in-plane alignment of the
        slice positions (relative to the pixel spacing).
    spacing_tolerance_mm : float, optional
        Absolute floor of the tolerance in mm (covers DS rounding).
    require_single_series : bool, optional
        If ``True`` (default) instances from more than one series or study
        raise :class:`MultipleSeriesError`.  If ``False`` they are assembled
        as one volume when the geometry is consistent and the volume reports
        the most frequent series UID.

    Returns
    -------
    Volume
        float32 ``(z, y, x)`` array (rescale applied), geometry and UIDs.

    Raises
    ------
    EmptySeriesError
        ``sources`` is empty.
    UnreadableInstanceError
        A file is missing or not DICOM.
    UnsupportedSeriesError
        Not single-frame CT/MR/PET greyscale images, or undecodable pixel data.
    MultipleSeriesError
        More than one SeriesInstanceUID/StudyInstanceUID (when required single).
    MissingPixelDataError
        An instance has no Pixel Data.
    InconsistentGeometryError
        Missing/malformed geometry, or differing matrix size, pixel spacing or
        in-plane offset (e.g. gantry tilt).
    MixedOrientationError
        ImageOrientationPatient differs between instances.
    MixedFrameOfReferenceError
        FrameOfReferenceUID differs between instances.
    DuplicatePositionError
        Two instances at the same position, or one instance given twice.
    MissingSlicesError
        A gap of about ``k >= 2`` times the typical spacing.
    NonUniformSpacingError
        Other spacing variation beyond tolerance.
    ValueError
        If a tolerance argument is negative or not finite.
    """
    _check_tolerances(spacing_tolerance, spacing_tolerance_mm)
    if len(sources) == 0:
        raise EmptySeriesError("no instances given")
    datasets = [_read(source, index) for index, source in enumerate(sources)]
    series_uid = _check_identity(datasets, require_single_series)
    study_uid = _most_common([str(ds.get("StudyInstanceUID", "")) for ds in datasets])
    for index, ds in enumerate(datasets):
        _check_supported(ds, index, series_uid)
    grid = _check_geometry(datasets, spacing_tolerance, spacing_tolerance_mm, series_uid)
    volume = _assemble(grid, study_uid, series_uid)
    log.debug(
        "assembled series %s: %d slices, shape %s, spacing %s mm",
        series_uid,
        len(grid.datasets),
        volume.shape,
        tuple(round(s, 4) for s in volume.spacing),
    )
    return volume


# -- helpers: reading and identity -------------------------------------------


def _check_tolerances(spacing_tolerance: float, spacing_tolerance_mm: float) -> None:
    """Refuse negative or non-finite tolerance arguments."""
    if not (np.isfinite(spacing_tolerance) and spacing_tolerance >= 0):
        raise ValueError(f"spacing_tolerance must be a finite number >= 0, got {spacing_tolerance!r}")
    if not (np.isfinite(spacing_tolerance_mm) and spacing_tolerance_mm >= 0):
        raise ValueError(f"spacing_tolerance_mm must be a finite number >= 0, got {spacing_tolerance_mm!r}")


def _read(source: Path | str | Dataset, index: int) -> Dataset:
    """Return a dataset as is, or read a file completely (pixel data included)."""
    if isinstance(source, Dataset):
        return source
    if not isinstance(source, (str, Path)):
        raise UnreadableInstanceError(
            f"sources[{index}] must be a path or a pydicom Dataset, got {type(source).__name__}"
        )
    path = Path(source)
    try:
        return pydicom.dcmread(path, stop_before_pixels=False)
    except FileNotFoundError as exc:
        raise UnreadableInstanceError(f"sources[{index}]: file not found: {path}") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise UnreadableInstanceError(
            f"sources[{index}]: cannot read {path} as DICOM ({type(exc).__name__})"
        ) from exc


def _series_uid_of(ds: Dataset) -> str | None:
    """SeriesInstanceUID of a dataset, ``None`` when missing or empty."""
    uid = ds.get("SeriesInstanceUID")
    return str(uid) if uid else None


def _check_identity(datasets: list[Dataset], require_single_series: bool) -> str:
    """Check series/study membership and SOP Instance UIDs; return the (most common) series UID."""
    series = [str(ds.get("SeriesInstanceUID", "")) for ds in datasets]
    distinct = sorted(set(series))
    series_uid = _most_common(series)
    if require_single_series:
        if len(distinct) > 1:
            counts = ", ".join(f"{uid or '<missing>'} ({series.count(uid)})" for uid in distinct)
            raise MultipleSeriesError(f"instances belong to {len(distinct)} series: {counts}")
        studies = sorted({str(ds.get("StudyInstanceUID", "")) for ds in datasets})
        if len(studies) > 1:
            raise MultipleSeriesError(
                f"instances belong to {len(studies)} studies: {', '.join(u or '<missing>' for u in studies)}",
                series_uid=series_uid or None,
            )
    if not series_uid:
        raise UnsupportedSeriesError("SeriesInstanceUID is missing")
    seen: dict[str, int] = {}
    for ds in datasets:
        sop = str(ds.get("SOPInstanceUID", ""))
        if not sop:
            raise UnsupportedSeriesError(
                f"an instance has no SOPInstanceUID ({_describe(ds)})", series_uid=series_uid
            )
        seen[sop] = seen.get(sop, 0) + 1
    repeated = [uid for uid, n in seen.items() if n > 1]
    if repeated:
        raise DuplicatePositionError(
            f"SOP Instance UID {repeated[0]} given {seen[repeated[0]]} times"
            + (f" (and {len(repeated) - 1} more repeated)" if len(repeated) > 1 else ""),
            series_uid=series_uid,
        )
    return series_uid


def _check_supported(ds: Dataset, index: int, series_uid: str) -> None:
    """Refuse anything but single-frame greyscale CT/MR/PET images."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in SUPPORTED_SOP_CLASSES:
        name = getattr(ds.get("SOPClassUID"), "name", sop_class) if sop_class else "<missing>"
        raise UnsupportedSeriesError(
            f"{_describe(ds)} has SOP class {name}; only single-frame CT, MR and PET image "
            "storage is supported (multi-frame/enhanced images, SEG, SR, KOS are not)",
            series_uid=series_uid,
        )
    frames = ds.get("NumberOfFrames", 1)
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames != 1:
        raise UnsupportedSeriesError(
            f"{_describe(ds)} is multi-frame ({n_frames} frames); only single-frame images are supported",
            series_uid=series_uid,
        )
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or str(
        ds.get("PhotometricInterpretation", "MONOCHROME2")
    ) not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedSeriesError(
            f"{_describe(ds)} is not a greyscale image "
            f"(PhotometricInterpretation {ds.get('PhotometricInterpretation', '<missing>')})",
            series_uid=series_uid,
        )


# -- helpers: geometry -------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Grid:
    """Checked geometry of a series, instances sorted ascending along the slice normal."""

    datasets: list[Dataset]
    positions: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    frame_of_reference_uid: str
    rows: int
    columns: int
    spacing: tuple[float, float, float]


def _check_geometry(datasets: list[Dataset], rel_tol: float, abs_tol: float, series_uid: str) -> _Grid:
    """Check orientation, frame of reference, matrix and spacings; sort the instances along the normal."""
    orientation = _common_orientation(datasets, series_uid)
    _, _, normal = _directions(orientation, series_uid)
    frame_of_reference_uid = _common_frame_of_reference(datasets, series_uid)
    _check_pixel_data(datasets, series_uid)
    rows, columns = _common_matrix(datasets, series_uid)
    sy, sx = _common_pixel_spacing(datasets, rel_tol, abs_tol, series_uid)
    datasets, positions, along = _sort_along_normal(datasets, normal, series_uid)
    _check_duplicates(datasets, along, abs_tol, series_uid)
    _check_alignment(datasets, positions, along, normal, max(rel_tol * min(sy, sx), abs_tol), series_uid)
    sz = _slice_spacing(datasets, along, rel_tol, abs_tol, series_uid)
    return _Grid(datasets, positions, orientation, frame_of_reference_uid, rows, columns, (float(sz), sy, sx))


def _common_orientation(datasets: list[Dataset], series_uid: str) -> npt.NDArray[np.float64]:
    """ImageOrientationPatient shared by all instances (that of the first)."""
    iops = [_orientation(ds, index, series_uid) for index, ds in enumerate(datasets)]
    reference = iops[0]
    deviating = [i for i, iop in enumerate(iops) if np.max(np.abs(iop - reference)) > _ORIENTATION_TOL]
    if deviating:
        seen = _distinct_rows(iops)
        raise MixedOrientationError(
            f"{len(seen)} different ImageOrientationPatient values among {len(datasets)} instances "
            f"({'; '.join(_fmt_vec(v) for v in seen[:4])}); first deviating instance: "
            f"{_describe(datasets[deviating[0]])}",
            series_uid=series_uid,
        )
    return reference


def _common_frame_of_reference(datasets: list[Dataset], series_uid: str) -> str:
    """FrameOfReferenceUID shared by all instances."""
    fors = [str(ds.get("FrameOfReferenceUID", "")) for ds in datasets]
    distinct_fors = sorted(set(fors))
    if len(distinct_fors) > 1:
        raise MixedFrameOfReferenceError(
            f"instances use {len(distinct_fors)} frames of reference: "
            f"{', '.join(uid or '<missing>' for uid in distinct_fors)}",
            series_uid=series_uid,
        )
    if not distinct_fors[0]:
        raise InconsistentGeometryError("FrameOfReferenceUID is missing", series_uid=series_uid)
    return distinct_fors[0]


def _check_pixel_data(datasets: list[Dataset], series_uid: str) -> None:
    """Every instance must have (float/double float) Pixel Data."""
    for ds in datasets:
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise MissingPixelDataError(f"no Pixel Data in {_describe(ds)}", series_uid=series_uid)


def _common_matrix(datasets: list[Dataset], series_uid: str) -> tuple[int, int]:
    """Rows and Columns shared by all instances."""
    sizes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for ds in datasets}
    if len(sizes) > 1:
        raise InconsistentGeometryError(
            f"instances have different matrix sizes (rows x columns): {sorted(sizes)}",
            series_uid=series_uid,
        )
    rows, columns = next(iter(sizes))
    if rows < 1 or columns < 1:
        raise InconsistentGeometryError("Rows/Columns missing or zero", series_uid=series_uid)
    return rows, columns


def _common_pixel_spacing(
    datasets: list[Dataset], rel_tol: float, abs_tol: float, series_uid: str
) -> tuple[float, float]:
    """Median ``(row, column)`` PixelSpacing, which must agree between instances within tolerance."""
    pixel_spacings = np.array([_pixel_spacing(ds, series_uid) for ds in datasets])
    ps_tol = max(rel_tol * float(pixel_spacings.min()), abs_tol)
    if float(np.ptp(pixel_spacings[:, 0])) > ps_tol or float(np.ptp(pixel_spacings[:, 1])) > ps_tol:
        raise InconsistentGeometryError(
            "instances have different PixelSpacing: "
            + "; ".join(_fmt_vec(v) for v in _distinct_rows(list(pixel_spacings))[:4]),
            series_uid=series_uid,
        )
    sy, sx = (float(v) for v in np.median(pixel_spacings, axis=0))
    return sy, sx


def _orientation(ds: Dataset, index: int, series_uid: str | None) -> npt.NDArray[np.float64]:
    """ImageOrientationPatient of one instance as 6 finite floats."""
    value = ds.get("ImageOrientationPatient")
    try:
        iop = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        iop = None
    if iop is None or iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise InconsistentGeometryError(
            f"ImageOrientationPatient missing or malformed in {_describe(ds)}", series_uid=series_uid
        )
    return iop


def _directions(
    iop: npt.NDArray[np.float64], series_uid: str | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit row, column and normal vectors of an orthonormal ImageOrientationPatient."""
    row, col = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if abs(nr - 1) > _UNIT_TOL or abs(nc - 1) > _UNIT_TOL or abs(float(np.dot(row, col))) > _UNIT_TOL:
        raise InconsistentGeometryError(
            f"ImageOrientationPatient {_fmt_vec(iop)} is not two orthogonal unit vectors",
            series_uid=series_uid,
        )
    row, col = row / nr, col / nc
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _position(ds: Dataset, index: int, series_uid: str | None) -> npt.NDArray[np.float64]:
    """ImagePositionPatient of one instance as 3 finite floats."""
    value = ds.get("ImagePositionPatient")
    try:
        pos = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        pos = None
    if pos is None or pos.shape != (3,) or not np.all(np.isfinite(pos)):
        raise InconsistentGeometryError(
            f"ImagePositionPatient missing or malformed in {_describe(ds)}", series_uid=series_uid
        )
    return pos


def _pixel_spacing(ds: Dataset, series_uid: str) -> tuple[float, float]:
    """``(row, column)`` PixelSpacing of one instance, both positive."""
    value = ds.get("PixelSpacing")
    try:
        ps = [float(v) for v in value] if value is not None else []
    except (TypeError, ValueError):
        ps = []
    if len(ps) != 2 or not all(np.isfinite(v) and v > 0 for v in ps):
        raise InconsistentGeometryError(
            f"PixelSpacing missing or malformed in {_describe(ds)}", series_uid=series_uid
        )
    return ps[0], ps[1]


def _sort_along_normal(
    datasets: list[Dataset], normal: npt.NDArray[np.float64], series_uid: str
) -> tuple[list[Dataset], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Sort ascending along the normal (ties: InstanceNumber, SOPInstanceUID); also return positions and distances."""
    positions = np.array([_position(ds, index, series_uid) for index, ds in enumerate(datasets)])
    along = positions @ normal
    order = sorted(
        range(len(datasets)),
        key=lambda i: (float(along[i]), _instance_number(datasets[i]), str(datasets[i].get("SOPInstanceUID", ""))),
    )
    return [datasets[i] for i in order], positions[order], along[order]


def _check_duplicates(
    datasets: list[Dataset], along: npt.NDArray[np.float64], tol_mm: float, series_uid: str
) -> None:
    """Refuse two consecutive sorted slices at the same position along the normal."""
    if len(along) < 2:
        return
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps <= max(tol_mm, 1e-6))
    if dup.size:
        i = int(dup[0])
        raise DuplicatePositionError(
            f"{_describe(datasets[i])} and {_describe(datasets[i + 1])} share the position "
            f"{along[i]:.4f} mm along the normal ({dup.size} duplicate pair(s) in total)",
            series_uid=series_uid,
        )


def _check_alignment(
    datasets: list[Dataset],
    positions: npt.NDArray[np.float64],
    along: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    tol: float,
    series_uid: str,
) -> None:
    """In-plane alignment: every slice must sit on the line ``origin + t * normal`` (no gantry tilt or shear)."""
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    worst = int(np.argmax(np.linalg.norm(offsets, axis=1)))
    if float(np.linalg.norm(offsets[worst])) > tol:
        raise InconsistentGeometryError(
            "slice positions are not aligned along the slice normal (gantry tilt or sheared "
            f"series): {_describe(datasets[worst])} is offset by {np.linalg.norm(offsets[worst]):.4g} mm "
            "in-plane from the first slice",
            series_uid=series_uid,
        )


def _slice_spacing(
    datasets: list[Dataset],
    along: npt.NDArray[np.float64],
    rel_tol: float,
    abs_tol: float,
    series_uid: str,
) -> float:
    """Slice spacing (mm) of the sorted slices; refuse missing slices and irregular spacing."""
    if len(along) == 1:
        ds = datasets[0]
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                value = float(ds.get(keyword) or 0)
            except (TypeError, ValueError):
                value = 0.0
            if np.isfinite(value) and value > 0:
                return value
        raise InconsistentGeometryError(
            "single-slice series without SpacingBetweenSlices or SliceThickness: z spacing unknown",
            series_uid=series_uid,
        )
    gaps = np.diff(along)
    typical = _typical_gap(gaps, rel_tol, abs_tol)
    tol = max(rel_tol * typical, abs_tol)
    off = np.flatnonzero(np.abs(gaps - typical) > tol)
    if off.size == 0:
        return float((along[-1] - along[0]) / (len(along) - 1))
    multiples = np.rint(gaps[off] / typical)
    is_gap = (multiples >= 2) & (np.abs(gaps[off] - multiples * typical) <= tol * np.maximum(multiples, 1))
    if bool(np.all(is_gap)):
        where = "; ".join(
            f"between {_describe(datasets[i])} at {along[i]:.3f} mm and {_describe(datasets[i + 1])} at "
            f"{along[i + 1]:.3f} mm ({gaps[i]:.4g} mm = {int(m)} x {typical:.4g} mm, "
            f"{int(m) - 1} slice(s) missing)"
            for i, m in zip(off[:5].tolist(), multiples[:5].tolist(), strict=True)
        )
        more = f" and {off.size - 5} more gap(s)" if off.size > 5 else ""
        raise MissingSlicesError(
            f"{int(np.sum(multiples - 1))} missing slice(s) (typical spacing {typical:.4g} mm): {where}{more}",
            series_uid=series_uid,
        )
    seen = sorted({round(float(g), 4) for g in gaps})
    first = int(off[~is_gap][0])
    raise NonUniformSpacingError(
        f"slice spacing varies beyond tolerance ({tol:.3g} mm around {typical:.4g} mm); spacings seen "
        f"(mm): {', '.join(f'{g:g}' for g in seen[:10])}{' ...' if len(seen) > 10 else ''}; first "
        f"irregular gap {gaps[first]:.4g} mm between {_describe(datasets[first])} and "
        f"{_describe(datasets[first + 1])}",
        series_uid=series_uid,
    )


def _typical_gap(gaps: npt.NDArray[np.float64], rel_tol: float, abs_tol: float) -> float:
    """Median of the most populated cluster of gaps (ties: the smallest gaps)."""
    values = np.sort(gaps)
    best: tuple[int, float] = (0, float(values[0]))
    start = 0
    while start < len(values):
        tol = max(rel_tol * float(values[start]), abs_tol)
        stop = start
        while stop < len(values) and values[stop] - values[start] <= 2 * tol:
            stop += 1
        count = stop - start
        if count > best[0]:
            best = (count, float(np.median(values[start:stop])))
        start = stop
    return best[1]


# -- helpers: assembly -------------------------------------------------------


def _assemble(grid: _Grid, study_uid: str, series_uid: str) -> Volume:
    """Stack the rescaled pixels of the sorted instances into a :class:`Volume`."""
    array = np.empty((len(grid.datasets), grid.rows, grid.columns), dtype=np.float32)
    for k, ds in enumerate(grid.datasets):
        array[k] = _rescaled_pixels(ds, grid.rows, grid.columns, series_uid)
    origin = grid.positions[0]
    return Volume(
        array=array,
        spacing=grid.spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        orientation=tuple(float(v) for v in grid.orientation),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in grid.datasets),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=grid.frame_of_reference_uid,
        modality=_most_common([str(ds.get("Modality", "")) for ds in grid.datasets]),
    )


def _rescaled_pixels(ds: Dataset, rows: int, columns: int, series_uid: str) -> npt.NDArray[np.float32]:
    """Decoded pixels of one instance with RescaleSlope/RescaleIntercept applied."""
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises several types for undecodable data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise UnsupportedSeriesError(
            f"cannot decode pixel data of {_describe(ds)} (transfer syntax "
            f"{getattr(syntax, 'name', syntax) or '<missing>'}: {type(exc).__name__})",
            series_uid=series_uid,
        ) from exc
    if pixels.shape != (rows, columns):
        raise InconsistentGeometryError(
            f"pixel data of {_describe(ds)} has shape {pixels.shape}, expected ({rows}, {columns})",
            series_uid=series_uid,
        )
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise UnsupportedSeriesError(
            f"malformed RescaleSlope/RescaleIntercept in {_describe(ds)}", series_uid=series_uid
        ) from exc
    out = pixels.astype(np.float64)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept
    return out.astype(np.float32)


# -- helpers: small utilities ------------------------------------------------


def _instance_number(ds: Dataset) -> int:
    """InstanceNumber, 0 when missing or malformed."""
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _describe(ds: Dataset) -> str:
    """Identify an instance without patient attributes."""
    number = ds.get("InstanceNumber")
    sop = ds.get("SOPInstanceUID", "<no SOP UID>")
    return f"instance {number if number not in (None, '') else '?'} ({sop})"


def _most_common(values: list[str]) -> str:
    """Most frequent value (ties: a non-empty value first, then the first seen)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], v != ""))


def _distinct_rows(rows: list[npt.NDArray[np.float64]], tol: float = _ORIENTATION_TOL) -> list[npt.NDArray[np.float64]]:
    """Rows that differ from each other by more than ``tol``, in order of appearance."""
    distinct: list[npt.NDArray[np.float64]] = []
    for r in rows:
        if not any(np.max(np.abs(r - d)) <= tol for d in distinct):
            distinct.append(np.asarray(r))
    return distinct


def _fmt_vec(v: npt.ArrayLike) -> str:
    """Compact ``[a, b, ...]`` text of a vector."""
    return "[" + ", ".join(f"{float(x):.5g}" for x in np.asarray(v).ravel()) + "]"
