"""nnU-Net v2 deep-ensemble wrapper: one softmax prediction per ensemble member.

A trained nnU-Net results folder (``.../DatasetXXX_Name/Trainer__Plans__configuration`` with
``dataset.json``, ``plans.json`` and ``fold_*/checkpoint_final.pth``) is used as-is. Every fold
is one member of the deep ensemble. nnU-Net itself, given several folds, averages the raw
network outputs (logits) before the softmax; i3Deep needs each member's probabilities, so
:class:`EnsemblePredictor` runs the folds one at a time on a single preprocessed copy of the
input and converts each fold's logits to probabilities separately.

Importing this module is cheap: torch and nnunetv2 are imported when a predictor is built.
:class:`ModelError` can be caught without torch installed.

Memory: :meth:`EnsemblePredictor.iter_members` yields members one by one, so a consumer
with a running accumulator (``models.uncertainty.EnsembleAccumulator``) holds one member
plus the accumulator, never ``T`` members. :meth:`EnsemblePredictor.predict_members`
stacks all members and is meant for small inputs and tests.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ModelError", "MemberInfo", "EnsemblePredictor", "bare_predictor", "find_folds"]

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A model folder is unusable (missing files, wrong input) - the message names the folder."""


@dataclass(frozen=True)
class MemberInfo:
    """Describes one ensemble member.

    Attributes
    ----------
    fold
        nnU-Net fold (``int`` or ``"all"``).
    mirror_axes
        Spatial axes (0 = z, 1 = y, 2 = x of the preprocessed array) the input was flipped
        along for this member (TTA); ``()`` for the plain prediction.
    mc_pass
        Index of the MC-dropout pass, or ``None`` without MC dropout.
    """

    fold: int | str
    mirror_axes: tuple[int, ...] = ()
    mc_pass: int | None = None

    def describe(self) -> str:
        """Short label such as ``fold 0``, ``fold 1 flip(0, 2)`` or ``fold 2 mc3``."""
        parts = [f"fold {self.fold}"]
        if self.mirror_axes:
            parts.append(f"flip{self.mirror_axes}")
        if self.mc_pass is not None:
            parts.append(f"mc{self.mc_pass}")
        return " ".join(parts)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep nnU-Net's prints out of stdout (forwarded to the logger at DEBUG)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        text = buf.getvalue().strip()
        if text:
            log.debug("nnU-Net: %s", text)


def find_folds(model_dir: Path, checkpoint: str = "checkpoint_final.pth") -> list[int | str]:
    """Folds in ``model_dir`` that have ``checkpoint`` (``fold_0`` ... and ``fold_all``), sorted."""
    folds: list[int | str] = []
    for d in sorted(Path(model_dir).glob("fold_*")):
        if not (d / checkpoint).is_file():
            continue
        tag = d.name[len("fold_"):]
        if tag == "all":
            folds.append("all")
        elif tag.isdigit():
            folds.append(int(tag))
    return sorted(folds, key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))


