"""Create the tidegate plugin's tables

Revision ID: 0d7c1a5e2b41
Revises:
Create Date: 2026-11-26

CTFd runs a plugin's migrations with `upgrade(plugin_name=...)` on MySQL and
PostgreSQL; on SQLite it calls `db.create_all()` instead.
"""

import sqlalchemy as sa

from CTFd.plugins.migrations import get_all_tables

revision = "0d7c1a5e2b41"
down_revision = None
branch_labels = None
depends_on = None


def upgrade(op=None):
    tables = get_all_tables(op)
    if "tidegate_challenge" not in tables:
        op.create_table(
            "tidegate_challenge",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("tidegate_challenge", sa.String(length=63), nullable=False),
            sa.ForeignKeyConstraint(["id"], ["challenges.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
        )
    if "tidegate_flag_sharing" not in tables:
        op.create_table(
            "tidegate_flag_sharing",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("date", sa.DateTime(), nullable=True),
            sa.Column("challenge_id", sa.Integer(), nullable=True),
            sa.Column("submitter_user_id", sa.Integer(), nullable=True),
            sa.Column("submitter_team_id", sa.Integer(), nullable=True),
            sa.Column("owner", sa.String(length=64), nullable=True),
            sa.Column("owner_team_id", sa.Integer(), nullable=True),
            sa.Column("owner_user_id", sa.Integer(), nullable=True),
            sa.Column("instance_id", sa.String(length=32), nullable=True),
            sa.Column("instance_created_at", sa.Integer(), nullable=True),
            sa.Column("flag", sa.Text(), nullable=True),
            sa.Column("ip", sa.String(length=46), nullable=True),
            sa.ForeignKeyConstraint(
                ["challenge_id"], ["challenges.id"], ondelete="CASCADE"
            ),
            sa.ForeignKeyConstraint(
                ["submitter_user_id"], ["users.id"], ondelete="SET NULL"
            ),
            sa.ForeignKeyConstraint(
                ["submitter_team_id"], ["teams.id"], ondelete="SET NULL"
            ),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index(
            "ix_tidegate_flag_sharing_date", "tidegate_flag_sharing", ["date"]
        )
        op.create_index(
            "ix_tidegate_flag_sharing_challenge_id",
            "tidegate_flag_sharing",
            ["challenge_id"],
        )


def downgrade(op=None):
    tables = get_all_tables(op)
    if "tidegate_flag_sharing" in tables:
        op.drop_table("tidegate_flag_sharing")
    if "tidegate_challenge" in tables:
        op.drop_table("tidegate_challenge")
