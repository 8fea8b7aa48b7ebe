"""Training the i3Deep refinement nnU-Net with simulated corrections drawn on the fly.

Training simulation (design "Refinement input"; papers/000 section 3.1): for every sample of
every iteration, a random number ``k`` of ground-truth slices, ``0 <= k <= K`` with
``K = round(max_fraction * mean(shape))`` (``max_fraction`` = 1/3), each along a random axis,
is drawn anew from the full (preprocessed) case *before* cropping and augmentation; the
correction channels are built from the ground truth on those slices.

How it is wired into nnU-Net v2 (2.6+, batchgeneratorsv2 transforms applied per sample inside
``nnUNetDataLoader.generate_train_batch``):

* the raw/preprocessed dataset holds only the image channel(s); the preprocessed folder's
  ``dataset.json`` and ``nnUNetPlans.json`` are then rewritten to the refinement model's
  (all channels, correction channels ``noNorm`` / ``NoNormalization``, ``"i3node"`` key), so
  nnU-Net's own ``determine_num_input_channels`` builds the network with
  ``image channels + correction channels`` inputs and the trainer copies the final
  ``dataset.json``/``plans.json`` into the results folder;
* :class:`nnUNetTrainer_i3nodeRefine` (a subclass of
  ``models.nnunet_trainers.nnUNetTrainer_i3nodeTiny``) wraps its training and validation
  datasets so that ``load_case`` returns the segmentation with a second channel, the
  *correction code* (0 = not reviewed, ``1 + label`` on reviewed voxels), drawn anew on every
  call;
* the code channel travels through cropping and nnU-Net's default augmentation as a
  segmentation channel: spatial transforms resample it label-wise (no smoothing, values stay
  discrete), mirroring flips it with the image, intensity transforms never touch it, padding
  (``-1`` -> 0) reads as "not reviewed";
* a final transform, inserted just before the deep-supervision downsampling, turns the code
  into the binary correction channels (one per foreground class, plus ``reviewed`` for
  :attr:`~models.refinement.Encoding.I3DEEP_REVIEWED`), appends them to the image and drops
  the code from the target. The correction channels the network sees are therefore exactly
  binary, also after rotation/scaling.

After training, every checkpoint names ``nnUNetTrainer`` (``finalize_for_inference``), so the
results folder is a standard one that ``nnUNetPredictor`` and
:class:`models.refinement.RefinementModel` load without this module.

Importing this module does not import torch or nnunetv2; the trainer class is created on
first access (``models.refinement_training.nnUNetTrainer_i3nodeRefine``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.refinement import (
    NO_NORM,
    Encoding,
    encoding_from_dataset_json,
    refinement_dataset_json,
    reviewed_mask,
)

__all__ = [
    "TRAINER_SPEC",
    "CorrectionCodeToChannels",
    "CorrectionSimulatingDataset",
    "correction_code",
    "default_refinement_overrides",
    "sample_training_slices",
    "train_refinement_model",
]

_log = logging.getLogger("models.refinement_training")

TRAINER_NAME = "nnUNetTrainer_i3nodeRefine"
TRAINER_SPEC = f"{__name__}:{TRAINER_NAME}"
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
    """Draw the slices a simulated expert corrects for one training sample.

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
        as often as large organs - as uncertainty-driven selection does); otherwise uniformly
        among all slices.
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


class CorrectionSimulatingDataset:
    """Wraps an nnU-Net dataset; ``load_case`` appends a freshly drawn correction code to ``seg``.

    Parameters
    ----------
    base : nnUNetBaseDataset
        The dataset to wrap (anything with ``identifiers`` and ``load_case``).
    max_fraction, p_foreground : float
        See :func:`sample_training_slices`.

    Notes
    -----
    Randomness comes from numpy's global generator (what nnU-Net's own sampling uses, seeded
    per fold and per augmentation worker), so runs are reproducible under the same seed.
    """

    def __init__(self, base: Any, max_fraction: float, p_foreground: float) -> None:
        self._base = base
        self.identifiers = base.identifiers
        self.max_fraction = float(max_fraction)
        self.p_foreground = float(p_foreground)

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
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        slices = sample_training_slices(seg_np[0], rng, max_fraction=self.max_fraction,
                                        p_foreground=self.p_foreground)
        code = correction_code(seg_np[0], slices)
        seg_out = np.concatenate([seg_np.astype(np.int16, copy=False), code[None]], axis=0)
        return data, seg_out, seg_prev, properties


