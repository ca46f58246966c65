"""Named clients: the clients file, authentication with client keys, model allowlists, attribution."""

from __future__ import annotations

import hashlib
import json

import pytest

from openai_proxy.clients import DEFAULT_CLIENT, ClientsFileError, load_clients
from openai_proxy.config import ConfigError, build_config
from tests.conftest import ACCESS_TOKEN, SECURITY_KEY, error_of, post_json
from tests.support.files import write_clients

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ALPHA_KEY = "alpha-client-key-0123456789"
BETA_KEY = "beta-client-key-9876543210"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CLIENTS = f"""\
    # two teams
    [[client]]
    name = "alpha"
    key = "{ALPHA_KEY}"

    [[client]]
    name = "beta.svc-2"
    key_sha256 = "{sha(BETA_KEY)}"
    rpm = 600
    tpm = 100000
    daily_usd = 2.5
    monthly_usd = 40
    models = ["gpt-4o-mini", "text-embedding-3-small"]
"""


def test_file_is_read_with_limits_models_and_hashed_keys(tmp_path):
    book, plain = load_clients(write_clients(tmp_path, CLIENTS), SECURITY_KEY)
    assert book.names() == ["alpha", "beta.svc-2", DEFAULT_CLIENT]
    assert plain == [ALPHA_KEY]
    assert book.authenticate(ALPHA_KEY).name == "alpha"
    beta = book.authenticate(BETA_KEY)
    assert beta.name == "beta.svc-2"
    assert (beta.limits.rpm, beta.limits.tpm, beta.limits.daily_usd, beta.limits.monthly_usd) == (
        600, 100000, 2.5, 40.0)  # fmt: skip
    assert beta.models == {"gpt-4o-mini", "text-embedding-3-small"}
    assert book.authenticate(SECURITY_KEY).name == DEFAULT_CLIENT
    assert not book.get("alpha").limits.any() and beta.limits.any()


def test_wrong_missing_and_unconfigured_keys_are_refused(tmp_path):
    book, _ = load_clients(write_clients(tmp_path, CLIENTS), None)
    for provided, message in ((None, "Missing security_key"), ("", "Missing security_key"),
                              (ALPHA_KEY + "x", "Invalid security_key"), (sha(BETA_KEY), "Invalid security_key")):  # fmt: skip
        with pytest.raises(Exception) as info:
            book.authenticate(provided)
        assert info.value.status == 403 and info.value.message == message
    empty, _ = load_clients(None, None)
    with pytest.raises(Exception) as info:
        empty.authenticate(ALPHA_KEY)
    assert info.value.message == "The proxy has no SECURITY_KEY configured; API routes are disabled"


