"""What README.md and docs/ show a user still works, and their links and maps still hold.

Checked blocks. A fenced code block on the line right after `<!-- check: NAME -->` (at the same
indentation) is one a user would copy; NAME says what this file does with it:

- `env` (README, sh): `export NAME=value ...`, the only variables the checked commands read
  (`$PROXY`, `$SECURITY_KEY`, `$ACCESS_TOKEN`). The tests set them to a real server's values instead,
  so the blocks stay copyable exactly as written.
- `quickstart` (README, sh): run with bash against a real gunicorn proxy (the `module_gunicorn`
  fixture, on the HTTPS fake upstream): the chat call and the `/health` call with ACCESS_TOKEN.
- `sdk` (README, python): run with `sys.executable -c`, same variables: the official SDK on `/v1`.
- `mount` (README, python): the Flask host app, built in a fresh interpreter and called under its
  prefix; skipped while `openai_proxy` has no `OpenAIProxy`.
- `clients-file`, `upstream-key-file` (docs/clients-and-limits.md, toml): read with
  `openai_proxy.clients.load_clients`; the clients file then configures the proxy, and a call with
  one of its keys gets that client's limits and model list.
- `fleet-env`, `fleet-calls` (docs/operations.md, sh): the fleet example without docker. `fleet-env`
  runs as written (openssl makes the secrets), the proxy starts with the secrets it exported, and
  `fleet-calls` runs against it with those values (only `$PROXY` is pointed at the test server).
  compose.yaml must require the variables `fleet-env` exports and publish the port its PROXY uses.
- `module-map` (docs/design.md): must list exactly the Python modules of `openai_proxy/` and `app/`.

Every marker must name one of these, and each must be marked exactly once, so a check cannot be
dropped or misspelt silently. Also checked: README.md is at most 200 lines; every relative link in
README.md, docs/*.md and bench/README.md points to an existing file (and heading); every variable
`openai_proxy/config.py` reads is in docs/configuration.md, and `.env.example` names no other.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from openai_proxy.clients import load_clients
from openai_proxy.config import Config
from tests.conftest import ACCESS_TOKEN, ROOT, SECURITY_KEY, base_env

README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED_FILES = [*DOC_FILES, ROOT / "bench" / "README.md"]
# Each check and the language of its block.
CHECKS = {"env": "sh", "quickstart": "sh", "sdk": "python", "mount": "python", "clients-file": "toml",
          "upstream-key-file": "toml", "fleet-env": "sh", "fleet-calls": "sh", "module-map": ""}  # fmt: skip
MARKER = re.compile(r"^([ \t]*)<!-- check: ([\w-]+) -->\n\1```(\w*)\n(.*?)\n\1```[ \t]*$", re.M | re.S)
# What the fake upstream answers by default (tests/support/fake_upstream.py).
CHAT_TEXT = "Hello from the fake upstream."
# Variables of the user's shell that would change what curl or the SDK does.
USER_VARS = ("OPENAI_", "SECURITY_KEY", "ACCESS_TOKEN", "PROXY", "http_proxy", "https_proxy",
             "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")  # fmt: skip


@dataclass(frozen=True)
class Block:
    path: Path
    lang: str
    text: str


def checked_blocks() -> tuple[dict[str, Block], list[str]]:
    """The marked blocks by name, and what is wrong with the markers."""
    blocks: dict[str, Block] = {}
    problems: list[str] = []
    for path in DOC_FILES:
        source = path.read_text()
        found = MARKER.findall(source)
        if len(found) != len(re.findall(r"^[ \t]*<!-- check:", source, re.M)):
            problems.append(f"{path.name}: a marker that is not right above a code block")
        for indent, name, lang, text in found:
            if name in blocks:
                problems.append(f"{name!r} marked twice ({blocks[name].path.name}, {path.name})")
            lines = [line.removeprefix(indent) for line in text.split("\n")]
            blocks[name] = Block(path, lang, "\n".join(lines) + "\n")
    return blocks, problems


BLOCKS, MARKER_PROBLEMS = checked_blocks()


def block(name: str) -> Block:
    assert name in BLOCKS, f"no block is marked <!-- check: {name} -->"
    return BLOCKS[name]


def user_env(**values: str) -> dict[str, str]:
    """A user's shell: this process's environment without proxy settings, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(USER_VARS)}
    return {**env, **values}


