"""Claims per second on PostgreSQL: the node's atomic claim against the racy read-then-update.

Starts a throwaway PostgreSQL cluster (as the tests do), queues ``--jobs`` jobs and lets
``--workers`` processes take them all, each claim followed by the transition a finished
step makes (owner-guarded, as the job runner does).  Side by side, the same number of
processes runs the claim i3node used before (``SELECT`` the oldest queued job, then
``UPDATE`` it by id without checking its state), which is not atomic: the report counts
the jobs it handed out twice.

Usage::

    python -m benchmarks.claims [--jobs 2000] [--workers 1,2,4]
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.store import JobState, Store, job_events, jobs  # noqa: E402
from tests.fixtures.postgres import start_cluster  # noqa: E402

LOGGER = logging.getLogger("benchmarks.claims")

_WORKER = """
import json, sys, time
import sqlalchemy as sa
from node.store import JobState, Store, jobs
url, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
store = Store(url, node_id=name)
got = []
t0 = time.monotonic()
while True:
    if mode == "claim":
        row = store.claim_job()
        if row is None:
            break
        store.set_job_state(int(row["id"]), JobState.AWAITING_CORRECTION, owned=True)
        got.append(int(row["id"]))
    else:  # the old way: read, then update by id
        with store.engine.connect() as c:
            r = c.execute(sa.select(jobs.c.id).where(jobs.c.state == "queued").order_by(jobs.c.id)).first()
        if r is None:
            break
        with store.engine.begin() as c:
            c.execute(jobs.update().where(jobs.c.id == r.id).values(state="segmenting", owner=name))
        with store.engine.begin() as c:
            c.execute(jobs.update().where(jobs.c.id == r.id).values(state="awaiting_correction", owner=None))
        got.append(int(r.id))
print(json.dumps({"ids": got, "seconds": time.monotonic() - t0}))
"""


def _queue(url: str, n: int) -> None:
    store = Store(url)
    now = time.time()
    rows = [dict(study_uid=f"1.2.{i}", series_uid=f"1.2.{i}.1", state=JobState.QUEUED.value, reason="",
                 attempts=0, version=1, data="{}", created_at=now, updated_at=now, not_before=0.0) for i in range(n)]
    with store.engine.begin() as c:
        c.execute(sa.delete(job_events))
        c.execute(sa.delete(jobs))
        c.execute(jobs.insert(), rows)
    store.close()


def run(url: str, n_jobs: int, workers: int, mode: str) -> tuple[float, int, int]:
    """Claims per second of ``workers`` processes over ``n_jobs`` jobs; (rate, jobs taken, taken twice)."""
    _queue(url, n_jobs)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, url, f"w{i}", mode], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(workers)]
    t0 = time.monotonic()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(err.decode()[-2000:])
        results.append(json.loads(out))
    wall = time.monotonic() - t0
    ids = [i for r in results for i in r["ids"]]
    busy = max(r["seconds"] for r in results)  # excludes the processes' start-up
    return len(ids) / busy, len(set(ids)), len(ids) - len(set(ids)) if wall else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cluster = start_cluster()
    try:
        url = cluster.create_database("claims")
        Store(url).close()
        sys.stdout.write(f"PostgreSQL claims, {args.jobs} jobs (fsync=off throwaway cluster)\n")
        sys.stdout.write("| workers | claim + finish /s (i3node) | read-then-update /s (before) | ratio | jobs taken twice before | twice now |\n")
        sys.stdout.write("|---|---|---|---|---|---|\n")
        for w in (int(x) for x in args.workers.split(",")):
            rate, unique, dup = run(url, args.jobs, w, "claim")
            old_rate, _old_unique, old_dup = run(url, args.jobs, w, "racy")
            if unique != args.jobs:
                raise RuntimeError(f"{unique} of {args.jobs} jobs claimed")
            sys.stdout.write(f"| {w} | {rate:.0f} | {old_rate:.0f} | {rate / old_rate:.2f}x | {old_dup} | {dup} |\n")
    finally:
        cluster.stop("immediate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
