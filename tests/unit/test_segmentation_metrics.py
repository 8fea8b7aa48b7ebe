"""Tests for models.metrics."""

import numpy as np
import pytest

from models.metrics import annotation_ratio, dice, dice_per_class, mean_dice


def test_dice_values() -> None:
    gt = np.zeros((2, 3, 3), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 0, :3] = 1  # 3 voxels
    pred[0, 0, :2] = 1  # 2 voxels, overlap 2
    assert dice(pred, gt, 1) == pytest.approx(2 * 2 / 5)
    assert dice(pred, gt, 2) == 1.0  # absent from both
    assert dice(gt, gt, 1) == 1.0
    pred2 = np.zeros_like(gt)
    pred2[1, 1, 1] = 1
    assert dice(pred2, gt, 1) == 0.0
    assert dice_per_class(pred, gt, (1, 2)) == {1: pytest.approx(0.8), 2: 1.0}
    assert mean_dice(pred, gt, (1, 2)) == pytest.approx(0.9)


def test_dice_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="label"):
        dice(np.zeros((2, 2)), np.zeros((2, 2)), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        mean_dice(np.zeros((2, 2)), np.zeros((2, 2)), [])


def test_annotation_ratio() -> None:
    gt = np.zeros((10, 4, 4), dtype=np.uint8)
    gt[2:7, 1, 1] = 1  # 5 axial slices with foreground
    gt[8, 0, 0] = 2  # 6th
    assert annotation_ratio(3, gt) == pytest.approx(0.5)
    assert annotation_ratio({0: [1, 2], 1: [0], 2: []}, gt) == pytest.approx(0.5)
    assert annotation_ratio(0, gt) == 0.0
    with pytest.raises(ValueError, match="no foreground"):
        annotation_ratio(1, np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="n_selected_slices"):
        annotation_ratio(-1, gt)
    with pytest.raises(ValueError, match="gt"):
        annotation_ratio(1, gt[0])
