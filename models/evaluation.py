"""The simulated radiologist: what each refiner delivers after one round of corrections.

For every labelled case (image, ground truth, the presegmentation ensemble's mean
probabilities and voxel uncertainty), every slice-selection strategy and every number of planes
per orientation, the corrected planes are the ground truth on the selected slices, and every
refiner gets exactly those. What is measured is what the radiologist gets back:

* Dice per class, and **off-plane Dice** (only voxels on no reviewed slice: what the refiner
  itself propagated, not what was pasted);
* the **Annotation Ratio** (papers/000 5.4): selected slices / axial ground-truth slices with
  foreground;
* the **plane share**: of a class's predicted voxels on *unreviewed axial* slices, the share
  lying on a corrected coronal/sagittal plane, beside the same share in the truth (a refiner
  that only copies the planes draws a "#" grid: share 1.0 where the truth has ~0.25);
* seconds per case.

Selections: ``i3deep`` (:func:`models.acquisition.select_slices`), ``uss``
(:func:`models.acquisition.select_slices_uss`), ``random`` (uniform among the slices where the
presegmentation has foreground) and ``equidistant`` (evenly spread over that extent).

This module is numpy in, numpy out; loading cases and models and writing the report files is
the caller's (``node.evaluate``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.progress import ProgressCallback, ProgressEvent, emit

__all__ = [
    "SELECTIONS",
    "EvalCase",
    "EvalResult",
    "Setting",
    "choose_planes",
    "evaluate",
    "markdown_table",
    "off_plane_dice",
    "plane_share",
    "summarise",
]

log = logging.getLogger(__name__)

SELECTIONS = ("i3deep", "uss", "random", "equidistant")
"""Slice-selection strategies :func:`choose_planes` knows."""


@dataclass(frozen=True)
class EvalCase:
    """One labelled case with the presegmentation ensemble's output on it.

    Attributes
    ----------
    name : str
        Case identifier (no patient attribute).
    image : np.ndarray
        float32 ``(z, y, x)``.
    labels : np.ndarray
        Integer ground truth ``(z, y, x)``.
    spacing : tuple of float
        ``(z, y, x)`` in mm.
    prior : np.ndarray
        float32 ``(C, z, y, x)`` mean probabilities of the ensemble.
    uncertainty : np.ndarray
        float32 ``(z, y, x)`` voxel uncertainty the node selects on.
    seconds : float
        Time the ensemble took on this case.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    prior: np.ndarray
    uncertainty: np.ndarray
    seconds: float = 0.0

    @property
    def presegmentation(self) -> np.ndarray:
        """uint8 argmax of the prior."""
        return np.argmax(self.prior, axis=0).astype(np.uint8)


@dataclass(frozen=True)
class Setting:
    """One selection strategy at one number of planes per orientation."""

    selection: str
    planes: int


