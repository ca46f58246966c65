"""One blueprint per OpenAI resource, plus the operator pages and the balancer's `/ready`."""

from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    from openai_proxy.pages import ready
    from openai_proxy.pages import views as pages
    from openai_proxy.routes import audio, chat, embeddings, responses, v1

    for module in (pages, ready, chat, responses, embeddings, audio, v1):
        app.register_blueprint(module.bp)
