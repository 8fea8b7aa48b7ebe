"""The nnU-Net deep-ensemble wrapper on the tiny demo presegmentation model (real nnU-Net).

Measured with the default ``DemoSpec`` (12 training phantoms 32x64x64, 3 folds, 15 epochs x
20 iterations, SGD momentum 0.9, 2 CPU cores) on 8 held-out phantoms (``make_phantoms(8, seed=77)``):
ensemble organ Dice 0.953 +/- 0.026, lesion Dice 0.909 +/- 0.038 (with nnU-Net's momentum 0.99
the same budget gave lesion 0.0). The folds disagree at the lesion's border (see
:func:`test_folds_disagree_at_lesion_borders`).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.demo import DemoModels, build_demo_models
from models.metrics import dice_per_class
from models.nnunet import EnsemblePredictor, ModelError, bare_predictor
from models.training import NetworkOverrides, write_raw_dataset
from models.uncertainty import EnsembleAccumulator, predictive_entropy

pytestmark = pytest.mark.slow

#: Held-out organ Dice of the ensemble must stay above this (measured mean 0.95).
ORGAN_DICE_FLOOR = 0.85
#: The presegmentation finds the lesions (issue: held-out lesion Dice >= 0.5; measured mean 0.91).
LESION_DICE_FLOOR = 0.5


@pytest.fixture(scope="module")
def predictor(demo_models: DemoModels) -> EnsemblePredictor:
    return EnsemblePredictor(demo_models.preseg_dir, device="cpu")


@pytest.fixture(scope="module")
def case(held_out_phantoms: list[Any]) -> Any:
    return held_out_phantoms[0]


@pytest.fixture(scope="module")
def members(predictor: EnsemblePredictor, case: Any) -> np.ndarray:
    return predictor.predict_members(case.image, case.spacing)


def test_describes_model(predictor: EnsemblePredictor) -> None:
    assert predictor.n_members == 3
    assert predictor.folds == (0, 1, 2)
    assert predictor.class_names == ("background", "organ", "lesion")
    assert predictor.n_classes == 3
    assert predictor.channel_names == ("CT",)
    assert [m.fold for m in predictor.members] == [0, 1, 2]
    assert "3 members" in predictor.describe()


def test_members_are_distinct_probability_maps(members: np.ndarray, case: Any) -> None:
    assert members.shape == (3, 3, *case.image.shape)
    assert members.dtype == np.float32
    np.testing.assert_allclose(members.sum(axis=1), 1.0, atol=1e-4)
    assert members.min() >= 0.0 and members.max() <= 1.0 + 1e-6
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(members[a] - members[b]).max() > 0.05, f"members {a} and {b} are identical"


def test_float16_stack(predictor: EnsemblePredictor, case: Any, members: np.ndarray) -> None:
    half = predictor.predict_members(case.image, case.spacing, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), members, atol=2e-3)


def test_each_member_matches_single_fold_predictor(demo_models: DemoModels, members: np.ndarray,
                                                    case: Any) -> None:
    for fold in range(3):
        single = bare_predictor(demo_models.preseg_dir, folds=[fold], device="cpu")
        _seg, probs = single.predict_single_npy_array(case.image[None], {"spacing": list(case.spacing)},
                                                      None, None, True)
        np.testing.assert_allclose(members[fold], probs, atol=1e-5)


def test_member_stream_equals_stack_and_accumulator(predictor: EnsemblePredictor, members: np.ndarray,
                                                    case: Any) -> None:
    acc = EnsembleAccumulator()
    for t, member in enumerate(predictor.iter_members(case.image, case.spacing)):
        np.testing.assert_array_equal(member, members[t])
        acc.add(member)
    np.testing.assert_allclose(acc.mean(), members.mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(acc.segmentation(), members.mean(axis=0).argmax(axis=0))


def test_entropy_is_high_where_folds_disagree(members: np.ndarray) -> None:
    votes = members.argmax(axis=1)
    disagree = (votes != votes[0]).any(axis=0)
    assert disagree.sum() > 10, "folds never disagree"
    entropy = predictive_entropy(members)
    mean_dis, mean_agr = float(entropy[disagree].mean()), float(entropy[~disagree].mean())
    assert mean_dis > 0.3
    assert mean_dis > 10 * mean_agr, (mean_dis, mean_agr)


def test_held_out_dice(predictor: EnsemblePredictor, held_out_phantoms: list[Any]) -> None:
    organ, lesion = [], []
    for ph in held_out_phantoms:
        acc = EnsembleAccumulator()
        for member in predictor.iter_members(ph.image, ph.spacing):
            acc.add(member)
        d = dice_per_class(acc.segmentation(), ph.labels, [1, 2])
        organ.append(d[1])
        lesion.append(d[2])
    print(f"held-out Dice organ {np.round(organ, 3)} lesion {np.round(lesion, 3)}")
    assert float(np.mean(organ)) > ORGAN_DICE_FLOOR
    assert float(np.mean(lesion)) >= LESION_DICE_FLOOR


def test_folds_disagree_at_lesion_borders(predictor: EnsemblePredictor, held_out_phantoms: list[Any]) -> None:
    """The uncertainty that drives the selection sits on the lesion's border, not inside the organ.

    Measured on the 4 held-out phantoms: the folds' argmaxes disagree on 10-35 % of the lesion's
    border voxels and on < 0.5 % of the organ's interior; mean entropy 0.23-0.42 vs < 0.01.
    """
    from scipy import ndimage

    border_dis, organ_dis, border_h, organ_h = [], [], [], []
    for ph in held_out_phantoms:
        members = predictor.predict_members(ph.image, ph.spacing)
        entropy = predictive_entropy(members)
        votes = members.argmax(axis=1)
        disagree = (votes != votes[0]).any(axis=0)
        lesion = ph.labels == 2
        border = ndimage.binary_dilation(lesion) & ~ndimage.binary_erosion(lesion)
        organ = ndimage.binary_erosion((ph.labels == 1) & ~ndimage.binary_dilation(lesion, iterations=3),
                                       iterations=2)
        border_dis.append(float(disagree[border].mean()))
        organ_dis.append(float(disagree[organ].mean()))
        border_h.append(float(entropy[border].mean()))
        organ_h.append(float(entropy[organ].mean()))
    assert np.mean(border_dis) > 0.05 and np.mean(border_dis) > 10 * np.mean(organ_dis), (border_dis, organ_dis)
    assert np.mean(border_h) > 0.15 and np.mean(border_h) > 10 * np.mean(organ_h), (border_h, organ_h)


def test_tta_members(demo_models: DemoModels, case: Any, members: np.ndarray) -> None:
    tta = EnsemblePredictor(demo_models.preseg_dir, folds=[0], tta=True, device="cpu")
    assert tta.n_members == 8
    assert tta.members[0].mirror_axes == ()
    stack = tta.predict_members(case.image, case.spacing)
    np.testing.assert_allclose(stack.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(stack[0], members[0], atol=1e-6)
    assert np.abs(stack[1:] - stack[0]).max() > 1e-3


def test_mc_dropout_needs_dropout_layers(demo_models: DemoModels) -> None:
    with pytest.raises(ModelError, match="no dropout layers"):
        EnsemblePredictor(demo_models.preseg_dir, folds=[0], mc_dropout=4, device="cpu")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint_best.pth", "*.png"))
    return dst


def test_missing_files_name_the_folder(demo_models: DemoModels, tmp_path: Path) -> None:
    model = _copy_model(demo_models.preseg_dir, tmp_path / "Trainer__Plans__3d_fullres")
    (model / "fold_1" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match=r"Trainer__Plans__3d_fullres.*fold_1 has no checkpoint_final\.pth"):
        EnsemblePredictor(model, folds=[0, 1], device="cpu")
    with pytest.raises(ModelError, match="has no fold_7"):
        EnsemblePredictor(model, folds=[7], device="cpu")
    assert EnsemblePredictor(model, device="cpu").folds == (0, 2)  # auto-detect skips incomplete folds
    for fold in ("fold_0", "fold_2"):
        (model / fold / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match="no fold has checkpoint_final.pth"):
        EnsemblePredictor(model, device="cpu")
    (model / "dataset.json").unlink()
    with pytest.raises(ModelError, match=r"Trainer__Plans__3d_fullres has no dataset\.json"):
        EnsemblePredictor(model, device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        EnsemblePredictor(tmp_path / "nowhere", device="cpu")


def test_channel_mismatch(demo_models: DemoModels, predictor: EnsemblePredictor, case: Any,
                          tmp_path: Path) -> None:
    two = np.stack([case.image, case.image])
    with pytest.raises(ModelError, match=rf"{demo_models.preseg_dir.name} expects 1 input channel"):
        next(predictor.iter_members(two, case.spacing))
    # a dataset.json that declares more channels than the network was trained with
    model = _copy_model(demo_models.preseg_dir, tmp_path / "Wrong__Plans__3d_fullres")
    dj = json.loads((model / "dataset.json").read_text())
    dj["channel_names"] = {"0": "CT", "1": "noNorm"}
    (model / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(ModelError, match="Wrong__Plans__3d_fullres"):
        EnsemblePredictor(model, device="cpu")


def test_bad_inputs(predictor: EnsemblePredictor, case: Any) -> None:
    with pytest.raises(ValueError, match="spacing"):
        next(predictor.iter_members(case.image, (1.0, 1.0)))
    with pytest.raises(ValueError, match="image"):
        next(predictor.iter_members(case.image[0], case.spacing))
    bad = case.image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        next(predictor.iter_members(bad, case.spacing))


def test_checkpoints_load_without_our_trainer(demo_models: DemoModels, tmp_path: Path) -> None:
    """A fresh interpreter that cannot import this repository loads and runs the model."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["models"] = None  # any import of this repository's models package fails
        import numpy as np, torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        ckpt = torch.load({str(demo_models.preseg_dir / "fold_0" / "checkpoint_final.pth")!r},
                          map_location="cpu", weights_only=False)
        assert ckpt["trainer_name"] == "nnUNetTrainer", ckpt["trainer_name"]
        assert ckpt["i3node_trained_with"] == "nnUNetTrainer_i3nodeTiny"
        p = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
        p.initialize_from_trained_model_folder({str(demo_models.preseg_dir)!r}, use_folds=(0, 1, 2))
        img = np.random.default_rng(0).normal(0, 50, (1, 16, 32, 32)).astype(np.float32)
        seg = p.predict_single_npy_array(img, {{"spacing": [2.5, 1.5, 1.5]}}, None, None, False)
        assert seg.shape == (16, 32, 32)
        print("LOADED-OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED-OK" in out.stdout


def test_demo_cache_is_reused_and_refinement_pluggable(demo_models: DemoModels, demo_spec: Any) -> None:
    """Second build is a cache hit; an explicit refinement builder is called once and cached."""
    from tests.fixtures.models import model_cache_dir

    calls: list[Path] = []

    def fake_builder(req: Any) -> Path:
        calls.append(req.out_dir)
        assert req.preseg_dir == demo_models.preseg_dir
        assert len(req.cases) == demo_spec.n_train
        out = req.out_dir / "nnUNet_results" / "Dataset999_fake" / "T__P__3d_fullres"
        out.mkdir(parents=True)
        return out

    version = f"test-{uuid.uuid4().hex}"
    first = build_demo_models(model_cache_dir(), spec=demo_spec, refinement_builder=fake_builder,
                              refinement_version=version)
    entry = first.refine_dir.parents[2] if first.refine_dir is not None else None
    try:
        again = build_demo_models(model_cache_dir(), spec=demo_spec, refinement_builder=fake_builder,
                                  refinement_version=version)
        assert len(calls) == 1
        assert first.preseg_dir == demo_models.preseg_dir == again.preseg_dir
        assert first.refine_dir == again.refine_dir and first.refine_dir is not None
        assert first.spec_hash == again.spec_hash != demo_models.spec_hash.split("-")[0]
        assert (entry / "COMPLETE.json").is_file()
    finally:
        if entry is not None:
            shutil.rmtree(entry, ignore_errors=True)
            Path(f"{entry}.lock").unlink(missing_ok=True)


def test_network_overrides_strides() -> None:
    ov = NetworkOverrides(patch_size=(32, 48, 48), features_per_stage=(8, 16, 32, 64))
    assert ov.resolved_strides() == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert NetworkOverrides(patch_size=(16, 48, 48)).resolved_strides() == [
        [1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    with pytest.raises(ValueError, match="patch_size: axis 1"):
        NetworkOverrides(patch_size=(32, 44, 48), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
                         ).resolved_strides()


def test_raw_dataset_spacing_round_trip(tmp_path: Path) -> None:
    import SimpleITK as sitk

    img = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    lab = (img > 60).astype(np.uint8)
    ds = write_raw_dataset(tmp_path, 42, "Spacing", [img], [lab], (3.0, 2.0, 1.0), {0: "CT"},
                           {"background": 0, "thing": 1})
    back = sitk.ReadImage(str(ds / "imagesTr" / "case_0000_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), img)
    assert back.GetSpacing() == (1.0, 2.0, 3.0)  # SimpleITK order (x, y, z)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "thing": 1}
    with pytest.raises(ValueError, match="channel"):
        write_raw_dataset(tmp_path, 42, "Spacing", [np.stack([img, img])], [lab], (3.0, 2.0, 1.0), {0: "CT"},
                          {"background": 0, "thing": 1})


def test_mc_dropout_members(demo_models: DemoModels, case: Any, tmp_path: Path) -> None:
    """Dropout layers added through plans.json (they have no weights) give MC-dropout members."""
    model = _copy_model(demo_models.preseg_dir, tmp_path / "Drop__Plans__3d_fullres")
    plans = json.loads((model / "plans.json").read_text())
    for cfg in plans["configurations"].values():
        kw = cfg["architecture"]["arch_kwargs"]
        kw["dropout_op"] = "torch.nn.modules.dropout.Dropout3d"
        kw["dropout_op_kwargs"] = {"p": 0.2, "inplace": True}
    (model / "plans.json").write_text(json.dumps(plans))
    import torch  # the dropout module shifts the norm layer's index in each conv block

    ckpt_path = model / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["network_weights"] = {k.replace(".all_modules.1.", ".all_modules.2."): v
                               for k, v in ckpt["network_weights"].items()}
    torch.save(ckpt, ckpt_path)
    mc = EnsemblePredictor(model, folds=[0], mc_dropout=3, device="cpu", seed=5)
    assert [m.mc_pass for m in mc.members] == [0, 1, 2]
    first = mc.predict_members(case.image, case.spacing)
    np.testing.assert_allclose(first.sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(first[1] - first[0]).max() > 1e-3
    np.testing.assert_array_equal(mc.predict_members(case.image, case.spacing), first)  # seeded
