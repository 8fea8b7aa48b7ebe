"""Training sets from the radiologists' corrections, and presegmentation models trained on them.

Seed 004 (USS): sparse, uncertainty-chosen slices are enough to train a robust model when
the loss ignores the voxels nobody annotated.  Every corrected SEG the node receives is
such an annotation - an expert's labels on the planes the node asked for, on a study from
this hospital's scanners.  :func:`export_corrections` turns the node's corrected studies
into an nnU-Net raw dataset whose labels hold the expert's labels on the reviewed planes
and nnU-Net's ``ignore`` label everywhere else; :func:`train_from_exports` trains a new,
versioned presegmentation ensemble on one or more such exports.  The node never switches
to a new model by itself: the operator points ``models.preseg_dir`` at it.

The export carries no patient attributes: cases are named by a hash of the series UID,
the NIfTI files hold voxels and spacing only, and ``dataset.json`` holds counts.  The same
corrections give byte-identical files.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.store import CorrectionState, Store

__all__ = [
    "ExportReport",
    "ExportError",
    "case_id",
    "sparse_labels",
    "export_corrections",
    "load_exports",
    "train_from_exports",
    "MODEL_INFO",
]

log = logging.getLogger(__name__)

#: Written into a model folder trained here: its version and what it was trained on.
MODEL_INFO = "i3node_model.json"
_DATASET_KIND = "i3node sparse corrections"


class ExportError(ValueError):
    """An export or a training set cannot be made (the message says which folder or case)."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_corrections` wrote."""

    folder: Path
    cases: int
    skipped: tuple[str, ...]  #: jobs left out, with the reason (no patient data)
    annotated_fraction: float  #: share of exported voxels that carry an expert label


def case_id(series_uid: str) -> str:
    """A stable case name that reveals nothing: ``i3n_`` and 16 hex digits of the series UID's SHA-256."""
    return "i3n_" + hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def sparse_labels(expert: np.ndarray, reviewed: np.ndarray, ignore_value: int) -> np.ndarray:
    """The expert's labels where reviewed, ``ignore_value`` everywhere else.

    Raises
    ------
    ExportError
        When the arrays differ in shape or a label reaches ``ignore_value``.
    """
    if expert.shape != reviewed.shape:
        raise ExportError(f"expert labels {expert.shape} and reviewed mask {reviewed.shape} differ in shape")
    if expert.size and int(expert.max()) >= ignore_value:
        raise ExportError(f"expert label {int(expert.max())} collides with the ignore value {ignore_value}")
    return np.where(reviewed.astype(bool), expert, ignore_value).astype(np.uint8)


def _applied_by_job(store: Store, since: float | None) -> dict[int, float]:
    """Job id -> time of its newest applied corrected SEG (only corrections received since ``since``)."""
    newest: dict[int, float] = {}
    for row in store.corrections([CorrectionState.APPLIED]):
        if row["job_id"] is None or (since is not None and float(row["received_at"]) < since):
            continue
        jid = int(row["job_id"])
        newest[jid] = max(newest.get(jid, 0.0), float(row["received_at"]))
    return newest


def _job_case(store: Store, job: Mapping[str, Any], workdir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             tuple[float, float, float]]:
    """Image, expert labels, reviewed mask and spacing of one corrected job (raises ExportError)."""
    from dicom.series import SeriesError, load_series

    arrays_path = workdir / "corrections.npz"
    if not arrays_path.is_file():
        raise ExportError("its corrections file is gone (purged?)")
    paths = store.instance_paths(str(job["series_uid"]))
    if not paths or not all(p.is_file() for p in paths):
        raise ExportError("its images are no longer in the spool (purged?)")
    try:
        volume = load_series(paths)
    except SeriesError as exc:
        raise ExportError(f"its series cannot be assembled: {exc}") from None
    with np.load(arrays_path) as z:
        expert, reviewed = z["expert"], z["reviewed"]
    if expert.shape != volume.array.shape:
        raise ExportError(f"corrections {expert.shape} do not match the series {volume.array.shape}")
    spacing = tuple(float(v) for v in volume.spacing)
    return volume.array.astype(np.float32), expert, reviewed.astype(bool), spacing  # type: ignore[return-value]


