"""Seeded synthetic CT-like phantoms with ground-truth labels.

Each phantom is an elliptical body (soft tissue, ~0-40 HU) in air (-1000 HU) containing one
organ (~60 HU, a randomly rotated and smoothly deformed ellipsoid that never touches the
volume edges) with one lesion inside it (hypodense ~0-15 HU or hyperdense ~115-135 HU, varying
size), plus a bone-like structure outside the organ, a smooth low-frequency intensity
variation, a slight blur and Gaussian noise.  Labels: 0 background, 1 organ, 2 lesion.

The geometry is defined in normalised coordinates (each axis spans [-1, 1]) with analytic
smooth fields, so a given seed gives the same anatomy at any resolution and every shape from
``(8, 8, 8)`` upwards works.  Everything is deterministic per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Phantom", "make_phantom", "make_phantoms"]

_AIR_HU = -1000.0
_MIN_EDGE = 8


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume with its ground truth.

    Attributes
    ----------
    image : np.ndarray
        float32 ``(z, y, x)`` volume in Hounsfield-like units.
    labels : np.ndarray
        uint8 ``(z, y, x)`` labels: 0 background, 1 organ, 2 lesion.
    spacing : tuple of float
        Voxel spacing ``(z, y, x)`` in mm.
    class_names : tuple of str
        Name of each label value.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    class_names: tuple[str, ...] = ("background", "organ", "lesion")


_Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised voxel-centre coordinates in [-1, 1] per axis (broadcastable)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float64) for n in shape]
    z = axes[0][:, None, None]
    y = axes[1][None, :, None]
    x = axes[2][None, None, :]
    return z, y, x


def _smooth_field(
    rng: np.random.Generator,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_waves: int,
    max_freq: float,
) -> np.ndarray:
    """Sum of random low-frequency cosines, scaled to roughly [-1, 1]."""
    z, y, x = coords
    field = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float64)
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-12
        freq = rng.uniform(0.25, max_freq)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        amp = rng.uniform(0.5, 1.0)
        arg = np.pi * freq * (direction[0] * z + direction[1] * y + direction[2] * x) + phase
        field += amp * np.cos(arg)
    return field / max(1.0, np.sqrt(n_waves))


def _rotation(rng: np.random.Generator, max_inplane_deg: float, max_tilt_deg: float) -> np.ndarray:
    """Random rotation: in-plane (about z) plus small tilts, acting on (z, y, x) vectors."""
    a = np.deg2rad(rng.uniform(-max_inplane_deg, max_inplane_deg))
    b = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg))
    c = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_distance(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    center: np.ndarray,
    semi_axes: np.ndarray,
    rot: np.ndarray,
) -> np.ndarray:
    """Normalised ellipsoid 'radius' (1 on the surface) of a rotated ellipsoid."""
    z, y, x = coords
    dz, dy, dx = z - center[0], y - center[1], x - center[2]
    # Coordinates in the ellipsoid frame: rot^T (p - c).
    u = rot[0, 0] * dz + rot[1, 0] * dy + rot[2, 0] * dx
    v = rot[0, 1] * dz + rot[1, 1] * dy + rot[2, 1] * dx
    w = rot[0, 2] * dz + rot[1, 2] * dy + rot[2, 2] * dx
    return np.sqrt((u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 + (w / semi_axes[2]) ** 2)


def _validate(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries (z, y, x), got {tuple(shape)!r}")
    shp = tuple(int(s) for s in shape)
    if any(s != s_in for s, s_in in zip(shp, shape, strict=True)) or any(s < _MIN_EDGE for s in shp):
        raise ValueError(f"shape entries must be integers >= {_MIN_EDGE}, got {tuple(shape)!r}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries (z, y, x), got {tuple(spacing)!r}")
    spc = tuple(float(s) for s in spacing)
    if any(not np.isfinite(s) or s <= 0 for s in spc):
        raise ValueError(f"spacing entries must be finite and > 0, got {tuple(spacing)!r}")
    return (shp[0], shp[1], shp[2]), (spc[0], spc[1], spc[2])


def make_phantom(
    seed: int,
    shape: Sequence[int] = (32, 64, 64),
    spacing: Sequence[float] = (2.5, 1.5, 1.5),
) -> Phantom:
    """Build one deterministic synthetic CT phantom.

    Parameters
    ----------
    seed : int
        Non-negative random seed; the same seed (and shape) gives the same phantom.
    shape : sequence of int, optional
        Volume shape ``(z, y, x)``, each entry >= 8.
    spacing : sequence of float, optional
        Voxel spacing ``(z, y, x)`` in mm, each > 0 (metadata only; the anatomy is defined
        relative to the field of view).

    Returns
    -------
    Phantom
        float32 image in HU-like units and uint8 labels (0 background, 1 organ, 2 lesion);
        the organ and the lesion are always non-empty and the lesion lies inside the organ.

    Raises
    ------
    ValueError
        If ``seed`` is negative or not an integer, or ``shape``/``spacing`` are invalid.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shp, spc = _validate(shape, spacing)
    rng = np.random.default_rng(int(seed))
    coords = _grid(shp)
    # The draws happen in a fixed order (body, spine, organ, lesion, intensities): a phantom
    # is defined by its seed, and the demo models and held-out sets rely on that.
    body, body_shape = _body(rng, coords, shp)
    spine = _spine(rng, coords, shp, body_shape[0])
    organ = _organ(rng, coords, shp, body, spine)
    lesion = _lesion(rng, coords, shp, organ)
    labels = np.zeros(shp, dtype=np.uint8)
    labels[organ] = 1
    labels[lesion] = 2
    image = _intensities(rng, coords, shp, body, body_shape, spine, organ, lesion)
    return Phantom(image=image.astype(np.float32), labels=labels, spacing=spc)


