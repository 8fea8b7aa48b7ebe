"""Unit tests for dicom.series: series -> Volume assembly and its error cases."""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom.series import (
    DuplicatePositionError,
    EmptySeriesError,
    InconsistentGeometryError,
    MissingPixelDataError,
    MissingSlicesError,
    MixedFrameOfReferenceError,
    MixedOrientationError,
    MultipleSeriesError,
    NonUniformSpacingError,
    SeriesError,
    UnreadableInstanceError,
    UnsupportedSeriesError,
    Volume,
    load_series,
    sort_datasets,
)
from dicom.synthetic import PatientInfo, build_ct_series, write_datasets

SPACING = (2.5, 1.5, 0.75)


def _image(shape: tuple[int, int, int] = (8, 12, 10), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 3000, size=shape).astype(np.float64)


def _oblique_iop() -> tuple[float, ...]:
    a, b = math.radians(30.0), math.radians(20.0)
    row = np.array([math.cos(a), math.sin(a), 0.0])
    col = np.array([-math.sin(a) * math.cos(b), math.cos(a) * math.cos(b), math.sin(b)])
    return tuple(float(v) for v in (*row, *col))


def _sorted_uids(datasets: list[Dataset]) -> tuple[str, ...]:
    """Expected sorted SOP UIDs: by position along the normal."""
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    n = np.cross(iop[:3], iop[3:])
    return tuple(
        str(ds.SOPInstanceUID)
        for ds in sorted(datasets, key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], n)))
    )


# -- recovery ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("descending", "orientation"),
    [
        (False, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
        (True, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
        (False, _oblique_iop()),
        (True, _oblique_iop()),
        (False, (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),  # coronal
        (True, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)),  # sagittal
    ],
)
def test_load_series_recovers_volume(descending: bool, orientation: tuple[float, ...]) -> None:
    image = _image()
    origin = (-10.0, 20.5, 33.25)
    datasets = build_ct_series(
        image, SPACING, origin=origin, orientation=orientation, descending=descending
    )
    shuffled = list(datasets)
    random.Random(1).shuffle(shuffled)

    vol = load_series(shuffled)

    assert isinstance(vol, Volume)
    assert vol.array.dtype == np.float32
    assert vol.array.shape == image.shape
    np.testing.assert_array_equal(vol.array, image.astype(np.float32))
    np.testing.assert_allclose(vol.spacing, SPACING, rtol=1e-9)
    np.testing.assert_allclose(vol.origin, origin, atol=1e-9)
    np.testing.assert_allclose(vol.orientation, orientation, atol=1e-12)
    assert vol.sop_instance_uids == _sorted_uids(datasets)
    # instance order: descending series have InstanceNumber 1 at the highest slice
    first = min(datasets, key=lambda d: int(d.InstanceNumber))
    expected_first = vol.sop_instance_uids[-1] if descending else vol.sop_instance_uids[0]
    assert str(first.SOPInstanceUID) == expected_first
    assert vol.series_instance_uid == str(datasets[0].SeriesInstanceUID)
    assert vol.study_instance_uid == str(datasets[0].StudyInstanceUID)
    assert vol.frame_of_reference_uid == str(datasets[0].FrameOfReferenceUID)
    assert vol.modality == "CT"


def test_load_series_from_files(tmp_path: Path) -> None:
    image = _image((5, 6, 7))
    datasets = build_ct_series(image, SPACING, descending=True)
    paths = write_datasets(datasets, tmp_path)
    vol = load_series([str(p) for p in reversed(paths)])
    np.testing.assert_array_equal(vol.array, image)
    assert vol.sop_instance_uids == _sorted_uids(datasets)


def test_rescale_slope_intercept_applied() -> None:
    image = _image((4, 5, 6))
    datasets = build_ct_series(image, SPACING)
    for ds in datasets:
        ds.RescaleSlope = "0.5"
        ds.RescaleIntercept = "-1024"
    vol = load_series(datasets)
    np.testing.assert_allclose(vol.array, image * 0.5 - 1024, rtol=0, atol=1e-3)


def test_pixel_spacing_order_row_spacing_is_y() -> None:
    datasets = build_ct_series(_image((3, 4, 5)), (3.0, 0.8, 0.6))
    assert [float(v) for v in datasets[0].PixelSpacing] == [0.8, 0.6]
    vol = load_series(datasets)
    np.testing.assert_allclose(vol.spacing, (3.0, 0.8, 0.6))


def test_geometry_helpers() -> None:
    orientation = _oblique_iop()
    origin = (5.0, -7.0, 12.0)
    image = _image((4, 6, 8))
    vol = load_series(build_ct_series(image, SPACING, origin=origin, orientation=orientation))
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(row, col)
    np.testing.assert_allclose(vol.normal, n, atol=1e-12)
    a = vol.affine()
    assert a.shape == (4, 4)
    k, j, i = 3, 2, 5
    expected = np.array(origin) + k * SPACING[0] * n + j * SPACING[1] * col + i * SPACING[2] * row
    np.testing.assert_allclose((a @ [k, j, i, 1])[:3], expected, atol=1e-9)
    # slice positions along their normals
    np.testing.assert_allclose(vol.slice_position(0, 2), np.dot(origin, n) + 2 * SPACING[0], atol=1e-9)
    np.testing.assert_allclose(vol.slice_position(1, 4), np.dot(origin, col) + 4 * SPACING[1], atol=1e-9)
    np.testing.assert_allclose(vol.slice_position(2, 7), np.dot(origin, row) + 7 * SPACING[2], atol=1e-9)
    centre = vol.slice_centre(0, 0)
    np.testing.assert_allclose(
        centre, np.array(origin) + 2.5 * SPACING[1] * col + 3.5 * SPACING[2] * row, atol=1e-9
    )
    with pytest.raises(ValueError, match="axis"):
        vol.slice_position(3, 0)
    with pytest.raises(ValueError, match="index"):
        vol.slice_position(0, 4)


def test_sort_datasets_ascending_along_normal() -> None:
    datasets = build_ct_series(_image((6, 3, 3)), SPACING, orientation=_oblique_iop(), descending=True)
    shuffled = list(datasets)
    random.Random(3).shuffle(shuffled)
    ordered = sort_datasets(shuffled)
    assert tuple(str(d.SOPInstanceUID) for d in ordered) == _sorted_uids(datasets)
    assert [int(d.InstanceNumber) for d in ordered] == [6, 5, 4, 3, 2, 1]
    assert sort_datasets([]) == []


def test_single_slice_uses_slice_thickness() -> None:
    vol = load_series(build_ct_series(_image((1, 4, 4)), (3.0, 1.0, 1.0)))
    assert vol.spacing == (3.0, 1.0, 1.0)


def test_small_position_noise_within_tolerance() -> None:
    datasets = build_ct_series(_image((6, 4, 4)), SPACING)
    ipp = [float(v) for v in datasets[3].ImagePositionPatient]
    datasets[3].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.01]  # 0.4 % of 2.5 mm
    vol = load_series(datasets)
    assert vol.spacing[0] == pytest.approx(2.5)


