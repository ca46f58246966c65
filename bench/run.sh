#!/usr/bin/env bash
# The benchmark suite: ./bench/run.sh [--only SCENARIO ...] [--json out.json] [--soak-minutes 10]
# Installs the project into ./.venv on first use (like ./run.sh), and wrk when it is missing and we
# may (root with apt-get), then runs `python -m bench.run`. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
# The test extra, as ./test.sh installs it: the bench needs nothing more, and sharing test.sh's
# install stamp means switching between the two never reinstalls.
bootstrap "[test]"
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing wrk (the HTTP load generator) ..." >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } \
        > .venv/wrk-install.log 2>&1; then
      cat .venv/wrk-install.log >&2
      echo "Could not install wrk; install it yourself (Debian/Ubuntu: apt-get install wrk," >&2
      echo "macOS: brew install wrk) or run only the stream scenarios with --only." >&2
      exit 1
    fi
  else
    echo "wrk is not installed: the JSON scenarios need it (Debian/Ubuntu: sudo apt-get install wrk;" >&2
    echo "macOS: brew install wrk). The stream scenarios run without it (--only streams_steady ...)." >&2
  fi
fi
exec .venv/bin/python -m bench.run "$@"
