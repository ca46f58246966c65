"""The official Node SDK (npm `openai`) against the /v1 surface, as a JavaScript client would use it."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SECURITY_KEY
from tests.support.fake_upstream import EMBEDDING, response_events

NODE_DIR = Path(__file__).parent / "node"
pytestmark = [
    pytest.mark.gunicorn,
    pytest.mark.skipif(
        shutil.which("node") is None or not (NODE_DIR / "node_modules" / "openai").is_dir(),
        reason="the Node SDK check needs `node` and `npm install` in tests/node (./test.sh does it when npm exists)",
    ),
]


def test_node_sdk_against_the_proxy(gunicorn_server, fake):
    server = gunicorn_server(workers=1)
    env = {**os.environ, "PROXY_BASE_URL": server.url + "/v1", "PROXY_KEY": SECURITY_KEY}
    done = subprocess.run(
        ["node", "sdk_check.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["chat"] == "Hello from the fake upstream."
    assert seen["chatStream"] == "word0 word1 word2 "
    assert seen["responseText"] == "In a peaceful grove. The end."
    assert seen["responseStreamText"] == "word0 word1 word2 "
    assert seen["responseEventTypes"] == [e["type"] for e in response_events("gpt-4o")]
    float32 = list(struct.unpack(f"<{len(EMBEDDING)}f", struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)))
    assert seen["embedding"] == pytest.approx(float32)
    assert seen["models"] == ["gpt-4o-mini"]
    assert seen["wrongKey"] == {
        "name": "AuthenticationError",
        "status": 401,
        "code": "OPENAI_PROXY_UNAUTHORIZED",
    }
    # A per-call timeout reaches the proxy as X-Stainless-Timeout (whole seconds) and acts as `timeout`.
    lines = server.log_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith('{"event":"completion"')]
    timeouts = {r["endpoint"]: (r["timeoutMs"], r["timeoutSource"]) for r in records if r["status"] == 200}
    assert timeouts["/v1/models"] == (30000.0, "provided")
    assert timeouts["/v1/chat/completions"] == (600000.0, "default")
