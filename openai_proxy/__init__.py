"""openai-proxy: a Flask app in front of the OpenAI API (README.md documents its HTTP surface)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from openai_proxy.config import Config

from openai_proxy.version import __version__

__all__ = ["__version__", "create_app"]


def create_app(config: Config | None = None) -> Flask:
    """Build the Flask app; `config` defaults to the environment, `.env.local` and `.env`."""
    # Imported here so that `import openai_proxy.config` (gunicorn's master reads it for the bind address)
    # does not pull in ssl, httpx and the SDK before each gevent worker has monkey-patched.
    from openai_proxy.extension import build_app

    return build_app(config)
