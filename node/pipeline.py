"""Job steps: from a stable series to a presegmentation, and from a corrected SEG to a refinement.

Each step is a plain function over the store and a :class:`PipelineContext` (built by
the composition root, :mod:`node.app`).  Pure helpers (UID fixing, picks, merging
corrections) are separate functions so they can be tested without models or sockets.

States (persisted with timestamps in ``job_events``)::

    queued -> segmenting -> selecting -> exporting -> awaiting_correction
           -> refining -> exporting -> done   (a later corrected SEG: refining again)
    any    -> failed (reason; input kept)

Every output UID is derived from the job id, the source series and the version, so a
re-run after a crash writes the very same objects (and reuses files already written).
"""
from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from dicom.codes import SegmentSpec
from dicom.provenance import UidFactory
from dicom.seg_reader import SegReadError, read_segmentation
from dicom.seg_writer import SegKind, build_segmentation
from dicom.series import SeriesError, Volume, load_series, sort_datasets
from dicom.spool import durable_write
from dicom.values import sanitize_header
from models.acquisition import planes_per_axis, select_slices, select_slices_uss, slice_scores
from models.refinement import reviewed_mask
from models.refiners import RefinementInputs
from models.uncertainty import EnsembleAccumulator
from node.exporter import OutputFile
from node.settings import Settings
from node.store import CorrectionState, JobState, Store

__all__ = [
    "AXIS_NAMES",
    "Segmenter",
    "Refiner",
    "OutputFile",
    "PipelineContext",
    "PermanentJobError",
    "JobBusy",
    "output_uids",
    "picks_from_selection",
    "reviewed_from_picks",
    "changed_axial_slices",
    "dequantize_probabilities",
    "quantize_probabilities",
    "select_review",
    "merge_corrections",
    "run_segmentation",
    "ingest_correction",
    "run_refinement",
]

log = logging.getLogger(__name__)

AXIS_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}
AXIS_INDEX = {v: k for k, v in AXIS_NAMES.items()}
#: SeriesNumber of the review-regions SEG: ``outputs.series_number_base`` + this (base + 1 is the AI SEG,
#: + 2 the KOS, + 3 and + 4 the coronal/sagittal MPR images, + 10 + v the refined SEG v).
REVIEW_SERIES_OFFSET = 5
SEG_SOP_CLASS = str(SegmentationStorage)


class Segmenter(Protocol):
    """A presegmentation ensemble: one softmax probability array per member."""

    def iter_members(self, image: np.ndarray, spacing: Sequence[float]) -> Iterator[np.ndarray]:
        """Yield ``(C, z, y, x)`` float probabilities per ensemble member."""
        ...


class Refiner(Protocol):
    """A refiner (``models.refiners``): the corrections plus the presegmentation -> labels."""

    name: str
    version: str

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """Return ``uint8 (z, y, x)`` labels with reviewed voxels equal to the expert's."""
        ...


class PermanentJobError(Exception):
    """A job failure that retrying cannot fix (bad series, unreadable SEG)."""


class JobBusy(Exception):
    """The job is being refined (by this or another node); the corrected SEG waits its turn."""


@dataclass
class PipelineContext:
    """What the job steps need; built by :func:`node.app.build_app`."""

    store: Store
    settings: Settings
    segments: tuple[SegmentSpec, ...]
    segmenter: Callable[[], Segmenter]
    refiner: Callable[[], Refiner]
    register_outputs: Callable[[int, int, Sequence[OutputFile]], None]
    #: Version of the presegmentation model (written into every SEG it makes); read at the first export.
    model_version: Callable[[], str] = field(default=lambda: "1")
    stage_timer: Callable[[str, float], None] = field(default=lambda stage, secs: None)
    on_correction: Callable[[str, int], None] = field(default=lambda sop_uid, job_id: None)

    @property
    def uids(self) -> UidFactory:
        """UID factory below the configured root."""
        return UidFactory(self.settings.outputs.uid_root)

    def workdir(self, job_id: int) -> Path:
        """Folder of a job's outputs and working arrays."""
        return self.settings.outputs_dir / f"job-{job_id}"


# -- pure helpers ---------------------------------------------------------------------