# -- errors --------------------------------------------------------------------


def test_empty_series() -> None:
    with pytest.raises(EmptySeriesError):
        load_series([])


def test_missing_middle_slice() -> None:
    datasets = build_ct_series(_image(), SPACING)
    removed = datasets.pop(4)
    random.Random(2).shuffle(datasets)
    with pytest.raises(MissingSlicesError) as info:
        load_series(datasets)
    msg = str(info.value)
    assert str(removed.SeriesInstanceUID) in msg
    assert "1 missing slice" in msg
    assert "5 mm = 2 x 2.5 mm" in msg
    # names the neighbours of the gap
    assert "instance 4 " in msg and "instance 6 " in msg
    assert info.value.series_uid == str(removed.SeriesInstanceUID)


def test_missing_slices_small_series() -> None:
    datasets = build_ct_series(_image((4, 3, 3)), SPACING)
    del datasets[1]  # gaps 2x, 1x
    with pytest.raises(MissingSlicesError):
        load_series(datasets)


def test_mixed_orientation() -> None:
    datasets = build_ct_series(_image(), SPACING)
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, math.cos(0.1), math.sin(0.1)]
    with pytest.raises(MixedOrientationError, match="2 different ImageOrientationPatient") as info:
        load_series(datasets)
    assert str(datasets[5].SOPInstanceUID) in str(info.value)


def test_non_uniform_spacing() -> None:
    datasets = build_ct_series(_image(), SPACING)
    ipp = [float(v) for v in datasets[4].ImagePositionPatient]
    datasets[4].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.8]
    with pytest.raises(NonUniformSpacingError) as info:
        load_series(datasets)
    msg = str(info.value)
    assert "spacings seen" in msg
    assert "1.7" in msg and "2.5" in msg and "3.3" in msg


def test_non_uniform_spacing_tolerance_is_configurable() -> None:
    datasets = build_ct_series(_image(), SPACING)
    ipp = [float(v) for v in datasets[4].ImagePositionPatient]
    datasets[4].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.1]  # 4 %
    with pytest.raises(NonUniformSpacingError):
        load_series(datasets)
    vol = load_series(datasets, spacing_tolerance=0.05)
    assert vol.spacing[0] == pytest.approx(2.5)


def test_mixed_frame_of_reference() -> None:
    datasets = build_ct_series(_image(), SPACING)
    datasets[2].FrameOfReferenceUID = "1.2.3.4.5"
    with pytest.raises(MixedFrameOfReferenceError, match="1.2.3.4.5"):
        load_series(datasets)


