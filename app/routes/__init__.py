"""One blueprint per OpenAI resource, plus the operator pages and the balancer's `/ready`."""

from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    from app.routes import audio, chat, embeddings, pages, ready, responses, v1

    for module in (pages, ready, chat, responses, embeddings, audio, v1):
        app.register_blueprint(module.bp)