class CorrectionCodeToChannels:
    """batchgeneratorsv2-style transform: segmentation channel 1 (code) -> correction channels.

    Called as ``t(**data_dict)`` like every transform in nnU-Net's ``ComposeTransforms``.

    Parameters
    ----------
    n_classes : int
        Number of classes including background.
    encoding : Encoding
        Correction encoding (adds the ``reviewed`` channel for ``I3DEEP_REVIEWED``).
    code_channel : int, optional
        Index of the code in the segmentation's channel axis (removed from the target).
    """

    def __init__(self, n_classes: int, encoding: Encoding, code_channel: int = 1) -> None:
        self.n_classes = int(n_classes)
        self.encoding = Encoding(encoding)
        self.code_channel = int(code_channel)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        import torch

        seg = data_dict["segmentation"]
        image = data_dict["image"]
        code = seg[self.code_channel]
        channels = [code == (k + 1) for k in range(1, self.n_classes)]
        if self.encoding is Encoding.I3DEEP_REVIEWED:
            channels.append(code > 0)
        extra = torch.stack(channels).to(image.dtype)
        data_dict["image"] = torch.cat((image, extra), dim=0)
        keep = [c for c in range(seg.shape[0]) if c != self.code_channel]
        data_dict["segmentation"] = seg[keep]
        return data_dict

    def __repr__(self) -> str:
        return f"CorrectionCodeToChannels(n_classes={self.n_classes}, encoding={self.encoding.value!r})"


# ---------------------------------------------------------------------------------------------
# the trainer (created lazily: torch/nnunetv2 are imported only when it is first needed)
# ---------------------------------------------------------------------------------------------

_TRAINER_CACHE: dict[str, type] = {}


