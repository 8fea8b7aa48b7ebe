"""One-shot slice acquisition from a voxel uncertainty map.

:func:`select_slices` is i3Deep's rule (design.md, "The method, exactly"): for each axis
independently,

1. ``s[i]`` = sum of ``U`` over slice ``i`` of that axis;
2. ``gap = max(1, ceil(min_dist * n))``, ``n`` = number of slices along the axis;
3. greedy non-maximum suppression visiting slices by descending ``s`` (ties: lower index
   first), keeping a slice unless an already kept slice lies at distance ``< gap``;
4. drop kept slices with ``s[i] < min_uncert * max(s)``; never keep ``s[i] == 0``;
5. keep the ``max_slices`` highest, returned by descending ``s`` (ties: lower index first).

:func:`select_slices_uss` is the Uncertainty Slice Sampling rule of papers/004: slice score =
mean ``U`` over the slice; candidates are local maxima of the score profile at least
``min_distance`` slices apart (greedy by descending score); the ``max_slices`` best.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["planes_per_axis", "select_slices", "select_slices_uss", "slice_scores"]


def _check_u(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u)
    if u.ndim != 3:
        raise ValueError(f"u must be a 3-D (z, y, x) array, got ndim={u.ndim} shape={u.shape}")
    if not (np.issubdtype(u.dtype, np.floating) or np.issubdtype(u.dtype, np.integer) or u.dtype == bool):
        raise ValueError(f"u must be a real numeric array, got dtype {u.dtype}")
    if u.size and float(np.min(u)) < 0:
        raise ValueError("u must be non-negative (an uncertainty map)")
    return u


def _check_axis(axis: object, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or int(axis) not in (0, 1, 2):
        raise ValueError(f"{name} must be 0, 1 or 2, got {axis!r}")
    return int(axis)


def _check_axes(axes: Iterable[int]) -> tuple[int, ...]:
    try:
        items = tuple(axes)
    except TypeError:
        raise ValueError(f"axes must be a sequence of distinct axes from (0, 1, 2), got {axes!r}") from None
    out = tuple(_check_axis(a, "axes entries") for a in items)
    if len(set(out)) != len(out):
        raise ValueError(f"axes must not contain duplicates, got {items!r}")
    return out


def _check_max_slices(max_slices: object) -> int:
    if isinstance(max_slices, bool) or not isinstance(max_slices, (int, np.integer)) or max_slices < 0:
        raise ValueError(f"max_slices must be an integer >= 0, got {max_slices!r}")
    return int(max_slices)


def slice_scores(u: np.ndarray, axis: int) -> np.ndarray:
    """Sum of ``u`` over each slice along ``axis``.

    Parameters
    ----------
    u : np.ndarray
        Non-negative 3-D ``(z, y, x)`` uncertainty map.
    axis : int
        0, 1 or 2.

    Returns
    -------
    np.ndarray
        float64 ``(n,)`` with ``n = u.shape[axis]``, accumulated in float64.

    Raises
    ------
    ValueError
        If ``u`` is not 3-D, negative or not finite, or ``axis`` is invalid.
    """
    u = _check_u(u)
    axis = _check_axis(axis)
    other = tuple(a for a in range(3) if a != axis)
    # Summing a 3-D array over two axes always gives a 1-D array; asarray narrows
    # numpy's ``float64 | ndarray`` return type without copying.
    s = np.asarray(np.sum(u, axis=other, dtype=np.float64))
    if not np.all(np.isfinite(s)):
        raise ValueError("u must be finite (found NaN or inf)")
    return s


def _order(s: np.ndarray) -> np.ndarray:
    """Indices by descending ``s``, ties by ascending index (stable sort on ``-s``)."""
    return np.argsort(-s, kind="stable")


def _greedy_nms(s: np.ndarray, order: np.ndarray, gap: int, allowed: np.ndarray | None = None) -> list[int]:
    """Keep slices in ``order`` unless a kept slice lies at distance ``< gap``; skip zeros."""
    n = len(s)
    blocked = np.zeros(n, dtype=bool)
    kept: list[int] = []
    for i in order:
        i = int(i)
        if s[i] <= 0:
            break  # descending order: everything after is zero too
        if blocked[i] or (allowed is not None and not allowed[i]):
            continue
        kept.append(i)
        blocked[max(0, i - gap + 1) : i + gap] = True
    return kept


def select_slices(
    u: np.ndarray,
    *,
    min_dist: float = 0.0234,
    min_uncert: float = 0.1,
    max_slices: int = 12,
    axes: Iterable[int] = (0, 1, 2),
) -> dict[int, list[int]]:
    """i3Deep one-shot slice acquisition.

    Parameters
    ----------
    u : np.ndarray
        Non-negative 3-D ``(z, y, x)`` voxel uncertainty.
    min_dist : float, optional
        Minimum distance between kept slices as a fraction of the slice count:
        ``gap = max(1, ceil(min_dist * n))`` (the product is rounded to 9 decimals before
        ``ceil`` so that e.g. ``0.1 * 30`` gives 3, not 4).
    min_uncert : float, optional
        Relative threshold in ``[0, 1]``: kept slices need ``s[i] >= min_uncert * max(s)``.
    max_slices : int, optional
        Maximum number of slices per axis (>= 0).
    axes : iterable of int, optional
        Distinct axes among 0, 1, 2, processed independently.

    Returns
    -------
    dict of int to list of int
        For each requested axis, the selected slice indices ordered by descending slice score
        (ties: lower index first).  Empty for an all-zero or empty ``u``.

    Raises
    ------
    ValueError
        If ``u`` is not a finite non-negative 3-D array or an argument is out of range.
    """
    u = _check_u(u)
    if isinstance(min_dist, bool) or not isinstance(min_dist, (int, float, np.integer, np.floating)) or not (
        math.isfinite(min_dist) and min_dist >= 0
    ):
        raise ValueError(f"min_dist must be a finite number >= 0, got {min_dist!r}")
    if isinstance(min_uncert, bool) or not isinstance(min_uncert, (int, float, np.integer, np.floating)) or not (
        0.0 <= min_uncert <= 1.0
    ):
        raise ValueError(f"min_uncert must be a number in [0, 1], got {min_uncert!r}")
    max_slices = _check_max_slices(max_slices)
    axes_t = _check_axes(axes)

    result: dict[int, list[int]] = {}
    for axis in axes_t:
        s = slice_scores(u, axis)
        n = len(s)
        if n == 0 or max_slices == 0:
            result[axis] = []
            continue
        gap = max(1, math.ceil(round(float(min_dist) * n, 9)))
        kept = _greedy_nms(s, _order(s), gap)
        threshold = float(min_uncert) * float(s.max())
        kept = [i for i in kept if s[i] >= threshold and s[i] > 0]
        result[axis] = kept[:max_slices]
    return result


def select_slices_uss(
    u: np.ndarray,
    *,
    min_distance: int = 5,
    max_slices: int = 12,
    axes: Iterable[int] = (0,),
) -> dict[int, list[int]]:
    """Uncertainty Slice Sampling (papers/004).

    The slice score is the mean of ``u`` over the slice.  Candidates are the local maxima of
    the score profile (``m[i] >= m[i-1]`` and ``m[i] >= m[i+1]``, a missing neighbour at the
    ends counts as lower) with ``m[i] > 0``.  Candidates are visited by descending score (ties:
    lower index first) and kept unless an already kept one lies at distance ``< min_distance``
    (so kept peaks are at least ``min_distance`` slices apart).  The ``max_slices`` best are
    returned by descending score.

    Parameters
    ----------
    u : np.ndarray
        Non-negative 3-D ``(z, y, x)`` voxel uncertainty.
    min_distance : int, optional
        Minimum distance in slices between selected peaks (>= 1).
    max_slices : int, optional
        Maximum number of slices per axis (>= 0).
    axes : iterable of int, optional
        Distinct axes among 0, 1, 2.

    Returns
    -------
    dict of int to list of int
        Selected indices per axis, by descending score (ties: lower index first).

    Raises
    ------
    ValueError
        If ``u`` is not a finite non-negative 3-D array or an argument is out of range.
    """
    u = _check_u(u)
    if isinstance(min_distance, bool) or not isinstance(min_distance, (int, np.integer)) or min_distance < 1:
        raise ValueError(f"min_distance must be an integer >= 1, got {min_distance!r}")
    max_slices = _check_max_slices(max_slices)
    axes_t = _check_axes(axes)

    result: dict[int, list[int]] = {}
    for axis in axes_t:
        s = slice_scores(u, axis)
        n = len(s)
        if n == 0 or max_slices == 0:
            result[axis] = []
            continue
        per_slice = u.size // n
        m = s / float(per_slice)
        left = np.concatenate(([-np.inf], m[:-1]))
        right = np.concatenate((m[1:], [-np.inf]))
        is_peak = (m >= left) & (m >= right) & (m > 0)
        kept = _greedy_nms(m, _order(m), int(min_distance), allowed=is_peak)
        result[axis] = kept[:max_slices]
    return result


def planes_per_axis(
    axes: Iterable[int],
    max_slices: int,
    *,
    annotation_ratio: float = 0.0,
    foreground_axial_slices: int = 0,
) -> dict[int, int]:
    """The annotation budget: how many slices to ask for along each axis.

    Parameters
    ----------
    axes : iterable of int
        Orientations (0, 1, 2).
    max_slices : int
        Cap per orientation (the paper's ``maxSlices``).
    annotation_ratio : float, optional
        When > 0, the whole budget is ``round(annotation_ratio * foreground_axial_slices)``
        slices (at least one per orientation), spread as evenly as possible over ``axes``
        (earlier axes take the remainder), each capped at ``max_slices``. 0 keeps
        ``max_slices`` per orientation (the paper's rule, meant for clinical sizes).
    foreground_axial_slices : int, optional
        Axial slices holding foreground in the presegmentation (what the Annotation Ratio of
        papers/000 5.4 divides by).

    Returns
    -------
    dict of int to int
        Axis -> slices to ask for (the selection may return fewer).

    Raises
    ------
    ValueError
        On negative or non-finite arguments or invalid axes.
    """
    axes_t = _check_axes(axes)
    max_slices = _check_max_slices(max_slices)
    if isinstance(annotation_ratio, bool) or not (math.isfinite(float(annotation_ratio)) and annotation_ratio >= 0):
        raise ValueError(f"annotation_ratio must be a finite number >= 0, got {annotation_ratio!r}")
    if isinstance(foreground_axial_slices, bool) or int(foreground_axial_slices) < 0:
        raise ValueError(f"foreground_axial_slices must be an integer >= 0, got {foreground_axial_slices!r}")
    if annotation_ratio == 0 or not axes_t:
        return {a: max_slices for a in axes_t}
    total = max(len(axes_t), int(round(float(annotation_ratio) * int(foreground_axial_slices))))
    base, extra = divmod(total, len(axes_t))
    return {a: min(max_slices, base + (1 if i < extra else 0)) for i, a in enumerate(axes_t)}
