"""Jobs that meet bad patient values or failing refinements: no stop, no leak, fair retries (issue 12).

A study whose patient module carries an invalid birth date (``1923-08-17``) is segmented
anyway, and the value reaches neither the logs, the state database nor ``i3node status``;
refinement failures are counted per corrected SEG, and a failure's reason never quotes
the exception text of third-party code.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom.codes import default_segment_specs
from dicom.provenance import UidFactory
from dicom.scu import send_datasets, send_paths
from dicom.synthetic import build_ct_series, write_datasets
from models.phantoms import make_phantom
from node.demo import viewer_style_seg
from node.store import JobState, instances
from tests.fixtures.node_fixtures import wait_until

pytestmark = pytest.mark.slow

BAD_BIRTH_DATE = "1923-08-17"


def _study(tmp_path: Path) -> tuple[list[Path], list[pydicom.Dataset], np.ndarray]:
    ph = make_phantom(4242, shape=(16, 32, 32))
    datasets = build_ct_series(ph.image, ph.spacing)
    for ds in datasets:
        ds.PatientBirthDate = BAD_BIRTH_DATE  # invalid DA, as some archives hold
        ds.PatientSex = "male"  # invalid CS
    return write_datasets(datasets, tmp_path / "study"), datasets, ph.labels




def test_invalid_patient_values_neither_stop_the_job_nor_leak(
    node_factory: Any, demo_models: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    from node.status import render_status, snapshot_of

    caplog.set_level(logging.DEBUG)
    app = node_factory(
        models={"preseg_dir": str(demo_models.preseg_dir), "refine_dir": str(demo_models.refine_dir),
                "device": "cpu"},
        acquisition={"max_slices": 2, "min_dist": 0.1},
        selection=[{"min_slices": 8}],
        node={"job_workers": 0},
    )
    paths, datasets, _ = _study(tmp_path)
    assert send_paths(paths, ae_title="I3NODE", host="127.0.0.1", port=app.port, calling_ae="PACS").ok
    assert wait_until(lambda: bool(app.sweep()) or bool(app.store.jobs()), 20)
    app.runner.run_once()
    (job,) = app.store.jobs()
    assert job["state"] == JobState.AWAITING_CORRECTION.value, job["reason"]
    seg_path = next(p for p in (app.settings.outputs_dir / f"job-{job['id']}" / "v1").glob("*.dcm")
                    if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert seg.PatientBirthDate == "19230817" and seg.PatientSex == ""  # normalised / left out
    assert "PatientBirthDate" in caplog.text  # the keyword is logged ...

    # A refinement that keeps failing, with a third-party message quoting a patient value.
    def broken(ctx: Any, job_id: int, sop_uid: str) -> int:
        raise RuntimeError(f"cannot convert {BAD_BIRTH_DATE!r} to DA")

    monkeypatch.setattr("node.runner.run_refinement", broken)
    app.runner.retry_delay_s = 0.01
    uids = UidFactory("2.25")
    labels = np.zeros((16, 32, 32), np.uint8)
    labels[8, 10:20, 10:20] = 1
    viewer_copy = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    for ds in viewer_copy:  # the viewer stand-in builds with highdicom, which refuses the bad values
        ds.PatientBirthDate, ds.PatientSex = "", ""
    edits = [viewer_style_seg(viewer_copy, labels, default_segment_specs(), series_uid=uids.new(),
                              sop_uid=uids.new()) for _ in range(2)]
    for edit in edits:
        assert send_datasets([edit], ae_title="I3NODE", host="127.0.0.1", port=app.port, calling_ae="VIEWER").ok

        def settled(sop: str = str(edit.SOPInstanceUID)) -> bool:
            app.runner.run_once()  # a failed attempt is retried after the retry delay, in a later run
            return any(r["sop_uid"] == sop and r["state"] == "failed" for r in app.store.corrections())

        assert wait_until(settled, 20, interval=0.02)
    rows = {r["sop_uid"]: r for r in app.store.corrections()}
    for edit in edits:
        row = rows[str(edit.SOPInstanceUID)]
        # each corrected SEG gets its own 3 attempts (the counter is not carried over)
        assert row["state"] == "failed" and "gave up after 3 attempts" in row["reason"], row["reason"]
        assert "RuntimeError at" in row["reason"] and "message withheld" in row["reason"]

    # ... the value never: not in logs, job reasons, corrections, events or status
    snapshot = snapshot_of(app.settings)
    texts = [caplog.text, render_status(snapshot), str(snapshot)]
    texts += [str(dict(r)) for r in app.store.jobs()] + [str(dict(r)) for r in app.store.corrections()]
    texts += [str(dict(r)) for r in app.store.job_events(int(job["id"]))]
    texts += [str(dict(r)) for r in app.store.iter_rows(instances)]
    for text in texts:
        assert BAD_BIRTH_DATE not in text and "19230817" not in text
