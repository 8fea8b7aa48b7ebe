"""Segmentation metrics: Dice and the Annotation Ratio (i3Deep papers/000, section 5.4)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["annotation_ratio", "dice", "dice_per_class", "mean_dice"]


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {pred.shape} and gt {gt.shape}")
    return pred, gt


def _check_label(label: object, name: str = "label") -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {label!r}")
    return int(label)


def dice(pred: np.ndarray, gt: np.ndarray, label: int) -> float:
    """Dice coefficient ``2|P ∩ G| / (|P| + |G|)`` of one label.

    Parameters
    ----------
    pred, gt : np.ndarray
        Integer label volumes of the same shape.
    label : int
        The label value compared.

    Returns
    -------
    float
        In ``[0, 1]``; 1.0 when the label is absent from both.

    Raises
    ------
    ValueError
        If the shapes differ or ``label`` is not an integer.
    """
    pred, gt = _check_pair(pred, gt)
    label = _check_label(label)
    p = pred == label
    g = gt == label
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if denom == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / denom


def dice_per_class(pred: np.ndarray, gt: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice of each label.

    Parameters
    ----------
    pred, gt : np.ndarray
        Integer label volumes of the same shape.
    labels : iterable of int
        Label values, e.g. ``(1, 2)`` for the foreground classes.

    Returns
    -------
    dict of int to float

    Raises
    ------
    ValueError
        If the shapes differ or a label is not an integer.
    """
    pred, gt = _check_pair(pred, gt)
    return {_check_label(lb, "labels entries"): dice(pred, gt, int(lb)) for lb in labels}


def mean_dice(pred: np.ndarray, gt: np.ndarray, labels: Iterable[int]) -> float:
    """Mean of :func:`dice_per_class` over ``labels``.

    Raises
    ------
    ValueError
        If ``labels`` is empty, the shapes differ or a label is not an integer.
    """
    per = dice_per_class(pred, gt, labels)
    if not per:
        raise ValueError("labels must not be empty")
    return float(np.mean(list(per.values())))


def annotation_ratio(n_selected_slices: int | Mapping[int, Sequence[int]], gt: np.ndarray) -> float:
    """Annotation Ratio ``AR = |S| / |GT_foreground|`` (papers/000, section 5.4).

    Parameters
    ----------
    n_selected_slices : int or mapping of int to sequence of int
        ``|S|``, the number of selected slices over all orientations; a selection dict as
        returned by :func:`models.acquisition.select_slices` is counted for you.
    gt : np.ndarray
        3-D ``(z, y, x)`` ground-truth labels, 0 = background.

    Returns
    -------
    float
        ``|S|`` divided by the number of axial (axis 0) slices of ``gt`` containing any
        foreground.

    Raises
    ------
    ValueError
        If ``n_selected_slices`` is negative or not an integer, ``gt`` is not 3-D, or ``gt``
        has no foreground (the ratio is undefined).
    """
    if isinstance(n_selected_slices, Mapping):
        n = sum(len(v) for v in n_selected_slices.values())
    elif isinstance(n_selected_slices, bool) or not isinstance(n_selected_slices, (int, np.integer)):
        raise ValueError(f"n_selected_slices must be an integer >= 0 or a selection dict, got {n_selected_slices!r}")
    else:
        n = int(n_selected_slices)
    if n < 0:
        raise ValueError(f"n_selected_slices must be >= 0, got {n}")
    gt = np.asarray(gt)
    if gt.ndim != 3:
        raise ValueError(f"gt must be a 3-D (z, y, x) array, got ndim={gt.ndim}")
    n_fg = int(np.count_nonzero(np.any(gt != 0, axis=(1, 2))))
    if n_fg == 0:
        raise ValueError("gt has no foreground slice: the annotation ratio is undefined")
    return n / n_fg
