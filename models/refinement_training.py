"""Training the i3Deep refinement nnU-Net with simulated reviews drawn on the fly.

What the network learns from (design "Refinement input"; papers/000 section 3.1), per sample
and drawn anew on every iteration, before cropping and augmentation:

* the **review** a radiologist would do: with probability ``p_node`` the slices the node itself
  would request (:func:`models.acquisition.select_slices` on the case's uncertainty, 1 to
  ``max_planes`` planes per orientation, a random ``min_dist``), otherwise i3Deep's random draw
  (0 .. ~1/3 of the slices along random axes, :func:`sample_training_slices`). The uncertainty
  is the entropy of the case's prior (the presegmentation ensemble's mean probabilities) when
  the model takes one, else the entropy of the smoothed ground truth (uncertain at borders);
* the corrections = the ground truth on those slices;
* the target = the ground truth everywhere, with the reviewed voxels set to nnU-Net's
  ``ignore`` label when ``ignore_reviewed`` (they are pasted from the expert at inference
  anyway, so the loss spends itself on what must be propagated off the planes).

How it is wired into nnU-Net v2 (2.6+, batchgeneratorsv2 transforms applied per sample inside
``nnUNetDataLoader.generate_train_batch``):

* the raw/preprocessed dataset holds the image channel(s) and, for a model with a prior, the
  prior channels (``noNorm``); the preprocessed folder's ``dataset.json`` and
  ``nnUNetPlans.json`` are then rewritten to the refinement model's (every input channel,
  derived channels ``noNorm`` / ``NoNormalization``, the ``"i3node"`` key, and the ``ignore``
  label), so nnU-Net's own ``determine_num_input_channels`` builds the network with
  ``layout.n_channels`` inputs and the trainer copies the final ``dataset.json``/``plans.json``
  into the results folder;
* ``models.nnunet_trainers.nnUNetTrainer_i3nodeRefine`` wraps its datasets in
  :class:`ReviewSimulatingDataset`, whose ``load_case`` appends the *correction code*
  (0 = not reviewed, ``1 + label`` on reviewed voxels) as a second segmentation channel;
* the code travels through cropping and nnU-Net's default augmentation as a segmentation
  channel (resampled label-wise, flipped with the image, never touched by intensity
  transforms, padding ``-1`` reads as "not reviewed"); intensity transforms act on the image
  channels only (:class:`ImageChannelsOnly`), never on the prior;
* :class:`ReviewToChannels`, inserted just before the deep-supervision downsampling, turns the
  code into the correction (and distance) channels in :class:`models.refinement.InputLayout`
  order and drops it from the target.

After training every checkpoint names ``nnUNetTrainer`` (``finalize_for_inference``), so the
results folder is a standard one that ``nnUNetPredictor`` and
:class:`models.refinement.RefinementModel` load without this module.

Importing this module does not import torch or nnunetv2.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.progress import ProgressCallback, ProgressEvent, emit
from models.refinement import (
    NO_NORM,
    Encoding,
    InputLayout,
    distance_channels,
    layout_from_dataset_json,
    refinement_dataset_json,
    reviewed_mask,
)

__all__ = [
    "TRAINER_SPEC",
    "ImageChannelsOnly",
    "ReviewSimulatingDataset",
    "ReviewToChannels",
    "ReviewSimulation",
    "boundary_uncertainty",
    "correction_code",
    "default_refinement_overrides",
    "perturb_prior",
    "prior_uncertainty",
    "sample_training_slices",
    "simulate_review",
    "train_refinement_model",
]

log = logging.getLogger(__name__)

TRAINER_SPEC = "models.nnunet_trainers:nnUNetTrainer_i3nodeRefine"
"""``module:ClassName`` of the refinement trainer, for ``models.training.train_folds``."""

_DEFAULT_CLASS_NAMES = ("background", "organ", "lesion")


# ---------------------------------------------------------------------------------------------
# simulation (pure numpy)
# ---------------------------------------------------------------------------------------------


def sample_training_slices(
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    max_fraction: float = 1.0 / 3.0,
    p_foreground: float = 0.5,
    axes: Sequence[int] = (0, 1, 2),
) -> dict[int, list[int]]:
    """i3Deep's random review: ``k`` ground-truth slices along random axes.

    Parameters
    ----------
    labels : np.ndarray
        Ground truth ``(z, y, x)`` (values < 0, nnU-Net's "outside", count as background).
    rng : np.random.Generator
        Random source.
    max_fraction : float, optional
        ``k`` (number of slices) is uniform in ``0 .. round(max_fraction * mean(shape[axes]))``.
    p_foreground : float, optional
        Probability that a slice is drawn among the slices holding one foreground class (chosen
        uniformly among the classes present, so small structures such as lesions are corrected
        as often as large organs); otherwise uniformly among all slices.
    axes : sequence of int, optional
        Axes a slice may be drawn along (each slice picks one uniformly).

    Returns
    -------
    dict of int to list of int
        Axis -> sorted unique slice indices (axes without slices are omitted).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (z, y, x), got shape {labels.shape}")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction!r}")
    if not 0.0 <= p_foreground <= 1.0:
        raise ValueError(f"p_foreground must be in [0, 1], got {p_foreground!r}")
    axes = [int(a) for a in axes]
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {axes!r}")
    k_max = int(round(max_fraction * float(np.mean([labels.shape[a] for a in axes]))))
    k = int(rng.integers(0, k_max + 1))
    out: dict[int, set[int]] = {}
    classes: np.ndarray | None = None
    class_slices: dict[tuple[int, int], np.ndarray] = {}
    for _ in range(k):
        axis = axes[int(rng.integers(len(axes)))]
        idx: int | None = None
        if p_foreground > 0 and rng.random() < p_foreground:
            if classes is None:
                classes = np.unique(labels[labels > 0])
            if len(classes):
                cls = int(classes[rng.integers(len(classes))])
                if (cls, axis) not in class_slices:
                    other = tuple(a for a in range(3) if a != axis)
                    class_slices[(cls, axis)] = np.flatnonzero((labels == cls).any(axis=other))
                cand = class_slices[(cls, axis)]
                idx = int(cand[rng.integers(len(cand))])
        if idx is None:
            idx = int(rng.integers(labels.shape[axis]))
        out.setdefault(axis, set()).add(idx)
    return {a: sorted(v) for a, v in sorted(out.items())}


