"""Study completion and series selection: which stable series get a job.

Pure functions over plain values; :func:`sweep_stable_studies` is the one that touches
the store.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from node.settings import SelectionRule
from node.store import Store

__all__ = ["series_matches", "select_series", "sweep_stable_studies"]

log = logging.getLogger(__name__)

# Only image storage SOP classes can be segmented (never SEG, KOS, SR, ...).
IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    }
)


def series_matches(rule: SelectionRule, *, modality: str, n_instances: int, description: str) -> bool:
    """Whether one series satisfies one selection rule."""
    if modality not in rule.modalities:
        return False
    if n_instances < rule.min_slices:
        return False
    if rule.description_pattern and not re.search(rule.description_pattern, description or "", re.IGNORECASE):
        return False
    return True


def select_series(rules: Sequence[SelectionRule], series_rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """Series of a stable study that need a job: ``(series_uid, n_instances)``.

    A series needs a job when it holds single-frame CT/MR images, matches any rule,
    and has not had a job for its current number of instances (a series completed
    by late instances gets a new job).
    """
    chosen: list[tuple[str, int]] = []
    for row in series_rows:
        if row["sop_class_uid"] not in IMAGE_SOP_CLASSES:
            continue
        if row["jobbed_instances"] == row["n_instances"]:
            continue
        if any(
            series_matches(r, modality=row["modality"], n_instances=row["n_instances"], description=row["description"])
            for r in rules
        ):
            chosen.append((row["series_uid"], int(row["n_instances"])))
    return chosen


def sweep_stable_studies(
    store: Store, rules: Sequence[SelectionRule], stable_after_s: float, now: float
) -> list[int]:
    """Mark every due study stable and create one job per matching series.

    Returns
    -------
    list of int
        Ids of the jobs created.
    """
    created: list[int] = []
    for study_uid in store.due_studies(now, stable_after_s):
        wanted = select_series(rules, store.series_rows(study_uid))
        ids = store.mark_stable(study_uid, now, stable_after_s, wanted)
        if ids:
            log.info("study %s stable: %d job(s) created (%s)", study_uid, len(ids), ", ".join(map(str, ids)))
        else:
            log.info("study %s stable: no series matched the selection rules", study_uid)
        created.extend(ids)
    return created