def test_missing_pixel_data() -> None:
    datasets = build_ct_series(_image(), SPACING)
    del datasets[3].PixelData
    with pytest.raises(MissingPixelDataError, match=str(datasets[3].SOPInstanceUID)):
        load_series(datasets)


def test_multiple_series() -> None:
    a = build_ct_series(_image((3, 4, 4)), SPACING)
    b = build_ct_series(_image((3, 4, 4)), SPACING, study_uid=str(a[0].StudyInstanceUID))
    with pytest.raises(MultipleSeriesError, match="2 series") as info:
        load_series(a + b)
    assert str(a[0].SeriesInstanceUID) in str(info.value)
    assert str(b[0].SeriesInstanceUID) in str(info.value)


def test_multiple_series_allowed_when_not_required() -> None:
    image = _image((6, 4, 4))
    datasets = build_ct_series(image, SPACING)
    for ds in datasets[4:]:
        ds.SeriesInstanceUID = "1.2.3.99"
    vol = load_series(datasets, require_single_series=False)
    np.testing.assert_array_equal(vol.array, image)
    assert vol.series_instance_uid == str(datasets[0].SeriesInstanceUID)


def test_duplicate_position() -> None:
    datasets = build_ct_series(_image(), SPACING)
    datasets[3].ImagePositionPatient = list(datasets[2].ImagePositionPatient)
    with pytest.raises(DuplicatePositionError, match="share the position"):
        load_series(datasets)


def test_same_instance_twice() -> None:
    datasets = build_ct_series(_image(), SPACING)
    with pytest.raises(DuplicatePositionError, match="given 2 times"):
        load_series(datasets + [datasets[0]])


def test_multiframe_unsupported() -> None:
    datasets = build_ct_series(_image((3, 4, 4)), SPACING)
    datasets[1].NumberOfFrames = 2
    with pytest.raises(UnsupportedSeriesError, match="multi-frame"):
        load_series(datasets)


def test_non_image_sop_class_unsupported() -> None:
    datasets = build_ct_series(_image((3, 4, 4)), SPACING)
    datasets[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    with pytest.raises(UnsupportedSeriesError, match="Segmentation Storage"):
        load_series(datasets)


def test_gantry_tilt_rejected() -> None:
    datasets = build_ct_series(_image((5, 4, 4)), SPACING)
    for k, ds in enumerate(sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))):
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.5 * k, ipp[2]]
    with pytest.raises(InconsistentGeometryError, match="not aligned"):
        load_series(datasets)


def test_different_matrix_size_rejected() -> None:
    datasets = build_ct_series(_image((3, 4, 4)), SPACING)
    datasets[1].Rows = 5
    with pytest.raises(InconsistentGeometryError, match="matrix sizes"):
        load_series(datasets)


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(UnreadableInstanceError, match="sources\\[0\\]"):
        load_series([bad])
    with pytest.raises(UnreadableInstanceError, match="not found"):
        load_series([tmp_path / "absent.dcm"])


def test_errors_are_value_errors_and_series_errors() -> None:
    for cls in (
        MixedOrientationError,
        NonUniformSpacingError,
        MissingSlicesError,
        MixedFrameOfReferenceError,
        MissingPixelDataError,
        MultipleSeriesError,
        DuplicatePositionError,
        EmptySeriesError,
        UnsupportedSeriesError,
        InconsistentGeometryError,
        UnreadableInstanceError,
    ):
        assert issubclass(cls, SeriesError)
        assert issubclass(cls, ValueError)


def test_no_patient_attributes_in_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    patient = PatientInfo(name="Secret^Person", id="PID-98765", birth_date="19451231", sex="F")
    datasets = build_ct_series(_image(), SPACING, patient=patient)
    caplog.set_level(logging.DEBUG, logger="dicom")
    load_series(datasets)
    messages = [caplog.text]
    broken = [pydicom.Dataset(ds) for ds in datasets]
    del broken[3]
    with pytest.raises(SeriesError) as info:
        load_series(broken)
    messages.append(str(info.value))
    mixed = build_ct_series(_image(), SPACING, patient=patient)
    mixed[1].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(SeriesError) as info2:
        load_series(mixed)
    messages.append(str(info2.value))
    for text in messages:
        for secret in ("Secret", "Person", "PID-98765", "19451231"):
            assert secret not in text


def test_invalid_tolerance_argument() -> None:
    with pytest.raises(ValueError, match="spacing_tolerance"):
        load_series(build_ct_series(_image((2, 2, 2)), SPACING), spacing_tolerance=-1)


def test_volume_validates_fields() -> None:
    with pytest.raises(ValueError, match="one UID per z"):
        Volume(
            array=np.zeros((2, 3, 3), np.float32),
            spacing=(1.0, 1.0, 1.0),
            origin=(0.0, 0.0, 0.0),
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            sop_instance_uids=("1.2",),
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.4",
            frame_of_reference_uid="1.2.5",
        )