def prior_uncertainty(prior_fg: np.ndarray) -> np.ndarray:
    """Normalised entropy of a prior given by its foreground-class probabilities.

    Parameters
    ----------
    prior_fg : np.ndarray
        ``(C - 1, z, y, x)`` probabilities of the foreground classes (background = the rest).

    Returns
    -------
    np.ndarray
        float32 ``(z, y, x)`` in ``[0, 1]`` (entropy / log C).
    """
    fg = np.clip(np.asarray(prior_fg, dtype=np.float32), 0.0, 1.0)
    if fg.ndim != 4:
        raise ValueError(f"prior_fg must be (C-1, z, y, x), got shape {fg.shape}")
    bg = np.clip(1.0 - fg.sum(axis=0, keepdims=True), 0.0, 1.0)
    p = np.concatenate([bg, fg], axis=0)
    p /= np.maximum(p.sum(axis=0, keepdims=True), 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=0)
    return (h / np.log(p.shape[0])).astype(np.float32)


def boundary_uncertainty(labels: np.ndarray, n_classes: int, sigma: float = 1.5) -> np.ndarray:
    """Stand-in uncertainty for cases without a prior: entropy of the Gaussian-smoothed truth.

    High at class borders, zero inside homogeneous regions - where an ensemble disagrees.
    """
    from scipy import ndimage

    lab = np.maximum(np.asarray(labels), 0)
    fg = np.stack([ndimage.gaussian_filter((lab == k).astype(np.float32), sigma) for k in range(1, n_classes)])
    return prior_uncertainty(fg)


