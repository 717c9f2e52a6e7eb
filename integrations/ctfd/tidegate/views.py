"""The plugin's HTTP endpoints.

Players (`/plugins/tidegate/api/...`, logged in): their team's instance of a
challenge, spawn, renew, stop. Every tidegate call names the session's team
(`?team=`), so an instance id of another team is answered 404 by tidegate.
A spawn that finds no room may get a place in tidegate's waiting queue (202,
`status` queued) instead of an instance; the modal then asks about that id
(`GET .../instances/<id>`), which is what holds the place, until it is
admitted under the same id.

Admins (`/plugins/tidegate/admin/api/...` and the pages under
`/admin/tidegate/`): every live instance, the workers' capacity, stop and
renew of any instance, the flag-sharing evidence, the config page.

CSRF: CTFd checks every non-GET request itself (a `CSRF-Token` header equal
to the session's nonce for JSON, a `nonce` form field otherwise), before
these views run. The player endpoints have CTFd's own rate limit (per IP and
endpoint; over it CTFd answers 429 `{"code": 429, "message": ...}`).
"""

import math
import re
import time

from flask import Blueprint, render_template, request

from CTFd.models import Challenges, Solves, Users
from CTFd.utils import get_config
from CTFd.utils.config import is_teams_mode
from CTFd.utils.dates import ctf_paused, ctftime
from CTFd.utils.decorators import admins_only, ratelimit
from CTFd.utils.user import authed, get_current_team, get_current_user, is_admin

from . import client, settings, teams
from .models import TidegateChallenge, TidegateFlagSharing

try:
    from CTFd.utils.modules import can_access_challenge
except ImportError:  # pragma: no cover - CTFd before modules
    def can_access_challenge(challenge, user):
        return True


PLUGIN_DIR = "tidegate"
TEMPLATES = "plugins/" + PLUGIN_DIR + "/templates/"

# tidegate instance ids are 10 lowercase hex characters; anything that is
# not hex never reaches tidegate.
INSTANCE_ID = re.compile(r"^[0-9a-f]{4,64}$")

SHARING_PAGE_SIZE = 50

# CTFd's rate limit on the player endpoints: requests per IP and endpoint in
# RATE_INTERVAL seconds (the modal polls GET every 2 s at most).
RATE_INTERVAL = 10
RATE_GET = 60
RATE_WRITE = 20

tidegate_bp = Blueprint("tidegate", __name__)


# --- answers ---------------------------------------------------------------


def _ok(data, status=200):
    return {"success": True, "data": data}, status


def _fail(status, error, reason=None, retry_after=None):
    return (
        {"success": False, "error": error, "reason": reason, "retry_after": retry_after},
        status,
    )


