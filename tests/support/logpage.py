"""Reading the log pages as a script would: the counters' `Label: value` lines and the record rows."""

from __future__ import annotations

import html as htmllib
import re

from tests.conftest import ACCESS_TOKEN, SECURITY_KEY

# `?{TOKEN}` opens the JSON pages; on /log and /log_errors it signs a browser in (303 and a cookie, the
# token gone from the address), so tests read those pages as a script does, with AUTH.
TOKEN = f"access_token={ACCESS_TOKEN}"
AUTH = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
# For real servers: an idle keep-alive connection would hold up a graceful stop of gunicorn.
CLOSE = {"Connection": "close"}
CHAT = {"security_key": SECURITY_KEY, "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
COUNTER_LABELS = (
    "Request count",
    "Total request time",
    "Average request time",
    "Max request time",
    "Current parallel requests",
    "Max parallel requests",
    "Max prompt tokens",
    "Max cached tokens",
    "Max completion tokens",
    "Error count",
    "Overload count",
    "Cancelled request count",
)
_ROW = re.compile(r'<tr data-kind="(\w+)" data-request-id="([^"]*)" data-pid="(\d+)"[^>]*>')
_HOST_ROW = re.compile(r'<tr data-kind="\w+" data-request-id="([^"]*)" data-pid="\d+" data-host="([^"]*)">')


def counters(html: str) -> dict[str, str]:
    """Every original counter, parsed the way an operator's script would (`Label: value`)."""
    found = {}
    for label in COUNTER_LABELS:
        match = re.search(rf">{label}: ([0-9.]+)<", html)
        assert match, f"counter {label!r} missing"
        found[label] = match.group(1)
    return found


def rows(html: str) -> list[tuple[str, str, int]]:
    """(kind, request id, pid) of each record shown, top to bottom."""
    return [(kind, rid, int(pid)) for kind, rid, pid in _ROW.findall(html)]


def row_hosts(html: str) -> list[tuple[str, str]]:
    """(request id, host) of each record shown, top to bottom."""
    return _HOST_ROW.findall(html)


def column(html: str, name: str) -> list[str]:
    """The text of one column (`host`, `client`, `cost`...) of each record shown, top to bottom."""
    cells = re.findall(rf'<td class="(?:num )?c-{name}\b[^"]*"[^>]*>(.*?)</td>', html, re.S)
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in cells]


def link(html: str, rel: str) -> str | None:
    """The pager's link (`next`: older records, `prev`: newer, `first`: the newest), as a browser follows it."""
    match = re.search(rf'<a href="([^"]*)" rel="{rel}">', html)
    return htmllib.unescape(match.group(1)) if match else None


def served_by(html: str) -> int:
    return int(re.search(r'<footer data-pid="(\d+)">', html).group(1))
