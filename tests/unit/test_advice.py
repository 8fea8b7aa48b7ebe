"""Tests for models.advice."""

import numpy as np
import pytest

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
