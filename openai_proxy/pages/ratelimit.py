"""Throttling of the guarded operator pages with flask-limiter; a breach is the contract's JSON 429.

Limits count per client address, per page; the sign-in form (`/signin`) counts as a page, so guessing
ACCESS_TOKEN there is throttled like guessing it in a page's query. Storage `memory://` (the default)
counts in each worker process, so a client may get up to one limit per worker; a `redis://` URI
(`OPENAI_PROXY_LIMITS_URI`, else `OPENAI_PROXY_RATELIMIT_STORAGE_URI`) makes the limits exact across
workers and hosts. A Redis that is down or stalled costs a page at most `OPENAI_PROXY_REDIS_TIMEOUT_S`,
then the pages count in memory until it is back (flask-limiter's own fallback, which asks Redis again
on its own schedule). API routes and `/` are never throttled here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Blueprint, Flask, Response
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits.errors import ConfigurationError

from openai_proxy.config import Config
from openai_proxy.errors import RateLimited, render
from openai_proxy.pages import views as pages

log = logging.getLogger("openai_proxy.ratelimit")


def init_limiter(app: Flask, config: Config, root: Blueprint) -> Limiter:
    """Attach a limiter to `app`: `OPENAI_PROXY_PAGES_RATE_LIMIT` per guarded page and for /signin, less
    for /health2. Its hooks run for the pages under `root` (the proxy's blueprint) only, and its 429
    is answered there, so a host app's own routes and limiter are left alone."""
    options = {
        # X-RateLimit-* on the pages; Retry-After only where it means something (`_retry_after_only_when_refused`).
        "headers_enabled": True,
        # A storage outage (e.g. redis down) falls back to counting in memory, never fails the page.
        "in_memory_fallback_enabled": True,
        "swallow_errors": True,
    }
    uri = config.pages_limits_uri
    if uri.startswith(("redis://", "rediss://")):
        # Imported only for a Redis storage: redis-py loads OpenTelemetry's SDK when it is installed,
        # which a proxy without Redis or tracing need not carry.
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # The same bound as the gate's and the client limits' Redis calls: redis-py waits forever by
        # default, and retries 3 times with back-off, so a stalled Redis would stall every page.
        options["storage_options"] = {
            "socket_timeout": config.redis_timeout_s,
            "socket_connect_timeout": config.redis_timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }
    try:
        limiter = Limiter(get_remote_address, app=app, storage_uri=uri, **options)
    except ConfigurationError as exc:
        variable = "OPENAI_PROXY_LIMITS_URI" if config.limits_uri else "OPENAI_PROXY_RATELIMIT_STORAGE_URI"
        log.warning("CONFIG WARNING: %s unusable (%s); counting in memory", variable, exc)
        options.pop("storage_options", None)
        limiter = Limiter(get_remote_address, app=app, storage_uri="memory://", **options)

    def limit_for_page() -> str:
        return config.health2_rate_limit if pages.view() == pages.HEALTH2 else config.pages_rate_limit

    limiter.limit(limit_for_page, exempt_when=lambda: pages.view() not in pages.THROTTLED)(pages.bp)
    root.register_error_handler(RateLimitExceeded, too_many_requests)
    _scope_hooks_to_pages(app, limiter, f"{root.name}.{pages.bp.name}")
    return limiter


def _scope_hooks_to_pages(app: Flask, limiter: Limiter, pages_name: str) -> None:
    """Run the limiter's request hooks for the pages blueprint only.

    flask-limiter registers them app-wide, where they cost ~180 us on every API request (measured)
    to conclude that nothing applies: more than half the proxy's own budget per request. Moved to
    the blueprint it limits, they run first among its hooks, before the access-token check.
    """
    for hooks in (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs):
        mine = [
            f
            for f in hooks.get(None, [])
            if getattr(f, "__self__", None) is limiter or _is_limiter_partial(f, limiter)
        ]
        if not mine:
            continue
        hooks[None] = [f for f in hooks[None] if f not in mine]
        if hooks is app.after_request_funcs:
            mine = [_retry_after_only_when_refused(f) for f in mine]
        hooks.setdefault(pages_name, [])[:0] = mine


# The answers that ask a client to come back later; flask-limiter would put `Retry-After` on every
# answer of a limited page, a 200 included, where it means nothing (and reads as a refusal).
RETRY_AFTER_STATUSES = (429, 503)


def _retry_after_only_when_refused(inject: Callable[[Response], Response]) -> Callable[[Response], Response]:
    def inject_headers(response: Response) -> Response:
        response = inject(response)
        if response.status_code not in RETRY_AFTER_STATUSES:
            response.headers.pop("Retry-After", None)
        return response

    return inject_headers


def _is_limiter_partial(func: object, limiter: Limiter) -> bool:
    return limiter in getattr(func, "args", ())


def too_many_requests(err: RateLimitExceeded) -> Response:
    return render(RateLimited(f"Too many requests: {err.description}; try again later"))
