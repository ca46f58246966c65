"""Prices per model, and what one request's usage cost in USD.

The shipped table (`openai_proxy/data/prices.toml`, standard-tier list prices) is extended or overridden by
the operator's OPENAI_PROXY_PRICES_FILE, in the same format: TOML tables `[models."<model>"]` with
`input`, `cached_input` (default: `input`), `output`, and where they apply `audio_input`,
`audio_output` (USD per million tokens) and `per_minute` (USD per minute of transcribed audio). An
operator's row replaces the shipped row of that model as a whole.

A model is looked up by its exact name, then, for a dated snapshot without a row of its own
(`gpt-4o-2024-08-06`, `gpt-4-0613`), by its base name; never by a looser prefix, which would give
`gpt-4o-mini` the price of `gpt-4o`.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from openai_proxy.config import ConfigError

PRICES_VAR = "OPENAI_PROXY_PRICES_FILE"
SHIPPED_FILE = "data/prices.toml"
PER_MILLION = 1_000_000
# Enough for one cached token of the cheapest model (USD 0.005 per million), without float noise.
COST_DECIMALS = 10
# A `-YYYY-MM-DD` or `-MMDD` date at the end of a model name.
_SNAPSHOT = re.compile(
    r"(?P<base>.+)-(?:20\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))"
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of each kind (`per_minute`: per minute of audio); None = not priced."""

    input: float | None = None
    cached_input: float | None = None
    output: float | None = None
    audio_input: float | None = None
    audio_output: float | None = None
    per_minute: float | None = None


FIELDS = tuple(f.name for f in fields(ModelPrice))


def cost_of(price: ModelPrice, usage: Mapping[str, Any]) -> float | None:
    """USD for `usage` (`openai_proxy.usage.usage_of`) at `price`; None when some of it has no price.

    Input tokens count cached and audio tokens among them: each is priced once, at its own rate.
    Output tokens count reasoning and audio tokens: reasoning is priced as output, audio at its rate.
    """
    if "seconds" in usage:
        return None if price.per_minute is None else usage["seconds"] / 60 * price.per_minute
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if (prompt is None and completion is None) or price.input is None or price.output is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    audio_in = usage.get("input_audio_tokens") or 0
    audio_out = usage.get("output_audio_tokens") or 0
    if (audio_in and price.audio_input is None) or (audio_out and price.audio_output is None):
        return None  # priced as text it would be far too cheap: better unpriced than wrong
    cached = min(usage.get("cached_tokens") or 0, prompt)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    total = (
        max(prompt - cached - audio_in, 0) * price.input
        + cached * cached_rate
        + audio_in * (price.audio_input or 0.0)
        + max(completion - audio_out, 0) * price.output
        + audio_out * (price.audio_output or 0.0)
    )
    return total / PER_MILLION


class PriceTable:
    """The effective prices: model name -> ModelPrice."""

    def __init__(self, rows: Mapping[str, ModelPrice]) -> None:
        self._rows = dict(rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, model: object) -> bool:
        return model in self._rows

    def row_name(self, model: str | None) -> str | None:
        """The row that prices `model`: its own, else its base model's if it is a dated snapshot."""
        if not model:
            return None
        if model in self._rows:
            return model
        snapshot = _SNAPSHOT.fullmatch(model)
        base = snapshot.group("base") if snapshot else None
        return base if base in self._rows else None

    def price_of(self, model: str | None) -> ModelPrice | None:
        name = self.row_name(model)
        return None if name is None else self._rows[name]

    def cost_usd(self, model: str | None, usage: Mapping[str, Any] | None) -> float | None:
        """USD for `usage` of `model`, rounded to COST_DECIMALS; None without usage or a price."""
        price = self.price_of(model)
        if price is None or not usage:
            return None
        cost = cost_of(price, usage)
        return None if cost is None else round(cost, COST_DECIMALS)


def load_prices(path: str | None = None) -> PriceTable:
    """The shipped table, extended or overridden by the operator's file at `path`; ConfigError if
    either cannot be used, naming the file, the line and what is wrong."""
    shipped = resources.files("openai_proxy").joinpath(SHIPPED_FILE).read_text("utf-8")
    rows = parse_prices(shipped, f"the shipped price table openai_proxy/{SHIPPED_FILE}")
    if path:
        source = f"{PRICES_VAR}={path!r}"
        try:
            with open(path, "rb") as file:
                text = file.read().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        rows.update(parse_prices(text, source))
    return PriceTable(rows)


