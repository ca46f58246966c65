"""OPENAI_PROXY_LOG_DB (a SQLite path or a postgresql:// URL), OPENAI_PROXY_HOST_NAME and
OPENAI_PROXY_LOG_MAX_QUEUE: accepted values, refusals at start that name the variable and never show a
password, and the password kept off pages and logs."""

from __future__ import annotations

import logging
import socket

import pytest

from openai_proxy.config import ConfigError, build_config
from openai_proxy.extension import RedactingFormatter, configured_secrets
from openai_proxy.log.url import LIBPQ_PARAMS
from tests.support.logpage import AUTH


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("postgresql://proxy:s3cret@db.internal:5432/proxy_log", None),
        ("postgres://db/log", None),
        ("PostgreSQL://db/log", "postgresql://db/log"),  # libpq only knows the lowercase prefix
        ("postgresql:///log?host=/var/run/postgresql", None),  # a Unix socket
        ("postgresql://db1:5432,db2:5433/log?target_session_attrs=read-write", None),
        ("postgresql://[::1]:5432/log?sslmode=verify-full&connect_timeout=5", None),
        ("postgresql://u@db/log?options=-c%20search_path%3Dproxy&application_name=proxy-eu", None),
        ("postgresql://u:p%40ss@db/log", None),
    ],
)
def test_postgresql_urls_are_accepted(raw, kept):
    assert build_config({"OPENAI_PROXY_LOG_DB": raw}).log_db == (kept or raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("postgresql://proxy:hunter2@db:99999/log", "OPENAI_PROXY_LOG_DB='postgresql://db:99999/log': "
         "'99999' is not a port number (1 to 65535)"),
        ("postgresql://db:abc/log", "OPENAI_PROXY_LOG_DB='postgresql://db:abc/log': 'abc' is not a port number"),
        ("postgresql://db1:5432,db2:x/log", "'x' is not a port number"),
        ("postgresql://[::1]5432/log", "'5432' is not a port number"),
        ("postgresql://db:0/log", "'0' is not a port number"),
        ("postgresql://proxy:hunter2@db/log#main", "OPENAI_PROXY_LOG_DB='postgresql://db/log#main': "
         "a PostgreSQL URL has no #fragment"),
        ("postgresql://db/log?sslmod=require&password=hunter2", "OPENAI_PROXY_LOG_DB='postgresql://db/log?"
         "sslmod=require': unknown connection parameter(s): sslmod"),
        ("postgresql://db/log?sslmode", "its query is not name=value pairs joined by &"),
        ("postgresql://db/log?a=1&&b=2", "its query is not name=value pairs joined by &"),
        ("postgresql+psycopg://proxy:hunter2@db/log", "OPENAI_PROXY_LOG_DB='postgresql+psycopg://db/log': "
         "postgresql+psycopg:// names a driver (SQLAlchemy's form); use libpq's own "
         "postgresql://user:password@host:5432/dbname"),
        ("mysql://root:hunter2@db/log", "OPENAI_PROXY_LOG_DB='mysql://db/log': it is a mysql:// URL, not a file "
         "path; use a SQLite file path such as var/openai-proxy.sqlite3 or a "
         "postgresql://user:password@host:5432/dbname URL"),
    ],
)  # fmt: skip
def test_bad_log_db_urls_stop_the_server_naming_the_variable(raw, message):
    with pytest.raises(ConfigError) as exc:
        build_config({"OPENAI_PROXY_LOG_DB": raw})
    assert message in str(exc.value)
    assert "hunter2" not in str(exc.value)


def test_every_parameter_the_installed_libpq_takes_is_accepted():
    psycopg = pytest.importorskip("psycopg")
    keywords = {d.keyword.decode() for d in psycopg.pq.Conninfo.get_defaults()}
    assert keywords <= LIBPQ_PARAMS, sorted(keywords - LIBPQ_PARAMS)


def test_log_db_passwords_are_secrets_and_never_shown(make_app, fake, caplog):
    url = "postgresql://proxy:url-pass-0123456789@127.0.0.1:9/log?sslpassword=key-pass-0123456789&sslmode=disable"
    config = build_config({"OPENAI_PROXY_LOG_DB": url})
    assert config.public_view()["log_db"] == "postgresql://127.0.0.1:9/log?sslmode=disable"
    secrets = configured_secrets(config)
    assert {"url-pass-0123456789", "key-pass-0123456789"} <= set(secrets.values())
    client = make_app(OPENAI_PROXY_LOG_DB=url).test_client()
    caplog.set_level(logging.WARNING)
    for path in ("/debug/runtime", "/health", "/log"):
        text = client.get(path, headers=AUTH).get_data(as_text=True)
        assert ("postgresql://127.0.0.1:9/log" in text) == (path != "/log"), path
        assert "url-pass" not in text and "key-pass" not in text, path
    logging.getLogger("openai_proxy.test").warning("connecting with url-pass-0123456789")
    logged = "\n".join(RedactingFormatter("%(message)s").format(r) for r in caplog.records)
    assert "url-pass-0123456789" not in logged and "***6789" in logged


def test_host_name_defaults_to_the_machines_and_is_checked():
    assert build_config({}).host_name == socket.gethostname()
    assert (
        build_config({"OPENAI_PROXY_HOST_NAME": " eu-west-1a/web-3.prod "}).host_name
        == "eu-west-1a/web-3.prod"
    )
    for bad in ("two words", "x" * 201, "tab\there", "héte", "<script>"):
        with pytest.raises(ConfigError) as exc:
            build_config({"OPENAI_PROXY_HOST_NAME": bad})
        assert str(exc.value).startswith(f"OPENAI_PROXY_HOST_NAME={bad[:60]!r} must be 1 to 200 letters")


def test_log_max_queue_is_a_positive_integer():
    assert build_config({}).log_max_queue == 10000
    assert build_config({"OPENAI_PROXY_LOG_MAX_QUEUE": "50"}).log_max_queue == 50
    config = build_config({"OPENAI_PROXY_LOG_MAX_QUEUE": "0"})
    assert config.log_max_queue == 10000
    assert "OPENAI_PROXY_LOG_MAX_QUEUE='0' is not an integer > 0; using the default 10000" in config.warnings
