"""Tests for models.advice."""

import numpy as np
import pytest
from scipy import ndimage

from models.advice import advice_regions
from models.phantoms import make_phantom


def test_low_confidence_region_ranked_first() -> None:
    p = make_phantom(0, shape=(16, 32, 32))
    probs = np.zeros((2,) + p.image.shape, dtype=np.float32)
    probs[0] = 0.95
    probs[1] = 0.05
    # A low-confidence block in one corner.
    probs[0, 10:16, 0:10, 0:10] = 0.5
    probs[1, 10:16, 0:10, 0:10] = 0.5
    regions, label_map = advice_regions(p.image, probs, n_segments=60, top_k=3)
    assert label_map.shape == p.image.shape and label_map.min() >= 1
    assert len(regions) == 3
    confs = [r.mean_confidence for r in regions]
    assert confs == sorted(confs) and confs[0] < 0.9
    z0, y0, x0, z1, y1, x1 = regions[0].bbox
    assert z1 > 10 and y0 < 10 and x0 < 10  # the first region overlaps the uncertain block
    assert (label_map == regions[0].region_id).any()


def test_errors() -> None:
    img = np.zeros((4, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="mean_probs"):
        advice_regions(img, np.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="top_k"):
        advice_regions(img, np.full((2, 4, 4, 4), 0.5), top_k=-1)


def test_regions_report_centre_and_size_of_their_supervoxel() -> None:
    p = make_phantom(1, shape=(12, 24, 24))
    probs = np.zeros((3,) + p.image.shape, dtype=np.float32)
    probs[0], probs[1], probs[2] = 0.8, 0.1, 0.1
    probs[:, 2:6, 4:10, 12:20] = 1 / 3
    regions, label_map = advice_regions(p.image, probs, n_segments=40, top_k=4)
    assert len(regions) == 4
    for r in regions:
        inside = label_map == r.region_id
        assert r.n_voxels == int(inside.sum())
        np.testing.assert_allclose(r.centroid, np.argwhere(inside).mean(axis=0))
        z0, y0, x0, z1, y1, x1 = r.bbox
        assert z0 <= r.centroid[0] < z1 and y0 <= r.centroid[1] < y1 and x0 <= r.centroid[2] < x1
        np.testing.assert_allclose(r.mean_confidence, probs.max(axis=0)[inside].mean(), rtol=1e-5)


def test_same_input_same_regions() -> None:
    """A job re-run after a crash must find the very same regions (no randomness in SLIC)."""
    p = make_phantom(2, shape=(10, 20, 20))
    rng = np.random.default_rng(0)
    fg = rng.uniform(0, 1, size=p.image.shape).astype(np.float32)
    probs = np.stack([1 - fg, fg])
    a, map_a = advice_regions(p.image, probs, n_segments=30, top_k=5)
    b, map_b = advice_regions(p.image, probs, n_segments=30, top_k=5)
    assert a == b
    np.testing.assert_array_equal(map_a, map_b)


def test_spacing_makes_supervoxels_compact_in_millimetres() -> None:
    """On thick slices, supervoxels computed in voxels stretch along z in mm; with the spacing they do not."""
    rng = np.random.default_rng(3)
    img = rng.normal(0, 1, (16, 48, 48)).astype(np.float32)
    probs = np.stack([np.full(img.shape, 0.6), np.full(img.shape, 0.4)])
    spacing = (5.0, 1.0, 1.0)

    def mean_extent_mm(label_map: np.ndarray) -> np.ndarray:
        boxes = [b for b in ndimage.find_objects(label_map) if b is not None]
        return np.mean([[(b[a].stop - b[a].start) * spacing[a] for a in range(3)] for b in boxes], axis=0)

    _, voxels = advice_regions(img, probs, n_segments=60, top_k=1)
    _, mm = advice_regions(img, probs, n_segments=60, top_k=1, spacing=spacing)
    z_vs_y = [mean_extent_mm(m)[0] / mean_extent_mm(m)[1] for m in (voxels, mm)]
    assert z_vs_y[1] < z_vs_y[0]  # closer to round in mm
    with pytest.raises(ValueError, match="spacing"):
        advice_regions(img, probs, spacing=(1.0, 0.0, 1.0))
