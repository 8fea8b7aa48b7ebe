"""Small, fast nnU-Net v2 trainers for demo and test models.

This module imports torch and nnunetv2 at import time; import it only where training
happens (``models.training`` imports it lazily).

Inference never needs the classes defined here: :func:`finalize_for_inference` rewrites the
``trainer_name`` stored in every checkpoint of a fold folder to a trainer that ships with
nnU-Net and builds the same network (``nnUNetTrainer`` by default, see
:attr:`nnUNetTrainer_i3nodeTiny.inference_trainer_name`). ``nnUNetPredictor`` therefore loads
the model in any process, with or without this repository on the path. The trainer that
actually produced a checkpoint is kept in the checkpoint under ``"i3node_trained_with"``.

Subclassing (e.g. for a refinement model that simulates corrections during training):
derive from :class:`nnUNetTrainer_i3nodeTiny`, keep the constructor signature of
``nnUNetTrainer`` (``plans, configuration, fold, dataset_json, device``), override
``get_dataloaders``/``train_step`` etc. as needed, and keep ``build_network_architecture``
compatible with ``inference_trainer_name`` (or set ``inference_trainer_name`` to a trainer
importable by every process that runs inference).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from models.checkpoints import finalize_for_inference
from models.progress import ProgressEvent

__all__ = ["nnUNetTrainer_i3nodeTiny", "nnUNetTrainer_i3nodeRefine", "finalize_for_inference"]

log = logging.getLogger(__name__)


class nnUNetTrainer_i3nodeTiny(nnUNetTrainer):  # noqa: N801 - nnU-Net naming convention
    """Short-schedule ``nnUNetTrainer`` for CPU-sized demo models.

    Differences from ``nnUNetTrainer``:

    * schedule from the class attributes :attr:`default_num_epochs`,
      :attr:`default_iterations_per_epoch` and :attr:`default_val_iterations`
      (``models.training.train_folds`` sets the instance attributes ``num_epochs``,
      ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` after construction);
    * never ``torch.compile``; data augmentation runs in the main process unless
      ``nnUNet_n_proc_DA`` says otherwise (``train_folds`` sets it to 0);
    * nnU-Net's console output goes to its log file and to the ``logging`` logger
      ``models.nnunet_trainers`` (DEBUG), never to stdout;
    * no network-architecture plot and no progress PNG per epoch (``write_progress_png``);
    * the final full-resolution validation (``perform_actual_validation``) is skipped:
      it starts worker processes and costs more than the whole training here; evaluate
      the finished model with ``models.nnunet.EnsemblePredictor`` instead;
    * SGD with Nesterov momentum :attr:`optimizer_momentum` (0.9) from :attr:`default_initial_lr`
      (0.05) instead of nnU-Net's 0.99 from 0.01: momentum 0.99 averages over ~100 steps,
      which suits 250 000-step GPU schedules but not a few hundred CPU steps. Measured on the
      demo phantoms (one fold, 8 held-out phantoms): 300 steps with nnU-Net's optimizer left
      the lesion at Dice 0.00 (its largest probability anywhere 0.03); momentum 0.9 reached
      0.87 at lr 0.03 and 0.91 at lr 0.06 within 200 steps (AdamW 3e-3: 0.58);
    * after each epoch, :attr:`progress` (if set) receives a
      :class:`models.training.ProgressEvent` with stage ``"train"`` and metrics
      ``fold``, ``epoch``, ``train_loss``, ``val_loss``, ``pseudo_dice_mean``, ``epoch_time_s``;
    * at the end of training, :func:`finalize_for_inference` rewrites the checkpoints.
    """

    default_num_epochs: int = 20
    default_iterations_per_epoch: int = 10
    default_val_iterations: int = 2
    #: Initial learning rate (poly decay to 0 over the schedule, as nnU-Net).
    default_initial_lr: float = 0.05
    #: SGD (Nesterov) momentum.
    optimizer_momentum: float = 0.9
    #: nnU-Net trainer written into the checkpoints so that inference needs only nnunetv2.
    inference_trainer_name: str = "nnUNetTrainer"
    #: Write nnU-Net's ``progress.png`` at the end of each epoch (slow, matplotlib).
    write_progress_png: bool = False

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's signature
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.default_num_epochs
        self.num_iterations_per_epoch = self.default_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.default_val_iterations
        self.initial_lr = self.default_initial_lr
        self.save_every = 10**9  # only checkpoint_final (and checkpoint_best) are written
        self.progress: Callable[[ProgressEvent], None] | None = None
        if not self.write_progress_png:
            self.logger.plot_progress_png = _no_plot  # type: ignore[method-assign]

    # ------------------------------------------------------------------ quiet, fast
    def _do_i_compile(self) -> bool:
        return False

    def configure_optimizers(self) -> tuple[Any, Any]:
        """SGD with Nesterov momentum :attr:`optimizer_momentum` and nnU-Net's poly schedule."""
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=float(self.optimizer_momentum), nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def print_to_log_file(self, *args: Any, also_print_to_console: bool = True,
                          add_timestamp: bool = True) -> None:
        """Write to nnU-Net's training log file and the Python logger, never to stdout."""
        log_file = getattr(self, "log_file", None)
        if log_file is not None:
            super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)
        text = " ".join(str(a) for a in args).strip()
        if text:
            log.debug("%s", text)

    def plot_network_architecture(self) -> None:
        return None

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("i3node: final validation skipped")

    # ------------------------------------------------------------------ progress
    def on_epoch_end(self) -> None:
        epoch = self.current_epoch
        super().on_epoch_end()
        if self.progress is None:
            return
        lg = self.logger
        try:
            train_loss = float(lg.get_value("train_losses", step=-1))
            val_loss = float(lg.get_value("val_losses", step=-1))
            dice = [float(d) for d in lg.get_value("dice_per_class_or_region", step=-1)]
            epoch_time = float(lg.get_value("epoch_end_timestamps", step=-1)
                               - lg.get_value("epoch_start_timestamps", step=-1))
        except (KeyError, IndexError, TypeError):  # pragma: no cover - logger layout change
            train_loss = val_loss = float("nan")
            dice, epoch_time = [], float("nan")
        metrics = {
            "fold": float(self.fold) if isinstance(self.fold, int) else -1.0,
            "epoch": float(epoch),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "pseudo_dice_mean": float(np.nanmean(dice)) if dice else float("nan"),
            "epoch_time_s": epoch_time,
        }
        self.progress(ProgressEvent(
            stage="train",
            message=(f"fold {self.fold} epoch {epoch + 1}/{self.num_epochs}: "
                     f"train loss {train_loss:.3f}, val loss {val_loss:.3f}, "
                     f"pseudo Dice {metrics['pseudo_dice_mean']:.3f}"),
            fraction=(epoch + 1) / self.num_epochs,
            metrics=metrics,
        ))

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.output_folder is not None:
            finalize_for_inference(Path(self.output_folder), self.inference_trainer_name)


class nnUNetTrainer_i3nodeRefine(nnUNetTrainer_i3nodeTiny):  # noqa: N801 - nnU-Net naming convention
    """Refinement trainer: reviews simulated from the ground truth on the fly.

    See ``models.refinement_training`` for what is simulated and how it is wired. The
    ``dataset_json`` passed in must be the refinement one (every input channel, derived channels
    ``noNorm``, the ``"i3node"`` layout key, optionally the ``ignore`` label for reviewed voxels)
    and the plans must normalise that many channels; the preprocessed data itself holds only
    the image (and prior) channels.
    """

    #: ``models.refinement_training.ReviewSimulation.to_json()`` (set by ``train_folds``).
    review_simulation: dict[str, Any] | None = None

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's signature
    ) -> None:
        from models.refinement import layout_from_dataset_json

        super().__init__(plans, configuration, fold, dataset_json, device)
        self.layout = layout_from_dataset_json(dataset_json)
        schemes = self.configuration_manager.normalization_schemes
        if len(schemes) != self.layout.n_channels:
            raise ValueError(
                f"plans: configuration {configuration!r} normalises {len(schemes)} channel(s) but the "
                f"layout {self.layout.describe()} has {self.layout.n_channels}"
            )
        if self.label_manager.has_regions:
            raise ValueError("dataset_json: region-based datasets are not supported by the refinement trainer")

    def _simulation(self) -> Any:
        from models.refinement_training import ReviewSimulation

        return ReviewSimulation.from_json(self.review_simulation) if self.review_simulation else ReviewSimulation()

    def get_tr_and_val_datasets(self) -> tuple[Any, Any]:
        from models.refinement_training import ReviewSimulatingDataset

        tr, val = super().get_tr_and_val_datasets()
        key = tuple([-1] + list(self.label_manager.all_labels)) if self.label_manager.has_ignore_label else None
        sim = self._simulation()
        return (ReviewSimulatingDataset(tr, self.layout, sim, key), ReviewSimulatingDataset(val, self.layout, sim, key))

    def _review_to_channels(self) -> Any:
        from models.refinement_training import ReviewToChannels

        ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
        return ReviewToChannels(self.layout, self.configuration_manager.spacing, ignore)

    def get_training_transforms(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
        from batchgeneratorsv2.transforms.utils.random import RandomTransform

        from models.refinement_training import ImageChannelsOnly

        compose = super().get_training_transforms(*args, **kwargs)
        n_img = self.layout.image_channels
        transforms = []
        for t in compose.transforms:
            inner = t.transform if isinstance(t, RandomTransform) else t
            if isinstance(inner, ImageOnlyTransform):
                t = ImageChannelsOnly(t, n_img)
            transforms.append(t)
        compose.transforms = transforms
        return _insert_before_ds(compose, self._review_to_channels())

    def get_validation_transforms(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return _insert_before_ds(super().get_validation_transforms(*args, **kwargs), self._review_to_channels())

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        # nnU-Net's final validation would feed image-only cases to a network with derived
        # inputs; evaluate with models.refinement.RefinementModel (i3node evaluate) instead.
        self.print_to_log_file("i3node: final validation skipped (refinement model)")


def _insert_before_ds(compose: Any, transform: Any) -> Any:
    """Insert ``transform`` before nnU-Net's DownsampleSegForDSTransform (or append)."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    transforms = list(compose.transforms)
    pos = next((i for i, t in enumerate(transforms) if isinstance(t, DownsampleSegForDSTransform)), len(transforms))
    transforms.insert(pos, transform)
    compose.transforms = transforms
    return compose


def _no_plot(*_args: Any, **_kwargs: Any) -> None:
    return None