def _insert_before_ds(compose: Any, transform: Any) -> Any:
    """Insert ``transform`` before nnU-Net's DownsampleSegForDSTransform (or append)."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    transforms = list(compose.transforms)
    pos = next((i for i, t in enumerate(transforms) if isinstance(t, DownsampleSegForDSTransform)), len(transforms))
    transforms.insert(pos, transform)
    compose.transforms = transforms
    return compose


def _build_trainer_class() -> type:
    if TRAINER_NAME in _TRAINER_CACHE:
        return _TRAINER_CACHE[TRAINER_NAME]
    import torch

    base_cls: type
    try:
        from models.nnunet_trainers import nnUNetTrainer_i3nodeTiny

        base_cls = nnUNetTrainer_i3nodeTiny
    except ImportError:  # pragma: no cover - the tiny trainer ships with this repository
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        base_cls = nnUNetTrainer

    class nnUNetTrainer_i3nodeRefine(base_cls):  # type: ignore[valid-type,misc]  # noqa: N801
        """Refinement trainer: correction channels simulated from the ground truth on the fly.

        The ``dataset_json`` passed in must be the refinement one (image + ``noNorm`` correction
        channels, ``"i3node"`` key) and the plans must normalise that many channels; the
        preprocessed data itself holds only the image channels.
        """

        #: ``k`` ranges over ``0 .. round(correction_max_fraction * mean(shape))``.
        correction_max_fraction: float = 1.0 / 3.0
        #: Probability that a simulated slice is drawn among the slices holding foreground.
        correction_p_foreground: float = 0.5

        def __init__(
            self,
            plans: dict,
            configuration: str,
            fold: int,
            dataset_json: dict,
            device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's signature
        ) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.correction_encoding = encoding_from_dataset_json(dataset_json)
            self.correction_n_classes = len(self.label_manager.all_labels)
            n_corr = self.correction_encoding.n_correction_channels(self.correction_n_classes)
            n_ch = len(dataset_json["channel_names"])
            schemes = self.configuration_manager.normalization_schemes
            if len(schemes) != n_ch:
                raise ValueError(
                    f"plans: configuration {configuration!r} normalises {len(schemes)} channel(s) but "
                    f"dataset_json lists {n_ch} ({n_ch - n_corr} image + {n_corr} correction)"
                )
            if self.label_manager.has_regions or self.label_manager.has_ignore_label:
                raise ValueError("dataset_json: region-based or ignore-label datasets are not supported")

        def get_tr_and_val_datasets(self) -> tuple[Any, Any]:
            tr, val = super().get_tr_and_val_datasets()
            wrap = lambda d: CorrectionSimulatingDataset(  # noqa: E731
                d, self.correction_max_fraction, self.correction_p_foreground)
            return wrap(tr), wrap(val)

        def _code_to_channels(self) -> CorrectionCodeToChannels:
            return CorrectionCodeToChannels(self.correction_n_classes, self.correction_encoding)

        def get_training_transforms(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            return _insert_before_ds(super().get_training_transforms(*args, **kwargs), self._code_to_channels())

        def get_validation_transforms(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            return _insert_before_ds(super().get_validation_transforms(*args, **kwargs), self._code_to_channels())

        def perform_actual_validation(self, save_probabilities: bool = False) -> None:
            # nnU-Net's final validation would feed image-only cases to a network with
            # correction inputs; evaluate with models.refinement.RefinementModel instead.
            self.print_to_log_file("i3node: final validation skipped (refinement model)")

    nnUNetTrainer_i3nodeRefine.__module__ = __name__
    nnUNetTrainer_i3nodeRefine.__qualname__ = TRAINER_NAME
    _TRAINER_CACHE[TRAINER_NAME] = nnUNetTrainer_i3nodeRefine
    return nnUNetTrainer_i3nodeRefine


def __getattr__(name: str) -> Any:
    """Create :class:`nnUNetTrainer_i3nodeRefine` on first access (imports torch/nnunetv2)."""
    if name == TRAINER_NAME:
        cls = _build_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# one call
# ---------------------------------------------------------------------------------------------


def default_refinement_overrides() -> Any:
    """Network and patch size used by :func:`train_refinement_model` by default (CPU-sized)."""
    from models.training import NetworkOverrides

    return NetworkOverrides(patch_size=(32, 48, 48), features_per_stage=(8, 16, 32, 64), batch_size=2)


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


def _rewrite_preprocessed_for_refinement(pre_dir: Path, plans_identifier: str, encoding: Encoding) -> dict[str, Any]:
    """Turn the image-only preprocessed dataset.json/plans into the refinement model's."""
    ds_path = pre_dir / "dataset.json"
    plans_path = pre_dir / f"{plans_identifier}.json"
    base = json.loads(ds_path.read_text())
    dj = refinement_dataset_json(base, encoding)
    n_img = len(base["channel_names"])
    n_corr = len(dj["channel_names"]) - n_img
    plans = json.loads(plans_path.read_text())
    for cfg in plans["configurations"].values():
        if "normalization_schemes" in cfg:
            cfg["normalization_schemes"] = list(cfg["normalization_schemes"])[:n_img] + ["NoNormalization"] * n_corr
        if "use_mask_for_norm" in cfg:
            cfg["use_mask_for_norm"] = list(cfg["use_mask_for_norm"])[:n_img] + [False] * n_corr
    # nnU-Net's preprocessor looks up intensity properties for every channel (NoNormalization
    # ignores them): give the 0/1 correction channels their true ones.
    props = plans.setdefault("foreground_intensity_properties_per_channel", {})
    for c in range(n_img, n_img + n_corr):
        props[str(c)] = {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0,
                         "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 0.5}
    ds_path.write_text(json.dumps(dj, indent=2))
    plans_path.write_text(json.dumps(plans, indent=2))
    return dj


def _write_all_split(pre_dir: Path) -> None:
    """A single "split" training and validating on every case (nnU-Net's fold "all", as fold 0)."""
    ids = sorted(p.name[: -len(".nii.gz")] for p in (pre_dir / "gt_segmentations").glob("*.nii.gz"))
    (pre_dir / "splits_final.json").write_text(json.dumps([{"train": ids, "val": ids}], indent=2))


def train_refinement_model(
    phantoms_or_arrays: Sequence[Any],
    out_dir: str | Path,
    *,
    encoding: Encoding = Encoding.I3DEEP_REVIEWED,
    folds: Sequence[int] | Literal["all"] = "all",
    epochs: int = 12,
    iterations_per_epoch: int = 10,
    val_iterations: int = 1,
    progress: Callable[[Any], None] | None = None,
    device: str | None = None,
    class_names: Sequence[str] | None = None,
    channel_names: Sequence[str] = ("CT",),
    overrides: Any = None,
    max_fraction: float = 1.0 / 3.0,
    p_foreground: float = 0.5,
    dataset_id: int = 991,
    name: str = "i3nodeRefine",
    seed: int = 0,
    keep_intermediate: bool = False,
    num_processes: int = 2,
    isolate: bool = True,
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
    encoding : Encoding, optional
        Correction encoding the model learns (default ``I3DEEP_REVIEWED``).
    folds : sequence of int or "all", optional
        ``"all"`` (default) trains one model on every case (stored as ``fold_0`` with a
        single train=val split); otherwise those cross-validation folds (3 splits at least).
    epochs, iterations_per_epoch, val_iterations : int, optional
        Schedule (default 12 x 10 iterations, CPU-sized: about 2-3 minutes of training on 2
        idle CPU cores for 32x64x64 phantoms, several times longer on a loaded machine).
        Too short to learn small structures (the phantoms' lesion) from the corrections; use
        hundreds of epochs on a GPU for real models.
    progress : callable, optional
        Receives ``models.training.ProgressEvent`` objects.
    device : str, optional
        Training device; default CUDA when available, else CPU.
    class_names : sequence of str, optional
        Label names by value; default the cases' ``class_names`` or
        ``("background", "organ", "lesion")``.
    channel_names : sequence of str, optional
        Image channel names (nnU-Net normalisation keys), default ``("CT",)``.
    overrides : models.training.NetworkOverrides, optional
        Network/patch size; default :func:`default_refinement_overrides`.
    max_fraction, p_foreground : float, optional
        Correction simulation, see :func:`sample_training_slices`.
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

    Returns
    -------
    Path
        ``out_dir/nnUNet_results/Dataset991_i3nodeRefine/nnUNetTrainer_i3nodeRefine__nnUNetPlans__3d_fullres``:
        a standard nnU-Net results folder (checkpoints name ``nnUNetTrainer``; ``dataset.json``
        lists every input channel and carries the ``"i3node"`` encoding key), loadable by
        :class:`models.refinement.RefinementModel`.

    Raises
    ------
    ValueError
        On invalid arguments.
    models.training.TrainingError
        When planning, preprocessing or training fails.
    """
    from models.training import (
        ProgressEvent,
        dataset_name,
        plan_and_preprocess,
        train_folds,
        write_raw_dataset,
        write_splits,
    )

    encoding = Encoding(encoding)
    images, labels, spacings, case_names = _as_cases(phantoms_or_arrays)
    if len(images) < 2:
        raise ValueError(f"phantoms_or_arrays: need at least 2 cases, got {len(images)}")
    names = tuple(class_names) if class_names is not None else (case_names or _DEFAULT_CLASS_NAMES)
    if len(names) < 2:
        raise ValueError(f"class_names: need background and at least one class, got {names!r}")
    max_label = max(int(lab.max()) for lab in labels)
    if max_label >= len(names):
        raise ValueError(f"labels go up to {max_label} but class_names has only {len(names)} entries")
    n_img = images[0].shape[0] if images[0].ndim == 4 else 1
    if len(channel_names) != n_img:
        raise ValueError(f"channel_names: {len(channel_names)} name(s) for {n_img} image channel(s)")
    if any(str(c).casefold() == NO_NORM.casefold() for c in channel_names):
        _log.warning("image channel named %r: the encoding is then read from the 'i3node' key only", NO_NORM)
    if folds == "all":
        fold_ids = [0]
    elif isinstance(folds, str):
        raise ValueError(f"folds must be 'all' or a sequence of fold numbers, got {folds!r}")
    else:
        fold_ids = [int(f) for f in folds]
        if not fold_ids or min(fold_ids) < 0:
            raise ValueError(f"folds must be 'all' or non-negative fold numbers, got {folds!r}")
    if epochs < 1 or iterations_per_epoch < 1 or val_iterations < 1:
        raise ValueError("epochs, iterations_per_epoch and val_iterations must be >= 1")
    if overrides is None:
        overrides = default_refinement_overrides()

    out_dir = Path(out_dir)
    raw, pre, res = out_dir / "nnUNet_raw", out_dir / "nnUNet_preprocessed", out_dir / "nnUNet_results"
    t0 = time.perf_counter()
    labels_map = {("background" if i == 0 else str(n)): i for i, n in enumerate(names)}
    write_raw_dataset(raw, dataset_id, name, images, labels, spacings, dict(enumerate(channel_names)), labels_map)
    plan_and_preprocess(dataset_id, raw_root=raw, preprocessed_root=pre, overrides=overrides,
                        num_processes=num_processes, isolate=isolate, progress=progress)
    pre_dir = pre / dataset_name(dataset_id, name)
    _rewrite_preprocessed_for_refinement(pre_dir, "nnUNetPlans", encoding)
    if folds == "all":
        _write_all_split(pre_dir)
    else:
        n_splits = max(3, max(fold_ids) + 1)
        if len(images) < n_splits:
            raise ValueError(f"folds: {n_splits} splits need at least {n_splits} cases, got {len(images)}")
        write_splits(pre_dir, n_splits, seed=12345 + seed)
    t_train = time.perf_counter()
    model_dir = train_folds(
        dataset_id, fold_ids, preprocessed_root=pre, results_root=res, epochs=epochs,
        iterations_per_epoch=iterations_per_epoch, val_iterations=val_iterations,
        trainer_cls=TRAINER_SPEC,
        trainer_options={"correction_max_fraction": float(max_fraction),
                         "correction_p_foreground": float(p_foreground)},
        device=device, seed=seed, isolate=isolate, progress=progress)
    train_s = time.perf_counter() - t_train
    _check_results_folder(model_dir, encoding)
    if not keep_intermediate:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(pre, ignore_errors=True)
    total_s = time.perf_counter() - t0
    if progress is not None:
        progress(ProgressEvent("done", f"refinement model ({encoding.value}) in {model_dir}", 1.0,
                               {"seconds": total_s, "train_seconds": train_s}))
    _log.info("refinement model trained in %.1f s (training %.1f s): %s", total_s, train_s, model_dir)
    return Path(model_dir)


def _check_results_folder(model_dir: Path, encoding: Encoding) -> None:
    """Verify the results folder describes the refinement input (raises TrainingError)."""
    from models.training import TrainingError

    try:
        dj = json.loads((model_dir / "dataset.json").read_text())
        plans = json.loads((model_dir / "plans.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"refinement results folder {model_dir} is incomplete: {exc}") from exc
    if encoding_from_dataset_json(dj) is not encoding:
        raise TrainingError(f"{model_dir}/dataset.json does not declare encoding {encoding.value!r}")
    for cname, cfg in plans["configurations"].items():
        schemes = cfg.get("normalization_schemes")
        if schemes is not None and len(schemes) != len(dj["channel_names"]):
            raise TrainingError(f"{model_dir}/plans.json configuration {cname!r} normalises {len(schemes)} "
                                f"channel(s), dataset.json lists {len(dj['channel_names'])}")
    if not any(model_dir.glob("fold_*/checkpoint_final.pth")):
        raise TrainingError(f"{model_dir} holds no fold_*/checkpoint_final.pth")
