"""The node's refiner follows ``[refinement] method`` and falls back, never to "no refinement"."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.refiners import RefinementInputs
from node.app import LazyModels
from tests.fixtures.node_fixtures import make_settings

pytestmark = pytest.mark.slow


def _inputs(demo_models: Any) -> RefinementInputs:
    from models.demo import held_out_phantoms
    from models.nnunet import EnsemblePredictor

    p = held_out_phantoms(1)[0]
    prior = EnsemblePredictor(demo_models.preseg_dir, device="cpu").predict_members(p.image, p.spacing).mean(0)
    mask = np.zeros(p.labels.shape, bool)
    mask[p.labels.shape[0] // 2] = True
    return RefinementInputs(p.image, p.spacing, np.where(mask, p.labels, 0).astype(np.uint8), mask, prior, 3)


def test_default_is_model_plus_random_walker(demo_models: Any, tmp_path: Path) -> None:
    s = make_settings(tmp_path, models={"preseg_dir": str(demo_models.preseg_dir),
                                        "refine_dir": str(demo_models.refine_dir), "device": "cpu"})
    refiner = LazyModels(s).refiner()
    assert refiner.name == "model+rw" and refiner.version.endswith(";gamma=0.03")
    assert refiner.version.startswith("Dataset991_i3nodeRefine-")


def test_no_refinement_model_falls_back_to_test_time_adaptation(
    demo_models: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    s = make_settings(tmp_path, models={"preseg_dir": str(demo_models.preseg_dir), "device": "cpu"},
                      refinement={"tta_steps": 2})
    refiner = LazyModels(s).refiner()
    assert refiner.name == "tta"
    assert "needs a refinement model and none is installed" in caplog.text
    inputs = _inputs(demo_models)
    out = refiner.refine(inputs)
    np.testing.assert_array_equal(out[inputs.reviewed], inputs.expert[inputs.reviewed])


def test_unusable_refinement_model_falls_back_with_an_error(
    demo_models: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    s = make_settings(tmp_path, models={"preseg_dir": str(demo_models.preseg_dir), "refine_dir": str(broken),
                                        "device": "cpu"})
    refiner = LazyModels(s).refiner()
    assert refiner.name == "tta"
    assert "cannot be used" in caplog.text and str(broken) in caplog.text


@pytest.mark.parametrize("method", ["random_walker", "prior+rw", "paste", "watershed"])
def test_classical_methods_need_no_model(demo_models: Any, tmp_path: Path, method: str) -> None:
    s = make_settings(tmp_path, models={"preseg_dir": str(demo_models.preseg_dir), "device": "cpu"},
                      refinement={"method": method})
    refiner = LazyModels(s).refiner()
    assert refiner.name == method
    inputs = _inputs(demo_models)
    out = refiner.refine(inputs)
    np.testing.assert_array_equal(out[inputs.reviewed], inputs.expert[inputs.reviewed])
