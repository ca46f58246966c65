"""openai-proxy: the OpenAI API behind one Flask app, or mounted in yours.

    from openai_proxy import OpenAIProxy
    OpenAIProxy(app, url_prefix="/ai")      # or: proxy = OpenAIProxy(); proxy.init_app(app, ...)

`create_app()` builds the proxy as a whole app (`app.wsgi` serves it under gunicorn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openai_proxy.version import __version__

if TYPE_CHECKING:
    from flask import Flask

    from openai_proxy.config import Config
    from openai_proxy.extension import OpenAIProxy

__all__ = ["OpenAIProxy", "__version__", "create_app"]


def create_app(config: Config | None = None) -> Flask:
    """Build the Flask app; `config` defaults to the environment, `.env.local` and `.env`."""
    # Imported here so that `import openai_proxy.config` (gunicorn's master reads it for the bind
    # address) does not pull in ssl, httpx and the SDK before each gevent worker has monkey-patched.
    from openai_proxy.extension import build_app

    return build_app(config)


def __getattr__(name: str) -> Any:
    # `from openai_proxy import OpenAIProxy` imports Flask and the SDK; the package itself does not.
    if name == "OpenAIProxy":
        from openai_proxy.extension import OpenAIProxy

        return OpenAIProxy
    raise AttributeError(f"module 'openai_proxy' has no attribute {name!r}")
