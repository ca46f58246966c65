"""Fixtures: the fake upstream, an app wired to it, a real multi-worker gunicorn, captured records."""

from gevent import monkey

# The proxy runs under gevent in production; the tests patch first so timeouts, sockets and the
# in-process fake upstream behave the same way.
monkey.patch_all()

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402

from openai_proxy import create_app  # noqa: E402
from openai_proxy.config import build_config  # noqa: E402
from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.postgres_server import log_db, postgres_db, postgres_session  # noqa: E402, F401
from tests.support.redis_server import redis_server, redis_session  # noqa: E402, F401
from tests.support.servers import ROOT, GunicornServer, free_port  # noqa: E402, F401


def _reuse_url_builders() -> None:
    """Every test builds its own app, and werkzeug compiles each URL rule's builder from Python source
    as the rule is added: ~45 ms per app for the proxy's routes, most of the quick run's time. A
    builder is a function of the rule's text, its parsed form, its defaults and whether it appends
    unknown arguments (it reads its converters from the rule it is bound to when called), so the
    tests compile each one once and bind it to every rule like it."""
    from werkzeug.routing.rules import Rule

    compile_builder = Rule._compile_builder
    built: dict[tuple, Any] = {}

    def reused(self: Rule, append_unknown: bool = True) -> Any:
        try:
            key = (self.rule, self.host, self.subdomain, self.merge_slashes, tuple(self._trace),
                   tuple(sorted((self.defaults or {}).items())), append_unknown)  # fmt: skip
            builder = built.get(key)
        except TypeError:  # a default that cannot be a key: compile it as werkzeug does
            return compile_builder(self, append_unknown)
        if builder is None:
            builder = built[key] = compile_builder(self, append_unknown)
        return builder

    Rule._compile_builder = reused  # type: ignore[method-assign]


_reuse_url_builders()

SECURITY_KEY = "test-security-key"
ACCESS_TOKEN = "test-access-token"
UPSTREAM_KEY = "sk-test-upstream-0123456789abcdef"
# Every time the proxy writes (pages, /health, records): ISO 8601 UTC, milliseconds, Z.
ISO_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


