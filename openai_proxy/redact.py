"""Secret redaction for everything that leaves the process: logs, pages and client-facing messages.

A secret is recognised two ways:
- by value: the proxy's own secrets (`SECRETS`: the configured keys, registered when the app is built)
  and the current request's `openai_api_key` override (`mask_in_this_request`), whatever they look
  like and however short, wherever they appear;
- by shape: `sk-...` keys, `Bearer ...` values and secret-looking `key=value` query parameters, for
  secrets the proxy was never told about.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

REDACTED = "[REDACTED]"

# Values shorter than this are masked only where they stand alone (not inside a longer word or id),
# so a short key cannot turn every text that happens to contain it into `***`.
WHOLE_WORD_BELOW = 8
# Masks of secrets known by value show their last 4 characters only from this length on: of a
# 6-character key, 4 characters would be most of it.
SHOW_TAIL_FROM = 12

_SECRET_KEY = re.compile(r"(authorization|cookie|api[_-]?key|token|security[_-]?key|secret|password)$", re.I)

# Order matters: a Bearer value may itself be an sk- key; mask the whole value once.
_BEARER = re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9._~+/=-]+)")
_SK_KEY = re.compile(r"\b(sk-[A-Za-z0-9_-]{4,})")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;\s]|^)((?:[a-z0-9_-]*(?:api[_-]?key|token|secret|password|signature|sig)|key|security_key)=)"
    r"([^&\s\"'#]+)"
)
# What may stand right before or after a short secret without making it part of a longer word.
_WORD = r"A-Za-z0-9_\-"


def mask(secret: str) -> str:
    """`***` plus the last four characters, so an operator can tell keys apart without seeing them
    (only `***` for a secret shorter than SHOW_TAIL_FROM)."""
    return "***" + secret[-4:] if len(secret) >= SHOW_TAIL_FROM else "***"


@dataclass(frozen=True, slots=True)
class _Secret:
    """One form a secret value can take in text (as itself, or escaped inside a JSON string)."""

    text: str
    masked: str
    whole_word: re.Pattern[str] | None  # short values: only where they stand alone


def _secrets(values: Iterable[str | None]) -> tuple[_Secret, ...]:
    found: dict[str, _Secret] = {}
    for value in values:
        if not value:
            continue
        tail = "***" + value[-4:] if len(value) >= SHOW_TAIL_FROM else "***"
        # Upstream error bodies are redacted as raw JSON text, where `"`, `\` and non-ASCII come escaped.
        for form in {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}:
            word = None
            if len(value) < WHOLE_WORD_BELOW:
                word = re.compile(rf"(?<![{_WORD}]){re.escape(form)}(?![{_WORD}])")
            # An escaped form's tail could end inside an escape sequence: it shows nothing.
            found.setdefault(form, _Secret(form, tail if form == value else "***", word))
    # Longest first: a secret that contains another one is masked whole, not around the shorter one.
    return tuple(sorted(found.values(), key=lambda s: -len(s.text)))


class SecretRegistry:
    """The secret values masked in every text that leaves the process, in groups replaced whole.

    A group is, e.g., one app's configured secrets (`openai_proxy.extension`); the keys of a clients file would be
    another, replaced on each reload. What is masked is the union of all groups.
    """

    def __init__(self) -> None:
        self._groups: dict[Hashable, tuple[str, ...]] = {}
        # Read on every redaction (request greenlets, the log store's thread): replaced, never mutated.
        self.entries: tuple[_Secret, ...] = ()

    def replace(self, group: Hashable, values: Iterable[str | None]) -> None:
        """Make `values` (empty ones ignored) the secrets of `group`; no values drops the group."""
        kept = tuple(v for v in values if v)
        # Copied, never changed in place: an app's finalizer (`weakref.finalize`, run by the garbage
        # collector at any allocation) may replace a group while this one is still being built.
        groups = dict(self._groups)
        if kept:
            groups[group] = kept
        else:
            groups.pop(group, None)
        self._groups = groups
        self.entries = _secrets(v for group_values in groups.values() for v in group_values)


# Process-wide, like the log handlers that use it: a log line has no app to ask for its secrets.
SECRETS = SecretRegistry()

# This request's own secrets merged with SECRETS, or None. Greenlet-local under gevent; the completion
# record is emitted on close in the same greenlet, so it still sees them.
_request_secrets: ContextVar[tuple[_Secret, ...] | None] = ContextVar("openai_proxy_secrets", default=None)


def mask_in_this_request(*values: str | None) -> None:
    """Also mask `values` (the request's own upstream key) until `end_of_request()`; none: clear."""
    extra = _secrets(values) if any(values) else ()
    if not extra:
        _request_secrets.set(None)
        return
    merged = {s.text: s for s in (*extra, *SECRETS.entries)}
    _request_secrets.set(tuple(sorted(merged.values(), key=lambda s: -len(s.text))))


def end_of_request() -> None:
    """Forget the request's own secrets (its completion record is out); the next request starts clean."""
    _request_secrets.set(None)


def redact_text(text: str | None) -> str | None:
    """Mask known secret values, then `sk-...` keys, `Bearer ...` values and `key=value` query secrets."""
    if not text:
        return text
    # A few `in` checks are several times cheaper than one regex alternation of the same literals.
    for secret in _request_secrets.get() or SECRETS.entries:
        if secret.text in text:
            if secret.whole_word is None:
                text = text.replace(secret.text, secret.masked)
            else:
                text = secret.whole_word.sub(secret.masked, text)
    # Each shape needs a literal that most text lacks: a plain `in` check is far cheaper than the regex.
    if "bearer" in text.lower():
        text = _BEARER.sub(lambda m: m.group(1) + mask(m.group(2)), text)
    if "sk-" in text:
        text = _SK_KEY.sub(lambda m: mask(m.group(1)), text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: m.group(1) + m.group(2) + mask(m.group(3)), text)
    return text


def is_secret_key(name: str) -> bool:
    """Field or header names whose value is a secret whatever it looks like."""
    return bool(_SECRET_KEY.search(name))


def redact(value: Any) -> Any:
    """Deep copy of `value` with secret-named fields replaced and secrets in strings masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
