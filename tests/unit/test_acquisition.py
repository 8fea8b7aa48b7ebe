"""Tests for models.acquisition (design.md, "The method, exactly")."""

import numpy as np
import pytest

from models.acquisition import select_slices, select_slices_uss, slice_scores


def _volume(profile: list[float], axis: int = 0, other: int = 2) -> np.ndarray:
    """U whose slice sums along ``axis`` equal ``profile`` (others have ``other`` voxels each side)."""
    p = np.asarray(profile, dtype=np.float64)
    shape = [other, other, other]
    shape[axis] = len(p)
    view = [1, 1, 1]
    view[axis] = len(p)
    return np.broadcast_to(p.reshape(view) / other**2, shape).astype(np.float64).copy()


def test_slice_scores() -> None:
    u = _volume([1, 2, 3, 0], axis=1)
    np.testing.assert_allclose(slice_scores(u, 1), [1, 2, 3, 0])
    assert slice_scores(u, 0).shape == (2,)


def test_gap_suppression() -> None:
    # n = 20, min_dist 0.1 -> gap 2: neighbours of a kept slice (distance 1) are suppressed.
    prof = [0.0] * 20
    prof[5], prof[6], prof[7], prof[12] = 10, 9, 8, 7
    sel = select_slices(_volume(prof), min_dist=0.1, min_uncert=0.0, axes=(0,))
    assert sel == {0: [5, 7, 12]}
    # gap 3 (min_dist 0.15 -> ceil(3.0) = 3): 7 is at distance 2 from 5 -> suppressed.
    sel = select_slices(_volume(prof), min_dist=0.15, min_uncert=0.0, axes=(0,))
    assert sel == {0: [5, 12]}
    # min_dist 0 -> gap 1: everything non-zero kept.
    assert select_slices(_volume(prof), min_dist=0.0, min_uncert=0.0, axes=(0,)) == {0: [5, 6, 7, 12]}


def test_suppression_by_kept_only() -> None:
    # 6 suppressed by 5; 7 is at distance 2 from 5 (gap 2) and only 1 from suppressed 6 -> kept.
    prof = [0, 0, 0, 0, 0, 10, 9, 8, 0, 0]
    assert select_slices(_volume(prof), min_dist=0.2, min_uncert=0.0, axes=(0,)) == {0: [5, 7]}


def test_ties_lower_index_first() -> None:
    prof = [0, 5, 5, 0, 5, 0, 0, 0, 0, 0]
    # gap 2: 1 kept first (tie with 2 and 4), 2 suppressed, 4 kept.
    assert select_slices(_volume(prof), min_dist=0.2, min_uncert=0.0, axes=(0,)) == {0: [1, 4]}
    # Float ties from summation order must still behave as ties.
    u = np.zeros((4, 3, 3))
    u[0, 0, :] = [0.1, 0.2, 0.3]
    u[2, 0, :] = [0.3, 0.2, 0.1]
    assert select_slices(u, min_dist=0.0, min_uncert=0.0, axes=(0,)) == {0: [0, 2]}


def test_zero_slices_never_chosen_and_empty() -> None:
    prof = [0, 0, 3, 0, 0]
    assert select_slices(_volume(prof), min_dist=0.0, min_uncert=0.0, axes=(0,)) == {0: [2]}
    assert select_slices(np.zeros((5, 4, 3))) == {0: [], 1: [], 2: []}
    assert select_slices(np.zeros((0, 4, 3))) == {0: [], 1: [], 2: []}
    assert select_slices_uss(np.zeros((5, 4, 3)), axes=(0, 1, 2)) == {0: [], 1: [], 2: []}


def test_min_uncert_cut() -> None:
    prof = [10, 0, 1.0, 0, 0.99, 0, 5]
    sel = select_slices(_volume(prof), min_dist=0.0, min_uncert=0.1, axes=(0,))
    assert sel == {0: [0, 6, 2]}  # 0.99 < 0.1 * 10 dropped, 1.0 kept (>=)
    assert select_slices(_volume(prof), min_dist=0.0, min_uncert=1.0, axes=(0,)) == {0: [0]}


def test_max_slices_and_order() -> None:
    prof = [1, 0, 7, 0, 3, 0, 9, 0, 5, 0, 2]
    assert select_slices(_volume(prof), min_dist=0.0, min_uncert=0.0, max_slices=3, axes=(0,)) == {0: [6, 2, 8]}
    assert select_slices(_volume(prof), min_dist=0.0, min_uncert=0.0, max_slices=0, axes=(0,)) == {0: []}
    sel = select_slices(_volume(prof), min_dist=0.0, min_uncert=0.0, axes=(0,))[0]
    assert sel == [6, 2, 8, 4, 10, 0]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_axis_independently(axis: int) -> None:
    prof = [0, 4, 0, 0, 8, 0, 0.5, 0, 0, 0]
    u = _volume(prof, axis=axis, other=3)
    sel = select_slices(u, min_dist=0.1, min_uncert=0.1, axes=(axis,))
    assert sel == {axis: [4, 1]}  # 0.5 < 0.1 * 8 dropped
    full = select_slices(u, min_dist=0.1, min_uncert=0.1)
    assert full[axis] == [4, 1]
    for other in {0, 1, 2} - {axis}:
        # Constant profile of length 3 along the other axes: gap 1, all tie -> ascending order.
        assert full[other] == [0, 1, 2]