# Markers by what a test stands on, so a quick run can leave the slow real servers out:
# `pytest -m "not gunicorn and not redis and not postgres and not browser and not slow"` (README "Development").
_MARKS_BY_FIXTURE = {
    "gunicorn_server": "gunicorn",
    "module_gunicorn": "gunicorn",
    "host_gunicorn": "gunicorn",
    "redis_server": "redis",
    "redis_session": "redis",
    "postgres_db": "postgres",
    "postgres_session": "postgres",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, mark in _MARKS_BY_FIXTURE.items():
            if fixture in fixtures:
                item.add_marker(mark)
        # The log database parameter picks PostgreSQL for one of its runs.
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("log_db") == "postgresql":
            item.add_marker("postgres")


@pytest.fixture(scope="session")
def fake_server():
    """The fake upstream over HTTPS (as production talks to the API), signed by the session's test CA."""
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    yield fake_server
    fake_server.reset()


@pytest.fixture(scope="session")
def plain_fake_server():
    """The same fake over plain HTTP, for the few tests that need http://."""
    server = FakeUpstream(tls=False).start()
    yield server
    server.stop()


@pytest.fixture
def plain_fake(plain_fake_server):
    """Point an app at it with `make_app(OPENAI_BASE_URL=plain_fake.url)` (gunicorn_server alike)."""
    plain_fake_server.reset()
    yield plain_fake_server
    plain_fake_server.reset()


def base_env(fake: FakeUpstream, **overrides: str) -> dict[str, str]:
    env = {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "SECURITY_KEY": SECURITY_KEY,
        "ACCESS_TOKEN": ACCESS_TOKEN,
        # Every app and gunicorn the tests start trusts the fake's CA (harmless with a plain fake).
        "OPENAI_PROXY_CA_BUNDLE": fake.ca_path,
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


class ClosingClient(FlaskClient):
    """Reads and closes each response, as a WSGI server does, so completion records are emitted."""

    def open(self, *args, buffered: bool = True, **kwargs):
        return super().open(*args, buffered=buffered, **kwargs)


@pytest.fixture(scope="session")
def empty_log_db(tmp_path_factory) -> Path:
    """A SQLite request log with its schema made and nothing in it, copied for each test that uses the
    default log: making the schema (tables, indexes, one commit each) takes ~12 ms on a disk, per test.
    Tests of making or upgrading a schema use files of their own."""
    from openai_proxy.log import db as logdb
    from openai_proxy.log.sql import open_database

    path = tmp_path_factory.mktemp("log-template") / "openai-proxy.sqlite3"
    db = open_database(str(path), 1000)
    try:
        logdb.create_schema(db)
    finally:
        db.close()
    return path


@pytest.fixture
def make_app(fake, tmp_path, empty_log_db):
    """Build an app against the fake upstream; keyword arguments are environment variables."""
    apps = []
    own_log = tmp_path / "openai-proxy.sqlite3"

    def factory(**env: str):
        # One log database per test, shared by the apps a test builds (like restarts of one server).
        if "OPENAI_PROXY_LOG_DB" not in env and not own_log.exists():
            shutil.copyfile(empty_log_db, own_log)
        env = {"OPENAI_PROXY_LOG_DB": str(own_log), **env}
        values = base_env(fake, OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / f"run{len(apps)}"), **env)
        app = create_app(build_config(values))
        app.testing = True
        app.test_client_class = ClosingClient
        records: list[dict] = []
        app.extensions["openai_proxy"].completion_log.sinks.append(records.append)
        app.records = records  # type: ignore[attr-defined]
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["openai_proxy"].upstream.close()
        app.extensions["openai_proxy"].log_store.close()
        app.extensions["openai_proxy"].gate.close()
        if app.extensions["openai_proxy"].tracing is not None:
            app.extensions["openai_proxy"].tracing.close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def records(app):
    """Completion records emitted by `app`, in order."""
    return app.records


def _gunicorn_factory(fake: FakeUpstream, tmp_path: Path):
    servers: list[GunicornServer] = []

    def start(workers: int = 2, **env: str) -> GunicornServer:
        env = {"OPENAI_PROXY_LOG_DB": str(tmp_path / "openai-proxy.sqlite3"), **env}
        server = GunicornServer(base_env(fake, **env), workers, tmp_path / f"gunicorn{len(servers)}.log")
        servers.append(server)
        return server

    return start, servers


@pytest.fixture
def gunicorn_server(fake, tmp_path):
    """Start gunicorn with `workers` workers and extra environment; stopped after the test."""
    start, servers = _gunicorn_factory(fake, tmp_path)
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def module_gunicorn(fake_server, tmp_path_factory):
    """Like `gunicorn_server`, but one server for a whole test module (tests tell their records apart)."""
    start, servers = _gunicorn_factory(fake_server, tmp_path_factory.mktemp("gunicorn"))
    yield start
    for server in servers:
        server.stop()


def safety_id(name: str = "default", key: str = SECURITY_KEY) -> str:
    """The `safety_identifier` a client gets without OPENAI_PROXY_SAFETY_SECRET: HMAC-SHA256 of its
    name keyed with the SHA-256 of its key."""
    import hashlib
    import hmac

    return hmac.new(hashlib.sha256(key.encode()).digest(), name.encode(), hashlib.sha256).hexdigest()


def body_bytes(obj) -> bytes:
    """JSON exactly in the given key order (Flask's test `json=` sorts keys)."""
    import json

    return json.dumps(obj).encode()


def post_json(client, path: str, obj, **kwargs):
    headers = kwargs.pop("headers", {})
    return client.post(
        path, data=body_bytes(obj), headers={"Content-Type": "application/json", **headers}, **kwargs
    )


def error_of(response) -> dict:
    """The `error` object of a legacy-route error answer, after checking the shape's invariants."""
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["requestId"] == response.headers["X-Proxy-Request-Id"]
    return error
