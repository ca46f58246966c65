"""OPENAI_PROXY_LOG_DB: a SQLite file path, or a PostgreSQL URL in libpq's own form.

Checked without psycopg: the gunicorn master reads the config, and a psycopg imported there, before
the workers monkey-patch, would keep a wait function that blocks the gevent hub (see openai_proxy.log.sql).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql", "postgres")
# Every keyword libpq accepts in a connection URI's query (`PQconninfoParse` refuses the others).
_KEYWORDS = """
application_name channel_binding client_encoding connect_timeout dbname fallback_application_name
gssdelegation gssencmode gsslib host hostaddr keepalives keepalives_count keepalives_idle
keepalives_interval krbsrvname load_balance_hosts max_protocol_version min_protocol_version
oauth_client_id oauth_client_secret oauth_issuer oauth_scope options passfile password port
replication require_auth requirepeer requiressl scram_client_key scram_server_key service
ssl_max_protocol_version ssl_min_protocol_version sslcert sslcertmode sslcompression sslcrl
sslcrldir sslkey sslkeylogfile sslmode sslnegotiation sslpassword sslrootcert sslsni
target_session_attrs tcp_user_timeout user
"""
LIBPQ_PARAMS = frozenset(_KEYWORDS.split())
# Query parameters that carry a secret: masked like the password in the URL itself.
SECRET_PARAMS = ("password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_postgres_url(value: str) -> bool:
    """Whether the setting names a PostgreSQL database (anything else is a SQLite file path)."""
    match = _SCHEME.match(value)
    return match is not None and match.group(1) in POSTGRES_SCHEMES


def shown(value: str) -> str:
    """The setting as pages and logs may show it: no password, neither in the URL nor its query."""
    if _SCHEME.match(value) is None:
        return value
    parts = urlsplit(value)
    parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in SECRET_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query)))


def secrets(value: str) -> list[str]:
    """The passwords a PostgreSQL URL carries (userinfo, query), decoded as libpq decodes them."""
    if not is_postgres_url(value):
        return []
    parts = urlsplit(value)
    found = [unquote(parts.password)] if "@" in parts.netloc and parts.password else []
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k in SECRET_PARAMS and v]
    return found


def check(raw: str) -> str:
    """The value to use, or ValueError saying what is wrong (the caller names the variable).

    A path is kept as is. `postgresql://` (or `postgres://`) URLs are checked for what libpq would
    refuse at the first connection: a bad port, a #fragment, an unknown query parameter. Any other
    URL is refused rather than becoming a folder named like `redis:` in the working directory.
    """
    match = _SCHEME.match(raw)
    if match is None:
        return raw
    scheme = match.group(1).lower()
    if scheme in POSTGRES_SCHEMES:
        return _postgres(scheme + raw[len(scheme) :])  # libpq only knows the lowercase prefix
    if scheme.partition("+")[0] in POSTGRES_SCHEMES:
        raise ValueError(
            f"{scheme}:// names a driver (SQLAlchemy's form); use libpq's own "
            "postgresql://user:password@host:5432/dbname"
        )
    raise ValueError(
        f"it is a {scheme}:// URL, not a file path; use a SQLite file path such as "
        "var/openai-proxy.sqlite3 or a postgresql://user:password@host:5432/dbname URL"
    )


def _postgres(url: str) -> str:
    parts = urlsplit(url)
    if "#" in url:
        raise ValueError("a PostgreSQL URL has no #fragment")
    # libpq takes a list of hosts, each with its own port: host1:5432,[::1]:5433
    for host in parts.netloc.rpartition("@")[2].split(","):
        if host.startswith("["):
            name, _, rest = host[1:].partition("]")
        else:
            name, colon, port = host.partition(":")
            rest = colon + port
        if rest and not (rest[0] == ":" and rest[1:].isdigit() and 0 < int(rest[1:]) < 65536):
            raise ValueError(f"{rest.removeprefix(':') or host!r} is not a port number (1 to 65535)")
        if any(c in name for c in "/?#@ "):
            raise ValueError(f"{name!r} is not a host name")
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("its query is not name=value pairs joined by &") from None
    unknown = sorted({k for k, _ in query} - LIBPQ_PARAMS)
    if unknown:
        raise ValueError(f"unknown connection parameter(s): {', '.join(unknown)}")
    return url
