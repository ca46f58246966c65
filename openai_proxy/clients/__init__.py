"""Named clients: who may call the API routes, under which limits, for which models.

`OPENAI_PROXY_CLIENTS_FILE` is a TOML file (read with the standard library's `tomllib`)::

    [[client]]
    name = "billing-service"            # [A-Za-z0-9_.-]{1,64}, unique
    key_sha256 = "9f86d0…"              # hex SHA-256 of the key (or `key = "<the key>"`)
    rpm = 600                           # requests per minute      (all four optional)
    tpm = 200000                        # tokens per minute
    daily_usd = 25.0                    # budget per UTC day
    monthly_usd = 500.0                 # budget per UTC month
    models = ["gpt-4o-mini"]            # allowed models; others are refused with 403
    keys = ["team-a"]                   # upstream keys of the pool it may use (default: any)
    unknown_objects = "allow"           # may use stored objects the proxy has no record of (default: "deny")

    [[upstream_key]]                    # more keys for the upstream key pool (`openai_proxy.keys.pool`)
    name = "team-a"
    key = "sk-..."
    weight = 2                          # optional, 1-100
    models = ["gpt-4o-mini"]            # optional: the models this key may serve

`SECURITY_KEY`, when set, is the client `default` with no limits, so a deployment without a clients file
changes nothing. Anything wrong in the file (syntax, an unknown field, a duplicate name or key, a bad
value) is a `ClientsFileError` naming the file, the line and the reason.

Lookup is by the SHA-256 digest of the presented key: one hash and one dict lookup whatever the number
of clients, and the time taken says nothing about any stored key (an attacker would need a preimage of
a digest to make the lookup take a different path).
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openai_proxy.keys.specs import KeySpec, KeySpecError, key_spec
from openai_proxy.keys.specs import add as add_key
from openai_proxy.limits import Limits

DEFAULT_CLIENT = "default"
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_FIELDS = (
    "name", "key", "key_sha256", "rpm", "tpm", "daily_usd", "monthly_usd", "models", "keys", "unknown_objects",
)  # fmt: skip
UNKNOWN_OBJECTS = {"allow": True, "deny": False}
_KEY_FIELDS = ("name", "key", "weight", "models")
_INTS = ("rpm", "tpm")
_USD = ("daily_usd", "monthly_usd")
# Past these a value is a typo, not a plan (and would overflow the limit stores' arithmetic).
MAX_PER_MINUTE = 10**12
MAX_USD = 10.0**9


class ClientsFileError(ValueError):
    """The clients file cannot be used; the message names the file, the line and the reason."""


@dataclass(frozen=True)
class Client:
    """One client as the request path sees it: its name, limits and allowed models (None = any).

    `unknown_objects`: whether it may use stored objects (responses, files, ...) the proxy has no record
    of, made outside the proxy or before it recorded owners (`openai_proxy.objects`). True for `default`
    (SECURITY_KEY, the deployment's own key), False for named clients unless their table says "allow".
    """

    name: str
    limits: Limits = field(default_factory=Limits)
    models: frozenset[str] | None = None
    keys: frozenset[str] | None = None  # names of the upstream keys it may use; None: any
    unknown_objects: bool = False
    # The SHA-256 of its key: what its `safety_identifier` is made from when no secret is configured.
    digest: bytes = field(default=b"", repr=False, compare=False)

    @property
    def restricted(self) -> bool:
        """Whether the client may only use some models (`openai_proxy.clients.admission` judges them)."""
        return self.models is not None

    @property
    def judged(self) -> bool:
        """Whether the proxy must know every model a call of this client runs before it goes upstream:
        for a model list, or for a budget (an unpriced or unnamed model could never be counted)."""
        return self.models is not None or self.limits.budgeted()


def key_digest(key: str) -> bytes:
    """The SHA-256 of a secret (a client key, the access token): how keys are looked up and compared."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ClientBook:
    """The configured clients, looked up by the digest of the key a request presents."""

    def __init__(
        self,
        entries: Iterable[tuple[bytes, Client]] = (),
        source: str | None = None,
        upstream_keys: tuple[KeySpec, ...] = (),
    ) -> None:
        self.upstream_keys = upstream_keys  # the pool: the environment's keys, then the file's
        self._by_digest: dict[bytes, Client] = {}
        self._by_name: dict[str, Client] = {}
        for digest, client in entries:
            self._by_digest[digest] = client
            self._by_name[client.name] = client
        self.source = source

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Client | None:
        return self._by_name.get(name)

    def authenticate(self, provided: str | None) -> Client:
        """The client whose key was presented; Forbidden (with the contract's messages) otherwise."""
        # Imported here: gunicorn's master loads this module to check the file, and must not import
        # the SDK (ssl) before its workers monkey-patch.
        from openai_proxy.errors import Forbidden

        if not self._by_digest:
            raise Forbidden("The proxy has no SECURITY_KEY configured; API routes are disabled")
        if not provided:
            raise Forbidden("Missing security_key")
        client = self._by_digest.get(key_digest(provided))
        if client is None:
            raise Forbidden("Invalid security_key")
        return client

    def limited(self) -> bool:
        """Whether any client has a limit (the request path skips the limit store otherwise)."""
        return any(c.limits.any() for c in self._by_name.values())


def load_clients(
    path: str | None,
    security_key: str | None,
    env_keys: tuple[KeySpec, ...] = (),
    single_key: str | None = None,
) -> tuple[ClientBook, list[str]]:
    """The clients of `path` (if any) plus `default` for SECURITY_KEY, with the upstream key pool
    (`env_keys` from OPENAI_API_KEYS, then the file's `[[upstream_key]]`s; OPENAI_API_KEY joins them
    when the file alone makes a pool), and the plain keys found in the file (secrets to mask).
    Raises ClientsFileError."""
    entries: list[tuple[bytes, Client]] = []
    plain_keys: list[str] = []
    pool = list(env_keys)
    if security_key:
        digest = key_digest(security_key)
        entries.append((digest, Client(DEFAULT_CLIENT, unknown_objects=True, digest=digest)))
    if path:
        parsed, plain_keys, file_keys = _parse_file(path, dict(entries), pool, single_key)
        entries += parsed
        plain_keys += [spec.key for spec in file_keys]
    return ClientBook(entries, source=path, upstream_keys=tuple(pool)), plain_keys


def _parse_file(
    path: str, taken: dict[bytes, Client], pool: list[KeySpec], single_key: str | None
) -> tuple[list[tuple[bytes, Client]], list[str], list[KeySpec]]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ClientsFileError(f"{path}: cannot read the clients file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ClientsFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "<reason> (at line N, column M)"; put the line where every other message has it.
        where = re.search(r"\(at line (\d+), column (\d+)\)$", str(exc))
        if where is None:
            raise ClientsFileError(f"{path}: {exc}") from None
        reason = str(exc)[: where.start()].strip()
        raise ClientsFileError(f"{path}:{where.group(1)}: {reason} (column {where.group(2)})") from None
    lines = _table_lines(text)
    unknown = sorted(set(doc) - {"client", "upstream_key"})
    if unknown:
        line = _line_of_key(text, unknown[0], 0, None)
        raise ClientsFileError(
            f"{path}:{line}: unknown key {unknown[0]!r}; expected [[client]] and [[upstream_key]] tables"
        )
    tables = doc.get("client", [])
    key_tables = doc.get("upstream_key", [])
    for name, value in (("client", tables), ("upstream_key", key_tables)):
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise ClientsFileError(f"{path}: `{name}` must be an array of tables: [[{name}]]")
    file_keys = _upstream_keys(path, text, key_tables, pool, single_key)
    pool_names = {spec.name for spec in pool}
    out, plain = [], []
    names = {client.name for client in taken.values()}
    for index, table in enumerate(tables):
        where = _Where(path, text, lines, index)
        digest, client, key = _client(table, where)
        missing = sorted((client.keys or frozenset()) - pool_names)
        if missing:
            raise where.error("keys", f"client {client.name!r}: no upstream key is named {missing[0]!r}"
                              " (OPENAI_API_KEYS or [[upstream_key]])")  # fmt: skip
        if client.name in names:
            why = " (SECURITY_KEY is the client 'default')" if client.name == DEFAULT_CLIENT else ""
            raise where.error("name", f"duplicate client name {client.name!r}{why}")
        if digest in taken:
            raise where.error("key" if key else "key_sha256",
                              f"client {client.name!r} has the same key as {taken[digest].name!r}"
                              " (SECURITY_KEY is the client 'default')")  # fmt: skip
        names.add(client.name)
        taken[digest] = client
        out.append((digest, client))
        if key:
            plain.append(key)
    return out, plain, file_keys


def _upstream_keys(
    path: str, text: str, tables: list[dict[str, Any]], pool: list[KeySpec], single_key: str | None
) -> list[KeySpec]:
    """The file's `[[upstream_key]]`s, validated like OPENAI_API_KEYS' entries, added to `pool`."""
    lines = _table_lines(text, "upstream_key")
    added: list[KeySpec] = []
    if tables and not pool and single_key:
        pool.append(key_spec(single_key, where="OPENAI_API_KEY"))  # the file makes a pool: it joins
    for index, table in enumerate(tables):
        where = _Where(path, text, lines, index)
        for name in table:
            if name not in _KEY_FIELDS:
                raise where.error(name, f"unknown field {name!r} (allowed: {', '.join(_KEY_FIELDS)})")
        key, models = table.get("key"), table.get("models")
        if not isinstance(key, str):
            raise where.error(
                "key" if "key" in table else None, "every [[upstream_key]] needs a `key` string"
            )
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            raise where.error("models", "`models` must be a non-empty list of model names")
        try:
            spec = key_spec(key, table.get("name"), table.get("weight", 1),
                            frozenset(models) if models is not None else None, where=f"{path}:{where.start + 1}",
                            position=len(pool) + 1)  # fmt: skip
            add_key(pool, spec, f"{path}:{where.start + 1}")
        except KeySpecError as exc:
            raise ClientsFileError(str(exc)) from None
        added.append(spec)
    return added


class _Where:
    """Line numbers for messages about the index-th [[client]] table (tomllib has none after parsing)."""

    def __init__(self, path: str, text: str, lines: list[int], index: int) -> None:
        self.path, self.text = path, text
        self.start = lines[index] if index < len(lines) else 0
        self.end = lines[index + 1] if index + 1 < len(lines) else None

    def error(self, key: str | None, reason: str) -> ClientsFileError:
        line = _line_of_key(self.text, key, self.start, self.end) if key else self.start + 1
        return ClientsFileError(f"{self.path}:{line}: {reason}")


def _table_lines(text: str, table: str = "client") -> list[int]:
    """0-based line numbers of the `[[<table>]]` headers, in order."""
    header = re.compile(rf"\s*\[\[\s*{table}\s*\]\]")
    return [i for i, line in enumerate(text.splitlines()) if header.match(line)]


def _line_of_key(text: str, key: str, start: int, end: int | None) -> int:
    """1-based line where `key = ...` is set between lines start and end; the table's line if not found."""
    pattern = re.compile(rf"\s*(\"?){re.escape(key)}\1\s*=")
    for i, line in enumerate(text.splitlines()[start:end], start):
        if pattern.match(line):
            return i + 1
    return start + 1


def _client(table: Mapping[str, Any], where: _Where) -> tuple[bytes, Client, str | None]:
    for name in table:
        if name not in _FIELDS:
            raise where.error(name, f"unknown field {name!r} (allowed: {', '.join(_FIELDS)})")
    name = table.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise where.error("name" if "name" in table else None,
                          "every client needs a `name` of 1-64 letters, digits, '_', '.' or '-'")  # fmt: skip
    key, key_sha = table.get("key"), table.get("key_sha256")
    if (key is None) == (key_sha is None):
        raise where.error(None, f"client {name!r} needs exactly one of `key` or `key_sha256`")
    if key is not None:
        if not isinstance(key, str) or not key.strip() or key != key.strip():
            raise where.error(
                "key", f"client {name!r}: `key` must be a non-empty string without surrounding spaces"
            )
        digest = key_digest(key)
    else:
        if not isinstance(key_sha, str) or not SHA256_HEX.fullmatch(key_sha):
            raise where.error(
                "key_sha256", f"client {name!r}: `key_sha256` must be 64 hex digits (sha256sum of the key)"
            )
        digest = bytes.fromhex(key_sha)
    values: dict[str, Any] = {}
    for limit in _INTS:
        value = table.get(limit)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_PER_MINUTE:
                raise where.error(
                    limit, f"client {name!r}: `{limit}` must be a whole number from 1 to {MAX_PER_MINUTE}"
                )
            values[limit] = value
    for limit in _USD:
        value = table.get(limit)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or not 0 < value <= MAX_USD:  # fmt: skip
                raise where.error(limit, f"client {name!r}: `{limit}` must be a number of US dollars above 0")
            values[limit] = float(value)
    models = table.get("models")
    if models is not None:
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m.strip() for m in models)
        ):
            raise where.error("models", f"client {name!r}: `models` must be a non-empty list of model names")
        models = frozenset(models)
    keys = table.get("keys")
    if keys is not None:
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise where.error(
                "keys", f"client {name!r}: `keys` must be a non-empty list of upstream key names"
            )
        keys = frozenset(keys)
    unknown = table.get("unknown_objects", "deny")
    if not isinstance(unknown, str) or unknown not in UNKNOWN_OBJECTS:
        raise where.error("unknown_objects", f'client {name!r}: `unknown_objects` must be "allow" or "deny"')
    return digest, Client(name, Limits(**values), models, keys, UNKNOWN_OBJECTS[unknown], digest), key
