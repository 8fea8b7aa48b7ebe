"""The learning loop on phantoms: held-out Dice of the presegmentation against the number of corrected studies.

Seed 004 (USS) claims that sparse, uncertainty-chosen planes are enough to train a model.
This plays the node over a stream of studies:

1. a *base* ensemble is trained on a few fully labelled phantoms;
2. it presegments N further "hospital" studies and asks, as the node does (i3Deep
   selection, ``--planes`` per orientation), for planes to correct; the radiologist
   stand-in labels exactly those planes (ground truth there), everything else is nnU-Net's
   ``ignore`` label - what ``i3node dataset export`` writes;
3. an ensemble is retrained from scratch on the base phantoms plus the N sparse studies
   (``i3node train preseg --from``'s code path, same schedule as the base);
4. each ensemble's presegmentation is scored on held-out phantoms (the ``make eval`` seeds).

A ceiling run trains on the same studies fully labelled.  Writes ``learning_loop.json``,
``learning_loop.md`` and ``learning_loop.png`` to ``--out`` and prints the table.

Usage::

    python -m benchmarks.learning_loop [--studies 0,3,6,12] [--planes 4] [--full 2] [--out var/learning_loop]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.demo import held_out_phantoms  # noqa: E402
from models.evaluation import choose_planes  # noqa: E402
from models.metrics import dice  # noqa: E402
from models.phantoms import make_phantoms  # noqa: E402
from models.training import TrainingCase, train_presegmentation  # noqa: E402
from models.uncertainty import entropy_of_mean  # noqa: E402
from node.dataset import sparse_labels  # noqa: E402

SHAPE = (32, 64, 64)
CLASSES = ("background", "organ", "lesion")


def _say(msg: str) -> None:
    sys.stderr.write(f"[learning-loop] {msg}\n")


def _mean_probs(model_dir: Path, image: np.ndarray, spacing: Any) -> np.ndarray:
    from models.nnunet import EnsemblePredictor

    return EnsemblePredictor(model_dir, device="cpu").predict_members(image, spacing).mean(0)


def _reviewed_mask(shape: tuple[int, ...], review: dict[int, list[int]]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for axis, idx in review.items():
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = list(idx)
        mask[tuple(sl)] = True
    return mask


def corrected_studies(base: Path, studies: list[Any], planes: int) -> tuple[list[TrainingCase], float]:
    """The node's questions on each study, answered on those planes only (ignore elsewhere)."""
    out, fractions = [], []
    for i, p in enumerate(studies):
        probs = _mean_probs(base, p.image, p.spacing)
        review = choose_planes("i3deep", entropy_of_mean(probs), planes)
        mask = _reviewed_mask(p.labels.shape, review)
        fractions.append(float(mask.mean()))
        out.append(TrainingCase(image=p.image, labels=sparse_labels(p.labels, mask, len(CLASSES)), spacing=p.spacing))
        _say(f"study {i + 1}/{len(studies)} corrected on {sum(map(len, review.values()))} planes "
             f"({100 * mask.mean():.1f} % of voxels)")
    return out, float(np.mean(fractions)) if fractions else 0.0


def score(model_dir: Path, held: list[Any]) -> dict[str, Any]:
    """Mean and sd of organ and lesion Dice of the ensemble's presegmentation on held-out phantoms."""
    per: dict[str, list[float]] = {"organ": [], "lesion": []}
    for p in held:
        seg = np.argmax(_mean_probs(model_dir, p.image, p.spacing), axis=0)
        for c, name in ((1, "organ"), (2, "lesion")):
            per[name].append(float(dice(seg, p.labels, c)))
    return {k: {"mean": float(np.mean(v)), "sd": float(np.std(v))} for k, v in per.items()}


def _train(cases: list[Any], work: Path, args: argparse.Namespace, ignore: bool) -> tuple[Path, float]:
    t0 = time.monotonic()
    model = train_presegmentation(cases, work, folds=args.folds, epochs=args.epochs,
                                  iterations_per_epoch=args.iterations, class_names=CLASSES, ignore_label=ignore,
                                  progress=lambda e: None)
    return model, time.monotonic() - t0


