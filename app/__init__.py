"""The deployable app: `gunicorn -c gunicorn.conf.py app.wsgi:app`. The library is `openai_proxy`."""
