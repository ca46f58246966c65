#!/usr/bin/env bash
# Install the proxy into ./.venv (first run only) and start it under gunicorn with gevent workers.
# Settings: the environment, then .env.local, then .env (see .env.example). Default port: 3002.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/bootstrap.sh
bootstrap ""
exec .venv/bin/gunicorn -c gunicorn.conf.py app.wsgi:app "$@"
