"""Several nodes on one state database: claims, leases, idempotent inserts, migrations.

Run against a real PostgreSQL server (a throwaway cluster, ``tests.fixtures.postgres``)
and against SQLite, whose single writer must give the same guarantees.  The races use
separate processes, each with its own connections, as separate nodes would.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from dicom.scp import StoredInstance
from node import migrations
from node.store import CorrectionState, JobState, LeaseLost, Store, StoreMissing, job_events, jobs, metadata

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


def _queue_jobs(store: Store, n: int, now: float = 1000.0) -> list[int]:
    rows = [dict(study_uid=f"1.2.{i}", series_uid=f"1.2.{i}.1", state=JobState.QUEUED.value, reason="",
                 attempts=0, version=1, data="{}", created_at=now, updated_at=now, not_before=0.0) for i in range(n)]
    with store.engine.begin() as c:
        c.execute(jobs.insert(), rows)
        return [int(r.id) for r in c.execute(sa.select(jobs.c.id).order_by(jobs.c.id))]


def test_migrations_build_exactly_the_declared_schema(db_url: str) -> None:
    store = Store(db_url)
    try:
        with store.engine.connect() as c:
            assert migrations.current_revision(c) == migrations.HEAD
            assert compare_metadata(MigrationContext.configure(c), metadata) == []
        Store(db_url).close()  # a second open finds the schema current
    finally:
        store.close()


def test_database_made_before_migrations_is_adopted(tmp_path: Path) -> None:
    """A state database of the first releases (create_all, no alembic_version) is upgraded, data kept."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as c:  # the first release's tables, before two columns were added
        command.upgrade(migrations.alembic_config(c), "0001")
        c.execute(sa.text("DROP TABLE alembic_version"))
        c.execute(sa.text("DROP INDEX ix_instances_audited"))
        c.execute(sa.text("ALTER TABLE instances DROP COLUMN audited"))
        c.execute(sa.text("ALTER TABLE instances DROP COLUMN peer_address"))
        c.execute(sa.text("INSERT INTO studies VALUES ('1.2.3', 'stable', 20, 1.0, 2.0, 3.0, 0)"))
    engine.dispose()
    store = Store(url)
    try:
        with store.engine.connect() as c:
            assert migrations.current_revision(c) == migrations.HEAD
            assert compare_metadata(MigrationContext.configure(c), metadata) == []
        assert [r["study_uid"] for r in store.studies()] == ["1.2.3"]  # data kept
    finally:
        store.close()


def test_status_does_not_create_a_database(tmp_path: Path) -> None:
    with pytest.raises(StoreMissing):
        Store(f"sqlite:///{tmp_path / 'typo' / 'i3node.db'}", create=False)
    assert not (tmp_path / "typo").exists()


_OPEN = """
import sys
from node.store import Store
Store(sys.argv[1], node_id=sys.argv[2]).close()
"""