def perturb_prior(prior_fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A presegmentation that went wrong, for training robustness (one random failure mode).

    * a foreground class other than the first is missed (its probability handed to the first
      class, or to background when it is the only class) - a lesion the ensemble did not see;
    * one class is blurred (``sigma`` 1-3 voxels) - a vague, misplaced border;
    * the whole prior is damped towards uniform - an unsure ensemble.

    Parameters
    ----------
    prior_fg : np.ndarray
        ``(C - 1, z, y, x)`` foreground-class probabilities.
    rng : np.random.Generator
        Random source.

    Returns
    -------
    np.ndarray
        float32 array of the same shape, still a valid set of probabilities (sum <= 1).
    """
    from scipy import ndimage

    fg = np.array(prior_fg, dtype=np.float32, copy=True)
    n_fg = fg.shape[0]
    mode = int(rng.integers(3))
    if mode == 0:
        k = int(rng.integers(n_fg))
        if n_fg > 1 and k == 0:
            k = int(rng.integers(1, n_fg))
        if k > 0:
            fg[0] += fg[k]
        fg[k] = 0.0
    elif mode == 1:
        k = int(rng.integers(n_fg))
        fg[k] = ndimage.gaussian_filter(fg[k], float(rng.uniform(1.0, 3.0)))
    else:
        w = float(rng.uniform(0.3, 0.7))
        fg = (1.0 - w) * fg + w / (n_fg + 1)
    total = fg.sum(axis=0, keepdims=True)
    return np.where(total > 1.0, fg / np.maximum(total, 1e-6), fg).astype(np.float32)


def simulate_review(
    labels: np.ndarray,
    uncertainty: np.ndarray,
    rng: np.random.Generator,
    sim: ReviewSimulation,
) -> dict[int, list[int]]:
    """Draw the slices a simulated radiologist reviews for one training sample.

    Parameters
    ----------
    labels : np.ndarray
        Ground truth ``(z, y, x)``.
    uncertainty : np.ndarray
        Voxel uncertainty of the same shape (what the node selects on).
    rng : np.random.Generator
        Random source.
    sim : ReviewSimulation
        Probabilities and ranges.

    Returns
    -------
    dict of int to list of int
        Axis -> sorted slice indices.
    """
    from models.acquisition import select_slices

    labels = np.asarray(labels)
    if rng.random() < sim.p_node:
        axes = [a for a in range(3) if rng.random() < sim.p_axis] or [int(rng.integers(3))]
        planes = int(rng.integers(1, sim.max_planes + 1))
        min_dist = float(rng.uniform(*sim.min_dist_range))
        chosen = select_slices(uncertainty, min_dist=min_dist, min_uncert=0.1, max_slices=planes, axes=axes)
        out = {a: sorted(v) for a, v in chosen.items() if v}
        if out:
            return out
    return sample_training_slices(labels, rng, max_fraction=sim.max_fraction, p_foreground=sim.p_foreground)


def correction_code(labels: np.ndarray, reviewed: Mapping[int, Sequence[int]] | np.ndarray) -> np.ndarray:
    """Compact correction volume: 0 off the reviewed slices, ``1 + label`` on them.

    Parameters
    ----------
    labels : np.ndarray
        Ground truth ``(z, y, x)``; negative values count as background.
    reviewed : mapping or np.ndarray
        Reviewed slices (axis -> indices) or boolean mask.

    Returns
    -------
    np.ndarray
        int16 ``(z, y, x)``.
    """
    labels = np.asarray(labels)
    mask = reviewed_mask(labels.shape, reviewed)
    code = np.zeros(labels.shape, dtype=np.int16)
    code[mask] = np.maximum(labels[mask], 0).astype(np.int16) + 1
    return code


class ReviewSimulation:
    """How training reviews are drawn (see :func:`simulate_review`).

    Parameters
    ----------
    p_node : float
        Probability of the node's own selection (otherwise i3Deep's random slices).
    max_planes : int
        The node-like selection asks for 1 .. ``max_planes`` planes per orientation.
    p_axis : float
        Probability that each orientation takes part in a node-like review.
    min_dist_range : (float, float)
        Range of the node-like selection's ``min_dist``.
    max_fraction, p_foreground : float
        i3Deep's random review, see :func:`sample_training_slices`.
    p_bad_prior : float
        Probability that a sample's prior is damaged first (:func:`perturb_prior`), so the
        network learns to follow the corrections where the presegmentation is wrong.
    """

    def __init__(self, p_node: float = 0.75, max_planes: int = 4, p_axis: float = 0.85,
                 min_dist_range: tuple[float, float] = (0.03, 0.15), max_fraction: float = 1.0 / 3.0,
                 p_foreground: float = 0.5, p_bad_prior: float = 0.0) -> None:
        if not 0.0 <= p_node <= 1.0 or not 0.0 < p_axis <= 1.0:
            raise ValueError(f"p_node must be in [0, 1] and p_axis in (0, 1], got {p_node!r}, {p_axis!r}")
        if int(max_planes) < 1:
            raise ValueError(f"max_planes must be >= 1, got {max_planes!r}")
        lo, hi = (float(v) for v in min_dist_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"min_dist_range must be (low, high) within [0, 1], got {min_dist_range!r}")
        self.p_node = float(p_node)
        self.max_planes = int(max_planes)
        self.p_axis = float(p_axis)
        self.min_dist_range = (lo, hi)
        self.max_fraction = float(max_fraction)
        self.p_foreground = float(p_foreground)
        if not 0.0 <= p_bad_prior <= 1.0:
            raise ValueError(f"p_bad_prior must be in [0, 1], got {p_bad_prior!r}")
        self.p_bad_prior = float(p_bad_prior)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (trainer options)."""
        return {"p_node": self.p_node, "max_planes": self.max_planes, "p_axis": self.p_axis,
                "min_dist_range": list(self.min_dist_range), "max_fraction": self.max_fraction,
                "p_foreground": self.p_foreground, "p_bad_prior": self.p_bad_prior}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReviewSimulation:
        """Inverse of :meth:`to_json`."""
        return cls(float(d["p_node"]), int(d["max_planes"]), float(d["p_axis"]),
                   tuple(d["min_dist_range"]), float(d["max_fraction"]), float(d["p_foreground"]),  # type: ignore[arg-type]
                   float(d.get("p_bad_prior", 0.0)))