def _body(rng: np.random.Generator, coords: _Coords,
          shp: tuple[int, int, int]) -> tuple[np.ndarray, tuple[float, float, np.ndarray]]:
    """Body: elliptical cylinder along z, slightly wobbling with z; the mask and ``(by, bx, wobble)``."""
    z, y, x = coords
    by = rng.uniform(0.70, 0.82)
    bx = rng.uniform(0.84, 0.93)
    wobble = 1.0 + 0.03 * np.cos(np.pi * rng.uniform(0.5, 1.5) * z + rng.uniform(0, 2 * np.pi))
    body = (y / (by * wobble)) ** 2 + (x / (bx * wobble)) ** 2 <= 1.0
    return np.broadcast_to(body, shp), (by, bx, wobble)


def _spine(rng: np.random.Generator, coords: _Coords, shp: tuple[int, int, int],
           by: float) -> np.ndarray:
    """Bone-like structure: a posterior cylinder inside the body."""
    _, y, x = coords
    spine_y = by * rng.uniform(0.62, 0.72)
    spine_x = rng.uniform(-0.05, 0.05)
    spine_r = rng.uniform(0.09, 0.13)
    return np.broadcast_to(((y - spine_y) / spine_r) ** 2 + ((x - spine_x) / spine_r) ** 2 <= 1.0, shp)


