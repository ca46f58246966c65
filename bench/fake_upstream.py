"""A fast fake OpenAI API for benchmarks: asyncio protocol, pre-rendered answers, optional processes.

Unlike tests/fake_upstream.py (built for faults and inspection), this one is built to not be the
bottleneck. It answers chat completions, responses (JSON, or SSE when the body asks to stream) and
embeddings after a configurable latency; streams send `--events` events `--gap-ms` apart.

    python -m bench.fake_upstream --port 9100 --latency-ms 50 --events 50 --gap-ms 20 --procs 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys

CHAT = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1741476542,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32},
    },
    separators=(",", ":"),
).encode()
RESPONSE = json.dumps(
    {
        "id": "resp_bench",
        "object": "response",
        "status": "completed",
        "model": "gpt-4o-mini",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello.", "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12},
    },
    separators=(",", ":"),
).encode()
EMBEDDINGS = json.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292] * 64}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    },
    separators=(",", ":"),
).encode()
NOT_FOUND = b'{"error":{"message":"unknown path","type":"invalid_request_error","code":null,"param":null}}'


def sse_events(n: int) -> list[bytes]:
    created = {
        "type": "response.created",
        "sequence_number": 0,
        "response": {"id": "resp_bench", "model": "m"},
    }
    events = [created]
    for i in range(max(n - 2, 0)):
        events.append({"type": "response.output_text.delta", "sequence_number": i + 1, "delta": f"tok{i} "})
    events.append(
        {
            "type": "response.completed",
            "sequence_number": n - 1,
            "response": {
                "id": "resp_bench",
                "status": "completed",
                "usage": {"input_tokens": 5, "output_tokens": n},
            },
        }
    )
    out = []
    for ev in events[:n]:
        data = json.dumps(ev, separators=(",", ":")).encode()
        frame = b"event: " + ev["type"].encode() + b"\ndata: " + data + b"\n\n"
        out.append(b"%x\r\n%s\r\n" % (len(frame), frame))
    return out


def head(status: int, length: int | None, content_type: bytes) -> bytes:
    reason = b"OK" if status == 200 else b"Not Found"
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"Content-Type: " + content_type,
        b"x-request-id: req_bench",
    ]
    lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Upstream(asyncio.Protocol):
    """One client connection: parse requests (Content-Length bodies), answer them in order."""

    def __init__(self, opts: argparse.Namespace, events: list[bytes]) -> None:
        self.opts = opts
        self.events = events
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            header = self.buffer[:end].decode("latin-1")
            lines = header.split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            rest = self.buffer[end + 4 :]
            # The proxy (httpx) and the load tools send Content-Length bodies; that is all we need.
            length = int(fields.get("content-length", "0"))
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            method, path, _ = lines[0].split(" ", 2)
            self.queue.put_nowait((method, path.split("?", 1)[0], path, body))

    async def serve(self) -> None:
        opts, write = self.opts, self.transport.write
        while True:
            _method, path, target, body = await self.queue.get()
            if opts.latency_ms:
                await asyncio.sleep(opts.latency_ms / 1000.0)
            if path == "/v1/chat/completions":
                write(head(200, len(CHAT), b"application/json") + CHAT)
            elif path == "/v1/embeddings":
                write(head(200, len(EMBEDDINGS), b"application/json") + EMBEDDINGS)
            elif path == "/v1/responses" and b'"stream":true' not in body.replace(b" ", b""):
                write(head(200, len(RESPONSE), b"application/json") + RESPONSE)
            elif path == "/v1/responses" or (path.startswith("/v1/responses/") and "stream=true" in target):
                write(head(200, None, b"text/event-stream"))
                for i, frame in enumerate(self.events):
                    if i and opts.gap_ms:
                        await asyncio.sleep(opts.gap_ms / 1000.0)
                    if self.transport.is_closing():
                        return
                    write(frame)
                write(b"0\r\n\r\n")
            else:
                write(head(404, len(NOT_FOUND), b"application/json") + NOT_FOUND)


def serve(opts: argparse.Namespace, sock: socket.socket) -> None:
    async def main() -> None:
        events = sse_events(opts.events)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Upstream(opts, events), sock=sock, backlog=4096)
        async with server:
            await server.serve_forever()

    try:
        import uvloop  # optional: faster still if installed

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--procs", type=int, default=1)
    opts = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", opts.port))
    sock.listen(4096)
    sock.setblocking(False)
    children = []
    for _ in range(opts.procs - 1):
        pid = os.fork()
        if pid == 0:
            serve(opts, sock)
            os._exit(0)
        children.append(pid)

    def stop(*_):
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"bench upstream on 127.0.0.1:{opts.port} ({opts.procs} process(es))", flush=True)
    serve(opts, sock)


if __name__ == "__main__":
    main()