BAD_FILES = [
    # (file text, expected line, words in the reason)
    ('[[client]]\nname = "a"\nkey = "k1"\nrpm = \n', 4, "Invalid value"),
    ('[[client]]\nname = "a"\nkey = "k1"\nburst = 3\n', 4, "unknown field 'burst'"),
    (
        '[[client]]\nname = "a"\nkey = "k1"\n\n[[client]]\nname = "a"\nkey = "k2"\n',
        6,
        "duplicate client name 'a'",
    ),
    ('[[client]]\nname = "a"\nkey = "k1"\n\n[[client]]\nname = "b"\nkey = "k1"\n', 7, "same key as 'a'"),
    (
        f'[[client]]\nname = "a"\nkey = "k1"\n[[client]]\nname = "b"\nkey_sha256 = "{sha("k1")}"\n',
        6,
        "same key",
    ),
    ('[[client]]\nname = "a"\nkey = "k1"\nkey_sha256 = "00"\n', 1, "exactly one of `key` or `key_sha256`"),
    ('[[client]]\nname = "a"\n', 1, "exactly one of"),
    ('[[client]]\nkey = "k1"\n', 1, "needs a `name`"),
    ('[[client]]\nname = "has space"\nkey = "k1"\n', 2, "needs a `name`"),
    ('[[client]]\nname = ""\nkey = "k1"\n', 2, "needs a `name`"),
    (f'[[client]]\nname = "{"n" * 65}"\nkey = "k1"\n', 2, "needs a `name`"),
    ('[[client]]\nname = 7\nkey = "k1"\n', 2, "needs a `name`"),
    ('[[client]]\nname = "a"\nkey = ""\n', 3, "`key` must be a non-empty string"),
    ('[[client]]\nname = "a"\nkey = " k1"\n', 3, "`key` must be a non-empty string"),
    ('[[client]]\nname = "a"\nkey = 5\n', 3, "`key` must be a non-empty string"),
    ('[[client]]\nname = "a"\nkey_sha256 = "abc"\n', 3, "64 hex digits"),
    (f'[[client]]\nname = "a"\nkey_sha256 = "{"g" * 64}"\n', 3, "64 hex digits"),
    ('[[client]]\nname = "a"\nkey = "k1"\nrpm = 0\n', 4, "`rpm` must be a whole number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nrpm = -5\n', 4, "`rpm` must be a whole number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nrpm = 1.5\n', 4, "`rpm` must be a whole number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nrpm = "10"\n', 4, "`rpm` must be a whole number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nrpm = true\n', 4, "`rpm` must be a whole number"),
    ('[[client]]\nname = "a"\nkey = "k1"\ntpm = 1000000000000000\n', 4, "`tpm` must be a whole number"),
    ('[[client]]\nname = "a"\nkey = "k1"\ndaily_usd = 0\n', 4, "`daily_usd` must be a number"),
    ('[[client]]\nname = "a"\nkey = "k1"\ndaily_usd = -1.0\n', 4, "`daily_usd` must be a number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nmonthly_usd = nan\n', 4, "`monthly_usd` must be a number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nmonthly_usd = inf\n', 4, "`monthly_usd` must be a number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nmonthly_usd = "5"\n', 4, "`monthly_usd` must be a number"),
    ('[[client]]\nname = "a"\nkey = "k1"\nmodels = []\n', 4, "`models` must be a non-empty list"),
    ('[[client]]\nname = "a"\nkey = "k1"\nmodels = "gpt-4o"\n', 4, "`models` must be a non-empty list"),
    ('[[client]]\nname = "a"\nkey = "k1"\nmodels = ["gpt-4o", 3]\n', 4, "`models` must be a non-empty list"),
    ('[[client]]\nname = "a"\nkey = "k1"\nmodels = [" "]\n', 4, "`models` must be a non-empty list"),
    ('title = "x"\n[[client]]\nname = "a"\nkey = "k1"\n', 1, "unknown key 'title'"),
    ('[client]\nname = "a"\nkey = "k1"\n', None, "array of tables"),
    ('[[client]]\nname = "a"\nkey = "k1"\n[[client]]\nname = "a"\nkey = "k2"\n', 5, "duplicate"),
    ('[[client]]\nname = "default"\nkey = "k1"\n', 2, "SECURITY_KEY is the client 'default'"),
    (f'[[client]]\nname = "a"\nkey = "{SECURITY_KEY}"\n', 3, "same key as 'default'"),
]


@pytest.mark.parametrize(("text", "line", "reason"), BAD_FILES)
def test_bad_files_name_the_file_the_line_and_the_reason(tmp_path, text, line, reason):
    path = write_clients(tmp_path, text)
    with pytest.raises(ClientsFileError) as info:
        load_clients(path, SECURITY_KEY)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    assert reason in message


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ClientsFileError, match="cannot read the clients file"):
        load_clients(str(tmp_path / "missing.toml"), None)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[[client]]\nname = "\xe9"\nkey = "k"\n')
    with pytest.raises(ClientsFileError, match="not UTF-8"):
        load_clients(str(bad), None)


def test_a_bad_file_stops_the_app_with_its_message(make_app, tmp_path):
    path = write_clients(tmp_path, '[[client]]\nname = "a"\nkey = "k1"\nrpm = 0\n')
    with pytest.raises(ConfigError, match=r"clients.toml:4: client 'a': `rpm` must be a whole number"):
        make_app(OPENAI_PROXY_CLIENTS_FILE=path)


def test_an_empty_file_leaves_only_default(tmp_path):
    book, _ = load_clients(write_clients(tmp_path, "# nobody yet\n"), SECURITY_KEY)
    assert book.names() == [DEFAULT_CLIENT]


@pytest.fixture
def clients_app(make_app, tmp_path):
    return make_app(OPENAI_PROXY_CLIENTS_FILE=write_clients(tmp_path, CLIENTS))


def test_every_way_of_sending_the_key_works_for_client_keys(clients_app, fake):
    client = clients_app.test_client()
    attempts = [
        post_json(client, "/openai", {**CHAT, "security_key": ALPHA_KEY}),
        post_json(client, "/openai", CHAT, headers={"Authorization": f"Bearer {ALPHA_KEY}"}),
        post_json(client, "/openai", CHAT, headers={"X-Security-Key": ALPHA_KEY}),
        post_json(client, f"/openai?security_key={ALPHA_KEY}", CHAT),
        post_json(client, "/openai2", {"model": "gpt-4o-mini", "input": "hi"}, headers={"X-Security-Key": ALPHA_KEY}),
        client.get(f"/openai2/resp_fake123?security_key={ALPHA_KEY}"),  # its own response (contract §14)
        client.post("/openai/audio/transcriptions", data={"security_key": ALPHA_KEY, "file": (__import__("io").BytesIO(b"RIFF0000WAVE"), "a.wav")}),
        post_json(client, "/v1/chat/completions", CHAT, headers={"Authorization": f"Bearer {ALPHA_KEY}"}),
    ]  # fmt: skip
    assert [r.status_code for r in attempts] == [200] * len(attempts), [r.get_data()[:200] for r in attempts]
    assert [rec["client"] for rec in clients_app.records] == ["alpha"] * len(attempts)
    # The client key is the proxy's business: upstream only ever sees the upstream key.
    assert all(ALPHA_KEY not in str(req.headers) and ALPHA_KEY not in req.body.decode("latin-1")
               for req in fake.requests)  # fmt: skip


