"""Schema migrations of the state database (Alembic).

:func:`upgrade` brings a database to the newest schema when a node starts.  Several
nodes may start at once on one PostgreSQL database: the upgrade runs under a
PostgreSQL advisory lock (on SQLite, under an exclusive lock on a file beside the
database), and a node that finds the schema current does not take the lock at all.

A database created before migrations existed (tables but no ``alembic_version``) is
brought to the first revision by adding the columns it may lack, stamped, and then
upgraded like any other.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

__all__ = ["HEAD", "upgrade", "current_revision", "alembic_config"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
#: Key of the PostgreSQL advisory lock held while the schema is upgraded.
_ADVISORY_LOCK_KEY = 0x69336E6F6465  # "i3node"
#: Columns the first releases added after creating their tables (pre-migration databases).
_LEGACY_COLUMNS = (
    ("instances", "peer_address", "VARCHAR(64) NOT NULL DEFAULT ''"),
    ("instances", "audited", "BOOLEAN NOT NULL DEFAULT TRUE"),
)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the migrations in this package (no ini file)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise RuntimeError("no schema revisions found in node/migrations/versions")
    return head


HEAD = _head()


def current_revision(connection: Connection) -> str | None:
    """The schema revision recorded in the database (None: not under migrations yet)."""
    return MigrationContext.configure(connection).get_current_revision()


@contextlib.contextmanager
def _upgrade_lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding the cluster-wide upgrade lock of this database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as c:
            c.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
            c.commit()
            try:
                yield c
            finally:
                c.rollback()
                c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _ADVISORY_LOCK_KEY})
                c.commit()
        return
    db = engine.url.database
    if engine.dialect.name == "sqlite" and db and db != ":memory:":
        with open(f"{db}.migrate-lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                with engine.connect() as c:
                    yield c
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    with engine.connect() as c:
        yield c


def _adopt_legacy(c: Connection) -> None:
    """Bring a database made before migrations to revision 0001 and stamp it."""
    inspector = sa.inspect(c)
    for table, column, ddl in _LEGACY_COLUMNS:
        if column not in {col["name"] for col in inspector.get_columns(table)}:
            c.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
            log.info("state database: added column %s.%s", table, column)
    if "ix_instances_audited" not in {ix["name"] for ix in inspector.get_indexes("instances")}:
        c.execute(sa.text("CREATE INDEX ix_instances_audited ON instances (audited)"))
    c.commit()
    command.stamp(alembic_config(c), "0001")
    c.commit()
    log.info("state database: existing schema adopted as revision 0001")


def upgrade(engine: Engine) -> str:
    """Upgrade the database behind ``engine`` to the newest schema; returns the revision.

    Idempotent and safe to call from several processes at once.
    """
    with engine.connect() as c:
        if current_revision(c) == HEAD:
            return HEAD
    # Alembic reports every step at INFO; this module logs the one line that matters.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with _upgrade_lock(engine) as c:
        before = current_revision(c)
        if before == HEAD:  # another node upgraded while this one waited for the lock
            return HEAD
        if before is None and sa.inspect(c).has_table("studies"):
            _adopt_legacy(c)
            before = "0001"
        command.upgrade(alembic_config(c), "head")
        c.commit()
        log.info("state database: schema upgraded from %s to %s", before or "empty", HEAD)
    return HEAD
