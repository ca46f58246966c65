"""Secrets are masked by value, not only by shape: the configured keys and the request's own override
key, however short and whatever their prefix, on every sink (client answers, completion records on
stdout and in the SQLite file, the log pages, log lines)."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
import requests

from openai_proxy.extension import RedactingFormatter
from openai_proxy.redact import SECRETS, end_of_request, mask_in_this_request, redact_text
from tests.conftest import ACCESS_TOKEN, SECURITY_KEY, body_bytes, error_of, post_json
from tests.support.fake_upstream import error
from tests.support.logpage import rows

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MASKED_ECHO = "Incorrect API key provided: {}."


@pytest.fixture
def registry():
    """SECRETS with a test group that is dropped afterwards."""
    yield lambda *values: SECRETS.replace("test", values)
    SECRETS.replace("test", ())
    end_of_request()


def sinks(app, client, capfd, tmp_path: Path, access_token: str = ACCESS_TOKEN) -> dict[str, str]:
    """Everything that left the process after the requests made so far, by sink."""
    st = app.extensions["openai_proxy"]
    assert st.log_store.flush()
    db = tmp_path / "openai-proxy.sqlite3"
    stored = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    page = client.get("/log_errors", headers={"Authorization": f"Bearer {access_token}"})
    assert page.status_code == 200
    out = capfd.readouterr()
    return {
        "records": json.dumps(app.records),
        "sqlite": stored.decode("utf-8", "replace"),
        "/log_errors": page.get_data(as_text=True),
        "stdout+stderr": out.out + out.err,
    }


def assert_nowhere(secret: str, where: dict[str, str]) -> None:
    for name, text in where.items():
        assert secret not in text, f"{secret!r} in {name}"


def v1_chat(client, key: str = SECURITY_KEY):
    return client.post(
        "/v1/chat/completions",
        data=body_bytes(CHAT),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


@pytest.mark.parametrize(
    ("key", "masked"),
    [("sk-abc", "***"), ("abcdef123456", "***3456")],
    ids=["6-char sk- key", "unprefixed key"],
)
def test_configured_upstream_key_echoed_by_upstream_is_masked_on_every_sink(
    make_app, fake, capfd, tmp_path, key, masked
):
    app = make_app(OPENAI_API_KEY=key)
    client = app.test_client()
    capfd.readouterr()
    fake.push("POST", "/v1/chat/completions", error(401, MASKED_ECHO.format(key)))
    legacy = post_json(client, "/openai", {"security_key": SECURITY_KEY, **CHAT})
    fake.push("POST", "/v1/chat/completions", error(401, MASKED_ECHO.format(key)))
    v1 = v1_chat(client)

    assert fake.last("/v1/chat/completions").headers["authorization"] == f"Bearer {key}"
    assert legacy.status_code == 401
    assert error_of(legacy)["message"] == "401 " + MASKED_ECHO.format(masked)
    assert v1.status_code == 401
    assert v1.get_json()["error"]["message"] == MASKED_ECHO.format(masked)
    assert [r["error"]["message"] for r in app.records] == [
        "401 " + MASKED_ECHO.format(masked),
        MASKED_ECHO.format(masked),
    ]
    where = sinks(app, client, capfd, tmp_path)
    assert MASKED_ECHO.format(masked) in where["sqlite"]
    assert MASKED_ECHO.format(masked) in where["/log_errors"]
    assert where["stdout+stderr"].count('"event":"completion"') == 2
    assert_nowhere(key, {"legacy answer": legacy.get_data(as_text=True), "/v1 answer": v1.get_data(as_text=True),
                         **where})  # fmt: skip


def _override_by_body(client, key):
    return post_json(client, "/openai", {"security_key": SECURITY_KEY, "openai_api_key": key, **CHAT})


def _override_by_query(client, key):
    return client.get(f"/openai2/resp_1?security_key={SECURITY_KEY}&openai_api_key={key}")


def _override_by_form(client, key):
    form = {
        "security_key": SECURITY_KEY,
        "openai_api_key": key,
        "file": (io.BytesIO(b"RIFF0000WAVE"), "a.wav"),
    }
    return client.post("/openai/audio/transcriptions", data=form, content_type="multipart/form-data")


OVERRIDE_SOURCES = {
    "body": ("POST", "/v1/chat/completions", _override_by_body),
    "query": ("GET", "/v1/responses/resp_1", _override_by_query),
    "form": ("POST", "/v1/audio/transcriptions", _override_by_form),
}


@pytest.mark.parametrize("source", OVERRIDE_SOURCES)
@pytest.mark.parametrize(("key", "masked"), [("abc123", "***"), ("override0123456789", "***6789")])
def test_override_key_without_prefix_is_masked_on_every_sink(
    make_app, fake, capfd, tmp_path, source, key, masked
):
    app = make_app()
    client = app.test_client()
    capfd.readouterr()
    method, path, send = OVERRIDE_SOURCES[source]
    fake.push(method, path, error(401, MASKED_ECHO.format(key)))
    answer = send(client, key)

    assert fake.last(path).headers["authorization"] == f"Bearer {key}"
    assert answer.status_code == 401
    assert error_of(answer)["message"] == "401 " + MASKED_ECHO.format(masked)
    assert app.records[-1]["error"]["message"] == "401 " + MASKED_ECHO.format(masked)
    where = sinks(app, client, capfd, tmp_path)
    assert MASKED_ECHO.format(masked) in where["sqlite"]
    assert MASKED_ECHO.format(masked) in where["/log_errors"]
    assert_nowhere(key, {"answer": answer.get_data(as_text=True), **where})


def test_override_key_is_masked_for_its_own_request_only(make_app, fake):
    app = make_app()
    client = app.test_client()
    fake.push("POST", "/v1/chat/completions", error(401, MASKED_ECHO.format("abc123")))
    post_json(client, "/openai", {"security_key": SECURITY_KEY, "openai_api_key": "abc123", **CHAT})
    # Its record is out: the next request (same greenlet, like a keep-alive connection) starts clean.
    assert redact_text("abc123") == "abc123"
    fake.push("POST", "/v1/chat/completions", error(400, "model abc123 does not exist"))
    r = post_json(client, "/openai", {"security_key": SECURITY_KEY, **CHAT})
    assert error_of(r)["message"] == "400 model abc123 does not exist"


def test_security_key_and_access_token_echoed_by_upstream_are_masked(make_app, fake, capfd, tmp_path):
    security_key, access_token = "hunter2-sec", "opsTok9"  # 11 and 7 characters, no known prefix
    app = make_app(SECURITY_KEY=security_key, ACCESS_TOKEN=access_token)
    client = app.test_client()
    capfd.readouterr()
    echo = f"Incorrect API key provided: {security_key}. Token {access_token} is not a key either."
    masked = "Incorrect API key provided: ***. Token *** is not a key either."
    fake.push("POST", "/v1/chat/completions", error(401, echo))
    legacy = post_json(client, "/openai", {"security_key": security_key, **CHAT})
    fake.push("POST", "/v1/chat/completions", error(401, echo))
    v1 = v1_chat(client, security_key)

    assert error_of(legacy)["message"] == f"401 {masked}"
    assert v1.get_json()["error"]["message"] == masked
    where = sinks(app, client, capfd, tmp_path, access_token)
    assert masked in where["sqlite"] and masked in where["/log_errors"]
    for secret in (security_key, access_token):
        assert_nowhere(
            secret, {"legacy": legacy.get_data(as_text=True), "v1": v1.get_data(as_text=True), **where}
        )


def test_log_lines_mask_configured_and_request_secrets(make_app, capfd):
    make_app(OPENAI_API_KEY="sk-abc", SECURITY_KEY="unprefixed-security-key")
    handler = (
        logging.StreamHandler()
    )  # stderr, as in production (`openai_proxy.extension._configure_logging`)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("openai_proxy.test_secrets")
    logger.addHandler(handler)
    try:
        logger.warning(
            "upstream said: Incorrect API key provided: sk-abc. (client sent unprefixed-security-key)"
        )
        mask_in_this_request("client-override-key")
        try:
            logger.error("failed with client-override-key")
        finally:
            end_of_request()
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    assert "WARNING upstream said: Incorrect API key provided: ***. (client sent ***-key)" in err
    assert "ERROR failed with ***-key" in err
    for secret in ("sk-abc", "unprefixed-security-key", "client-override-key"):
        assert secret not in err


@pytest.mark.gunicorn
def test_under_gunicorn_no_sink_shows_a_short_key_or_override(gunicorn_server, fake, tmp_path):
    key, override = "sk-abc", "abc123"
    server = gunicorn_server(workers=1, OPENAI_API_KEY=key)
    fake.push("POST", "/v1/chat/completions", error(401, MASKED_ECHO.format(key)))
    fake.push("POST", "/v1/chat/completions", error(401, MASKED_ECHO.format(override)))
    with requests.Session() as http:  # one keep-alive connection: one greenlet serves both requests
        answers = [
            http.post(server.url + "/openai", json={"security_key": SECURITY_KEY, **CHAT}, timeout=10),
            http.post(
                server.url + "/openai",
                json={"security_key": SECURITY_KEY, "openai_api_key": override, **CHAT},
                timeout=10,
            ),
        ]
    for r in answers:
        assert r.status_code == 401 and r.json()["error"]["message"] == "401 " + MASKED_ECHO.format("***")
    auth = {"Authorization": f"Bearer {ACCESS_TOKEN}", "Connection": "close"}
    deadline = time.monotonic() + 10  # the worker writes its records in batches
    while True:
        page = requests.get(server.url + "/log_errors", headers=auth, timeout=10)
        if len(rows(page.text)) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rows(page.text)) == 2 and MASKED_ECHO.format("***") in page.text
    server.stop()  # flushes the log store, and the log file is complete
    log = server.log_path.read_text(errors="replace")
    assert log.count(MASKED_ECHO.format("***")) == 2  # the completion records' stdout lines
    db = tmp_path / "openai-proxy.sqlite3"
    stored = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    assert MASKED_ECHO.format("***").encode() in stored
    for text in (*(r.text for r in answers), page.text, log, stored.decode("utf-8", "replace")):
        assert key not in text and override not in text


# ---- the rules, on redact_text directly ----------------------------------------------------------


def test_short_values_are_masked_only_as_whole_words(registry):
    registry("abc", "x")
    assert redact_text("key abc. or (abc)") == "key ***. or (***)"
    assert redact_text("abcdef xabc abc_1 resp_abc abc-2") == "abcdef xabc abc_1 resp_abc abc-2"
    # A one-character secret cannot turn every text into ***: only where it stands alone.
    assert redact_text("exact max x extra") == "exact max *** extra"


def test_long_values_are_masked_anywhere_and_show_a_tail_only_from_12_chars(registry):
    registry("abcdefgh", "0123456789abcdef")
    assert redact_text("id=zzabcdefghzz") == "id=zz***zz"
    assert redact_text("k:0123456789abcdef!") == "k:***cdef!"


def test_a_secret_inside_another_is_masked_with_it(registry):
    registry("abcdefgh", "sk-abcdefgh-and-more-1234")
    assert redact_text("sk-abcdefgh-and-more-1234 / abcdefgh") == "***1234 / ***"


def test_json_escaped_forms_are_masked_in_raw_bodies(registry):
    secret = 'pa"ss\\wörd-1234567'
    registry(secret)
    raw = json.dumps({"error": {"message": f"bad key {secret}"}})
    assert secret not in json.loads(redact_text(raw))["error"]["message"]
    assert json.loads(redact_text(raw)) == {"error": {"message": "bad key ***"}}
    assert json.loads(redact_text(json.dumps(secret, ensure_ascii=False))) == "***"


def test_request_secrets_merge_with_configured_ones(registry):
    registry("configured-secret-1")
    mask_in_this_request("req-key")
    assert redact_text("configured-secret-1 req-key") == "***et-1 ***"
    end_of_request()
    assert redact_text("configured-secret-1 req-key") == "***et-1 req-key"