def _tidegate_fail(e: client.TidegateError):
    body = e.body()
    headers = {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    return body, e.status, headers


def _str(value, default=""):
    return value if isinstance(value, str) else default


def _int(value, default=None):
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _web_url(value):
    """An http:// or https:// URL, or None (a link never gets another
    scheme, e.g. javascript:)."""
    if isinstance(value, str) and value.lower().startswith(("http://", "https://")):
        return value
    return None


# tidegate's words for why a spawn waits, as the plugin's pages say them.
QUEUE_REASONS = {
    "no_capacity": "every worker is busy",
    "no_network": "no worker has a free network for this challenge",
    "policy": "the challenge's policy holds new instances back for now",
}


def is_queued(answer):
    """Whether a tidegate answer is a place in the waiting queue (a 202 to
    a spawn, or `GET /v1/instances/{id}` while it waits)."""
    return isinstance(answer, dict) and answer.get("status") == "queued"


def shape_queued(place, now=None):
    """A place in tidegate's waiting queue as the plugin shows it: the id it
    will have once admitted, its position, and no addresses yet."""
    if not isinstance(place, dict):
        return None
    return {
        "id": _str(place.get("id")),
        "challenge": _str(place.get("challenge")),
        "status": "queued",
        # 1 is next; `waiting` counts every challenge's places.
        "position": _int(place.get("position")),
        "waiting": _int(place.get("waiting")),
        "reason": _str(place.get("reason")),
        "queued_at": _int(place.get("queued_at")),
        "hold_secs": _int(place.get("hold_secs")),
        "created_at": None,
        "expires_at": None,
        "renewals": 0,
        "now": int(now if now is not None else time.time()),
        "http": [],
        "tcp": [],
    }


def shape_answer(answer, cfg, now=None):
    """An instance, or a place in the queue, as the plugin shows it."""
    if is_queued(answer):
        return shape_queued(answer, now)
    return shape_instance(answer, cfg, now)


def shape_instance(inst, cfg, now=None):
    """An instance as the plugin shows it: links, ncat commands, and the
    server's clock (the countdown is right whatever the browser's clock)."""
    if not isinstance(inst, dict):
        return None
    host = cfg.ncat_host()
    http = []
    for p in inst.get("http") or []:
        if isinstance(p, dict) and _web_url(p.get("url")):
            http.append({"port_name": _str(p.get("port_name")), "url": p.get("url")})
    tcp = []
    for p in inst.get("tcp") or []:
        if not isinstance(p, dict):
            continue
        port = _int(p.get("port"))
        tls_host = _str(p.get("tls_hostname"))
        tcp.append(
            {
                "port_name": _str(p.get("port_name")),
                "port": port,
                "ncat": "ncat %s %s" % (host, port) if port is not None else None,
                "tls": (
                    "ncat --ssl %s %d" % (tls_host, cfg.tls_port)
                    if cfg.tls_port and tls_host
                    else None
                ),
            }
        )
    out = {
        "id": _str(inst.get("id")),
        "challenge": _str(inst.get("challenge")),
        "status": _str(inst.get("status"), "pending"),
        "created_at": _int(inst.get("created_at")),
        "expires_at": _int(inst.get("expires_at")),
        "renewals": _int(inst.get("renewals"), 0),
        "now": int(now if now is not None else time.time()),
        "http": http,
        "tcp": tcp,
    }
    services = inst.get("services")
    if isinstance(services, dict) and services:
        out["services"] = {str(k): _str(v) for k, v in services.items()}
    return out


# --- players ---------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, status, error, reason):
        super().__init__(error)
        self.answer = _fail(status, error, reason)


def _player():
    """The session's user, team and tidegate team, or a refusal."""
    if not authed():
        raise _Refused(403, "log in first", "not_logged_in")
    user = get_current_user()
    team = get_current_team()
    if (
        get_config("verify_emails")
        and not user.verified
        and not is_admin()
    ):
        raise _Refused(403, "confirm your email address first", "unverified")
    tg_team = teams.tidegate_team(user, team)
    if tg_team is None:
        raise _Refused(403, "join a team first", "no_team")
    return user, team, tg_team


def _solved_ids(user):
    rows = (
        Solves.query.with_entities(Solves.challenge_id)
        .filter_by(account_id=user.account_id)
        .all()
    )
    return {cid for (cid,) in rows}


def _visible_challenge(challenge_id, user):
    """The tidegate challenge the player may see, or a 404 (hidden, locked,
    not released, prerequisites unsolved, another type: all the same)."""
    not_found = _Refused(404, "no such challenge", "not_found")
    chal = TidegateChallenge.query.filter_by(id=challenge_id).first()
    if chal is None:
        raise not_found
    if is_admin():
        return chal
    if get_config("challenge_visibility") == "admins":
        raise not_found
    if chal.state in ("hidden", "locked"):
        raise not_found
    if not can_access_challenge(chal, user):
        raise not_found
    requirements = (chal.requirements or {}).get("prerequisites", [])
    if requirements:
        existing = {c.id for c in Challenges.query.with_entities(Challenges.id).all()}
        if not (_solved_ids(user) >= (set(requirements) & existing)):
            raise not_found
    if not chal.tidegate_challenge:
        raise _Refused(
            503, "this challenge has no tidegate challenge set; tell the organizers",
            "not_configured",
        )
    return chal


def _check_ctf_time():
    """Starting and renewing need the CTF running and not paused (admins
    excepted); stopping does not."""
    if is_admin():
        return
    if not ctftime():
        raise _Refused(403, "the CTF is not running", "ctf_not_running")
    if ctf_paused():
        raise _Refused(403, "the CTF is paused", "ctf_paused")


def _instance_id(instance_id):
    if not INSTANCE_ID.match(instance_id or ""):
        raise _Refused(404, "no such instance", "not_found")
    return instance_id


def _latest(instances):
    live = [i for i in instances if isinstance(i, dict)]
    if not live:
        return None
    return max(live, key=lambda i: _int(i.get("created_at"), 0))


def _queue(params, cfg):
    """`GET /v1/queue` (filtered by `params`): the places, first to be
    admitted first. A tidegate without a queue (404) has none."""
    try:
        answer = client.call("GET", "/v1/queue", params=params, cfg=cfg)
    except client.TidegateError as e:
        if e.status == 404:
            return []
        raise
    places = answer.get("queued") if isinstance(answer, dict) else None
    return [p for p in places or [] if isinstance(p, dict)]


@tidegate_bp.route(
    "/plugins/tidegate/api/challenges/<int:challenge_id>/instance", methods=["GET"]
)
@ratelimit(method="GET", limit=RATE_GET, interval=RATE_INTERVAL)
def player_get_instance(challenge_id):
    try:
        user, team, tg_team = _player()
        chal = _visible_challenge(challenge_id, user)
        cfg = settings.load()
        answer = client.call(
            "GET",
            "/v1/instances",
            params={"team": tg_team, "challenge": chal.tidegate_challenge},
            cfg=cfg,
        )
        instances = answer.get("instances") if isinstance(answer, dict) else None
        inst = _latest(instances or [])
        if inst is not None:
            shaped = shape_instance(inst, cfg)
        else:
            # No instance: the team's place in the queue, if it waits (the
            # modal then asks about its id, which holds the place).
            places = [
                p
                for p in _queue(
                    {"team": tg_team, "challenge": chal.tidegate_challenge}, cfg
                )
                if p.get("team") == tg_team
                and p.get("challenge") == chal.tidegate_challenge
            ]
            shaped = shape_queued(places[0]) if places else None
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    body, status = _ok(shaped)
    # The session's own tidegate team (the name its instances are under).
    body["team"] = tg_team
    return body, status


@tidegate_bp.route(
    "/plugins/tidegate/api/challenges/<int:challenge_id>/instance", methods=["POST"]
)
@ratelimit(method="POST", limit=RATE_WRITE, interval=RATE_INTERVAL)
def player_spawn(challenge_id):
    try:
        user, team, tg_team = _player()
        chal = _visible_challenge(challenge_id, user)
        _check_ctf_time()
        cfg = settings.load()
        status, inst = client.call_with_status(
            "POST",
            "/v1/instances",
            body={"challenge": chal.tidegate_challenge, "team": tg_team},
            cfg=cfg,
        )
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    if status == 202 or is_queued(inst):
        # No room now: a place in tidegate's queue (the same place again
        # when the team already waits), admitted later under this id.
        return _ok(shape_queued(inst), 202)
    return _ok(shape_instance(inst, cfg), 201)


@tidegate_bp.route("/plugins/tidegate/api/instances/<instance_id>", methods=["GET"])
@ratelimit(method="GET", limit=RATE_GET, interval=RATE_INTERVAL)
def player_get_by_id(instance_id):
    """One of the team's instances, or its place in the queue while it
    waits: each such call holds the place for another `hold_secs`."""
    try:
        user, team, tg_team = _player()
        iid = _instance_id(instance_id)
        cfg = settings.load()
        answer = client.call(
            "GET", "/v1/instances/%s" % iid, params={"team": tg_team}, cfg=cfg
        )
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    return _ok(shape_answer(answer, cfg))


@tidegate_bp.route("/plugins/tidegate/api/instances/<instance_id>/renew", methods=["POST"])
@ratelimit(method="POST", limit=RATE_WRITE, interval=RATE_INTERVAL)
def player_renew(instance_id):
    try:
        user, team, tg_team = _player()
        _check_ctf_time()
        iid = _instance_id(instance_id)
        cfg = settings.load()
        inst = client.call(
            "POST", "/v1/instances/%s/renew" % iid, params={"team": tg_team}, cfg=cfg
        )
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    return _ok(shape_instance(inst, cfg))


@tidegate_bp.route("/plugins/tidegate/api/instances/<instance_id>", methods=["DELETE"])
@ratelimit(method="DELETE", limit=RATE_WRITE, interval=RATE_INTERVAL)
def player_stop(instance_id):
    try:
        user, team, tg_team = _player()
        iid = _instance_id(instance_id)
        client.call("DELETE", "/v1/instances/%s" % iid, params={"team": tg_team})
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    return _ok(None)


# --- admins: JSON ----------------------------------------------------------


def _admin_json():
    if not is_admin():
        raise _Refused(403, "admins only", "forbidden")


def _challenge_names():
    """tidegate challenge name -> [(CTFd id, CTFd name)]."""
    out = {}
    for c in TidegateChallenge.query.all():
        out.setdefault(c.tidegate_challenge, []).append({"id": c.id, "name": c.name})
    return out


def _admin_listing(cfg):
    """Live instances, waiting spawns and workers, for the page and its JSON
    twin. Raises TidegateError when tidegate cannot be asked."""
    listing = client.call("GET", "/v1/instances", cfg=cfg)
    workers_answer = client.call("GET", "/v1/workers", cfg=cfg)
    places = _queue(None, cfg)
    now = int(time.time())
    names = _challenge_names()
    described = {}
    rows = []
    raw = listing.get("instances") if isinstance(listing, dict) else []
    for inst in raw or []:
        shaped = shape_instance(inst, cfg, now)
        if shaped is None:
            continue
        team_id = _str(inst.get("team"))
        if team_id not in described:
            described[team_id] = teams.describe(team_id)
        shaped["team"] = described[team_id]
        shaped["worker"] = _str(inst.get("worker"))
        shaped["ctfd_challenges"] = names.get(shaped["challenge"], [])
        rows.append(shaped)
    rows.sort(key=lambda r: (r.get("expires_at") or 0, r["id"]))
    # In tidegate's admission order (its `position`).
    queued = []
    for place in places:
        shaped = shape_queued(place, now)
        team_id = _str(place.get("team"))
        if team_id not in described:
            described[team_id] = teams.describe(team_id)
        shaped["team"] = described[team_id]
        shaped["ctfd_challenges"] = names.get(shaped["challenge"], [])
        shaped["reason_text"] = QUEUE_REASONS.get(shaped["reason"], shaped["reason"])
        queued.append(shaped)
    workers = []
    raw_workers = workers_answer.get("workers") if isinstance(workers_answer, dict) else []
    for w in raw_workers or []:
        if not isinstance(w, dict):
            continue
        workers.append(
            {
                "id": _str(w.get("id")),
                "capacity": _int(w.get("capacity"), 0),
                "instances": _int(w.get("instances"), 0),
                "free": _int(w.get("free"), 0),
                "version": _str(w.get("version")),
            }
        )
    workers.sort(key=lambda w: w["id"])
    totals = {
        "capacity": sum(w["capacity"] for w in workers),
        "instances": sum(w["instances"] for w in workers),
        "free": sum(w["free"] for w in workers),
        "workers": len(workers),
    }
    return {
        "instances": rows,
        "queued": queued,
        "workers": workers,
        "totals": totals,
        "now": now,
    }


@tidegate_bp.route("/plugins/tidegate/admin/api/instances", methods=["GET"])
def admin_api_instances():
    try:
        _admin_json()
        return _ok(_admin_listing(settings.load()))
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)


