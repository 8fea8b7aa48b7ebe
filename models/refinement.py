"""i3Deep refinement: encode expert corrections and run the refinement nnU-Net.

The refinement model is a standard nnU-Net v2 model whose input is the image channel(s),
optionally the presegmentation ensemble's mean probabilities (*prior channels*), then
*correction channels* built from the expert's corrected slices (papers/000 section 3.2.4,
design "Refinement input"), and optionally *distance channels*. :class:`InputLayout` describes
which of them a model takes; :func:`build_input` builds them in that order:

* image channel(s), normalised by nnU-Net as planned (e.g. ``"CT"``);
* prior (``InputLayout.prior``): the ensemble's mean probability of every foreground class,
  so the network starts from the presegmentation instead of being a weaker fourth model;
* corrections, as the :class:`Encoding` says:

* :attr:`Encoding.I3DEEP` - exactly as i3Deep: one binary channel per foreground class,
  1 where the expert labelled that class on a reviewed slice, 0 everywhere else.
* :attr:`Encoding.I3DEEP_REVIEWED` - the same plus a last ``reviewed`` channel, 1 on every
  voxel of every reviewed slice, so the model can tell "the expert says background" from
  "nobody looked here";

* distance (``InputLayout.distance``): per foreground class ``exp(-d / DISTANCE_SCALE_MM)``
  with ``d`` the Euclidean distance in mm to the nearest voxel the expert labelled with that
  class (0 where the expert drew none), so a corrected plane is visible across a whole patch.

How a results folder declares its encoding
------------------------------------------
nnU-Net picks each channel's normalisation from its name when planning (``"CT"`` -> CT
normalisation, ``"noNorm"`` -> none, anything else -> z-score) and stores the choice per
channel in ``plans.json`` (``normalization_schemes``), which is what inference applies.
The refinement model's ``dataset.json`` therefore lists **all** input channels: the image
channel names first (e.g. ``"CT"``) and one ``"noNorm"`` entry per correction channel, so the
0/1 correction channels reach the network unchanged (and a re-plan of that dataset.json would
choose the same).  Because several channels share the name ``"noNorm"``, the encoding is also
stated explicitly under an extra top-level key that nnU-Net ignores::

    "channel_names": {"0": "CT", "1": "noNorm", ..., "7": "noNorm"},
    "i3node": {"format": 2, "encoding": "i3deep+reviewed", "image_channels": 1,
               "prior": true, "distance": true,
               "channels": ["image", "prior:organ", "prior:lesion", "organ", "lesion",
                            "reviewed", "distance:organ", "distance:lesion"],
               "correction_channels": ["organ", "lesion", "reviewed"],
               "classes": {"1": "organ", "2": "lesion"}}

:func:`layout_from_dataset_json` reads the ``"i3node"`` key (format 1 models, written before
prior and distance channels existed, read as ``prior=False, distance=False``) and, when it is
absent, falls back to counting the trailing ``noNorm`` channels against the number of
foreground labels (i3Deep's plain layout).

Training and inference geometry
-------------------------------
During training (``models.refinement_training``) the correction channels are drawn on the
preprocessed volume and stay exactly binary through augmentation.  At inference nnU-Net's own
preprocessing runs on the encoded input: where the volume's spacing differs from the plans'
target spacing, nnU-Net resamples every channel with its image interpolation (order 3), so
the correction channels reach the network slightly smoothed.  The final labels are forced to
the expert's on every reviewed voxel in the original geometry either way.

torch and nnunetv2 are imported lazily, only by :class:`RefinementModel` (through
``models.nnunet.EnsemblePredictor``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DISTANCE_SCALE_MM",
    "Encoding",
    "I3NODE_KEY",
    "InputLayout",
    "NO_NORM",
    "RefinementModel",
    "RefinementModelError",
    "build_input",
    "correction_channel_names",
    "distance_channels",
    "encode_corrections",
    "force_reviewed",
    "layout_from_dataset_json",
    "refinement_dataset_json",
    "reviewed_mask",
]

I3NODE_KEY = "i3node"
"""Top-level ``dataset.json`` key holding the refinement encoding (ignored by nnU-Net)."""

NO_NORM = "noNorm"
"""nnU-Net channel name that maps to ``NoNormalization``."""

REVIEWED_CHANNEL = "reviewed"
_FORMAT_VERSION = 2
DISTANCE_SCALE_MM = 10.0
"""Decay length of the distance channels: ``exp(-d / DISTANCE_SCALE_MM)``."""


class Encoding(str, Enum):
    """How expert corrections are fed to the refinement network.

    Attributes
    ----------
    I3DEEP
        One binary channel per foreground class (1 where the expert labelled that class on a
        reviewed slice, 0 elsewhere), exactly as i3Deep.
    I3DEEP_REVIEWED
        :attr:`I3DEEP` plus a final ``reviewed`` channel, 1 on every reviewed voxel.
    """

    I3DEEP = "i3deep"
    I3DEEP_REVIEWED = "i3deep+reviewed"

    def n_correction_channels(self, n_classes: int) -> int:
        """Number of correction channels for ``n_classes`` classes (background included)."""
        n_classes = _check_n_classes(n_classes)
        return (n_classes - 1) + (1 if self is Encoding.I3DEEP_REVIEWED else 0)


class RefinementModelError(RuntimeError):
    """A refinement results folder is incomplete or inconsistent with its inputs."""


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------


def _check_n_classes(n_classes: int) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2 (background included), got {n_classes!r}")
    return int(n_classes)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise ValueError(f"shape must be a sequence of 3 positive integers, got {shape!r}") from exc
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {shape!r}")
    return dims  # type: ignore[return-value]


def reviewed_mask(
    shape: Sequence[int], reviewed: Mapping[int, Sequence[int]] | np.ndarray
) -> np.ndarray:
    """Boolean mask of every voxel lying on a reviewed slice.

    Parameters
    ----------
    shape : sequence of int
        Volume shape ``(z, y, x)``.
    reviewed : mapping of int to sequence of int, or np.ndarray
        Axis (0, 1 or 2) -> indices of the reviewed slices along that axis, as returned by
        ``models.acquisition.select_slices``.  A boolean array of ``shape`` is accepted too and
        returned as a copy (for reviewed regions that are not whole slices).

    Returns
    -------
    np.ndarray
        bool ``(z, y, x)``; True on every voxel of every reviewed slice along any axis.

    Raises
    ------
    ValueError
        If ``shape`` is not 3-D, an axis is not 0/1/2 or an index is out of range.
    """
    dims = _check_shape(shape)
    if isinstance(reviewed, np.ndarray):
        if reviewed.shape != dims:
            raise ValueError(f"reviewed mask has shape {reviewed.shape}, expected {dims}")
        if reviewed.dtype != bool:
            raise ValueError(f"reviewed mask must be boolean, got dtype {reviewed.dtype}")
        return reviewed.copy()
    if not isinstance(reviewed, Mapping):
        raise ValueError(f"reviewed must be a mapping axis -> slice indices or a bool array, got {type(reviewed)}")
    mask = np.zeros(dims, dtype=bool)
    for axis, indices in reviewed.items():
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or int(axis) not in (0, 1, 2):
            raise ValueError(f"reviewed: axis must be 0, 1 or 2, got {axis!r}")
        axis = int(axis)
        idx = np.asarray(list(indices), dtype=np.int64) if len(indices) else np.zeros(0, np.int64)
        if idx.ndim != 1:
            raise ValueError(f"reviewed[{axis}] must be a flat sequence of slice indices")
        if idx.size and (idx.min() < 0 or idx.max() >= dims[axis]):
            raise ValueError(
                f"reviewed[{axis}] has slice indices outside [0, {dims[axis] - 1}]: {sorted(set(idx.tolist()))}"
            )
        index: list[Any] = [slice(None)] * 3
        index[axis] = idx
        mask[tuple(index)] = True
    return mask


def correction_channel_names(encoding: Encoding, class_names: Sequence[str]) -> list[str]:
    """Descriptive names of the correction channels, in channel order.

    Parameters
    ----------
    encoding : Encoding
        The correction encoding.
    class_names : sequence of str
        Names of all classes, background first.

    Returns
    -------
    list of str
        One name per foreground class, then ``"reviewed"`` for :attr:`Encoding.I3DEEP_REVIEWED`.
    """
    encoding = Encoding(encoding)
    names = list(class_names)
    _check_n_classes(len(names))
    out = [str(n) for n in names[1:]]
    if encoding is Encoding.I3DEEP_REVIEWED:
        out.append(REVIEWED_CHANNEL)
    return out


def encode_corrections(
    image: np.ndarray,
    expert_labels: np.ndarray,
    reviewed: Mapping[int, Sequence[int]] | np.ndarray,
    n_classes: int,
    encoding: Encoding = Encoding.I3DEEP_REVIEWED,
) -> np.ndarray:
    """Build the refinement network input: image channel(s) + correction channels.

    Parameters
    ----------
    image : np.ndarray
        ``(z, y, x)`` or ``(c, z, y, x)`` image (unnormalised; nnU-Net normalises it).
    expert_labels : np.ndarray
        Integer ``(z, y, x)`` labels; only voxels on reviewed slices are read.
    reviewed : mapping of int to sequence of int, or np.ndarray
        Reviewed slices (axis -> indices) or a boolean mask, see :func:`reviewed_mask`.
    n_classes : int
        Number of classes including background; foreground classes are ``1 .. n_classes-1``.
    encoding : Encoding, optional
        Correction encoding (default :attr:`Encoding.I3DEEP_REVIEWED`).

    Returns
    -------
    np.ndarray
        float32 ``(c + n_correction_channels, z, y, x)``: the image channels, then channel
        ``c + k - 1`` = 1 where a reviewed voxel has expert label ``k`` (k = 1 .. n_classes-1),
        then (``I3DEEP_REVIEWED`` only) the ``reviewed`` mask.

    Raises
    ------
    ValueError
        On shape mismatches, non-integer labels or labels outside ``[0, n_classes)`` on
        reviewed voxels.
    """
    encoding = Encoding(encoding)
    n_classes = _check_n_classes(n_classes)
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"image must be (z, y, x) or (c, z, y, x), got shape {image.shape}")
    expert_labels = np.asarray(expert_labels)
    if expert_labels.shape != image.shape[1:]:
        raise ValueError(
            f"expert_labels shape {expert_labels.shape} does not match the image's {image.shape[1:]}"
        )
    if not np.issubdtype(expert_labels.dtype, np.integer):
        raise ValueError(f"expert_labels must have an integer dtype, got {expert_labels.dtype}")
    mask = reviewed_mask(expert_labels.shape, reviewed)
    on_slices = expert_labels[mask]
    if on_slices.size and (on_slices.min() < 0 or on_slices.max() >= n_classes):
        raise ValueError(
            f"expert_labels on reviewed voxels must lie in [0, {n_classes - 1}], "
            f"found [{on_slices.min()}, {on_slices.max()}]"
        )
    n_extra = encoding.n_correction_channels(n_classes)
    out = np.zeros((image.shape[0] + n_extra, *image.shape[1:]), dtype=np.float32)
    out[: image.shape[0]] = image
    c0 = image.shape[0]
    for k in range(1, n_classes):
        out[c0 + k - 1] = mask & (expert_labels == k)
    if encoding is Encoding.I3DEEP_REVIEWED:
        out[-1] = mask
    return out


@dataclass(frozen=True)
class InputLayout:
    """The input channels a refinement network takes, in order.

    Attributes
    ----------
    class_names : tuple of str
        All classes, background first.
    image_channels : int
        Number of image channels (first).
    prior : bool
        Then one channel per foreground class: the presegmentation ensemble's mean probability.
    encoding : Encoding
        Then the correction channels (see :class:`Encoding`).
    distance : bool
        Then one channel per foreground class: ``exp(-d / DISTANCE_SCALE_MM)``, ``d`` the
        distance in mm to the nearest reviewed voxel the expert gave that class.
    """

    class_names: tuple[str, ...]
    image_channels: int = 1
    prior: bool = False
    encoding: Encoding = Encoding.I3DEEP_REVIEWED
    distance: bool = False

    def __post_init__(self) -> None:
        _check_n_classes(len(self.class_names))
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        object.__setattr__(self, "encoding", Encoding(self.encoding))
        if isinstance(self.image_channels, bool) or not isinstance(self.image_channels, (int, np.integer)) \
                or self.image_channels < 1:
            raise ValueError(f"image_channels must be an integer >= 1, got {self.image_channels!r}")

    @property
    def n_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    @property
    def foreground(self) -> tuple[str, ...]:
        """Foreground class names."""
        return self.class_names[1:]

    def channel_roles(self) -> list[str]:
        """One role per input channel: ``image``, ``prior:<class>``, ``<class>``, ``reviewed``, ``distance:<class>``."""
        roles = ["image"] * int(self.image_channels)
        if self.prior:
            roles += [f"prior:{c}" for c in self.foreground]
        roles += correction_channel_names(self.encoding, self.class_names)
        if self.distance:
            roles += [f"distance:{c}" for c in self.foreground]
        return roles

    @property
    def n_channels(self) -> int:
        """Total number of input channels."""
        return len(self.channel_roles())

    @property
    def n_derived_channels(self) -> int:
        """Channels after the image ones (prior, corrections, distance)."""
        return self.n_channels - int(self.image_channels)

    def describe(self) -> str:
        """Short label, e.g. ``image+prior+i3deep+reviewed+distance``."""
        parts = ["image"] + (["prior"] if self.prior else []) + [self.encoding.value] + \
            (["distance"] if self.distance else [])
        return "+".join(parts)


def distance_channels(
    expert_labels: np.ndarray,
    mask: np.ndarray,
    n_classes: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Per foreground class, ``exp(-d / DISTANCE_SCALE_MM)`` of the distance to its corrections.

    Parameters
    ----------
    expert_labels : np.ndarray
        Integer ``(z, y, x)`` labels; read on ``mask`` only.
    mask : np.ndarray
        Boolean reviewed mask of the same shape.
    n_classes : int
        Number of classes, background included.
    spacing : sequence of float, optional
        Voxel spacing ``(z, y, x)`` in mm.

    Returns
    -------
    np.ndarray
        float32 ``(n_classes - 1, z, y, x)`` in ``[0, 1]``: 1 on the voxels the expert gave
        that class, decaying with distance, all 0 where the expert gave it nowhere.
    """
    from scipy import ndimage

    n_classes = _check_n_classes(n_classes)
    labels = np.asarray(expert_labels)
    mask = np.asarray(mask, dtype=bool)
    if labels.shape != mask.shape or labels.ndim != 3:
        raise ValueError(f"expert_labels {labels.shape} and mask {mask.shape} must be the same (z, y, x) shape")
    sp = _check_spacing(spacing)
    out = np.zeros((n_classes - 1, *labels.shape), dtype=np.float32)
    for k in range(1, n_classes):
        seeds = mask & (labels == k)
        if not seeds.any():
            continue
        d = ndimage.distance_transform_edt(~seeds, sampling=sp)
        out[k - 1] = np.exp(-np.asarray(d, dtype=np.float32) / np.float32(DISTANCE_SCALE_MM))
    return out


