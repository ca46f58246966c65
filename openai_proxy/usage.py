"""Token usage, normalised across Chat Completions, Responses, Embeddings and Audio answers.

`usage_of` gives `{prompt_tokens, completion_tokens, cached_tokens, total_tokens}` (what the log pages
and metrics read) plus what pricing needs, each only when upstream reported it and it is not zero:
`reasoning_tokens` (already inside `completion_tokens`; shown, never priced twice),
`input_audio_tokens` / `output_audio_tokens` (inside prompt / completion tokens), and `seconds` for
usage billed by duration (`{"type": "duration", "seconds": N}`, whisper-1).
"""

from __future__ import annotations

import json
import re
from typing import Any

Usage = dict[str, int | float]

_DECODER = json.JSONDecoder()
# Where a big answer or event names its model and says whether it ran in the background: near its
# start (a Response lists `model` before `output`), else near its end (Embeddings list it after `data`).
HEAD_BYTES = 64 * 1024
_MODEL = re.compile(rb'"model":\s*"([^"\\]{1,200})"')
_BACKGROUND = re.compile(rb'"background":\s*true')


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _detail(usage: dict[str, Any], names: tuple[str, ...], key: str) -> int | None:
    for name in names:
        details = usage.get(name)
        if isinstance(details, dict) and (value := _int(details.get(key))) is not None:
            return value
    return None


def _usage_object(data: Any) -> dict[str, Any] | None:
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        response = data.get("response")  # a `response.completed` stream event
        usage = response.get("usage") if isinstance(response, dict) else None
    return usage if isinstance(usage, dict) else None


def usage_of(data: Any) -> Usage | None:
    """Upstream's usage in an answer or a final stream event, normalised; None when it has none."""
    usage = _usage_object(data)
    if usage is None:
        return None
    if usage.get("type") == "duration":  # transcription billed by the second of audio
        seconds = usage.get("seconds")
        ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0
        return {"seconds": seconds} if ok else None
    prompt = _int(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _int(usage.get("input_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if completion is None:
        completion = _int(usage.get("output_tokens"))
    # Chat says `prompt_tokens_details`, Responses `input_tokens_details`, transcriptions
    # `input_token_details`; the output side likewise.
    inputs = ("prompt_tokens_details", "input_tokens_details", "input_token_details")
    outputs = ("completion_tokens_details", "output_tokens_details", "output_token_details")
    out: dict[str, int | None] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": _detail(usage, inputs, "cached_tokens"),
        "total_tokens": _int(usage.get("total_tokens")),
    }
    clean: Usage = {k: v for k, v in out.items() if v is not None}
    for key, value in (
        ("reasoning_tokens", _detail(usage, outputs, "reasoning_tokens")),
        ("input_audio_tokens", _detail(usage, inputs, "audio_tokens")),
        ("output_audio_tokens", _detail(usage, outputs, "audio_tokens")),
    ):
        if value:  # absent means 0: most answers have none, and records stay small
            clean[key] = value
    return clean or None


def note_answer(record: Any, data: Any) -> None:
    """Record upstream's own usage and model from an answer or a final stream event.

    A Response that ran in the background is billed where its usage shows up (a retrieve, a
    resumed stream, a cancel): its create call answered before any usage existed."""
    usage = usage_of(data)
    if usage is not None:
        record.usage = usage
    if not isinstance(data, dict):
        return
    obj = data.get("response") if isinstance(data.get("response"), dict) else data
    model = obj.get("model")
    if isinstance(model, str) and model:
        record.upstream_model = model
    if obj.get("background") is True:
        record.billable = True


def usage_in_tail(raw: bytes | bytearray) -> dict[str, Any] | None:
    """The `usage` object of a huge answer or event, read from its tail instead of parsing it whole.

    OpenAI writes `usage` after `output`, `choices` or `data` (only `user` and `metadata` may follow),
    and a `"usage":` inside a string is escaped, so the last `"usage":` whose value is an object with
    token counts (or a duration) is the answer's own. None when none is found."""
    end = len(raw)
    for _ in range(4):  # a metadata key may be called "usage" too
        at = raw.rfind(b'"usage":', 0, end)
        if at < 0:
            return None
        try:
            text = bytes(raw[at + 8 : at + 8 + 4096]).decode("utf-8", "replace").lstrip()
            usage, _ = _DECODER.raw_decode(text)
        except ValueError:
            usage = None
        if isinstance(usage, dict) and (
            {"input_tokens", "output_tokens", "prompt_tokens", "completion_tokens"} & usage.keys()
            or usage.get("type") == "duration"
        ):
            return usage
        end = at
    return None


def summary_of_big(head: bytes | bytearray, tail: bytes | bytearray) -> dict[str, Any]:
    """What `note_answer` reads, taken from the first and last bytes of a huge answer or event."""
    out: dict[str, Any] = {}
    usage = usage_in_tail(tail)
    if usage is not None:
        out["usage"] = usage
    found = _MODEL.search(head, 0, HEAD_BYTES) or _last(_MODEL, tail)
    if found:
        out["model"] = found.group(1).decode("utf-8", "replace")
    if _BACKGROUND.search(head, 0, HEAD_BYTES):
        out["background"] = True
    return out


def _last(pattern: re.Pattern[bytes], data: bytes | bytearray) -> re.Match[bytes] | None:
    found = None
    for found in pattern.finditer(data):  # noqa: B007 - the last match is the one wanted
        pass
    return found
