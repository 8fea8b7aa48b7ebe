"""Tests for models.baselines on a phantom with ground-truth corrected slices."""

import numpy as np
import pytest

from models.baselines import graph_cut_refine, random_walker_refine, watershed_refine
from models.metrics import dice_per_class
from models.phantoms import make_phantom
from models.refinement import reviewed_mask


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, dict[int, list[int]]]:
    p = make_phantom(1, shape=(24, 48, 48))
    fg_slices = np.where(p.labels.any(axis=(1, 2)))[0]
    lesion_slices = np.where((p.labels == 2).any(axis=(1, 2)))[0]
    axial = sorted({int(z) for z in fg_slices[::3]} | {int(lesion_slices[len(lesion_slices) // 2])})
    reviewed = {0: axial, 1: [24], 2: [24]}
    return p.image, p.labels, reviewed


def _check(result: np.ndarray, labels: np.ndarray, reviewed: dict[int, list[int]]) -> dict[int, float]:
    assert result.dtype == np.uint8 and result.shape == labels.shape
    mask = reviewed_mask(labels.shape, reviewed)
    np.testing.assert_array_equal(result[mask], labels[mask])
    return dice_per_class(result, labels, (1, 2))


def test_random_walker(case) -> None:  # type: ignore[no-untyped-def]
    image, labels, reviewed = case
    d = _check(random_walker_refine(image, labels, reviewed, 3), labels, reviewed)
    assert d[1] > 0.9 and d[2] > 0.7, d


def test_watershed(case) -> None:  # type: ignore[no-untyped-def]
    image, labels, reviewed = case
    d = _check(watershed_refine(image, labels, reviewed, 3), labels, reviewed)
    assert d[1] > 0.9 and d[2] > 0.6, d


def test_graph_cut(case) -> None:  # type: ignore[no-untyped-def]
    image, labels, reviewed = case
    d = _check(graph_cut_refine(image, labels, reviewed, 3), labels, reviewed)
    assert d[1] > 0.8, d  # the lesion is hard for this simple graph cut; the organ is not


def test_beats_reviewed_only(case) -> None:  # type: ignore[no-untyped-def]
    image, labels, reviewed = case
    mask = reviewed_mask(labels.shape, reviewed)
    only = np.where(mask, labels, 0).astype(np.uint8)
    base = dice_per_class(only, labels, (1,))[1]
    rw = dice_per_class(random_walker_refine(image, labels, reviewed, 3), labels, (1,))[1]
    assert rw > base + 0.2


def test_trivial_and_errors(case) -> None:  # type: ignore[no-untyped-def]
    image, labels, _ = case
    assert not random_walker_refine(image, labels, {}, 3).any()
    with pytest.raises(ValueError, match="reviewed"):
        watershed_refine(image, labels, {0: [999]}, 3)
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        watershed_refine(image, labels, {3: [0]}, 3)
    with pytest.raises(ValueError, match="expert_labels"):
        watershed_refine(image, labels[:-1], {0: [0]}, 3)
    with pytest.raises(ValueError, match="n_classes"):
        watershed_refine(image, labels, {0: [0]}, 1)