def test_simultaneous_first_start(pg_url: str) -> None:
    """Five nodes start at once on an empty database: the schema is made once, nobody fails."""
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, pg_url, f"n{i}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(5)]
    results = [(p.wait(timeout=120), p.stderr.read().decode() if p.stderr else "") for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    engine = sa.create_engine(pg_url)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [migrations.HEAD]
    engine.dispose()


_CLAIMER = """
import json, sys, time
from node.store import Store
store = Store(sys.argv[1], node_id=sys.argv[2])
got = []
t0 = time.monotonic()
while (row := store.claim_job()) is not None:
    got.append(int(row["id"]))
print(json.dumps({"ids": got, "seconds": time.monotonic() - t0}))
"""


def test_claim_race_each_job_claimed_once(db_url: str) -> None:
    """Two processes claim from 300 queued jobs at once: every job is claimed by exactly one."""
    store = Store(db_url)
    ids = _queue_jobs(store, 300)
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, db_url, f"worker-{i}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        outs.append(json.loads(out))
    claimed = Counter(i for o in outs for i in o["ids"])
    assert sorted(claimed) == ids and set(claimed.values()) == {1}
    assert all(o["ids"] for o in outs), "both workers got work"
    rows = store.jobs()
    assert {r["state"] for r in rows} == {JobState.SEGMENTING.value}
    assert all(r["attempts"] == 1 for r in rows)
    assert {r["owner"] for r in rows} == {"worker-0", "worker-1"}
    store.close()


def test_lease_expiry_hands_a_dead_nodes_job_to_another(db_url: str) -> None:
    a = Store(db_url, node_id="a", lease_s=10)
    b = Store(db_url, node_id="b", lease_s=10)
    try:
        (job_id,) = _queue_jobs(a, 1)
        claimed = a.claim_job(now=100.0)
        assert claimed is not None and claimed["owner"] == "a"
        assert b.claim_job(now=101.0) is None  # held
        assert a.renew_leases(now=105.0) == 1  # a is alive: lease now until 115
        assert b.reap_expired(now=112.0) == []
        assert b.reap_expired(now=116.0) == [job_id]  # a stopped renewing: requeued
        again = b.claim_job(now=116.5)
        assert again is not None and again["owner"] == "b" and again["attempts"] == 2
        with pytest.raises(LeaseLost):  # a wakes up late: it must not touch b's job
            a.set_job_state(job_id, JobState.SELECTING, owned=True)
        with pytest.raises(KeyError):
            a.set_job_state(job_id, JobState.QUEUED)
        b.set_job_state(job_id, JobState.AWAITING_CORRECTION, owned=True)
        row = b.job(job_id)
        assert row is not None and row["owner"] is None and row["lease_until"] is None
        nodes = [(e["state"], e["node"]) for e in b.job_events(job_id)]
        assert ("segmenting", "a") in nodes and ("queued", "b") in nodes and ("awaiting_correction", "b") in nodes
    finally:
        a.close()
        b.close()


def test_restart_recovery_touches_only_the_nodes_own_work(db_url: str) -> None:
    a = Store(db_url, node_id="a")
    b = Store(db_url, node_id="b")
    try:
        first, second = _queue_jobs(a, 2)
        assert a.claim_job()["id"] == first  # type: ignore[index]
        assert b.claim_job()["id"] == second  # type: ignore[index]
        assert a.release_own("requeued: the node holding it restarted") == [first]
        assert a.job(first)["state"] == "queued"  # type: ignore[index]
        assert b.job(second)["state"] == "segmenting" and b.job(second)["owner"] == "b"  # type: ignore[index]
    finally:
        a.close()
        b.close()


def test_one_correction_at_a_time_per_job(db_url: str) -> None:
    a = Store(db_url, node_id="a")
    b = Store(db_url, node_id="b")
    try:
        (job_id,) = _queue_jobs(a, 1)
        a.claim_job()
        a.set_job_state(job_id, JobState.AWAITING_CORRECTION, owned=True)
        for sop in ("9.1", "9.2"):
            assert a.add_correction(sop, sop + ".1")
        assert not b.add_correction("9.1", "9.1.1")  # the same SEG received twice
        ca, cb = a.claim_correction(), b.claim_correction()
        assert ca is not None and cb is not None and ca["sop_uid"] != cb["sop_uid"]
        assert a.claim_for_refinement(job_id, "refining v2")
        assert not b.claim_for_refinement(job_id, "refining v2")  # b's SEG waits its turn
        b.set_correction(cb["sop_uid"], CorrectionState.PENDING, not_before=time.time() + 60)
        assert a.claim_correction() is None  # not due yet
    finally:
        a.close()
        b.close()


def _instance(i: int, study: str = "1.2.840.99.1", series: str = "1.2.840.99.1.1") -> StoredInstance:
    return StoredInstance(
        sop_uid=f"{series}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid=study, series_uid=series,
        modality="CT", instance_number=i, series_number=1, series_description="", path=Path(f"/x/{i}.dcm"),
        size=1, calling_ae="PACS", peer_address="127.0.0.1",
    )


def test_two_receivers_start_the_same_study_at_once(db_url: str) -> None:
    """Check-then-insert of study/series rows raced: both receivers must succeed."""
    stores = [Store(db_url, node_id=f"r{i}") for i in range(2)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def receive(k: int) -> None:
        try:
            barrier.wait()
            for i in range(k, 60, 2):
                stores[k].record_instance(_instance(i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        (study,) = stores[0].studies()
        (series,) = stores[0].series_rows()
        assert study["n_instances"] == 60 and series["n_instances"] == 60 and stores[0].count_instances() == 60
        assert not stores[1].record_instance(_instance(3)).new  # a duplicate stays a duplicate
    finally:
        for s in stores:
            s.close()


def test_job_events_name_the_node(db_url: str) -> None:
    store = Store(db_url, node_id="gpu-2")
    try:
        (job_id,) = _queue_jobs(store, 1)
        store.claim_job()
        (event,) = [e for e in store.job_events(job_id)]
        assert event["node"] == "gpu-2" and event["state"] == "segmenting"
        with store.engine.connect() as c:
            assert c.execute(sa.select(sa.func.count()).select_from(job_events)).scalar_one() == 1
    finally:
        store.close()
