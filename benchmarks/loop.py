"""Benchmark: the node's end-to-end latencies as ratios of bare model inference.

Side by side on the same machine, models and input (a phantom, 48x96x96 by default on CPU):

1. **refinement loop**: time from the corrected SEG's C-STORE (sent by a viewer stand-in) to
   the refined SEG's arrival at that viewer, divided by one bare refinement inference
   (``RefinementModel.predict``) on the same input. Target <= 1.15.
2. **presegmentation loop**: time from the last instance received to the AI SEG delivered,
   minus the stable-study wait, divided by one bare presegmentation inference (a plain
   ``nnUNetPredictor`` with the same folds, nnU-Net's own fold ensemble).

Run: ``python -m benchmarks.loop [--shape 48 96 96] [--repeat 2]``.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import SegmentationStorage

REPO = Path(__file__).resolve().parents[1]
SEG = str(SegmentationStorage)


def _wait(pred: Any, timeout: float) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError("benchmark step timed out")


def one_round(models: Any, shape: tuple[int, int, int], seed: int, workdir: Path) -> dict[str, float]:
    """Run the loop once; returns the two latencies in seconds."""
    import pydicom

    from dicom.codes import default_segment_specs
    from dicom.provenance import UidFactory
    from dicom.scp import ScpConfig, StoreSCP
    from dicom.scu import send_datasets, send_paths
    from dicom.seg_reader import read_segmentation
    from node.app import build_app
    from node.demo import (
        ViewerInbox,
        correct_named_slices,
        demo_settings,
        slices_named_by_kos,
        viewer_style_seg,
        write_synthetic_study,
    )

    paths, gt_file = write_synthetic_study(workdir / "study", seed=seed, shape=shape)
    gt = np.load(gt_file)["labels"]
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    inbox = ViewerInbox()
    viewer = StoreSCP(ScpConfig(ae_title="VIEWER", port=0, spool_dir=workdir / "viewer", min_free_bytes=0), inbox)
    viewer.start()
    settings = demo_settings(workdir, viewer.port, models.preseg_dir, models.refine_dir)
    app = build_app(settings)
    app.start()
    try:
        app.models.warm_up()  # a running node has its models loaded; loading is not part of the loop
        send_paths(paths, ae_title="I3NODE", host="127.0.0.1", port=app.port, calling_ae="PACS")
        t_last = time.monotonic()
        t_seg = _wait(lambda: len(inbox.of_class(SEG)) >= 1, 900)
        stable_wait = settings.study.stable_after_s
        _wait(lambda: any(i.sop_class_uid.endswith("88.59") for i in inbox.instances), 60)
        kos = pydicom.dcmread([i for i in inbox.instances if i.sop_class_uid.endswith("88.59")][0].path)
        images = [pydicom.dcmread(i.path, stop_before_pixels=True) for i in inbox.instances
                  if i.sop_class_uid not in (SEG,) and not i.sop_class_uid.endswith("88.59")]
        named = slices_named_by_kos(kos, source, images)
        segs = default_segment_specs()
        ai = read_segmentation(pydicom.dcmread(inbox.of_class(SEG)[0].path), source, segs).labels
        corrected = correct_named_slices(ai, gt, named)
        uids = UidFactory("2.25")
        edit = viewer_style_seg(source, corrected, segs, series_uid=uids.new(), sop_uid=uids.new())
        t0 = time.monotonic()
        send_datasets([edit], ae_title="I3NODE", host="127.0.0.1", port=app.port, calling_ae="VIEWER")
        t_ref = _wait(lambda: len(inbox.of_class(SEG)) >= 2, 900)
        return {
            "preseg_loop": t_seg - t_last - stable_wait,
            "refine_loop": t_ref - t0,
            "named": float(sum(map(len, named.values()))),
            "_corrected": corrected,  # type: ignore[dict-item]
            "_named": named,  # type: ignore[dict-item]
        }
    finally:
        app.stop()
        viewer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(48, 96, 96), metavar=("Z", "Y", "X"))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("nnUNet_compile", "f")

    from models.demo import build_demo_models
    from models.nnunet import EnsemblePredictor, bare_predictor
    from models.phantoms import make_phantom
    from models.refinement import RefinementModel, reviewed_mask
    from models.refiners import RefinementInputs, make_refiner, resolve_method

    cache = Path(os.environ.get("I3NODE_MODEL_CACHE", REPO / ".cache" / "demo-models"))
    models = build_demo_models(cache)
    shape = tuple(args.shape)
    bare_pre = bare_predictor(models.preseg_dir, device="cpu")
    ensemble = EnsemblePredictor(models.preseg_dir, device="cpu")
    net = RefinementModel(models.refine_dir, device="cpu")
    net.load()
    # The baseline is the node's own refiner (auto = model+rw) run outside the node.
    method, _ = resolve_method("auto", have_model=True, have_ensemble=True)
    bare_ref = make_refiner(method, model=net)
    loops: list[dict[str, Any]] = []
    pre_t: list[float] = []
    ref_t: list[float] = []
    for r in range(args.repeat):
        seed = 500 + r
        with tempfile.TemporaryDirectory() as tmp:
            res = one_round(models, shape, seed, Path(tmp))
        loops.append(res)
        ph = make_phantom(seed, shape=shape)
        t = time.perf_counter()
        bare_pre.predict_single_npy_array(ph.image[None], {"spacing": list(ph.spacing)}, None, None, False)
        pre_t.append(time.perf_counter() - t)
        mask = reviewed_mask(ph.labels.shape, res["_named"])
        prior = ensemble.predict_members(ph.image, ph.spacing).mean(axis=0)
        inputs = RefinementInputs(ph.image, ph.spacing, res["_corrected"].astype(np.uint8), mask, prior,
                                  prior.shape[0])
        t = time.perf_counter()
        bare_ref.refine(inputs)
        ref_t.append(time.perf_counter() - t)
    pre_loop = statistics.median(x["preseg_loop"] for x in loops)
    ref_loop = statistics.median(x["refine_loop"] for x in loops)
    pre_bare, ref_bare = statistics.median(pre_t), statistics.median(ref_t)
    print(f"input {shape}, repeat {args.repeat}, CPU threads {os.cpu_count()}")
    print(f"bare presegmentation (nnUNetPredictor, same folds): {pre_bare:.2f} s; "
          f"node last instance -> AI SEG at viewer, minus stable wait: {pre_loop:.2f} s; "
          f"ratio {pre_loop / pre_bare:.2f}")
    print(f"bare refinement ({bare_ref.name}) outside the node: {ref_bare:.2f} s; node corrected SEG C-STORE -> refined SEG at viewer: "
          f"{ref_loop:.2f} s; ratio {ref_loop / ref_bare:.2f} (target <= 1.15) "
          f"{'OK' if ref_loop / ref_bare <= 1.15 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
