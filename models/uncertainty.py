"""Voxel-wise predictive uncertainty of an ensemble (i3Deep paper eq. 1-2).

``probs`` has shape ``(T, C, z, y, x)``: ``T`` softmax predictions of ``C`` classes,
background included.  ``pbar`` is the mean over ``T``.

* ``"entropy"`` (eq. 1-2): ``H = -sum_c pbar_c log pbar_c / log C`` with ``0 log 0 = 0``.
* ``"binary_fg"`` (public i3Deep code): mean over the foreground classes ``c >= 1`` of the
  binary entropy of ``pbar_c``, divided by ``log 2``.

Both lie in ``[0, 1]``.  :class:`EnsembleAccumulator` computes the same quantities from
members fed one at a time while holding only a float32 running sum, and evaluates the entropy
and the segmentation in chunks along z so that no full-size temporaries are created.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = [
    "METHODS",
    "EnsembleAccumulator",
    "entropy_of_mean",
    "predictive_entropy",
]

Method = Literal["entropy", "binary_fg"]
METHODS: tuple[str, ...] = ("entropy", "binary_fg")

#: Tolerance on ``|sum_c p_c - 1|`` and on values outside ``[0, 1]``.
SUM_TOLERANCE = 1e-3
#: Number of voxels per (class) chunk used by chunked computations.
_CHUNK_VOXELS = 1 << 21


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _z_chunk(shape_zyx: tuple[int, ...]) -> int:
    plane = int(np.prod(shape_zyx[1:], dtype=np.int64)) if len(shape_zyx) > 1 else 1
    return max(1, _CHUNK_VOXELS // max(1, plane))


def _check_distribution(p: np.ndarray, name: str, where: str, atol: float) -> None:
    """Raise if ``p`` (C, ...) does not hold probabilities summing to 1 along axis 0."""
    if p.size == 0:
        return
    lo = float(np.min(p))
    hi = float(np.max(p))
    if not (lo >= -atol and hi <= 1.0 + atol):
        raise ValueError(
            f"{name}: probabilities must lie in [0, 1]{where}; found values in [{lo:.6g}, {hi:.6g}]"
        )
    sums = np.sum(p, axis=0, dtype=np.float32)
    dev = np.abs(sums - np.float32(1.0))
    bad = ~(dev <= atol)  # also catches NaN
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        worst = float(np.nanmax(dev)) if np.isfinite(dev).any() else float("nan")
        raise ValueError(
            f"{name}: probabilities must sum to 1 along the class axis{where} "
            f"(tolerance {atol:g}); {int(bad.sum())} voxel(s) do not, first at (z, y, x)={first}, "
            f"max deviation {worst:.6g}"
        )


def _entropy_chunk(p: np.ndarray, method: str) -> np.ndarray:
    """Normalised entropy of a float32 chunk ``p`` (C, ...) -> float32 (...)."""
    c = p.shape[0]
    tiny = np.float32(np.finfo(np.float32).tiny)
    if method == "entropy":
        h = np.zeros(p.shape[1:], dtype=np.float32)
        for k in range(c):
            pk = p[k]
            h -= pk * np.log(np.maximum(pk, tiny))
        h /= np.float32(math.log(c))
    else:
        h = np.zeros(p.shape[1:], dtype=np.float32)
        for k in range(1, c):
            pk = np.clip(p[k], 0.0, 1.0)
            qk = np.float32(1.0) - pk
            h -= pk * np.log(np.maximum(pk, tiny)) + qk * np.log(np.maximum(qk, tiny))
        h /= np.float32((c - 1) * math.log(2.0))
    np.clip(h, 0.0, 1.0, out=h)
    return h


def entropy_of_mean(pbar: np.ndarray, method: Method | str = "entropy", *, atol: float = SUM_TOLERANCE) -> np.ndarray:
    """Normalised uncertainty of a mean probability map.

    Parameters
    ----------
    pbar : np.ndarray
        Mean class probabilities, shape ``(C, z, y, x)`` with ``C >= 2`` (background included).
    method : {"entropy", "binary_fg"}, optional
        ``"entropy"``: ``-sum_c pbar_c log pbar_c / log C`` (paper eq. 2, ``0 log 0 = 0``);
        ``"binary_fg"``: mean over classes ``c >= 1`` of the binary entropy of ``pbar_c``
        divided by ``log 2``.
    atol : float, optional
        Tolerance on the sum over classes being 1 and values lying in ``[0, 1]``.

    Returns
    -------
    np.ndarray
        float32 ``(z, y, x)`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``pbar`` is not 4-D, has fewer than 2 classes, is not a probability distribution
        along axis 0, or ``method`` is unknown.
    """
    _check_method(method)
    pbar = np.asarray(pbar)
    if pbar.ndim != 4:
        raise ValueError(f"pbar must have shape (C, z, y, x), got ndim={pbar.ndim} shape={pbar.shape}")
    if pbar.shape[0] < 2:
        raise ValueError(f"pbar must have C >= 2 classes (background included), got C={pbar.shape[0]}")
    out = np.empty(pbar.shape[1:], dtype=np.float32)
    step = _z_chunk(pbar.shape[1:])
    for z0 in range(0, pbar.shape[1], step):
        chunk = np.asarray(pbar[:, z0 : z0 + step], dtype=np.float32)
        _check_distribution(chunk, "pbar", f" (chunk starting at z={z0})", atol)
        out[z0 : z0 + step] = _entropy_chunk(chunk, method)
    return out


def predictive_entropy(probs: np.ndarray, method: Method | str = "entropy", *, atol: float = SUM_TOLERANCE) -> np.ndarray:
    """Voxel uncertainty of an ensemble (paper eq. 1-2).

    Parameters
    ----------
    probs : np.ndarray
        Softmax predictions, shape ``(T, C, z, y, x)``, ``T >= 1``, ``C >= 2``.
    method : {"entropy", "binary_fg"}, optional
        See :func:`entropy_of_mean`.
    atol : float, optional
        Tolerance on each prediction's class probabilities summing to 1.

    Returns
    -------
    np.ndarray
        float32 ``(z, y, x)`` in ``[0, 1]``: the uncertainty of ``pbar = mean_t probs``.

    Raises
    ------
    ValueError
        If ``probs`` is not 5-D, ``T < 1``, ``C < 2``, some prediction's probabilities do not
        sum to 1 along ``C`` (the message names the prediction index), or ``method`` is unknown.
    """
    _check_method(method)
    probs = np.asarray(probs)
    if probs.ndim != 5:
        raise ValueError(f"probs must have shape (T, C, z, y, x), got ndim={probs.ndim} shape={probs.shape}")
    t, c = probs.shape[:2]
    if t < 1:
        raise ValueError(f"probs must hold T >= 1 predictions, got T={t}")
    if c < 2:
        raise ValueError(f"probs must have C >= 2 classes (background included), got C={c}")
    acc = EnsembleAccumulator(atol=atol)
    for i in range(t):
        acc.add(probs[i], name=f"probs[{i}] (prediction t={i})")
    return acc.entropy(method)


class EnsembleAccumulator:
    """Running mean of ensemble members with bounded memory.

    Only a float32 running sum of shape ``(C, z, y, x)`` is kept.  Members may be float32 or
    float16; they are summed in float32 in the order they are added, so :meth:`mean` is
    bit-identical to ``np.stack(members).mean(axis=0)`` for float32 members.

    Parameters
    ----------
    check : bool, optional
        Validate each member (values in [0, 1], summing to 1 along C), chunked along z.
    atol : float, optional
        Tolerance of that check.
    """

    def __init__(self, *, check: bool = True, atol: float = SUM_TOLERANCE) -> None:
        if not (atol >= 0 and math.isfinite(atol)):
            raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
        self._sum: np.ndarray | None = None
        self._count = 0
        self._check = bool(check)
        self._atol = float(atol)

    @property
    def count(self) -> int:
        """Number of members added."""
        return self._count

    @property
    def shape(self) -> tuple[int, ...] | None:
        """``(C, z, y, x)`` of the members, or None before the first :meth:`add`."""
        return None if self._sum is None else tuple(self._sum.shape)

    def add(self, member: np.ndarray, *, name: str = "member") -> None:
        """Add one member's probabilities.

        Parameters
        ----------
        member : np.ndarray
            float32/float16 probabilities ``(C, z, y, x)``, ``C >= 2``, same shape as earlier
            members.
        name : str, optional
            Name used in error messages.

        Raises
        ------
        ValueError
            On a wrong ndim, ``C < 2``, a shape different from earlier members, a non-floating
            dtype, or probabilities that do not sum to 1 along C.
        """
        member = np.asarray(member)
        if member.ndim != 4:
            raise ValueError(f"{name} must have shape (C, z, y, x), got ndim={member.ndim} shape={member.shape}")
        if member.shape[0] < 2:
            raise ValueError(f"{name} must have C >= 2 classes (background included), got C={member.shape[0]}")
        if not np.issubdtype(member.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {member.dtype}")
        if self._sum is not None and member.shape != self._sum.shape:
            raise ValueError(f"{name} has shape {member.shape}, earlier members have {self._sum.shape}")
        step = _z_chunk(member.shape[1:])
        if self._check:
            for z0 in range(0, member.shape[1], step):
                _check_distribution(member[:, z0 : z0 + step], name, f" (chunk starting at z={z0})", self._atol)
        if self._sum is None:
            self._sum = np.array(member, dtype=np.float32, copy=True)
        else:
            np.add(self._sum, member, out=self._sum, casting="unsafe")
        self._count += 1

    def _require(self) -> np.ndarray:
        if self._sum is None or self._count == 0:
            raise ValueError("EnsembleAccumulator is empty: add() at least one member first")
        return self._sum

    def _mean_chunks(self):  # type: ignore[no-untyped-def]
        s = self._require()
        n = np.float32(self._count)
        step = _z_chunk(s.shape[1:])
        for z0 in range(0, s.shape[1], step):
            yield z0, s[:, z0 : z0 + step] / n

    def mean(self) -> np.ndarray:
        """Mean probabilities ``(C, z, y, x)`` float32 (a new array).

        Raises
        ------
        ValueError
            If no member was added.
        """
        s = self._require()
        return s / np.float32(self._count)

    def entropy(self, method: Method | str = "entropy") -> np.ndarray:
        """Uncertainty of the mean, computed in chunks along z.

        Parameters
        ----------
        method : {"entropy", "binary_fg"}, optional
            See :func:`entropy_of_mean`.

        Returns
        -------
        np.ndarray
            float32 ``(z, y, x)`` in ``[0, 1]``.

        Raises
        ------
        ValueError
            If no member was added or ``method`` is unknown.
        """
        _check_method(method)
        s = self._require()
        out = np.empty(s.shape[1:], dtype=np.float32)
        for z0, chunk in self._mean_chunks():
            out[z0 : z0 + chunk.shape[1]] = _entropy_chunk(chunk, method)
        return out

    def segmentation(self) -> np.ndarray:
        """``argmax`` over classes of the mean, uint8 ``(z, y, x)`` (ties: lowest class).

        Raises
        ------
        ValueError
            If no member was added, or there are more than 256 classes.
        """
        s = self._require()
        if s.shape[0] > 256:
            raise ValueError(f"segmentation supports at most 256 classes, got C={s.shape[0]}")
        out = np.empty(s.shape[1:], dtype=np.uint8)
        for z0, chunk in self._mean_chunks():
            out[z0 : z0 + chunk.shape[1]] = np.argmax(chunk, axis=0)
        return out