@tidegate_bp.route(
    "/plugins/tidegate/admin/api/instances/<instance_id>/renew", methods=["POST"]
)
def admin_api_renew(instance_id):
    try:
        _admin_json()
        iid = _instance_id(instance_id)
        cfg = settings.load()
        inst = client.call("POST", "/v1/instances/%s/renew" % iid, cfg=cfg)
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    return _ok(shape_instance(inst, cfg))


@tidegate_bp.route("/plugins/tidegate/admin/api/instances/<instance_id>", methods=["DELETE"])
def admin_api_stop(instance_id):
    try:
        _admin_json()
        iid = _instance_id(instance_id)
        client.call("DELETE", "/v1/instances/%s" % iid)
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    return _ok(None)


@tidegate_bp.route("/plugins/tidegate/admin/api/status", methods=["GET"])
def admin_api_status():
    """Whether tidegate answers the platform token (the config page's test)."""
    try:
        _admin_json()
        answer = client.call("GET", "/v1/workers")
    except _Refused as r:
        return r.answer
    except client.TidegateError as e:
        return _tidegate_fail(e)
    workers = answer.get("workers") if isinstance(answer, dict) else None
    return _ok({"workers": len(workers or [])})


# --- admins: pages ---------------------------------------------------------


def _fmt_remaining(seconds):
    if seconds is None:
        return ""
    if seconds <= 0:
        return "expired"
    return _fmt_duration(seconds)


