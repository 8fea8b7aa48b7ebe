"""Refinement input encoding: reviewed masks, correction channels, dataset.json scheme (no torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from models.refinement import (
    I3NODE_KEY,
    Encoding,
    correction_channel_names,
    encode_corrections,
    force_reviewed,
    layout_from_dataset_json,
    refinement_dataset_json,
    reviewed_mask,
)

BASE_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1, "lesion": 2},
    "numTraining": 4,
    "file_ending": ".nii.gz",
}


# ----------------------------------------------------------------------------- reviewed_mask


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reviewed_mask_single_axis(axis: int) -> None:
    shape = (4, 5, 6)
    mask = reviewed_mask(shape, {axis: [1, 3]})
    assert mask.dtype == bool and mask.shape == shape
    expected = np.zeros(shape, bool)
    idx: list[object] = [slice(None)] * 3
    for i in (1, 3):
        idx[axis] = i
        expected[tuple(idx)] = True
    np.testing.assert_array_equal(mask, expected)
    # whole slices: count = 2 * product of the other two dims
    assert mask.sum() == 2 * np.prod(shape) // shape[axis]


def test_reviewed_mask_combination_is_union() -> None:
    shape = (3, 4, 5)
    mask = reviewed_mask(shape, {0: [0], 1: [2], 2: [4, 1]})
    expected = np.zeros(shape, bool)
    expected[0] = True
    expected[:, 2] = True
    expected[:, :, 4] = True
    expected[:, :, 1] = True
    np.testing.assert_array_equal(mask, expected)


def test_reviewed_mask_empty_and_duplicates() -> None:
    assert not reviewed_mask((2, 3, 4), {}).any()
    assert not reviewed_mask((2, 3, 4), {0: [], 1: []}).any()
    np.testing.assert_array_equal(reviewed_mask((2, 3, 4), {1: [1, 1]}), reviewed_mask((2, 3, 4), {1: [1]}))


def test_reviewed_mask_accepts_numpy_indices_and_bool_mask() -> None:
    m = reviewed_mask((3, 3, 3), {np.int64(2): np.array([0, 2])})
    assert m[:, :, 0].all() and m[:, :, 2].all() and not m[:, :, 1].any()
    custom = np.zeros((3, 3, 3), bool)
    custom[1, 1, 1] = True
    out = reviewed_mask((3, 3, 3), custom)
    np.testing.assert_array_equal(out, custom)
    assert out is not custom


@pytest.mark.parametrize(
    "shape, reviewed, word",
    [
        ((3, 3, 3), {3: [0]}, "axis"),
        ((3, 3, 3), {0: [3]}, "reviewed[0]"),
        ((3, 3, 3), {1: [-1]}, "reviewed[1]"),
        ((3, 3), {0: [0]}, "shape"),
        ((3, 3, 3), np.zeros((3, 3, 2), bool), "shape"),
        ((3, 3, 3), np.zeros((3, 3, 3), np.uint8), "boolean"),
        ((3, 3, 3), [0, 1], "reviewed"),
    ],
)
def test_reviewed_mask_rejects_bad_input(shape, reviewed, word) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
        reviewed_mask(shape, reviewed)


# ----------------------------------------------------------------------------- encode_corrections


def _tiny() -> tuple[np.ndarray, np.ndarray]:
    image = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) - 5.0
    labels = np.array(
        [
            [[0, 1, 1], [0, 2, 1], [0, 0, 0]],
            [[1, 1, 0], [2, 2, 0], [0, 0, 2]],
        ],
        dtype=np.uint8,
    )
    return image, labels


def test_encode_i3deep_by_hand() -> None:
    image, labels = _tiny()
    out = encode_corrections(image, labels, {0: [1]}, 3, Encoding.I3DEEP)
    assert out.dtype == np.float32 and out.shape == (3, 2, 3, 3)
    np.testing.assert_array_equal(out[0], image)
    organ = np.zeros((2, 3, 3), np.float32)
    organ[1] = [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    lesion = np.zeros((2, 3, 3), np.float32)
    lesion[1] = [[0, 0, 0], [1, 1, 0], [0, 0, 1]]
    np.testing.assert_array_equal(out[1], organ)
    np.testing.assert_array_equal(out[2], lesion)


def test_encode_i3deep_reviewed_by_hand() -> None:
    image, labels = _tiny()
    out = encode_corrections(image, labels, {2: [0, 2]}, 3, Encoding.I3DEEP_REVIEWED)
    assert out.shape == (4, 2, 3, 3)
    np.testing.assert_array_equal(out[0], image)
    reviewed = np.zeros((2, 3, 3), np.float32)
    reviewed[:, :, [0, 2]] = 1
    np.testing.assert_array_equal(out[3], reviewed)
    # column x=0: labels z0 [0,0,0], z1 [1,2,0]; column x=2: z0 [1,1,0], z1 [0,0,2]
    organ = np.zeros((2, 3, 3), np.float32)
    organ[0, :, 2] = [1, 1, 0]
    organ[1, :, 0] = [1, 0, 0]
    lesion = np.zeros((2, 3, 3), np.float32)
    lesion[1, :, 0] = [0, 1, 0]
    lesion[1, :, 2] = [0, 0, 1]
    np.testing.assert_array_equal(out[1], organ)
    np.testing.assert_array_equal(out[2], lesion)
    # reviewed background voxels are exactly reviewed & no foreground channel
    bg = (out[3] == 1) & (out[1] == 0) & (out[2] == 0)
    assert bg.sum() == reviewed.sum() - organ.sum() - lesion.sum()


def test_encode_nothing_reviewed_gives_zero_channels() -> None:
    image, labels = _tiny()
    out = encode_corrections(image, labels, {}, 3, Encoding.I3DEEP_REVIEWED)
    assert not out[1:].any()


def test_encode_multichannel_image_and_binary_task() -> None:
    image = np.stack([np.ones((2, 2, 2)), 2 * np.ones((2, 2, 2))]).astype(np.float64)
    labels = np.array([[[0, 1], [1, 1]], [[1, 0], [0, 0]]], dtype=np.int16)
    out = encode_corrections(image, labels, {0: [0]}, 2, Encoding.I3DEEP)
    assert out.shape == (3, 2, 2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:2], image)
    np.testing.assert_array_equal(out[2], [[[0, 1], [1, 1]], [[0, 0], [0, 0]]])


def test_encode_ignores_labels_off_the_reviewed_slices() -> None:
    image, labels = _tiny()
    labels = labels.astype(np.int16)
    labels[0] = 9  # out of range, but not reviewed
    out = encode_corrections(image, labels, {0: [1]}, 3, Encoding.I3DEEP)
    assert not out[1:, 0].any()


def test_encode_default_is_i3deep_reviewed() -> None:
    image, labels = _tiny()
    assert encode_corrections(image, labels, {0: [0]}, 3).shape[0] == 4


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"expert_labels": np.zeros((2, 3, 4), np.uint8)}, "expert_labels"),
        ({"expert_labels": np.zeros((2, 3, 3), np.float32)}, "integer"),
        ({"expert_labels": np.full((2, 3, 3), 3, np.uint8)}, "expert_labels"),
        ({"n_classes": 1}, "n_classes"),
        ({"image": np.zeros((3, 3))}, "image"),
        ({"reviewed": {5: [0]}}, "axis"),
    ],
)
def test_encode_rejects_bad_input(kwargs, word) -> None:  # type: ignore[no-untyped-def]
    image, labels = _tiny()
    args = {"image": image, "expert_labels": labels, "reviewed": {0: [0]}, "n_classes": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        encode_corrections(**args)


def test_encoding_channel_counts_and_names() -> None:
    assert Encoding.I3DEEP.n_correction_channels(3) == 2
    assert Encoding.I3DEEP_REVIEWED.n_correction_channels(3) == 3
    assert Encoding("i3deep+reviewed") is Encoding.I3DEEP_REVIEWED
    assert correction_channel_names(Encoding.I3DEEP, ["bg", "organ", "lesion"]) == ["organ", "lesion"]
    assert correction_channel_names(Encoding.I3DEEP_REVIEWED, ["bg", "a"]) == ["a", "reviewed"]


# ----------------------------------------------------------------------------- force_reviewed


def test_force_reviewed() -> None:
    pred = np.array([[[0, 1], [2, 2]]], dtype=np.uint8)
    expert = np.array([[[2, 0], [0, 1]]], dtype=np.int64)
    mask = np.array([[[True, False], [False, True]]])
    out = force_reviewed(pred, expert, mask)
    np.testing.assert_array_equal(out, [[[2, 1], [2, 1]]])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(pred, [[[0, 1], [2, 2]]])  # input untouched
    with pytest.raises(ValueError, match="mask"):
        force_reviewed(pred, expert, mask.astype(np.uint8))
    with pytest.raises(ValueError, match="expert_labels"):
        force_reviewed(pred, expert[:, :1], mask)


# ----------------------------------------------------------------------------- dataset.json scheme


@pytest.mark.parametrize("encoding", list(Encoding))
def test_refinement_dataset_json_roundtrip(encoding: Encoding) -> None:
    dj = refinement_dataset_json(BASE_JSON, encoding)
    n_corr = encoding.n_correction_channels(3)
    assert dj["channel_names"]["0"] == "CT"
    assert [dj["channel_names"][str(i)] for i in range(1, 1 + n_corr)] == ["noNorm"] * n_corr
    assert len(dj["channel_names"]) == 1 + n_corr
    assert dj[I3NODE_KEY]["encoding"] == encoding.value
    assert dj[I3NODE_KEY]["image_channels"] == 1
    assert layout_from_dataset_json(dj).encoding is encoding
    assert BASE_JSON["channel_names"] == {"0": "CT"}  # base untouched
    # without the i3node key the trailing noNorm channels decide
    del dj[I3NODE_KEY]
    assert layout_from_dataset_json(dj).encoding is encoding


def test_layout_from_dataset_json_encoding_errors() -> None:
    dj = refinement_dataset_json(BASE_JSON, Encoding.I3DEEP)
    bad = dict(dj, **{I3NODE_KEY: {"encoding": "clicks"}})
    with pytest.raises(ValueError, match="clicks"):
        layout_from_dataset_json(bad)
    bad = dict(dj, **{I3NODE_KEY: {"encoding": "i3deep+reviewed", "image_channels": 1}})
    with pytest.raises(ValueError, match="channels"):
        layout_from_dataset_json(bad)
    with pytest.raises(ValueError, match="infer"):
        layout_from_dataset_json(BASE_JSON)  # a plain presegmentation dataset.json
    with pytest.raises(ValueError, match="channel_names"):
        layout_from_dataset_json({"labels": {"background": 0, "a": 1}})


def test_layout_from_dataset_json_encoding_ambiguous_nonorm_image_prefers_exact_count() -> None:
    dj = {"channel_names": {"0": "noNorm", "1": "noNorm", "2": "noNorm"},
          "labels": {"background": 0, "organ": 1, "lesion": 2}}
    # 3 trailing noNorm: only I3DEEP_REVIEWED matches the count exactly, but it leaves no image
    with pytest.raises(ValueError, match="infer"):
        layout_from_dataset_json(dj)
    dj[I3NODE_KEY] = {"encoding": "i3deep", "image_channels": 1}
    assert layout_from_dataset_json(dj).encoding is Encoding.I3DEEP


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, models.refinement; print('torch' in sys.modules, 'nnunetv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- training simulation


def test_correction_code_matches_encoding() -> None:
    from models.refinement_training import correction_code

    image, labels = _tiny()
    reviewed = {0: [1], 2: [0]}
    code = correction_code(labels, reviewed)
    assert code.dtype == np.int16
    enc = encode_corrections(image, labels, reviewed, 3, Encoding.I3DEEP_REVIEWED)
    np.testing.assert_array_equal(code == 2, enc[1] == 1)
    np.testing.assert_array_equal(code == 3, enc[2] == 1)
    np.testing.assert_array_equal(code > 0, enc[3] == 1)
    # nnU-Net's "outside" label -1 counts as background
    neg = labels.astype(np.int16)
    neg[1, 0, 0] = -1
    assert correction_code(neg, {0: [1]})[1, 0, 0] == 1


def test_sample_training_slices_ranges_and_variety() -> None:
    from models.refinement_training import sample_training_slices

    labels = np.zeros((30, 12, 18), np.uint8)
    labels[10:14, 4:6, 5:9] = 1
    rng = np.random.default_rng(0)
    counts, axes_seen, fg_hits, total = [], set(), 0, 0
    for _ in range(300):
        s = sample_training_slices(labels, rng)
        n = sum(len(v) for v in s.values())
        counts.append(n)
        for axis, idx in s.items():
            axes_seen.add(axis)
            assert idx == sorted(set(idx))
            assert all(0 <= i < labels.shape[axis] for i in idx)
            fg = {0: range(10, 14), 1: range(4, 6), 2: range(5, 9)}[axis]
            fg_hits += sum(i in fg for i in idx)
            total += len(idx)
    k_max = round(np.mean(labels.shape) / 3)
    assert min(counts) == 0 and max(counts) <= k_max and max(counts) >= k_max - 2
    assert axes_seen == {0, 1, 2}
    assert fg_hits / total > 0.4  # p_foreground=0.5 plus chance hits
    assert sample_training_slices(labels, rng, max_fraction=0.0) == {}
    only_axial = sample_training_slices(labels, np.random.default_rng(3), axes=(0,), p_foreground=1.0,
                                        max_fraction=1.0)
    assert set(only_axial) <= {0} and all(10 <= i < 14 for i in only_axial.get(0, []))
    with pytest.raises(ValueError, match="max_fraction"):
        sample_training_slices(labels, rng, max_fraction=2.0)
    with pytest.raises(ValueError, match="axes"):
        sample_training_slices(labels, rng, axes=(3,))


# ----------------------------------------------------------------------------- input layout (format 2)


def test_input_layout_roles_and_dataset_json_roundtrip() -> None:
    from models.refinement import InputLayout, layout_from_dataset_json

    dj = refinement_dataset_json(BASE_JSON, Encoding.I3DEEP_REVIEWED, prior=True, distance=True)
    layout = layout_from_dataset_json(dj)
    assert layout == InputLayout(("background", "organ", "lesion"), 1, True, Encoding.I3DEEP_REVIEWED, True)
    assert layout.channel_roles() == ["image", "prior:organ", "prior:lesion", "organ", "lesion", "reviewed",
                                      "distance:organ", "distance:lesion"]
    assert dj[I3NODE_KEY]["channels"] == layout.channel_roles() and dj[I3NODE_KEY]["format"] == 2
    assert list(dj["channel_names"].values()) == ["CT"] + ["noNorm"] * 7
    assert layout.describe() == "image+prior+i3deep+reviewed+distance"
    # nnU-Net's ignore label (reviewed voxels in training targets) is not a class
    dj["labels"]["ignore"] = 3
    assert layout_from_dataset_json(dj).class_names == ("background", "organ", "lesion")
    # a format-1 model (before prior and distance channels) still loads
    old = refinement_dataset_json(BASE_JSON, Encoding.I3DEEP)
    old[I3NODE_KEY] = {"format": 1, "encoding": "i3deep", "image_channels": 1}
    assert layout_from_dataset_json(old) == InputLayout(("background", "organ", "lesion"), 1, False,
                                                        Encoding.I3DEEP, False)
    # a layout key that does not match the channels is refused, naming them
    bad = dict(dj, **{I3NODE_KEY: {**dj[I3NODE_KEY], "distance": False}})
    with pytest.raises(ValueError, match="distance False"):
        layout_from_dataset_json(bad)


def test_build_input_order_and_distance_channels() -> None:
    from models.refinement import DISTANCE_SCALE_MM, InputLayout, build_input, distance_channels

    image, labels = _tiny()
    layout = InputLayout(("background", "organ", "lesion"), 1, True, Encoding.I3DEEP_REVIEWED, True)
    prior = np.stack([labels == k for k in range(3)]).astype(np.float32)
    reviewed = {0: [1]}
    x = build_input(layout, image, labels, reviewed, prior=prior, spacing=(2.0, 1.0, 1.0))
    assert x.shape == (8, *labels.shape) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], image)
    np.testing.assert_array_equal(x[1:3], prior[1:])
    enc = encode_corrections(image, labels, reviewed, 3, Encoding.I3DEEP_REVIEWED)
    np.testing.assert_array_equal(x[3:6], enc[1:])
    mask = reviewed_mask(labels.shape, reviewed)
    dist = distance_channels(labels, mask, 3, (2.0, 1.0, 1.0))
    np.testing.assert_array_equal(x[6:], dist)
    # 1 on the expert's voxels of the class, exp(-d/scale) elsewhere, 0 without any
    organ_on = mask & (labels == 1)
    assert np.all(dist[0][organ_on] == 1.0)
    assert np.all(dist[0][~organ_on] < 1.0) and dist[0].min() > 0
    one_slice_away = dist[0][0][organ_on[1]]
    np.testing.assert_allclose(one_slice_away, np.exp(-2.0 / DISTANCE_SCALE_MM), rtol=1e-5)
    assert not distance_channels(labels, np.zeros(labels.shape, bool), 3).any()
    with pytest.raises(ValueError, match="prior"):
        build_input(layout, image, labels, reviewed)
    with pytest.raises(ValueError, match="prior"):
        build_input(layout, image, labels, reviewed, prior=prior[:2])
    with pytest.raises(ValueError, match="channel"):
        build_input(layout, np.stack([image, image]), labels, reviewed, prior=prior)


def test_review_simulation_like_the_node() -> None:
    from models.acquisition import select_slices
    from models.refinement_training import (
        ReviewSimulation,
        boundary_uncertainty,
        perturb_prior,
        prior_uncertainty,
        simulate_review,
    )

    labels = np.zeros((20, 24, 24), np.uint8)
    labels[4:16, 5:19, 5:19] = 1
    labels[8:12, 10:14, 10:14] = 2
    u = boundary_uncertainty(labels, 3)
    assert u.shape == labels.shape and 0 <= u.min() and u.max() <= 1
    assert u[0, 0, 0] < 0.01 and u[10, 4, 12] > 0.3  # uncertain at the organ's border, not in the air
    rng = np.random.default_rng(0)
    node_like = ReviewSimulation(p_node=1.0, max_planes=2, p_axis=1.0, min_dist_range=(0.1, 0.1))
    for _ in range(20):
        r = simulate_review(labels, u, rng, node_like)
        for axis, idx in r.items():
            assert 1 <= len(idx) <= 2
            assert set(idx) <= set(select_slices(u, min_dist=0.1, max_slices=2, axes=(axis,))[axis])
    random_only = ReviewSimulation(p_node=0.0)
    counts = [sum(len(v) for v in simulate_review(labels, u, rng, random_only).values()) for _ in range(50)]
    assert min(counts) == 0 and max(counts) > 4
    assert ReviewSimulation.from_json(ReviewSimulation(p_bad_prior=0.3).to_json()).p_bad_prior == 0.3
    with pytest.raises(ValueError, match="max_planes"):
        ReviewSimulation(max_planes=0)
    # damaged priors stay probabilities; a missed class moves to the first
    fg = np.stack([labels == 1, labels == 2]).astype(np.float32)
    seen = set()
    for seed in range(12):
        bad = perturb_prior(fg, np.random.default_rng(seed))
        assert bad.shape == fg.shape and bad.min() >= 0 and bad.sum(axis=0).max() <= 1 + 1e-5
        if not bad[1].any():
            seen.add("missed")
            np.testing.assert_allclose(bad[0], fg[0] + fg[1])
    assert "missed" in seen
    h = prior_uncertainty(fg)
    assert h.max() <= 1 and h[10, 12, 12] == 0
