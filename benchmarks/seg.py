"""Benchmark: write and read a 3-segment DICOM-SEG, i3node vs. plain highdicom.

Series: synthetic CT, 512 x 512 x 300 by default (``--shape z y x``), labels
0..3 (three nested ellipsoids).  Both sides produce BINARY SEGs with every
frame kept (300 x 3 frames) and read them back into a label map:

* i3node: :func:`dicom.seg_writer.build_segmentation` + ``save_as`` /
  ``dcmread`` + :func:`dicom.seg_reader.read_segmentation`;
* baseline: ``highdicom.seg.Segmentation(...)`` + ``save_as`` /
  ``highdicom.seg.segread(...)`` + ``get_pixels_by_source_instance(...,
  combine_segments=True)``.

Run: ``python -m benchmarks.seg [--shape 300 512 512] [--repeat 2]``.
Target: i3node no slower than 1.2x the baseline.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.sr.coding import Code

from dicom.codes import ANATOMICAL_STRUCTURE, SegmentSpec, default_segment_specs
from dicom.seg_reader import read_segmentation
from dicom.seg_writer import SourceGeometry, build_segmentation, segment_descriptions
from dicom.synthetic import build_ct_series

T = TypeVar("T")
ROOT = "1.2.826.0.1.3680043.10.1234.77"


def _timed(fn: Callable[[], T], repeat: int) -> tuple[T, float]:
    times = []
    result: T
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    nz, ny, nx = shape
    z, y, x = np.ogrid[-1 : 1 : nz * 1j, -1 : 1 : ny * 1j, -1 : 1 : nx * 1j]
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(z / 0.8) ** 2 + (y / 0.7) ** 2 + (x / 0.75) ** 2 <= 1] = 1
    labels[((z - 0.1) / 0.3) ** 2 + ((y + 0.2) / 0.25) ** 2 + ((x - 0.3) / 0.2) ** 2 <= 1] = 2
    labels[np.broadcast_to((y / 0.05) ** 2 + ((x + 0.3) / 0.05) ** 2 <= 1, shape)] = 3
    return labels


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    specs = (*default_segment_specs(), SegmentSpec(3, "vessel", ANATOMICAL_STRUCTURE, Code("59820001", "SCT", "Blood vessel"), (200, 0, 0)))
    labels = _labels(shape)  # type: ignore[arg-type]
    sources = build_ct_series(np.zeros(shape, np.int16), (1.0, 0.7, 0.7), uid_root=ROOT, descending=True)
    for ds in sources:  # metadata only, as the node passes them
        del ds.PixelData
    geometry = SourceGeometry.from_datasets(sources)
    out = Path(tempfile.mkdtemp(prefix="segbench-"))
    uids = iter(f"{ROOT}.{i}" for i in range(1, 100))

    # -- i3node
    def node_write() -> Path:
        seg = build_segmentation(
            sources, labels, specs, model_id="bench", model_version="1", series_uid=next(uids),
            sop_uid=next(uids), series_number=900,
        )
        path = out / "node.dcm"
        seg.save_as(path, enforce_file_format=True)
        return path

    def node_read(path: Path) -> np.ndarray:
        return read_segmentation(dcmread(path), sources, specs).labels

    # -- plain highdicom
    def hd_write() -> Path:
        seg = hd.seg.Segmentation(
            source_images=list(geometry.datasets),
            pixel_array=labels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(
                specs, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, model_id="bench", model_version="1"
            ),
            series_instance_uid=next(uids),
            series_number=901,
            sop_instance_uid=next(uids),
            instance_number=1,
            manufacturer="bench",
            manufacturer_model_name="bench",
            software_versions="1",
            device_serial_number="1",
            omit_empty_frames=False,
        )
        path = out / "highdicom.dcm"
        seg.save_as(path, enforce_file_format=True)
        return path

    def hd_read(path: Path) -> np.ndarray:
        seg = hd.seg.segread(path)
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(geometry.sop_uids), combine_segments=True, skip_overlap_checks=True,
        )
        return np.asarray(arr, dtype=np.uint8)

    # Warm up both paths (imports, highdicom's IOD tables) on a tiny series before timing.
    small = build_ct_series(np.zeros((2, 8, 8), np.int16), (1.0, 1.0, 1.0), uid_root=ROOT)
    small_labels = np.zeros((2, 8, 8), np.uint8)
    small_labels[0, 2:4, 2:4] = 1
    warm = build_segmentation(small, small_labels, specs, model_id="w", model_version="1",
                              series_uid=f"{ROOT}.999.1", sop_uid=f"{ROOT}.999.2", series_number=1)
    warm.save_as(out / "warm.dcm", enforce_file_format=True)
    read_segmentation(dcmread(out / "warm.dcm"), small, specs)
    hd.seg.segread(out / "warm.dcm").get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in small], combine_segments=True)
    (out / "warm.dcm").unlink()

    # Interleave the two sides so that load drift on a shared machine hits both alike.
    times: dict[str, list[float]] = {"node_w": [], "hd_w": [], "node_r": [], "hd_r": []}
    for _ in range(args.repeat):
        gc.collect()
        node_path, t = _timed(node_write, 1)
        times["node_w"].append(t)
        gc.collect()
        hd_path, t = _timed(hd_write, 1)
        times["hd_w"].append(t)
        gc.collect()
        node_labels, t = _timed(lambda p=node_path: node_read(p), 1)
        times["node_r"].append(t)
        gc.collect()
        hd_labels, t = _timed(lambda p=hd_path: hd_read(p), 1)
        times["hd_r"].append(t)
    t_node_w, t_hd_w, t_node_r, t_hd_r = (statistics.median(times[k]) for k in ("node_w", "hd_w", "node_r", "hd_r"))
    if not (np.array_equal(node_labels, labels) and np.array_equal(hd_labels, labels)):
        print("ERROR: a label map did not round-trip", file=sys.stderr)
        return 1

    rows = [
        ("write (build + save)", t_node_w, t_hd_w),
        ("read (load + label map)", t_node_r, t_hd_r),
        ("total", t_node_w + t_node_r, t_hd_w + t_hd_r),
    ]
    print(f"SEG benchmark: shape {shape}, 3 segments, {shape[0] * 3} frames, repeat {args.repeat} (median)")
    print(f"{'step':<26}{'i3node s':>10}{'highdicom s':>13}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:<26}{a:>10.2f}{b:>13.2f}{a / b:>8.2f}")
    print(f"{'file size MB':<26}{node_path.stat().st_size / 1e6:>10.2f}{hd_path.stat().st_size / 1e6:>13.2f}")
    for path in (node_path, hd_path):
        path.unlink()
    out.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
