"""Reading multipart bodies: size limits, file parts spooled to disk, clear 400s for bad bodies.

Text fields stay in memory (bounded by Flask's form limits); file parts go to unlinked temp files,
which the SDK later streams upstream, so an upload is never held whole in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from typing import IO

from flask import g, request
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from openai_proxy.errors import BadRequest, PayloadTooLarge

# Room for a form's text fields, part headers and boundaries on top of its file size limit, so a
# file of exactly the limit is accepted while the body as a whole is still bounded before reading.
FORM_OVERHEAD_BYTES = 1024 * 1024


class Spool:
    """The temp files the form parser writes file parts to, so all of them can be closed at once."""

    def __init__(self) -> None:
        self.files: list[IO[bytes]] = []

    def open(  # werkzeug's stream_factory signature
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        # Always on disk, never in memory: the file is unlinked at once, so closing it (or the
        # worker dying) frees the space, and the SDK streams it from the descriptor.
        file = tempfile.TemporaryFile("w+b")  # noqa: SIM115 (closed by close())
        self.files.append(file)
        return file

    def close(self) -> None:
        for file in self.files:
            file.close()


class _ClientBody:
    """The request body as the form parser reads it: counted, copied to `copy` if given, and read
    failures become 400s."""

    def __init__(self, stream: IO[bytes], copy: IO[bytes] | None = None) -> None:
        self._stream = stream
        self._copy = copy
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._stream.read(size)
        except RequestEntityTooLarge:
            raise
        except (ClientDisconnected, OSError):
            raise BadRequest(_truncated_message(self.received)) from None
        except Exception as exc:
            # The server's own reader refusing the framing (a bad chunk, say) is the client's fault.
            raise BadRequest(f"The request body could not be read ({type(exc).__name__})") from None
        self.received += len(data)
        if self._copy is not None:
            self._copy.write(data)
        return data


# What werkzeug's "cannot parse beyond <state>" means for the client.
_UNFINISHED_FORM = {
    "PREAMBLE": "no part starts with the boundary given in Content-Type",
    "PART": "it ends inside the headers of a part",
    "DATA_START": "it ends in the middle of a part",
    "DATA": "it ends in the middle of a part",
}


def _truncated_message(received: int) -> str:
    expected = request.content_length
    of = f" of the {expected} announced" if expected is not None else ""
    return f"Truncated upload: the request body ended after {received}{of} bytes"


def _parse_error(exc: ValueError, body: _ClientBody) -> BadRequest:
    expected = request.content_length
    if expected is not None and body.received < expected:
        return BadRequest(_truncated_message(body.received))
    state = str(exc).rpartition("State.")[2]
    return BadRequest(f"Malformed multipart body: {_UNFINISHED_FORM.get(state, str(exc))}")


def read_limited_form(
    limit: int, copy: IO[bytes] | None = None
) -> tuple[MultiDict[str, str], MultiDict[str, FileStorage], Spool]:
    """A multipart body as text fields and files spooled to disk; 413 if a file or the body is too big.

    The body is refused before reading when Content-Length says it is too big, and reading stops
    at the limit otherwise; malformed or truncated bodies are 400s. `copy` gets the body's bytes as
    they were read (to send them on unchanged).
    """
    if request.mimetype != "multipart/form-data":
        raise BadRequest("Content-Type must be multipart/form-data")
    boundary = request.mimetype_params.get("boundary", "")
    if not boundary or not boundary.isascii():
        raise BadRequest("Content-Type multipart/form-data needs a boundary parameter")
    g.body_limit = limit
    request.max_content_length = limit + FORM_OVERHEAD_BYTES
    body = _ClientBody(request.stream, copy)  # raises the 413 here when Content-Length is over
    spool = Spool()
    parser = FormDataParser(
        stream_factory=spool.open,
        max_form_memory_size=request.max_form_memory_size,
        max_form_parts=request.max_form_parts,
        cls=MultiDict,
        silent=False,
    )
    try:
        _, fields, files = parser.parse(
            body, request.mimetype, request.content_length, request.mimetype_params
        )
        for _, upload in files.items(multi=True):
            if size_of(upload.stream) > limit:
                raise PayloadTooLarge(f"Uploaded file exceeds the {limit}-byte limit")
    except RequestEntityTooLarge:
        spool.close()
        if body.received < request.max_content_length:
            # werkzeug's own caps: text kept in memory (a field, or bytes before the first boundary)
            # and the number of parts.
            raise PayloadTooLarge(
                f"A form text field (or text before the first boundary) exceeds "
                f"{request.max_form_memory_size} bytes, or the form has over {request.max_form_parts} parts"
            ) from None
        raise
    except ValueError as exc:
        spool.close()
        raise _parse_error(exc, body) from None
    except BaseException:
        spool.close()
        raise
    return fields, files, spool


def size_of(stream: IO[bytes]) -> int:
    """The size of a spooled file, which is left at its start."""
    size = stream.seek(0, 2)
    stream.seek(0)
    return size


# A watched field longer than this is not the short value looked for (a model name, say).
MAX_WATCHED_VALUE = 256
# The decoder holds at most about one read beyond what it has given out; more means no boundary.
MAX_WATCH_BUFFER = 1024 * 1024


def watch_text_field(
    chunks: Iterator[bytes], content_type: str, name: str, found: Callable[[str], None]
) -> Iterator[bytes]:
    """A multipart body on its way upstream, passed on unchanged; `found` gets the value of the text
    field `name` as it goes by. The SDKs send fields before the file, so that is in the first read."""
    boundary = parse_options_header(content_type)[1].get("boundary", "")
    watch = _FieldWatch(boundary.encode(), name, found) if boundary.isascii() and boundary else None
    for chunk in chunks:
        if watch is not None and not watch.feed(chunk):
            watch = None
        yield chunk


class _FieldWatch:
    def __init__(self, boundary: bytes, name: str, found: Callable[[str], None]) -> None:
        self._decoder = MultipartDecoder(boundary)
        self._name = name
        self._found = found
        self._value: bytearray | None = None  # the watched field's bytes while inside it

    def feed(self, data: bytes) -> bool:
        """Decode one more piece; whether it is worth watching further."""
        decoder = self._decoder
        try:
            decoder.receive_data(data)
            while (event := decoder.next_event()) is not NEED_DATA:
                if isinstance(event, (Field, File)):
                    watched = isinstance(event, Field) and event.name == self._name
                    self._value = bytearray() if watched else None
                elif isinstance(event, Data) and self._value is not None:
                    self._value += event.data
                    if len(self._value) > MAX_WATCHED_VALUE:
                        return False
                    if not event.more_data:
                        self._found(self._value.decode("utf-8", "replace"))
                        return False
                elif isinstance(event, Epilogue):
                    return False
        except ValueError:  # not multipart after all: upstream will say so
            return False
        return len(decoder.buffer) <= MAX_WATCH_BUFFER
