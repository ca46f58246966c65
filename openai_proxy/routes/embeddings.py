"""`POST /embeddings`: forwarded as sent (floats stay exactly as upstream wrote them)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from openai_proxy import pipeline
from openai_proxy.errors import BadRequest
from openai_proxy.inbound import web
from openai_proxy.inbound.validation import optional_choice, optional_positive_int

bp = Blueprint("embeddings", __name__)

DEFAULT_EMBEDDING_MODEL = "text-embedding-3-large"


@bp.post("/embeddings")
def create_embeddings():
    req = web.json_request()
    body = build_embeddings_body(req.body)
    return pipeline.relay_json(pipeline.json_call("POST", "/embeddings", req, json=body))


def build_embeddings_body(body: dict[str, Any]) -> dict[str, Any]:
    """Validate; no `encoding_format` is added, so upstream answers plain JSON floats."""
    if body.get("input") is None:
        raise BadRequest("Missing input")
    model = body.get("model")
    if model is None or model == "":
        body["model"] = DEFAULT_EMBEDDING_MODEL
    elif not isinstance(model, str):
        raise BadRequest("model must be a string")
    optional_positive_int(body, "dimensions")
    optional_choice(body.get("encoding_format"), "encoding_format", ("float", "base64"))
    return body
