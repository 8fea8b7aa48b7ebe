"""``i3node evaluate``: the simulated radiologist over a labelled set, with report files.

Loads the cases (seeded phantoms, an nnU-Net raw dataset or NIfTI image/label folders) and
the models, runs ``models.evaluation.evaluate`` and writes ``evaluation.json`` (every row and
the summary), ``evaluation.md`` (the table), ``dice_vs_planes.png`` and
``before_after.png`` into the output folder.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation import SELECTIONS, EvalCase, EvalResult, Setting, evaluate, markdown_table, summarise
from models.progress import ProgressCallback

__all__ = ["EvaluationConfig", "RawCase", "folder_cases", "phantom_cases", "run_evaluation", "write_report"]

log = logging.getLogger(__name__)

#: Base seed of evaluation phantoms: disjoint from the demo models' training seeds (11, 13).
DEFAULT_SEED = 77


@dataclass(frozen=True)
class RawCase:
    """A labelled volume before the ensemble ran on it."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class EvaluationConfig:
    """What ``i3node evaluate`` runs.

    Attributes
    ----------
    selections, planes
        The grid of settings (every selection at every planes-per-orientation count).
    refiners
        Refiner names (``models.refiners.METHODS``); ``node`` adds what the node delivers.
    configured
        The node's own setting (slow refiners run only there; the panel shows it).
    configured_only
        Refiners evaluated at ``configured`` only (default: ``tta``, 10-30 s per case on CPU).
    min_dist, min_uncert
        i3Deep's selection parameters.
    seed
        Seed of the ``random`` selection.
    """

    selections: tuple[str, ...] = SELECTIONS
    planes: tuple[int, ...] = (1, 2, 4, 8)
    refiners: tuple[str, ...] = ("model+rw", "model", "tta", "prior+rw", "random_walker", "watershed",
                                 "graph_cut", "paste")
    configured: Setting = Setting("i3deep", 4)
    configured_only: tuple[str, ...] = ("tta",)
    min_dist: float = 0.1
    min_uncert: float = 0.1
    seed: int = 0

    def settings(self) -> list[Setting]:
        """Every selection x planes combination."""
        return [Setting(s, p) for s in self.selections for p in self.planes]


def phantom_cases(n: int, shape: Sequence[int], seed: int = DEFAULT_SEED) -> Iterator[RawCase]:
    """Seeded phantoms ``make_phantoms(n, seed)`` (phantom ``i`` has seed ``seed * 1000 + i``)."""
    from models.phantoms import make_phantom

    if seed in (11, 13):
        raise ValueError(f"seed: {seed} is a demo training seed; evaluation needs held-out phantoms")
    for i in range(int(n)):
        ph = make_phantom(int(seed) * 1000 + i, shape=tuple(shape))
        yield RawCase(f"phantom-{int(seed) * 1000 + i}", ph.image, ph.labels, ph.spacing)