def export_corrections(
    store: Store,
    outputs_dir: Path,
    class_names: Sequence[str],
    out: Path,
    *,
    since: float | None = None,
    modality: str = "CT",
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write an nnU-Net raw dataset of every corrected study: image, and sparse labels with ``ignore``.

    Parameters
    ----------
    store
        The node's state store.
    outputs_dir
        The node's outputs folder (``job-N/corrections.npz`` holds each job's merged expert
        labels and reviewed mask, all correction rounds).
    class_names
        Label names by value, ``background`` first (the node's segments).
    out
        The dataset folder to write (``imagesTr/``, ``labelsTr/``, ``dataset.json``); an
        earlier export there is replaced.
    since
        Only jobs with a corrected SEG received at or after this POSIX time.
    modality
        Channel name for nnU-Net's normalisation (``CT``; anything else is z-scored).

    Raises
    ------
    ExportError
        When no corrected study can be exported.
    """
    from models.training import write_raw_dataset

    names = ["background", *[str(n) for n in class_names[1:]]]
    ignore = len(names)
    images, labels, spacings, ids, skipped = [], [], [], [], []
    info: dict[str, Any] = {}
    annotated = total = 0
    jobs = {int(j["id"]): j for j in store.jobs()}
    for jid in sorted(_applied_by_job(store, since)):
        job = jobs[jid]
        try:
            image, expert, reviewed, spacing = _job_case(store, job, outputs_dir / f"job-{jid}")
            lab = sparse_labels(expert, reviewed, ignore)
        except ExportError as exc:
            skipped.append(f"job {jid}: {exc}")
            log.warning("dataset export: job %d left out: %s", jid, exc)
            continue
        cid = case_id(str(job["series_uid"]))
        images.append(image)
        labels.append(lab)
        spacings.append(spacing)
        ids.append(cid)
        n_rev = int(reviewed.sum())
        annotated += n_rev
        total += reviewed.size
        info[cid] = {"annotated_voxels": n_rev, "voxels": int(reviewed.size),
                     "reviewed": json.loads(job["data"]).get("reviewed", {})}
        if progress is not None:
            progress(f"exported case {len(ids)} ({cid}, {100 * n_rev / reviewed.size:.1f} % annotated)")
    if not ids:
        raise ExportError("no corrected study to export" + (f" ({'; '.join(skipped)})" if skipped else ""))
    order = np.argsort(ids)
    write_raw_dataset(
        out.parent, 0, "i3nodeCorrections", [images[i] for i in order], [labels[i] for i in order],
        [spacings[i] for i in order], {0: modality}, {**{n: i for i, n in enumerate(names)}, "ignore": ignore},
        case_ids=[ids[i] for i in order], folder=out,
        extra={"i3node": {"kind": _DATASET_KIND, "cases": {k: info[k] for k in sorted(info)}}},
    )
    return ExportReport(out, len(ids), tuple(skipped), annotated / total)


def load_exports(folders: Sequence[Path]) -> tuple[list[Any], tuple[str, ...], dict[str, Any]]:
    """The cases of one or more exported (or fully labelled) nnU-Net raw datasets, merged.

    A case exported again in a later folder replaces the earlier copy (same case name).

    Returns
    -------
    cases, class_names, provenance
        :class:`node.evaluate.RawCase` objects, which train as they are (labels may hold
        the ignore value ``len(class_names)``), the class names (background first), and
        per-folder counts.

    Raises
    ------
    ExportError
        When a folder is not a dataset or the folders' classes differ.
    """
    from node.evaluate import folder_cases

    merged: dict[str, Any] = {}
    classes: tuple[str, ...] | None = None
    provenance: dict[str, Any] = {}
    for folder in folders:
        ds_json = Path(folder) / "dataset.json"
        if not ds_json.is_file():
            raise ExportError(f"{folder}: no dataset.json (not an nnU-Net raw dataset)")
        labels = {str(k): int(v) for k, v in json.loads(ds_json.read_text())["labels"].items()}
        names = tuple(k for k, _ in sorted(((k, v) for k, v in labels.items() if k != "ignore"), key=lambda kv: kv[1]))
        if "ignore" in labels and labels["ignore"] != len(names):
            raise ExportError(f"{folder}: the ignore label must be the highest value ({len(names)})")
        if classes is not None and names != classes:
            raise ExportError(f"{folder}: classes {names} differ from {classes} of the first folder")
        classes = names
        try:
            cases = list(folder_cases(Path(folder)))
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        merged.update((c.name, c) for c in cases)
        provenance[Path(folder).name] = {"cases": len(cases)}
    if classes is None:
        raise ExportError("no dataset folder given")
    return [merged[k] for k in sorted(merged)], classes, provenance


def train_from_exports(
    folders: Sequence[Path],
    out_root: Path,
    *,
    folds: int = 3,
    epochs: int = 50,
    iterations_per_epoch: int = 250,
    progress: Any = None,
    now: dt.datetime | None = None,
) -> Path:
    """Train a new presegmentation ensemble on exported corrections; returns its results folder.

    The model goes to a new folder ``out_root/preseg-<UTC time>`` (never over an existing
    one) and its results folder gets :data:`MODEL_INFO` with the version and the datasets it
    was trained on; SEGs made with it name that version.
    """
    from models.training import train_presegmentation

    cases, classes, provenance = load_exports(folders)
    ignore = any(bool((c.labels == len(classes)).any()) for c in cases)
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    version = f"preseg-{stamp}"
    work = Path(out_root) / version
    if work.exists():
        raise ExportError(f"{work} exists already: a model folder is never overwritten")
    model_dir = train_presegmentation(cases, work, folds=folds, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                                      class_names=classes, progress=progress, ignore_label=ignore)
    annotated = sum(int((c.labels != len(classes)).sum()) for c in cases)
    total = sum(int(c.labels.size) for c in cases)
    (model_dir / MODEL_INFO).write_text(json.dumps({
        "version": version,
        "trained_from": provenance,
        "cases": len(cases),
        "annotated_fraction": round(annotated / total, 4),
        "ignore_label": ignore,
        "folds": folds,
    }, indent=2))
    return model_dir
