"""The upstream OpenAI API: one worker's client, and `send`, the one way every route calls it.

Every call goes through `UpstreamClient` (geventhttpclient: TLS, outbound proxy, llhttp). Two ways
to drive it, one result type (`UpstreamResponse`, returned once headers are in, whatever the status):
- Plain calls and streams (create-style calls, which are never retried, and all of `/v1`) are sent as
  they are: the SDK's request machinery alone costs more CPU than the proxy's per-request budget.
- Calls the contract retries (idempotent reads, deletes, token counts) and the legacy multipart
  upload go through the official SDK, for its retry policy and its multipart encoding; its HTTP
  still goes through the same client (`openai_proxy.upstream.sdk.WireTransport`).
Both bound each attempt's wait for response *headers*; once headers are in, a slow body or stream is
not cut by it.

With a key pool (`OPENAI_API_KEYS`), a call that brings no key of its own takes one from the pool per
attempt and may fail over once (`openai_proxy.upstream.failover`). On the SDK's road the key is chosen per SDK
attempt, in its transport: an SDK retry after a 429 goes out with another key, and the one failover is
shared with the SDK's retries, so a call makes at most its SDK attempts plus one.
"""

from __future__ import annotations

import time
from typing import Any

import httpx2
import openai

from openai_proxy.config import Config
from openai_proxy.keys import UpstreamKeys
from openai_proxy.upstream.call import Credentials, RetrySink, UpstreamCall, authorization
from openai_proxy.upstream.client import UpstreamClient, UpstreamResponse
from openai_proxy.upstream.failover import PoolCall
from openai_proxy.upstream.sdk import (
    RAW_RESPONSE_HEADER,
    WIRE,
    Attempts,
    WireTransport,
    current_attempts,
)
from openai_proxy.upstream.settings import CONNECT_TIMEOUT_S, READ_MARGIN_S, ClientSettings

__all__ = ["CONNECT_TIMEOUT_S", "READ_MARGIN_S", "RETRIES_IDEMPOTENT", "Credentials", "Upstream",
           "UpstreamCall", "UpstreamResponse"]  # fmt: skip

RETRIES_IDEMPOTENT = 2
JSON_HEADERS = [("Content-Type", "application/json")]
# Identity coding: the proxy reads usage from bodies and relays them byte for byte (a body upstream
# compresses anyway is decoded by the client).
_STATIC_HEADERS = [("Accept", "application/json"), ("Accept-Encoding", "identity")]
_SDK_METHODS = {"GET": "get", "POST": "post", "DELETE": "delete"}