def choose_planes(
    strategy: str,
    uncertainty: np.ndarray,
    planes: int,
    *,
    presegmentation: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    min_dist: float = 0.1,
    min_uncert: float = 0.1,
    uss_min_distance: int = 5,
    axes: Sequence[int] = (0, 1, 2),
) -> dict[int, list[int]]:
    """The slices a strategy asks the radiologist to correct, ``planes`` per orientation at most.

    Parameters
    ----------
    strategy : str
        One of :data:`SELECTIONS`.
    uncertainty : np.ndarray
        ``(z, y, x)`` voxel uncertainty.
    planes : int
        Planes per orientation (>= 0).
    presegmentation : np.ndarray, optional
        Labels whose foreground extent bounds ``random`` and ``equidistant`` (whole axis if
        ``None`` or empty).
    rng : np.random.Generator, optional
        Random source of ``random`` (required for it).
    min_dist, min_uncert : float, optional
        i3Deep's parameters.
    uss_min_distance : int, optional
        USS's minimum distance between peaks (slices).
    axes : sequence of int, optional
        Orientations.

    Returns
    -------
    dict of int to list of int
        Axis -> slice indices.

    Raises
    ------
    ValueError
        For an unknown strategy, ``planes < 0`` or ``random`` without ``rng``.
    """
    from models.acquisition import select_slices, select_slices_uss

    if strategy not in SELECTIONS:
        raise ValueError(f"strategy must be one of {', '.join(SELECTIONS)}, got {strategy!r}")
    if isinstance(planes, bool) or int(planes) != planes or planes < 0:
        raise ValueError(f"planes must be an integer >= 0, got {planes!r}")
    planes = int(planes)
    if strategy == "i3deep":
        return select_slices(uncertainty, min_dist=min_dist, min_uncert=min_uncert, max_slices=planes, axes=axes)
    if strategy == "uss":
        return select_slices_uss(uncertainty, min_distance=uss_min_distance, max_slices=planes, axes=axes)
    if strategy == "random" and rng is None:
        raise ValueError("rng: the random strategy needs a random generator")
    gen = rng if rng is not None else np.random.default_rng(0)
    out: dict[int, list[int]] = {}
    for axis in axes:
        n = uncertainty.shape[axis]
        lo, hi = 0, n - 1
        if presegmentation is not None:
            other = tuple(a for a in range(3) if a != axis)
            present = np.flatnonzero(np.asarray(presegmentation > 0).any(axis=other))
            if present.size:
                lo, hi = int(present[0]), int(present[-1])
        extent = hi - lo + 1
        k = min(planes, extent)
        if strategy == "random":
            out[axis] = sorted(int(i) for i in gen.choice(np.arange(lo, hi + 1), size=k, replace=False))
        else:
            out[axis] = sorted({int(lo + math.floor((j + 0.5) * extent / k)) for j in range(k)}) if k else []
    return out


