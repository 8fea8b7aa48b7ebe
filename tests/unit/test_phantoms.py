"""Tests for models.phantoms."""

import numpy as np
import pytest
from scipy import ndimage

from models.phantoms import Phantom, make_phantom, make_phantoms


def test_deterministic_per_seed() -> None:
    a, b, c = make_phantom(3), make_phantom(3), make_phantom(4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("shape", [(32, 64, 64), (24, 48, 48), (20, 40, 56)])
def test_types_labels_and_anatomy(shape: tuple[int, int, int]) -> None:
    for seed in range(3):
        p = make_phantom(seed, shape=shape)
        assert isinstance(p, Phantom)
        assert p.image.dtype == np.float32 and p.image.shape == shape
        assert p.labels.dtype == np.uint8 and p.labels.shape == shape
        assert set(np.unique(p.labels)) == {0, 1, 2}
        assert p.class_names == ("background", "organ", "lesion")
        assert p.spacing == (2.5, 1.5, 1.5)
        organ_or_lesion = p.labels >= 1
        # Lesion inside the organ: every lesion voxel lies within the filled organ mask.
        filled = ndimage.binary_fill_holes(organ_or_lesion)
        assert filled[p.labels == 2].all()
        # Organ never touches the volume edges, spans many slices, fills a good part of the body.
        for axis in range(3):
            assert not np.take(organ_or_lesion, [0, shape[axis] - 1], axis=axis).any()
        assert organ_or_lesion.any(axis=(1, 2)).sum() >= shape[0] // 2
        body = p.image > -500
        assert organ_or_lesion.sum() > 0.08 * body.sum()
        # Intensities: air outside, organ brighter than surrounding soft tissue.
        assert p.image[0, 0, 0] < -800
        assert p.image[p.labels == 1].mean() > p.image[(p.labels == 0) & body].mean() + 20


def test_make_phantoms_and_errors() -> None:
    ps = make_phantoms(3, seed=1, shape=(16, 32, 32))
    assert len(ps) == 3
    assert not np.array_equal(ps[0].labels, ps[1].labels)
    np.testing.assert_array_equal(ps[2].labels, make_phantom(1002, shape=(16, 32, 32)).labels)
    with pytest.raises(ValueError, match="shape"):
        make_phantom(0, shape=(32, 64))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1)
    with pytest.raises(ValueError, match="n must"):
        make_phantoms(-1, seed=0)