def _check_model_dir(model_dir: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[int | str]:
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist")
    for name in ("dataset.json", "plans.json"):
        if not (model_dir / name).is_file():
            raise ModelError(f"model folder {model_dir} has no {name} (not an nnU-Net v2 results folder)")
    if folds is None:
        found = find_folds(model_dir, checkpoint)
        if not found:
            fold_dirs = sorted(p.name for p in model_dir.glob("fold_*"))
            if fold_dirs:
                raise ModelError(f"model folder {model_dir}: no fold has {checkpoint} "
                                 f"(fold folders: {', '.join(fold_dirs)})")
            raise ModelError(f"model folder {model_dir} has no fold_* folder")
        return found
    out: list[int | str] = []
    if len(folds) == 0:
        raise ModelError(f"folds: empty selection for model folder {model_dir}")
    for f in folds:
        tag = "all" if f == "all" else int(f)
        fold_dir = model_dir / f"fold_{tag}"
        if not fold_dir.is_dir():
            raise ModelError(f"model folder {model_dir} has no fold_{tag}")
        if not (fold_dir / checkpoint).is_file():
            raise ModelError(f"model folder {model_dir}: fold_{tag} has no {checkpoint}")
        out.append(tag)
    return out


def _resolve_device(device: str | None) -> Any:
    import torch

    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def _new_predictor(device: Any, *, tile_step_size: float, use_mirroring: bool) -> Any:
    """A quiet ``nnUNetPredictor`` subclass that can keep dropout active (MC dropout)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class _Predictor(nnUNetPredictor):  # type: ignore[misc]
        mc_modules: list[Any] = []

        def _internal_maybe_mirror_and_predict(self, x: Any) -> Any:
            for m in self.mc_modules:  # predict_sliding_window_return_logits calls network.eval()
                m.train()
            return super()._internal_maybe_mirror_and_predict(x)

    with _quiet():
        return _Predictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                          perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                          verbose_preprocessing=False, allow_tqdm=False)


def _initialize(predictor: Any, model_dir: Path, folds: Sequence[int | str], checkpoint: str) -> None:
    try:
        with _quiet():
            predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=tuple(folds),
                                                           checkpoint_name=checkpoint)
    except ModelError:
        raise
    except Exception as exc:  # nnU-Net raises bare RuntimeError/KeyError/... on broken folders
        raise ModelError(f"model folder {model_dir}: cannot load folds {list(folds)} ({type(exc).__name__}: "
                         f"{exc})") from exc


class EnsemblePredictor:
    """Per-member softmax probabilities from an nnU-Net v2 results folder.

    Parameters
    ----------
    model_dir
        ``.../DatasetXXX_Name/Trainer__Plans__configuration`` with ``dataset.json``,
        ``plans.json`` and ``fold_*/<checkpoint>``; loaded as-is.
    folds
        Folds to use (``int`` or ``"all"``); default: every ``fold_*`` with the checkpoint.
    checkpoint
        Checkpoint file name in each fold folder.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
    tta
        Mirroring test-time augmentation as extra members: for each fold, one member per
        combination of nnU-Net's allowed mirror axes (identity included; 8 per fold for a
        3D model mirrored on all axes). Each member is a full sliding-window prediction on
        the flipped image, flipped back - it is *not* nnU-Net's ``use_mirroring`` (which
        averages the mirrored logits inside each tile into a single prediction).
    mc_dropout
        Number of Monte-Carlo dropout passes per fold (and per mirror) with the network's
        dropout layers kept active; 0 disables. nnU-Net's default plans have no dropout
        (``dropout_op: null``), so this needs a model trained with dropout in its plans
        (e.g. ``models.training.NetworkOverrides(dropout_p=0.2)``); otherwise
        :class:`ModelError`. Passes are seeded (``seed``) and reproducible.
    tile_step_size
        Sliding-window step as a fraction of the patch size (nnU-Net's default 0.5).
    seed
        Seed for MC-dropout passes.

    Raises
    ------
    ModelError
        The folder lacks ``dataset.json``/``plans.json``, a requested fold or its checkpoint,
        uses region-based labels, or cannot be loaded by nnU-Net.

    Notes
    -----
    Members are ordered fold-major: for each fold, for each mirror combination, for each MC
    pass. The node consumes :meth:`iter_members` with a running accumulator so ``T`` members
    are never held at once; each member costs ``C * z * y * x * 4`` bytes while it exists.
    The input is preprocessed once (nnU-Net's own preprocessing: transpose, crop, resample,
    normalize); each member then runs nnU-Net's sliding window and nnU-Net's conversion back
    to the input geometry, so a member equals ``predict_single_npy_array`` with a predictor
    loaded with that fold alone (and ``use_mirroring=False``).
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = "checkpoint_final.pth",
        device: str | None = None,
        tta: bool = False,
        mc_dropout: int = 0,
        tile_step_size: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.model_dir = Path(model_dir)
        if int(mc_dropout) < 0:
            raise ValueError(f"mc_dropout: must be >= 0, got {mc_dropout}")
        if not 0 < float(tile_step_size) <= 1:
            raise ValueError(f"tile_step_size: must be in (0, 1], got {tile_step_size}")
        self.folds: tuple[int | str, ...] = tuple(_check_model_dir(self.model_dir, folds, checkpoint))
        self.checkpoint = checkpoint
        try:
            self._dataset_json: dict[str, Any] = json.loads((self.model_dir / "dataset.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"model folder {self.model_dir}: unreadable dataset.json ({exc})") from exc
        self._labels = self._parse_labels()
        self._channels = self._parse_channels()
        self.tta = bool(tta)
        self.mc_dropout = int(mc_dropout)
        self.seed = int(seed)

        import torch  # noqa: F401 - heavy imports only now

        self.device = _resolve_device(device)
        self._predictor = _new_predictor(self.device, tile_step_size=float(tile_step_size), use_mirroring=False)
        _initialize(self._predictor, self.model_dir, self.folds, checkpoint)
        self._fold_params: list[Any] = list(self._predictor.list_of_parameters)
        mirror_axes = self._predictor.allowed_mirroring_axes or ()
        if self.tta:
            axes = tuple(int(a) for a in mirror_axes)
            self._mirrors: list[tuple[int, ...]] = [()] + [
                c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        else:
            self._mirrors = [()]
        self._dropout_modules = [m for m in self._predictor.network.modules()
                                 if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        if self.mc_dropout and not self._dropout_modules:
            raise ModelError(f"model folder {self.model_dir}: mc_dropout={self.mc_dropout} requested but the "
                             "network has no dropout layers (plans 'dropout_op' is null)")
        self._members = tuple(
            MemberInfo(fold, mirror, mc)
            for fold in self.folds
            for mirror in self._mirrors
            for mc in (range(self.mc_dropout) if self.mc_dropout else [None])
        )

    # ------------------------------------------------------------------ description
    def _parse_labels(self) -> dict[int, str]:
        labels = self._dataset_json.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise ModelError(f"model folder {self.model_dir}: dataset.json has no 'labels'")
        out: dict[int, str] = {}
        for name, value in labels.items():
            if name == "ignore":
                continue
            if not isinstance(value, int):
                raise ModelError(f"model folder {self.model_dir}: region-based label {name!r}={value!r} "
                                 "is not supported (needs one softmax class per label)")
            out[value] = name
        if sorted(out) != list(range(len(out))):
            raise ModelError(f"model folder {self.model_dir}: labels must be 0..C-1, got {sorted(out)}")
        return out

    def _parse_channels(self) -> tuple[str, ...]:
        ch = self._dataset_json.get("channel_names", self._dataset_json.get("modality"))
        if not isinstance(ch, dict) or not ch:
            raise ModelError(f"model folder {self.model_dir}: dataset.json has no 'channel_names'")
        return tuple(str(ch[k]) for k in sorted(ch, key=int))

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Input channel names from ``dataset.json`` (their order is the channel order)."""
        return self._channels

    @property
    def n_channels(self) -> int:
        """Number of input channels."""
        return len(self._channels)

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> class name, background (0) included."""
        return dict(self._labels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names ordered by label value (index = channel of the probabilities)."""
        return tuple(self._labels[i] for i in range(len(self._labels)))

    @property
    def n_classes(self) -> int:
        """``C``: number of classes including background."""
        return len(self._labels)

    @property
    def members(self) -> tuple[MemberInfo, ...]:
        """The ensemble members, in the order :meth:`iter_members` yields them."""
        return self._members

    @property
    def n_members(self) -> int:
        """``T``: number of members."""
        return len(self._members)

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Network patch size (preprocessed axis order)."""
        return tuple(int(p) for p in self._predictor.configuration_manager.patch_size)

    def describe(self) -> str:
        """One line naming folder, members and device, e.g. for logs."""
        return (f"{self.model_dir.name}: {self.n_members} members "
                f"({', '.join(m.describe() for m in self._members)}) on {self.device}")

    # ------------------------------------------------------------------ prediction
    def _check_input(self, image: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, list[float]]:
        arr = np.asarray(image)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"image: expected (z, y, x) or (c, z, y, x), got shape {np.shape(image)}")
        if arr.shape[0] != self.n_channels:
            raise ModelError(f"model folder {self.model_dir} expects {self.n_channels} input channel(s) "
                             f"{list(self.channel_names)}, got {arr.shape[0]}")
        if min(arr.shape[1:]) < 1:
            raise ValueError(f"image: empty spatial shape {arr.shape[1:]}")
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ValueError(f"image: expected a real numeric array, got dtype {arr.dtype}")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise ValueError("image: contains NaN or infinite values")
        sp = [float(s) for s in spacing]
        if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
            raise ValueError(f"spacing: expected three positive (z, y, x) values, got {tuple(spacing)}")
        return arr, sp

    def _preprocess(self, arr: np.ndarray, spacing: list[float]) -> tuple[Any, dict[str, Any]]:
        from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

        p = self._predictor
        with _quiet():
            ppa = PreprocessAdapterFromNpy([arr], [None], [{"spacing": spacing}], [None], p.plans_manager,
                                           p.dataset_json, p.configuration_manager, num_threads_in_multithreaded=1,
                                           verbose=False)
            dct = next(ppa)
        return dct["data"], dct["data_properties"]

    def _member_probabilities(self, data: Any, properties: dict[str, Any], params: Any,
                              mirror: tuple[int, ...], mc_seed: int | None) -> np.ndarray:
        import torch
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        p = self._predictor
        p.network.load_state_dict(params)
        p.mc_modules = self._dropout_modules if mc_seed is not None else []
        dims = [a + 1 for a in mirror]  # data is (c, z, y, x)
        x = torch.flip(data, dims) if dims else data
        if mc_seed is None:
            rng: Any = contextlib.nullcontext()
        else:  # seeded dropout masks without disturbing the caller's RNG state
            cuda_devices = [] if self.device.type != "cuda" else [
                torch.cuda.current_device() if self.device.index is None else self.device.index]
            rng = torch.random.fork_rng(devices=cuda_devices)
        with _quiet(), rng:
            if mc_seed is not None:
                torch.manual_seed(mc_seed)
            logits = p.predict_sliding_window_return_logits(x)
            if dims:
                logits = torch.flip(logits, dims)
            logits = logits.to("cpu")
            _seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, p.plans_manager, p.configuration_manager, p.label_manager, properties,
                return_probabilities=True)
        return np.asarray(probs, dtype=np.float32)

    def iter_members(self, image: np.ndarray, spacing: Sequence[float]) -> Iterator[np.ndarray]:
        """Yield each member's softmax probabilities, one member at a time.

        Parameters
        ----------
        image
            (z, y, x) for a one-channel model or (c, z, y, x); any real dtype (cast to float32).
        spacing
            Voxel spacing (z, y, x) in mm.

        Yields
        ------
        np.ndarray
            float32 ``(C, z, y, x)`` probabilities (sum 1 over ``C``) in the input's geometry,
            in the order of :attr:`members`. The caller owns each array.

        Raises
        ------
        ModelError
            The channel count differs from the model's ``dataset.json``.
        ValueError
            Malformed image or spacing.
        """
        import torch

        arr, sp = self._check_input(image, spacing)
        data, properties = self._preprocess(arr, sp)
        fold_index = {f: i for i, f in enumerate(self.folds)}
        from nnunetv2.configuration import default_num_processes

        n_threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, n_threads))  # as nnU-Net's predictor does
        try:
            for k, member in enumerate(self._members):
                params = self._fold_params[fold_index[member.fold]]
                mc_seed = None if member.mc_pass is None else self.seed * 100003 + k
                yield self._member_probabilities(data, properties, params, member.mirror_axes, mc_seed)
        finally:
            torch.set_num_threads(n_threads)
            self._predictor.mc_modules = []

    def adapted_probabilities(
        self,
        image: np.ndarray,
        spacing: Sequence[float],
        expert_labels: np.ndarray,
        reviewed: np.ndarray,
        *,
        steps: int = 20,
        lr: float = 1e-3,
        folds: Sequence[int | str] | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Test-time adaptation (papers/001): fine-tune the last layers on the corrected voxels.

        For each fold (member without TTA/MC), a copy of its weights is fine-tuned for ``steps``
        Adam steps on patches centred on reviewed voxels, with a class-balanced cross-entropy
        over the reviewed voxels only; only the last decoder stage and the segmentation head
        learn. The adapted folds then predict the whole volume; the stored weights are never
        changed.

        Parameters
        ----------
        image, spacing
            As for :meth:`iter_members`.
        expert_labels : np.ndarray
            Integer ``(z, y, x)`` labels, read on ``reviewed`` voxels.
        reviewed : np.ndarray
            Boolean ``(z, y, x)`` mask of the reviewed voxels.
        steps : int, optional
            Optimisation steps per fold (>= 0; 0 is the plain ensemble).
        lr : float, optional
            Adam learning rate.
        folds : sequence, optional
            Folds to adapt and average; default every fold of the ensemble.
        seed : int, optional
            Seed of the patch sampling.

        Returns
        -------
        np.ndarray
            float32 ``(C, z, y, x)``: mean of the adapted folds' softmax probabilities.
        """
        import torch
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        arr, sp = self._check_input(image, spacing)
        expert_labels = np.asarray(expert_labels)
        reviewed = np.asarray(reviewed, dtype=bool)
        if expert_labels.shape != arr.shape[1:] or reviewed.shape != arr.shape[1:]:
            raise ValueError(f"expert_labels {expert_labels.shape} and reviewed {reviewed.shape} must have the "
                             f"image's shape {arr.shape[1:]}")
        if int(steps) < 0:
            raise ValueError(f"steps: must be >= 0, got {steps}")
        chosen = list(self.folds) if folds is None else [("all" if f == "all" else int(f)) for f in folds]
        unknown = [f for f in chosen if f not in self.folds]
        if not chosen or unknown:
            raise ValueError(f"folds: {unknown or chosen} not among the ensemble's folds {list(self.folds)}")
        code = np.where(reviewed, expert_labels.astype(np.int16) + 1, 0).astype(np.int16)
        p = self._predictor
        with _quiet():
            preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
            data_np, code_pp, properties = preprocessor.run_case_npy(
                arr, code[None].astype(np.float32), {"spacing": sp}, p.plans_manager, p.configuration_manager,
                p.dataset_json)
        data = torch.from_numpy(np.ascontiguousarray(data_np)).float()
        target = torch.from_numpy(np.maximum(np.asarray(code_pp[0], dtype=np.int64) - 1, -1))  # -1: not reviewed
        net = p.network
        fold_index = {f: i for i, f in enumerate(self.folds)}
        trainable = _adaptable_modules(net)
        gen = torch.Generator().manual_seed(int(seed))
        total: np.ndarray | None = None
        n_threads = torch.get_num_threads()
        from nnunetv2.configuration import default_num_processes

        torch.set_num_threads(min(default_num_processes, n_threads))
        try:
            for fold in chosen:
                net.load_state_dict(self._fold_params[fold_index[fold]])
                if steps and (target >= 0).any():
                    _adapt(net, trainable, data, target, self.n_classes, self.patch_size, int(steps), float(lr),
                           gen, self.device)
                with _quiet(), torch.no_grad():
                    logits = p.predict_sliding_window_return_logits(data).to("cpu")
                    _seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
                        logits, p.plans_manager, p.configuration_manager, p.label_manager, properties,
                        return_probabilities=True)
                probs = np.asarray(probs, dtype=np.float32)
                total = probs if total is None else total + probs
        finally:
            torch.set_num_threads(n_threads)
            for m in net.modules():
                for prm in m.parameters(recurse=False):
                    prm.requires_grad_(False)
        if total is None:  # pragma: no cover - chosen is never empty
            raise ModelError(f"model folder {self.model_dir}: no fold adapted")
        return total / np.float32(len(chosen))

    def predict_members(self, image: np.ndarray, spacing: Sequence[float],
                        dtype: type[np.floating[Any]] | np.dtype[Any] = np.float32) -> np.ndarray:
        """All members stacked: ``(T, C, z, y, x)`` - for small inputs and tests.

        Parameters
        ----------
        image, spacing
            As for :meth:`iter_members`.
        dtype
            ``np.float32`` (default) or ``np.float16`` to halve memory.

        Returns
        -------
        np.ndarray
            ``(T, C, z, y, x)`` probabilities of type ``dtype``.
        """
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)):
            raise ValueError(f"dtype: expected float16, float32 or float64, got {dt}")
        out: np.ndarray | None = None
        for t, member in enumerate(self.iter_members(image, spacing)):
            if out is None:
                out = np.empty((self.n_members, *member.shape), dtype=dt)
            out[t] = member
        if out is None:  # pragma: no cover - n_members >= 1 by construction
            raise ModelError(f"model folder {self.model_dir}: no members")
        return out


def _adaptable_modules(network: Any) -> list[Any]:
    """The last decoder stage and the segmentation head(s) of an nnU-Net network."""
    decoder = getattr(network, "decoder", None)
    mods = []
    if decoder is not None and hasattr(decoder, "stages") and len(decoder.stages):
        mods.append(decoder.stages[-1])
    if decoder is not None and hasattr(decoder, "seg_layers"):
        mods.append(decoder.seg_layers[-1] if len(decoder.seg_layers) else decoder.seg_layers)
    if not mods:
        raise ModelError("test-time adaptation needs an nnU-Net encoder-decoder network (decoder.stages, seg_layers)")
    return mods


def _adapt(net: Any, modules: Sequence[Any], data: Any, target: Any, n_classes: int, patch: Sequence[int],
           steps: int, lr: float, gen: Any, device: Any) -> None:
    """Fine-tune ``modules`` of ``net`` in place on the reviewed voxels (``target >= 0``)."""
    import torch

    for prm in net.parameters():
        prm.requires_grad_(False)
    params = [prm for m in modules for prm in m.parameters()]
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    spatial = tuple(int(s) for s in data.shape[1:])
    size = [min(int(ps), s) for ps, s in zip(patch, spatial, strict=True)]
    reviewed = torch.nonzero(target >= 0)
    counts = torch.bincount(target[target >= 0], minlength=n_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight.to(device), ignore_index=-1)
    net.eval()
    for _ in range(steps):
        centre = reviewed[int(torch.randint(len(reviewed), (1,), generator=gen))]
        lo = [int(min(max(int(c) - sz // 2, 0), s - sz)) for c, sz, s in zip(centre, size, spatial, strict=True)]
        sl = tuple(slice(a, a + sz) for a, sz in zip(lo, size, strict=True))
        x = data[(slice(None), *sl)][None]
        y = target[sl][None]
        x = _pad_to(x, patch)
        y = _pad_to(y[:, None], patch, value=-1)[:, 0]
        opt.zero_grad()
        with torch.enable_grad():
            out = net(x.to(device))
            if isinstance(out, (list, tuple)):
                out = out[0]
            loss = loss_fn(out, y.to(device))
            loss.backward()
        opt.step()


def _pad_to(x: Any, patch: Sequence[int], value: float = 0.0) -> Any:
    """Pad a ``(b, c, z, y, x)`` tensor at the end of each spatial axis up to ``patch``."""
    import torch

    pad: list[int] = []
    for ps, s in reversed(list(zip(patch, x.shape[2:], strict=True))):
        pad += [0, max(0, int(ps) - int(s))]
    return torch.nn.functional.pad(x, pad, value=value) if any(pad) else x


def bare_predictor(
    model_dir: Path | str,
    *,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    device: str | None = None,
    use_mirroring: bool = False,
    tile_step_size: float = 0.5,
) -> Any:
    """A plain, quiet ``nnUNetPredictor`` loaded with the same folds (benchmark baseline).

    ``predictor.predict_single_npy_array(image[None], {"spacing": list(spacing)}, None, None, True)``
    then returns nnU-Net's own ensemble: the logits of all folds averaged before the softmax.

    Raises
    ------
    ModelError
        As for :class:`EnsemblePredictor`.
    """
    model_dir = Path(model_dir)
    fold_list = _check_model_dir(model_dir, folds, checkpoint)
    dev = _resolve_device(device)
    predictor = _new_predictor(dev, tile_step_size=tile_step_size, use_mirroring=use_mirroring)
    _initialize(predictor, model_dir, fold_list, checkpoint)
    return predictor
