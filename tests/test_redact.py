"""Redaction of secrets in strings and structures."""

from __future__ import annotations

import pytest

from openai_proxy.redact import REDACTED, redact, redact_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("key sk-abcdefghijklmnop1234 here", "key ***1234 here"),
        ("sk-proj-AbC_dEf-123456789xyz9", "***xyz9"),
        ("Authorization: Bearer abc.def.ghi-jkl9876", "Authorization: Bearer ***9876"),
        ("bearer sk-abcdefghijkl4321", "bearer ***4321"),
        ("GET /x?security_key=hunter2hunter2&limit=5", "GET /x?security_key=***ter2&limit=5"),
        # Under 12 characters a secret shows no tail (11 here), from 12 on its last four.
        ("https://h/p?api_key=abcdefghijk&access_token=zzzzzzzzzzzz1111", "https://h/p?api_key=***&access_token=***1111"),
        ("?key=short", "?key=***"),
        ("nothing secret here: tokens=5 max_tokens=10", "nothing secret here: tokens=5 max_tokens=10"),
        ("", ""),
    ],
)  # fmt: skip
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def test_redact_structure():
    value = {
        "Authorization": "Bearer abc",
        "cookie": "a=b",
        "openai_api_key": "sk-whatever-123456789",
        "security_key": "s",
        "access_token": "t",
        "refresh-token": "r",
        "x-api-key": "k",
        "max_tokens": 10,
        "usage": {"prompt_tokens": 1, "total_tokens": 2},
        "message": "failed with sk-abcdefghijklmnop9999",
        "list": [{"api_key": "z"}, "Bearer qwertyuiop0000"],
        "empty_token": "",
    }
    assert redact(value) == {
        "Authorization": REDACTED,
        "cookie": REDACTED,
        "openai_api_key": REDACTED,
        "security_key": REDACTED,
        "access_token": REDACTED,
        "refresh-token": REDACTED,
        "x-api-key": REDACTED,
        "max_tokens": 10,
        "usage": {"prompt_tokens": 1, "total_tokens": 2},
        "message": "failed with ***9999",
        "list": [{"api_key": REDACTED}, "Bearer ***0000"],
        "empty_token": "",
    }