def _fmt_duration(seconds):
    h, rest = divmod(max(0, int(seconds)), 3600)
    m, s = divmod(rest, 60)
    if h:
        return "%dh %02dm" % (h, m)
    return "%dm %02ds" % (m, s)


@tidegate_bp.route("/admin/tidegate/instances")
@admins_only
def admin_instances():
    cfg = settings.load()
    error = None
    listing = {
        "instances": [],
        "queued": [],
        "workers": [],
        "totals": None,
        "now": int(time.time()),
    }
    try:
        listing = _admin_listing(cfg)
    except client.TidegateError as e:
        error = e.error
        if e.retry_after is not None:
            error += " (retry after %d s)" % e.retry_after
    for row in listing["instances"]:
        exp = row.get("expires_at")
        row["expires_in"] = _fmt_remaining(exp - listing["now"] if exp else None)
    for place in listing["queued"]:
        since = place.get("queued_at")
        place["waited"] = _fmt_duration(listing["now"] - since) if since else ""
    return render_template(
        TEMPLATES + "instances.html",
        error=error,
        listing=listing,
        teams_mode=is_teams_mode(),
    )


@tidegate_bp.route("/admin/tidegate/flag-sharing")
@admins_only
def admin_sharing():
    try:
        page = max(1, int(request.args.get("page", 1)))
    except ValueError:
        page = 1
    query = TidegateFlagSharing.query.order_by(TidegateFlagSharing.id.desc())
    total = query.count()
    rows = query.offset((page - 1) * SHARING_PAGE_SIZE).limit(SHARING_PAGE_SIZE).all()
    team_mode = is_teams_mode()
    events = []
    for r in rows:
        # A deleted account's id is set to NULL (foreign keys), so a
        # reused id never names another account here.
        if team_mode:
            submitter = (
                teams.describe(teams.team_id_for_team(r.submitter_team))
                if r.submitter_team is not None
                else teams.describe("")
            )
        else:
            submitter = (
                teams.describe(teams.team_id_for_user(r.submitter_user))
                if r.submitter_user is not None
                else teams.describe("")
            )
        user = Users.query.filter_by(id=r.submitter_user_id).first() if r.submitter_user_id else None
        chal = Challenges.query.filter_by(id=r.challenge_id).first()
        events.append(
            {
                "id": r.id,
                "date": r.date,
                "challenge": chal,
                "submitter": submitter,
                "submitter_user": user,
                "owner": teams.describe(r.owner or ""),
                "instance_id": r.instance_id,
                "ip": r.ip,
                "flag": r.flag,
            }
        )
    pages = max(1, math.ceil(total / SHARING_PAGE_SIZE))
    return render_template(
        TEMPLATES + "sharing.html",
        events=events,
        total=total,
        page=page,
        pages=pages,
        teams_mode=team_mode,
        account_api="teams" if team_mode else "users",
    )


