"""Tests for models.uncertainty."""

import math

import numpy as np
import pytest

from models.uncertainty import EnsembleAccumulator, entropy_of_mean, predictive_entropy


def _random_probs(t: int, c: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, c) + shape).astype(np.float32) * 2
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_uniform_is_one_and_onehot_is_zero() -> None:
    for c in (2, 3, 5):
        probs = np.full((4, c, 2, 3, 3), 1.0 / c, dtype=np.float32)
        np.testing.assert_allclose(predictive_entropy(probs), 1.0, atol=1e-6)
        onehot = np.zeros((3, c, 2, 3, 3), dtype=np.float32)
        onehot[:, 1] = 1.0
        np.testing.assert_array_equal(predictive_entropy(onehot), 0.0)
        np.testing.assert_array_equal(predictive_entropy(onehot, "binary_fg"), 0.0)


def test_eq2_by_hand_both_methods() -> None:
    # Two predictions, three classes, one voxel.
    p1 = [0.7, 0.2, 0.1]
    p2 = [0.1, 0.6, 0.3]
    probs = np.array([p1, p2], dtype=np.float32).reshape(2, 3, 1, 1, 1)
    pbar = [0.4, 0.4, 0.2]
    expected = -(0.4 * math.log(0.4) + 0.4 * math.log(0.4) + 0.2 * math.log(0.2)) / math.log(3)
    assert predictive_entropy(probs)[0, 0, 0] == pytest.approx(expected, abs=1e-6)

    def hb(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)

    expected_bfg = (hb(pbar[1]) + hb(pbar[2])) / 2
    assert predictive_entropy(probs, "binary_fg")[0, 0, 0] == pytest.approx(expected_bfg, abs=1e-6)


def test_zero_probability_class() -> None:
    probs = np.array([0.5, 0.5, 0.0], dtype=np.float32).reshape(1, 3, 1, 1, 1)
    assert predictive_entropy(probs)[0, 0, 0] == pytest.approx(math.log(2) / math.log(3), abs=1e-6)


def test_output_dtype_range() -> None:
    probs = _random_probs(5, 3, (4, 5, 6))
    for method in ("entropy", "binary_fg"):
        u = predictive_entropy(probs, method)
        assert u.dtype == np.float32 and u.shape == (4, 5, 6)
        assert u.min() >= 0.0 and u.max() <= 1.0


def test_errors() -> None:
    good = _random_probs(2, 3, (2, 2, 2))
    with pytest.raises(ValueError, match="ndim"):
        predictive_entropy(good[0])
    with pytest.raises(ValueError, match="C >= 2"):
        predictive_entropy(np.ones((2, 1, 2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="T >= 1"):
        predictive_entropy(good[:0])
    bad = good.copy()
    bad[1, 0, 1, 1, 1] += 0.05
    with pytest.raises(ValueError, match=r"sum to 1.*t=1|t=1.*sum to 1"):
        predictive_entropy(bad)
    with pytest.raises(ValueError, match="method"):
        predictive_entropy(good, "variance")
    with pytest.raises(ValueError, match="pbar"):
        entropy_of_mean(good[0, :, 0])


def test_accumulator_matches_stacked() -> None:
    probs = _random_probs(5, 3, (7, 9, 11), seed=1)
    acc = EnsembleAccumulator()
    for m in probs:
        acc.add(m)
    assert acc.count == 5
    stacked_mean = probs.mean(axis=0)
    np.testing.assert_allclose(acc.mean(), stacked_mean, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(acc.segmentation(), np.argmax(stacked_mean, axis=0).astype(np.uint8))
    assert acc.segmentation().dtype == np.uint8
    for method in ("entropy", "binary_fg"):
        np.testing.assert_allclose(acc.entropy(method), predictive_entropy(probs, method), atol=1e-6)
        np.testing.assert_allclose(acc.entropy(method), entropy_of_mean(stacked_mean, method), atol=1e-6)


def test_accumulator_float16_and_errors() -> None:
    probs = _random_probs(3, 2, (3, 4, 5), seed=2)
    acc = EnsembleAccumulator()
    for m in probs:
        acc.add(m.astype(np.float16))
    np.testing.assert_allclose(acc.mean(), probs.mean(axis=0), atol=2e-3)
    with pytest.raises(ValueError, match="shape"):
        acc.add(probs[0, :, :2])
    with pytest.raises(ValueError, match="empty"):
        EnsembleAccumulator().entropy()
    with pytest.raises(ValueError, match="sum to 1"):
        EnsembleAccumulator().add(probs[0] * 0.5)
