"""What `/log` shows above the records: spend per client and per model, and the last hour as a chart.

Both are built from the log store's aggregates (`spend_daily`, `minute_stats`), which every host adds
to, so the page shows the fleet. The chart is drawn here, on the server, as inline SVG: the pages keep
their no-script Content-Security-Policy, and a browser without scripts still sees it. Every value
written into the SVG is a number we computed or a fixed label; nothing from clients reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta

from markupsafe import Markup

from openai_proxy.log.stats import MinuteRow, SpendRow, p50_p95

PERIODS = (("Today", 1), ("7 days", 7), ("30 days", 30))
NO_COST = "\u2014"  # an em dash: no price, or no usage to price


def usd(value: float | None) -> str:
    """A cost as every page writes it: fixed-point US dollars, never an exponent. Six decimals below
    $100 (a request costs millionths: `$0.000006`), cents from $100 (`$1,234.50`), and more digits
    only for a cost below a millionth, which would otherwise read as zero. None: an em dash."""
    if value is None or not math.isfinite(value):
        return NO_COST
    if abs(value) >= 100:
        return f"${value:,.2f}"
    if 0 < abs(value) < 0.0000005:
        return "$" + f"{value:.12f}".rstrip("0")
    return f"${value:.6f}"


def grouped(value: object) -> str:
    """A count as the pages write it: thousands separated (`12,345`), like the record and page
    counts. Anything else (a count upstream reported as something odd, an unreadable `?`) as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{int(value):,}" if value.is_integer() else f"{value:,}"
    return "" if value is None else str(value)


def exact_usd(value: float | None) -> str:
    """All the digits of a cost, fixed-point (for a title: what the rounded figure stands for)."""
    if value is None or not math.isfinite(value):
        return "no cost"
    return "$" + f"{value:.12f}".rstrip("0").rstrip(".")


@dataclass
class Totals:
    """Sums over some days for one client or one model."""

    name: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0

    @property
    def unknown(self) -> bool:
        """Whether none of these requests has a cost: they ran without a price (unpriced), or are
        from before unpriced counted a call without usage (no tokens either). What they cost is
        unknown, never $0."""
        tokens = self.prompt_tokens + self.cached_tokens + self.completion_tokens
        return self.requests > 0 and self.cost_usd == 0 and (self.unpriced > 0 or tokens == 0)

    @property
    def usd(self) -> str:
        return NO_COST if self.unknown else usd(self.cost_usd)

    @property
    def usd_title(self) -> str:
        """What the cost shown stands for: every digit, and the requests it leaves out."""
        if self.unknown:
            return "no cost: no request here has a price"
        if self.unpriced:
            return f"{exact_usd(self.cost_usd)} for the priced requests; {self.unpriced:,} without a price"
        return exact_usd(self.cost_usd)

    def add(self, row: SpendRow) -> None:
        self.requests += row.requests
        self.prompt_tokens += row.prompt_tokens
        self.cached_tokens += row.cached_tokens
        self.completion_tokens += row.completion_tokens
        self.cost_usd += row.cost_usd
        self.unpriced += row.unpriced


@dataclass
class Period:
    """One period's table: per client and per model, each sorted by cost, then requests."""

    label: str
    total: Totals
    clients: list[Totals] = field(default_factory=list)
    models: list[Totals] = field(default_factory=list)


def spend_periods(rows: Iterable[SpendRow], today: date) -> list[Period]:
    """Today, 7 days and 30 days (UTC days, today included) from `spend_daily` rows."""
    rows = list(rows)
    out = []
    for label, days in PERIODS:
        first = (today - timedelta(days=days - 1)).isoformat()
        total = Totals("All")
        by_client: dict[str, Totals] = {}
        by_model: dict[str, Totals] = {}
        for row in rows:
            if row.day < first:
                continue
            total.add(row)
            client = row.client or "(none)"
            model = row.model or "(none)"
            by_client.setdefault(client, Totals(client)).add(row)
            by_model.setdefault(model, Totals(model)).add(row)

        def ranked(group: dict[str, Totals]) -> list[Totals]:
            return sorted(group.values(), key=lambda t: (-t.cost_usd, -t.requests, t.name))

        out.append(Period(label, total, ranked(by_client), ranked(by_model)))
    return out


# -- the last hour -----------------------------------------------------------------------------------

