"""The schema of the first releases: studies, series, instances, jobs, outputs, deliveries, corrections.

Revision ID: 0001
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables."""
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("n_instances", sa.Integer, nullable=False),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("stable_at", sa.Float),
        sa.Column("reopened", sa.Integer, nullable=False),
    )
    op.create_table(
        "series",
        sa.Column("series_uid", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(64), sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("description", sa.String(64), nullable=False),
        sa.Column("series_number", sa.Integer),
        sa.Column("n_instances", sa.Integer, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("jobbed_instances", sa.Integer, nullable=False),
    )
    op.create_index("ix_series_study_uid", "series", ["study_uid"])
    op.create_table(
        "instances",
        sa.Column("sop_uid", sa.String(64), primary_key=True),
        sa.Column("series_uid", sa.String(64), sa.ForeignKey("series.series_uid"), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("instance_number", sa.Integer),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("peer_address", sa.String(64), nullable=False, server_default=""),
        sa.Column("audited", sa.Boolean, nullable=False, server_default=sa.true()),
    )
    op.create_index("ix_instances_series_uid", "instances", ["series_uid"])
    op.create_index("ix_instances_audited", "instances", ["audited"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("not_before", sa.Float, nullable=False),
    )
    for col in ("study_uid", "series_uid", "state"):
        op.create_index(f"ix_jobs_{col}", "jobs", [col])
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    op.create_table(
        "outputs",
        sa.Column("sop_uid", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_outputs_job_id", "outputs", ["job_id"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("output_uid", sa.String(64), sa.ForeignKey("outputs.sop_uid"), nullable=False),
        sa.Column("destination", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("output_uid", "destination"),
    )
    op.create_index("ix_deliveries_output_uid", "deliveries", ["output_uid"])
    op.create_index("ix_deliveries_state", "deliveries", ["state"])
    op.create_table(
        "corrections",
        sa.Column("sop_uid", sa.String(64), primary_key=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    """Drop the tables."""
    for table in ("corrections", "deliveries", "outputs", "job_events", "jobs", "instances", "series", "studies"):
        op.drop_table(table)