def test_axis_shorter_than_gap() -> None:
    # n = 4, min_dist 2.0 -> gap 8 > n: only the best slice survives.
    assert select_slices(_volume([1, 3, 2, 3]), min_dist=2.0, min_uncert=0.0, axes=(0,)) == {0: [1]}


def test_default_gap_paper_parameters() -> None:
    # n = 100 -> gap = ceil(2.34) = 3.
    prof = [0.0] * 100
    prof[50], prof[52], prof[53] = 10, 9, 8
    assert select_slices(_volume(prof), axes=(0,)) == {0: [50, 53]}


def test_validation() -> None:
    u = np.ones((4, 4, 4))
    with pytest.raises(ValueError, match="min_dist"):
        select_slices(u, min_dist=-0.1)
    with pytest.raises(ValueError, match="min_uncert"):
        select_slices(u, min_uncert=1.5)
    with pytest.raises(ValueError, match="max_slices"):
        select_slices(u, max_slices=-1)
    with pytest.raises(ValueError, match="axes"):
        select_slices(u, axes=(0, 3))
    with pytest.raises(ValueError, match="duplicates"):
        select_slices(u, axes=(1, 1))
    with pytest.raises(ValueError, match="u must be a 3-D"):
        select_slices(np.ones((4, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        select_slices(-u)
    with pytest.raises(ValueError, match="finite"):
        select_slices(np.full((2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="min_distance"):
        select_slices_uss(u, min_distance=0)
    with pytest.raises(ValueError, match="axis"):
        slice_scores(u, 5)


def test_uss_local_maxima_with_min_distance() -> None:
    # Mean per slice = profile / 4 (2x2 voxels per slice); scores scale identically.
    prof = [0, 1, 2, 3, 2, 1, 0, 0, 5, 4, 6, 0, 0, 0, 0, 0, 2.5, 0]
    u = _volume(prof)
    # Local maxima: 3 (3.0), 8 (5.0), 10 (6.0), 16 (2.5). 9 (4.0) is not a local maximum.
    assert select_slices_uss(u, min_distance=1) == {0: [10, 8, 3, 16]}
    # min_distance 5: 10 kept, 8 suppressed (distance 2), 3 kept (distance 7), 16 kept (distance 6).
    assert select_slices_uss(u, min_distance=5) == {0: [10, 3, 16]}
    assert select_slices_uss(u, min_distance=5, max_slices=2) == {0: [10, 3]}
    # Non-peak high slices are never chosen even when the peak is suppressed.
    assert 9 not in select_slices_uss(u, min_distance=5)[0]


def test_uss_mean_score_and_boundaries() -> None:
    # Boundary slices can be peaks; other axes processed when asked.
    prof = [5, 1, 0, 0, 0, 0, 0, 1, 4]
    u = _volume(prof, axis=2, other=3)
    assert select_slices_uss(u, min_distance=5, axes=(2,)) == {2: [0, 8]}


def test_planes_per_axis_budget() -> None:
    from models.acquisition import planes_per_axis

    # ratio 0: the paper's rule, max_slices per orientation
    assert planes_per_axis((0, 1, 2), 12) == {0: 12, 1: 12, 2: 12}
    # 0.5 x 24 foreground slices = 12 slices, spread evenly
    assert planes_per_axis((0, 1, 2), 12, annotation_ratio=0.5, foreground_axial_slices=24) == {0: 4, 1: 4, 2: 4}
    # remainder to the earlier axes; the cap holds
    assert planes_per_axis((0, 1, 2), 12, annotation_ratio=0.5, foreground_axial_slices=28) == {0: 5, 1: 5, 2: 4}
    assert planes_per_axis((0, 1, 2), 3, annotation_ratio=1.0, foreground_axial_slices=100) == {0: 3, 1: 3, 2: 3}
    # at least one slice per orientation
    assert planes_per_axis((0, 2), 12, annotation_ratio=0.01, foreground_axial_slices=10) == {0: 1, 2: 1}
    with pytest.raises(ValueError, match="annotation_ratio"):
        planes_per_axis((0,), 3, annotation_ratio=-1)
    with pytest.raises(ValueError, match="foreground_axial_slices"):
        planes_per_axis((0,), 3, annotation_ratio=0.2, foreground_axial_slices=-1)
