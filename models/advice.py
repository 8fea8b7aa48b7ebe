"""Advice regions (papers/003, MECCA interaction guidance).

The volume is split into SLIC supervoxels; each supervoxel's mean ensemble confidence (the
maximum class probability of the mean prediction) is computed and the least confident
supervoxels are proposed to the expert as regions to check first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import slic

__all__ = ["AdviceRegion", "advice_regions"]


@dataclass(frozen=True)
class AdviceRegion:
    """One low-confidence supervoxel.

    Attributes
    ----------
    region_id : int
        Label of the supervoxel in the returned label map (>= 1).
    mean_confidence : float
        Mean over its voxels of ``max_c pbar_c``.
    bbox : tuple of int
        ``(z0, y0, x0, z1, y1, x1)``, half-open voxel bounding box.
    centroid : tuple of float
        ``(z, y, x)`` centre of mass of its voxels (voxel coordinates; may lie outside a
        non-convex supervoxel).
    n_voxels : int
        Number of voxels.
    """

    region_id: int
    mean_confidence: float
    bbox: tuple[int, int, int, int, int, int]
    centroid: tuple[float, float, float] = (0.0, 0.0, 0.0)
    n_voxels: int = 0


def advice_regions(
    image: np.ndarray,
    mean_probs: np.ndarray,
    *,
    n_segments: int = 200,
    top_k: int = 5,
    compactness: float = 0.1,
    foreground_only: bool = False,
    spacing: Sequence[float] | None = None,
) -> tuple[list[AdviceRegion], np.ndarray]:
    """Rank SLIC supervoxels by low mean ensemble confidence.

    Parameters
    ----------
    image : np.ndarray
        3-D ``(z, y, x)`` intensities.
    mean_probs : np.ndarray
        Mean ensemble probabilities ``(C, z, y, x)``, ``C >= 2``.
    n_segments : int, optional
        Approximate number of supervoxels (>= 1).
    top_k : int, optional
        Number of regions returned (>= 0).
    compactness : float, optional
        SLIC compactness on the image rescaled to ``[0, 1]`` (> 0).
    foreground_only : bool, optional
        Only rank supervoxels containing predicted foreground (argmax >= 1).
    spacing : sequence of float, optional
        ``(z, y, x)`` voxel spacing in mm: supervoxels are then compact in millimetres, not
        in voxels (on CT with thick slices they would otherwise stretch along z). None
        treats voxels as isotropic.

    Returns
    -------
    regions : list of AdviceRegion
        Up to ``top_k`` regions by ascending mean confidence (ties: lower id first).
    label_map : np.ndarray
        int32 ``(z, y, x)`` supervoxel labels starting at 1.

    Raises
    ------
    ValueError
        If the shapes do not match or an argument is out of range.
    """
    image = np.asarray(image)
    mean_probs = np.asarray(mean_probs)
    if image.ndim != 3:
        raise ValueError(f"image must be 3-D (z, y, x), got ndim={image.ndim}")
    if mean_probs.ndim != 4 or mean_probs.shape[0] < 2 or mean_probs.shape[1:] != image.shape:
        raise ValueError(
            f"mean_probs must have shape (C>=2, *image.shape) = (C, {image.shape}), got {mean_probs.shape}"
        )
    if isinstance(n_segments, bool) or not isinstance(n_segments, (int, np.integer)) or n_segments < 1:
        raise ValueError(f"n_segments must be an integer >= 1, got {n_segments!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not (compactness > 0 and np.isfinite(compactness)):
        raise ValueError(f"compactness must be a finite number > 0, got {compactness!r}")
    sp = None
    if spacing is not None:
        sp = np.asarray(spacing, dtype=np.float64)
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")

    img = image.astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(img, [1, 99]))
    img = (np.clip(img, lo, hi) - lo) / max(hi - lo, 1e-6)
    label_map = slic(
        img, n_segments=int(n_segments), compactness=float(compactness), channel_axis=None, start_label=1,
        spacing=sp,
    ).astype(np.int32)

    confidence = np.max(mean_probs, axis=0).astype(np.float64)
    ids = np.unique(label_map)
    means = np.asarray(ndimage.mean(confidence, labels=label_map, index=ids), dtype=np.float64)
    if foreground_only:
        fg = np.argmax(mean_probs, axis=0) >= 1
        has_fg = np.asarray(ndimage.maximum(fg.astype(np.uint8), labels=label_map, index=ids)) > 0
        ids, means = ids[has_fg], means[has_fg]
    order = np.lexsort((ids, means))[: int(top_k)]
    boxes = ndimage.find_objects(label_map)
    regions: list[AdviceRegion] = []
    for k in order:
        rid = int(ids[k])
        box = boxes[rid - 1]
        if box is None:  # pragma: no cover - ids come from the map itself
            continue
        bbox = (box[0].start, box[1].start, box[2].start, box[0].stop, box[1].stop, box[2].stop)
        inside = label_map[box] == rid
        offset = np.asarray([sl.start for sl in box], dtype=np.float64)
        centre = np.argwhere(inside).mean(axis=0) + offset
        regions.append(AdviceRegion(region_id=rid, mean_confidence=float(means[k]), bbox=bbox,
                                    centroid=(float(centre[0]), float(centre[1]), float(centre[2])),
                                    n_voxels=int(np.count_nonzero(inside))))
    return regions, label_map