def off_plane_dice(pred: np.ndarray, gt: np.ndarray, reviewed: np.ndarray, label: int) -> float:
    """Dice of ``label`` over the voxels on no reviewed slice; NaN when absent there from both."""
    off = ~reviewed
    p = (pred == label) & off
    g = (gt == label) & off
    denom = int(p.sum()) + int(g.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom


def plane_share(labels: np.ndarray, label: int, review: Mapping[int, Sequence[int]]) -> float:
    """Share of ``label``'s voxels on unreviewed axial slices that lie on a reviewed coronal/sagittal plane.

    NaN when the label has no voxel on an unreviewed axial slice.
    """
    shape = labels.shape
    unreviewed_axial = np.ones(shape[0], dtype=bool)
    unreviewed_axial[list(review.get(0, []))] = False
    planes = np.zeros(shape, dtype=bool)
    planes[:, list(review.get(1, [])), :] = True
    planes[:, :, list(review.get(2, []))] = True
    voxels = (labels == label) & unreviewed_axial[:, None, None]
    n = int(voxels.sum())
    return float("nan") if n == 0 else int((voxels & planes).sum()) / n


RefineFn = Callable[[Any], np.ndarray]


@dataclass
class EvalResult:
    """Rows of an evaluation and the pictures' material.

    Attributes
    ----------
    rows : list of dict
        One per case x selection x planes x refiner x class (``refiner`` ``"preseg"`` rows carry
        the presegmentation once per case with ``selection`` ``"-"`` and ``planes`` 0).
    class_names : tuple of str
        All classes, background first.
    panel : dict
        For the panel picture: ``case``, ``setting``, ``slice`` (an unreviewed axial slice),
        ``image`` and ``labels`` per refiner (2-D arrays, ``truth`` and ``preseg`` included).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    class_names: tuple[str, ...] = ()
    panel: dict[str, Any] = field(default_factory=dict)


def evaluate(
    cases: Iterable[EvalCase],
    refiners: Mapping[str, Any],
    *,
    settings: Sequence[Setting],
    class_names: Sequence[str],
    configured: Setting | None = None,
    configured_only: Iterable[str] = (),
    min_dist: float = 0.1,
    min_uncert: float = 0.1,
    seed: int = 0,
    n_cases: int | None = None,
    progress: ProgressCallback | None = None,
) -> EvalResult:
    """Run every refiner on every case under every setting.

    Parameters
    ----------
    cases : iterable of EvalCase
        The labelled cases (consumed once).
    refiners : mapping of str to Refiner
        ``name -> models.refiners.Refiner``; each gets a ``models.refiners.RefinementInputs``.
    settings : sequence of Setting
        Selection x planes combinations.
    class_names : sequence of str
        All classes, background first.
    configured : Setting, optional
        The node's own setting: the refiners in ``configured_only`` run only there, and the
        panel picture shows it. Default: the first of ``settings``.
    configured_only : iterable of str, optional
        Slow refiners run only at ``configured``.
    min_dist, min_uncert : float, optional
        i3Deep's selection parameters.
    seed : int, optional
        Seed of the ``random`` selection.
    n_cases : int, optional
        Number of cases, for progress fractions.
    progress : callable, optional
        Receives ``evaluate`` events, one per case and setting.

    Returns
    -------
    EvalResult
    """
    from models.refiners import RefinementInputs

    if not settings:
        raise ValueError("settings: need at least one selection x planes setting")
    configured = configured or settings[0]
    slow = set(configured_only)
    all_settings = list(settings) if configured in settings else [configured, *settings]
    names = tuple(str(n) for n in class_names)
    result = EvalResult(class_names=names)
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()
    for ci, case in enumerate(cases):
        gt = np.asarray(case.labels)
        preseg = case.presegmentation
        fg_axial = int(np.count_nonzero(gt.reshape(gt.shape[0], -1).any(axis=1)))
        for k in range(1, len(names)):
            result.rows.append(_row(case.name, "-", 0, "preseg", names[k], preseg, gt, np.zeros(gt.shape, bool),
                                    {}, 0.0, case.seconds, fg_axial, k))
        for si, setting in enumerate(all_settings):
            review = choose_planes(setting.selection, case.uncertainty, setting.planes, presegmentation=preseg,
                                   rng=rng, min_dist=min_dist, min_uncert=min_uncert)
            from models.refinement import reviewed_mask

            mask = reviewed_mask(gt.shape, review)
            expert = np.where(mask, gt, 0).astype(np.uint8)
            inputs = RefinementInputs(np.asarray(case.image, np.float32), tuple(case.spacing), expert, mask,  # type: ignore[arg-type]
                                      np.asarray(case.prior, np.float32), len(names))
            n_slices = sum(len(v) for v in review.values())
            ar = n_slices / fg_axial if fg_axial else float("nan")
            outputs: dict[str, np.ndarray] = {}
            for rname, refiner in refiners.items():
                if rname in slow and setting != configured:
                    continue
                t0 = time.perf_counter()
                out = np.asarray(refiner.refine(inputs))
                secs = time.perf_counter() - t0
                if not np.array_equal(out[mask], gt[mask]):
                    raise RuntimeError(f"refiner {rname!r} changed corrected voxels (case {case.name})")
                outputs[rname] = out
                for k in range(1, len(names)):
                    result.rows.append(_row(case.name, setting.selection, setting.planes, rname, names[k], out, gt,
                                            mask, review, ar, secs, fg_axial, k))
            if setting == configured and not result.panel:
                result.panel = _panel(case, review, preseg, outputs)
            done = ci * len(all_settings) + si + 1
            total = n_cases * len(all_settings) if n_cases else None
            emit(progress, ProgressEvent(
                "evaluate", f"case {ci + 1}{'/' + str(n_cases) if n_cases else ''} {case.name}: "
                f"{setting.selection} x {setting.planes} planes ({time.perf_counter() - t_start:.0f} s)",
                done / total if total else None), log)
    return result


def _row(case: str, selection: str, planes: int, refiner: str, cls: str, pred: np.ndarray, gt: np.ndarray,
         mask: np.ndarray, review: Mapping[int, Sequence[int]], ar: float, secs: float, fg_axial: int,
         k: int) -> dict[str, Any]:
    from models.metrics import dice

    return {
        "case": case, "selection": selection, "planes": int(planes), "refiner": refiner, "class": cls,
        "dice": float(dice(pred, gt, k)), "dice_off_plane": off_plane_dice(pred, gt, mask, k),
        "annotation_ratio": float(ar), "slices": int(sum(len(v) for v in review.values())),
        "seconds": float(secs), "plane_share": plane_share(pred, k, review) if review else float("nan"),
        "truth_plane_share": plane_share(gt, k, review) if review else float("nan"),
        "axial_foreground_slices": int(fg_axial),
    }


def _panel(case: EvalCase, review: Mapping[int, Sequence[int]], preseg: np.ndarray,
           outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """An unreviewed axial slice with the most foreground of the last class, every output on it."""
    gt = np.asarray(case.labels)
    axial = set(review.get(0, []))
    last = int(gt.max()) if gt.size else 0
    counts = [(int((gt[z] == last).sum()), -z) for z in range(gt.shape[0]) if z not in axial]
    z = -max(counts)[1] if counts else 0
    labels = {"preseg": preseg[z], **{n: o[z] for n, o in outputs.items()}, "truth": gt[z]}
    return {"case": case.name, "slice": int(z), "image": np.asarray(case.image)[z], "labels": labels,
            "planes": {int(a): [int(i) for i in v] for a, v in review.items()}}


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation per selection x planes x refiner x class.

    Returns
    -------
    list of dict
        ``selection, planes, refiner, class, n, dice, dice_sd, dice_off_plane, dice_off_plane_sd,
        annotation_ratio, seconds, plane_share, truth_plane_share`` (NaN-aware means).
    """
    groups: dict[tuple[str, int, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["selection"], int(r["planes"]), r["refiner"], r["class"]), []).append(r)

    def stat(rs: Sequence[Mapping[str, Any]], key: str) -> tuple[float, float]:
        v = np.array([float(r[key]) for r in rs], dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return float("nan"), float("nan")
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0

    out = []
    for (sel, planes, ref, cls), rs in groups.items():
        d, dsd = stat(rs, "dice")
        o, osd = stat(rs, "dice_off_plane")
        out.append({
            "selection": sel, "planes": planes, "refiner": ref, "class": cls, "n": len(rs),
            "dice": d, "dice_sd": dsd, "dice_off_plane": o, "dice_off_plane_sd": osd,
            "annotation_ratio": stat(rs, "annotation_ratio")[0], "seconds": stat(rs, "seconds")[0],
            "plane_share": stat(rs, "plane_share")[0], "truth_plane_share": stat(rs, "truth_plane_share")[0],
        })
    return out


def _fmt(v: float, sd: float | None = None) -> str:
    if not np.isfinite(v):
        return "-"
    return f"{v:.3f}" if sd is None or not np.isfinite(sd) else f"{v:.3f} ± {sd:.3f}"


def markdown_table(summary: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                   selections: Sequence[str] | None = None, highlight: str = "") -> str:
    """A Markdown table: one row per selection x planes x refiner, Dice (± sd) per class.

    Columns per foreground class: Dice, off-plane Dice and plane share (truth's in brackets);
    then annotation ratio and seconds per case. The ``highlight`` refiner (what the node
    delivers) is set in bold.
    """
    fg = list(class_names[1:])
    by_key: dict[tuple[str, int, str], dict[str, Mapping[str, Any]]] = {}
    for s in summary:
        if selections is not None and s["selection"] not in (*selections, "-"):
            continue
        by_key.setdefault((s["selection"], int(s["planes"]), s["refiner"]), {})[s["class"]] = s
    head = ["selection", "planes", "refiner"]
    for c in fg:
        head += [f"{c} Dice", f"{c} off-plane", f"{c} plane share (truth)"]
    head += ["AR", "s/case"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (sel, planes, ref), per in sorted(by_key.items(), key=lambda kv: (kv[0][0] != "-", kv[0][0], kv[0][1],
                                                                           kv[0][2])):
        cells = [sel, str(planes) if planes else "-", f"**{ref}**" if ref == highlight else ref]
        any_row = next(iter(per.values()))
        for c in fg:
            cell = per.get(c)
            if cell is None:
                cells += ["-", "-", "-"]
                continue
            cells += [_fmt(cell["dice"], cell["dice_sd"]), _fmt(cell["dice_off_plane"]),
                      f"{_fmt(cell['plane_share'])} ({_fmt(cell['truth_plane_share'])})"]
        cells += [_fmt(any_row["annotation_ratio"]), f"{any_row['seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
