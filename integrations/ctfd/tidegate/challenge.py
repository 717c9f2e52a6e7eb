"""The `tidegate` challenge type: instances and flags are tidegate's.

A flag is checked by tidegate (`POST /v1/flags/check`), which knows every
instance's flag: right for the submitter's own instance, "shared" when it is
another team's instance flag (recorded here as evidence), wrong otherwise.
When tidegate cannot answer, the submission is refused without counting as
a wrong attempt (see `fail`).
"""

import json

from flask import g

from CTFd.exceptions.challenges import (
    ChallengeCreateException,
    ChallengeUpdateException,
)
from CTFd.models import db
from CTFd.plugins.challenges import BaseChallenge
from CTFd.utils.dates import parse_iso_datetime
from CTFd.utils.user import get_current_team, get_current_user, get_ip, is_admin

from . import client, teams
from .models import CHALLENGE_NAME, TidegateChallenge, TidegateFlagSharing

try:  # CTFd >= 3.8
    from CTFd.plugins.challenges import ChallengeResponse
except ImportError:  # pragma: no cover - older CTFd: the tuple form
    ChallengeResponse = None

try:
    from CTFd.plugins.challenges.decay import DECAY_FUNCTIONS
except ImportError:  # pragma: no cover
    DECAY_FUNCTIONS = {}

UNREACHABLE_MESSAGE = (
    "the flag checker (tidegate) is unreachable; try again in a moment"
)

# flask.g key: this request's submission must not be stored as a Fail.
_UNCOUNTED = "tidegate_uncounted_attempt"

PLUGIN_ROUTE = "/plugins/tidegate/assets/"

MAX_FLAG_BYTES = 1024


def _response(status, message):
    if ChallengeResponse is not None:
        return ChallengeResponse(status=status, message=message)
    return (status == "correct", message)


def _name_error(name):
    """Why `name` is not a tidegate challenge name, or None."""
    if not isinstance(name, str) or not name:
        return "tidegate challenge: required (the challenge's name in tidegate)"
    if not CHALLENGE_NAME.match(name):
        return (
            "tidegate challenge: %r is not a tidegate challenge name "
            "(1-63 of a-z, 0-9 and -)" % name
        )
    return None


def _request_data(request):
    data = request.form or request.get_json(silent=True) or {}
    return dict(data) if isinstance(data, dict) else {}


def _name_taken(name, challenge_id=None):
    """Why `name` cannot be this challenge's tidegate challenge (another
    CTFd challenge has it: one tidegate flag would score both), or None."""
    query = TidegateChallenge.query.filter(TidegateChallenge.tidegate_challenge == name)
    if challenge_id is not None:
        query = query.filter(TidegateChallenge.id != challenge_id)
    other = query.first()
    if other is None:
        return None
    return (
        "tidegate challenge: %r is already the tidegate challenge of %r (id %d); "
        "one tidegate flag would score both" % (name, other.name, other.id)
    )


def _submission(data):
    """The submitted flag as a str that can be encoded as UTF-8, or None.

    A JSON submission may be anything (a number, a list, a string with a
    lone surrogate). Then CTFd itself, after attempt(), fails on it (its
    Fail record strips it, its log line encodes it), so the request's JSON
    (the very dict CTFd reads) gets a printable stand-in for it."""
    if not isinstance(data, dict):
        return None
    value = data.get("submission")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            stand_in = value.encode("utf-8", "backslashreplace").decode("utf-8")
    elif value is None:
        stand_in = ""
    else:
        stand_in = json.dumps(value)
    try:
        data["submission"] = stand_in[:MAX_FLAG_BYTES]
    except TypeError:  # a form's MultiDict: its values are always str
        pass
    return None


def _int_or_none(value, attr, exc):
    if value is None or value == "":
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise exc("Invalid input for '%s'" % attr)


