"""Training nnU-Net v2 models from numpy volumes: raw dataset, small plans, folds.

Importing this module is cheap: torch, nnunetv2 and SimpleITK are imported inside the
functions that need them. nnU-Net's folders are passed explicitly and set in
``os.environ`` only for the duration of a call (:func:`nnunet_environment`); training runs
in a child process (``python -m models.training``) by default so that nnU-Net's
multiprocessing, global state and console output stay out of the calling process.

Typical use (what ``i3node train`` and ``models.demo`` do)::

    model_dir = train_presegmentation(phantoms, out_dir, folds=3, epochs=20)
    # model_dir is a standard nnU-Net v2 results folder:
    # out_dir/nnUNet_results/Dataset990_i3nodePreseg/nnUNetTrainer_i3nodeTiny__nnUNetPlans__3d_fullres
    predictor = models.nnunet.EnsemblePredictor(model_dir)

Lower-level building blocks, for models with other inputs (e.g. the refinement model with
extra correction channels and its own trainer subclass):

1. :func:`write_raw_dataset` - NIfTI files + ``dataset.json`` under ``nnUNet_raw``;
2. :func:`plan_and_preprocess` - fingerprint, default plans shrunk by :class:`NetworkOverrides`,
   preprocessing of one configuration;
3. :func:`train_folds` - train folds with a trainer class (default
   ``models.nnunet_trainers.nnUNetTrainer_i3nodeTiny``), then make the checkpoints loadable
   without that trainer (``models.checkpoints.finalize_for_inference``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.progress import ProgressCallback, ProgressEvent, emit

__all__ = [
    "ProgressEvent",
    "ProgressCallback",
    "TrainingCase",
    "LabelledVolume",
    "NetworkOverrides",
    "TrainingError",
    "nnunet_environment",
    "dataset_name",
    "write_raw_dataset",
    "plan_and_preprocess",
    "write_splits",
    "train_folds",
    "train_presegmentation",
    "DEFAULT_TRAINER",
]

# Named explicitly: this module also runs as ``python -m models.training`` (then __name__ is __main__).
log = logging.getLogger("models.training")

#: Trainer used when none is given, as ``"module:ClassName"``.
DEFAULT_TRAINER = "models.nnunet_trainers:nnUNetTrainer_i3nodeTiny"
_PROGRESS_PREFIX = "@@i3node-progress@@ "
_REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainingError(RuntimeError):
    """Planning, preprocessing or training failed; the message says which step and why."""




class LabelledVolume(Protocol):
    """Anything with an image, labels and spacing (e.g. ``models.phantoms.Phantom``)."""

    @property
    def image(self) -> np.ndarray: ...  # (z, y, x) or (c, z, y, x)

    @property
    def labels(self) -> np.ndarray: ...  # (z, y, x) integer

    @property
    def spacing(self) -> tuple[float, float, float]: ...  # (z, y, x) mm


@dataclass(frozen=True)
class TrainingCase:
    """A training volume: ``image`` (z, y, x) or (c, z, y, x), ``labels`` (z, y, x), spacing (z, y, x)."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class NetworkOverrides:
    """Replacement for nnU-Net's planned 3D network, small enough to train on a CPU.

    Attributes
    ----------
    patch_size
        Training patch (z, y, x); each axis must be divisible by the product of its strides.
    features_per_stage
        Encoder feature counts; its length is the number of resolution stages.
    strides
        Per-stage strides; ``None`` derives them: stage 0 is (1, 1, 1), later stages
        downsample an axis by 2 while the bottleneck keeps at least ``min_bottleneck`` voxels.
    kernel_sizes
        Per-stage conv kernels; ``None`` means 3 everywhere.
    n_conv_per_stage
        Convolutions per encoder stage (the decoder uses the same number).
    batch_size
        Training batch size.
    dropout_p
        If set, ``torch.nn.Dropout3d`` with this probability after each conv (allows MC dropout
        at inference); nnU-Net's default is no dropout.
    min_bottleneck
        Smallest bottleneck edge when deriving strides.
    """

    patch_size: tuple[int, int, int] = (32, 48, 48)
    features_per_stage: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[tuple[int, int, int], ...] | None = None
    kernel_sizes: tuple[tuple[int, int, int], ...] | None = None
    n_conv_per_stage: int = 2
    batch_size: int = 2
    dropout_p: float | None = None
    min_bottleneck: int = 4

    def resolved_strides(self) -> list[list[int]]:
        """Strides per stage (explicit or derived), validated against ``patch_size``."""
        n = len(self.features_per_stage)
        if n < 2:
            raise ValueError("features_per_stage: need at least 2 stages")
        if self.strides is not None:
            if len(self.strides) != n:
                raise ValueError(f"strides: expected {n} entries (one per stage), got {len(self.strides)}")
            strides = [list(map(int, s)) for s in self.strides]
        else:
            strides = [[1, 1, 1]]
            cum = [1, 1, 1]
            for _ in range(1, n):
                s = [2 if self.patch_size[a] // (cum[a] * 2) >= self.min_bottleneck else 1 for a in range(3)]
                cum = [c * f for c, f in zip(cum, s, strict=True)]
                strides.append(s)
        total = [int(np.prod([s[a] for s in strides])) for a in range(3)]
        for a in range(3):
            if self.patch_size[a] % total[a]:
                raise ValueError(f"patch_size: axis {a} ({self.patch_size[a]}) is not divisible by the "
                                 f"total stride {total[a]}")
        return strides


# --------------------------------------------------------------------------- environment
@contextlib.contextmanager
def nnunet_environment(
    raw: Path | None = None,
    preprocessed: Path | None = None,
    results: Path | None = None,
    *,
    cpu_defaults: bool = True,
) -> Iterator[None]:
    """Set nnU-Net's folder variables (and CPU-friendly defaults) for the duration of a block.

    nnunetv2 >= 2.6 reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` lazily, so
    setting them here is enough even after nnunetv2 was imported. The previous values are
    restored on exit. ``cpu_defaults`` sets ``nnUNet_compile=f``, ``nnUNet_n_proc_DA=0`` and
    ``nnUNet_def_n_proc=1`` unless they are already set.
    """
    new: dict[str, str] = {}
    for key, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", preprocessed), ("nnUNet_results", results)):
        if value is not None:
            new[key] = str(Path(value).resolve())
    if cpu_defaults:
        for key, default in (("nnUNet_compile", "f"), ("nnUNet_n_proc_DA", "0"), ("nnUNet_def_n_proc", "1")):
            if key not in os.environ:
                new[key] = default
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(logger: logging.Logger = log) -> Iterator[None]:
    """Capture Python-level stdout of nnU-Net calls and forward it to ``logger`` at DEBUG."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        text = buf.getvalue().strip()
        if text:
            logger.debug("nnU-Net: %s", text)


def dataset_name(dataset_id: int, name: str) -> str:
    """nnU-Net dataset folder name, e.g. ``Dataset990_i3nodePreseg``."""
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id: must be in 1..999, got {dataset_id}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"name: must be alphanumeric (with _ or -), got {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


# --------------------------------------------------------------------------- raw dataset
def write_raw_dataset(
    raw_root: Path,
    dataset_id: int,
    name: str,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]] | Sequence[float],
    channel_names: Mapping[int | str, str],
    labels_map: Mapping[str, int],
    *,
    case_prefix: str = "case",
    case_ids: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    folder: Path | None = None,
) -> Path:
    """Write an nnU-Net v2 raw dataset (NIfTI via SimpleITK) and its ``dataset.json``.

    Parameters
    ----------
    raw_root
        The ``nnUNet_raw`` folder; the dataset goes to ``raw_root/DatasetXXX_name``
        (an existing one is replaced).
    dataset_id, name
        nnU-Net dataset id (1..999) and name.
    images
        One array per case, (z, y, x) for one channel or (c, z, y, x).
    labels
        One integer array (z, y, x) per case, values from ``labels_map``.
    spacings
        One (z, y, x) spacing for all cases, or one per case. Written to NIfTI as (x, y, z),
        so that SimpleITK (and nnU-Net) read the arrays back as (z, y, x) with spacing (z, y, x).
    channel_names
        ``{0: "CT", 1: "noNorm", ...}``; keys 0..c-1. The name selects nnU-Net's
        normalization (``CT``, ``noNorm``, ``rescale_to_0_1``, anything else: z-score).
    labels_map
        ``{"background": 0, "organ": 1, ...}``; must contain ``background: 0``. An
        ``"ignore"`` entry (the highest value) marks unannotated voxels: nnU-Net leaves them
        out of the loss.
    case_prefix, case_ids
        Cases are named ``<case_prefix>_0000`` ... unless ``case_ids`` names each one.
    extra
        More keys for ``dataset.json`` (e.g. provenance).
    folder
        Write exactly here instead of ``raw_root/DatasetXXX_name``.

    Returns
    -------
    Path
        The dataset folder.
    """
    import shutil

    import SimpleITK as sitk

    ds_dir = Path(folder) if folder is not None else Path(raw_root) / dataset_name(dataset_id, name)
    if case_ids is not None and (len(case_ids) != len(images) or len(set(case_ids)) != len(case_ids)):
        raise ValueError(f"case_ids: expected {len(images)} distinct names, got {len(case_ids)}")
    if len(images) != len(labels):
        raise ValueError(f"labels: expected {len(images)} arrays (one per image), got {len(labels)}")
    if len(images) == 0:
        raise ValueError("images: need at least one case")
    chan = {int(k): str(v) for k, v in channel_names.items()}
    if sorted(chan) != list(range(len(chan))):
        raise ValueError(f"channel_names: keys must be 0..{len(chan) - 1}, got {sorted(chan)}")
    lmap = {str(k): int(v) for k, v in labels_map.items()}
    if lmap.get("background") != 0:
        raise ValueError("labels_map: must map 'background' to 0")
    if sorted(lmap.values()) != list(range(len(lmap))):
        raise ValueError(f"labels_map: values must be 0..{len(lmap) - 1}, got {sorted(lmap.values())}")
    if len(spacings) == 3 and all(isinstance(s, (int, float, np.floating, np.integer)) for s in spacings):
        per_case = [tuple(float(s) for s in spacings)] * len(images)  # type: ignore[arg-type]
    else:
        per_case = [tuple(float(v) for v in s) for s in spacings]  # type: ignore[union-attr]
        if len(per_case) != len(images):
            raise ValueError(f"spacings: expected one spacing or {len(images)}, got {len(per_case)}")

    if ds_dir.exists():
        shutil.rmtree(ds_dir)
    (ds_dir / "imagesTr").mkdir(parents=True)
    (ds_dir / "labelsTr").mkdir(parents=True)
    for i, (img, lab, sp) in enumerate(zip(images, labels, per_case, strict=True)):
        img = np.asarray(img)
        if img.ndim == 3:
            img = img[None]
        if img.ndim != 4:
            raise ValueError(f"images[{i}]: expected (z, y, x) or (c, z, y, x), got shape {img.shape}")
        if img.shape[0] != len(chan):
            raise ValueError(f"images[{i}]: {img.shape[0]} channels but channel_names has {len(chan)}")
        lab = np.asarray(lab)
        if lab.shape != img.shape[1:]:
            raise ValueError(f"labels[{i}]: shape {lab.shape} differs from image shape {img.shape[1:]}")
        if len(sp) != 3 or min(sp) <= 0:
            raise ValueError(f"spacings[{i}]: expected three positive numbers, got {sp}")
        case = case_ids[i] if case_ids is not None else f"{case_prefix}_{i:04d}"
        for c in range(img.shape[0]):
            im = sitk.GetImageFromArray(np.ascontiguousarray(img[c], dtype=np.float32))
            im.SetSpacing(tuple(reversed(sp)))
            sitk.WriteImage(im, str(ds_dir / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
        lb = sitk.GetImageFromArray(np.ascontiguousarray(lab, dtype=np.uint8))
        lb.SetSpacing(tuple(reversed(sp)))
        sitk.WriteImage(lb, str(ds_dir / "labelsTr" / f"{case}.nii.gz"))
    dataset_json = {
        "channel_names": {str(k): v for k, v in sorted(chan.items())},
        "labels": lmap,
        "numTraining": len(images),
        "file_ending": ".nii.gz",
        "name": name,
        **dict(extra or {}),
    }
    (ds_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return ds_dir


# --------------------------------------------------------------------------- planning
def _shrink_configuration(cfg: dict[str, Any], ov: NetworkOverrides) -> dict[str, Any]:
    strides = ov.resolved_strides()
    n = len(ov.features_per_stage)
    kernels = [list(map(int, k)) for k in ov.kernel_sizes] if ov.kernel_sizes is not None else [[3, 3, 3]] * n
    if len(kernels) != n:
        raise ValueError(f"kernel_sizes: expected {n} entries (one per stage), got {len(kernels)}")
    cfg = json.loads(json.dumps(cfg))
    cfg["patch_size"] = [int(p) for p in ov.patch_size]
    cfg["batch_size"] = int(ov.batch_size)
    arch = cfg["architecture"]
    kw = arch["arch_kwargs"]
    kw["n_stages"] = n
    kw["features_per_stage"] = [int(f) for f in ov.features_per_stage]
    kw["kernel_sizes"] = kernels
    kw["strides"] = strides
    kw["n_conv_per_stage"] = [int(ov.n_conv_per_stage)] * n
    kw["n_conv_per_stage_decoder"] = [int(ov.n_conv_per_stage)] * (n - 1)
    if ov.dropout_p is not None:
        kw["dropout_op"] = "torch.nn.modules.dropout.Dropout3d"
        kw["dropout_op_kwargs"] = {"p": float(ov.dropout_p), "inplace": True}
    else:
        kw["dropout_op"] = None
        kw["dropout_op_kwargs"] = None
    return cfg


def plan_and_preprocess(
    dataset_id: int,
    *,
    raw_root: Path,
    preprocessed_root: Path,
    configuration: str = "3d_fullres",
    overrides: NetworkOverrides | None = None,
    num_processes: int = 2,
    isolate: bool = True,
    progress: ProgressCallback | None = None,
    plans_from: Path | None = None,
) -> Path:
    """Fingerprint, plan (nnU-Net's default planner, then shrunk) and preprocess one configuration.

    Equivalent to ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -npfp N -np N`` followed
    by editing ``nnUNetPlans.json``; other configurations are removed from the plans.

    Parameters
    ----------
    dataset_id
        Dataset already written under ``raw_root`` (see :func:`write_raw_dataset`).
    raw_root, preprocessed_root
        ``nnUNet_raw`` and ``nnUNet_preprocessed``.
    configuration
        The configuration to keep (a 3D one).
    overrides
        Network/patch replacement; ``None`` keeps the default :class:`NetworkOverrides`.
    num_processes
        Worker processes for fingerprinting and preprocessing (spawned).
    isolate
        Run in a child process (``python -m models.training``). nnU-Net spawns worker
        processes that re-import the ``__main__`` module; in a child process that is always
        safe, in this process it needs an ``if __name__ == "__main__":`` guard in the script.
    progress
        Receives ``plan`` and ``preprocess`` events.
    plans_from
        An nnU-Net results folder (or plans file) whose plans to reuse instead of fingerprinting
        and planning this dataset: same target spacing and the same normalisation of the image
        channels (e.g. a refinement model reusing its presegmentation ensemble's CT window).
        Channels beyond that model's must be named ``noNorm``.

    Returns
    -------
    Path
        The plans file (``preprocessed_root/DatasetXXX_name/nnUNetPlans.json``).
    """
    ov = overrides if overrides is not None else NetworkOverrides()
    ov.resolved_strides()  # validate before the slow part
    if isolate:
        args = {"dataset_id": int(dataset_id), "raw_root": str(raw_root),
                "preprocessed_root": str(preprocessed_root), "configuration": configuration,
                "overrides": _overrides_to_json(ov), "num_processes": int(num_processes),
                "plans_from": str(plans_from) if plans_from is not None else None}
        return Path(_run_child("plan", args, progress, f"planning dataset {dataset_id}"))
    return _plan_and_preprocess_here(dataset_id, raw_root=Path(raw_root), preprocessed_root=Path(preprocessed_root),
                                     configuration=configuration, overrides=ov, num_processes=num_processes,
                                     progress=progress, plans_from=plans_from)


def _reused_plans(source: Path, ds_name: str, raw_dataset_json: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """Plans of another model, renamed to ``ds_name`` and extended to this dataset's extra channels."""
    src = source / "plans.json" if source.is_dir() else source
    try:
        plans: dict[str, Any] = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"plans_from: cannot read {src}: {exc}") from exc
    if configuration not in plans.get("configurations", {}):
        raise TrainingError(f"plans_from: {src} has no configuration {configuration!r}")
    plans["dataset_name"] = ds_name
    plans["configurations"] = {configuration: plans["configurations"][configuration]}
    cfg = plans["configurations"][configuration]
    channels = [str(raw_dataset_json["channel_names"][k]) for k in sorted(raw_dataset_json["channel_names"], key=int)]
    n_src = len(cfg["normalization_schemes"])
    if len(channels) < n_src:
        raise TrainingError(f"plans_from: {src} normalises {n_src} channel(s), the dataset has {len(channels)}")
    extra = channels[n_src:]
    if any(c.casefold() != "nonorm" for c in extra):
        raise TrainingError(f"plans_from: channels beyond the source model's {n_src} must be noNorm, got {extra}")
    cfg["normalization_schemes"] = list(cfg["normalization_schemes"]) + ["NoNormalization"] * len(extra)
    cfg["use_mask_for_norm"] = list(cfg["use_mask_for_norm"]) + [False] * len(extra)
    props = plans.setdefault("foreground_intensity_properties_per_channel", {})
    for c in range(n_src, len(channels)):
        props[str(c)] = {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0,
                         "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 0.5}
    return plans


def _overrides_to_json(ov: NetworkOverrides) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(ov)


def _overrides_from_json(d: Mapping[str, Any]) -> NetworkOverrides:
    def tt(v: Any) -> Any:
        return None if v is None else tuple(tuple(x) for x in v)

    return NetworkOverrides(
        patch_size=tuple(d["patch_size"]), features_per_stage=tuple(d["features_per_stage"]),  # type: ignore[arg-type]
        strides=tt(d["strides"]), kernel_sizes=tt(d["kernel_sizes"]), n_conv_per_stage=int(d["n_conv_per_stage"]),
        batch_size=int(d["batch_size"]), dropout_p=d["dropout_p"], min_bottleneck=int(d["min_bottleneck"]))


def annotated_intensity_properties(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                                   ignore_value: int) -> dict[str, float]:
    """nnU-Net's foreground intensity statistics over the *annotated* foreground voxels only.

    nnU-Net's fingerprint takes every voxel with a label above 0 as foreground, the
    ``ignore`` label included: on sparse labels (an expert's planes, ``ignore`` elsewhere)
    that is mostly unannotated tissue and air, and the CT window it derives clips the
    lesions. Here only voxels labelled ``1 .. ignore_value - 1`` count.
    """
    values = np.concatenate([np.asarray(img, np.float64)[(lab > 0) & (lab != ignore_value)]
                             for img, lab in zip(images, labels, strict=True)])
    if values.size == 0:
        raise TrainingError("no annotated foreground voxel in the training set")
    return {
        "max": float(values.max()), "mean": float(values.mean()), "median": float(np.median(values)),
        "min": float(values.min()), "percentile_00_5": float(np.percentile(values, 0.5)),
        "percentile_99_5": float(np.percentile(values, 99.5)), "std": float(values.std()),
    }


def _exclude_ignore_from_intensities(raw_ds: Path, pre_ds: Path, plans: dict[str, Any]) -> None:
    """With an ``ignore`` label, replace the planned intensity statistics by those of annotated voxels."""
    import SimpleITK as sitk

    dataset = json.loads((raw_ds / "dataset.json").read_text())
    if "ignore" not in dataset["labels"]:
        return
    ignore = int(dataset["labels"]["ignore"])
    ending = dataset.get("file_ending", ".nii.gz")
    label_files = sorted((raw_ds / "labelsTr").glob(f"*{ending}"))
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in label_files]
    props = {}
    for ch in sorted(dataset["channel_names"], key=int):
        images = [sitk.GetArrayFromImage(sitk.ReadImage(str(raw_ds / "imagesTr" / f"{f.name[:-len(ending)]}_{int(ch):04d}{ending}")))
                  for f in label_files]
        props[str(ch)] = annotated_intensity_properties(images, labels, ignore)
    plans["foreground_intensity_properties_per_channel"] = props
    fp_path = pre_ds / "dataset_fingerprint.json"
    if fp_path.is_file():
        fingerprint = json.loads(fp_path.read_text())
        fingerprint["foreground_intensity_properties_per_channel"] = props
        fingerprint["i3node_note"] = "intensity statistics of annotated voxels only (the ignore label left out)"
        fp_path.write_text(json.dumps(fingerprint, indent=1))
    log.info("intensity statistics from annotated voxels only (ignore label %d left out): %s", ignore,
             {k: (round(v["percentile_00_5"], 1), round(v["percentile_99_5"], 1)) for k, v in props.items()})


def _plan_and_preprocess_here(
    dataset_id: int,
    *,
    raw_root: Path,
    preprocessed_root: Path,
    configuration: str,
    overrides: NetworkOverrides,
    num_processes: int,
    progress: ProgressCallback | None,
    plans_from: Path | None = None,
) -> Path:
    import shutil

    ov = overrides
    with nnunet_environment(raw_root, preprocessed_root, None), _nnunet_da_processes(num_processes):
        with _quiet():
            from nnunetv2.experiment_planning.plan_and_preprocess_api import (
                extract_fingerprint_dataset,
                plan_experiment_dataset,
                preprocess_dataset,
            )
            from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

        t0 = time.perf_counter()
        ds_name = convert_id_to_dataset_name(dataset_id)
        if plans_from is not None:
            plans_identifier = "nnUNetPlans"
            raw_json = json.loads((Path(raw_root) / ds_name / "dataset.json").read_text())
            (Path(preprocessed_root) / ds_name).mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(raw_root) / ds_name / "dataset.json", Path(preprocessed_root) / ds_name / "dataset.json")
            plans = _reused_plans(Path(plans_from), ds_name, raw_json, configuration)
            plans_file = Path(preprocessed_root) / ds_name / f"{plans_identifier}.json"
            # nnU-Net's trainer copies the fingerprint into the results folder: say whose it is.
            source_dir = Path(plans_from) if Path(plans_from).is_dir() else Path(plans_from).parent
            fingerprint: dict[str, Any] = {}
            if (source_dir / "dataset_fingerprint.json").is_file():
                fingerprint = json.loads((source_dir / "dataset_fingerprint.json").read_text())
            fingerprint["i3node_note"] = f"not this dataset's: copied with the plans reused from {source_dir}"
            (Path(preprocessed_root) / ds_name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
        else:
            try:
                with _quiet():
                    extract_fingerprint_dataset(dataset_id, num_processes=num_processes,
                                                check_dataset_integrity=False, clean=True, verbose=False,
                                                show_progress_bar=False)
                    _plans, plans_identifier = plan_experiment_dataset(dataset_id)
            except Exception as exc:
                raise TrainingError(f"planning dataset {dataset_id} in {raw_root} failed: {exc}") from exc
            plans_file = Path(preprocessed_root) / ds_name / f"{plans_identifier}.json"
            plans = json.loads(plans_file.read_text())
            _exclude_ignore_from_intensities(Path(raw_root) / ds_name, Path(preprocessed_root) / ds_name, plans)
        if configuration not in plans["configurations"]:
            raise TrainingError(f"configuration {configuration!r} not planned for {ds_name}; "
                                f"available: {sorted(plans['configurations'])}")
        cfg = plans["configurations"][configuration]
        if "inherits_from" in cfg:
            raise TrainingError(f"configuration {configuration!r} inherits from another; choose a base one")
        plans["configurations"] = {configuration: _shrink_configuration(cfg, ov)}
        plans_file.write_text(json.dumps(plans, indent=2))
        t_plan = time.perf_counter() - t0
        emit(progress, ProgressEvent("plan", f"planned {ds_name} in {t_plan:.1f} s", 1.0,
                                      {"seconds": t_plan}), log)
        t1 = time.perf_counter()
        try:
            with _quiet():
                preprocess_dataset(dataset_id, plans_identifier, (configuration,), (num_processes,),
                                   verbose=False, show_progress_bar=False)
        except Exception as exc:
            raise TrainingError(f"preprocessing dataset {dataset_id} failed: {exc}") from exc
        t_pre = time.perf_counter() - t1
        emit(progress, ProgressEvent("preprocess", f"preprocessed {ds_name} in {t_pre:.1f} s", 1.0,
                                      {"seconds": t_pre}), log)
    return plans_file


@contextlib.contextmanager
def _nnunet_da_processes(n: int) -> Iterator[None]:
    """nnU-Net's planner calls ``torch.set_num_threads(nnUNet_n_proc_DA)``: 0 would fail there."""
    saved = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(max(1, int(n)))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = saved


def write_splits(preprocessed_dataset_dir: Path, n_splits: int, *, seed: int = 12345) -> Path:
    """Write ``splits_final.json`` with an ``n_splits``-fold cross-validation split.

    nnU-Net's default is 5 folds; with few demo cases, 3 folds leave more training data
    per fold. Case identifiers are read from ``gt_segmentations`` (written by preprocessing).
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ddir = Path(preprocessed_dataset_dir)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (ddir / "gt_segmentations").glob("*.nii.gz"))
    if len(ids) < n_splits:
        raise ValueError(f"n_splits: {n_splits} folds need at least {n_splits} cases, found {len(ids)}")
    splits = generate_crossval_split(ids, seed=seed, n_splits=n_splits)
    out = ddir / "splits_final.json"
    out.write_text(json.dumps(splits, indent=2))
    return out


# --------------------------------------------------------------------------- training
def _trainer_spec(trainer_cls: type | str | None) -> str:
    if trainer_cls is None:
        return DEFAULT_TRAINER
    if isinstance(trainer_cls, str):
        if ":" not in trainer_cls:
            raise ValueError(f"trainer_cls: expected 'module:ClassName', got {trainer_cls!r}")
        return trainer_cls
    return f"{trainer_cls.__module__}:{trainer_cls.__qualname__}"


def _load_trainer_class(spec: str) -> type:
    module, _, qual = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _train_folds_here(
    dataset_id: int,
    folds: Sequence[int],
    *,
    preprocessed_root: Path,
    results_root: Path,
    epochs: int,
    iterations_per_epoch: int,
    val_iterations: int,
    trainer_spec: str,
    configuration: str,
    plans_identifier: str,
    device: str,
    seed: int,
    trainer_options: Mapping[str, Any],
    progress: ProgressCallback | None,
) -> Path:
    """Train folds in this process (the body of the child process)."""
    import random

    with nnunet_environment(None, preprocessed_root, results_root):
        import torch
        from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

        from models.checkpoints import finalize_for_inference

        if os.environ.get("I3NODE_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["I3NODE_TORCH_THREADS"]))
        trainer_class = _load_trainer_class(trainer_spec)
        ds_name = convert_id_to_dataset_name(dataset_id)
        pre_dir = Path(preprocessed_root) / ds_name
        plans = json.loads((pre_dir / f"{plans_identifier}.json").read_text())
        dataset_json = json.loads((pre_dir / "dataset.json").read_text())
        out_dir: Path | None = None
        caller_stdout = sys.stdout
        for k, fold in enumerate(folds):
            random.seed(seed + fold)
            np.random.seed(seed + fold)
            torch.manual_seed(seed + fold)
            t0 = time.perf_counter()
            with _quiet():
                plans_copy = json.loads(json.dumps(plans))
                plans_copy["continue_training"] = False  # nnU-Net 2.8 pops this key in __init__
                trainer = trainer_class(plans_copy, configuration, int(fold), dataset_json,
                                        torch.device(device))
                trainer.num_epochs = int(epochs)
                trainer.num_iterations_per_epoch = int(iterations_per_epoch)
                trainer.num_val_iterations_per_epoch = int(val_iterations)
                for key, value in trainer_options.items():
                    if not hasattr(trainer, key):
                        raise TrainingError(f"trainer_options: {trainer_class.__name__} has no attribute {key!r}")
                    setattr(trainer, key, value)
                if hasattr(trainer, "progress"):
                    trainer.progress = _with_stdout(progress, caller_stdout)
                trainer.run_training()
                out_dir = Path(trainer.output_folder_base)
                inference_name = getattr(trainer, "inference_trainer_name", "nnUNetTrainer")
                finalize_for_inference(Path(trainer.output_folder), inference_name)
            dt = time.perf_counter() - t0
            emit(progress, ProgressEvent("fold_done", f"fold {fold} trained in {dt:.1f} s",
                                          (k + 1) / len(folds), {"fold": float(fold), "seconds": dt}), log)
        if out_dir is None:
            raise ValueError("folds: empty")
        return out_dir


def _with_stdout(progress: ProgressCallback | None, stream: Any) -> ProgressCallback | None:
    """Run ``progress`` with ``stream`` as stdout (it is called from inside :func:`_quiet`)."""
    if progress is None:
        return None
    cb = progress

    def call(event: ProgressEvent) -> None:
        with contextlib.redirect_stdout(stream):
            cb(event)

    return call


def train_folds(
    dataset_id: int,
    folds: Sequence[int],
    *,
    preprocessed_root: Path,
    results_root: Path,
    epochs: int,
    iterations_per_epoch: int,
    val_iterations: int = 2,
    trainer_cls: type | str | None = None,
    trainer_options: Mapping[str, Any] | None = None,
    configuration: str = "3d_fullres",
    plans_identifier: str = "nnUNetPlans",
    n_splits: int | None = None,
    device: str | None = None,
    seed: int = 0,
    isolate: bool = True,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Train nnU-Net folds on a preprocessed dataset and return the results folder.

    Parameters
    ----------
    dataset_id
        Preprocessed dataset (see :func:`plan_and_preprocess`).
    folds
        Folds to train, e.g. ``(0, 1, 2)``.
    preprocessed_root, results_root
        ``nnUNet_preprocessed`` and ``nnUNet_results``.
    epochs, iterations_per_epoch, val_iterations
        Schedule (set on the trainer instance after construction).
    trainer_cls
        A subclass of ``nnUNetTrainer`` with nnU-Net's constructor signature, or
        ``"module:ClassName"``; default :data:`DEFAULT_TRAINER`. With ``isolate=True`` it must
        be importable by module name (not defined in ``__main__``).
    trainer_options
        Extra trainer instance attributes to set after construction (e.g.
        ``{"initial_lr": 0.02}``); each must already exist on the trainer. JSON-serializable.
    configuration, plans_identifier
        nnU-Net configuration and plans name.
    n_splits
        Cross-validation folds written to ``splits_final.json`` when that file does not exist
        yet; default ``max(3, max(folds) + 1)``.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
    seed
        numpy/torch/random seed, offset by the fold number.
    isolate
        Train in a child process (``python -m models.training``): nnU-Net's prints,
        worker processes and memory stay out of this process. Progress events are relayed.
    workers
        Child processes training folds concurrently (``isolate`` only). Default on CPU: one
        per fold, at most two per core, each with ``max(1, cores // workers)`` torch threads;
        small 3D nets train much faster as parallel single-threaded processes than with
        several intra-op threads (2 threads were up to 5x slower per step on a busy 2-core
        machine), and 3 folds on 2 cores finish in ~1.5 fold-times instead of 2 rounds.
        Default on CUDA: 1.
    progress
        Receives ``train`` events (one per epoch) and ``fold_done`` events.

    Returns
    -------
    Path
        ``results_root/DatasetXXX_name/<Trainer>__<plans>__<configuration>``, every checkpoint
        rewritten to load with ``nnUNetTrainer`` (no custom trainer needed at inference).
    """
    folds = [int(f) for f in folds]
    if not folds:
        raise ValueError("folds: need at least one fold")
    if epochs < 1 or iterations_per_epoch < 1 or val_iterations < 1:
        raise ValueError("epochs, iterations_per_epoch and val_iterations must be >= 1")
    spec = _trainer_spec(trainer_cls)
    if device is None:
        device = _default_device()
    options = dict(trainer_options or {})
    ds_dir = _find_dataset_dir(Path(preprocessed_root), dataset_id)
    if not (ds_dir / "splits_final.json").exists():
        write_splits(ds_dir, n_splits if n_splits is not None else max(3, max(folds) + 1))

    if not isolate:
        return _train_folds_here(
            dataset_id, folds, preprocessed_root=preprocessed_root, results_root=results_root, epochs=epochs,
            iterations_per_epoch=iterations_per_epoch, val_iterations=val_iterations, trainer_spec=spec,
            configuration=configuration, plans_identifier=plans_identifier, device=device, seed=seed,
            trainer_options=options, progress=progress)

    n_cpu = os.cpu_count() or 1
    if workers is None:
        workers = min(len(folds), 2 * n_cpu) if device == "cpu" else 1
    workers = max(1, min(int(workers), len(folds)))
    groups = [folds[i::workers] for i in range(workers)]
    arg_list = [{
        "dataset_id": dataset_id, "folds": g, "preprocessed_root": str(preprocessed_root),
        "results_root": str(results_root), "epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
        "val_iterations": val_iterations, "trainer_spec": spec, "configuration": configuration,
        "plans_identifier": plans_identifier, "device": device, "seed": seed, "trainer_options": options,
    } for g in groups]
    threads = max(1, n_cpu // workers) if device == "cpu" else None
    results = _run_children("train", arg_list, progress, f"training dataset {dataset_id} folds {folds}",
                            threads=threads)
    return Path(results[0])


def _run_child(task: str, args: Mapping[str, Any], progress: ProgressCallback | None, what: str) -> str:
    """Run ``python -m models.training <task> <json>``, relay its progress, return its result."""
    return _run_children(task, [args], progress, what)[0]


def _run_children(task: str, arg_list: Sequence[Mapping[str, Any]], progress: ProgressCallback | None,
                  what: str, *, threads: int | None = None) -> list[str]:
    """Run one child process per entry of ``arg_list`` concurrently; relay progress in this thread."""
    import queue
    import threading

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("nnUNet_compile", "f")
    env.setdefault("nnUNet_n_proc_DA", "0")
    env.setdefault("nnUNet_def_n_proc", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["I3NODE_TORCH_THREADS"] = str(threads)
    events: queue.Queue[tuple[int, str | None]] = queue.Queue()
    procs = []
    for args in arg_list:
        cmd = [sys.executable, "-m", "models.training", task, json.dumps(dict(args))]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=str(_REPO_ROOT)))

    def pump(i: int, stream: Any) -> None:
        for line in stream:
            events.put((i, line.rstrip("\n")))
        events.put((i, None))

    readers = [threading.Thread(target=pump, args=(i, p.stdout), daemon=True) for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    tails: list[list[str]] = [[] for _ in procs]
    results: list[str | None] = [None] * len(procs)
    open_streams = len(procs)
    try:
        while open_streams:
            i, line = events.get()
            if line is None:
                open_streams -= 1
                continue
            if line.startswith(_PROGRESS_PREFIX):
                payload = json.loads(line[len(_PROGRESS_PREFIX):])
                if "result" in payload:
                    results[i] = str(payload["result"])
                    continue
                emit(progress, ProgressEvent(payload["stage"], payload["message"], payload.get("fraction"),
                                              payload.get("metrics", {})), log)
            else:
                tails[i].append(line)
                del tails[i][:-40]
                log.debug("nnU-Net child %d: %s", i, line)
    finally:
        for p in procs:
            if p.poll() is None and open_streams:
                p.kill()
        codes = [p.wait() for p in procs]
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()
    failed = [i for i, (rc, res) in enumerate(zip(codes, results, strict=True)) if rc != 0 or res is None]
    if failed:
        i = failed[0]
        raise TrainingError(f"{what} failed (exit code {codes[i]}); last output:\n" + "\n".join(tails[i]))
    return [str(r) for r in results]


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def _find_dataset_dir(root: Path, dataset_id: int) -> Path:
    hits = sorted(root.glob(f"Dataset{int(dataset_id):03d}_*"))
    if len(hits) != 1:
        raise TrainingError(f"expected one Dataset{int(dataset_id):03d}_* folder in {root}, found {len(hits)}")
    return hits[0]


# --------------------------------------------------------------------------- one call
def train_presegmentation(
    cases: Sequence[LabelledVolume],
    out_dir: Path,
    *,
    folds: int | Sequence[int] = 3,
    epochs: int = 20,
    iterations_per_epoch: int = 10,
    val_iterations: int = 2,
    class_names: Sequence[str] = ("background", "organ", "lesion"),
    channel_names: Sequence[str] = ("CT",),
    overrides: NetworkOverrides | None = None,
    dataset_id: int = 990,
    name: str = "i3nodePreseg",
    trainer_cls: type | str | None = None,
    device: str | None = None,
    seed: int = 0,
    keep_intermediate: bool = False,
    num_processes: int = 2,
    progress: ProgressCallback | None = None,
    ignore_label: bool = False,
) -> Path:
    """Train a presegmentation ensemble (one nnU-Net fold per member) from labelled volumes.

    Parameters
    ----------
    cases
        Objects with ``image`` ((z, y, x) or (c, z, y, x)), ``labels`` ((z, y, x), values
        ``0..len(class_names)-1``) and ``spacing`` ((z, y, x) mm), e.g.
        ``models.phantoms.Phantom`` or :class:`TrainingCase`.
    out_dir
        Work folder; gets ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``.
    folds
        Number of folds (cross-validation with that many splits) or explicit fold ids.
    epochs, iterations_per_epoch, val_iterations
        Training schedule per fold.
    class_names
        Label names by value; ``class_names[0]`` is stored as ``background``.
    channel_names
        Input channel names (nnU-Net normalization keys, e.g. ``"CT"``).
    overrides
        Network/patch size (see :class:`NetworkOverrides`).
    dataset_id, name
        nnU-Net dataset id and name.
    trainer_cls
        Trainer class or ``"module:ClassName"`` (default :data:`DEFAULT_TRAINER`).
    device
        Training device (default CUDA when available, else CPU).
    seed
        Training seed (offset per fold).
    keep_intermediate
        Keep ``nnUNet_raw`` and ``nnUNet_preprocessed`` (deleted by default once trained).
    num_processes
        Workers for fingerprinting and preprocessing.
    progress
        Receives :class:`ProgressEvent` objects.
    ignore_label
        The labels hold a further value, ``len(class_names)``, for voxels nobody annotated
        (sparse labels, e.g. an expert's corrected planes): nnU-Net's ``ignore`` label, left
        out of the loss.

    Returns
    -------
    Path
        The nnU-Net results folder, loadable with ``models.nnunet.EnsemblePredictor``.
    """
    import shutil

    out_dir = Path(out_dir)
    fold_ids = list(range(folds)) if isinstance(folds, int) else [int(f) for f in folds]
    if not fold_ids:
        raise ValueError("folds: need at least one fold")
    n_splits = max(2, len(fold_ids), max(fold_ids) + 1)
    if len(cases) < max(2, n_splits):
        raise ValueError(f"cases: {n_splits} folds need at least {max(2, n_splits)} cases, got {len(cases)}")
    raw, pre, res = out_dir / "nnUNet_raw", out_dir / "nnUNet_preprocessed", out_dir / "nnUNet_results"
    labels_map = {("background" if i == 0 else str(n)): i for i, n in enumerate(class_names)}
    if ignore_label:
        labels_map["ignore"] = len(class_names)
    t0 = time.perf_counter()
    write_raw_dataset(raw, dataset_id, name, [c.image for c in cases], [c.labels for c in cases],
                      [tuple(c.spacing) for c in cases], dict(enumerate(channel_names)), labels_map)
    emit(progress, ProgressEvent("write", f"wrote {len(cases)} cases in {time.perf_counter() - t0:.1f} s", 1.0), log)
    plan_and_preprocess(dataset_id, raw_root=raw, preprocessed_root=pre, overrides=overrides,
                        num_processes=num_processes, progress=progress)
    write_splits(pre / dataset_name(dataset_id, name), n_splits, seed=12345 + seed)
    model_dir = train_folds(dataset_id, fold_ids, preprocessed_root=pre, results_root=res, epochs=epochs,
                            iterations_per_epoch=iterations_per_epoch, val_iterations=val_iterations,
                            trainer_cls=trainer_cls, device=device, seed=seed, progress=progress)
    if not keep_intermediate:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(pre, ignore_errors=True)
    emit(progress, ProgressEvent("done", f"presegmentation model in {model_dir}", 1.0,
                                  {"seconds": time.perf_counter() - t0}), log)
    return model_dir


# --------------------------------------------------------------------------- child entry
def _exit_with_parent(poll_s: float = 2.0) -> None:
    """Stop this child process when the process that started it goes away."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="i3node-parent-watch", daemon=True).start()


def _child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.training",
                                     description="internal: run nnU-Net planning/training in isolation")
    parser.add_argument("task", choices=("plan", "train"))
    parser.add_argument("args_json")
    ns = parser.parse_args(argv)
    args = json.loads(ns.args_json)
    _exit_with_parent()
    # Keep the real stdout for progress lines; everything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    def relay(event: ProgressEvent) -> None:
        out.write(_PROGRESS_PREFIX + json.dumps({"stage": event.stage, "message": event.message,
                                                 "fraction": event.fraction,
                                                 "metrics": dict(event.metrics)}) + "\n")

    result: Path
    if ns.task == "plan":
        result = _plan_and_preprocess_here(
            int(args["dataset_id"]), raw_root=Path(args["raw_root"]),
            preprocessed_root=Path(args["preprocessed_root"]), configuration=str(args["configuration"]),
            overrides=_overrides_from_json(args["overrides"]), num_processes=int(args["num_processes"]),
            progress=relay, plans_from=Path(args["plans_from"]) if args.get("plans_from") else None)
    else:
        result = _train_folds_here(
            int(args["dataset_id"]), [int(f) for f in args["folds"]],
            preprocessed_root=Path(args["preprocessed_root"]), results_root=Path(args["results_root"]),
            epochs=int(args["epochs"]), iterations_per_epoch=int(args["iterations_per_epoch"]),
            val_iterations=int(args["val_iterations"]), trainer_spec=str(args["trainer_spec"]),
            configuration=str(args["configuration"]), plans_identifier=str(args["plans_identifier"]),
            device=str(args["device"]), seed=int(args["seed"]), trainer_options=args["trainer_options"],
            progress=relay)
    out.write(_PROGRESS_PREFIX + json.dumps({"result": str(result)}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