def test_security_key_is_the_default_client(clients_app):
    r = post_json(clients_app.test_client(), "/openai", {**CHAT, "security_key": SECURITY_KEY})
    assert r.status_code == 200
    assert clients_app.records[-1]["client"] == DEFAULT_CLIENT


def test_unknown_keys_are_refused_as_before(clients_app, fake):
    client = clients_app.test_client()
    r = post_json(client, "/openai", {**CHAT, "security_key": "nope"})
    assert r.status_code == 403 and error_of(r)["message"] == "Invalid security_key"
    r = post_json(client, "/v1/chat/completions", CHAT, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "OPENAI_PROXY_UNAUTHORIZED"
    assert fake.requests == []
    assert [rec["client"] for rec in clients_app.records] == [None, None]


def test_a_client_may_only_use_its_models(clients_app, fake):
    client = clients_app.test_client()
    beta = {"Authorization": f"Bearer {BETA_KEY}"}
    r = post_json(client, "/openai", {**CHAT, "model": "gpt-4o"}, headers=beta)
    assert r.status_code == 403
    assert error_of(r)["message"] == "Client 'beta.svc-2' may not use model 'gpt-4o'"
    r = post_json(client, "/v1/chat/completions", {**CHAT, "model": "o3"}, headers=beta)
    assert r.status_code == 403 and r.get_json()["error"]["message"].startswith(
        "Client 'beta.svc-2' may not use model 'o3'")  # fmt: skip
    # /chatgpt's default model (DEFAULT_MODEL) and /embeddings' default count as the model asked for.
    r = post_json(client, "/embeddings", {"input": "x"}, headers=beta)
    assert r.status_code == 403 and "text-embedding-3-large" in error_of(r)["message"]
    assert fake.requests == []
    r = post_json(client, "/openai", CHAT, headers=beta)
    assert r.status_code == 200 and len(fake.requests) == 1
    # A client without a list may use any model.
    r = post_json(client, "/openai", {**CHAT, "model": "gpt-4o"}, headers={"X-Security-Key": ALPHA_KEY})
    assert r.status_code == 200


def test_a_v1_upload_is_judged_by_the_model_in_its_form(clients_app, fake):
    """The body is received before admission, so the allowlist sees the model of a `/v1` transcription."""
    body = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b\r\n' \
           b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--b--\r\n'  # fmt: skip
    r = clients_app.test_client().post(
        "/v1/audio/transcriptions", data=body,
        headers={"Authorization": f"Bearer {BETA_KEY}", "Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    assert r.status_code == 403 and r.get_json()["error"]["message"].startswith(
        "Client 'beta.svc-2' may not use model 'whisper-1'")  # fmt: skip
    assert fake.requests == []


def test_records_name_the_client_never_its_key(clients_app, capsys):
    client = clients_app.test_client()
    post_json(client, "/openai", {**CHAT, "security_key": ALPHA_KEY})
    post_json(client, "/openai", {**CHAT, "security_key": ALPHA_KEY + "-wrong"})
    out = capsys.readouterr().out
    assert '"client":"alpha"' in out.replace(" ", "")
    assert ALPHA_KEY not in out


# ---- safety_identifier (the HMAC itself, per client and route: test_client_boundary.py) -------------


def test_safety_identifier_is_keyed_by_the_configured_secret_or_turned_off(make_app, fake):
    import hmac

    secret = "a-long-random-safety-secret"
    app = make_app(OPENAI_PROXY_SAFETY_SECRET=secret)
    client = app.test_client()
    auth = {"X-Security-Key": SECURITY_KEY}
    assert post_json(client, "/openai", CHAT, headers=auth).status_code == 200
    expected = hmac.new(secret.encode(), b"default", hashlib.sha256).hexdigest()
    assert fake.last("/v1/chat/completions").json["safety_identifier"] == expected
    runtime = client.get("/debug/runtime", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"}).get_json()
    assert runtime["config"]["safety_secret"] == "set" and secret not in json.dumps(runtime)

    off = make_app(OPENAI_PROXY_SAFETY_IDENTIFIER="off").test_client()
    assert post_json(off, "/openai", CHAT, headers=auth).status_code == 200
    assert (
        post_json(
            off,
            "/v1/responses",
            {"model": "m", "input": "x"},
            headers={"Authorization": f"Bearer {SECURITY_KEY}"},
        ).status_code
        == 200
    )
    assert "safety_identifier" not in fake.last("/v1/chat/completions").json
    assert fake.last("/v1/responses").body == b'{"model": "m", "input": "x"}'  # byte for byte again


@pytest.mark.parametrize(
    ("raw", "on"), [("off", False), ("OFF", False), ("0", False), ("on", True), ("yes", True)]
)
def test_safety_identifier_switch(raw, on):
    config = build_config({"OPENAI_PROXY_SAFETY_IDENTIFIER": raw})
    assert config.safety_identifier is on
    assert not any("SAFETY" in w for w in config.warnings)
    bad = build_config({"OPENAI_PROXY_SAFETY_IDENTIFIER": "maybe"})
    assert bad.safety_identifier is True
    assert "OPENAI_PROXY_SAFETY_IDENTIFIER='maybe' is not on or off; using on" in bad.warnings
