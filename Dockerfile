# Slim image: gunicorn with gevent workers, non-root, with a liveness check.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=3002

WORKDIR /srv/openai-proxy

COPY pyproject.toml README.md ./
COPY openai_proxy ./openai_proxy
RUN pip install .
COPY app ./app
COPY gunicorn.conf.py ./

RUN useradd --system --uid 10001 --home-dir /srv/openai-proxy proxy \
    && mkdir -p /srv/openai-proxy/var \
    && chown proxy /srv/openai-proxy/var
USER proxy

EXPOSE 3002
# `/ready` is public, cheap, makes no upstream call, and answers 503 once the server is draining.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('PORT', '3002'), timeout=4)"
# In-flight requests get OPENAI_PROXY_GRACEFUL_TIMEOUT_S (60 s) after SIGTERM: stop with `docker stop -t 70`.
STOPSIGNAL SIGTERM

CMD ["gunicorn", "-c", "gunicorn.conf.py", "app.wsgi:app"]