class ReviewSimulatingDataset:
    """Wraps an nnU-Net dataset; ``load_case`` appends a freshly drawn correction code to ``seg``.

    Parameters
    ----------
    base : nnUNetBaseDataset
        The dataset to wrap (anything with ``identifiers`` and ``load_case``).
    layout : InputLayout
        The model's input layout (the preprocessed data holds its image and prior channels).
    sim : ReviewSimulation
        How reviews are drawn.
    annotated_key : tuple of int, optional
        nnU-Net's ``annotated_classes_key`` when the targets use the ``ignore`` label: the
        data loader looks up sampling locations under it, which preprocessing of the
        ignore-free raw data did not compute.

    Notes
    -----
    Randomness comes from numpy's global generator (what nnU-Net's own sampling uses, seeded
    per fold and per augmentation worker), so runs are reproducible under the same seed.
    """

    def __init__(self, base: Any, layout: InputLayout, sim: ReviewSimulation,
                 annotated_key: tuple[int, ...] | None = None) -> None:
        self._base = base
        self.identifiers = base.identifiers
        self.layout = layout
        self.sim = sim
        self.annotated_key = annotated_key

    def __getattr__(self, name: str) -> Any:
        if name == "_base":  # during unpickling, before __init__ state exists
            raise AttributeError(name)
        return getattr(self._base, name)

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str) -> tuple[Any, np.ndarray, Any, dict[str, Any]]:
        """``(data, seg with the code as channel 1, seg_prev, properties)``."""
        data, seg, seg_prev, properties = self._base.load_case(identifier)
        seg_np = np.asarray(seg[:])
        labels = seg_np[0]
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        n_img = self.layout.image_channels
        if self.layout.prior:
            n_fg = self.layout.n_classes - 1
            prior_fg = np.asarray(data[n_img:n_img + n_fg])
            if self.sim.p_bad_prior > 0 and rng.random() < self.sim.p_bad_prior:
                prior_fg = perturb_prior(prior_fg, rng)
                data = np.concatenate([np.asarray(data[:n_img]), prior_fg, np.asarray(data[n_img + n_fg:])], axis=0)
            uncertainty = prior_uncertainty(prior_fg)
        else:
            uncertainty = boundary_uncertainty(labels, self.layout.n_classes)
        review = simulate_review(labels, uncertainty, rng, self.sim)
        code = correction_code(labels, review)
        seg_out = np.concatenate([seg_np.astype(np.int16, copy=False), code[None]], axis=0)
        if self.annotated_key is not None:
            locations = dict(properties.get("class_locations") or {})
            if self.annotated_key not in locations:
                every = np.argwhere(labels >= 0)
                pick = every[rng.choice(len(every), size=min(len(every), 10000), replace=False)]
                locations[self.annotated_key] = np.concatenate([np.zeros((len(pick), 1), pick.dtype), pick], axis=1)
            properties = {**properties, "class_locations": locations}
        return data, seg_out, seg_prev, properties


