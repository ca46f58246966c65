"""Mounting in a host's Flask app (contract §15): `OpenAIProxy(app, url_prefix="/ai")` or `init_app`,
settings from `app.config`, everything under the prefix, the host's own routes, handlers, CORS and
limits untouched; and a host package named `app` served by its own `gunicorn -k gevent -w 2`."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from flask import Flask, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from openai_proxy import OpenAIProxy, create_app
from openai_proxy.config import build_config
from tests.conftest import ACCESS_TOKEN, SECURITY_KEY, UPSTREAM_KEY, ClosingClient, base_env, free_port
from tests.support import fake_upstream as fu

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def host_app(tmp_path, fake, **config) -> Flask:
    """A host app with its own route, 404 handler and body limit, and the proxy under /ai."""
    app = Flask("host")
    app.config["MAX_CONTENT_LENGTH"] = 1000
    app.config.update(base_env(fake))
    app.config.update(
        {
            "OPENAI_PROXY_LOG_DB": str(tmp_path / "log.sqlite3"),
            "OPENAI_PROXY_RUNTIME_DIR": str(tmp_path / "run"),
            **config,
        }
    )

    @app.get("/")
    def home():
        return "host home"

    @app.post("/echo")
    def echo():
        return jsonify(size=len(request.get_data()))

    @app.errorhandler(404)
    def not_found(err):
        return "host 404", 404

    return app


@pytest.fixture
def mounted(tmp_path, fake):
    apps = []

    def make(**config):
        app = host_app(tmp_path / f"h{len(apps)}", fake, **config)
        OpenAIProxy(app, url_prefix="/ai")
        app.testing = True
        app.test_client_class = ClosingClient
        apps.append(app)
        return app

    yield make
    for app in apps:
        st = app.extensions["openai_proxy"]
        st.upstream.close()
        st.log_store.close()
        st.gate.close()


def test_the_api_answers_under_the_prefix_and_the_host_keeps_its_own_routes(mounted, fake):
    app = mounted()
    client = app.test_client()
    answer = client.post("/ai/openai", json={**CHAT, "security_key": SECURITY_KEY})
    assert answer.status_code == 200
    assert answer.get_json()["choices"][0]["message"]["content"]
    assert fake.last("/v1/chat/completions", "POST").json["model"] == "gpt-4o-mini"
    assert answer.headers["X-Proxy-Request-Id"]
    assert client.get("/").get_data(as_text=True) == "host home"
    # Unknown paths, even under the prefix, are the host's to answer.
    assert client.get("/nope").get_data(as_text=True) == "host 404"
    assert client.get("/ai/nope").get_data(as_text=True) == "host 404"
    # The proxy did not add its request ids or CORS headers to the host's answers.
    host = client.get("/")
    assert "X-Proxy-Request-Id" not in host.headers
    assert "Access-Control-Allow-Origin" not in host.headers


def test_v1_under_the_prefix_with_the_official_sdk_shape(mounted):
    app = mounted()
    client = app.test_client()
    answer = client.post(
        "/ai/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {SECURITY_KEY}"}
    )
    assert answer.status_code == 200
    assert answer.get_json()["object"] == "chat.completion"
    refused = client.post("/ai/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert set(refused.get_json()["error"]) == {"message", "type", "param", "code"}


def test_records_name_the_route_without_the_prefix(mounted):
    app = mounted()
    records: list[dict] = []
    app.extensions["openai_proxy"].completion_log.sinks.append(records.append)
    app.test_client().post("/ai/openai", json={**CHAT, "security_key": SECURITY_KEY})
    assert [r["endpoint"] for r in records] == ["/openai"]


def test_settings_come_from_app_config_before_the_environment(mounted, monkeypatch):
    monkeypatch.setenv("OPENAI_PROXY_MAX_PARALLEL_REQUESTS", "5")
    monkeypatch.setenv("DEFAULT_MODEL", "from-env")
    app = mounted(OPENAI_PROXY_MAX_PARALLEL_REQUESTS=3, DEFAULT_MODEL=None)
    config = app.extensions["openai_proxy"].config
    assert config.max_parallel_requests == 3  # app.config wins
    assert config.default_model == "from-env"  # None in app.config: the environment's


def test_the_hosts_body_limit_and_error_handlers_stay_the_hosts(mounted, fake):
    app = mounted()
    client = app.test_client()
    assert app.config["MAX_CONTENT_LENGTH"] == 1000
    assert client.post("/echo", data=b"x" * 2000).status_code == 413  # the host's own limit
    big = {**CHAT, "security_key": SECURITY_KEY, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert client.post("/ai/openai", json=big).status_code == 200  # the proxy's own, larger limit


def test_sign_in_redirects_and_links_stay_under_the_prefix(mounted):
    app = mounted()
    client = app.test_client()
    page = client.get("/ai/log", headers={"Accept": "text/html"})
    assert page.status_code == 401
    assert 'action="/ai/signin"' in page.get_data(as_text=True)
    assert 'name="next" value="/ai/log"' in page.get_data(as_text=True)
    signed = client.post("/ai/signin", data={"access_token": ACCESS_TOKEN, "next": "/ai/log_errors?page=2"})
    assert (signed.status_code, signed.headers["Location"]) == (303, "/ai/log_errors?page=2")
    # A next outside the proxy's pages goes to the log page, under the prefix.
    other = client.post("/ai/signin", data={"access_token": ACCESS_TOKEN, "next": "/log"})
    assert other.headers["Location"] == "/ai/log"
    log = client.get("/ai/log", headers={"Accept": "text/html"})
    assert log.status_code == 200
    html = log.get_data(as_text=True)
    assert 'href="/ai/log_errors"' in html and 'action="/ai/signout"' in html
    assert client.post("/ai/signout").headers["Location"] == "/ai/signin"
    assert 'href="/ai/log"' in client.get("/ai/").get_data(as_text=True)


def test_init_app_later_and_twice_is_refused(tmp_path, fake):
    app = host_app(tmp_path, fake)
    proxy = OpenAIProxy(url_prefix="ai/")
    st = proxy.init_app(app)
    try:
        assert app.extensions["openai_proxy"] is st and st.url_prefix == "/ai"
        with pytest.raises(RuntimeError, match="already installed"):
            proxy.init_app(app)
    finally:
        st.upstream.close()
        st.log_store.close()
        st.gate.close()


@pytest.mark.parametrize("prefix", ["/a b/<x>", "/ai?x", "/ai//x", "/%61i"])
def test_a_prefix_that_is_not_a_plain_path_is_refused(tmp_path, fake, prefix):
    with pytest.raises(ValueError, match="must be a plain path"):
        OpenAIProxy(host_app(tmp_path, fake), url_prefix=prefix)


def test_the_whole_app_under_a_dispatcher_mount_keeps_its_prefix_in_redirects(fake, tmp_path):
    proxy = create_app(build_config(base_env(fake, OPENAI_PROXY_LOG_DB=str(tmp_path / "l.sqlite3"),
                                             OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / "run"))))  # fmt: skip
    try:
        host = Flask("host")
        host.wsgi_app = DispatcherMiddleware(host.wsgi_app, {"/ai": proxy})  # type: ignore[method-assign]
        client = host.test_client()
        page = client.get("/ai/log", headers={"Accept": "text/html"})
        assert 'action="/ai/signin"' in page.get_data(as_text=True)
        signed = client.post("/ai/signin", data={"access_token": ACCESS_TOKEN, "next": "/ai/log"})
        assert signed.headers["Location"] == "/ai/log"
    finally:
        st = proxy.extensions["openai_proxy"]
        st.upstream.close()
        st.log_store.close()
        st.gate.close()


# -- a host package named `app`, under its own gunicorn with gevent workers ---------------------------

HOST_PACKAGE = """
from flask import Flask

