"""The Responses API: `/openai2` and its operations (create, compact, input tokens, retrieve, ...)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from flask import Blueprint, request

from openai_proxy import pipeline
from openai_proxy.clients.safety import add_safety_identifier
from openai_proxy.errors import BadRequest
from openai_proxy.inbound import web
from openai_proxy.inbound.validation import is_truthy, optional_choice, query_int
from openai_proxy.pipeline import json_call
from openai_proxy.upstream import RETRIES_IDEMPOTENT

bp = Blueprint("responses", __name__)

INCLUDABLE = (
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
)


@bp.post("/openai2")
def create_response():
    req = web.json_request()
    add_safety_identifier(req.body)
    if is_truthy(req.body.pop("stream", None)):
        return pipeline.stream_events(json_call("POST", "/responses", req, json={**req.body, "stream": True}))
    return pipeline.relay_json(json_call("POST", "/responses", req, json=req.body), with_output_text)


@bp.post("/openai2/compact")
def compact_response():
    req = web.json_request()
    return pipeline.relay_json(json_call("POST", "/responses/compact", req, json=req.body))


@bp.post("/openai2/input_tokens")
def count_input_tokens():
    req = web.json_request(allow_empty=True)
    req.record.runs_model = False  # counts tokens: a restricted client may leave the model to upstream
    req.record.billable = False  # counting tokens runs no model and costs nothing
    call = json_call("POST", "/responses/input_tokens", req, json=req.body, retries=RETRIES_IDEMPOTENT)
    return pipeline.relay_json(call)


@bp.get("/openai2", defaults={"response_id": ""})
@bp.get("/openai2/<rid:response_id>")
def retrieve_response(response_id: str):
    req = web.query_request()
    req.record.billable = False  # its create call recorded the cost (`note_answer` knows the exception)
    path = response_path(response_id)
    params = retrieve_params(request.args)
    if request.args.get("stream") == "true":
        params["stream"] = "true"
        return pipeline.stream_events(json_call("GET", path, req, params=params, retries=RETRIES_IDEMPOTENT))
    call = json_call("GET", path, req, params=params, retries=RETRIES_IDEMPOTENT)
    return pipeline.relay_json(call, with_output_text)


@bp.get("/openai2/<rid:response_id>/input_items")
def list_input_items(response_id: str):
    req = web.query_request()
    path = response_path(response_id) + "/input_items"
    params = input_items_params(request.args)
    return pipeline.relay_json(json_call("GET", path, req, params=params, retries=RETRIES_IDEMPOTENT))


@bp.post("/openai2/<rid:response_id>/cancel")
def cancel_response(response_id: str):
    req = web.json_request(allow_empty=True)
    req.record.runs_model = False
    path = response_path(response_id) + "/cancel"
    return pipeline.relay_json(json_call("POST", path, req))


@bp.delete("/openai2", defaults={"response_id": ""})
@bp.delete("/openai2/<rid:response_id>")
def delete_response(response_id: str):
    req = web.query_request()
    path = response_path(response_id)
    return pipeline.relay_json(json_call("DELETE", path, req, retries=RETRIES_IDEMPOTENT))


def response_path(response_id: str) -> str:
    """`/responses/<id>` with the id percent-encoded, so it can never change the upstream path.

    Dots are encoded too: a literal `..` segment would be resolved away by the HTTP client.
    """
    if not response_id.strip():
        raise BadRequest("Missing response_id")
    return "/responses/" + quote(response_id, safe="").replace(".", "%2E")


def include_values(args) -> list[str] | None:
    """Repeated `include` (or `include[]`) values, each one of the documented includables."""
    values = [v for v in args.getlist("include") + args.getlist("include[]") if v != ""]
    if not values:
        return None
    invalid = [v for v in values if v not in INCLUDABLE]
    if invalid:
        raise BadRequest("Invalid include value(s): " + ", ".join(invalid))
    return values


def retrieve_params(args) -> dict[str, Any]:
    stream = args.get("stream")
    if stream not in (None, "", "true", "false"):
        raise BadRequest("stream must be true or false")
    params: dict[str, Any] = {}
    include = include_values(args)
    if include:
        params["include"] = include
    obfuscation = optional_choice(
        args.get("include_obfuscation") or None, "include_obfuscation", ("true", "false")
    )
    if obfuscation is not None:
        params["include_obfuscation"] = obfuscation
    starting_after = query_int(args.get("starting_after"), "starting_after", minimum=0)
    if starting_after is not None:
        params["starting_after"] = starting_after
    return params


def input_items_params(args) -> dict[str, Any]:
    params: dict[str, Any] = {}
    after = args.get("after")
    if after:
        params["after"] = after
    include = include_values(args)
    if include:
        params["include"] = include
    limit = query_int(args.get("limit"), "limit", minimum=1)
    if limit is not None:
        params["limit"] = limit
    order = optional_choice(args.get("order") or None, "order", ("asc", "desc"))
    if order is not None:
        params["order"] = order
    return params


def output_text(response: Any) -> str:
    """The concatenated `output_text` parts of message outputs, as the SDK's property computes it."""
    texts: list[str] = []
    output = response.get("output") if isinstance(response, dict) else None
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        for part in item.get("content") or ():
            if (
                isinstance(part, dict)
                and part.get("type") == "output_text"
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
    return "".join(texts)


def with_output_text(response: Any) -> Any:
    if isinstance(response, dict):
        response["output_text"] = output_text(response)
    return response
