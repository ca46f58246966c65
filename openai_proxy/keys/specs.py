"""Upstream API keys as the configuration describes them: `OPENAI_API_KEY` and `OPENAI_API_KEYS`.

A `KeySpec` is one key of the upstream key pool (`openai_proxy.keys.pool`): a name (shown on `/health`,
in metrics and in completion records, never the key), the key, a weight and an optional model
allowlist. The environment gives names only (`[name=]key`); a clients file may add keys with
weights and models by building more specs with `key_spec(...)` and passing them to the pool.

A key shows its last four characters (on `/health`, in a default name, hence in metric labels) only
when it is at least `SHOW_TAIL_FROM` characters long, as everywhere secrets are masked: of a short
key they would be most of it.

This module imports nothing but the standard library and `openai_proxy.redact` (which imports only
the standard library): the gunicorn master reads the configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from openai_proxy.redact import SHOW_TAIL_FROM

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_WEIGHT = 100
# What an upstream key may look like: one header-safe token (OpenAI's keys are `sk-...`).
_KEY = re.compile(r"[\x21-\x7e]+")


class KeySpecError(ValueError):
    """A key entry that cannot be used; the message says which one and why (never the key itself)."""


@dataclass(frozen=True)
class KeySpec:
    """One upstream key of the pool. `models` None means every model; `repr` never shows the key."""

    name: str
    key: str
    weight: int = 1
    models: frozenset[str] | None = None
    # Whether the name is the default one (no name was given): the same key listed again with a name
    # takes that name.
    default_named: bool = field(default=False, compare=False)

    @property
    def last4(self) -> str | None:
        """The key's last four characters, or None for a key too short to show any of it."""
        return tail(self.key)

    def serves(self, model: str | None) -> bool:
        """Whether a call for `model` may use this key (a call that names no model may use any)."""
        return self.models is None or model is None or model in self.models

    def __repr__(self) -> str:
        return (
            f"KeySpec(name={self.name!r}, last4={self.last4!r}, weight={self.weight}, models={self.models!r})"
        )


def tail(key: str) -> str | None:
    return key[-4:] if len(key) >= SHOW_TAIL_FROM else None


def default_name(key: str, position: int) -> str:
    """`key-<last 4>`, or `key-<position in the pool>` for a key too short to show its tail."""
    return f"key-{tail(key) or position}"


def key_spec(
    key: str,
    name: str | None = None,
    weight: int = 1,
    models: frozenset[str] | None = None,
    *,
    where: str,
    position: int = 1,
) -> KeySpec:
    """A validated KeySpec; `where` names the entry in errors (a variable and position, a file line),
    `position` is where it joins the pool (1 first), for the default name of a short key."""
    if len(key) < 4:
        raise KeySpecError(f"{where}: a key is at least 4 characters long")
    if not _KEY.fullmatch(key):
        raise KeySpecError(f"{where}: a key must be one token of printable characters, without spaces")
    default_named = name is None
    name = default_name(key, position) if name is None else name
    if not NAME.fullmatch(name):
        raise KeySpecError(f"{where}: the name {name!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise KeySpecError(f"{where}: the weight of {name!r} must be an integer from 1 to {MAX_WEIGHT}")
    if models is not None and (not models or not all(isinstance(m, str) and m for m in models)):
        raise KeySpecError(f"{where}: the models of {name!r} must be a non-empty list of model names")
    return KeySpec(name, key, weight, models, default_named)


def parse_api_keys(single: str | None, listed: str | None) -> tuple[KeySpec, ...]:
    """The pool's keys: `OPENAI_API_KEY` (if set) then each `[name=]key` of `OPENAI_API_KEYS`.

    Empty when `OPENAI_API_KEYS` is unset or empty: one configured key is not a pool (it is sent as
    it is, at no extra cost). Entries are separated by commas; blanks around them and empty entries
    are ignored. A key listed in both variables (or twice) is one key. Two keys with one name, or a
    bad entry, raise KeySpecError.
    """
    items = [(position, item.strip()) for position, item in enumerate((listed or "").split(","), start=1)]
    items = [(position, item) for position, item in items if item]
    if not items:
        return ()
    specs: list[KeySpec] = []
    if single:
        specs.append(key_spec(single, where="OPENAI_API_KEY"))
    for position, item in items:
        where = f"OPENAI_API_KEYS entry {position}"
        name, sep, key = item.partition("=")
        joins = len(specs) + 1
        spec = (key_spec(key.strip(), name.strip(), where=where, position=joins) if sep
                else key_spec(item, where=where, position=joins))  # fmt: skip
        add(specs, spec, where)
    return tuple(specs)


def add(specs: list[KeySpec], spec: KeySpec, where: str) -> None:
    """Add `spec` to `specs`: the same key again is one key; a name or key used twice is an error."""
    if any(other.name == spec.name and other.key != spec.key for other in specs):
        raise KeySpecError(
            f"{where}: the name {spec.name!r} is used twice; give each key its own name (name=key)"
        )
    for i, other in enumerate(specs):
        if other.key != spec.key:
            continue
        if spec.default_named or other.name == spec.name:
            return  # the same key again (e.g. OPENAI_API_KEY listed too): one key
        if other.default_named:
            specs[i] = spec  # listed again with a name: the name is what the operator chose
            return
        raise KeySpecError(f"{where}: the key named {spec.name!r} is already listed as {other.name!r}")
    specs.append(spec)
