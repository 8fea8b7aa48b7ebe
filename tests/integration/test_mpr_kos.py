"""Derived MPR images and the Key Object Selection that points at the slices to review."""
from __future__ import annotations

import copy
import io
from collections.abc import Sequence

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom.codes import default_segment_specs
from dicom.ko_writer import SlicePick, build_key_object_selection
from dicom.mpr import MR_IMAGE_STORAGE, ReformatAxis, VolumeValues, build_reformatted_images, locate_reformatted_image
from dicom.provenance import UidFactory
from dicom.seg_writer import SourceGeometry, build_segmentation
from dicom.validate import dciodvfy
from tests.fixtures.dicom_data import OBLIQUE_ORIENTATION, TEST_UID_ROOT, CtCase, make_ct_case

GEOMETRIES = {
    "axial": {},
    "axial-descending": {"descending": True},
    "oblique": {"orientation": OBLIQUE_ORIENTATION},
    # column cosine -y: the normal points to the feet, rows are not flipped
    "feet-normal": {"orientation": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)},
}


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def _mpr(case: CtCase, axis: int, indices: Sequence[int], uids: UidFactory, **kwargs: object) -> list[Dataset]:
    return build_reformatted_images(
        case.datasets, case.image, axis, indices, series_uid=uids.new(), uid_root=uids.root,
        series_number=900 + axis, **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("geometry", list(GEOMETRIES.values()), ids=list(GEOMETRIES))
@pytest.mark.parametrize("axis", [1, 2], ids=["coronal", "sagittal"])
def test_mpr_geometry_maps_voxels_to_the_same_patient_position(
    geometry: dict[str, object], axis: int, uid_factory: UidFactory
) -> None:
    case = make_ct_case(**geometry)  # type: ignore[arg-type]
    src = SourceGeometry.from_datasets(case.datasets)
    nz = case.image.shape[0]
    fixed = 7
    (image,) = (_roundtrip(ds) for ds in _mpr(case, axis, [fixed], uid_factory))
    ipp = np.asarray([float(v) for v in image.ImagePositionPatient])
    iop = np.asarray([float(v) for v in image.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    row_spacing, col_spacing = (float(v) for v in image.PixelSpacing)
    hu = image.pixel_array * float(image.RescaleSlope) + float(image.RescaleIntercept)
    n_cols = case.image.shape[2] if axis == 1 else case.image.shape[1]
    assert (int(image.Rows), int(image.Columns)) == (nz, n_cols)
    rng = np.random.default_rng(axis)
    for _ in range(25):
        k, c = int(rng.integers(nz)), int(rng.integers(n_cols))
        voxel = (k, fixed, c) if axis == 1 else (k, c, fixed)
        expected = src.patient_position(*voxel)
        # Find the MPR pixel at that patient position through the MPR's own geometry.
        offset = expected - ipp
        r_f, c_f = offset @ col_dir / row_spacing, offset @ row_dir / col_spacing
        r, cc = int(round(r_f)), int(round(c_f))
        assert abs(r_f - r) < 1e-3 and abs(c_f - cc) < 1e-3
        assert abs(float(offset @ np.cross(row_dir, col_dir))) < 1e-3  # in the MPR plane
        np.testing.assert_allclose(ipp + r * row_spacing * col_dir + cc * col_spacing * row_dir, expected, atol=1e-3)
        assert hu[r, cc] == case.image[voxel]
    # Head at the top: going down the rows moves towards the feet (-Z in LPS), whatever the normal.
    assert col_dir[2] < 0
    assert locate_reformatted_image(image, case.datasets) == (ReformatAxis(axis), fixed)


def test_mpr_attributes(ct_case: CtCase, uid_factory: UidFactory) -> None:
    images = _mpr(ct_case, 1, [3, 11], uid_factory)
    src = ct_case.datasets[0]
    assert len(images) == 2 and len({ds.SOPInstanceUID for ds in images}) == 2
    for number, ds in enumerate(images, start=1):
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "REFORMATTED"]
        assert ds.SOPClassUID == src.SOPClassUID and ds.Modality == "CT"
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.InstanceNumber == number
        assert {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence} == {d.SOPInstanceUID for d in ct_case.datasets}
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        assert "coronal" in ds.DerivationDescription
        assert ds.DerivationCodeSequence[0].CodeValue == "113072"
        assert float(ds.SliceThickness) == ct_case.spacing[1]
        assert [float(v) for v in ds.PixelSpacing] == [ct_case.spacing[0], ct_case.spacing[2]]
    again = _mpr(ct_case, 1, [3], uid_factory)
    assert again[0].SOPInstanceUID != images[0].SOPInstanceUID  # other series UID -> other instance UIDs


def test_mpr_stored_values_and_rescale(ct_case: CtCase, uid_factory: UidFactory) -> None:
    shifted = [copy.deepcopy(ds) for ds in ct_case.datasets]
    for ds in shifted:
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "0.5"
    images = build_reformatted_images(
        shifted, ct_case.image, 2, [5], series_uid=uid_factory.new(), uid_root=uid_factory.root, series_number=9,
    )
    hu = images[0].pixel_array * 0.5 - 1024
    np.testing.assert_allclose(hu, ct_case.image[::-1, :, 5])
    stored = build_reformatted_images(
        ct_case.datasets, ct_case.image, 2, [5], series_uid=uid_factory.new(), uid_root=uid_factory.root,
        series_number=9, values=VolumeValues.STORED,
    )
    np.testing.assert_array_equal(stored[0].pixel_array, ct_case.image[::-1, :, 5])


def test_mpr_argument_errors(ct_case: CtCase, uid_factory: UidFactory) -> None:
    for kwargs, pattern in (
        ({"axis": 0}, "axis"),
        ({"indices": [24]}, "indices"),
        ({"indices": [1, 1]}, "indices"),
        ({"volume": ct_case.image[1:]}, "volume"),
    ):
        args = {"axis": 1, "indices": [1], "volume": ct_case.image, **kwargs}
        with pytest.raises(ValueError, match=pattern):
            build_reformatted_images(
                ct_case.datasets, args["volume"], args["axis"], args["indices"],  # type: ignore[arg-type]
                series_uid=uid_factory.new(), uid_root=uid_factory.root, series_number=1,
            )


def _as_mr(case: CtCase) -> list[Dataset]:
    out = []
    for ds in case.datasets:
        mr = copy.deepcopy(ds)
        mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        mr.Modality = "MR"
        for key in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
            del mr[key]
        mr.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        mr.ScanningSequence, mr.SequenceVariant, mr.ScanOptions = "SE", "NONE", ""
        mr.MRAcquisitionType, mr.RepetitionTime, mr.EchoTime, mr.EchoTrainLength = "2D", "500", "15", "1"
        mr.MagneticFieldStrength, mr.ImagedNucleus = "1.5", "1H"
        out.append(mr)
    return out


@pytest.mark.dciodvfy
@pytest.mark.parametrize("geometry", ["axial-descending", "oblique"])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_mpr_passes_dciodvfy(geometry: str, modality: str, uid_factory: UidFactory) -> None:
    case = make_ct_case(**GEOMETRIES[geometry])  # type: ignore[arg-type]
    sources = case.datasets if modality == "CT" else _as_mr(case)
    for axis in (1, 2):
        for ds in build_reformatted_images(
            sources, case.image, axis, [2, 9], series_uid=uid_factory.new(), uid_root=uid_factory.root,
            series_number=900 + axis,
        ):
            assert ds.Modality == modality
            report = dciodvfy(ds)
            assert report.errors == [], report.output
            # The only remaining warning: CT Image Type value 3 has defined terms AXIAL/LOCALIZER;
            # REFORMATTED is the conventional value for MPR images.
            assert all("ImageType" in w and "REFORMATTED" in w for w in report.warnings), report.output


# -- KOS ---------------------------------------------------------------------------------------


def _kos_case(case: CtCase, uids: UidFactory) -> tuple[Dataset, list[Dataset], list[SlicePick]]:
    seg = build_segmentation(
        case.datasets, case.labels, default_segment_specs(), model_id="m", model_version="1",
        series_uid=uids.new(), sop_uid=uids.new(), series_number=800,
    )
    mprs = _mpr(case, 1, [12, 6], uids) + _mpr(case, 2, [7], uids)
    picks = [
        SlicePick(axis=0, index=4, position_mm=15.0, rank=1, uncertainty=0.61),
        SlicePick(axis=1, index=12, position_mm=0.0, rank=3, uncertainty=0.42),
        SlicePick(axis=2, index=7, position_mm=-11.25, rank=2, uncertainty=0.5),
        SlicePick(axis=0, index=8, position_mm=25.0, rank=4, uncertainty=0.2),
    ]
    return seg, mprs, picks


def _kos_references(kos: Dataset) -> list[str]:
    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    ]


@pytest.mark.parametrize("descending", [False, True])
def test_kos_references_resolve(descending: bool, uid_factory: UidFactory) -> None:
    case = make_ct_case(descending=descending)
    seg, mprs, picks = _kos_case(case, uid_factory)
    kos = _roundtrip(build_key_object_selection(
        case.datasets, picks, seg, mprs[::-1], series_uid=uid_factory.new(), sop_uid=uid_factory.new(),
        series_number=801,
    ))
    sorted_src = SourceGeometry.from_datasets(case.datasets).datasets
    existing = {ds.SOPInstanceUID for ds in [*case.datasets, *mprs, seg]}
    refs = _kos_references(kos)
    assert set(refs) <= existing
    evidence = {
        inst.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert evidence == set(refs)
    mpr_cor12 = next(d for d in mprs if locate_reformatted_image(d, case.datasets) == (ReformatAxis.CORONAL, 12))
    mpr_sag7 = next(d for d in mprs if locate_reformatted_image(d, case.datasets) == (ReformatAxis.SAGITTAL, 7))
    # rank order, then the SEG
    assert refs == [
        sorted_src[4].SOPInstanceUID, mpr_sag7.SOPInstanceUID, mpr_cor12.SOPInstanceUID,
        sorted_src[8].SOPInstanceUID, seg.SOPInstanceUID,
    ]
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"
    assert kos.StudyInstanceUID == case.datasets[0].StudyInstanceUID
    text = next(item.TextValue for item in kos.ContentSequence if item.ValueType == "TEXT")
    assert "axial slice 5 of 10 (index 4, z = 15.0 mm" in text
    assert "coronal slice 13 of 24 (index 12, y = 0.0 mm" in text
    assert "sagittal slice 8 of 28" in text and "rank 2 of 4" in text
    assert text.index("rank 1 of 4") < text.index("rank 2 of 4") < text.index("rank 3 of 4")


@pytest.mark.dciodvfy
def test_kos_passes_dciodvfy(ct_case: CtCase, uid_factory: UidFactory) -> None:
    seg, mprs, picks = _kos_case(ct_case, uid_factory)
    kos = build_key_object_selection(
        ct_case.datasets, picks, seg, mprs, series_uid=uid_factory.new(), sop_uid=uid_factory.new(),
        series_number=801, title=Code("113001", "DCM", "Rejected for Quality Reasons"),
    )
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
    report = dciodvfy(kos)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output


def test_kos_argument_errors(ct_case: CtCase, uid_factory: UidFactory) -> None:
    seg, mprs, picks = _kos_case(ct_case, uid_factory)
    kwargs = dict(series_uid=uid_factory.new(), sop_uid=uid_factory.new(), series_number=801)
    with pytest.raises(ValueError, match="mpr_datasets has no coronal image at index 12"):
        build_key_object_selection(ct_case.datasets, picks, seg, mprs[2:], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="picks must not be empty"):
        build_key_object_selection(ct_case.datasets, [], seg, mprs, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"picks\[0\]\.index"):
        build_key_object_selection(
            ct_case.datasets, [SlicePick(0, 10, 0.0, 1, 0.1)], seg, mprs, **kwargs  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="seg must"):
        build_key_object_selection(ct_case.datasets, picks, ct_case.datasets[0], mprs, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="axis"):
        SlicePick(3, 0, 0.0, 1, 0.1)
    UidFactory(TEST_UID_ROOT)  # the fixture root is valid