class TidegateChallengeType(BaseChallenge):
    id = "tidegate"
    name = "tidegate"
    templates = {
        "create": PLUGIN_ROUTE + "create.html",
        "update": PLUGIN_ROUTE + "update.html",
        "view": PLUGIN_ROUTE + "view.html",
    }
    scripts = {
        "create": PLUGIN_ROUTE + "create.js",
        "update": PLUGIN_ROUTE + "update.js",
        "view": PLUGIN_ROUTE + "view.js",
    }
    route = PLUGIN_ROUTE
    challenge_model = TidegateChallenge

    @classmethod
    def create(cls, request):
        data = _request_data(request)
        name = data.get("tidegate_challenge")
        data["tidegate_challenge"] = name.strip() if isinstance(name, str) else ""
        err = _name_error(data["tidegate_challenge"]) or _name_taken(
            data["tidegate_challenge"]
        )
        if err:
            raise ChallengeCreateException(err)
        # The form's scoring choice is CTFd's own `function` column.
        function = data.get("function") or "static"
        if not isinstance(function, str):
            raise ChallengeCreateException("Scoring: unknown function")
        if function != "static" and function not in DECAY_FUNCTIONS:
            raise ChallengeCreateException(
                "Scoring: unknown function %r (static, linear or logarithmic)" % function
            )
        data["function"] = function
        for attr in ("value", "initial", "minimum", "decay"):
            data[attr] = _int_or_none(data.get(attr), attr, ChallengeCreateException)
        if function == "static":
            data["initial"] = data["minimum"] = data["decay"] = None
            if data["value"] is None:
                raise ChallengeCreateException("Missing 'value' for a static challenge")
        else:
            if data["initial"] is None and data["value"] is not None:
                data["initial"] = data["value"]
            for attr in ("initial", "minimum", "decay"):
                if data[attr] is None:
                    raise ChallengeCreateException(
                        "Missing '%s' but function is %s" % (attr, function)
                    )
            data["value"] = data["initial"]
        if data.get("scheduled_at"):
            try:
                data["scheduled_at"] = parse_iso_datetime(data["scheduled_at"])
            except ValueError:
                raise ChallengeCreateException(
                    "Invalid 'scheduled_at': expected an ISO 8601 datetime"
                )
        else:
            data.pop("scheduled_at", None)
        # Only the model's own attributes (a form may carry more).
        fields = {
            k: v
            for k, v in data.items()
            if k != "id" and hasattr(TidegateChallenge, k)
        }
        challenge = TidegateChallenge(**fields)
        db.session.add(challenge)
        db.session.commit()
        if challenge.function in DECAY_FUNCTIONS:
            cls._recalculate(challenge)
        return challenge

    @classmethod
    def _recalculate(cls, challenge):
        f = DECAY_FUNCTIONS.get(challenge.function)
        if f is None:
            return challenge
        challenge.value = f(challenge)
        db.session.commit()
        return challenge

    @classmethod
    def read(cls, challenge):
        data = super().read(challenge)
        if is_admin():
            chal = TidegateChallenge.query.filter_by(id=challenge.id).first()
            data["tidegate_challenge"] = chal.tidegate_challenge if chal else None
        return data

    @classmethod
    def update(cls, challenge, request):
        data = _request_data(request)
        if "tidegate_challenge" in data:
            name = data.get("tidegate_challenge")
            name = name.strip() if isinstance(name, str) else ""
            err = _name_error(name) or _name_taken(name, challenge.id)
            if err:
                raise ChallengeUpdateException(err)
        # Checked before anything changes; CTFd's update does the rest
        # (scoring function, initial/minimum/decay, scheduled_at).
        challenge = super().update(challenge, request)
        if "tidegate_challenge" in data:
            challenge.tidegate_challenge = name
            db.session.commit()
        return challenge

    @classmethod
    def delete(cls, challenge):
        TidegateFlagSharing.query.filter_by(challenge_id=challenge.id).delete()
        db.session.commit()
        super().delete(challenge)

    @classmethod
    def attempt(cls, challenge, request):
        data = request.form or request.get_json(silent=True) or {}
        submission = (_submission(data) or "").strip()
        if not submission or len(submission.encode("utf-8")) > MAX_FLAG_BYTES:
            return _response("incorrect", "Incorrect")

        user = get_current_user()
        team = get_current_team()
        tg_team = teams.tidegate_team(user, team)
        if tg_team is None and user is not None:
            # An admin previewing in team mode without a team.
            tg_team = teams.team_id_for_user(user)
        chal = TidegateChallenge.query.filter_by(id=challenge.id).first()
        if chal is None or not chal.tidegate_challenge or tg_team is None:
            setattr(g, _UNCOUNTED, True)
            return _response(
                "incorrect", "this challenge has no tidegate challenge set; tell the organizers"
            )

        try:
            answer = client.call(
                "POST",
                "/v1/flags/check",
                body={
                    "challenge": chal.tidegate_challenge,
                    "team": tg_team,
                    "flag": submission,
                },
            )
        except client.TidegateError as e:
            # Not the player's fault: no Fail is recorded (see fail()).
            setattr(g, _UNCOUNTED, True)
            if e.reason == "unreachable":
                return _response("incorrect", UNREACHABLE_MESSAGE)
            message = "the flag checker (tidegate) refused: " + e.error
            if e.retry_after is not None and "retry after" not in e.error:
                message += " (retry after %d s)" % e.retry_after
            return _response("incorrect", message)

        if not isinstance(answer, dict):
            setattr(g, _UNCOUNTED, True)
            return _response("incorrect", UNREACHABLE_MESSAGE)
        if answer.get("correct") is True:
            return _response("correct", "Correct")
        if answer.get("shared") is True:
            owner = answer.get("owner") if isinstance(answer.get("owner"), dict) else {}
            preview = bool(request.args.get("preview")) and is_admin()
            if not preview:
                cls._record_sharing(chal, user, team, owner, submission, request)
            else:
                return _response(
                    "incorrect",
                    "Incorrect: the flag of %s's instance %s (shared)"
                    % (owner.get("team"), owner.get("instance")),
                )
        return _response("incorrect", "Incorrect")

    @classmethod
    def _record_sharing(cls, chal, user, team, owner, submission, request):
        owner_team = owner.get("team") if isinstance(owner.get("team"), str) else None
        kind, num = teams.parse(owner_team or "")
        created = owner.get("created_at")
        row = TidegateFlagSharing(
            challenge_id=chal.id,
            submitter_user_id=user.id if user is not None else None,
            submitter_team_id=team.id if team is not None else None,
            owner=(owner_team or "")[:64] or None,
            owner_team_id=num if kind == "team" else None,
            owner_user_id=num if kind == "user" else None,
            instance_id=str(owner.get("instance") or "")[:32] or None,
            instance_created_at=created if isinstance(created, int) else None,
            flag=submission,
            ip=get_ip(req=request),
        )
        db.session.add(row)
        db.session.commit()

    @classmethod
    def fail(cls, user, team, challenge, request):
        # tidegate could not check the flag: refusing it is not a wrong
        # attempt (it would count against max attempts and the rate limit).
        if getattr(g, _UNCOUNTED, False):
            return
        # CTFd's fail() strips the submission: without a str there is
        # nothing it can record (see _submission).
        data = request.form or request.get_json(silent=True) or {}
        if not isinstance(data, dict) or not isinstance(data.get("submission"), str):
            return
        super().fail(user, team, challenge, request)
