"""The composed node receives studies over real DICOM and never loses what it acknowledged."""
from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest

from dicom.series import load_series
from node.store import JobState
from tests.fixtures.node_fixtures import dcmtk_env, storescu, wait_until

pytestmark = pytest.mark.dcmtk




def test_storescu_100_slices_durable_rows_and_identical_volume(node_factory, ct_series_dir) -> None:
    app = node_factory(study={"stable_after_s": 3600.0})
    paths, image = ct_series_dir(n_slices=100, rows=48, cols=40, descending=True)
    res = storescu(paths, app.port)
    assert res.returncode == 0, res.stderr
    assert app.store.count_instances() == 100
    stored = app.store.instance_paths(app.store.series_rows()[0]["series_uid"])
    assert len(stored) == 100 and all(p.is_file() for p in stored)
    spool = app.settings.spool_dir
    assert all(p.is_relative_to(spool) for p in stored)
    assert not list(spool.rglob("*.tmp"))
    vol = load_series(stored)
    np.testing.assert_array_equal(vol.array, image)
    study = app.store.studies()[0]
    assert study["state"] == "receiving" and study["n_instances"] == 100


def test_echoscu_and_unknown_caller_rejected(node_factory, ct_series_dir) -> None:
    app = node_factory(dicom={"allowed_callers": ["PACS", "ECHOSCU@127.0.0.1"]})
    echo = subprocess.run(
        [shutil.which("echoscu") or "echoscu", "-aet", "ECHOSCU", "-aec", "I3NODE", "127.0.0.1", str(app.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )
    assert echo.returncode == 0, echo.stderr
    paths, _ = ct_series_dir(n_slices=3)
    res = storescu(paths, app.port, calling_ae="INTRUDER")
    assert res.returncode != 0
    assert "Rejected" in res.stderr or "rejected" in res.stderr.lower()
    assert app.store.count_instances() == 0
    assert not list(app.settings.spool_dir.rglob("*.dcm"))
    ok = storescu(paths, app.port, calling_ae="PACS")
    assert ok.returncode == 0, ok.stderr
    assert app.store.count_instances() == 3


def test_default_allow_list_accepts_any_ae_from_loopback(node_factory, ct_series_dir) -> None:
    app = node_factory()
    paths, _ = ct_series_dir(n_slices=2)
    assert storescu(paths, app.port, calling_ae="ANY_AE").returncode == 0
    assert app.store.count_instances() == 2


def test_stable_sweep_creates_one_job_per_matching_series_and_late_instance_reopens(node_factory, ct_series_dir) -> None:
    # A receive-only node (job_workers = 0): jobs are created and stay queued.
    app = node_factory(node={"job_workers": 0}, selection=[{"modalities": ["CT"], "min_slices": 10}])
    big, _ = ct_series_dir(n_slices=12, name="a", study_uid="1.2.3.4", series_uid="1.2.3.4.1")
    small, _ = ct_series_dir(n_slices=4, name="b", study_uid="1.2.3.4", series_uid="1.2.3.4.2")
    assert storescu(big + small, app.port).returncode == 0
    assert wait_until(lambda: len(app.store.jobs()) == 1), app.store.jobs()
    job = app.store.jobs()[0]
    assert job["series_uid"] == "1.2.3.4.1" and job["state"] == JobState.QUEUED.value
    assert app.store.studies()[0]["state"] == "stable"
    time.sleep(1.0)
    assert len(app.store.jobs()) == 1, "a stable study must not get a second job for the same series"
    # A late instance for the stable study is recorded and re-opens it.
    late, _ = ct_series_dir(n_slices=1, name="c", study_uid="1.2.3.4", series_uid="1.2.3.4.3")
    assert storescu(late, app.port).returncode == 0
    assert app.store.has_instance(late and __import__("pydicom").dcmread(late[0]).SOPInstanceUID)
    study = app.store.studies()[0]
    assert study["reopened"] == 1
    assert wait_until(lambda: app.store.studies()[0]["state"] == "stable")
    assert len(app.store.jobs()) == 1, "the late single-slice series does not match the rules"


def test_rows_lost_to_a_power_cut_are_rebuilt_from_the_spool(node_factory, ct_series_dir, tmp_path) -> None:
    import sqlalchemy as sa

    from node.app import build_app
    from node.ingest import recover_spool
    from node.store import instances, series, studies
    from tests.fixtures.node_fixtures import make_settings

    app = node_factory(node={"job_workers": 0}, study={"stable_after_s": 3600.0})
    paths, _ = ct_series_dir(n_slices=5)
    assert storescu(paths, app.port).returncode == 0
    app.stop()
    # Simulate a power cut after the files were fsynced but before the rows reached disk.
    with app.store.engine.begin() as c:
        c.execute(sa.delete(instances).where(instances.c.instance_number > 2))
        c.execute(sa.update(series).values(n_instances=2))
        c.execute(sa.update(studies).values(n_instances=2))
    app2 = build_app(make_settings(tmp_path, node={"job_workers": 0}))
    assert app2.store.count_instances() == 2
    assert recover_spool(app2.store, app2.settings.spool_dir) == 3
    assert app2.store.count_instances() == 5
    assert recover_spool(app2.store, app2.settings.spool_dir) == 0
    app2.store.close()


def test_restart_and_resend_do_not_complete_a_half_received_study(node_factory, ct_series_dir, tmp_path) -> None:
    """Found by the kill -9 test: a study interrupted mid-transfer must not be swept as
    complete the moment the node restarts, nor while the PACS re-sends what it already sent."""
    import time as _time

    from node.app import build_app
    from tests.fixtures.node_fixtures import make_settings

    app = node_factory(node={"job_workers": 0}, study={"stable_after_s": 1.5})
    paths, _ = ct_series_dir(n_slices=20)
    assert storescu(paths[:17], app.port).returncode == 0
    app.stop()
    _time.sleep(2.0)  # longer than stable_after_s while the node is down
    app2 = build_app(make_settings(tmp_path, node={"job_workers": 0}, study={"stable_after_s": 1.5}))
    app2.start()
    try:
        assert app2.sweep() == [], "the stability clock restarts with the node"
        # The PACS re-sends everything slowly: duplicates keep the study open.
        for p in paths[:17]:
            assert storescu([p], app2.port).returncode == 0
            assert app2.store.studies()[0]["state"] == "receiving"
        assert storescu(paths[17:], app2.port).returncode == 0
        deadline = _time.monotonic() + 20
        while _time.monotonic() < deadline and not app2.store.jobs():
            _time.sleep(0.1)
        (job,) = app2.store.jobs()
        assert app2.store.series_row(job["series_uid"])["jobbed_instances"] == 20
    finally:
        app2.stop()
