"""A small client for tidegate's REST API (`/v1`), with the platform token.

Every call sends `Authorization: Bearer <token>` and `Content-Type:
application/json`, and gives up after the configured timeout. Standby
controllers forward writes to the scheduler themselves; an older standby
answers a write with 307 and the scheduler's URL in `Location`, and the
client follows it itself (at most MAX_HOPS times), sending the token
again, because `requests` drops `Authorization` on a redirect to another
host. It follows only an http(s) `Location` that is no downgrade from the
configured URL's scheme (https never goes to http), always sends its own
query again (a `Location` naming another `team` is refused), and gives all
hops together one timeout. Every failure is a TidegateError carrying what the player or admin is
shown: tidegate's own `error` text and `reason` word, and `Retry-After`.
"""

import json
import logging
import time
from typing import Any, Optional, Tuple
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

from . import settings as tg_settings

log = logging.getLogger("tidegate")

MAX_HOPS = 3

UNREACHABLE = "tidegate is unreachable"


class TidegateError(Exception):
    """A failed tidegate call, as the plugin answers it."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: Optional[str] = None,
        retry_after: Optional[int] = None,
        field: Optional[str] = None,
        policy: Optional[dict] = None,
    ):
        super().__init__(error)
        self.status = status
        self.error = error
        self.reason = reason
        self.retry_after = retry_after
        self.field = field
        self.policy = policy

    def body(self) -> dict:
        out = {
            "success": False,
            "error": self.error,
            "reason": self.reason,
            "retry_after": self.retry_after,
        }
        if self.field:
            out["field"] = self.field
        if self.policy:
            out["policy"] = self.policy
        return out


def _retry_after(resp: requests.Response) -> Optional[int]:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0, int(value.strip()))
    except ValueError:
        # An HTTP date: tidegate sends seconds; anything else is not shown.
        return None


def _error_from(resp: requests.Response) -> TidegateError:
    status = resp.status_code
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    error = body.get("error")
    if not isinstance(error, str) or not error:
        error = "tidegate answered HTTP %d" % status
    reason = body.get("reason") if isinstance(body.get("reason"), str) else None
    if status == 401:
        # The player is not at fault: the plugin's token is wrong.
        log.error("tidegate refused the platform token: %s", error)
        return TidegateError(
            502,
            "tidegate refused the platform token (TIDEGATE_PLATFORM_TOKEN): tell the organizers",
            "bad_token",
        )
    if status in (307, 308):
        return TidegateError(
            502, "tidegate redirected too many times: " + error, "redirect_loop"
        )
    if status < 400 or status > 599:
        status = 502
    policy = body.get("policy") if isinstance(body.get("policy"), dict) else None
    field = body.get("field") if isinstance(body.get("field"), str) else None
    return TidegateError(status, error, reason, _retry_after(resp), field, policy)


def call(
    method: str,
    path: str,
    params: Optional[dict] = None,
    body: Any = None,
    cfg: Optional["tg_settings.Settings"] = None,
) -> Any:
    """Calls tidegate; returns the decoded JSON answer (None for a 204)."""
    return call_with_status(method, path, params, body, cfg)[1]


def call_with_status(
    method: str,
    path: str,
    params: Optional[dict] = None,
    body: Any = None,
    cfg: Optional["tg_settings.Settings"] = None,
) -> Tuple[int, Any]:
    """As `call`, with tidegate's 2xx status: (status, answer). A spawn
    answered 202 is a place in tidegate's waiting queue, not an instance."""
    cfg = cfg or tg_settings.load()
    if not cfg.configured:
        raise TidegateError(
            503,
            "tidegate is not configured: set TIDEGATE_API_URL and TIDEGATE_PLATFORM_TOKEN "
            "(or the tidegate config page)",
            "not_configured",
        )
    url = cfg.api_url + path
    headers = {
        "Authorization": "Bearer " + cfg.token,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    data = json.dumps(body) if body is not None else None
    ours = params or {}
    configured_scheme = urlsplit(cfg.api_url).scheme
    # One deadline for the call, redirects included: each hop gets what
    # is left of it.
    deadline = time.monotonic() + cfg.timeout
    hops = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("tidegate %s %s failed: no time left after %d redirect(s)",
                        method, url, hops)
            raise TidegateError(503, UNREACHABLE, "unreachable")
        try:
            resp = requests.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                timeout=left,
                allow_redirects=False,
            )
        except (requests.exceptions.RequestException, ValueError) as e:
            # Connection refused, DNS, TLS, timeouts, a malformed URL: the
            # player sees one sentence, the log has the cause.
            log.warning("tidegate %s %s failed: %s", method, url, e)
            raise TidegateError(503, UNREACHABLE, "unreachable") from None
        if resp.status_code in (307, 308) and resp.headers.get("Location"):
            hops += 1
            if hops > MAX_HOPS:
                raise _error_from(resp)
            target = resp.headers["Location"]
            try:
                target = urljoin(url, target)
                parts = urlsplit(target)
                parts.port  # a malformed port raises here, not later
            except ValueError:
                parts = None
            if (
                parts is None
                or parts.scheme not in ("http", "https")
                or not parts.hostname
                or (configured_scheme == "https" and parts.scheme != "https")
            ):
                raise TidegateError(
                    502, "tidegate redirected to %r" % target, "bad_redirect"
                )
            # tidegate's Location is the same path and query on the
            # scheduler. Our own query is sent again whatever it says (ours
            # wins); one naming another team is not followed.
            query = parse_qsl(parts.query, keep_blank_values=True)
            if any(k == "team" and v != ours.get("team") for k, v in query):
                log.warning("tidegate %s %s redirected to another team: %s",
                            method, url, target)
                raise TidegateError(
                    502, "tidegate redirected to another team's query", "bad_redirect"
                )
            kept = [(k, v) for k, v in query if k not in ours]
            url = urlunsplit(parts._replace(query=urlencode(kept), fragment=""))
            continue
        if resp.status_code >= 300:
            raise _error_from(resp)
        if resp.status_code == 204 or not resp.content:
            return resp.status_code, None
        try:
            return resp.status_code, resp.json()
        except ValueError:
            raise TidegateError(
                502, "tidegate answered something that is not JSON", "bad_answer"
            ) from None