class ReviewToChannels:
    """batchgeneratorsv2-style transform: the code (segmentation channel 1) -> input channels.

    Called as ``t(**data_dict)`` like every transform in nnU-Net's ``ComposeTransforms``. The
    image arrives as the image channels (+ prior channels); it leaves with every channel of
    ``layout`` in order. The code channel is removed from the target; with ``ignore_label``
    the reviewed voxels of the target take that label.

    Parameters
    ----------
    layout : InputLayout
        The model's input layout.
    spacing : sequence of float
        Voxel spacing of the training patches (the plans' target spacing), for distances.
    ignore_label : int, optional
        Target label of reviewed voxels (nnU-Net's ``ignore``); ``None`` keeps the truth.
    code_channel : int, optional
        Index of the code in the segmentation's channel axis.
    """

    def __init__(self, layout: InputLayout, spacing: Sequence[float], ignore_label: int | None = None,
                 code_channel: int = 1) -> None:
        self.layout = layout
        self.spacing = tuple(float(s) for s in spacing)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.code_channel = int(code_channel)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        import torch

        seg = data_dict["segmentation"]
        image = data_dict["image"]
        code = seg[self.code_channel]
        n = self.layout.n_classes
        channels = [code == (k + 1) for k in range(1, n)]
        if self.layout.encoding is Encoding.I3DEEP_REVIEWED:
            channels.append(code > 0)
        parts = [image, torch.stack(channels).to(image.dtype)]
        if self.layout.distance:
            code_np = code.numpy()
            dist = distance_channels(np.maximum(code_np - 1, 0), code_np > 0, n, self.spacing)
            parts.append(torch.from_numpy(dist).to(image.dtype))
        data_dict["image"] = torch.cat(parts, dim=0)
        keep = [c for c in range(seg.shape[0]) if c != self.code_channel]
        target = seg[keep].clone()
        if self.ignore_label is not None:
            target[0][code > 0] = self.ignore_label
        data_dict["segmentation"] = target
        return data_dict

    def __repr__(self) -> str:
        return f"ReviewToChannels({self.layout.describe()}, ignore_label={self.ignore_label})"


class ImageChannelsOnly:
    """Apply a batchgeneratorsv2 transform to the first ``n`` image channels only.

    Intensity augmentation (noise, blur, brightness, contrast, gamma, low resolution) must
    change the image, never the prior probabilities next to it.
    """

    def __init__(self, transform: Any, n: int) -> None:
        self.transform = transform
        self.n = int(n)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        import torch

        image = data_dict["image"]
        if image.shape[0] <= self.n:
            return self.transform(**data_dict)  # type: ignore[no-any-return]
        head, tail = image[: self.n], image[self.n:]
        out = self.transform(**{**data_dict, "image": head})
        out["image"] = torch.cat([out["image"], tail], dim=0)
        return out  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"ImageChannelsOnly({self.transform!r}, n={self.n})"


# ---------------------------------------------------------------------------------------------
# one call
# ---------------------------------------------------------------------------------------------


def default_refinement_overrides(shape: Sequence[int] | None = None) -> Any:
    """CPU-sized network; the patch covers ``shape`` (the whole demo volume) when given.

    A patch that holds the whole volume shows every corrected plane to every output voxel and
    needs a single sliding-window tile at inference.
    """
    from models.training import NetworkOverrides

    patch = tuple(int(s) for s in shape) if shape is not None else (32, 48, 48)
    return NetworkOverrides(patch_size=patch, features_per_stage=(8, 16, 32, 64), batch_size=2)  # type: ignore[arg-type]


def _as_cases(
    cases: Sequence[Any],
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[float, float, float]], tuple[str, ...] | None]:
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    spacings: list[tuple[float, float, float]] = []
    names: tuple[str, ...] | None = None
    for i, case in enumerate(cases):
        if hasattr(case, "image") and hasattr(case, "labels") and hasattr(case, "spacing"):
            img, lab, sp = case.image, case.labels, case.spacing
            if names is None and getattr(case, "class_names", None) is not None:
                names = tuple(str(n) for n in case.class_names)
        elif isinstance(case, (tuple, list)) and len(case) == 3:
            img, lab, sp = case
        else:
            raise ValueError(
                f"phantoms_or_arrays[{i}] must have image/labels/spacing attributes or be an "
                f"(image, labels, spacing) tuple"
            )
        img = np.asarray(img, dtype=np.float32)
        lab = np.asarray(lab)
        if img.ndim not in (3, 4) or lab.ndim != 3 or img.shape[-3:] != lab.shape:
            raise ValueError(
                f"phantoms_or_arrays[{i}]: image {img.shape} and labels {lab.shape} must be "
                f"(z, y, x)/(c, z, y, x) and (z, y, x) of the same size"
            )
        if not np.issubdtype(lab.dtype, np.integer) or (lab.size and lab.min() < 0):
            raise ValueError(f"phantoms_or_arrays[{i}]: labels must be non-negative integers")
        sp_t = tuple(float(s) for s in sp)
        if len(sp_t) != 3 or min(sp_t) <= 0:
            raise ValueError(f"phantoms_or_arrays[{i}]: spacing must be 3 positive numbers, got {sp!r}")
        images.append(img)
        labels.append(lab)
        spacings.append(sp_t)  # type: ignore[arg-type]
    return images, labels, spacings, names