def _organ(rng: np.random.Generator, coords: _Coords, shp: tuple[int, int, int],
           body: np.ndarray, spine: np.ndarray) -> np.ndarray:
    """Organ: a rotated, smoothly deformed ellipsoid inside the body, away from the edges."""
    organ_axes = np.array([rng.uniform(0.60, 0.72), rng.uniform(0.42, 0.52), rng.uniform(0.48, 0.62)])
    organ_center = np.array([rng.uniform(-0.08, 0.08), rng.uniform(-0.12, 0.02), rng.uniform(-0.12, 0.12)])
    organ_rot = _rotation(rng, 35.0, 12.0)
    d_organ = _ellipsoid_distance(coords, organ_center, organ_axes, organ_rot)
    deform = _smooth_field(rng, coords, n_waves=6, max_freq=1.8)
    organ = d_organ * (1.0 + 0.12 * deform) <= 1.0
    spine_margin = ndimage.binary_dilation(spine, iterations=1)
    organ &= body & ~spine_margin
    margin = np.zeros(shp, dtype=bool)
    mz = max(1, shp[0] // 16)
    my = max(1, shp[1] // 16)
    mx = max(1, shp[2] // 16)
    margin[mz:-mz, my:-my, mx:-mx] = True
    organ &= margin
    organ = ndimage.binary_opening(organ, iterations=1) if organ.sum() > 200 else organ
    if not organ.any():  # pragma: no cover - defensive, geometry makes this impossible
        organ = (d_organ <= 1.0) & margin
    return np.asarray(organ)


def _lesion(rng: np.random.Generator, coords: _Coords, shp: tuple[int, int, int],
            organ: np.ndarray) -> np.ndarray:
    """Lesion: a small deformed ellipsoid centred deep inside the organ."""
    inside = ndimage.distance_transform_edt(organ, sampling=tuple(2.0 / (n - 1) for n in shp))
    depth_max = float(inside.max())
    radius = rng.uniform(0.40, 0.65) * depth_max
    candidates = np.argwhere(inside >= max(radius * 1.15, 0.5 * depth_max))
    if len(candidates) == 0:  # pragma: no cover - defensive
        candidates = np.argwhere(inside >= depth_max)
    cidx = candidates[rng.integers(len(candidates))]
    lesion_center = np.array([coords[i].ravel()[cidx[i]] for i in range(3)])
    lesion_axes = radius * np.array([rng.uniform(0.8, 1.25), rng.uniform(0.8, 1.25), rng.uniform(0.8, 1.25)])
    d_lesion = _ellipsoid_distance(coords, lesion_center, lesion_axes, _rotation(rng, 90.0, 30.0))
    lesion = (d_lesion * (1.0 + 0.12 * _smooth_field(rng, coords, n_waves=4, max_freq=4.0)) <= 1.0) & organ
    if not lesion.any():  # pragma: no cover - defensive, the centre voxel is always inside
        lesion = np.zeros(shp, dtype=bool)
        lesion[tuple(cidx)] = True
    return np.asarray(lesion)


def _intensities(rng: np.random.Generator, coords: _Coords, shp: tuple[int, int, int],
                 body: np.ndarray, body_shape: tuple[float, float, np.ndarray], spine: np.ndarray,
                 organ: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """HU-like values: tissue classes, fat rim, texture, bias field, blur and noise."""
    _, y, x = coords
    by, bx, wobble = body_shape
    soft = rng.uniform(15.0, 30.0)
    organ_hu = rng.uniform(55.0, 68.0)
    hypo = rng.random() < 0.65
    lesion_hu = rng.uniform(0.0, 15.0) if hypo else rng.uniform(115.0, 135.0)
    image = np.full(shp, _AIR_HU, dtype=np.float64)
    image[body] = soft
    # Subcutaneous fat rim.
    rim = (y / (by * wobble * 0.92)) ** 2 + (x / (bx * wobble * 0.92)) ** 2 > 1.0
    image[body & np.broadcast_to(rim, shp)] = rng.uniform(-100.0, -60.0)
    image[spine] = rng.uniform(350.0, 500.0)
    image[organ] = organ_hu
    image[lesion] = lesion_hu
    texture = _smooth_field(rng, coords, n_waves=8, max_freq=6.0)
    image += np.where(body, 4.0 * texture, 0.0)
    bias = _smooth_field(rng, coords, n_waves=5, max_freq=1.0)
    image += np.where(body, rng.uniform(6.0, 12.0) * bias, 0.0)
    image = ndimage.gaussian_filter(image, sigma=(0.5, 0.7, 0.7), mode="nearest")
    noise_sigma = rng.uniform(12.0, 20.0)
    return np.asarray(image + rng.normal(0.0, noise_sigma, size=shp))


def make_phantoms(
    n: int,
    seed: int,
    shape: Sequence[int] = (32, 64, 64),
    spacing: Sequence[float] = (2.5, 1.5, 1.5),
) -> list[Phantom]:
    """Build ``n`` deterministic phantoms.

    Parameters
    ----------
    n : int
        Number of phantoms (>= 0).
    seed : int
        Non-negative base seed; phantom ``i`` uses seed ``seed * 1000 + i`` so that
        consecutive base seeds give disjoint sets for ``n <= 1000``.
    shape, spacing : sequence, optional
        As in :func:`make_phantom`.

    Returns
    -------
    list of Phantom

    Raises
    ------
    ValueError
        If ``n`` or ``seed`` is negative or not an integer, or ``shape``/``spacing`` are invalid.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _validate(shape, spacing)
    return [make_phantom(int(seed) * 1000 + i, shape=shape, spacing=spacing) for i in range(int(n))]
