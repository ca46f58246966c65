"""Token usage, normalised across Chat Completions, Responses, Embeddings and Audio answers.

`usage_of` gives `{prompt_tokens, completion_tokens, cached_tokens, total_tokens}` (what the log pages
and metrics read) plus what pricing needs, each only when upstream reported it and it is not zero:
`reasoning_tokens` (already inside `completion_tokens`; shown, never priced twice),
`input_audio_tokens` / `output_audio_tokens` (inside prompt / completion tokens), and `seconds` for
usage billed by duration (`{"type": "duration", "seconds": N}`, whisper-1).

Upstream's numbers are checked, never trusted: a token count that is not an integer in 0 <= n < 2**53
(negative, huge, a float, a string) or a duration that is not a finite number in that range makes the
whole usage unknown (`read_usage`), so no answer can produce a negative or overflowing cost.

`estimate_json` / `estimate_upload` give what a call may use before it is made, for budget
reservations and for calls whose usage never arrives (a stream the client cut): input tokens = the
request body's bytes / 4, rounded up (JSON syntax, keys and base64 payloads included, so it errs high);
output tokens = the call's own `max_output_tokens` / `max_completion_tokens` / `max_tokens`, capped at
DEFAULT_MAX_OUTPUT_TOKENS (which is also the value when it names none), times chat's `n`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Usage = dict[str, int | float]

# Counts at or past this are not counts (2**53: where a JSON number stops being an exact integer).
MAX_COUNT = 2**53
BYTES_PER_TOKEN = 4
# The output a call is assumed to produce when it names no smaller maximum: enough for most answers,
# small enough that a modest budget still admits calls side by side.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
# Audio uploads: seconds of audio per byte assumed for a duration-priced model (128 kbit/s).
AUDIO_BYTES_PER_SECOND = 16_000
_MAX_FIELDS = ("max_output_tokens", "max_completion_tokens", "max_tokens")

_DECODER = json.JSONDecoder()
# Where a big answer or event names its model and says whether it ran in the background: near its
# start (a Response lists `model` before `output`), else near its end (Embeddings list it after `data`).
HEAD_BYTES = 64 * 1024
_MODEL = re.compile(rb'"model":\s*"([^"\\]{1,200})"')
_BACKGROUND = re.compile(rb'"background":\s*true')
_SERVICE_TIER = re.compile(rb'"service_tier":\s*"([A-Za-z_]{1,20})"')


class BadUsage(ValueError):
    """Upstream's usage has a count that is not a count: the usage is unknown."""


def _int(value: Any) -> int | None:
    """A token count: None when absent; BadUsage unless an integer in 0 <= n < 2**53."""
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < MAX_COUNT:
        raise BadUsage(f"token count {value!r}")
    return value


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
    if usage is None:
        response = data.get("response")  # a `response.completed` stream event
        usage = response.get("usage") if isinstance(response, dict) else None
    if usage is not None and not isinstance(usage, dict):
        raise BadUsage(f"usage {type(usage).__name__}")
    return usage


def usage_of(data: Any) -> Usage | None:
    """Upstream's usage in an answer or a final stream event, normalised; None when it has none or
    it is not usable (`read_usage` tells the two apart)."""
    return read_usage(data)[0]


def read_usage(data: Any) -> tuple[Usage | None, bool]:
    """(upstream's usage normalised, or None; whether upstream sent usage that is not usable)."""
    try:
        return _read_usage(data), False
    except BadUsage:
        return None, True


def _read_usage(data: Any) -> Usage | None:
    usage = _usage_object(data)
    if usage is None:
        return None
    if usage.get("type") == "duration":  # transcription billed by the second of audio
        seconds = usage.get("seconds")
        ok = isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds)
        if not ok or not 0 <= seconds < MAX_COUNT:
            raise BadUsage(f"duration {seconds!r}")
        return {"seconds": seconds}
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
    """Record upstream's own usage, model and service tier from an answer or a final stream event;
    usage that is there but not usable is noted as such (`record.usage_invalid`).

    A Response that ran in the background is billed where its usage shows up (a retrieve, a
    resumed stream, a cancel): its create call answered before any usage existed."""
    usage, invalid = read_usage(data)
    if usage is not None or invalid:
        record.usage = usage
        record.usage_invalid = invalid
    if not isinstance(data, dict):
        return
    obj = data.get("response") if isinstance(data.get("response"), dict) else data
    model = obj.get("model")
    if isinstance(model, str) and model:
        record.upstream_model = model
    tier = obj.get("service_tier")
    if isinstance(tier, str) and tier:
        record.service_tier = tier
    if obj.get("background") is True:
        record.billable = True
        if usage is None and not invalid:
            record.usage_deferred = True  # priced where its usage shows (see above)


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
    # A Response names its tier after `output`, a chat completion after `choices`: the tail first.
    tier = _last(_SERVICE_TIER, tail) or _SERVICE_TIER.search(head, 0, HEAD_BYTES)
    if tier:
        out["service_tier"] = tier.group(1).decode()
    if _BACKGROUND.search(head, 0, HEAD_BYTES):
        out["background"] = True
    return out


def _last(pattern: re.Pattern[bytes], data: bytes | bytearray) -> re.Match[bytes] | None:
    found = None
    for found in pattern.finditer(data):  # noqa: B007 - the last match is the one wanted
        pass
    return found


@dataclass(frozen=True)
class Estimate:
    """What a call may use, judged from its request before it is made (see the module's docstring)."""

    input_tokens: int
    output_tokens: int
    audio_seconds: float | None = None  # for a duration-priced transcription
    service_tier: str | None = None  # the tier the call asks for


def _requested_max(body: Mapping[str, Any]) -> int:
    for name in _MAX_FIELDS:
        value = body.get(name)
        if type(value) is int and value > 0:
            return min(value, DEFAULT_MAX_OUTPUT_TOKENS)
    return DEFAULT_MAX_OUTPUT_TOKENS


def estimate_json(size: int, body: Mapping[str, Any]) -> Estimate:
    """The estimate of a JSON call whose body is `size` bytes."""
    choices = body.get("n")
    times = choices if type(choices) is int and 1 <= choices <= 128 else 1
    tier = body.get("service_tier")
    return Estimate(
        input_tokens=math.ceil(size / BYTES_PER_TOKEN),
        output_tokens=_requested_max(body) * times,
        service_tier=tier if isinstance(tier, str) else None,
    )


def estimate_upload(size: int | None) -> Estimate:
    """The estimate of an audio upload of `size` bytes (None: unknown): its transcript's output, and
    its duration at AUDIO_BYTES_PER_SECOND for a model priced by the minute."""
    seconds = None if size is None else size / AUDIO_BYTES_PER_SECOND
    return Estimate(input_tokens=0, output_tokens=DEFAULT_MAX_OUTPUT_TOKENS, audio_seconds=seconds)
