#!/usr/bin/env bash
# Install the proxy and its test tools into ./.venv, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/bootstrap.sh
bootstrap "[test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