from openai_proxy import OpenAIProxy

app = Flask(__name__)
app.config["SECURITY_KEY"] = "{security_key}"


@app.get("/")
def home():
    return "host home"


@app.get("/whoami")
def whoami():
    return "the host's own app package"


OpenAIProxy(app, url_prefix="/ai")
"""


def start_host(home, fake, args: list[str], log_name: str, env: dict[str, str]):
    """The host's own `gunicorn <args> app:app` in `home`, with the proxy limited to 2 calls at once;
    (process, url, log file) once its `/ai/ready` answers."""
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SECURITY_KEY"))}
    full_env = {
        **inherited,
        **base_env(fake, SECURITY_KEY=None),
        "OPENAI_PROXY_MAX_PARALLEL_REQUESTS": "2",
        **env,
    }
    log = open(home / log_name, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *args, "-b", f"127.0.0.1:{port}", "app:app"],
        cwd=home, env=full_env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/ai/ready", timeout=1).status_code == 200:
                return proc, url, log
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError((home / log_name).read_text())


@pytest.fixture(scope="module")
def host_gunicorn(fake_server, tmp_path_factory):
    """`gunicorn -k gevent -w 2 app:app` in a directory whose own package is `app` (no config of ours)."""
    home = tmp_path_factory.mktemp("host")
    (home / "app").mkdir()
    (home / "app" / "__init__.py").write_text(textwrap.dedent(HOST_PACKAGE.format(security_key=SECURITY_KEY)))
    env = {"OPENAI_PROXY_RUNTIME_DIR": str(home / "run"), "OPENAI_PROXY_LOG_DB": str(home / "log.sqlite3")}
    proc, url, log = start_host(home, fake_server, ["-k", "gevent", "-w", "2"], "gunicorn.log", env)
    yield url, home
    proc.terminate()
    proc.wait(timeout=15)
    log.close()


def test_the_hosts_own_app_package_is_the_one_served(host_gunicorn):
    url, _ = host_gunicorn
    assert requests.get(url + "/whoami", timeout=5).text == "the host's own app package"


def test_the_official_sdk_against_the_prefix_plain_and_streamed(host_gunicorn, fake_server):
    url, _ = host_gunicorn
    fake_server.reset()
    sdk = openai.OpenAI(base_url=url + "/ai/v1", api_key=SECURITY_KEY, max_retries=0)
    answer = sdk.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content
    fake_server.push("POST", "/v1/chat/completions", fu.chat_stream(include_usage=True))
    with sdk.chat.completions.create(**CHAT, stream=True) as stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "word0 word1 word2 "
    # The proxy's upstream key went upstream, not the caller's key.
    assert fake_server.keys("/v1/chat/completions")[-1] == UPSTREAM_KEY


def test_sign_in_redirects_under_the_prefix_in_the_hosts_server(host_gunicorn):
    url, _ = host_gunicorn
    # The host set no ACCESS_TOKEN in app.config: the environment's one is used.
    page = requests.get(url + "/ai/log", headers={"Accept": "text/html"}, timeout=5)
    assert page.status_code == 401 and 'action="/ai/signin"' in page.text
    signed = requests.post(
        url + "/ai/signin", data={"access_token": ACCESS_TOKEN, "next": "/ai/log"},
        allow_redirects=False, timeout=5,
    )  # fmt: skip
    assert (signed.status_code, signed.headers["Location"]) == (303, "/ai/log")


def six_slow_calls_at_once(url: str, fake) -> list[requests.Response]:
    """Six `/ai/openai` calls that upstream holds for 2 s, each on a new connection (so gunicorn spreads
    them over its workers), all at once."""
    fake.reset()
    fake.push("POST", "/v1/chat/completions", fu.delay(2.0), times=None)

    def call(_):
        with requests.Session() as s:
            return s.post(url + "/ai/openai", json={**CHAT, "security_key": SECURITY_KEY}, timeout=20)

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(call, range(6)))


def test_the_gate_is_exact_across_the_hosts_workers_with_a_shared_runtime_dir(host_gunicorn, fake_server):
    url, _ = host_gunicorn
    answers = six_slow_calls_at_once(url, fake_server)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 200, 503, 503, 503, 503], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 503)
    assert json.loads(refused.text)["error"]["code"] == "OPENAI_PROXY_OVERLOADED"


def test_a_client_leaving_a_slow_call_cancels_it_upstream_in_the_hosts_server(host_gunicorn, fake_server):
    url, _ = host_gunicorn
    fake_server.reset()
    fake_server.push("POST", "/v1/chat/completions", fu.delay(20.0))
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({**CHAT, "security_key": SECURITY_KEY})
    conn.request("POST", "/ai/openai", body=body, headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 5
    while fake_server.count("/v1/chat/completions") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    upstream = fake_server.last("/v1/chat/completions")
    left_at = time.monotonic()
    conn.close()
    while upstream.client_closed_at is None and time.monotonic() < left_at + 5:
        time.sleep(0.02)
    assert upstream.client_closed_at is not None and upstream.client_closed_at - left_at < 2.0
    # Its slot came back: the next call is served.
    again = requests.post(url + "/ai/openai", json={**CHAT, "security_key": SECURITY_KEY}, timeout=10)
    assert again.status_code == 200


HOST_CONF = """
from openai_proxy.runtime import gunicorn_hooks

