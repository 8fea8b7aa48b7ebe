"""What ``i3node status`` shows: the state store as plain data, a table view and one JSON document.

Only UIDs, states, counts, AE titles, node names and times: no patient attributes, and
the database URL with its password hidden.  The snapshot is bounded (``limit`` rows of
each kind, newest first) so a node with months of history answers quickly.
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from node.settings import Settings, SettingsError, redacted_url, resolve_database_url
from node.store import Row, Store, StoreMissing, corrections, deliveries, jobs, outputs, series, studies

__all__ = ["existing_store", "status_snapshot", "snapshot_of", "render_status", "status_json"]

#: Columns holding POSIX times; shown as ISO 8601 (UTC), 0 and missing as null.
_TIME_COLUMNS = frozenset({
    "first_received_at", "last_received_at", "stable_at", "created_at", "updated_at", "not_before",
    "lease_until", "next_attempt_at", "received_at", "at",
})


def _iso(t: float | None) -> str | None:
    if not t:
        return None
    return dt.datetime.fromtimestamp(float(t), tz=dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _plain(row: Row) -> dict[str, Any]:
    """A row as JSON-ready data: ISO times, the job's data document as an object."""
    out: dict[str, Any] = {}
    for key, value in dict(row).items():
        name = str(key)
        if name in _TIME_COLUMNS:
            out[name] = _iso(value)
        elif name == "data" and isinstance(value, str):
            out[name] = json.loads(value or "{}")
        else:
            out[name] = value
    return out


def _counts(store: Store, table: sa.Table) -> dict[str, int]:
    with store.engine.connect() as c:
        rows = c.execute(sa.select(table.c.state, sa.func.count()).group_by(table.c.state)).all()
    return {str(r[0]): int(r[1]) for r in rows}


def _rows(store: Store, query: sa.Select[Any]) -> list[dict[str, Any]]:
    with store.engine.connect() as c:
        return [_plain(r._mapping) for r in c.execute(query)]


def status_snapshot(
    store: Store,
    *,
    node: str,
    database: str,
    limit: int = 50,
    job_states: Sequence[str] = (),
    study_uid: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The state of the node's database, bounded and filtered.

    Parameters
    ----------
    store
        The state store (opened without creating it).
    node, database
        This node's name and the database URL as it may be shown (password hidden).
    limit
        At most this many studies, jobs, deliveries and corrected SEGs (newest first).
    job_states
        Only jobs in these states (and their studies), when given.
    study_uid
        Only this study, when given.
    """
    job_q = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
    study_q = sa.select(studies).order_by(studies.c.last_received_at.desc()).limit(limit)
    if job_states:
        job_q = job_q.where(jobs.c.state.in_(list(job_states)))
        study_q = study_q.where(studies.c.study_uid.in_(sa.select(jobs.c.study_uid).where(jobs.c.state.in_(list(job_states)))))
    if study_uid:
        job_q = job_q.where(jobs.c.study_uid == study_uid)
        study_q = study_q.where(studies.c.study_uid == study_uid)
    study_rows = _rows(store, study_q)
    uids = [s["study_uid"] for s in study_rows]
    job_rows = _rows(store, job_q)
    ids = [j["id"] for j in job_rows]
    corr_q = sa.select(corrections).order_by(corrections.c.received_at.desc()).limit(limit)
    if job_states or study_uid:
        corr_q = corr_q.where(corrections.c.job_id.in_(ids))
    return {
        "node": node,
        "database": database,
        "generated_at": _iso(now if now is not None else dt.datetime.now(dt.UTC).timestamp()),
        "limit": limit,
        "counts": {
            "studies": _counts(store, studies),
            "jobs": _counts(store, jobs),
            "corrections": _counts(store, corrections),
            "deliveries": _counts(store, deliveries),
        },
        "studies": study_rows,
        "series": _rows(store, sa.select(series).where(series.c.study_uid.in_(uids))
                        .order_by(series.c.study_uid, series.c.series_number)),
        "jobs": job_rows,
        "corrections": _rows(store, corr_q),
        "deliveries": _rows(store, sa.select(deliveries).join(outputs, outputs.c.sop_uid == deliveries.c.output_uid)
                            .where(outputs.c.job_id.in_(ids), deliveries.c.state != "delivered")
                            .order_by(deliveries.c.id.desc()).limit(limit)),
    }


def existing_store(settings: Settings) -> Store:
    """The node's state store as configured; nothing is created where there is none.

    Raises
    ------
    node.settings.SettingsError
        When there is no i3node database there (a mistyped ``node.state_dir`` or
        ``storage.database_url``), naming that key.
    """
    try:
        return Store(resolve_database_url(settings), node_id=settings.node_id, create=False)
    except StoreMissing as exc:
        key = "storage.database_url" if settings.storage.database_url else "node.state_dir"
        raise SettingsError(f"{key}: {exc} (is this the node's configuration?)") from None


def snapshot_of(settings: Settings, **filters: Any) -> dict[str, Any]:
    """:func:`status_snapshot` of the database ``settings`` name, which must exist (see :func:`existing_store`)."""
    store = existing_store(settings)
    try:
        return status_snapshot(store, node=settings.node_id, database=redacted_url(settings.database_url), **filters)
    finally:
        store.close()


def status_json(snapshot: Mapping[str, Any]) -> str:
    """One JSON document (no nested JSON strings, ISO times)."""
    return json.dumps(snapshot, indent=2, sort_keys=False)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(t: str | None) -> str:
    return "" if not t else t.replace("T", " ").rstrip("Z")


def _counts_line(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def render_status(snap: Mapping[str, Any]) -> str:
    """The ``i3node status`` tables for a :func:`status_snapshot` (times in UTC)."""
    c = snap["counts"]
    out = [
        f"node {snap['node']}  database {snap['database']}  (times UTC, newest {snap['limit']} of each)",
        f"jobs: {_counts_line(c['jobs'])}",
        f"deliveries: {_counts_line(c['deliveries'])}",
        "",
        f"Studies ({len(snap['studies'])} of {sum(c['studies'].values())})",
        _table([(s["study_uid"], s["state"], s["n_instances"], _short(s["last_received_at"])) for s in snap["studies"]],
               ("study", "state", "instances", "last received")),
        "",
        f"Series ({len(snap['series'])})",
        _table([(s["series_uid"], s["modality"], s["series_number"], s["n_instances"], s["description"])
                for s in snap["series"]], ("series", "modality", "number", "instances", "description")),
        "",
        f"Jobs ({len(snap['jobs'])} of {sum(c['jobs'].values())})",
        _table([(j["id"], j["series_uid"], j["state"], j["owner"] or "", j["version"], j["attempts"],
                 _short(j["updated_at"]), j["reason"]) for j in snap["jobs"]],
               ("job", "series", "state", "node", "version", "attempts", "updated", "reason")),
    ]
    if snap["corrections"]:
        out += ["", f"Corrected SEGs ({len(snap['corrections'])})",
                _table([(r["sop_uid"], r["job_id"], r["state"], r["owner"] or "", r["reason"]) for r in snap["corrections"]],
                       ("SEG", "job", "state", "node", "reason"))]
    if snap["deliveries"]:
        out += ["", f"Deliveries not delivered ({len(snap['deliveries'])})",
                _table([(d["output_uid"], d["destination"], d["state"], d["attempts"], d["last_error"])
                        for d in snap["deliveries"]], ("output", "destination", "state", "attempts", "last error"))]
    return "\n".join(out)
