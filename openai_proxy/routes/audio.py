"""`POST /openai/audio/transcriptions`: a multipart upload relayed to `POST /v1/audio/transcriptions`."""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, Response
from werkzeug.datastructures import FileStorage, MultiDict

from openai_proxy import jsonio, pipeline
from openai_proxy.errors import BadRequest
from openai_proxy.inbound import web
from openai_proxy.inbound.multipart import size_of
from openai_proxy.inbound.validation import optional_choice
from openai_proxy.state import state
from openai_proxy.usage import estimate_upload, note_answer

bp = Blueprint("audio", __name__)

DEFAULT_TRANSCRIPTION_MODEL = "whisper-1"
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# Upstream answers these as plain text; the original proxy answered them as a JSON string.
TEXT_FORMATS = ("text", "srt", "vtt")
# Never forwarded: the file travels as the file part, and our answer cannot be a stream.
NOT_FORWARDED = ("file", "stream")

FileTuple = tuple[str, Any, str | None]
# Tells the SDK to send `form` as form fields next to `files`; httpx2 adds the boundary.
MULTIPART_HEADERS = [("Content-Type", "multipart/form-data")]


@bp.post("/openai/audio/transcriptions")
def create_transcription() -> Response:
    with web.form_request(state().config.max_audio_bytes) as req:
        upload = audio_file(req.files)
        fields = build_transcription_fields(req.body)
        call = pipeline.json_call(
            "POST",
            "/audio/transcriptions",
            req,
            form=fields,
            files=[("file", upload)],
            headers=MULTIPART_HEADERS,
        )
        req.record.estimate = estimate_upload(size_of(upload[1]))
        fetched = pipeline.fetch(call)
    return transcription_answer(fetched, fields["response_format"], req.record)


def audio_file(files: MultiDict[str, FileStorage]) -> FileTuple:
    """The `file` part as the SDK takes it: the spooled file object itself, never its bytes."""
    upload = files.get("file")
    # A browser form with no file chosen sends an empty part with an empty filename.
    if upload is None or (not upload.filename and size_of(upload.stream) == 0):
        raise BadRequest("No audio file uploaded")
    return upload.filename or "audio", upload.stream, upload.content_type


def build_transcription_fields(form: MultiDict[str, str]) -> dict[str, Any]:
    """The form fields to forward, in the client's order, with defaults and checks applied.

    Empty values count as absent. `name[]` fields stay lists (the SDK sends each as `name[]`).
    """
    fields: dict[str, Any] = {}
    for name, values in form.lists():
        values = [v for v in values if v != ""]
        if not values or name in NOT_FORWARDED:
            continue
        if name.endswith("[]"):
            fields[name[:-2]] = values
        else:
            fields[name] = values[0]
    fields.setdefault("model", DEFAULT_TRANSCRIPTION_MODEL)
    fields["temperature"] = temperature(fields.get("temperature"))
    response_format = fields.setdefault("response_format", "json")
    optional_choice(response_format, "response_format", RESPONSE_FORMATS)
    return fields


def temperature(raw: str | list[str] | None) -> int | float:
    """A number from 0 to 1 (OpenAI's range), default 0; `nan`, `inf` and non-numbers are refused."""
    if raw is None:
        return 0
    try:
        value = float(raw.strip()) if isinstance(raw, str) else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise BadRequest("temperature must be a number between 0 and 1")
    # Forwarded in plain notation ("0.2", "1"), whatever spelling Python accepted ("2e-1", "1_0").
    return int(value) if value.is_integer() else value


def transcription_answer(fetched: pipeline.Fetched, response_format: str, record: Any) -> Response:
    """JSON formats: the upstream bytes as they are. Text formats: the text as a JSON string."""
    if response_format in TEXT_FORMATS:
        text = fetched.body.decode("utf-8", "replace")
        return pipeline.json_response(jsonio.dumps(text), fetched.status)
    note_answer(record, fetched.json())
    return pipeline.json_response(fetched.body, fetched.status)