def output_uids(uids: UidFactory, job_id: int, source_series_uid: str, version: int) -> dict[str, str]:
    """The fixed UIDs of a job version's outputs (same inputs, same UIDs)."""
    key = (str(job_id), source_series_uid)
    out = {
        "seg_series": uids.derive(*key, "seg-series", str(version)),
        "seg_sop": uids.derive(*key, "seg", str(version)),
    }
    if version == 1:
        out.update(
            kos_series=uids.derive(*key, "kos-series"),
            kos_sop=uids.derive(*key, "kos"),
            mpr_series_1=uids.derive(*key, "mpr-series", "1"),
            mpr_series_2=uids.derive(*key, "mpr-series", "2"),
            advice_series=uids.derive(*key, "advice-series"),
            advice_sop=uids.derive(*key, "advice"),
        )
    return out


def picks_from_selection(
    selection: Mapping[int, Sequence[int]], uncertainty: np.ndarray, volume: Volume
) -> list[dict[str, Any]]:
    """Turn selected indices into picks with rank, score and position (mm along the slice normal).

    Picks are ranked over all orientations by their slice uncertainty (sum of voxel
    uncertainty over the slice), most uncertain first.
    """
    picks: list[dict[str, Any]] = []
    for axis, indices in selection.items():
        scores = slice_scores(uncertainty, axis)
        for idx in indices:
            picks.append(
                {
                    "axis": int(axis),
                    "orientation": AXIS_NAMES[int(axis)],
                    "index": int(idx),
                    "score": float(scores[idx]),
                    "position_mm": float(volume.slice_position(int(axis), int(idx))),
                }
            )
    picks.sort(key=lambda p: (-p["score"], p["axis"], p["index"]))
    for rank, p in enumerate(picks, start=1):
        p["rank"] = rank
    return picks


def select_review(uncertainty: np.ndarray, labels: np.ndarray, acquisition: Any) -> dict[int, list[int]]:
    """The slices to ask for: the configured strategy within the annotation budget.

    The budget (:func:`models.acquisition.planes_per_axis`) is ``max_slices`` per orientation,
    or with ``annotation_ratio`` > 0 that share of the presegmentation's axial foreground extent.
    """
    axes = tuple(AXIS_INDEX[a] for a in acquisition.axes)
    n_fg = int(np.count_nonzero(np.asarray(labels).reshape(labels.shape[0], -1).any(axis=1)))
    budget = planes_per_axis(axes, acquisition.max_slices, annotation_ratio=acquisition.annotation_ratio,
                             foreground_axial_slices=n_fg)
    selection: dict[int, list[int]] = {}
    for axis in axes:
        if acquisition.strategy == "uss":
            chosen = select_slices_uss(uncertainty, max_slices=budget[axis], axes=(axis,))
        else:
            chosen = select_slices(uncertainty, min_dist=acquisition.min_dist, min_uncert=acquisition.min_uncert,
                                   max_slices=budget[axis], axes=(axis,))
        selection[axis] = chosen[axis]
    return selection


