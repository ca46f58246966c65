"""One blueprint per OpenAI resource, under a parent `api` blueprint that carries the completion
record; beside it the operator pages and the balancer's `/ready`; all under one `openai_proxy`
blueprint, which a host app mounts where it likes."""

from __future__ import annotations

from flask import Blueprint

from openai_proxy.state import ROOT_BLUEPRINT


class ProxyBlueprint(Blueprint):
    """The root blueprint; `api` is its child that every API route blueprint hangs from."""

    api: Blueprint


def proxy_blueprint(url_prefix: str) -> ProxyBlueprint:
    """A fresh root for one app: hooks are added to it before it is registered (Flask refuses them on
    a blueprint that was registered once, and the route modules' blueprints are shared by every app)."""
    from openai_proxy.pages import ready, views
    from openai_proxy.routes import audio, chat, embeddings, responses, v1

    root = ProxyBlueprint(ROOT_BLUEPRINT, __name__)
    root.api = Blueprint("api", __name__)
    for module in (chat, responses, embeddings, audio, v1):
        root.api.register_blueprint(module.bp)
    root.register_blueprint(views.bp)
    root.register_blueprint(ready.bp)
    root.register_blueprint(root.api)
    return root
