"""Review regions (MECCA advice, papers/003) as a SEG series of their own, in the KOS text, and
ignored when a corrected SEG brings them back.

The node test runs the real pipeline: DCMTK ``storescu`` plays the PACS, ``storescp`` the viewer,
``dciodvfy`` validates the review-regions SEG.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom.codes import REVIEW_REGION_CATEGORY, REVIEW_REGION_TYPE, SegmentSpec, default_segment_specs
from dicom.ko_writer import SlicePick, build_key_object_selection
from dicom.provenance import UidFactory
from dicom.seg_reader import read_segmentation
from dicom.seg_writer import build_review_regions_segmentation, build_segmentation
from dicom.series import load_series, sort_datasets
from dicom.validate import dciodvfy
from models.advice import advice_regions
from node.demo import DEMO_MAX_SLICES, DEMO_MIN_DIST, correct_named_slices, slices_named_by_kos, write_synthetic_study
from node.pipeline import dequantize_probabilities
from node.store import JobState
from tests.fixtures.dicom_data import TEST_UID_ROOT, CtCase, make_ct_case
from tests.fixtures.node_fixtures import storescu, wait_for

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
LABEL_RE = re.compile(r"^check region (\d+) \(confidence (\d\.\d\d)\)$")
VESSEL = Code("59820001", "SCT", "Blood vessel")


# -- dicom/: writer, reader, KOS text ----------------------------------------------------------


def _rank_map(case: CtCase) -> np.ndarray:
    ranks = np.zeros(case.labels.shape, dtype=np.uint8)
    ranks[2:5, 3:8, 4:9] = 1
    ranks[6:8, 10:14, 10:20] = 2
    return ranks


def _review_seg(case: CtCase, uids: UidFactory, **kw: Any) -> hd.seg.Segmentation:
    return build_review_regions_segmentation(
        case.datasets, _rank_map(case), [0.58, 0.712], model_id="m review regions", model_version="1; SLIC n=200",
        series_uid=uids.new(), sop_uid=uids.new(), series_number=9005, uid_root=TEST_UID_ROOT, **kw)


@pytest.mark.dciodvfy
@pytest.mark.parametrize("keep_empty_frames", [True, False])
def test_review_regions_seg_is_named_coded_and_valid(keep_empty_frames: bool) -> None:
    case, uids = make_ct_case(), UidFactory(TEST_UID_ROOT)
    seg = _review_seg(case, uids, keep_empty_frames=keep_empty_frames)
    assert seg.SeriesDescription == "AI review regions (research use)" and seg.ContentLabel == "AI_REVIEW"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "check region 1 (confidence 0.58)", "check region 2 (confidence 0.71)"]
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        cat, typ = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator) == ("309825002", "SCT")
        assert (typ.CodeValue, typ.CodingSchemeDesignator) == ("C85402", "NCIt")
    report = dciodvfy(seg)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output


def test_review_regions_never_map_to_a_class(caplog: pytest.LogCaptureFixture) -> None:
    case, uids = make_ct_case(), UidFactory(TEST_UID_ROOT)
    result = read_segmentation(_review_seg(case, uids), case.datasets, default_segment_specs())
    assert result.segment_mapping == {} and result.unknown_segments == ()
    assert [(r.segment_number, r.label) for r in result.review_regions] == [
        (1, "check region 1 (confidence 0.58)"), (2, "check region 2 (confidence 0.71)")]
    assert not result.labels.any()
    assert result.slices_with_frames == set(), "review-region frames say nothing about the classes"


def _edited_seg(case: CtCase, masks: Sequence[tuple[str, Code, Code, np.ndarray]], uids: UidFactory) -> Dataset:
    """A viewer's save: MANUAL, empty frames omitted, segments in the given order (may overlap)."""
    descriptions = [
        hd.seg.SegmentDescription(segment_number=n, segment_label=label, segmented_property_category=cat,
                                  segmented_property_type=typ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, (label, cat, typ, _mask) in enumerate(masks, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=sort_datasets(list(case.datasets)),
        pixel_array=np.stack([m for *_, m in masks], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=uids.new(), series_number=4242, sop_instance_uid=uids.new(), instance_number=1,
        manufacturer="viewer", manufacturer_model_name="viewer", software_versions="1", device_serial_number="1",
        omit_empty_frames=True)


def test_review_regions_recognised_by_label_when_a_viewer_recodes_them() -> None:
    """Viewers may replace codes; 'check region N' alone is enough, unknown classes stay unknown."""
    case, uids = make_ct_case(), UidFactory(TEST_UID_ROOT)
    specs = default_segment_specs()
    ranks = _rank_map(case)
    masks = [(s.label, s.category, s.property_type, case.labels == s.label_value) for s in reversed(specs)]
    with_regions = masks + [
        ("Check region 2 (confidence 0.61)", VESSEL, VESSEL, ranks == 2),
        ("check region 1 (confidence 0.58)", REVIEW_REGION_CATEGORY, REVIEW_REGION_TYPE, ranks == 1),
        ("vessel", VESSEL, VESSEL, ranks == 1),
    ]
    plain = read_segmentation(_edited_seg(case, masks, uids), case.datasets, specs)
    mixed = read_segmentation(_edited_seg(case, with_regions, uids), case.datasets, specs)
    np.testing.assert_array_equal(mixed.labels, plain.labels)
    assert [r.segment_number for r in mixed.review_regions] == [3, 4]
    assert [u.label for u in mixed.unknown_segments] == ["vessel"]
    # The slices carrying frames are those of the classes and of the unknown segment, never of review regions.
    assert mixed.slices_with_frames == plain.slices_with_frames | {k for k in range(ranks.shape[0]) if (ranks[k] == 1).any()}


def test_kos_lists_review_regions_after_the_slices() -> None:
    case, uids = make_ct_case(), UidFactory(TEST_UID_ROOT)
    seg = build_segmentation(case.datasets, case.labels, default_segment_specs(), model_id="m", model_version="1",
                             series_uid=uids.new(), sop_uid=uids.new(), series_number=9001)
    review = _review_seg(case, uids)
    picks = [SlicePick(axis=0, index=3, position_mm=12.5, rank=1, uncertainty=0.4)]
    plain = build_key_object_selection(case.datasets, picks, seg, series_uid=uids.new(), sop_uid=uids.new(),
                                       series_number=9002)
    kos = build_key_object_selection(case.datasets, picks, seg, series_uid=uids.new(), sop_uid=uids.new(),
                                     series_number=9002, review_seg=review, review_rank_map=_rank_map(case),
                                     review_confidences=[0.58, 0.712])
    text, plain_text = _kos_text(kos), _kos_text(plain)
    assert text.startswith(plain_text + "\n"), "the slice list stays as it was"
    # Region 1: voxels z 2..4, y 3..7, x 4..8; origin (-20, -18, 5) mm, spacing (2.5, 1.5, 1.25) mm.
    assert ("check region 1 (confidence 0.58): axial slices 3-5 of 10 (index 2-4), "
            "centre x = -12.5, y = -10.5, z = 12.5 mm (patient coordinates), 75 voxels.") in text
    assert "check region 2 (confidence 0.71): axial slices 7-8 of 10 (index 6-7)" in text
    assert str(review.SOPInstanceUID) in _kos_references(kos)
    report = dciodvfy(kos)
    assert report.errors == [], report.output


def _kos_text(kos: Dataset) -> str:
    return "\n".join(str(i.TextValue) for i in kos.ContentSequence if i.ValueType == "TEXT")


def _kos_references(kos: Dataset) -> set[str]:
    return {str(r.ReferencedSOPInstanceUID) for item in kos.CurrentRequestedProcedureEvidenceSequence
            for series in item.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}


# -- the node ----------------------------------------------------------------------------------


def _received(out: Path) -> dict[str, list[Dataset]]:
    by_class: dict[str, list[Dataset]] = {}
    for f in sorted(out.glob("*")):
        if f.is_file() and not f.name.startswith("."):
            try:
                ds = pydicom.dcmread(f)
            except Exception:
                continue  # still being written by storescp
            ds.filename = str(f)
            by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    return by_class


def _run_job(node_factory: Any, viewer: tuple[int, Path], demo_models: Any, tmp_path: Path,
             advice: dict[str, Any]) -> tuple[Any, list[Dataset], int, dict[str, list[Dataset]]]:
    port, viewer_dir = viewer
    app = node_factory(
        models={"preseg_dir": str(demo_models.preseg_dir), "device": "cpu"},
        refinement={"method": "prior+rw"},
        destinations=[{"ae_title": "VIEWER", "host": "127.0.0.1", "port": port}],
        delivery={"backoff_initial_s": 0.5, "backoff_max_s": 2.0},
        acquisition={"max_slices": DEMO_MAX_SLICES, "min_dist": DEMO_MIN_DIST},
        advice=advice,
    )
    paths, _gt = write_synthetic_study(tmp_path / "study", seed=101, shape=(32, 64, 64))
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert storescu(paths, app.port, calling_ae="PACS").returncode == 0
    wait_for(lambda: app.store.jobs() and app.store.jobs()[0]["state"] == JobState.AWAITING_CORRECTION.value,
             300, "the presegmentation job")
    job_id = int(app.store.jobs()[0]["id"])
    n_outputs = len(app.store.job_data(job_id)["outputs_v1"])
    wait_for(lambda: sum(map(len, _received(viewer_dir).values())) >= n_outputs, 60, "every output at the viewer")
    return app, source, job_id, _received(viewer_dir)


def _segment_masks(seg: Dataset, source: Sequence[Dataset]) -> np.ndarray:
    """``(z, y, x, segments)`` masks of a SEG over the sorted source series."""
    uids = [str(ds.SOPInstanceUID) for ds in sort_datasets(list(source))]
    return hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        uids, combine_segments=False, assert_missing_frames_are_empty=True).astype(bool)


def _with_review_segments(edit: Dataset, review: Dataset, source: Sequence[Dataset]) -> Dataset:
    """The viewer's edit with the review regions saved into it (a viewer merging both series)."""
    classes = _segment_masks(edit, source)
    regions = _segment_masks(review, source)
    specs = [(str(s.SegmentLabel), s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0])
             for s in [*edit.SegmentSequence, *review.SegmentSequence]]
    masks = [(label, Code(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning),
              Code(t.CodeValue, t.CodingSchemeDesignator, t.CodeMeaning), m)
             for (label, c, t), m in zip(specs, [*np.moveaxis(classes, -1, 0), *np.moveaxis(regions, -1, 0)],
                                         strict=True)]
    case = CtCase(sort_datasets(list(source)), np.zeros(0), np.zeros(0), (1.0, 1.0, 1.0))
    return _edited_seg(case, masks, UidFactory("2.25"))


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.dciodvfy
def test_node_sends_review_regions_and_ignores_them_in_corrections(
    node_factory: Any, viewer: tuple[int, Path], demo_models: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app, source, job_id, got = _run_job(node_factory, viewer, demo_models, tmp_path, {"top_k": 5})
    data = app.store.job_data(job_id)
    (review,) = [ds for ds in got[SEG] if ds.SeriesDescription == "AI review regions (research use)"]
    (ai_seg,) = [ds for ds in got[SEG] if ds.ContentLabel == "AI_PRESEG"]
    assert (str(review.SeriesInstanceUID), str(review.SOPInstanceUID)) == (
        data["uids"]["advice_series"], data["uids"]["advice_sop"])
    assert str(review.SOPInstanceUID) in data["outputs_v1"]
    assert review.SeriesNumber == app.settings.outputs.series_number_base + 5
    assert review.SeriesNumber not in {ds.SeriesNumber for cls in got.values() for ds in cls if ds is not review}
    assert dciodvfy(Path(review.filename)).errors == []
    algorithm = review.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "i3node-demo review regions (SLIC 200)"
    assert algorithm.AlgorithmVersion == ai_seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion

    # k segments "check region r (confidence c)", least confident first, each exactly one supervoxel.
    labels = [LABEL_RE.match(str(s.SegmentLabel)) for s in review.SegmentSequence]
    assert len(labels) == 5 and all(labels)
    assert [int(m.group(1)) for m in labels if m] == [1, 2, 3, 4, 5]
    confidences = [float(m.group(2)) for m in labels if m]
    assert confidences == sorted(confidences)
    volume = load_series(app.store.instance_paths(str(source[0].SeriesInstanceUID)))
    work = app.settings.outputs_dir / f"job-{job_id}"
    with np.load(work / "preseg.npz") as z:
        prior = dequantize_probabilities(z["probabilities"])
    regions, label_map = advice_regions(volume.array, prior, n_segments=200, top_k=5, spacing=volume.spacing)
    masks = _segment_masks(review, source)
    for r, region in enumerate(regions):
        np.testing.assert_array_equal(masks[..., r], label_map == region.region_id)
        assert f"{region.mean_confidence:.2f}" == f"{confidences[r]:.2f}"

    # The key-image note lists them after the slices, with axial slices and centre in mm.
    (kos,) = got[KOS]
    text = _kos_text(kos)
    assert "Please review" in text and text.index("Please review") < text.index("check region 1")
    for r, c in enumerate(confidences, start=1):
        assert re.search(rf"check region {r} \(confidence {c:.2f}\): axial slices \d+-\d+ of 32 .*"
                         r"centre x = -?\d+\.\d, y = -?\d+\.\d, z = -?\d+\.\d mm", text), text
    assert str(review.SOPInstanceUID) in _kos_references(kos)

    # A corrected SEG with the review regions saved into it refines exactly like one without.
    gt = np.load(tmp_path / "study" / "ground_truth.npz")["labels"]
    mprs = [ds for cls, items in got.items() if cls not in (SEG, KOS) for ds in items]
    specs = default_segment_specs()
    corrected = correct_named_slices(read_segmentation(ai_seg, source, specs).labels, gt,
                                     slices_named_by_kos(kos, source, mprs))
    from node.demo import viewer_style_seg

    uids = UidFactory("2.25")
    plain = viewer_style_seg(source, corrected, specs, series_uid=uids.new(), sop_uid=uids.new())
    mixed = _with_review_segments(plain, review, source)
    assert len(mixed.SegmentSequence) == len(specs) + 5
    for n, edit in enumerate((plain, mixed), start=2):
        path = tmp_path / f"edit{n}.dcm"
        edit.save_as(path, enforce_file_format=True)
        assert storescu([path], app.port, calling_ae="VIEWER", extra=("-R",)).returncode == 0
        wait_for(lambda n=n: app.store.job(job_id)["version"] == n  # type: ignore[misc]
                 and app.store.job(job_id)["state"] == JobState.DONE.value, 300, f"refined v{n}")
    with np.load(work / "labels_v2.npz") as a, np.load(work / "labels_v3.npz") as b:
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert "carries 5 review region(s)" in caplog.text
    assert "matching no class" not in caplog.text


@pytest.mark.slow
@pytest.mark.dcmtk
def test_advice_disabled_sends_no_review_regions(
    node_factory: Any, viewer: tuple[int, Path], demo_models: Any, tmp_path: Path
) -> None:
    app, _source, job_id, got = _run_job(node_factory, viewer, demo_models, tmp_path, {"enabled": False})
    time.sleep(1.0)  # nothing else is on its way
    got = _received(viewer[1])
    assert [ds.ContentLabel for ds in got[SEG]] == ["AI_PRESEG"]
    (kos,) = got[KOS]
    assert "check region" not in _kos_text(kos)
    assert not (app.settings.outputs_dir / f"job-{job_id}" / "advice.npz").exists()
    assert len(app.store.job_data(job_id)["outputs_v1"]) == sum(map(len, got.values()))


def test_review_region_specs_refuse_bad_input() -> None:
    from dicom.seg_writer import review_region_specs

    with pytest.raises(ValueError, match="confidences"):
        review_region_specs([])
    with pytest.raises(ValueError, match="confidences"):
        review_region_specs([1.5])
    assert all(isinstance(s, SegmentSpec) for s in review_region_specs([0.5] * 20))
