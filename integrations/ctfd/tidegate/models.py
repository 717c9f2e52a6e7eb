"""The plugin's two tables. Instances are tidegate's: nothing about them is
stored here but the flag-sharing evidence."""

import datetime
import re

from CTFd.models import Challenges, db

# tidegate's challenge names: 1-63 of [a-z0-9-] (a DNS label).
CHALLENGE_NAME = re.compile(r"^[a-z0-9-]{1,63}$")


class TidegateChallenge(Challenges):
    """A challenge whose instances and flags tidegate keeps. Scoring uses
    CTFd's own columns (`function` static/linear/logarithmic, `initial`,
    `minimum`, `decay`), as every challenge type does since CTFd 3.8."""

    __tablename__ = "tidegate_challenge"
    __mapper_args__ = {"polymorphic_identity": "tidegate"}
    id = db.Column(
        db.Integer, db.ForeignKey("challenges.id", ondelete="CASCADE"), primary_key=True
    )
    tidegate_challenge = db.Column(db.String(63), nullable=False, default="")

    def __init__(self, *args, **kwargs):
        super().__init__(**kwargs)


class TidegateFlagSharing(db.Model):
    """A flag of one team's instance submitted by another team."""

    __tablename__ = "tidegate_flag_sharing"
    id = db.Column(db.Integer, primary_key=True)
    date = db.Column(db.DateTime, default=datetime.datetime.utcnow, index=True)
    challenge_id = db.Column(
        db.Integer, db.ForeignKey("challenges.id", ondelete="CASCADE"), index=True
    )
    # Who submitted it.
    submitter_user_id = db.Column(
        db.Integer, db.ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    submitter_team_id = db.Column(
        db.Integer, db.ForeignKey("teams.id", ondelete="SET NULL"), nullable=True
    )
    # Whose instance the flag is: tidegate's team id, and the CTFd account
    # it maps to (None when it maps to none, e.g. a team made by hand).
    owner = db.Column(db.String(64))
    owner_team_id = db.Column(db.Integer, nullable=True)
    owner_user_id = db.Column(db.Integer, nullable=True)
    instance_id = db.Column(db.String(32))
    instance_created_at = db.Column(db.Integer, nullable=True)
    # The submitted flag, as submitted: the evidence admins act on.
    flag = db.Column(db.Text)
    ip = db.Column(db.String(46))

    challenge = db.relationship("Challenges", foreign_keys=[challenge_id], lazy="select")
    submitter_user = db.relationship(
        "Users", foreign_keys=[submitter_user_id], lazy="select"
    )
    submitter_team = db.relationship(
        "Teams", foreign_keys=[submitter_team_id], lazy="select"
    )
