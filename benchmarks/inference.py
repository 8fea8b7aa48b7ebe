"""Benchmark: i3node ensemble inference vs. a bare nnU-Net predictor with the same folds.

Model: the demo presegmentation ensemble (3 folds; built or taken from the cache
``I3NODE_MODEL_CACHE`` or ``<repo>/.cache/demo-models``). Input: one phantom,
64x128x128 on CPU (``--shape``; 128x256x256 by default with CUDA), spacing as in training.

* baseline: ``nnUNetPredictor`` loaded with all folds, ``predict_single_npy_array`` - nnU-Net's
  own ensemble (logits of the folds averaged, one softmax), no mirroring. With
  ``--baseline seg`` it returns only the segmentation, with ``probs`` (default) also the
  probabilities. Both do K forward passes per tile for K folds, like the ensemble path;
* i3node: ``EnsemblePredictor.iter_members`` (preprocessing once, one sliding window and
  one softmax per fold) -> ``EnsembleAccumulator`` -> entropy -> ``select_slices``.

Printed: median times, the overhead ratio i3node / baseline (target <= 1.15) and the share of
uncertainty + slice selection in the i3node total (target < 2%).

Run: ``python -m benchmarks.inference [--shape 64 128 128] [--repeat 2] [--device cpu]``.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _model_dir(cache: Path) -> Path:
    from models.demo import build_demo_models

    return build_demo_models(cache, with_refinement=False).preseg_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if available)")
    parser.add_argument("--model", type=Path, default=None, help="nnU-Net results folder (default: demo model)")
    parser.add_argument("--baseline", choices=("probs", "seg"), default="probs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from models.acquisition import select_slices
    from models.nnunet import EnsemblePredictor, bare_predictor
    from models.phantoms import make_phantom
    from models.uncertainty import EnsembleAccumulator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = tuple(args.shape) if args.shape else ((128, 256, 256) if device.startswith("cuda") else (64, 128, 128))
    cache = Path(os.environ.get("I3NODE_MODEL_CACHE", REPO / ".cache" / "demo-models"))
    model = args.model or _model_dir(cache)
    ph = make_phantom(4242, shape=shape, spacing=(2.5, 1.5, 1.5))
    image, spacing = ph.image, ph.spacing

    t0 = time.perf_counter()
    ens = EnsemblePredictor(model, device=device)
    t_load_ens = time.perf_counter() - t0
    t0 = time.perf_counter()
    bare = bare_predictor(model, folds=ens.folds, device=device)
    t_load_bare = time.perf_counter() - t0
    want_probs = args.baseline == "probs"

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_bare() -> dict[str, float]:
        t = time.perf_counter()
        bare.predict_single_npy_array(image[None], {"spacing": list(spacing)}, None, None, want_probs)
        sync()
        return {"total": time.perf_counter() - t}

    def run_ens() -> dict[str, float]:
        t = time.perf_counter()
        acc = EnsembleAccumulator(check=False)
        t_unc = 0.0
        for member in ens.iter_members(image, spacing):
            ta = time.perf_counter()
            acc.add(member)
            t_unc += time.perf_counter() - ta
        ta = time.perf_counter()
        u = acc.entropy()
        seg = acc.segmentation()
        picks = select_slices(u)
        t_unc += time.perf_counter() - ta
        sync()
        del seg, picks
        return {"total": time.perf_counter() - t, "uncertainty": t_unc}

    run_bare()  # warm-up (allocator, caches)
    run_ens()
    bare_t: list[float] = []
    ens_t: list[dict[str, float]] = []
    for _ in range(args.repeat):  # interleaved so machine load hits both alike
        bare_t.append(run_bare()["total"])
        ens_t.append(run_ens())
    tb = statistics.median(bare_t)
    ens_totals = [r["total"] for r in ens_t]
    te = statistics.median(ens_totals)
    tu = statistics.median(r["uncertainty"] for r in ens_t)
    ratio = te / tb
    share = tu / te
    print(f"model {model} ({ens.n_members} folds), input {shape}, device {device}, "
          f"torch threads {torch.get_num_threads()}, repeat {args.repeat}")
    print(f"load: bare {t_load_bare:.2f} s, ensemble {t_load_ens:.2f} s")
    print(f"bare nnU-Net ({args.baseline}, logit average of {ens.n_members} folds): {tb:.2f} s "
          f"(runs {', '.join(f'{v:.2f}' for v in bare_t)})")
    print(f"i3node members + uncertainty + selection:  {te:.2f} s "
          f"(runs {', '.join(f'{v:.2f}' for v in ens_totals)})")
    print(f"overhead ratio i3node / bare: {ratio:.3f}  (target <= 1.15) {'OK' if ratio <= 1.15 else 'MISSED'}")
    print(f"uncertainty + selection: {tu * 1000:.1f} ms = {share * 100:.2f}% of i3node total "
          f"(target < 2%) {'OK' if share < 0.02 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
