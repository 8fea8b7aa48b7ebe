"""Checkpoints of trained nnU-Net folds that load without the trainer that made them.

Importing this module is cheap: torch is imported by :func:`finalize_for_inference`.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["finalize_for_inference"]


def finalize_for_inference(fold_dir: Path, inference_trainer_name: str = "nnUNetTrainer") -> list[Path]:
    """Make the checkpoints of one fold folder loadable without the training trainer class.

    Rewrites ``trainer_name`` in every ``checkpoint_*.pth`` in ``fold_dir`` to
    ``inference_trainer_name`` (a trainer that nnU-Net finds in its own package and that
    builds the same network) and records the original name under ``"i3node_trained_with"``.
    The rewrite goes through a temporary file and ``os.replace``; it is idempotent.

    Parameters
    ----------
    fold_dir
        A ``fold_*`` folder of an nnU-Net results folder.
    inference_trainer_name
        Trainer class name to store.

    Returns
    -------
    list of Path
        The checkpoints that were rewritten (already-final ones are skipped).
    """
    import torch

    rewritten: list[Path] = []
    for ckpt_path in sorted(Path(fold_dir).glob("checkpoint_*.pth")):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("trainer_name") == inference_trainer_name:
            continue
        ckpt.setdefault("i3node_trained_with", ckpt.get("trainer_name"))
        ckpt["trainer_name"] = inference_trainer_name
        tmp = ckpt_path.with_suffix(".pth.tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, ckpt_path)
        rewritten.append(ckpt_path)
    return rewritten
