"""Upstream keys in the clients file (`[[upstream_key]]`), and clients restricted to named keys."""

from __future__ import annotations

import pytest

from openai_proxy.clients import ClientsFileError, load_clients
from openai_proxy.config import ConfigError
from openai_proxy.keys.specs import key_spec
from tests.conftest import SECURITY_KEY, UPSTREAM_KEY, post_json
from tests.support.files import write_clients
from tests.test_key_pool import CHAT_PATH, KEY_A, KEY_B, KEY_C, PAGES, health_keys

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
TEAM_KEY = "team-client-key-0123456789"

FILE = f"""\
    [[upstream_key]]
    name = "team-a"
    key = "{KEY_A}"
    weight = 2

    [[upstream_key]]
    name = "team-b"
    key = "{KEY_B}"
    models = ["gpt-4o-mini"]

    [[client]]
    name = "team"
    key = "{TEAM_KEY}"
    keys = ["team-b"]
"""


def test_file_keys_join_the_pool_with_openai_api_key(tmp_path):
    book, plain = load_clients(write_clients(tmp_path, FILE), SECURITY_KEY, (), UPSTREAM_KEY)
    assert [(k.name, k.weight, k.models) for k in book.upstream_keys] == [
        (f"key-{UPSTREAM_KEY[-4:]}", 1, None), ("team-a", 2, None), ("team-b", 1, frozenset({"gpt-4o-mini"}))]  # fmt: skip
    assert set(plain) == {TEAM_KEY, KEY_A, KEY_B}  # every secret of the file is masked by value
    assert book.get("team").keys == {"team-b"} and book.get("default").keys is None


def test_file_keys_come_after_the_environments(tmp_path):
    env = (key_spec(KEY_C, "gamma", where="OPENAI_API_KEYS entry 1"),)
    book, _ = load_clients(write_clients(tmp_path, FILE), SECURITY_KEY, env, UPSTREAM_KEY)
    assert [k.name for k in book.upstream_keys] == ["gamma", "team-a", "team-b"]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('[[upstream_key]]\nname = "a"\nkey = "sk-aaaa1111"\ncolour = 1\n', 4, "unknown field 'colour'"),
        ('[[upstream_key]]\nname = "a"\n', 1, "needs a `key` string"),
        ('[[upstream_key]]\nname = "a"\nkey = "sk-aaaa1111"\nweight = 0\n', 1, "weight of 'a' must be an integer from 1 to 100"),
        ('[[upstream_key]]\nname = "a b"\nkey = "sk-aaaa1111"\n', 1, "is not 1 to 64 of"),
        ('[[upstream_key]]\nname = "a"\nkey = "sk-aaaa1111"\nmodels = "x"\n', 4, "`models` must be a non-empty list"),
        ('[[upstream_key]]\nname = "a"\nkey = "sk-aaaa1111"\n[[upstream_key]]\nname = "a"\nkey = "sk-bbbb2222"\n', 4, "is used twice"),
        ('[[upstream_key]]\nname = "a"\nkey = "sk-aaaa1111"\n[[upstream_key]]\nname = "b"\nkey = "sk-aaaa1111"\n', 4, "already listed as 'a'"),
        ('[[client]]\nname = "c"\nkey = "k1"\nkeys = ["nope"]\n', 4, "no upstream key is named 'nope'"),
        ('[[client]]\nname = "c"\nkey = "k1"\nkeys = []\n', 4, "`keys` must be a non-empty list"),
        ('[upstream_key]\nname = "a"\n', None, "array of tables: [[upstream_key]]"),
    ],
)  # fmt: skip
def test_bad_upstream_keys_name_the_line(tmp_path, text, line, reason):
    path = write_clients(tmp_path, text)
    with pytest.raises(ClientsFileError) as info:
        load_clients(path, SECURITY_KEY, (), UPSTREAM_KEY)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    assert reason in message
    assert "sk-aaaa1111" not in message and "sk-bbbb2222" not in message


def test_a_client_restricted_to_keys_only_ever_uses_them(make_app, fake, tmp_path):
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=write_clients(tmp_path, FILE), **PAGES)
    client = app.test_client()
    for _ in range(6):
        assert post_json(client, "/openai", CHAT, headers={"X-Security-Key": TEAM_KEY}).status_code == 200
        assert (
            post_json(client, CHAT_PATH, CHAT, headers={"Authorization": f"Bearer {TEAM_KEY}"}).status_code
            == 200
        )
    assert set(fake.keys(CHAT_PATH)) == {KEY_B}
    assert {a["key"] for rec in app.records for a in rec["attempts"]} == {"team-b"}
    fake.reset()
    # The default client may use the whole pool: OPENAI_API_KEY and both file keys.
    for _ in range(8):
        assert post_json(client, "/openai", CHAT, headers={"X-Security-Key": SECURITY_KEY}).status_code == 200
    assert set(fake.keys(CHAT_PATH)) == {UPSTREAM_KEY, KEY_A, KEY_B}
    keys = health_keys(client)
    assert {name: (k["last4"], k["weight"]) for name, k in keys.items() if name.startswith("team")} == {
        "team-a": (KEY_A[-4:], 2), "team-b": (KEY_B[-4:], 1)}  # fmt: skip


def test_a_restricted_client_whose_keys_rest_gets_429_not_another_key(make_app, fake, tmp_path):
    from tests.support.fake_upstream import error

    app = make_app(OPENAI_PROXY_CLIENTS_FILE=write_clients(tmp_path, FILE), **PAGES)
    client = app.test_client()
    fake.push("POST", CHAT_PATH, error(429, "slow down", headers={"Retry-After": "30"}), key=KEY_B)
    r = post_json(client, "/openai", CHAT, headers={"X-Security-Key": TEAM_KEY})
    assert r.status_code == 429
    assert set(fake.keys(CHAT_PATH)) == {KEY_B}  # never failed over to a key the client may not use
    r = post_json(client, "/openai", CHAT, headers={"X-Security-Key": TEAM_KEY})
    assert r.status_code == 429 and r.get_json()["error"]["code"] == "OPENAI_PROXY_UPSTREAM_KEYS_RESTING"
    assert len(fake.keys(CHAT_PATH)) == 1


def test_a_bad_upstream_key_stops_the_app(make_app, tmp_path):
    path = write_clients(tmp_path, '[[upstream_key]]\nname = "a"\nkey = "x"\n')
    with pytest.raises(ConfigError, match=r"clients.toml:1: a key is at least 4 characters long"):
        make_app(OPENAI_PROXY_CLIENTS_FILE=path)
