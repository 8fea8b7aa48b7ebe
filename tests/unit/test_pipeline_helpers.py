"""Pure helpers of the job pipeline: fixed UIDs, picks, reviewed slices, merging rounds."""
from __future__ import annotations

import numpy as np

from dicom.provenance import UidFactory
from dicom.series import load_series
from dicom.synthetic import build_ct_series
from models.refinement import reviewed_mask
from node.pipeline import (
    changed_axial_slices,
    merge_corrections,
    output_uids,
    picks_from_selection,
    reviewed_from_picks,
)

ROOT = "1.2.826.0.1.3680043.10.1234"


def test_output_uids_are_fixed_per_job_and_version() -> None:
    f = UidFactory(ROOT)
    a, b = output_uids(f, 7, "1.2.3", 1), output_uids(f, 7, "1.2.3", 1)
    assert a == b, "a re-run after a crash must produce the same UIDs"
    assert set(a) == {"seg_series", "seg_sop", "kos_series", "kos_sop", "mpr_series_1", "mpr_series_2",
                      "advice_series", "advice_sop"}
    assert len(set(a.values())) == len(a)
    v2 = output_uids(f, 7, "1.2.3", 2)
    assert set(v2) == {"seg_series", "seg_sop"} and v2["seg_sop"] != a["seg_sop"]
    assert output_uids(f, 8, "1.2.3", 1)["seg_sop"] != a["seg_sop"]
    assert all(u.startswith(ROOT + ".") and len(u) <= 64 for u in a.values())


def test_picks_ranked_over_all_orientations_with_positions() -> None:
    image = np.zeros((6, 5, 4), dtype=np.float32)
    vol = load_series(build_ct_series(image, (2.0, 1.0, 0.5), origin=(0.0, 0.0, 10.0)))
    u = np.zeros((6, 5, 4), dtype=np.float32)
    u[3, :, :] = 0.5  # axial slice 3: sum 10
    u[:, 1, :] += 0.1  # coronal slice 1: sum 2.4 + 0.5*4... computed below
    sel = {0: [3], 1: [1]}
    picks = picks_from_selection(sel, u, vol)
    assert [(p["axis"], p["index"], p["rank"]) for p in picks] == [(0, 3, 1), (1, 1, 2)]
    assert picks[0]["orientation"] == "axial" and picks[1]["orientation"] == "coronal"
    assert picks[0]["score"] == np.float32(u[3].sum())
    assert abs(picks[0]["position_mm"] - vol.slice_position(0, 3)) < 1e-6


def test_reviewed_from_picks_and_mask() -> None:
    picks = [{"axis": 2, "index": 1}, {"axis": 0, "index": 4}, {"axis": 0, "index": 2}, {"axis": 0, "index": 4}]
    reviewed = reviewed_from_picks(picks)
    assert reviewed == {0: [2, 4], 2: [1]}
    mask = reviewed_mask((5, 3, 3), reviewed)
    assert mask[2].all() and mask[4].all() and mask[:, :, 1].all()
    assert mask.sum() == 2 * 9 + 5 * 3 - 2 * 3


def test_changed_axial_slices_only_where_frames_were_sent() -> None:
    node = np.zeros((4, 2, 2), dtype=np.uint8)
    back = node.copy()
    back[1, 0, 0] = 1
    back[3, 1, 1] = 2
    assert changed_axial_slices(node, back, {0, 1, 2}) == [1]
    assert changed_axial_slices(node, back, {1, 3}) == [1, 3]


def test_merge_corrections_latest_round_wins_and_reviewed_accumulates() -> None:
    shape = (3, 2, 2)
    r1 = np.zeros(shape, dtype=bool)
    r1[0] = True
    l1 = np.full(shape, 1, dtype=np.uint8)
    expert, reviewed = merge_corrections(None, None, l1, r1)
    assert reviewed.sum() == 4 and (expert[0] == 1).all() and (expert[1:] == 0).all()
    r2 = np.zeros(shape, dtype=bool)
    r2[0, 0, 0] = True
    r2[2] = True
    l2 = np.full(shape, 2, dtype=np.uint8)
    expert2, reviewed2 = merge_corrections(expert, reviewed, l2, r2)
    assert reviewed2.sum() == 8
    assert expert2[0, 0, 0] == 2 and expert2[0, 1, 1] == 1 and (expert2[2] == 2).all()
    assert expert[0, 0, 0] == 1, "inputs are not modified"


def test_probabilities_keep_what_the_refiners_need() -> None:
    from node.pipeline import dequantize_probabilities, quantize_probabilities

    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=(4, 5, 6)).transpose(3, 0, 1, 2).astype(np.float32)
    q = quantize_probabilities(p)
    assert q.dtype == np.uint8
    back = dequantize_probabilities(q)
    np.testing.assert_allclose(back.sum(axis=0), 1.0, rtol=1e-5)
    assert np.abs(back - p).max() < 0.01
    np.testing.assert_array_equal(np.argmax(back, 0)[np.abs(np.sort(p, 0)[-1] - np.sort(p, 0)[-2]) > 0.01],
                                  np.argmax(p, 0)[np.abs(np.sort(p, 0)[-1] - np.sort(p, 0)[-2]) > 0.01])


def test_select_review_within_the_budget() -> None:
    from node.pipeline import select_review
    from node.settings import AcquisitionSettings

    u = np.zeros((20, 30, 30), np.float32)
    u[4:16, 5:25, 5:25] = np.random.default_rng(1).random((12, 20, 20))
    labels = (u > 0).astype(np.uint8)
    fixed = select_review(u, labels, AcquisitionSettings(max_slices=3, min_dist=0.0))
    assert {a: len(v) for a, v in fixed.items()} == {0: 3, 1: 3, 2: 3}
    # 12 axial foreground slices x 0.5 = 6 slices, 2 per orientation
    budget = select_review(u, labels, AcquisitionSettings(max_slices=12, min_dist=0.0, annotation_ratio=0.5))
    assert {a: len(v) for a, v in budget.items()} == {0: 2, 1: 2, 2: 2}
    uss = select_review(u, labels, AcquisitionSettings(strategy="uss", max_slices=2, axes=("axial",)))
    assert set(uss) == {0} and 1 <= len(uss[0]) <= 2
