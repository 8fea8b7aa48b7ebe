"""Integration tests for dicom.synthetic: real files, dciodvfy as independent validator."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

import dicom
from dicom.series import load_series
from dicom.synthetic import (
    UID_ROOT,
    PatientInfo,
    build_ct_series,
    centred_origin,
    write_datasets,
    write_study,
)

REPO = Path(__file__).resolve().parents[2]


def _image(shape: tuple[int, int, int] = (6, 16, 12)) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (-1000.0 + 40.0 * z + 3.0 * y + x).astype(np.float32)


def _oblique() -> tuple[float, ...]:
    a, b = math.radians(25.0), math.radians(15.0)
    row = (math.cos(a), math.sin(a), 0.0)
    col = (-math.sin(a) * math.cos(b), math.cos(a) * math.cos(b), math.sin(b))
    return (*row, *col)


def test_dicom_package_is_this_repository() -> None:
    assert Path(dicom.__file__).resolve().is_relative_to(REPO)


def test_write_study_files_and_attributes(tmp_path: Path) -> None:
    image = _image()
    paths = write_study(tmp_path, image, (2.0, 0.9, 0.7), series_number=7)
    assert len(paths) == image.shape[0]
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert str(ds.SOPInstanceUID).startswith(UID_ROOT + ".")
        assert str(ds.SeriesInstanceUID).startswith(UID_ROOT + ".")
        assert ds.Modality == "CT"
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        assert [float(v) for v in ds.PixelSpacing] == [0.9, 0.7]
        assert float(ds.SliceThickness) == 2.0
        assert int(ds.InstanceNumber) == k + 1
        assert ds.SeriesNumber == 7
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], (-48.0, -48.0, 2.0 * k))
        np.testing.assert_array_equal(ds.pixel_array, image[k].astype(np.int16))


def test_descending_reverses_instance_order_only() -> None:
    image = _image((4, 3, 3))
    asc = build_ct_series(image, (2.0, 1.0, 1.0), series_uid="1.2.3.4")
    desc = build_ct_series(image, (2.0, 1.0, 1.0), series_uid="1.2.3.4", descending=True)
    # same SOP UIDs (derived from series UID + slice index) and positions, opposite numbering
    by_uid = {str(d.SOPInstanceUID): d for d in desc}
    for ds in asc:
        other = by_uid[str(ds.SOPInstanceUID)]
        assert list(other.ImagePositionPatient) == list(ds.ImagePositionPatient)
        assert int(other.InstanceNumber) == len(asc) + 1 - int(ds.InstanceNumber)
    assert [float(d.ImagePositionPatient[2]) for d in desc] == [6.0, 4.0, 2.0, 0.0]


def test_centred_origin_and_oblique_geometry() -> None:
    image = _image((5, 8, 6))
    spacing = (3.0, 1.2, 0.8)
    orientation = _oblique()
    datasets = build_ct_series(image, spacing, origin=None, orientation=orientation)
    vol = load_series(datasets)
    expected_origin = centred_origin(image.shape, spacing, orientation)
    np.testing.assert_allclose(vol.origin, expected_origin, atol=1e-9)
    # volume centre at the patient origin
    centre_index = [(n - 1) / 2 for n in image.shape]
    np.testing.assert_allclose((vol.affine() @ [*centre_index, 1.0])[:3], 0.0, atol=1e-9)
    # per-slice positions are origin + k * sz * normal
    n = np.cross(orientation[:3], orientation[3:])
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], np.array(expected_origin) + k * spacing[0] * n, atol=1e-9
        )
    np.testing.assert_array_equal(vol.array, image)


def test_explicit_uids_and_patient(tmp_path: Path) -> None:
    patient = PatientInfo(name="Test^Phantom", id="I3N-0042", birth_date="", sex="")
    datasets = build_ct_series(
        _image((2, 4, 4)),
        (1.0, 1.0, 1.0),
        study_uid="1.2.826.0.1.3680043.10.1234.7",
        series_uid="1.2.826.0.1.3680043.10.1234.7.1",
        frame_of_reference_uid="1.2.826.0.1.3680043.10.1234.7.2",
        patient=patient,
        accession_number="ACC1",
        study_description="desc",
        series_description="series desc",
    )
    ds = datasets[0]
    assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.10.1234.7"
    assert ds.SeriesInstanceUID == "1.2.826.0.1.3680043.10.1234.7.1"
    assert ds.FrameOfReferenceUID == "1.2.826.0.1.3680043.10.1234.7.2"
    assert str(ds.PatientName) == "Test^Phantom" and ds.PatientID == "I3N-0042"
    assert ds.AccessionNumber == "ACC1" and ds.StudyDescription == "desc"
    assert ds.SeriesDescription == "series desc"
    # custom uid root
    other = build_ct_series(_image((1, 2, 2)), (1.0, 1.0, 1.0), uid_root="1.2.3")
    assert str(other[0].SOPInstanceUID).startswith("1.2.3.")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((4, 4))}, "image must be 3-D"),
        ({"image": np.full((1, 2, 2), 40000.0)}, "signed 16-bit"),
        ({"image": np.full((1, 2, 2), np.nan)}, "NaN"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"orientation": (1, 0, 0, 1, 0, 0)}, "orthogonal"),
        ({"orientation": (2, 0, 0, 0, 1, 0)}, "unit"),
        ({"series_uid": "1.2.abc"}, "series_uid"),
        ({"origin": (0.0, 0.0)}, "origin"),
    ],
)
def test_argument_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"image": np.zeros((1, 2, 2)), "spacing": (1.0, 1.0, 1.0)}
    args.update(kwargs)
    image, spacing = args.pop("image"), args.pop("spacing")
    with pytest.raises(ValueError, match=match):
        build_ct_series(image, spacing, **args)  # type: ignore[arg-type]


def test_patient_info_validation() -> None:
    with pytest.raises(ValueError, match="sex"):
        PatientInfo(sex="X")
    with pytest.raises(ValueError, match="birth_date"):
        PatientInfo(birth_date="1970-01-01")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_write_datasets_rejects_bad_uid(tmp_path: Path) -> None:
    datasets = build_ct_series(_image((1, 2, 2)), (1.0, 1.0, 1.0))
    datasets[0].SOPInstanceUID = "../../etc/passwd"
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        write_datasets(datasets, tmp_path)


def _dciodvfy(path: Path) -> str:
    proc = subprocess.run(
        [shutil.which("dciodvfy") or "dciodvfy", str(path)], capture_output=True, text=True, timeout=60
    )
    return proc.stdout + proc.stderr


@pytest.mark.dciodvfy
@pytest.mark.parametrize(
    ("orientation", "descending", "origin"),
    [
        ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), False, (-48.0, -48.0, 0.0)),
        ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), True, None),
        (_oblique(), False, (1.25, -3.5, 100.0)),
    ],
)
def test_synthetic_series_pass_dciodvfy(
    tmp_path: Path, orientation: tuple[float, ...], descending: bool, origin: tuple[float, float, float] | None
) -> None:
    paths = write_study(
        tmp_path, _image((3, 8, 10)), (2.5, 0.7, 0.7), orientation=orientation, descending=descending, origin=origin
    )
    for path in paths:
        report = _dciodvfy(path)
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}:\n{report}"
