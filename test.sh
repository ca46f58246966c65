#!/usr/bin/env bash
# Install the proxy and its test tools into ./.venv, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/bootstrap.sh
bootstrap "[test]"
# One test renders /log in headless Chromium (Debian package `chromium`). Install it quietly when it is
# missing and we may (root with apt-get); otherwise that test says why it skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing chromium for the browser test ..." >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      > .venv/chromium-install.log 2>&1; then
    echo "Could not install chromium (see .venv/chromium-install.log); the browser test will skip" >&2
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