def parse_prices(text: str, source: str) -> dict[str, ModelPrice]:
    """The `[models."<model>"]` tables of a price file, checked; ConfigError names `source` and line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(str(exc), text, source)) from None
    lines = text.splitlines()
    for key in data:
        if key != "models":
            where = _line_of(lines, rf"^\s*\[*\s*{_key(key)}\s*[\].=]")
            raise ConfigError(
                _at(source, where, f'unknown field {key!r}: a price file holds [models."<model>"] tables')
            )
    models = data.get("models", {})
    if not isinstance(models, dict):
        where = _line_of(lines, r"^\s*models\s*=")
        raise ConfigError(_at(source, where, 'models must be tables like [models."gpt-4o"]'))
    return {name: _row(name, row, lines, source) for name, row in models.items()}


def _row(name: str, row: Any, lines: list[str], source: str) -> ModelPrice:
    table = f"[models.{json.dumps(name)}]"
    where = _table_line(lines, name)

    def fail(reason: str, field: str | None = None) -> ConfigError:
        line = _field_line(lines, where, field) if field else where
        return ConfigError(_at(source, line, f"{table} {reason}"))

    if not name.strip():
        raise fail("has an empty model name")
    if name != name.strip():
        raise fail("has spaces around the model name")
    if not isinstance(row, dict):
        raise fail("must be a table of prices (input, cached_input, output, ...)")
    for field, value in row.items():
        if isinstance(value, dict):  # `[models.gpt-4.1]` is the table "1" inside the model "gpt-4"
            raise fail(f'has a table {field!r} inside: quote names with dots, like [models."gpt-4.1"]', field)
        if field not in FIELDS:
            raise fail(f"has an unknown field {field!r} (known: {', '.join(FIELDS)})", field)
        unit = "USD per minute of audio" if field == "per_minute" else "USD per million tokens"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"{field} must be a number ({unit}), not {json.dumps(value, default=str)}", field)
        if not math.isfinite(value) or value < 0:
            raise fail(f"{field} must be a finite number >= 0 ({unit}), not {value}", field)
    if set(row) - {"per_minute"} or "per_minute" not in row:
        for needed in ("input", "output"):
            if needed not in row:
                raise fail(f"is missing {needed} (USD per million {needed} tokens)")
    return ModelPrice(**{field: float(value) for field, value in row.items()})


def _syntax_error(message: str, text: str, source: str) -> str:
    position = _TOML_POSITION.search(message)
    reason = message[: position.start()] if position else message
    if position and position.group(1):
        line, column = int(position.group(1)), position.group(2)
        return f"{source}, line {line}, column {column}: not valid TOML ({reason})"
    if position:  # at the end of the document
        return f"{source}, line {max(len(text.splitlines()), 1)}: not valid TOML ({reason})"
    return f"{source}: not valid TOML ({reason})"


def _at(source: str, line: int | None, reason: str) -> str:
    return f"{source}, line {line}: {reason}" if line else f"{source}: {reason}"


def _key(name: str) -> str:
    """A regex for `name` written as a TOML key: basic-quoted, literal-quoted or bare."""
    forms = [re.escape(json.dumps(name)), re.escape(f"'{name}'")]
    if _BARE_KEY.fullmatch(name):
        forms.append(re.escape(name))
    return f"(?:{'|'.join(forms)})"


def _line_of(lines: list[str], pattern: str, start: int = 0, stop: int | None = None) -> int | None:
    """The 1-based number of the first line from `start` matching `pattern` (tomllib gives no lines)."""
    compiled = re.compile(pattern)
    for number in range(start, len(lines) if stop is None else stop):
        if compiled.search(lines[number]):
            return number + 1
    return None


def _table_line(lines: list[str], name: str) -> int | None:
    """Where the model's table starts: its `[models."<model>"]` header, else the first line naming it
    as a key (dotted keys, inline tables)."""
    key = _key(name)
    return _line_of(lines, rf"^\s*\[\s*models\s*\.\s*{key}\s*\]") or _line_of(
        lines, rf"(?:^|[\s.{{,\[]){key}\s*[\].=]"
    )


def _field_line(lines: list[str], table: int | None, field: str) -> int | None:
    """The line of `field` in the table starting at line `table` (the table's own line if inline)."""
    if table is None:
        return None
    end = _line_of(lines, r"^\s*\[", table) or len(lines) + 1
    return _line_of(lines, rf"^\s*{_key(field)}\s*=", table, end - 1) or table
