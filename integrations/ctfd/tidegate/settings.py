"""Where the plugin finds tidegate: environment variables first, then the
values an admin saved on /admin/tidegate/config (CTFd's config table).

Nothing here talks to tidegate; reading the settings never fails.
"""

import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from CTFd.utils import get_config, set_config

# (environment variable, CTFd config key)
API_URL = ("TIDEGATE_API_URL", "tidegate_api_url")
PLATFORM_TOKEN = ("TIDEGATE_PLATFORM_TOKEN", "tidegate_platform_token")
TCP_HOST = ("TIDEGATE_TCP_HOST", "tidegate_tcp_host")
TLS_PORT = ("TIDEGATE_TLS_PORT", "tidegate_tls_port")
TIMEOUT = ("TIDEGATE_TIMEOUT", "tidegate_timeout")

ALL = (API_URL, PLATFORM_TOKEN, TCP_HOST, TLS_PORT, TIMEOUT)

DEFAULT_TIMEOUT = 5.0


def raw(pair):
    """The value and where it came from ("env", "config" or None)."""
    env, key = pair
    value = os.environ.get(env)
    if value is not None and value.strip() != "":
        return value.strip(), "env"
    stored = get_config(key)
    if stored is None or stored is False or str(stored).strip() == "":
        return None, None
    return str(stored).strip(), "config"


def source(pair) -> Optional[str]:
    return raw(pair)[1]


def save(pair, value: Optional[str]) -> None:
    """Stores a value in CTFd's config table (None or "" removes it)."""
    _, key = pair
    set_config(key, value if value else None)


@dataclass
class Settings:
    api_url: Optional[str]
    token: Optional[str]
    tcp_host: Optional[str]
    tls_port: Optional[int]
    timeout: float

    @property
    def configured(self) -> bool:
        return bool(self.api_url and self.token)

    def ncat_host(self) -> str:
        """The host shown in `ncat HOST PORT`: TIDEGATE_TCP_HOST, or the API
        URL's host when unset."""
        if self.tcp_host:
            return self.tcp_host
        if self.api_url:
            host = urlsplit(self.api_url).hostname
            if host:
                return host
        return "localhost"


def _port(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        port = int(text)
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def _timeout(text: Optional[str]) -> float:
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if 0 < value <= 120 else DEFAULT_TIMEOUT


def load() -> Settings:
    api_url = raw(API_URL)[0]
    if api_url:
        api_url = api_url.rstrip("/")
    return Settings(
        api_url=api_url,
        token=raw(PLATFORM_TOKEN)[0],
        tcp_host=raw(TCP_HOST)[0],
        tls_port=_port(raw(TLS_PORT)[0]),
        timeout=_timeout(raw(TIMEOUT)[0]),
    )


def valid_api_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def valid_port(text: str) -> bool:
    return _port(text) is not None


def valid_timeout(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return 0 < value <= 120