_CONFIG_FIELDS = (
    ("api_url", settings.API_URL, "API URL", "http://controller:7700"),
    ("platform_token", settings.PLATFORM_TOKEN, "Platform token", ""),
    ("tcp_host", settings.TCP_HOST, "TCP host (shown in ncat commands)", "ctf.example.org"),
    ("tls_port", settings.TLS_PORT, "TLS port (ncat --ssl; empty: not shown)", "443"),
    ("timeout", settings.TIMEOUT, "Timeout in seconds", "5"),
)


def _config_view(errors=None, saved=False):
    fields = []
    for name, pair, label, placeholder in _CONFIG_FIELDS:
        value, src = settings.raw(pair)
        secret = name == "platform_token"
        fields.append(
            {
                "name": name,
                "label": label,
                "env": pair[0],
                "source": src,
                # The token is never rendered here (it is in CTFd's config
                # table all the same when saved on this page).
                "value": "" if secret else (value or ""),
                "is_set": value is not None,
                "secret": secret,
                "placeholder": placeholder,
            }
        )
    return render_template(
        TEMPLATES + "config.html", fields=fields, errors=errors or [], saved=saved
    )


@tidegate_bp.route("/admin/tidegate/config", methods=["GET", "POST"])
@admins_only
def admin_config():
    if request.method == "GET":
        return _config_view()
    errors = []
    updates = []
    for name, pair, label, _ in _CONFIG_FIELDS:
        if settings.source(pair) == "env":
            continue  # the environment wins; the form shows it read-only
        value = (request.form.get(name) or "").strip()
        if name == "platform_token":
            if request.form.get("clear_platform_token"):
                updates.append((pair, None))
            elif value:
                updates.append((pair, value))
            continue
        if value:
            if name == "api_url" and not settings.valid_api_url(value):
                errors.append("API URL: an http:// or https:// URL")
                continue
            if name == "tls_port" and not settings.valid_port(value):
                errors.append("TLS port: a port number (1-65535)")
                continue
            if name == "timeout" and not settings.valid_timeout(value):
                errors.append("Timeout: seconds, more than 0 and at most 120")
                continue
        updates.append((pair, value or None))
    if errors:
        return _config_view(errors=errors), 400
    for pair, value in updates:
        settings.save(pair, value)
    return _config_view(saved=True)
