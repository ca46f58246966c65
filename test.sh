#!/usr/bin/env bash
# Install the proxy and its test tools into ./.venv, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/bootstrap.sh
bootstrap "[test]"
# Real servers some tests need, from Debian: `chromium` and `chromium-driver` (the pages are rendered
# and driven in a headless browser), `tinyproxy` (the outbound-proxy tests run through a real forward proxy),
# `redis-server` and `postgresql` (the several-hosts tests share a gate, limits and the log through them;
# the suite starts its own servers on loopback, in temp dirs). Install what is missing
# quietly when we may (root with apt-get); otherwise the tests that need them say why they skip.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v tinyproxy >/dev/null 2>&1 || missing+=(tinyproxy)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing ${missing[*]} for the tests ..." >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
      > .venv/apt-install.log 2>&1; then
    echo "Could not install ${missing[*]} (see .venv/apt-install.log); the tests that need them will skip" >&2
  fi
fi
# One test drives /v1 with the official Node SDK; it needs npm (the test says why it skips otherwise).
if command -v npm >/dev/null 2>&1 && [ ! -d tests/node/node_modules/openai ]; then
  (cd tests/node && npm ci --silent --no-audit --no-fund > ../../.venv/npm-install.log 2>&1) ||
    echo "Could not install the Node SDK (see .venv/npm-install.log); its test will skip" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
