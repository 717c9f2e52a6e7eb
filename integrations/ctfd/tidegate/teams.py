"""CTFd accounts as tidegate teams.

Team mode: the CTFd team 3 is tidegate's `ctfd-team-3`. User mode: the user
7 is `ctfd-user-7`. (tidegate team ids are 1-64 of [A-Za-z0-9_.-].)
"""

import re
from typing import Optional, Tuple

from CTFd.models import Teams, Users
from CTFd.utils.config import is_teams_mode

_MAPPED = re.compile(r"^ctfd-(team|user)-([0-9]{1,18})$")


def team_id_for_team(team_id: int) -> str:
    return "ctfd-team-%d" % int(team_id)


def team_id_for_user(user_id: int) -> str:
    return "ctfd-user-%d" % int(user_id)


def tidegate_team(user, team) -> Optional[str]:
    """The tidegate team a CTFd session acts for (None: in team mode, no team)."""
    if is_teams_mode():
        return team_id_for_team(team.id) if team is not None else None
    return team_id_for_user(user.id) if user is not None else None


def parse(tidegate_team_id: str) -> Tuple[Optional[str], Optional[int]]:
    """("team", 3) for `ctfd-team-3`, ("user", 7) for `ctfd-user-7`,
    (None, None) for a team this plugin did not name."""
    m = _MAPPED.match(tidegate_team_id or "")
    if not m:
        return None, None
    return m.group(1), int(m.group(2))


def describe(tidegate_team_id: str) -> dict:
    """How the admin pages show a tidegate team: the CTFd account's name and
    admin link when it maps to one that exists."""
    kind, num = parse(tidegate_team_id)
    out = {
        "tidegate": tidegate_team_id,
        "kind": kind,
        "id": num,
        "name": None,
        "url": None,
        "banned": None,
        "hidden": None,
    }
    if kind == "team":
        t = Teams.query.filter_by(id=num).first()
        if t is not None:
            out.update(
                name=t.name,
                url="/admin/teams/%d" % t.id,
                banned=bool(t.banned),
                hidden=bool(t.hidden),
            )
    elif kind == "user":
        u = Users.query.filter_by(id=num).first()
        if u is not None:
            out.update(
                name=u.name,
                url="/admin/users/%d" % u.id,
                banned=bool(u.banned),
                hidden=bool(u.hidden),
            )
    return out
