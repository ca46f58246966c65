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
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