def build_input(
    layout: InputLayout,
    image: np.ndarray,
    expert_labels: np.ndarray,
    reviewed: Mapping[int, Sequence[int]] | np.ndarray,
    *,
    prior: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """All input channels of a refinement network, in :meth:`InputLayout.channel_roles` order.

    Parameters
    ----------
    layout : InputLayout
        The network's input layout.
    image : np.ndarray
        ``(z, y, x)`` or ``(c, z, y, x)`` image, unnormalised.
    expert_labels : np.ndarray
        Integer ``(z, y, x)`` labels; read on reviewed voxels only.
    reviewed : mapping or np.ndarray
        Reviewed slices (axis -> indices) or a boolean mask.
    prior : np.ndarray, optional
        ``(C, z, y, x)`` ensemble mean probabilities (all classes, background first); required
        when ``layout.prior``.
    spacing : sequence of float, optional
        Voxel spacing ``(z, y, x)`` in mm (for the distance channels).

    Returns
    -------
    np.ndarray
        float32 ``(layout.n_channels, z, y, x)``.

    Raises
    ------
    ValueError
        If the image has the wrong number of channels, the prior is missing or has the wrong
        shape, or the corrections are invalid (see :func:`encode_corrections`).
    """
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != layout.image_channels:
        raise ValueError(f"image must have {layout.image_channels} channel(s) (z, y, x), got shape {image.shape}")
    spatial = image.shape[1:]
    encoded = encode_corrections(image, expert_labels, reviewed, layout.n_classes, layout.encoding)
    parts = [encoded[: layout.image_channels]]
    if layout.prior:
        if prior is None:
            raise ValueError("prior: this refinement model takes the presegmentation's probabilities; none given")
        prior = np.asarray(prior)
        if prior.shape != (layout.n_classes, *spatial):
            raise ValueError(f"prior must have shape {(layout.n_classes, *spatial)} (C, z, y, x), got {prior.shape}")
        parts.append(prior[1:].astype(np.float32, copy=False))
    parts.append(encoded[layout.image_channels:])
    if layout.distance:
        mask = reviewed_mask(spatial, reviewed)
        parts.append(distance_channels(np.asarray(expert_labels), mask, layout.n_classes, spacing))
    return np.concatenate(parts, axis=0).astype(np.float32, copy=False)


def force_reviewed(pred: np.ndarray, expert_labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return ``pred`` with every reviewed voxel set to the expert's label.

    Parameters
    ----------
    pred : np.ndarray
        Predicted labels ``(z, y, x)``.
    expert_labels : np.ndarray
        Expert labels, same shape.
    mask : np.ndarray
        Boolean reviewed mask, same shape.

    Returns
    -------
    np.ndarray
        A new array with ``pred``'s dtype; ``pred`` is not modified.

    Raises
    ------
    ValueError
        If shapes differ or ``mask`` is not boolean.
    """
    pred = np.asarray(pred)
    expert_labels = np.asarray(expert_labels)
    mask = np.asarray(mask)
    if expert_labels.shape != pred.shape:
        raise ValueError(f"expert_labels shape {expert_labels.shape} differs from pred's {pred.shape}")
    if mask.shape != pred.shape:
        raise ValueError(f"mask shape {mask.shape} differs from pred's {pred.shape}")
    if mask.dtype != bool:
        raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
    out = pred.copy()
    out[mask] = expert_labels[mask].astype(pred.dtype)
    return out


def refinement_dataset_json(
    base: Mapping[str, Any],
    encoding: Encoding,
    *,
    n_image_channels: int | None = None,
    prior: bool = False,
    distance: bool = False,
) -> dict[str, Any]:
    """Turn an image-only nnU-Net ``dataset.json`` into the refinement model's one.

    Parameters
    ----------
    base : mapping
        ``dataset.json`` of the image-only dataset (``channel_names``, ``labels`` ...).
    encoding : Encoding
        Correction encoding the model is trained with.
    n_image_channels : int, optional
        Number of image channels; default ``len(base["channel_names"])``.
    prior, distance : bool, optional
        Whether the model also takes prior and distance channels (see :class:`InputLayout`).

    Returns
    -------
    dict
        A copy with every channel after the image ones appended to ``channel_names`` as
        ``"noNorm"`` and the ``"i3node"`` key describing the layout.
    """
    encoding = Encoding(encoding)
    out = json.loads(json.dumps(dict(base)))
    if "channel_names" not in out or "labels" not in out:
        raise ValueError("base must be an nnU-Net dataset.json with 'channel_names' and 'labels'")
    names = [out["channel_names"][k] for k in sorted(out["channel_names"], key=int)]
    n_img = len(names) if n_image_channels is None else int(n_image_channels)
    if not 1 <= n_img <= len(names):
        raise ValueError(f"n_image_channels must be in [1, {len(names)}], got {n_image_channels!r}")
    class_names = _class_names(out["labels"])
    layout = InputLayout(tuple(class_names), n_img, bool(prior), encoding, bool(distance))
    names = names[:n_img] + [NO_NORM] * layout.n_derived_channels
    out["channel_names"] = {str(i): n for i, n in enumerate(names)}
    out[I3NODE_KEY] = {
        "format": _FORMAT_VERSION,
        "encoding": encoding.value,
        "image_channels": n_img,
        "prior": layout.prior,
        "distance": layout.distance,
        "channels": layout.channel_roles(),
        "correction_channels": correction_channel_names(encoding, class_names),
        "classes": {str(i): n for i, n in enumerate(class_names) if i > 0},
    }
    return out


def _class_names(labels: Mapping[str, Any]) -> list[str]:
    """Class names ordered by label value from a dataset.json ``labels`` dict (``ignore`` skipped)."""
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            raise ValueError("region-based label definitions are not supported by the refinement model")
        by_value[int(value)] = str(name)
    if sorted(by_value) != list(range(len(by_value))):
        raise ValueError(f"dataset.json labels must be consecutive from 0, got {sorted(by_value)}")
    return [by_value[i] for i in range(len(by_value))]


def layout_from_dataset_json(dataset_json: Mapping[str, Any]) -> InputLayout:
    """Read the input layout a refinement model expects.

    Parameters
    ----------
    dataset_json : mapping
        The model's ``dataset.json`` (as loaded from the results folder).

    Returns
    -------
    InputLayout
        From the ``"i3node"`` key when present (format 1 has neither prior nor distance
        channels); otherwise i3Deep's plain layout inferred by counting the trailing
        ``noNorm`` channels: ``n_foreground`` -> :attr:`Encoding.I3DEEP`, ``n_foreground + 1``
        -> :attr:`Encoding.I3DEEP_REVIEWED` (at least one image channel must remain).

    Raises
    ------
    ValueError
        If the key is malformed, inconsistent with the channels, or the channels do not match
        either encoding.
    """
    if not isinstance(dataset_json, Mapping):
        raise ValueError(f"dataset_json must be a mapping, got {type(dataset_json)}")
    channels = dataset_json.get("channel_names")
    labels = dataset_json.get("labels")
    if not isinstance(channels, Mapping) or not isinstance(labels, Mapping):
        raise ValueError("dataset_json needs 'channel_names' and 'labels' mappings")
    names = [str(channels[k]) for k in sorted(channels, key=int)]
    class_names = tuple(_class_names(labels))
    n_fg = len(class_names) - 1
    if n_fg < 1:
        raise ValueError("dataset_json declares no foreground label")
    meta = dataset_json.get(I3NODE_KEY)
    if meta is not None:
        if not isinstance(meta, Mapping) or "encoding" not in meta:
            raise ValueError(f"dataset_json[{I3NODE_KEY!r}] must be a mapping with an 'encoding' entry")
        try:
            enc = Encoding(meta["encoding"])
        except ValueError:
            allowed = ", ".join(repr(e.value) for e in Encoding)
            raise ValueError(
                f"dataset_json[{I3NODE_KEY!r}]['encoding'] = {meta['encoding']!r} is not one of {allowed}"
            ) from None
        prior, distance = bool(meta.get("prior", False)), bool(meta.get("distance", False))
        n_derived = InputLayout(class_names, 1, prior, enc, distance).n_derived_channels
        n_img = int(meta.get("image_channels", len(names) - n_derived))
        if n_img < 1 or n_img + n_derived != len(names):
            raise ValueError(
                f"dataset_json declares encoding {enc.value!r} (prior {prior}, distance {distance}) with "
                f"{n_img} image channel(s) and {n_fg} foreground class(es), but lists {len(names)} channels"
            )
        return InputLayout(class_names, n_img, prior, enc, distance)
    trailing = 0
    for name in reversed(names):
        if name.casefold() != NO_NORM.casefold():
            break
        trailing += 1
    exact = [e for e in Encoding if e.n_correction_channels(n_fg + 1) == trailing
             and len(names) - trailing >= 1]
    if len(exact) == 1:
        return InputLayout(class_names, len(names) - trailing, False, exact[0], False)
    raise ValueError(
        f"cannot infer the refinement encoding from channel_names {names} with {n_fg} foreground "
        f"class(es); add a {I3NODE_KEY!r} key stating it"
    )


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


def _find_fold_dirs(model_dir: Path, checkpoint_name: str) -> list[str]:
    folds: list[str] = []
    for d in sorted(model_dir.glob("fold_*")):
        if (d / checkpoint_name).is_file():
            folds.append(d.name[len("fold_"):])
    return folds


def _fold_arg(fold: str) -> int | str:
    return int(fold) if fold.isdigit() else fold


class RefinementModel:
    """A trained refinement nnU-Net loaded from a standard nnU-Net v2 results folder.

    Parameters
    ----------
    model_dir : str or Path
        The trainer folder (``.../<Trainer>__<Plans>__<config>``) holding ``dataset.json``,
        ``plans.json`` and ``fold_*/checkpoint_final.pth``.
    device : str, optional
        ``"cuda"``, ``"cuda:1"``, ``"cpu"`` ...; default CUDA when available, else CPU.
    folds : sequence of int or str, optional
        Folds to use; default every ``fold_*`` folder that holds the checkpoint.
    checkpoint_name : str, optional
        Checkpoint file inside each fold folder (default ``checkpoint_final.pth``).
    use_mirroring : bool, optional
        Test-time mirroring (nnU-Net default); off by default because it costs ~8x on CPU.
    tile_step_size : float, optional
        Sliding-window step as a fraction of the patch (nnU-Net default 0.5).

    Raises
    ------
    RefinementModelError
        When the folder lacks ``dataset.json``, ``plans.json`` or any fold checkpoint, or when
        its channels do not describe a refinement encoding.

    Notes
    -----
    Probabilities are the mean of the per-fold softmax outputs (one nnU-Net prediction per
    fold through ``models.nnunet.EnsemblePredictor``; nnU-Net itself would average logits).
    With ``use_mirroring`` every mirrored prediction is one more member of that mean.  The segmentation is their argmax, after
    which every reviewed voxel takes the expert's label (:func:`force_reviewed`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint_name: str = "checkpoint_final.pth",
        use_mirroring: bool = False,
        tile_step_size: float = 0.5,
    ) -> None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise RefinementModelError(f"refinement model folder {model_dir} does not exist")
        missing = [n for n in ("dataset.json", "plans.json") if not (model_dir / n).is_file()]
        if missing:
            raise RefinementModelError(f"refinement model folder {model_dir} lacks {', '.join(missing)}")
        try:
            self.dataset_json: dict[str, Any] = json.loads((model_dir / "dataset.json").read_text())
            self.plans: dict[str, Any] = json.loads((model_dir / "plans.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RefinementModelError(f"cannot read {model_dir}/dataset.json or plans.json: {exc}") from exc
        try:
            self.layout: InputLayout = layout_from_dataset_json(self.dataset_json)
        except ValueError as exc:
            raise RefinementModelError(f"{model_dir}/dataset.json: {exc}") from exc
        self.encoding: Encoding = self.layout.encoding
        self.class_names: list[str] = list(self.layout.class_names)
        self.n_classes: int = self.layout.n_classes
        self.n_channels: int = len(self.dataset_json["channel_names"])
        self.n_image_channels: int = self.layout.image_channels
        if not 0.0 < tile_step_size <= 1.0:
            raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size!r}")
        available = _find_fold_dirs(model_dir, checkpoint_name)
        if folds is None:
            if not available:
                raise RefinementModelError(f"{model_dir} holds no fold_*/{checkpoint_name}")
            chosen = available
        else:
            chosen = [str(f) for f in folds]
            absent = [f for f in chosen if f not in available]
            if not chosen or absent:
                raise RefinementModelError(
                    f"{model_dir}: fold(s) {absent or chosen} have no {checkpoint_name} (available: {available})"
                )
        self.model_dir = model_dir
        self.folds: list[str] = chosen
        self._checkpoint_name = checkpoint_name
        self._device_name = device
        self._use_mirroring = bool(use_mirroring)
        self._tile_step_size = float(tile_step_size)
        self._check_plans()
        self._ensemble: Any = None

    def _check_plans(self) -> None:
        configs = self.plans.get("configurations", {})
        for name, cfg in configs.items():
            schemes = cfg.get("normalization_schemes")
            if schemes is not None and "inherits_from" not in cfg and len(schemes) != self.n_channels:
                raise RefinementModelError(
                    f"{self.model_dir}/plans.json configuration {name!r} normalises {len(schemes)} channel(s) "
                    f"but dataset.json lists {self.n_channels}"
                )

        props = self.plans.get("foreground_intensity_properties_per_channel", {})
        missing = [c for c in range(self.n_channels) if str(c) not in props]
        if missing:
            raise RefinementModelError(
                f"{self.model_dir}/plans.json lacks foreground_intensity_properties_per_channel for "
                f"channel(s) {missing} (nnU-Net's preprocessor needs an entry for every channel)"
            )

    @property
    def takes_prior(self) -> bool:
        """Whether :meth:`predict` needs the presegmentation's probabilities."""
        return self.layout.prior

    def load(self) -> None:
        """Load the network now (otherwise it is loaded on the first :meth:`predict`)."""
        self._load()

    def _load(self) -> Any:
        """The wrapped ``models.nnunet.EnsemblePredictor`` (one member per fold), loaded once."""
        if self._ensemble is not None:
            return self._ensemble
        from models.nnunet import EnsemblePredictor, ModelError  # lazy: imports torch/nnunetv2

        try:
            ensemble = EnsemblePredictor(
                self.model_dir,
                folds=[_fold_arg(f) for f in self.folds],
                checkpoint=self._checkpoint_name,
                device=self._device_name,
                tta=self._use_mirroring,
                tile_step_size=self._tile_step_size,
            )
        except ModelError as exc:
            if "size mismatch" in str(exc):
                raise RefinementModelError(
                    f"{self.model_dir}: the checkpoint's network does not take the {self.n_channels} input "
                    f"channel(s) dataset.json lists ({self.layout.describe()}): {exc}"
                ) from exc
            raise RefinementModelError(f"cannot load refinement model {self.model_dir}: {exc}") from exc
        network = getattr(getattr(ensemble, "_predictor", None), "network", None)
        in_ch = _network_input_channels(network) if network is not None else None
        if in_ch is not None and in_ch != self.n_channels:
            raise RefinementModelError(
                f"{self.model_dir}: the network takes {in_ch} input channel(s) but dataset.json lists "
                f"{self.n_channels} ({self.layout.describe()})"
            )
        self._ensemble = ensemble
        return ensemble

    def probabilities(
        self,
        image: np.ndarray,
        spacing: Sequence[float],
        expert_labels: np.ndarray,
        reviewed: Mapping[int, Sequence[int]] | np.ndarray,
        prior: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fold-averaged class probabilities of the refinement network.

        Parameters
        ----------
        image, spacing, expert_labels, reviewed, prior
            As for :meth:`predict`.

        Returns
        -------
        np.ndarray
            float32 ``(C, z, y, x)``, the mean of the per-fold softmax outputs (reviewed voxels
            are *not* forced here).
        """
        image = self._check_image(image)
        spacing_t = _check_spacing(spacing)
        data = build_input(self.layout, image, expert_labels, reviewed, prior=prior, spacing=spacing_t)
        ensemble = self._load()
        total: np.ndarray | None = None
        n = 0
        for member in ensemble.iter_members(data, spacing_t):
            total = member if total is None else total + member
            n += 1
        if total is None:  # pragma: no cover - __init__ guarantees at least one fold
            raise RefinementModelError(f"{self.model_dir}: no ensemble members")
        return (total / np.float32(n)).astype(np.float32, copy=False)

    def predict(
        self,
        image: np.ndarray,
        spacing: Sequence[float],
        expert_labels: np.ndarray,
        reviewed: Mapping[int, Sequence[int]] | np.ndarray,
        prior: np.ndarray | None = None,
    ) -> np.ndarray:
        """Refine a segmentation from expert-corrected slices.

        Parameters
        ----------
        image : np.ndarray
            ``(z, y, x)`` or ``(c, z, y, x)`` image, unnormalised (as the presegmentation got it).
        spacing : sequence of float
            Voxel spacing ``(z, y, x)`` in mm.
        expert_labels : np.ndarray
            Integer ``(z, y, x)`` labels; read only on reviewed voxels.
        reviewed : mapping of int to sequence of int, or np.ndarray
            Reviewed slices (axis -> indices, every requested slice counts even if unchanged) or
            a boolean mask.
        prior : np.ndarray, optional
            ``(C, z, y, x)`` mean probabilities of the presegmentation ensemble; required when
            the model's layout has prior channels (:attr:`takes_prior`).

        Returns
        -------
        np.ndarray
            uint8 ``(z, y, x)`` labels: argmax of the fold-averaged probabilities, with every
            reviewed voxel equal to ``expert_labels``.
        """
        probs = self.probabilities(image, spacing, expert_labels, reviewed, prior)
        pred = np.argmax(probs, axis=0).astype(np.uint8)
        mask = reviewed_mask(pred.shape, reviewed)
        return force_reviewed(pred, np.asarray(expert_labels).astype(np.uint8), mask)

    def _check_image(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise ValueError(f"image must be (z, y, x) or (c, z, y, x), got shape {image.shape}")
        if image.shape[0] != self.n_image_channels:
            raise ValueError(
                f"image has {image.shape[0]} channel(s) but the refinement model {self.model_dir.name} "
                f"expects {self.n_image_channels} image channel(s)"
            )
        return image.astype(np.float32, copy=False)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError as exc:
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}") from exc
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}")
    return sp  # type: ignore[return-value]


def _network_input_channels(network: Any) -> int | None:
    """in_channels of the first convolution of a torch module, if there is one."""
    try:
        for module in network.modules():
            if hasattr(module, "in_channels") and hasattr(module, "weight"):
                return int(module.in_channels)
    except Exception:  # pragma: no cover - exotic architectures
        return None
    return None