worker_class = "openai_proxy.worker.ProxyWorker"
workers = 2
graceful_timeout = 5
globals().update(gunicorn_hooks())
"""


def test_the_proxys_hooks_in_a_hosts_own_gunicorn_config(host_gunicorn, fake_server):
    """No OPENAI_PROXY_RUNTIME_DIR: the hooks give the workers one runtime dir (an exact gate), and
    SIGTERM turns /ready to 503 while the drain delay runs."""
    _, home = host_gunicorn
    (home / "host.conf.py").write_text(HOST_CONF)
    env = {"OPENAI_PROXY_LOG_DB": str(home / "log2.sqlite3"), "OPENAI_PROXY_DRAIN_DELAY_S": "2"}
    proc, url, log = start_host(home, fake_server, ["-c", "host.conf.py"], "gunicorn2.log", env)
    try:
        statuses = sorted(a.status_code for a in six_slow_calls_at_once(url, fake_server))
        assert statuses == [200, 200, 503, 503, 503, 503]
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = requests.get(url + "/ai/ready", timeout=5)
        assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_without_a_shared_runtime_dir_the_gate_says_it_holds_per_process(mounted):
    assert mounted().extensions["openai_proxy"].gate.status()["scope"] == "host"
    alone = mounted(OPENAI_PROXY_RUNTIME_DIR=None)
    if os.environ.get("OPENAI_PROXY_RUNTIME_DIR"):
        pytest.skip("the environment names a runtime dir")
    assert alone.extensions["openai_proxy"].gate.status()["scope"] == "process"


def test_the_client_boundary_holds_under_the_prefix(mounted, fake, tmp_path):
    """Rules are judged in the form that goes upstream, whatever the mount: a model a client may not
    use (also escaped in the path), and another client's stored response."""
    from tests.support.files import write_clients
    from tests.test_objects import creates_response

    clients = write_clients(
        tmp_path,
        """\
        [[client]]
        name = "mini"
        key = "mini-client-key-0123456789"
        models = ["gpt-4o-mini"]

        [[client]]
        name = "other"
        key = "other-client-key-0123456789"
        """,
    )
    client = mounted(OPENAI_PROXY_CLIENTS_FILE=clients).test_client()
    mini = {"Authorization": "Bearer mini-client-key-0123456789"}
    other = {"Authorization": "Bearer other-client-key-0123456789"}
    for path in ("/ai/v1/chat/completions", "/ai/v1/chat/%63ompletions"):
        r = client.post(path, json={**CHAT, "model": "gpt-4o"}, headers=mini)
        assert r.status_code == 403, (path, r.get_data())
    assert fake.count("/v1/chat/completions") == 0
    creates_response(fake, "resp_mounted")
    assert (
        client.post("/ai/v1/responses", json={"model": "gpt-4o-mini", "input": "x"}, headers=mini).status_code
        == 200
    )
    assert client.get("/ai/v1/responses/resp_mounted", headers=other).status_code == 404
    assert client.get("/ai/openai2/resp_mounted", headers=other).status_code == 404
    assert fake.count("/v1/responses/resp_mounted") == 0
    assert client.get("/ai/v1/responses/resp_mounted", headers=mini).status_code == 200