class Upstream:
    """One worker's access to the OpenAI API: a shared connection pool, two retry policies."""

    def __init__(self, config: Config, key_pool: UpstreamKeys | None = None) -> None:
        self.config = config
        self.pool = key_pool
        self.retry_sinks: list[RetrySink] = []
        # The SDK is built on our transport from the start: a default httpx2 client would load the
        # system's CAs into a TLS context of its own (tens of milliseconds per app) only to be
        # replaced. The transport gets its UpstreamClient once the SDK has named its User-Agent.
        transport = WireTransport()
        self._http = httpx2.Client(transport=transport, timeout=None, trust_env=False)
        # The constructor key is never what upstream sees: every call sends explicit credentials.
        sdk = openai.OpenAI(
            api_key="unset", base_url=config.openai_base_url, max_retries=0, http_client=self._http
        )
        self.settings = ClientSettings.from_config(config, sdk.user_agent)
        self.client = transport.client = UpstreamClient(self.settings)
        self._static_headers = [("User-Agent", sdk.user_agent), *_STATIC_HEADERS]
        self._sdk = {0: sdk, RETRIES_IDEMPOTENT: sdk.with_options(max_retries=RETRIES_IDEMPOTENT)}

    def credentials(
        self,
        api_key: str | None,
        project: str | None,
        organization: str | None,
        key_names: frozenset[str] | None = None,
    ) -> Credentials:
        """Request overrides win; empty means unset, which falls back to the configuration (the key
        pool when there is one: a key per attempt, among `key_names` when the client is restricted)."""
        config = self.config
        if api_key or self.pool is None:
            return Credentials(
                api_key=api_key or config.openai_api_key,
                project=project or config.openai_project,
                organization=organization or config.openai_organization,
            )
        return Credentials(
            api_key=None,
            project=project or config.openai_project,
            organization=organization or config.openai_organization,
            pooled=True,
            key_names=key_names,
        )

    def send(self, call: UpstreamCall) -> UpstreamResponse:
        """Make the call; return once upstream's headers are in, whatever the status.

        An error status after the SDK's last retry comes back as the SDK's `APIStatusError`.
        """
        call.record.upstream_started = time.perf_counter()
        if call.retries or call.files is not None:
            return self._send_sdk(call)
        query = call.query or (self._sdk[0].qs.stringify(call.params) if call.params else "")
        target = self.settings.base_path + call.path + (f"?{query}" if query else "")
        headers = [*self._static_headers, *call.credentials.header_list(), *call.headers]
        if call.credentials.pooled:
            body = call.body
            response = self._pool_call(call).send(
                lambda key: self._send_plain(call, target, [*headers, authorization(key)]),
                replayable=body is None
                or isinstance(body, bytes | bytearray)
                or getattr(body, "replayable", False),
            )
        else:
            response = self._send_plain(call, target, headers)
        call.record.note_upstream_answer(response.headers)
        return response

    def _send_plain(
        self, call: UpstreamCall, target: str, headers: list[tuple[str, str]]
    ) -> UpstreamResponse:
        return self.client.send(
            call.method,
            target,
            headers,
            call.body,
            header_timeout=call.timeout.seconds,
            content_length=call.content_length,
            trace=call.record.trace,
        )

    def _pool_call(self, call: UpstreamCall) -> PoolCall:
        assert self.pool is not None
        creds = call.credentials
        return PoolCall(
            self.pool, call.record, call.path, self.retry_sinks, creds.key_names, pinned=creds.object_key
        )

    def _send_sdk(self, call: UpstreamCall) -> UpstreamResponse:
        verb = _SDK_METHODS.get(call.method.upper())
        if verb is None:
            raise ValueError(f"unsupported method for a retried call: {call.method}")
        creds = call.credentials
        pool_call = self._pool_call(call) if creds.pooled else None
        attempts = Attempts(call.record, call.timeout.seconds, self.retry_sinks, pool=pool_call)
        headers: dict[str, Any] = {
            "Authorization": authorization(creds.api_key)[1] if creds.api_key else openai.omit,
            "OpenAI-Project": creds.project or openai.omit,
            "OpenAI-Organization": creds.organization or openai.omit,
            # Hand back the response unread, whatever the method: the pipeline reads or relays it.
            RAW_RESPONSE_HEADER: "stream",
            **dict(call.headers),
        }
        options: dict[str, Any] = {"headers": headers}
        if call.params:
            options["params"] = call.params
        args: dict[str, Any] = {"cast_to": httpx2.Response, "options": options}
        if verb == "post":
            args.update(body=call.form, content=call.body, files=call.files)
        if pool_call is not None:
            # Chosen before the SDK starts: when every key rests, nothing else is done. (A later
            # attempt that finds none raises KeysUnavailable in the transport, which ends the call.)
            attempts.lease = pool_call.first()
        token = current_attempts.set(attempts)
        try:
            response = getattr(self._sdk[call.retries], verb)(call.path, **args)
        finally:
            current_attempts.reset(token)
            if attempts.lease is not None:  # the SDK failed before its first attempt
                attempts.lease.release()
        return response.extensions[WIRE]

    def close(self) -> None:
        self._http.close()
        self.client.close()
        if self.pool is not None:
            self.pool.close()