def folder_cases(folder: Path) -> Iterator[RawCase]:
    """Labelled NIfTI volumes: an nnU-Net raw dataset (``imagesTr``/``labelsTr``) or ``images``/``labels``.

    Images are ``<case>_0000.nii.gz`` (nnU-Net) or ``<case>.nii.gz``; one channel is used.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (folder / img_dir).is_dir() and (folder / lab_dir).is_dir():
            break
    else:
        raise ValueError(f"{folder}: expected imagesTr/ + labelsTr/ (nnU-Net raw dataset) or images/ + labels/")
    labels = sorted((folder / lab_dir).glob("*.nii*"))
    if not labels:
        raise ValueError(f"{folder / lab_dir}: no NIfTI label files")
    for lab_path in labels:
        case = lab_path.name.split(".nii")[0]
        candidates = [folder / img_dir / f"{case}_0000{lab_path.name[len(case):]}",
                      folder / img_dir / lab_path.name]
        img_path = next((c for c in candidates if c.exists()), None)
        if img_path is None:
            raise ValueError(f"{folder / img_dir}: no image for label {lab_path.name}")
        img = sitk.ReadImage(str(img_path))
        lab = sitk.ReadImage(str(lab_path))
        image = sitk.GetArrayFromImage(img).astype(np.float32)
        label_arr = sitk.GetArrayFromImage(lab).astype(np.uint8)
        if image.shape != label_arr.shape:
            raise ValueError(f"{case}: image {image.shape} and labels {label_arr.shape} differ in shape")
        spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
        yield RawCase(case, image, label_arr, spacing)  # type: ignore[arg-type]


def build_refiners(names: Sequence[str], *, ensemble: Any, refine_model: Any, model_version: str,
                   gamma: float, tta_steps: int, tta_lr: float) -> dict[str, Any]:
    """The named refiners over loaded models (``model``/``model+rw`` skipped without a model)."""
    from models.refiners import make_refiner

    def adapt(image: Any, spacing: Any, expert: Any, reviewed: Any) -> Any:
        return ensemble.adapted_probabilities(image, spacing, expert, reviewed, steps=tta_steps, lr=tta_lr)

    out: dict[str, Any] = {}
    for name in names:
        if name in ("model", "model+rw") and refine_model is None:
            log.warning("refiner %s skipped: no refinement model", name)
            continue
        out[name] = make_refiner(name, model=refine_model, model_version=model_version, adapt=adapt,
                                 adapt_version=f"steps={tta_steps}", gamma=gamma)
    return out


def degrade_prior(case: EvalCase, missed: str, class_names: Sequence[str], uncertainty: str = "entropy") -> EvalCase:
    """The case as if the ensemble had missed class ``missed`` (its probability given to the first class).

    A stress test: what the refiners deliver when the presegmentation does not see a lesion
    at all and the radiologist has to draw it on the requested planes.
    """
    from models.uncertainty import entropy_of_mean

    if missed not in class_names[1:]:
        raise ValueError(f"degrade: {missed!r} is not a foreground class ({', '.join(class_names[1:])})")
    k = list(class_names).index(missed)
    prior = case.prior.copy()
    target = 1 if k != 1 else 0
    prior[target] += prior[k]
    prior[k] = 0.0
    return EvalCase(case.name, case.image, case.labels, case.spacing, prior, entropy_of_mean(prior, uncertainty),
                    case.seconds)


def presegment(raw: RawCase, ensemble: Any, uncertainty: str = "entropy") -> EvalCase:
    """Run the ensemble on a case: mean probabilities and voxel uncertainty, as the node does."""
    from models.uncertainty import EnsembleAccumulator

    t0 = time.perf_counter()
    acc = EnsembleAccumulator()
    for member in ensemble.iter_members(raw.image, raw.spacing):
        acc.add(member)
    return EvalCase(raw.name, raw.image, raw.labels, raw.spacing, acc.mean(), acc.entropy(uncertainty),
                    time.perf_counter() - t0)


def run_evaluation(
    raw_cases: Sequence[RawCase],
    ensemble: Any,
    refiners: dict[str, Any],
    config: EvaluationConfig,
    *,
    class_names: Sequence[str],
    missed: str = "",
    progress: ProgressCallback | None = None,
) -> EvalResult:
    """Presegment each case with ``ensemble`` and evaluate ``refiners`` on it.

    ``missed`` names a class to remove from the ensemble's output first (:func:`degrade_prior`).
    """
    cases: Iterator[EvalCase] = (presegment(c, ensemble) for c in raw_cases)
    if missed:
        cases = (degrade_prior(c, missed, class_names) for c in cases)
    return evaluate(cases, refiners, settings=config.settings(), class_names=class_names,
                    configured=config.configured, configured_only=config.configured_only,
                    min_dist=config.min_dist, min_uncert=config.min_uncert, seed=config.seed,
                    n_cases=len(raw_cases), progress=progress)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_report(result: EvalResult, out_dir: Path, *, meta: dict[str, Any], config: EvaluationConfig) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and the two PNGs; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(result.rows)
    paths = {"json": out_dir / "evaluation.json", "markdown": out_dir / "evaluation.md",
             "dice_png": out_dir / "dice_vs_planes.png", "panel_png": out_dir / "before_after.png"}
    doc = {"meta": meta, "class_names": list(result.class_names),
           "rows": [{k: _clean(v) for k, v in r.items()} for r in result.rows],
           "summary": [{k: _clean(v) for k, v in s.items()} for s in summary]}
    paths["json"].write_text(json.dumps(doc, indent=1))
    cfg = config.configured
    head = ["# i3node evaluate\n",
            f"{meta.get('cases', '?')} cases ({meta.get('source', '')}); presegmentation {meta.get('preseg_dir', '')}; "
            f"refinement model {meta.get('refine_dir', '') or 'none'}; the node delivers `{meta.get('node_method', '')}`. "
            f"Dice mean ± sd; off-plane = voxels on no reviewed slice; plane share = share of the class's voxels "
            f"on unreviewed axial slices that lie on a corrected coronal/sagittal plane (truth's in brackets); "
            f"AR = annotation ratio. `{','.join(config.configured_only)}` ran at {cfg.selection} x {cfg.planes} only.\n",
            f"Total {meta.get('seconds', 0):.0f} s.\n"]
    paths["markdown"].write_text("\n".join(head) + "\n" + markdown_table(summary, result.class_names,
                                                                         highlight=str(meta.get("node_method", ""))))
    write_dice_png(summary, result.class_names, paths["dice_png"], selection=cfg.selection)
    if result.panel:
        write_panel_png(result.panel, paths["panel_png"], setting=cfg)
    else:
        paths.pop("panel_png")
    return paths


def write_dice_png(summary: Sequence[dict[str, Any]], class_names: Sequence[str], path: Path, *,
                   selection: str = "i3deep") -> Path:
    """Dice (± sd) against planes per orientation, one panel per class, one line per refiner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = list(class_names[1:])
    fig, axes = plt.subplots(1, len(fg), figsize=(5.5 * len(fg), 4.2), squeeze=False)
    refiners = sorted({s["refiner"] for s in summary if s["selection"] == selection})
    for ax, cls in zip(axes[0], fg, strict=True):
        for ref in refiners:
            pts = sorted((s["planes"], s["dice"], s["dice_sd"], s["annotation_ratio"]) for s in summary
                         if s["selection"] == selection and s["refiner"] == ref and s["class"] == cls)
            if len(pts) < 2:
                continue
            x = [p[0] for p in pts]
            ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=ref)
            ax.set_xticks(x, [f"{p[0]}\nAR {p[3]:.2f}" for p in pts])
        pre = [s["dice"] for s in summary if s["refiner"] == "preseg" and s["class"] == cls]
        if pre:
            ax.axhline(pre[0], color="k", ls=":", label="presegmentation")
        ax.set_title(f"{cls}: {selection} selection")
        ax.set_xlabel("corrected planes per orientation (3 orientations)")
        ax.set_ylabel(f"{cls} Dice")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_panel_png(panel: dict[str, Any], path: Path, *, setting: Setting) -> Path:
    """Before/after on an unreviewed axial slice: presegmentation, every refiner, truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: dict[str, np.ndarray] = panel["labels"]
    n = len(labels)
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.3 * rows + 0.5), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    image = panel["image"]
    lo, hi = np.percentile(image, [1, 99])
    colours = ["tab:blue", "gold", "tab:green", "tab:purple"]
    truth = labels.get("truth")
    for ax, (name, lab) in zip(axes.ravel(), labels.items(), strict=False):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        overlay = np.zeros((*lab.shape, 4))
        for k in range(1, int(max(lab.max(), 1)) + 1):
            rgba = matplotlib.colors.to_rgba(colours[(k - 1) % len(colours)], 0.45)
            overlay[lab == k] = rgba
        ax.imshow(overlay)
        if truth is not None and truth.max() > 0:
            ax.contour(truth == truth.max(), levels=[0.5], colors="lime", linewidths=0.8)
        for i in panel["planes"].get(1, []):
            ax.axhline(i, color="red", lw=0.5, ls="--")
        for i in panel["planes"].get(2, []):
            ax.axvline(i, color="red", lw=0.5, ls="--")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{panel['case']}: unreviewed axial slice {panel['slice']} ({setting.selection}, {setting.planes} "
                 f"planes per orientation)\ngreen = truth contour of the last class, red dashed = corrected "
                 f"coronal/sagittal planes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
