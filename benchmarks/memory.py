"""Peak memory and time of accumulate + entropy + selection for a large ensemble.

Runs the measured path in a fresh subprocess (so the parent's allocations do not count) and
reports the peak resident set size above the subprocess's baseline, as a multiple of one
float32 member, plus the tracemalloc peak of numpy allocations.  Members (softmax of random
smooth logits, float32) are generated on the fly, chunk by chunk, one at a time.

Usage::

    python benchmarks/memory.py [--shape 300 512 512] [--members 5] [--classes 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

_CHILD = "--child"


def _member(rng: np.random.Generator, c: int, shape: tuple[int, int, int], out: np.ndarray) -> None:
    """Fill ``out`` (C, z, y, x) float32 with softmax of random smooth logits, chunked along z."""
    z, y, x = shape
    # Smooth logits: low-resolution noise upsampled by repetition along y/x, varying with z.
    coarse = rng.normal(size=(c, 4, (y + 15) // 16, (x + 15) // 16)).astype(np.float32) * 2.0
    zz = np.linspace(0.0, 3.0, z, dtype=np.float32)
    step = 16
    for z0 in range(0, z, step):
        z1 = min(z, z0 + step)
        t = zz[z0:z1]
        lo = np.floor(t).astype(np.int64)
        hi = np.minimum(lo + 1, 3)
        w = (t - lo)[None, :, None, None]
        logits = (1 - w) * coarse[:, lo] + w * coarse[:, hi]  # (c, dz, y/16, x/16)
        logits = np.repeat(np.repeat(logits, 16, axis=2), 16, axis=3)[:, :, :y, :x]
        logits -= logits.max(axis=0, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=0, keepdims=True)
        out[:, z0:z1] = logits


def _child(shape: tuple[int, int, int], members: int, classes: int) -> dict[str, float]:
    import tracemalloc

    from models.acquisition import select_slices
    from models.uncertainty import EnsembleAccumulator

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    acc = EnsembleAccumulator()
    member = np.empty((classes, *shape), dtype=np.float32)
    t_gen = 0.0
    for _ in range(members):
        tg = time.perf_counter()
        _member(rng, classes, shape, member)
        t_gen += time.perf_counter() - tg
        acc.add(member)
    del member
    t1 = time.perf_counter()
    u = acc.entropy("entropy")
    t2 = time.perf_counter()
    seg = acc.segmentation()
    t3 = time.perf_counter()
    sel = select_slices(u)
    t4 = time.perf_counter()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "member_bytes": float(classes * np.prod(shape) * 4),
        "rss_increase_bytes": float(peak_rss - base_rss),
        "tracemalloc_peak_bytes": float(traced_peak),
        "t_accumulate_s": t1 - t0 - t_gen,
        "t_generate_s": t_gen,
        "t_entropy_s": t2 - t1,
        "t_segmentation_s": t3 - t2,
        "t_select_s": t4 - t3,
        "n_selected": float(sum(len(v) for v in sel.values())),
        "seg_max": float(seg.max()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument(_CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.shape[0], args.shape[1], args.shape[2])
    if args.child:
        sys.stdout.write(json.dumps(_child(shape, args.members, args.classes)) + "\n")
        return 0
    cmd = [sys.executable, __file__, _CHILD, "--shape", *map(str, shape),
           "--members", str(args.members), "--classes", str(args.classes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    m = r["member_bytes"]
    lines = [
        f"ensemble: {args.members} members x {args.classes} classes x {shape}, one float32 member = {m / 2**20:.1f} MiB",
        f"peak RSS increase (ru_maxrss): {r['rss_increase_bytes'] / 2**20:.1f} MiB = {r['rss_increase_bytes'] / m:.2f} x member",
        f"tracemalloc peak (numpy allocations): {r['tracemalloc_peak_bytes'] / 2**20:.1f} MiB = {r['tracemalloc_peak_bytes'] / m:.2f} x member",
        "  (both include the member buffer being generated; target <= 3x)",
        f"time: accumulate {r['t_accumulate_s']:.2f} s, entropy {r['t_entropy_s']:.2f} s, "
        f"segmentation {r['t_segmentation_s']:.2f} s, selection {r['t_select_s']:.2f} s "
        f"(member generation {r['t_generate_s']:.2f} s, excluded)",
        f"selected slices: {int(r['n_selected'])}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