def _rewrite_preprocessed_for_refinement(pre_dir: Path, plans_identifier: str, layout: InputLayout,
                                         ignore_reviewed: bool) -> dict[str, Any]:
    """Turn the preprocessed dataset.json/plans (image + prior channels) into the refinement model's."""
    ds_path = pre_dir / "dataset.json"
    plans_path = pre_dir / f"{plans_identifier}.json"
    base = json.loads(ds_path.read_text())
    dj = refinement_dataset_json(base, layout.encoding, n_image_channels=layout.image_channels,
                                 prior=layout.prior, distance=layout.distance)
    if ignore_reviewed:
        dj["labels"]["ignore"] = layout.n_classes
    n_img = layout.image_channels
    n_derived = layout.n_derived_channels
    plans = json.loads(plans_path.read_text())
    for cfg in plans["configurations"].values():
        if "normalization_schemes" in cfg:
            cfg["normalization_schemes"] = list(cfg["normalization_schemes"])[:n_img] + ["NoNormalization"] * n_derived
        if "use_mask_for_norm" in cfg:
            cfg["use_mask_for_norm"] = list(cfg["use_mask_for_norm"])[:n_img] + [False] * n_derived
    # nnU-Net's preprocessor looks up intensity properties for every channel (NoNormalization
    # ignores them): give the [0, 1] derived channels their true ones.
    props = plans.setdefault("foreground_intensity_properties_per_channel", {})
    for c in range(n_img, n_img + n_derived):
        props[str(c)] = {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0,
                         "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 0.5}
    ds_path.write_text(json.dumps(dj, indent=2))
    plans_path.write_text(json.dumps(plans, indent=2))
    return dj


def _write_split(pre_dir: Path, all_cases: bool, fold_ids: Sequence[int], n_cases: int, seed: int) -> None:
    """``splits_final.json``: one split training and validating on every case (nnU-Net's fold
    "all", stored as fold 0), or seeded cross-validation splits covering ``fold_ids``."""
    from models.training import write_splits

    if all_cases:
        ids = sorted(p.name[: -len(".nii.gz")] for p in (pre_dir / "gt_segmentations").glob("*.nii.gz"))
        (pre_dir / "splits_final.json").write_text(json.dumps([{"train": ids, "val": ids}], indent=2))
        return
    n_splits = max(3, max(fold_ids) + 1)
    if n_cases < n_splits:
        raise ValueError(f"folds: {n_splits} splits need at least {n_splits} cases, got {n_cases}")
    write_splits(pre_dir, n_splits, seed=12345 + seed)


def train_refinement_model(
    phantoms_or_arrays: Sequence[Any],
    out_dir: str | Path,
    *,
    priors: Sequence[np.ndarray] | None = None,
    encoding: Encoding = Encoding.I3DEEP_REVIEWED,
    distance: bool = True,
    ignore_reviewed: bool = True,
    simulation: ReviewSimulation | None = None,
    folds: Sequence[int] | Literal["all"] = "all",
    epochs: int = 20,
    iterations_per_epoch: int = 20,
    val_iterations: int = 1,
    progress: ProgressCallback | None = None,
    device: str | None = None,
    class_names: Sequence[str] | None = None,
    channel_names: Sequence[str] = ("CT",),
    overrides: Any = None,
    dataset_id: int = 991,
    name: str = "i3nodeRefine",
    seed: int = 0,
    keep_intermediate: bool = False,
    num_processes: int = 2,
    isolate: bool = True,
    trainer_options: Mapping[str, Any] | None = None,
    plans_from: Path | None = None,
) -> Path:
    """Train a refinement nnU-Net on labelled volumes; return its results folder.

    Parameters
    ----------
    phantoms_or_arrays : sequence
        ``models.phantoms.Phantom``-like objects (``image``, ``labels``, ``spacing``) or
        ``(image, labels, spacing)`` tuples; image ``(z, y, x)`` or ``(c, z, y, x)``.
    out_dir : str or Path
        Work folder; gets ``nnUNet_raw``, ``nnUNet_preprocessed`` (deleted afterwards unless
        ``keep_intermediate``) and ``nnUNet_results``.
    priors : sequence of np.ndarray, optional
        One ``(C, z, y, x)`` array per case: the presegmentation ensemble's mean probabilities
        on it, as the node computes them at inference (on cases the ensemble was not trained
        on). Given: the model takes prior channels (``InputLayout.prior``).
    encoding : Encoding, optional
        Correction encoding the model learns (default ``I3DEEP_REVIEWED``).
    distance : bool, optional
        Add the distance channels (``InputLayout.distance``).
    ignore_reviewed : bool, optional
        Reviewed voxels are nnU-Net ``ignore`` in the target (the loss is spent off the planes).
    simulation : ReviewSimulation, optional
        How reviews are drawn; default :class:`ReviewSimulation` ``()``.
    folds : sequence of int or "all", optional
        ``"all"`` (default) trains one model on every case (stored as ``fold_0`` with a
        single train=val split); otherwise those cross-validation folds (3 splits at least).
    epochs, iterations_per_epoch, val_iterations : int, optional
        Schedule (default 20 x 20 iterations, CPU-sized; use hundreds of epochs on a GPU).
    progress : callable, optional
        Receives ``models.progress.ProgressEvent`` objects.
    device : str, optional
        Training device; default CUDA when available, else CPU.
    class_names : sequence of str, optional
        Label names by value; default the cases' ``class_names`` or
        ``("background", "organ", "lesion")``.
    channel_names : sequence of str, optional
        Image channel names (nnU-Net normalisation keys), default ``("CT",)``.
    overrides : models.training.NetworkOverrides, optional
        Network/patch size; default :func:`default_refinement_overrides` (patch = the first
        case's shape when every case has the same shape).
    dataset_id, name : optional
        nnU-Net dataset id and name (``Dataset991_i3nodeRefine``).
    seed : int, optional
        Training seed.
    keep_intermediate : bool, optional
        Keep the raw and preprocessed datasets.
    num_processes : int, optional
        Workers for fingerprinting/preprocessing.
    isolate : bool, optional
        Plan and train in child processes (see ``models.training``).
    trainer_options : mapping, optional
        Further trainer attributes (e.g. ``{"initial_lr": 0.03}``).
    plans_from : Path, optional
        Reuse this results folder's plans (e.g. the presegmentation ensemble's: the same CT
        normalisation and spacing, and no fingerprinting) instead of planning the dataset.

    Returns
    -------
    Path
        ``out_dir/nnUNet_results/Dataset991_i3nodeRefine/nnUNetTrainer_i3nodeRefine__nnUNetPlans__3d_fullres``:
        a standard nnU-Net results folder (checkpoints name ``nnUNetTrainer``; ``dataset.json``
        lists every input channel and carries the ``"i3node"`` layout key), loadable by
        :class:`models.refinement.RefinementModel`.

    Raises
    ------
    ValueError
        On invalid arguments.
    models.training.TrainingError
        When planning, preprocessing or training fails.
    """
    from models.training import dataset_name, plan_and_preprocess, train_folds, write_raw_dataset

    encoding = Encoding(encoding)
    images, labels, spacings, case_names = _as_cases(phantoms_or_arrays)
    if len(images) < 2:
        raise ValueError(f"phantoms_or_arrays: need at least 2 cases, got {len(images)}")
    names = _class_names(class_names, case_names, labels)
    n_img = images[0].shape[0] if images[0].ndim == 4 else 1
    if len(channel_names) != n_img:
        raise ValueError(f"channel_names: {len(channel_names)} name(s) for {n_img} image channel(s)")
    if any(str(c).casefold() == NO_NORM.casefold() for c in channel_names):
        log.warning("image channel named %r: the layout is then read from the 'i3node' key only", NO_NORM)
    layout = InputLayout(names, n_img, priors is not None, encoding, bool(distance))
    raw_images = images if priors is None else _with_priors(images, labels, priors, len(names))
    fold_ids = _fold_ids(folds)
    if epochs < 1 or iterations_per_epoch < 1 or val_iterations < 1:
        raise ValueError("epochs, iterations_per_epoch and val_iterations must be >= 1")
    if overrides is None:
        shapes = {lab.shape for lab in labels}
        overrides = default_refinement_overrides(shapes.pop() if len(shapes) == 1 else None)
    sim = simulation or ReviewSimulation()

    out_dir = Path(out_dir)
    raw, pre, res = out_dir / "nnUNet_raw", out_dir / "nnUNet_preprocessed", out_dir / "nnUNet_results"
    t0 = time.perf_counter()
    labels_map = {("background" if i == 0 else str(n)): i for i, n in enumerate(names)}
    raw_channels: dict[int | str, str] = {i: str(c) for i, c in enumerate(channel_names)}
    raw_channels.update({n_img + k: NO_NORM for k in range(len(names) - 1 if layout.prior else 0)})
    write_raw_dataset(raw, dataset_id, name, raw_images, labels, spacings, raw_channels, labels_map)
    plan_and_preprocess(dataset_id, raw_root=raw, preprocessed_root=pre, overrides=overrides,
                        num_processes=num_processes, isolate=isolate, progress=progress, plans_from=plans_from)
    pre_dir = pre / dataset_name(dataset_id, name)
    _rewrite_preprocessed_for_refinement(pre_dir, "nnUNetPlans", layout, ignore_reviewed)
    _write_split(pre_dir, folds == "all", fold_ids, len(images), seed)
    t_train = time.perf_counter()
    options = {"review_simulation": sim.to_json(), **dict(trainer_options or {})}
    model_dir = train_folds(
        dataset_id, fold_ids, preprocessed_root=pre, results_root=res, epochs=epochs,
        iterations_per_epoch=iterations_per_epoch, val_iterations=val_iterations,
        trainer_cls=TRAINER_SPEC, trainer_options=options, device=device, seed=seed, isolate=isolate,
        progress=progress)
    train_s = time.perf_counter() - t_train
    _check_results_folder(model_dir, layout)
    if not keep_intermediate:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(pre, ignore_errors=True)
    total_s = time.perf_counter() - t0
    emit(progress, ProgressEvent("done", f"refinement model ({layout.describe()}) in {model_dir}", 1.0,
                                 {"seconds": total_s, "train_seconds": train_s}), log)
    return Path(model_dir)


def _class_names(class_names: Sequence[str] | None, case_names: Sequence[str] | None,
                 labels: Sequence[np.ndarray]) -> tuple[str, ...]:
    """Label names by value (given, the cases', or the default), checked against the labels."""
    names = tuple(class_names) if class_names is not None else tuple(case_names or _DEFAULT_CLASS_NAMES)
    if len(names) < 2:
        raise ValueError(f"class_names: need background and at least one class, got {names!r}")
    max_label = max(int(lab.max()) for lab in labels)
    if max_label >= len(names):
        raise ValueError(f"labels go up to {max_label} but class_names has only {len(names)} entries")
    return names


def _with_priors(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], priors: Sequence[np.ndarray],
                 n_classes: int) -> list[np.ndarray]:
    """Images with the foreground prior channels appended (``(c + C - 1, z, y, x)`` each)."""
    if len(priors) != len(images):
        raise ValueError(f"priors: expected {len(images)} arrays (one per case), got {len(priors)}")
    out = []
    for i, (img, pr) in enumerate(zip(images, priors, strict=True)):
        pr = np.asarray(pr, dtype=np.float32)
        if pr.shape != (n_classes, *labels[i].shape):
            raise ValueError(f"priors[{i}]: expected shape {(n_classes, *labels[i].shape)}, got {pr.shape}")
        img4 = img if img.ndim == 4 else img[None]
        out.append(np.concatenate([img4, pr[1:]], axis=0))
    return out


