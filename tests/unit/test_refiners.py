"""models.refiners and the prior-guided random walker (pure numpy, no network)."""
from __future__ import annotations

import numpy as np
import pytest

from models.baselines import random_walker_prior_refine, random_walker_refine
from models.refiners import (
    CLASSICAL_METHODS,
    METHODS,
    ModelRandomWalkerRefiner,
    ModelRefiner,
    RefinementInputs,
    make_refiner,
    resolve_method,
)


def _case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (12, 20, 20)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = ((z - 6) / 4) ** 2 + ((y - 10) / 6) ** 2 + ((x - 10) / 6) ** 2
    labels = np.where(r <= 1, 1, 0).astype(np.uint8)
    labels[r <= 0.35] = 2
    rng = np.random.default_rng(3)
    image = (np.choose(labels, [0.0, 50.0, 110.0]) + rng.normal(0, 4, shape)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[6] = True
    mask[:, 10] = True
    return image, labels, mask


def test_prior_random_walker_limits() -> None:
    image, labels, mask = _case()
    expert = np.where(mask, labels, 0)
    prior = np.stack([(labels == k).astype(np.float32) for k in range(3)])
    flipped = prior[[0, 2, 1]]  # a prior that swaps organ and lesion
    # gamma 0 is the plain random walker (same seeds, same edges up to the solver)
    plain = random_walker_refine(image, expert, mask, 3)
    zero = random_walker_prior_refine(image, expert, mask, flipped, gamma=0.0)
    assert np.mean(plain == zero) > 0.99
    # a huge gamma returns the prior's argmax off the planes; the planes stay the expert's
    huge = random_walker_prior_refine(image, expert, mask, flipped, gamma=1e6)
    np.testing.assert_array_equal(huge[~mask], np.argmax(flipped, axis=0)[~mask])
    np.testing.assert_array_equal(huge[mask], labels[mask])
    with pytest.raises(ValueError, match="gamma"):
        random_walker_prior_refine(image, expert, mask, prior, gamma=-1)
    with pytest.raises(ValueError, match="prior"):
        random_walker_prior_refine(image, expert, mask, prior[:, :-1])


def test_prior_random_walker_fixes_a_wrong_prior_near_the_planes() -> None:
    image, labels, mask = _case()
    expert = np.where(mask, labels, 0)
    missed = np.stack([(labels == 0), (labels > 0), np.zeros(labels.shape, bool)]).astype(np.float32)
    lesion_off = (labels == 2) & ~mask
    found = {g: int(((random_walker_prior_refine(image, expert, mask, missed, gamma=g) == 2) & lesion_off).sum())
             for g in (0.01, 1.0)}
    assert found[0.01] > 0.8 * lesion_off.sum()  # the seeds win near the planes
    assert found[1.0] < found[0.01]  # a strong wrong prior wins more


def test_resolve_method_fallbacks() -> None:
    assert resolve_method("auto", have_model=True, have_ensemble=True) == ("model+rw", "")
    m, why = resolve_method("model", have_model=False, have_ensemble=True)
    assert m == "tta" and "refinement model" in why
    assert resolve_method("model+rw", have_model=False, have_ensemble=False)[0] == "prior+rw"
    assert resolve_method("tta", have_model=False, have_ensemble=False)[0] == "prior+rw"
    for method in CLASSICAL_METHODS:
        assert resolve_method(method, have_model=False, have_ensemble=False) == (method, "")
    with pytest.raises(ValueError, match="method"):
        resolve_method("magic", have_model=True, have_ensemble=True)


class _Net:
    """A stand-in probability model with a fixed answer (the real one is tested with nnU-Net)."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs
        self.calls: list[bool] = []

    @property
    def takes_prior(self) -> bool:
        return True

    def probabilities(self, image, spacing, expert_labels, reviewed, prior=None):  # type: ignore[no-untyped-def]
        self.calls.append(prior is not None)
        return self.probs


def test_make_refiner_every_method() -> None:
    image, labels, mask = _case()
    prior = np.stack([(labels == k).astype(np.float32) for k in range(3)])
    inputs = RefinementInputs(image, (2.0, 1.0, 1.0), np.where(mask, labels, 0).astype(np.uint8), mask, prior, 3)
    net = _Net(prior)
    adapted: list[int] = []

    def adapt(img, sp, exp, rev):  # type: ignore[no-untyped-def]
        adapted.append(1)
        return prior

    for method in METHODS:
        refiner = make_refiner(method, model=net, adapt=adapt, gamma=0.1)
        out = refiner.refine(inputs)
        assert refiner.name == method and out.dtype == np.uint8
        np.testing.assert_array_equal(out[mask], labels[mask])
        assert np.mean(out == labels) > 0.9, method
    assert adapted == [1] and all(net.calls)
    assert isinstance(make_refiner("model+rw", model=net), ModelRandomWalkerRefiner)
    assert isinstance(make_refiner("model", model=net), ModelRefiner)
    with pytest.raises(ValueError, match="refinement model"):
        make_refiner("model")
    with pytest.raises(ValueError, match="ensemble"):
        make_refiner("tta")


def test_refinement_inputs_validation() -> None:
    image, labels, mask = _case()
    with pytest.raises(ValueError, match="boolean"):
        RefinementInputs(image, (1, 1, 1), labels, mask.astype(np.uint8), None, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prior"):
        RefinementInputs(image, (1, 1, 1), labels, mask, np.zeros((2, *labels.shape)), 3)  # type: ignore[arg-type]
    inputs = RefinementInputs(image, (1, 1, 1), labels, mask, None, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="paste"):
        make_refiner("paste").refine(inputs)