def _png(rows: list[dict[str, Any]], ceiling: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["studies"] for r in rows]
    for name, colour in (("organ", "tab:green"), ("lesion", "tab:red")):
        ys = [r["dice"][name]["mean"] for r in rows]
        sd = [r["dice"][name]["sd"] for r in rows]
        ax.errorbar(xs, ys, yerr=sd, marker="o", color=colour, capsize=3, label=f"{name} (sparse corrections)")
        if ceiling is not None:
            ax.axhline(ceiling["dice"][name]["mean"], color=colour, ls="--", lw=1,
                       label=f"{name}: the same {ceiling['studies']} studies fully labelled")
    ax.set_xlabel("corrected studies added to the training set")
    ax.set_ylabel("held-out Dice of the presegmentation")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Learning from the radiologists' corrections (phantoms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(rows: list[dict[str, Any]], ceiling: dict[str, Any] | None) -> str:
    lines = ["| corrected studies | annotated voxels | organ Dice | lesion Dice | training s |", "|---|---|---|---|---|"]
    for r in rows + ([ceiling] if ceiling else []):
        label = f"{r['studies']} (fully labelled)" if r is ceiling else str(r["studies"])
        d = r["dice"]
        lines.append(f"| {label} | {100 * r['annotated_fraction']:.1f} % | {d['organ']['mean']:.3f} ± {d['organ']['sd']:.3f}"
                     f" | {d['lesion']['mean']:.3f} ± {d['lesion']['sd']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the loop and write the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--studies", default="0,3,6,12", help="numbers of corrected studies, comma-separated")
    parser.add_argument("--planes", type=int, default=4, help="planes per orientation the node asks for")
    parser.add_argument("--full", type=int, default=2, help="fully labelled phantoms of the base ensemble")
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the fully labelled comparison")
    parser.add_argument("--out", type=Path, default=Path("var/learning_loop"))
    args = parser.parse_args(argv)
    counts = sorted({int(x) for x in args.studies.split(",")})
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    full = make_phantoms(args.full, seed=301, shape=SHAPE)
    pool = make_phantoms(max(counts), seed=401, shape=SHAPE) if max(counts) else []
    held = held_out_phantoms(args.held_out)
    _say(f"base ensemble on {args.full} fully labelled phantoms")
    base, secs = _train(list(full), work / "n0", args, ignore=False)
    sparse, fraction = corrected_studies(base, pool, args.planes)
    rows = []
    for n in counts:
        if n == 0:
            model, t = base, secs
        else:
            _say(f"retraining on {args.full} full phantoms + {n} corrected studies")
            model, t = _train(list(full) + sparse[:n], work / f"n{n}", args, ignore=True)
        frac_n = float(np.mean([(c.labels != len(CLASSES)).mean() for c in sparse[:n]])) if n else 0.0
        rows.append({"studies": n, "annotated_fraction": frac_n, "dice": score(model, held), "train_seconds": t})
        _say(f"{n} studies: organ {rows[-1]['dice']['organ']['mean']:.3f}, lesion {rows[-1]['dice']['lesion']['mean']:.3f}")
    ceiling = None
    if not args.no_ceiling and pool:
        _say(f"ceiling: the same {len(pool)} studies fully labelled")
        model, t = _train(list(full) + list(pool), work / "full", args, ignore=False)
        ceiling = {"studies": len(pool), "annotated_fraction": 1.0, "dice": score(model, held), "train_seconds": t}
    report = {"planes_per_orientation": args.planes, "full_phantoms": args.full, "held_out": args.held_out,
              "schedule": {"folds": args.folds, "epochs": args.epochs, "iterations": args.iterations},
              "mean_annotated_fraction": fraction, "rows": rows, "ceiling": ceiling}
    (args.out / "learning_loop.json").write_text(json.dumps(report, indent=2))
    table = _markdown(rows, ceiling)
    (args.out / "learning_loop.md").write_text(table + "\n")
    _png(rows, ceiling, args.out / "learning_loop.png")
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