def quantize_probabilities(probs: np.ndarray) -> np.ndarray:
    """Probabilities as uint8 (``round(255 p)``): what a job keeps of the ensemble's mean."""
    return np.round(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantize_probabilities(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_probabilities`, renormalised to sum 1 over classes."""
    p = q.astype(np.float32) / np.float32(255.0)
    return p / np.maximum(p.sum(axis=0, keepdims=True), np.float32(1e-6))


def reviewed_from_picks(picks: Sequence[Mapping[str, Any]]) -> dict[int, list[int]]:
    """``axis -> sorted slice indices`` of the slices the node asked the radiologist to review."""
    out: dict[int, list[int]] = {}
    for p in picks:
        out.setdefault(int(p["axis"]), []).append(int(p["index"]))
    return {a: sorted(set(v)) for a, v in sorted(out.items())}


def changed_axial_slices(node_labels: np.ndarray, corrected: np.ndarray, slices_with_frames: set[int]) -> list[int]:
    """Axial slices where the returned SEG differs from the node's own last output.

    Only slices that carry frames in the returned SEG are compared: a viewer that
    omits empty frames says nothing about the slices it left out.
    """
    changed = [k for k in sorted(slices_with_frames) if not np.array_equal(node_labels[k], corrected[k])]
    return changed


def merge_corrections(
    expert: np.ndarray | None, reviewed: np.ndarray | None, new_labels: np.ndarray, new_reviewed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a new round of corrections into the ones so far (the latest round wins).

    Returns
    -------
    expert, reviewed
        ``uint8`` labels valid on ``reviewed`` voxels, and the union of reviewed voxels.
    """
    if expert is None or reviewed is None:
        expert = np.zeros(new_labels.shape, dtype=np.uint8)
        reviewed = np.zeros(new_labels.shape, dtype=bool)
    expert = expert.copy()
    expert[new_reviewed] = new_labels[new_reviewed]
    return expert, reviewed | new_reviewed


KOS_TITLES = {
    "113000": "Of Interest",
    "113004": "For Teaching",
    "113008": "For Peer Review",
    "113009": "For Research",
}


def kos_title_code(value: str) -> Any:
    """The DCM code of a Key Object Selection document title (CID 7010)."""
    from pydicom.sr.coding import Code

    return Code(value, "DCM", KOS_TITLES[value])


# -- I/O helpers -----------------------------------------------------------------------


def _write_dataset(ds: Dataset, path: Path) -> Path:
    def write(fh: Any) -> None:
        ds.save_as(fh, enforce_file_format=True)

    return durable_write(path, write)


def _write_arrays(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    # numpy's stub declares ``allow_pickle: bool`` beside ``**kwds: ArrayLike`` and mypy checks
    # the unpacked dict against both; the keys here are array names, never ``allow_pickle``.
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    durable_write(path, lambda fh: fh.write(buf.getvalue()))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _load_volume(ctx: PipelineContext, series_uid: str) -> tuple[Volume, list[Dataset]]:
    paths = ctx.store.instance_paths(series_uid)
    if not paths:
        raise PermanentJobError(f"series {series_uid} has no recorded instances")
    try:
        volume = load_series(paths)
    except SeriesError as exc:
        raise PermanentJobError(f"series {series_uid} cannot be assembled: {exc}") from exc
    headers = sort_datasets([pydicom.dcmread(p, stop_before_pixels=True) for p in paths])
    fixed: set[str] = set()
    for ds in headers:
        fixed.update(sanitize_header(ds))
    if fixed:
        log.warning("series %s: invalid values of %s left out of the outputs (values not logged)", series_uid,
                    ", ".join(sorted(fixed)))
    return volume, headers


def _prior(ctx: PipelineContext, work: Path, volume: Volume) -> np.ndarray:
    """The presegmentation ensemble's mean probabilities of a job (recomputed for older jobs)."""
    arrays = _read_arrays(work / "preseg.npz")
    if "probabilities" in arrays:
        return dequantize_probabilities(arrays["probabilities"])
    acc = EnsembleAccumulator()
    for member in ctx.segmenter().iter_members(volume.array, volume.spacing):
        acc.add(member)
    mean = acc.mean()
    _write_arrays(work / "preseg.npz", **arrays, probabilities=quantize_probabilities(mean))
    return dequantize_probabilities(quantize_probabilities(mean))


def _timed(ctx: PipelineContext, stage: str, t0: float) -> float:
    secs = time.monotonic() - t0
    ctx.stage_timer(stage, secs)
    return secs


# -- the presegmentation job -------------------------------------------------------------


def run_segmentation(ctx: PipelineContext, job_id: int) -> None:
    """Run a job this node claimed (:meth:`node.store.Store.claim_job`) up to ``awaiting_correction``.

    Outputs are registered for delivery.  Every transition is guarded by this node's
    claim: :class:`node.store.LeaseLost` means another node took the job over.

    Raises
    ------
    PermanentJobError
        For a failure that retrying cannot fix; other exceptions are retried by the runner.
    """
    store, s = ctx.store, ctx.settings
    job = store.job(job_id)
    if job is None:
        raise KeyError(f"job {job_id} does not exist")
    series_uid = job["series_uid"]
    data = store.job_data(job_id)
    data.setdefault("uids", output_uids(ctx.uids, job_id, series_uid, 1))
    for name, uid in output_uids(ctx.uids, job_id, series_uid, 1).items():
        data["uids"].setdefault(name, uid)  # outputs added since the job started (same derivation)
    uids = data["uids"]
    work = ctx.workdir(job_id)
    arrays_path = work / "preseg.npz"
    timings: dict[str, float] = dict(data.get("timings", {}))

    store.set_job_state(job_id, JobState.SEGMENTING, data=data, owned=True, reason=f"attempt {job['attempts']}")
    t0 = time.monotonic()
    volume, headers = _load_volume(ctx, series_uid)
    timings["load_series"] = _timed(ctx, "load_series", t0)

    if arrays_path.exists():
        arrays = _read_arrays(arrays_path)
        labels, uncertainty = arrays["labels"], arrays["uncertainty"]
    else:
        t0 = time.monotonic()
        acc = EnsembleAccumulator()
        for member in ctx.segmenter().iter_members(volume.array, volume.spacing):
            acc.add(member)
        if acc.count == 0:
            raise RuntimeError("the presegmentation ensemble produced no member")
        labels = acc.segmentation()
        uncertainty = acc.entropy(s.acquisition.uncertainty)
        timings["presegmentation"] = _timed(ctx, "presegmentation", t0)
        _write_arrays(arrays_path, labels=labels, uncertainty=uncertainty.astype(np.float32),
                      probabilities=quantize_probabilities(acc.mean()))

    store.set_job_state(job_id, JobState.SELECTING, data=data, owned=True)
    t0 = time.monotonic()
    selection = select_review(uncertainty, labels, s.acquisition)
    picks = picks_from_selection(selection, uncertainty, volume)
    data["picks"] = picks
    n_fg = int(np.count_nonzero(labels.reshape(labels.shape[0], -1).any(axis=1)))
    data["annotation_ratio"] = round(len(picks) / n_fg, 4) if n_fg else None
    timings["selection"] = _timed(ctx, "selection", t0)

    store.set_job_state(job_id, JobState.EXPORTING, data=data, owned=True)
    t0 = time.monotonic()
    files = _export_presegmentation(ctx, job_id, volume, headers, labels, picks, uids, work / "v1")
    ctx.register_outputs(job_id, 1, files)
    timings["export"] = _timed(ctx, "export", t0)
    data["timings"] = timings
    data["outputs_v1"] = [f.sop_uid for f in files]
    store.set_job_state(
        job_id,
        JobState.AWAITING_CORRECTION,
        data=data,
        reason=f"{len(picks)} slice(s) to review",
        owned=True,
    )
    log.info("job %d: presegmentation exported, %d slice(s) requested for review", job_id, len(picks))


def _write_seg(
    ctx: PipelineContext,
    headers: list[Dataset],
    labels: np.ndarray,
    uids: Mapping[str, str],
    outdir: Path,
    *,
    version: int,
    refiner: Refiner | None = None,
) -> tuple[Path, Dataset]:
    """Build and durably write a version's SEG, or reuse it if a previous run wrote it.

    Version 1 is the AI presegmentation (AUTOMATIC), later versions are refinements
    (SEMIAUTOMATIC) whose algorithm name and version say which refiner made them.  Reusing
    the file is what keeps a re-run after a crash from sending a second, different SEG under
    the same UIDs.
    """
    s = ctx.settings
    path = outdir / f"{uids['seg_sop']}.dcm"
    if path.exists():
        return path, pydicom.dcmread(path)
    name, model_version = s.models.model_id, ctx.model_version()
    if refiner is not None:
        name, model_version = f"{s.models.model_id} refined by {refiner.name}", refiner.version
    seg = build_segmentation(
        headers,
        labels,
        ctx.segments,
        model_id=name[:64],
        model_version=model_version[:64] or "1",
        series_uid=uids["seg_series"],
        sop_uid=uids["seg_sop"],
        series_number=s.outputs.series_number_base + (1 if version == 1 else 10 + version),
        kind=SegKind.PRESEG if version == 1 else SegKind.REFINED,
        version=version,
        keep_empty_frames=s.outputs.keep_empty_frames,
        uid_root=s.outputs.uid_root,
    )
    _write_dataset(seg, path)
    return path, seg


def _review_regions(ctx: PipelineContext, job_id: int, volume: Volume) -> tuple[np.ndarray, list[float]] | None:
    """The job's review regions (MECCA advice): ``uint8`` rank map and mean confidences, or None.

    Computed once from the stored, quantized ensemble mean (so a re-run after a crash finds the
    same regions) and kept in ``advice.npz`` next to ``preseg.npz``.
    """
    from models.advice import advice_regions

    advice = ctx.settings.advice
    path = ctx.workdir(job_id) / "advice.npz"
    if path.exists():
        arrays = _read_arrays(path)
        ranks, confidences = arrays["rank_map"], [float(c) for c in arrays["confidences"]]
        return (ranks, confidences) if confidences else None
    if not advice.enabled or advice.top_k == 0:
        return None
    t0 = time.monotonic()
    prior = _prior(ctx, ctx.workdir(job_id), volume)
    try:
        regions, label_map = advice_regions(volume.array, prior, n_segments=advice.n_segments, top_k=advice.top_k,
                                            spacing=volume.spacing)
    except ValueError as exc:
        log.warning("job %d: no review regions (%s)", job_id, exc)
        return None
    ranks = np.zeros(label_map.shape, dtype=np.uint8)
    for rank, region in enumerate(regions, start=1):
        ranks[label_map == region.region_id] = rank
    confidences = [float(r.mean_confidence) for r in regions]
    _write_arrays(path, rank_map=ranks, confidences=np.asarray(confidences, dtype=np.float64),
                  region_ids=np.asarray([r.region_id for r in regions], dtype=np.int32))
    secs = _timed(ctx, "advice", t0)
    log.info("job %d: %d review region(s) from %d supervoxels in %.2f s", job_id, len(regions),
             int(label_map.max()), secs)
    return (ranks, confidences) if confidences else None


def _write_review_seg(
    ctx: PipelineContext,
    headers: list[Dataset],
    regions: tuple[np.ndarray, list[float]],
    uids: Mapping[str, str],
    outdir: Path,
) -> tuple[Path, Dataset]:
    """Build and durably write the review-regions SEG, or reuse it if a previous run wrote it."""
    from dicom.seg_writer import build_review_regions_segmentation

    s = ctx.settings
    path = outdir / f"{uids['advice_sop']}.dcm"
    if path.exists():
        return path, pydicom.dcmread(path)
    seg = build_review_regions_segmentation(
        headers,
        regions[0],
        regions[1],
        model_id=f"{s.models.model_id} review regions (SLIC {s.advice.n_segments})"[:64],
        model_version=ctx.model_version()[:64] or "1",
        series_uid=uids["advice_series"],
        sop_uid=uids["advice_sop"],
        series_number=s.outputs.series_number_base + REVIEW_SERIES_OFFSET,
        keep_empty_frames=s.outputs.keep_empty_frames,
        uid_root=s.outputs.uid_root,
    )
    _write_dataset(seg, path)
    return path, seg


def _export_presegmentation(
    ctx: PipelineContext,
    job_id: int,
    volume: Volume,
    headers: list[Dataset],
    labels: np.ndarray,
    picks: list[dict[str, Any]],
    uids: Mapping[str, str],
    outdir: Path,
) -> list[OutputFile]:
    from dicom.ko_writer import SlicePick, build_key_object_selection
    from dicom.mpr import build_reformatted_images

    s = ctx.settings
    base = s.outputs.series_number_base
    files: list[OutputFile] = []
    seg_path, seg = _write_seg(ctx, headers, labels, uids, outdir, version=1)
    files.append(OutputFile(uids["seg_sop"], "seg", uids["seg_series"], seg_path))
    regions = _review_regions(ctx, job_id, volume)
    review_seg = None
    if regions is not None:
        review_path, review_seg = _write_review_seg(ctx, headers, regions, uids, outdir)
        files.append(OutputFile(uids["advice_sop"], "seg", uids["advice_series"], review_path))

    mpr_datasets: list[Dataset] = []
    for axis in (1, 2):
        indices = [p["index"] for p in picks if p["axis"] == axis]
        if not indices:
            continue
        images = build_reformatted_images(
            headers,
            volume.array,
            axis,
            indices,
            series_uid=uids[f"mpr_series_{axis}"],
            uid_root=s.outputs.uid_root,
            series_number=base + 2 + axis,
            series_description=f"AI review {AXIS_NAMES[axis]} slices (research use)",
        )
        for ds in images:
            path = outdir / f"{ds.SOPInstanceUID}.dcm"
            if not path.exists():
                _write_dataset(ds, path)
            files.append(OutputFile(str(ds.SOPInstanceUID), "mpr", str(ds.SeriesInstanceUID), path))
        mpr_datasets.extend(images)

    kos_path = outdir / f"{uids['kos_sop']}.dcm"
    if not kos_path.exists():
        slice_picks = [
            SlicePick(
                axis=p["axis"], index=p["index"], position_mm=p["position_mm"], rank=p["rank"], uncertainty=p["score"]
            )
            for p in picks
        ]
        kos = build_key_object_selection(
            headers,
            slice_picks,
            seg,
            mpr_datasets,
            series_uid=uids["kos_series"],
            sop_uid=uids["kos_sop"],
            series_number=base + 2,
            title=kos_title_code(s.outputs.kos_title),
            review_seg=review_seg,
            review_rank_map=None if regions is None else regions[0],
            review_confidences=() if regions is None else regions[1],
        )
        _write_dataset(kos, kos_path)
    files.append(OutputFile(uids["kos_sop"], "kos", uids["kos_series"], kos_path))
    return files


# -- corrected SEGs --------------------------------------------------------------------------


def referenced_series_uid(seg: Dataset) -> str | None:
    """The source series a SEG refers to (ReferencedSeriesSequence), or None."""
    for item in getattr(seg, "ReferencedSeriesSequence", []) or []:
        uid = getattr(item, "SeriesInstanceUID", None)
        if uid:
            return str(uid)
    return None


def ingest_correction(ctx: PipelineContext, sop_uid: str) -> int | None:
    """Match a received SEG to its job; returns the job id, or None (kept, reported).

    The SEG's state becomes ``processing`` when matched (the refinement is then run by
    :func:`run_refinement`), ``unmatched`` when no job waits for it, ``rejected`` when
    it cannot be read.
    """
    store = ctx.store
    path = store.instance_path(sop_uid)
    if path is None:
        store.set_correction(sop_uid, CorrectionState.REJECTED, reason="instance file not recorded")
        return None
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    series_uid = referenced_series_uid(seg)
    if series_uid is None:
        store.set_correction(sop_uid, CorrectionState.REJECTED, reason="SEG has no ReferencedSeriesSequence")
        return None
    job = store.latest_job_for_series(
        series_uid, [JobState.AWAITING_CORRECTION.value, JobState.DONE.value, JobState.REFINING.value]
    )
    if job is None:
        store.set_correction(
            sop_uid, CorrectionState.UNMATCHED, reason=f"references series {series_uid}, which has no job awaiting corrections"
        )
        log.warning("corrected SEG %s matches no job (series %s); kept", sop_uid, series_uid)
        return None
    store.set_correction(sop_uid, CorrectionState.PROCESSING, job_id=int(job["id"]))
    ctx.on_correction(sop_uid, int(job["id"]))
    return int(job["id"])


def run_refinement(ctx: PipelineContext, job_id: int, correction_sop_uid: str) -> int:
    """Refine a job from one more corrected SEG; returns the new output version.

    All reviewed slices so far are used (latest round wins where rounds overlap);
    reviewed voxels keep the expert's labels exactly.
    """
    store, s = ctx.store, ctx.settings
    job = store.job(job_id)
    if job is None:
        raise KeyError(f"job {job_id} does not exist")
    data = store.job_data(job_id)
    applied = list(data.get("applied_corrections", []))
    if correction_sop_uid in applied:  # the same SEG twice: one refinement
        store.set_correction(correction_sop_uid, CorrectionState.APPLIED, job_id=job_id, reason="already applied")
        return int(job["version"])
    version = int(job["version"]) + 1
    if not store.claim_for_refinement(job_id, f"refining v{version}"):
        raise JobBusy(f"job {job_id} is busy ({job['state']})")
    # Read again under the claim: another refinement may have finished in between.
    job, data = store.job(job_id) or job, store.job_data(job_id)
    version = int(job["version"]) + 1
    work = ctx.workdir(job_id)
    t0 = time.monotonic()
    volume, headers = _load_volume(ctx, job["series_uid"])
    seg_path = store.instance_path(correction_sop_uid)
    if seg_path is None:
        raise PermanentJobError(f"corrected SEG {correction_sop_uid} is not on disk")
    try:
        result = read_segmentation(pydicom.dcmread(seg_path), headers, ctx.segments)
    except SegReadError as exc:
        store.set_correction(correction_sop_uid, CorrectionState.REJECTED, job_id=job_id, reason=str(exc))
        back = JobState.DONE if data.get("refined_versions") else JobState.AWAITING_CORRECTION
        store.set_job_state(job_id, back, data=data, reason=f"corrected SEG rejected: {exc}", owned=True)
        log.warning("job %d: corrected SEG %s rejected: %s", job_id, correction_sop_uid, exc)
        return int(job["version"])
    if result.unknown_segments:
        log.warning(
            "job %d: corrected SEG has %d segment(s) matching no class; ignored",
            job_id,
            len(result.unknown_segments),
        )
    if result.review_regions:
        log.info("job %d: corrected SEG carries %d review region(s) (AI advice); ignored, not a class",
                 job_id, len(result.review_regions))
    for warning in result.warnings:
        log.warning("job %d: corrected SEG %s: %s", job_id, correction_sop_uid, warning)

    reviewed = reviewed_from_picks(data.get("picks", []))
    if s.acquisition.corrected_slices == "requested+changed":
        last_labels = _read_arrays(work / f"labels_v{job['version']}.npz")["labels"] if job["version"] > 1 else _read_arrays(work / "preseg.npz")["labels"]
        changed = changed_axial_slices(last_labels, result.labels, result.slices_with_frames)
        reviewed[0] = sorted(set(reviewed.get(0, [])) | set(changed))
    new_mask = reviewed_mask(result.labels.shape, reviewed)
    prev = work / "corrections.npz"
    prev_arrays = _read_arrays(prev) if prev.exists() else {}
    expert, mask = merge_corrections(prev_arrays.get("expert"), prev_arrays.get("reviewed"), result.labels, new_mask)
    _write_arrays(prev, expert=expert, reviewed=mask)
    timings = dict(data.get("timings", {}))
    timings[f"read_correction_v{version}"] = _timed(ctx, "read_correction", t0)

    t0 = time.monotonic()
    refiner = ctx.refiner()
    prior = _prior(ctx, work, volume)
    inputs = RefinementInputs(volume.array.astype(np.float32, copy=False), tuple(volume.spacing),  # type: ignore[arg-type]
                              expert, mask, prior, int(prior.shape[0]))
    refined = refiner.refine(inputs)
    refined = np.where(mask, expert, refined).astype(np.uint8)
    timings[f"refinement_v{version}"] = _timed(ctx, "refinement", t0)
    _write_arrays(work / f"labels_v{version}.npz", labels=refined)
    refiners = dict(data.get("refiners", {}))
    refiners[str(version)] = {"method": refiner.name, "version": refiner.version}
    data["refiners"] = refiners

    store.set_job_state(job_id, JobState.EXPORTING, data=data, reason=f"exporting v{version}", owned=True)
    t0 = time.monotonic()
    uids = output_uids(ctx.uids, job_id, job["series_uid"], version)
    out, _seg = _write_seg(ctx, headers, refined, uids, work / f"v{version}", version=version, refiner=refiner)
    ctx.register_outputs(job_id, version, [OutputFile(uids["seg_sop"], "seg", uids["seg_series"], out)])
    timings[f"export_v{version}"] = _timed(ctx, "export", t0)
    applied.append(correction_sop_uid)
    data["applied_corrections"] = applied
    data["refined_versions"] = sorted(set(data.get("refined_versions", [])) | {version})
    data["reviewed"] = {str(a): v for a, v in reviewed.items()}
    data["timings"] = timings
    store.set_job_state(job_id, JobState.DONE, data=data, version=version, reason=f"refined v{version} exported",
                        owned=True)
    store.set_correction(correction_sop_uid, CorrectionState.APPLIED, job_id=job_id)
    log.info("job %d: refined v%d exported", job_id, version)
    return version
