"""WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py app.wsgi:app`."""

from openai_proxy import create_app

app = create_app()
