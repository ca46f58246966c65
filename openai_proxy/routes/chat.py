"""`POST /openai` (Chat Completions with the vision `image` merge) and `POST /chatgpt` (simple prompt)."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint

from openai_proxy import jsonio, pipeline
from openai_proxy.clients.safety import add_safety_identifier
from openai_proxy.errors import BadRequest
from openai_proxy.inbound import web
from openai_proxy.inbound.validation import is_truthy, optional_number, optional_positive_int
from openai_proxy.state import state
from openai_proxy.usage import note_answer

bp = Blueprint("chat", __name__)

SYSTEM_PROMPT = "You are an AI assistant."


@bp.post("/openai")
def chat_completions():
    req = web.json_request()
    body = build_chat_body(req.body)
    add_safety_identifier(body)
    return pipeline.relay_json(pipeline.json_call("POST", "/chat/completions", req, json=body))


@bp.post("/chatgpt")
def simple_chat():
    req = web.json_request()
    body = build_simple_chat_body(req.body, state().config.default_model)
    add_safety_identifier(body)
    completion = pipeline.fetch(pipeline.json_call("POST", "/chat/completions", req, json=body)).json()
    note_answer(req.record, completion)
    return pipeline.json_response(jsonio.dumps(simple_chat_answer(completion)))


def image_part(image: Any) -> dict[str, Any]:
    """`{"url": ...}` or `{"base64": ...}` (url wins) as a Chat Completions image content part."""
    if isinstance(image, dict):
        url = image.get("url")
        if isinstance(url, str) and url:
            return {"type": "image_url", "image_url": {"url": url}}
        data = image.get("base64")
        if isinstance(data, str) and data:
            if not data.startswith("data:"):
                data = f"data:image/png;base64,{data}"
            return {"type": "image_url", "image_url": {"url": data}}
    raise BadRequest("Invalid image payload")


def merge_image(messages: list[Any], part: dict[str, Any]) -> list[Any]:
    """Attach the image to a trailing user message, or append a new user message holding it."""
    messages = list(messages)
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "user":
        content = last.get("content")
        if isinstance(content, str):
            new_content: Any = [{"type": "text", "text": content}, part]
        elif isinstance(content, list):
            new_content = [*content, part]
        elif content is None:
            new_content = [part]
        else:
            raise BadRequest("The last user message has content the image cannot be merged into")
        messages[-1] = {**last, "content": new_content}
    else:
        messages.append({"role": "user", "content": [part]})
    return messages


def build_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """Validate a `/openai` body and fold its optional `image` into the messages."""
    if is_truthy(body.get("stream")):
        raise BadRequest("Streaming is not supported on this endpoint")
    image = body.pop("image", None)
    if image is None:
        return body
    part = image_part(image)
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise BadRequest("messages must be an array")
    body["messages"] = merge_image(messages, part)
    return body


def build_simple_chat_body(body: dict[str, Any], default_model: str) -> dict[str, Any]:
    """The Chat Completions call behind `/chatgpt`: fixed system prompt, the user's prompt."""
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise BadRequest("Missing prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string")
    call: dict[str, Any] = {
        "model": model or default_model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
    }
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = optional_number(body, name, low, high)
        if value is not None:
            call[name] = value
    for name in ("max_tokens", "max_completion_tokens"):
        value = optional_positive_int(body, name)
        if value is not None:
            call[name] = value
    return call


def simple_chat_answer(completion: Any) -> dict[str, Any]:
    """The original `/chatgpt` answer shape around the full completion."""
    text = None
    if isinstance(completion, dict):
        choices = completion.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            message = choices[0].get("message")
            if isinstance(message, dict):
                text = message.get("content")
    return {
        "role": "assistant",
        "id": completion.get("id") if isinstance(completion, dict) else None,
        "parentMessageId": str(uuid.uuid4()),
        "text": text,
        "detail": completion,
    }
