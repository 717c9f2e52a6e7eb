"""CTFd accounts as tidegate teams.

Team mode: the CTFd team 3, created at unix time 0x6790a1b2, is tidegate's
`ctfd-team-3-6790a1b2`. User mode: the user 7 is `ctfd-user-7-<created>`.
The creation time is part of the name because CTFd may give a deleted
account's id to a new one (SQLite reuses the highest id): the new account
must not inherit the old one's instances and flags. An account without a
`created` time is `ctfd-team-3` / `ctfd-user-7`. (tidegate team ids are 1-64
of [A-Za-z0-9_.-].)
"""

import datetime
import re
from typing import Optional, Tuple

from CTFd.models import Teams, Users
from CTFd.utils.config import is_teams_mode

_MAPPED = re.compile(r"^ctfd-(team|user)-([0-9]{1,18})(?:-[0-9a-f]{1,16})?$")


def _created_hex(account) -> Optional[str]:
    """The account's `created` time as unix seconds in lowercase hex, or
    None when it has none."""
    created = getattr(account, "created", None)
    if not isinstance(created, datetime.datetime):
        return None
    if created.tzinfo is None:
        # CTFd stores naive UTC (datetime.utcnow).
        created = created.replace(tzinfo=datetime.timezone.utc)
    seconds = int(created.timestamp())
    if seconds < 0:
        return None
    return "%x" % seconds


def _name(kind: str, account) -> str:
    created = _created_hex(account)
    if created is None:
        return "ctfd-%s-%d" % (kind, int(account.id))
    return "ctfd-%s-%d-%s" % (kind, int(account.id), created)


def team_id_for_team(team) -> str:
    """The tidegate team of a CTFd team (a Teams row)."""
    return _name("team", team)


def team_id_for_user(user) -> str:
    """The tidegate team of a CTFd user (a Users row), in user mode."""
    return _name("user", user)


def tidegate_team(user, team) -> Optional[str]:
    """The tidegate team a CTFd session acts for (None: in team mode, no team)."""
    if is_teams_mode():
        return team_id_for_team(team) if team is not None else None
    return team_id_for_user(user) if user is not None else None


def account(tidegate_team_id: str):
    """("team", Teams row) or ("user", Users row) for a tidegate team this
    plugin named after an account that still exists with that creation
    time; (None, None) otherwise (a team made by hand, a deleted account, or
    the earlier holder of a reused id)."""
    m = _MAPPED.match(tidegate_team_id or "")
    if not m:
        return None, None
    kind, num = m.group(1), int(m.group(2))
    model = Teams if kind == "team" else Users
    row = model.query.filter_by(id=num).first()
    if row is None or _name(kind, row) != tidegate_team_id:
        return None, None
    return kind, row


def parse(tidegate_team_id: str) -> Tuple[Optional[str], Optional[int]]:
    """("team", 3) for the tidegate team of the CTFd team 3, ("user", 7) for
    the user 7, (None, None) for a team that maps to no existing account."""
    kind, row = account(tidegate_team_id)
    if row is None:
        return None, None
    return kind, row.id


def describe(tidegate_team_id: str) -> dict:
    """How the admin pages show a tidegate team: the CTFd account's name and
    admin link when it maps to one that exists."""
    kind, row = account(tidegate_team_id)
    out = {
        "tidegate": tidegate_team_id,
        "kind": kind,
        "id": row.id if row is not None else None,
        "name": None,
        "url": None,
        "banned": None,
        "hidden": None,
    }
    if row is not None:
        out.update(
            name=row.name,
            url="/admin/%ss/%d" % (kind, row.id),
            banned=bool(row.banned),
            hidden=bool(row.hidden),
        )
    return out