# Drawn twice: for a wide screen, and for a phone's (shown there instead of the wide one shrunk to
# half, whose 11px labels would be 6px). The legend is the page's, in HTML above the chart.
WIDTH, NARROW, HEIGHT = 720, 360, 200
LEFT, RIGHT, TOP, BOTTOM = 44, 56, 12, 26


@dataclass(frozen=True)
class Minute:
    """One minute of the fleet's traffic: requests, errors, and latency percentiles (ms, or None)."""

    minute: int  # unix minute (seconds // 60)
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None

    @classmethod
    def of(cls, row: MinuteRow) -> Minute:
        """From the log's per-minute row; percentiles at the histogram's bucket resolution."""
        p50, p95 = p50_p95(row.histogram)
        return cls(row.minute, row.requests, row.errors, p50, p95)


def _nice_ceiling(value: float) -> float:
    """The next 1/2/5 x 10^n at or above `value` (axes end on round numbers)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _ms_label(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def _ms_axis(top_ms: float) -> Callable[[float], str]:
    """Labels for a latency axis up to `top_ms`, all in one unit: seconds once the top is a second."""
    if top_ms >= 1000:
        return lambda ms: f"{grouped(ms / 1000)} s"
    return lambda ms: f"{grouped(ms)} ms"


def hour_chart(minutes: Sequence[Minute], now_minute: int, width: int = WIDTH) -> Markup:
    """An SVG `width` units wide of the 60 minutes up to `now_minute`: requests per minute (bars,
    errors in red on top of them), p50 and p95 latency (lines, right axis). Minutes without traffic
    are gaps, not zeros."""
    by_minute = {m.minute: m for m in minutes}
    span = [by_minute.get(now_minute - 59 + i) for i in range(60)]
    plot_w, plot_h = width - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / 60
    gap, dot = (2, 2) if slot >= 8 else (1, 1.5)  # between bars, and a latency point's radius
    top_requests = _nice_ceiling(max((m.requests for m in span if m), default=0))
    top_ms = _nice_ceiling(max((m.p95_ms or 0 for m in span if m), default=0))

    ms_label = _ms_axis(top_ms)

    def y_req(value: float) -> float:
        return TOP + plot_h - plot_h * value / top_requests

    def y_ms(value: float) -> float:
        return TOP + plot_h - plot_h * value / top_ms

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {HEIGHT}" '
        f'width="{width}" height="{HEIGHT}" role="img" aria-labelledby="chart-title-{width}">',
        f'<title id="chart-title-{width}">Last hour: requests per minute, errors, p50 and p95 latency</title>',
    ]
    for fraction in (0, 0.5, 1):  # grid and both axes' labels
        y = TOP + plot_h * (1 - fraction)
        parts.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
                     f"{grouped(top_requests * fraction)}</text>")  # fmt: skip
        parts.append(f'<text x="{width - RIGHT + 6}" y="{y + 4:.1f}" class="axis">'
                     f"{ms_label(top_ms * fraction)}</text>")  # fmt: skip
    for i, label in ((0, "-60 min"), (30, "-30 min"), (59, "now")):
        x = LEFT + slot * (i + 0.5)
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 8}" class="axis" text-anchor="middle">{label}</text>')
    for i, m in enumerate(span):
        if not m or not m.requests:
            continue
        x = LEFT + slot * i + gap / 2
        y = y_req(m.requests)
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot - gap:.1f}" height="{TOP + plot_h - y:.1f}" '
                     f'class="req"><title>{m.requests:,} requests, {m.errors:,} errors</title></rect>')  # fmt: skip
        if m.errors:
            ye = y_req(m.errors)
            parts.append(f'<rect x="{x:.1f}" y="{ye:.1f}" width="{slot - gap:.1f}" '
                         f'height="{TOP + plot_h - ye:.1f}" class="err"/>')  # fmt: skip
    for name, attr in (("p50", "p50_ms"), ("p95", "p95_ms")):
        points = [
            (LEFT + slot * (i + 0.5), getattr(m, attr)) for i, m in enumerate(span) if m and getattr(m, attr)
        ]
        if points:
            path = " ".join(f"{x:.1f},{y_ms(v):.1f}" for x, v in points)
            parts.append(f'<polyline points="{path}" class="{name}"/>')
            for x, v in points:
                parts.append(f'<circle cx="{x:.1f}" cy="{y_ms(v):.1f}" r="{dot}" class="{name}">'
                             f"<title>{name} {_ms_label(round(v))}</title></circle>")  # fmt: skip
    parts.append("</svg>")
    return Markup("".join(parts))  # built from numbers and fixed labels only
