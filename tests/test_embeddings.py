"""POST /embeddings: defaults, validation, exact floats."""

from __future__ import annotations

import pytest

from tests.conftest import SECURITY_KEY, error_of, post_json
from tests.support.fake_upstream import EMBEDDING


def test_embeddings_default_model_and_exact_floats(client, fake, records):
    r = post_json(client, "/embeddings", {"security_key": SECURITY_KEY, "input": "The quick brown fox"})
    assert r.status_code == 200
    sent = fake.last("/v1/embeddings").json
    assert sent == {"input": "The quick brown fox", "model": "text-embedding-3-large"}
    # Exactly the upstream text: no float32 round trip (0.0023064255 would become 0.0023064254...).
    assert b"[0.0023064255, -0.009327292, 0.015797347, -0.0077780345, 0.12345678901234568]" in r.data
    assert r.get_json()["data"][0]["embedding"] == EMBEDDING
    assert records[-1]["usage"] == {"prompt_tokens": 9, "total_tokens": 9}


def test_embeddings_forwards_options_and_other_fields(client, fake):
    body = {"security_key": SECURITY_KEY, "input": ["a", "b"], "model": "text-embedding-3-small",
            "dimensions": 512, "encoding_format": "base64", "user": "u-1"}  # fmt: skip
    r = post_json(client, "/embeddings", body)
    assert r.status_code == 200
    assert fake.last("/v1/embeddings").json == {"input": ["a", "b"], "model": "text-embedding-3-small",
                                                "dimensions": 512, "encoding_format": "base64", "user": "u-1"}  # fmt: skip
    assert isinstance(r.get_json()["data"][1]["embedding"], str)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "Missing input"),
        ({"input": None}, "Missing input"),
        ({"input": "x", "dimensions": "512"}, "dimensions must be a positive integer"),
        ({"input": "x", "dimensions": 0}, "dimensions must be a positive integer"),
        ({"input": "x", "dimensions": 3.5}, "dimensions must be a positive integer"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format must be one of: float, base64"),
        ({"input": "x", "model": 3}, "model must be a string"),
    ],
)
def test_embeddings_validation(client, fake, extra, message):
    r = post_json(client, "/embeddings", {"security_key": SECURITY_KEY, **extra})
    assert r.status_code == 400
    assert error_of(r)["message"] == message
    assert fake.requests == []
