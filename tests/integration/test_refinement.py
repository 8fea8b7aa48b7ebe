"""Refinement nnU-Net: training with simulated corrections, loading, and refining held-out phantoms.

The refinement model comes from the session fixture ``demo_models`` when it provides one
(``refine_dir``); otherwise it is trained here once and cached under ``<repo>/.cache/``
(keyed by the training settings and the training code, so a change retrains it).
The presegmentation comes from ``demo_models.preseg_dir`` through
``models.nnunet.EnsemblePredictor`` when both exist; otherwise the refinement model with no
corrections stands in for it (a model trained with k = 0 corrections part of the time).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.acquisition import select_slices
from models.metrics import mean_dice
from models.phantoms import Phantom, make_phantoms
from models.refinement import (
    Encoding,
    RefinementModel,
    RefinementModelError,
    force_reviewed,
    reviewed_mask,
)

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "refinement_tests"
LABELS = (1, 2)

# Training set of the locally trained model (make_phantoms uses seed * 1000 + i, so distinct
# base seeds never share a phantom; the held-out phantoms come from the ``held_out_phantoms``
# fixture, base seed models.demo.HELD_OUT_SEED, disjoint from this and from the demo models').
TRAIN = {"n": 14, "seed": 71, "epochs": 12, "iterations_per_epoch": 10}
# Slices per orientation asked of the "expert". The paper's 12 per orientation is meant for
# clinical volumes; on 32x64x64 phantoms 3 x 12 slices cover most of the volume and pasting
# them alone reaches Dice ~0.97, which would hide what the network adds.
MAX_SLICES = 4
# Mean Dice (organ, lesion) gain of refined over presegmentation required on held-out phantoms,
# with the slices select_slices picks (MAX_SLICES per orientation) on the demo ensemble's
# entropy. Measured +0.30 (0.46 -> 0.77, lesion 0 -> 0.58) with the demo models; the margin
# leaves room for other training runs.
MIN_GAIN = 0.15
MAX_LOSS_VS_PASTE = 0.03


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


def _code_hash() -> str:
    h = hashlib.sha256()
    for name in ("refinement_training.py",):
        p = REPO / "models" / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _train_cached(tag: str, phantoms: Sequence[Phantom], **kwargs: Any) -> Path:
    """Train a refinement model once per settings+code version; reuse it from .cache."""
    from models.refinement_training import train_refinement_model

    key = hashlib.sha256(
        json.dumps({"tag": tag, "n": len(phantoms), **{k: str(v) for k, v in kwargs.items()}},
                   sort_keys=True).encode() + _code_hash().encode()
    ).hexdigest()[:16]
    work = CACHE / f"{tag}-{key}"
    marker = work / "model_dir.txt"
    if marker.exists():
        model_dir = Path(marker.read_text().strip())
        if any(model_dir.glob("fold_*/checkpoint_final.pth")):
            return model_dir
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    model_dir = train_refinement_model(phantoms, work, **kwargs)
    (work / "train_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    marker.write_text(str(model_dir))
    return model_dir


def _demo_models(request: pytest.FixtureRequest) -> Any:
    try:
        return request.getfixturevalue("demo_models")
    except pytest.FixtureLookupError:
        return None


@pytest.fixture(scope="session")
def refinement_model_dir(request: pytest.FixtureRequest) -> Path:
    demo = _demo_models(request)
    refine_dir = getattr(demo, "refine_dir", None) if demo is not None else None
    if refine_dir is not None and any(Path(refine_dir).glob("fold_*/checkpoint_final.pth")):
        return Path(refine_dir)
    phantoms = make_phantoms(TRAIN["n"], seed=TRAIN["seed"])
    return _train_cached("i3deep_reviewed", phantoms, epochs=TRAIN["epochs"],
                         iterations_per_epoch=TRAIN["iterations_per_epoch"])


@pytest.fixture(scope="session")
def refinement_model(refinement_model_dir: Path) -> RefinementModel:
    return RefinementModel(refinement_model_dir, device="cpu")


@dataclass
class Case:
    phantom: Phantom
    preseg: np.ndarray
    reviewed: dict[int, list[int]]
    refined: np.ndarray


def _presegmenter(request: pytest.FixtureRequest, refinement_model: RefinementModel) -> Any:
    """``f(phantom) -> (segmentation, uncertainty)`` from the demo ensemble, else a stand-in."""
    demo = _demo_models(request)
    preseg_dir = getattr(demo, "preseg_dir", None) if demo is not None else None
    if preseg_dir is not None:
        try:
            from models.nnunet import EnsemblePredictor
        except ImportError:
            EnsemblePredictor = None  # noqa: N806
        if EnsemblePredictor is not None:
            from models.uncertainty import predictive_entropy

            ens = EnsemblePredictor(preseg_dir, device="cpu")

            def from_ensemble(p: Phantom) -> tuple[np.ndarray, np.ndarray]:
                probs = ens.predict_members(p.image, p.spacing)  # (T, C, z, y, x)
                seg = np.argmax(probs.mean(axis=0), axis=0).astype(np.uint8)
                return seg, predictive_entropy(probs)

            return from_ensemble

    from models.uncertainty import predictive_entropy

    def stand_in(p: Phantom) -> tuple[np.ndarray, np.ndarray]:
        probs = refinement_model.probabilities(p.image, p.spacing, p.labels, {})
        seg = np.argmax(probs, axis=0).astype(np.uint8)
        return seg, predictive_entropy(probs[None])

    return stand_in


@pytest.fixture(scope="session")
def refined_cases(
    request: pytest.FixtureRequest, refinement_model: RefinementModel, held_out_phantoms: list[Phantom]
) -> list[Case]:
    presegment = _presegmenter(request, refinement_model)
    cases = []
    for p in held_out_phantoms:
        seg, u = presegment(p)
        reviewed = select_slices(u, max_slices=MAX_SLICES)
        if not any(reviewed.values()):  # an ensemble that agrees everywhere: fall back to fixed slices
            reviewed = {0: [p.labels.shape[0] // 2], 1: [p.labels.shape[1] // 2], 2: [p.labels.shape[2] // 2]}
        refined = refinement_model.predict(p.image, p.spacing, p.labels, reviewed)
        cases.append(Case(p, seg, {int(a): list(v) for a, v in reviewed.items()}, refined))
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "last_measurement.json").write_text(json.dumps({
        "model_dir": str(refinement_model.model_dir),
        "preseg_per_case": [mean_dice(c.preseg, c.phantom.labels, LABELS) for c in cases],
        "paste_per_case": [mean_dice(_paste(c), c.phantom.labels, LABELS) for c in cases],
        "refined_per_case": [mean_dice(c.refined, c.phantom.labels, LABELS) for c in cases],
        "n_reviewed_slices": [sum(len(v) for v in c.reviewed.values()) for c in cases],
        **_summary(cases),
    }, indent=2))
    return cases


# ---------------------------------------------------------------------------------------------
# fast (torch, no training): the augmentation-side pieces of the trainer
# ---------------------------------------------------------------------------------------------


def test_code_to_channels_transform() -> None:
    import torch

    from models.refinement_training import CorrectionCodeToChannels, correction_code

    labels = np.zeros((4, 5, 6), np.int16)
    labels[1:3, 1:4, 2:5] = 1
    labels[2, 2, 3] = 2
    code = correction_code(labels, {0: [2], 2: [0]})
    image = torch.randn(1, 4, 5, 6)
    seg = torch.from_numpy(np.stack([labels, code]).astype(np.int16))
    for enc, n_extra in ((Encoding.I3DEEP, 2), (Encoding.I3DEEP_REVIEWED, 3)):
        out = CorrectionCodeToChannels(3, enc)(image=image.clone(), segmentation=seg.clone())
        assert out["image"].shape == (1 + n_extra, 4, 5, 6)
        assert out["segmentation"].shape == (1, 4, 5, 6)
        torch.testing.assert_close(out["image"][0], image[0])
        from models.refinement import encode_corrections

        expected = encode_corrections(image[0].numpy(), labels, {0: [2], 2: [0]}, 3, enc)
        np.testing.assert_array_equal(out["image"].numpy(), expected)
        np.testing.assert_array_equal(out["segmentation"][0].numpy(), labels)


def test_simulating_dataset_appends_fresh_code_channel() -> None:
    from models.refinement_training import CorrectionSimulatingDataset

    labels = np.zeros((1, 12, 12, 12), np.int8)
    labels[0, 3:9, 3:9, 3:9] = 1

    class Base:
        identifiers = ["a"]

        def load_case(self, identifier: str) -> tuple[Any, Any, Any, dict[str, Any]]:
            return np.zeros((1, 12, 12, 12), np.float32), labels, None, {"x": 1}

        def extra(self) -> str:
            return "passed through"

    ds = CorrectionSimulatingDataset(Base(), max_fraction=1.0, p_foreground=0.5)
    assert ds.identifiers == ["a"] and ds.extra() == "passed through"
    np.random.seed(0)
    codes = []
    for _ in range(20):
        data, seg, seg_prev, props = ds.load_case("a")
        assert seg.shape == (2, 12, 12, 12) and seg_prev is None and props == {"x": 1}
        np.testing.assert_array_equal(seg[0], labels[0])
        code = seg[1]
        on = code > 0
        # on reviewed voxels the code is exactly 1 + label
        np.testing.assert_array_equal(code[on], labels[0][on] + 1)
        codes.append(code.copy())
    assert len({c.tobytes() for c in codes}) > 10  # drawn anew on every call


# ---------------------------------------------------------------------------------------------
# slow: trained models
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first slow test may build the models on a busy machine
def test_results_folder_is_standard_nnunet(refinement_model_dir: Path) -> None:
    import torch

    dj = json.loads((refinement_model_dir / "dataset.json").read_text())
    plans = json.loads((refinement_model_dir / "plans.json").read_text())
    assert dj["channel_names"] == {"0": "CT", "1": "noNorm", "2": "noNorm", "3": "noNorm"}
    assert dj["i3node"]["encoding"] == "i3deep+reviewed"
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["normalization_schemes"] == ["CTNormalization"] + ["NoNormalization"] * 3
    for ckpt in refinement_model_dir.glob("fold_*/checkpoint_*.pth"):
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["trainer_name"] == "nnUNetTrainer"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first slow test may build the models on a busy machine
def test_reviewed_slices_match_expert_exactly(refined_cases: list[Case]) -> None:
    for case in refined_cases:
        mask = reviewed_mask(case.refined.shape, case.reviewed)
        assert mask.any()
        assert case.refined.dtype == np.uint8 and case.refined.shape == case.phantom.labels.shape
        np.testing.assert_array_equal(case.refined[mask], case.phantom.labels[mask])


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first slow test may build the models on a busy machine
def test_refinement_improves_dice_on_held_out_phantoms(refined_cases: list[Case]) -> None:
    pre = [mean_dice(c.preseg, c.phantom.labels, LABELS) for c in refined_cases]
    ref = [mean_dice(c.refined, c.phantom.labels, LABELS) for c in refined_cases]
    gain = float(np.mean(ref) - np.mean(pre))
    assert gain >= MIN_GAIN, f"preseg {np.round(pre, 3)} refined {np.round(ref, 3)} gain {gain:.3f}"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first slow test may build the models on a busy machine
def test_refinement_not_worse_than_pasting_the_corrections(refined_cases: list[Case]) -> None:
    # Baseline without any network: the corrected slices pasted into the presegmentation.
    # At the CPU-sized training budget of these tests the refinement network does not yet
    # propagate the lesion beyond the corrected slices (measured: equal lesion Dice, organ
    # within 0.01), so this only guards against the network degrading the result; with a
    # real training schedule it should beat the baseline.
    paste = [mean_dice(_paste(c), c.phantom.labels, LABELS) for c in refined_cases]
    ref = [mean_dice(c.refined, c.phantom.labels, LABELS) for c in refined_cases]
    assert np.mean(ref) >= np.mean(paste) - MAX_LOSS_VS_PASTE, (np.round(paste, 3), np.round(ref, 3))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first slow test may build the models on a busy machine
def test_i3deep_encoding_model_and_error_paths(
    tmp_path: Path, refinement_model_dir: Path, held_out_phantoms: list[Phantom]
) -> None:
    # a minimal I3DEEP model trained on cross-validation fold 0 (schedule too short to be good;
    # this checks the plumbing for the other encoding)
    model_dir = _train_cached("i3deep_tiny", make_phantoms(4, seed=TRAIN["seed"]), encoding=Encoding.I3DEEP,
                              folds=(0,), epochs=1, iterations_per_epoch=2)
    model = RefinementModel(model_dir, device="cpu")
    assert model.encoding is Encoding.I3DEEP and model.n_channels == 3 and model.folds == ["0"]
    p = held_out_phantoms[0]
    reviewed = {0: [5, 20], 2: [31]}
    out = model.predict(p.image, p.spacing, p.labels, reviewed)
    mask = reviewed_mask(p.labels.shape, reviewed)
    np.testing.assert_array_equal(out[mask], p.labels[mask])
    assert set(np.unique(out)) <= {0, 1, 2}

    with pytest.raises(ValueError, match="channel"):
        model.predict(np.stack([p.image, p.image]), p.spacing, p.labels, reviewed)
    with pytest.raises(ValueError, match="spacing"):
        model.predict(p.image, (1.0, 1.0), p.labels, reviewed)
    with pytest.raises(RefinementModelError, match="does not exist"):
        RefinementModel(tmp_path / "nope")

    # dataset.json claiming the other encoding: the network's input channels disagree
    broken = tmp_path / "broken" / refinement_model_dir.name
    shutil.copytree(refinement_model_dir, broken)
    dj = json.loads((broken / "dataset.json").read_text())
    dj["channel_names"].pop("3")
    dj["i3node"]["encoding"] = "i3deep"
    (broken / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(RefinementModelError, match="plans.json"):
        RefinementModel(broken)
    plans = json.loads((broken / "plans.json").read_text())
    for cfg in plans["configurations"].values():
        cfg["normalization_schemes"] = cfg["normalization_schemes"][:3]
        cfg["use_mask_for_norm"] = cfg["use_mask_for_norm"][:3]
    (broken / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(RefinementModelError, match="input channel"):
        RefinementModel(broken).predict(p.image, p.spacing, p.labels, reviewed)
    for ckpt in broken.glob("fold_*/checkpoint_final.pth"):
        ckpt.unlink()
    with pytest.raises(RefinementModelError, match="checkpoint_final"):
        RefinementModel(broken)


def _paste(case: Case) -> np.ndarray:
    """The presegmentation with the corrected slices pasted in (no network)."""
    return force_reviewed(case.preseg, case.phantom.labels, reviewed_mask(case.preseg.shape, case.reviewed))


def _summary(cases: Sequence[Case]) -> Mapping[str, float]:
    return {
        "preseg": float(np.mean([mean_dice(c.preseg, c.phantom.labels, LABELS) for c in cases])),
        "paste": float(np.mean([mean_dice(_paste(c), c.phantom.labels, LABELS) for c in cases])),
        "refined": float(np.mean([mean_dice(c.refined, c.phantom.labels, LABELS) for c in cases])),
    }
