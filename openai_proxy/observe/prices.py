"""Prices per model, and what one request's usage cost in USD.

The shipped table (`openai_proxy/data/prices.toml`, list prices) is extended or overridden by the
operator's OPENAI_PROXY_PRICES_FILE, in the same format: TOML tables `[models."<model>"]` with
`input`, `cached_input` (default: `input`), `output`, and where they apply `audio_input`,
`audio_output` (USD per million tokens) and `per_minute` (USD per minute of transcribed audio). A row
may hold the prices of another service tier as a table of the same fields, `flex` or `priority`
(`[models."gpt-5".flex]`): a call that upstream says ran on that tier is priced by it, any other
tier (`default`, `auto`, `scale`, none) by the row itself. An operator's row replaces the shipped
row of that model as a whole, its tiers included. A top-level `[default]` table (same fields) prices
every model that has no row: without one such a model is unpriced, and a client with a budget may
not call it.

A model is looked up by its exact name, then, for a dated snapshot without a row of its own
(`gpt-4o-2024-08-06`, `gpt-4-0613`), by its base name; never by a looser prefix, which would give
`gpt-4o-mini` the price of `gpt-4o`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from dataclasses import field as default_of
from importlib import resources
from typing import Any

from openai_proxy.config import ConfigError
from openai_proxy.usage import Estimate

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
# Service tiers OpenAI prices apart from the standard one (`service_tier` in answers).
TIERS = ("flex", "priority")
DEFAULT_TABLE = "default"
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


@dataclass
class PriceRows:
    """What one price file says: model rows, their other tiers, and the `[default]` row."""

    rows: dict[str, ModelPrice] = default_of(default_factory=dict)
    tiers: dict[str, dict[str, ModelPrice]] = default_of(default_factory=dict)
    default: ModelPrice | None = None

    def update(self, other: PriceRows) -> None:
        """`other` over this: a model row replaces ours whole (tiers too); its default wins."""
        for name, row in other.rows.items():
            self.rows[name] = row
            self.tiers.pop(name, None)
        self.tiers.update(other.tiers)
        if other.default is not None:
            self.default = other.default


class PriceTable:
    """The effective prices: model name -> ModelPrice, per tier, and the fallback `[default]`."""

    def __init__(
        self,
        rows: Mapping[str, ModelPrice],
        tiers: Mapping[str, Mapping[str, ModelPrice]] | None = None,
        default: ModelPrice | None = None,
    ) -> None:
        self._rows = dict(rows)
        self._tiers = {name: dict(by_tier) for name, by_tier in (tiers or {}).items()}
        self.default = default

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

    def price_of(self, model: str | None, tier: str | None = None) -> ModelPrice | None:
        """The price of `model` on `tier` (its row's own for a tier without a price of its own), else
        the `[default]` price; None when neither exists."""
        name = self.row_name(model)
        if name is None:
            return self.default
        if tier:
            tiered = self._tiers.get(name, {}).get(tier)
            if tiered is not None:
                return tiered
        return self._rows[name]

    def tiers_of(self, model: str | None) -> tuple[str, ...]:
        """The tiers `model`'s row prices apart (for the docs and tests)."""
        name = self.row_name(model)
        return tuple(sorted(self._tiers.get(name, {}))) if name else ()

    def cost_usd(
        self, model: str | None, usage: Mapping[str, Any] | None, tier: str | None = None
    ) -> float | None:
        """USD for `usage` of `model` on `tier`, rounded to COST_DECIMALS; None without usage or a price."""
        price = self.price_of(model, tier)
        if price is None or not usage:
            return None
        cost = cost_of(price, usage)
        return None if cost is None else round(cost, COST_DECIMALS)

    def estimate_usd(self, model: str | None, estimate: Estimate) -> float | None:
        """USD the estimated use of a call of `model` would cost (at the tier it asks for); None when
        the model has no price, 0 when its price cannot be applied to an estimate."""
        price = self.price_of(model, estimate.service_tier)
        if price is None:
            return None
        cost = cost_of(price, estimate_usage(price, estimate))
        return 0.0 if cost is None else round(cost, COST_DECIMALS)


def estimate_usage(price: ModelPrice, estimate: Estimate) -> dict[str, int | float]:
    """An estimate as the usage `cost_of` prices: minutes for a model priced by the minute (when the
    upload's size gave some), tokens otherwise."""
    if price.per_minute is not None and price.input is None:
        return {} if estimate.audio_seconds is None else {"seconds": estimate.audio_seconds}
    return {
        "prompt_tokens": estimate.input_tokens,
        "completion_tokens": estimate.output_tokens,
        "total_tokens": estimate.input_tokens + estimate.output_tokens,
    }


@functools.cache
def _shipped() -> PriceRows:
    """The shipped table, parsed once per process (it is part of the installed code)."""
    shipped = resources.files("openai_proxy").joinpath(SHIPPED_FILE).read_text("utf-8")
    return parse_prices(shipped, f"the shipped price table openai_proxy/{SHIPPED_FILE}")


def load_prices(path: str | None = None) -> PriceTable:
    """The shipped table, extended or overridden by the operator's file at `path`; ConfigError if
    either cannot be used, naming the file, the line and what is wrong."""
    prices = PriceRows()
    prices.update(_shipped())  # a copy: the operator's rows go over it, not into the shared one
    if path:
        source = f"{PRICES_VAR}={path!r}"
        try:
            with open(path, "rb") as file:
                text = file.read().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        prices.update(parse_prices(text, source))
    return PriceTable(prices.rows, prices.tiers, prices.default)


def parse_prices(text: str, source: str) -> PriceRows:
    """The `[models."<model>"]` tables (and `[default]`) of a price file, checked; ConfigError names
    `source` and line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(str(exc), text, source)) from None
    lines = text.splitlines()
    for key in data:
        if key not in ("models", DEFAULT_TABLE):
            where = _line_of(lines, rf"^\s*\[*\s*{_key(key)}\s*[\].=]")
            raise ConfigError(
                _at(
                    source,
                    where,
                    f'unknown field {key!r}: a price file holds [models."<model>"] tables and [default]',
                )
            )
    models = data.get("models", {})
    if not isinstance(models, dict):
        where = _line_of(lines, r"^\s*models\s*=")
        raise ConfigError(_at(source, where, 'models must be tables like [models."gpt-4o"]'))
    out = PriceRows()
    for name, row in models.items():
        out.rows[name], tiers = _row(name, row, lines, source)
        if tiers:
            out.tiers[name] = tiers
    if DEFAULT_TABLE in data:
        where = _line_of(lines, rf"^\s*\[\s*{DEFAULT_TABLE}\s*\]") or _line_of(
            lines, rf"^\s*{DEFAULT_TABLE}\s*="
        )
        out.default, _ = _row(None, data[DEFAULT_TABLE], lines, source, where=where, tiers=False)
    return out


def _row(
    name: str | None,
    row: Any,
    lines: list[str],
    source: str,
    *,
    where: int | Callable[[], int | None] | None = None,
    tiers: bool = True,
    table: str | None = None,
    inside: tuple[str, ...] = (),
) -> tuple[ModelPrice, dict[str, ModelPrice]]:
    """One row (a model's, `[default]` when `name` is None, or the tier `inside` names), checked; and
    its tiers. Lines are looked up only to name one in an error (`where`, the row's line, may be a
    function that finds it): a good file is parsed without searching its text."""
    if table is None:
        table = f"[models.{json.dumps(name)}]" if name is not None else f"[{DEFAULT_TABLE}]"

    def row_line() -> int | None:
        if callable(where):
            return where()
        return _table_line(lines, name) if where is None and name is not None else where

    def fail(reason: str, field: str | None = None) -> ConfigError:
        line = _field_line(lines, row_line(), field) if field else row_line()
        return ConfigError(_at(source, line, f"{table} {reason}"))

    def sub_line(field: str) -> int | None:
        """Where the table `field` inside this row starts: its own header, else its key."""
        header = _header_line(lines, name, (*inside, field)) if name is not None else None
        return header or _field_line(lines, row_line(), field)

    if name is not None and not name.strip():
        raise fail("has an empty model name")
    if name is not None and name != name.strip():
        raise fail("has spaces around the model name")
    if not isinstance(row, dict):
        raise fail("must be a table of prices (input, cached_input, output, ...)")
    found: dict[str, ModelPrice] = {}
    prices = {}
    for field, value in row.items():
        if tiers and field in TIERS and isinstance(value, dict):
            tier_table = f"{table[:-1]}.{field}]"
            found[field], _ = _row(
                name,
                value,
                lines,
                source,
                where=lambda field=field: sub_line(field),
                tiers=False,
                table=tier_table,
                inside=(field,),
            )
            continue
        if isinstance(value, dict):  # `[models.gpt-4.1]` is the table "1" inside the model "gpt-4"
            hint = 'quote names with dots, like [models."gpt-4.1"]'
            if tiers:
                hint += f"; the tiers priced apart are {', '.join(TIERS)}"
            line = sub_line(field)
            raise ConfigError(_at(source, line, f"{table} has a table {field!r} inside: {hint}"))
        prices[field] = value
        if field not in FIELDS:
            raise fail(f"has an unknown field {field!r} (known: {', '.join(FIELDS)})", field)
        unit = "USD per minute of audio" if field == "per_minute" else "USD per million tokens"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"{field} must be a number ({unit}), not {json.dumps(value, default=str)}", field)
        if not math.isfinite(value) or value < 0:
            raise fail(f"{field} must be a finite number >= 0 ({unit}), not {value}", field)
    if set(prices) - {"per_minute"} or "per_minute" not in prices:
        for needed in ("input", "output"):
            if needed not in prices:
                raise fail(f"is missing {needed} (USD per million {needed} tokens)")
    return ModelPrice(**{field: float(value) for field, value in prices.items()}), found


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


def _header_line(lines: list[str], name: str, inside: tuple[str, ...]) -> int | None:
    """The line of the header `[models."<name>".<inside...>]`, if the file has one."""
    path = "".join(rf"\s*\.\s*{_key(part)}" for part in inside)
    return _line_of(lines, rf"^\s*\[\s*models\s*\.\s*{_key(name)}{path}\s*\]")


def _field_line(lines: list[str], table: int | None, field: str) -> int | None:
    """The line of `field` in the table starting at line `table` (the table's own line if inline)."""
    if table is None:
        return None
    end = _line_of(lines, r"^\s*\[", table) or len(lines) + 1
    return _line_of(lines, rf"^\s*{_key(field)}\s*=", table, end - 1) or table
