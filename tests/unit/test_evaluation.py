"""models.evaluation: plane selection strategies, off-plane Dice, plane share, summaries (pure numpy)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation import (
    SELECTIONS,
    EvalCase,
    Setting,
    choose_planes,
    evaluate,
    markdown_table,
    off_plane_dice,
    plane_share,
    summarise,
)
from models.refiners import ClassicalRefiner, PasteRefiner, RefinementInputs, finish


def _blob_case(name: str = "c0", shape: tuple[int, int, int] = (16, 24, 24)) -> EvalCase:
    """An organ with a lesion inside, an image that shows both, a prior that misses the lesion."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [s / 2 for s in shape]
    r = ((z - c[0]) / 6) ** 2 + ((y - c[1]) / 9) ** 2 + ((x - c[2]) / 9) ** 2
    labels = np.zeros(shape, np.uint8)
    labels[r <= 1] = 1
    labels[r <= 0.2] = 2
    rng = np.random.default_rng(0)
    image = np.where(labels == 1, 60.0, np.where(labels == 2, 120.0, 0.0)) + rng.normal(0, 3, shape)
    prior = np.zeros((3, *shape), np.float32)
    prior[0] = labels == 0
    prior[1] = labels > 0  # the lesion is missed
    u = np.zeros(shape, np.float32)
    u[labels == 2] = 1.0
    return EvalCase(name, image.astype(np.float32), labels, (2.0, 1.0, 1.0), prior, u, 0.5)


def test_choose_planes_strategies() -> None:
    case = _blob_case()
    seg = case.presegmentation
    rng = np.random.default_rng(1)
    for strategy in SELECTIONS:
        sel = choose_planes(strategy, case.uncertainty, 3, presegmentation=seg, rng=rng)
        assert set(sel) == {0, 1, 2}
        for axis, idx in sel.items():
            assert 1 <= len(idx) <= 3 and len(set(idx)) == len(idx)
            assert all(0 <= i < case.labels.shape[axis] for i in idx)
    # random/equidistant stay inside the presegmentation's foreground extent
    for strategy in ("random", "equidistant"):
        sel = choose_planes(strategy, case.uncertainty, 4, presegmentation=seg, rng=rng)
        for axis, idx in sel.items():
            other = tuple(a for a in range(3) if a != axis)
            present = np.flatnonzero((seg > 0).any(axis=other))
            assert min(idx) >= present[0] and max(idx) <= present[-1]
    # i3deep picks the uncertain (lesion) slices
    sel = choose_planes("i3deep", case.uncertainty, 1, min_dist=0.1)
    assert sel[0] and case.labels[sel[0][0]].max() == 2
    assert choose_planes("equidistant", case.uncertainty, 0) == {0: [], 1: [], 2: []}


@pytest.mark.parametrize("kwargs, word", [
    ({"strategy": "nope", "planes": 1}, "strategy"),
    ({"strategy": "i3deep", "planes": -1}, "planes"),
    ({"strategy": "random", "planes": 1}, "rng"),
])
def test_choose_planes_errors(kwargs: dict, word: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=word):
        choose_planes(uncertainty=np.ones((4, 4, 4)), **kwargs)


def test_off_plane_dice_and_plane_share_by_hand() -> None:
    gt = np.zeros((4, 6, 6), np.uint8)
    gt[1:3, 1:5, 1:5] = 2
    reviewed = np.zeros(gt.shape, bool)
    reviewed[:, 2, :] = True  # coronal plane 2
    pred = gt.copy()
    pred[~reviewed] = 0  # a refiner that only copies the plane
    assert off_plane_dice(pred, gt, reviewed, 2) == 0.0
    assert off_plane_dice(gt, gt, reviewed, 2) == 1.0
    assert math.isnan(off_plane_dice(gt, gt, reviewed, 1))
    review = {1: [2]}
    assert plane_share(pred, 2, review) == 1.0  # the "#" artefact
    assert plane_share(gt, 2, review) == pytest.approx(4 / 16)
    assert math.isnan(plane_share(np.zeros_like(gt), 2, review))
    # axial slices that were reviewed are left out of the share
    assert math.isnan(plane_share(pred, 2, {0: [1, 2], 1: [2]}))


def test_evaluate_rows_summary_and_table() -> None:
    cases = [_blob_case("a"), _blob_case("b")]
    refiners = {"paste": PasteRefiner(), "random_walker": ClassicalRefiner("random_walker")}
    settings = [Setting("i3deep", 1), Setting("equidistant", 2)]
    events = []
    res = evaluate(iter(cases), refiners, settings=settings, class_names=("background", "organ", "lesion"),
                   n_cases=2, progress=events.append)
    # 2 cases x (preseg + 2 settings x 2 refiners) x 2 classes
    assert len(res.rows) == 2 * (1 + 2 * 2) * 2
    assert events and events[-1].fraction == 1.0
    paste_lesion = [r for r in res.rows if r["refiner"] == "paste" and r["class"] == "lesion"]
    assert all(r["dice_off_plane"] == 0.0 for r in paste_lesion)  # the prior missed the lesion
    rw = [r for r in res.rows if r["refiner"] == "random_walker" and r["class"] == "lesion"]
    assert np.mean([r["dice"] for r in rw]) > np.mean([r["dice"] for r in paste_lesion])
    assert res.panel["labels"]["truth"].shape == (24, 24)
    summary = summarise(res.rows)
    one = [s for s in summary if s["refiner"] == "paste" and s["class"] == "lesion" and s["planes"] == 1][0]
    assert one["n"] == 2 and one["dice_sd"] == pytest.approx(0.0)
    table = markdown_table(summary, ("background", "organ", "lesion"), highlight="random_walker")
    assert "**random_walker**" in table and "lesion off-plane" in table
    assert table.count("\n") == 2 + 1 + 2 * 2  # head, rule, preseg, 2 settings x 2 refiners


def test_evaluate_refuses_a_refiner_that_changes_corrected_voxels() -> None:
    class Bad:
        name, version = "bad", "1"

        def refine(self, inputs: RefinementInputs) -> np.ndarray:
            return np.zeros(inputs.image.shape, np.uint8)

    with pytest.raises(RuntimeError, match="changed corrected voxels"):
        evaluate([_blob_case()], {"bad": Bad()}, settings=[Setting("i3deep", 2)],
                 class_names=("background", "organ", "lesion"))


def test_finish_keeps_the_planes() -> None:
    case = _blob_case()
    mask = np.zeros(case.labels.shape, bool)
    mask[5] = True
    inputs = RefinementInputs(case.image, case.spacing, np.where(mask, case.labels, 0).astype(np.uint8), mask,
                              case.prior, 3)
    out = finish(np.zeros(case.labels.shape), inputs)
    np.testing.assert_array_equal(out[5], case.labels[5])
    assert out.dtype == np.uint8 and not out[~mask].any()