def _fold_ids(folds: Sequence[int] | Literal["all"]) -> list[int]:
    """``"all"`` is fold 0 trained on every case; otherwise the listed cross-validation folds."""
    if folds == "all":
        return [0]
    if isinstance(folds, str):
        raise ValueError(f"folds must be 'all' or a sequence of fold numbers, got {folds!r}")
    fold_ids = [int(f) for f in folds]
    if not fold_ids or min(fold_ids) < 0:
        raise ValueError(f"folds must be 'all' or non-negative fold numbers, got {folds!r}")
    return fold_ids


def _check_results_folder(model_dir: Path, layout: InputLayout) -> None:
    """Verify the results folder describes the refinement input (raises TrainingError)."""
    from models.training import TrainingError

    try:
        dj = json.loads((model_dir / "dataset.json").read_text())
        plans = json.loads((model_dir / "plans.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"refinement results folder {model_dir} is incomplete: {exc}") from exc
    if layout_from_dataset_json(dj) != layout:
        raise TrainingError(f"{model_dir}/dataset.json does not declare the layout {layout.describe()!r}")
    for cname, cfg in plans["configurations"].items():
        schemes = cfg.get("normalization_schemes")
        if schemes is not None and len(schemes) != len(dj["channel_names"]):
            raise TrainingError(f"{model_dir}/plans.json configuration {cname!r} normalises {len(schemes)} "
                                f"channel(s), dataset.json lists {len(dj['channel_names'])}")
    if not any(model_dir.glob("fold_*/checkpoint_final.pth")):
        raise TrainingError(f"{model_dir} holds no fold_*/checkpoint_final.pth")