def run_sh(text: str, env: dict[str, str]) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    # -u: a block that reads a variable nobody set fails here instead of sending an empty key.
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", text], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def json_values(text: str) -> list:
    """The JSON documents printed one after another."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        value, i = decoder.raw_decode(text, i)
        values.append(value)
    return values


def server_vars(server, security_key: str, access_token: str) -> dict[str, str]:
    return {"PROXY": server.url, "SECURITY_KEY": security_key, "ACCESS_TOKEN": access_token}


def exported(text: str) -> dict[str, str]:
    """NAME=value pairs of the `export` lines of a block (comments dropped)."""
    names: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            names.update(word.split("=", 1) for word in words[1:])
    return names


# ---- the markers ---------------------------------------------------------------------------------


def test_every_check_is_marked_once_and_every_marker_is_a_check():
    assert MARKER_PROBLEMS == []
    assert {name: b.lang for name, b in BLOCKS.items()} == CHECKS


def test_checked_commands_read_only_the_variables_the_quick_start_exports():
    env = exported(block("env").text)
    assert set(env) == {"PROXY", "SECURITY_KEY", "ACCESS_TOKEN"}
    assert env["PROXY"] == f"http://localhost:{Config().port}"
    used = set()
    for name in ("quickstart", "fleet-calls"):
        used |= set(re.findall(r"\$\{?(\w+)", block(name).text))
    used |= set(re.findall(r"os\.environ\[\"(\w+)\"\]", block("sdk").text))
    assert used <= set(env), used - set(env)


# ---- the README's commands, against a real gunicorn ----------------------------------------------


@pytest.fixture(scope="module")
def clients_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "clients.toml"
    path.write_text(block("clients-file").text)
    return path


@pytest.fixture(scope="module")
def docs_server(module_gunicorn, clients_path):
    """The proxy as the README sets it up (SECURITY_KEY, ACCESS_TOKEN), with the docs' clients file."""
    return module_gunicorn(OPENAI_PROXY_CLIENTS_FILE=str(clients_path))


@pytest.mark.gunicorn
def test_quick_start_calls_answer_with_the_completion_and_a_healthy_status(docs_server, fake_server):
    out = run_sh(block("quickstart").text, user_env(**server_vars(docs_server, SECURITY_KEY, ACCESS_TOKEN)))
    chat, health = json_values(out)
    assert chat["choices"][0]["message"]["content"] == CHAT_TEXT
    sent = fake_server.last("/v1/chat/completions").json
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"] == [{"role": "user", "content": "What is TypeScript?"}]
    assert health["status"] == "ok"


@pytest.mark.gunicorn
def test_sdk_example_runs_with_the_official_sdk(docs_server):
    done = subprocess.run([sys.executable, "-c", block("sdk").text], capture_output=True, text=True,
                          timeout=60, env=user_env(**server_vars(docs_server, SECURITY_KEY, ACCESS_TOKEN)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "In a peaceful grove. The end.\nword0 word1 word2 \n"


@pytest.mark.slow
def test_mount_example_serves_the_proxy_under_its_prefix(fake_server, tmp_path):
    try:
        from openai_proxy import OpenAIProxy  # noqa: F401
    except ImportError:
        pytest.skip("openai_proxy has no OpenAIProxy yet")
    call = textwrap.dedent("""
        import json, os
        client = app.test_client()
        answer = client.post("/ai/openai", headers={"X-Security-Key": os.environ["SECURITY_KEY"]},
                             data=json.dumps({"messages": [{"role": "user", "content": "Hi"}]}))
        print(answer.status_code, answer.get_json()["choices"][0]["message"]["content"])
    """)
    code = "from gevent import monkey\nmonkey.patch_all()\n" + block("mount").text + call
    env = user_env(**base_env(fake_server, OPENAI_PROXY_LOG_DB=str(tmp_path / "log.sqlite3"),
                              OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / "run")))  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"200 {CHAT_TEXT}"


# ---- the clients file ----------------------------------------------------------------------------


def test_clients_file_example_loads(clients_path):
    book, plain_keys = load_clients(str(clients_path), None)
    assert book.names() == ["billing-service", "search"]
    assert plain_keys == ["replace-with-a-long-random-key"]


def test_upstream_key_example_loads(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(block("upstream-key-file").text)
    book, _ = load_clients(str(path), None)
    assert [(spec.name, spec.weight) for spec in book.upstream_keys] == [("team-a", 2)]


@pytest.mark.gunicorn
def test_a_key_of_the_clients_file_calls_with_its_limits_and_models(docs_server):
    client = tomllib.loads(block("clients-file").text)["client"][0]
    headers = {"X-Security-Key": client["key"]}
    ok = requests.post(docs_server.url + "/openai", headers=headers, timeout=10,
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] == CHAT_TEXT
    assert ok.headers["x-ratelimit-limit-requests"] == str(client["rpm"])
    assert ok.headers["x-ratelimit-limit-tokens"] == str(client["tpm"])
    refused = requests.post(docs_server.url + "/openai", headers=headers, timeout=10,
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("forbidden", "OPENAI_PROXY_FORBIDDEN")
    assert error["message"] == "Client 'billing-service' may not use model 'gpt-4o'"


# ---- the fleet example, without docker -----------------------------------------------------------


def fleet_environment() -> dict[str, str]:
    """The variables the fleet example's first block leaves in the user's shell."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = run_sh(block("fleet-env").text + "env -0\n", user_env())
    pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {name: value for name, value in pairs if name.startswith(USER_VARS)}


def test_fleet_example_exports_what_compose_requires():
    env = fleet_environment()
    compose = (ROOT / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", compose))
    assert required == set(env) - {"PROXY"}, (required, set(env))
    assert set(re.findall(r"\$\{(\w+)", compose)) <= set(env)
    for name in ("SECURITY_KEY", "ACCESS_TOKEN"):
        assert re.fullmatch(r"[0-9a-f]{48}", env[name]), name
    published = re.search(r'ports: \["(\d+):\d+"\]', compose)
    assert published and urlsplit(env["PROXY"]).port == int(published.group(1))


@pytest.mark.gunicorn
def test_fleet_example_calls_work_with_the_secrets_it_exported(module_gunicorn, fake_server):
    env = fleet_environment()
    server = module_gunicorn(workers=1, SECURITY_KEY=env["SECURITY_KEY"], ACCESS_TOKEN=env["ACCESS_TOKEN"],
                             OPENAI_PROXY_HOST_NAME="proxy-1")  # fmt: skip
    out = run_sh(block("fleet-calls").text, user_env(**{**env, "PROXY": server.url}))
    *answers, log_address = out.splitlines()
    chat, health = json_values("\n".join(answers))
    assert chat["choices"][0]["message"]["content"] == CHAT_TEXT
    assert fake_server.last("/v1/chat/completions").json["model"] == "gpt-4o-mini"  # OpenAI needs one
    assert health["status"] == "ok"
    assert log_address == f"{server.url}/log?access_token={env['ACCESS_TOKEN']}"
    signed_in = requests.get(log_address, allow_redirects=False, timeout=10)
    assert (signed_in.status_code, signed_in.headers["Location"]) == (303, "/log")
    page = requests.get(server.url + "/log", cookies=signed_in.cookies, timeout=10)
    assert page.status_code == 200 and "Request count: " in page.text


# ---- length, links, maps -------------------------------------------------------------------------


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def without_code(markdown: str) -> str:
    return re.sub(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", "", markdown, flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    """The ids GitHub gives the headings of `path`: lower case, punctuation dropped, spaces → '-'."""
    seen: dict[str, int] = {}
    for title in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*$", without_code(path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        heading_ok = not anchor or (linked.suffix == ".md" and anchor in anchors(linked))
        if not (linked.exists() and heading_ok):
            broken.append(target)
    assert not broken, f"{path.name}: {broken}"


def test_module_map_lists_exactly_the_modules():
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in block("module-map").text.splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        if name.endswith("/"):
            stack.append((indent, parent + name))
        elif name.endswith(".py"):
            documented.add(parent + name)
    actual = {
        str(p.relative_to(ROOT))
        for top in ("openai_proxy", "app")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert documented == actual, {"not in docs/design.md": actual - documented, "gone": documented - actual}


def config_variables() -> set[str]:
    """Every environment variable name openai_proxy/config.py reads (string constants that look like one)."""
    tree = ast.parse((ROOT / "openai_proxy" / "config.py").read_text())
    pattern = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*|(?:https?|no)_proxy")
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value)
    }


def test_every_setting_config_reads_is_documented():
    documented = set(re.findall(r"`([A-Za-z0-9_]+)`", (ROOT / "docs" / "configuration.md").read_text()))
    assert config_variables() - documented == set()


def test_env_example_names_only_settings_config_reads():
    names = set(re.findall(r"^#?[ \t]*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert names and names - config_variables() == set()
