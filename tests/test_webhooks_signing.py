"""Standard Webhooks signatures: the spec's published test vector, and our receiver's check."""

from __future__ import annotations

import base64
import time

import pytest

from tests.fakes.webhook_receiver import verify
from webhooks import signing


def test_signature_matches_the_published_test_vector():
    """standard-webhooks/libraries/python/tests/test_webhooks.py::test_sign_function."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert (
        signing.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_a_new_secret_is_whsec_and_32_random_bytes():
    first, second = signing.new_secret(), signing.new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    assert signing.secret_key(first) == base64.b64decode(first[6:])


def test_unpadded_and_unprefixed_secrets_decode_alike():
    padded = signing.new_secret()
    assert signing.secret_key(padded.rstrip("=")) == signing.secret_key(padded.removeprefix("whsec_"))


@pytest.mark.parametrize("bad", ["whsec_", "whsec_not base64!", ""])
def test_a_malformed_secret_is_refused(bad):
    with pytest.raises(ValueError):
        signing.secret_key(bad)


def test_headers_verify_with_an_independent_receiver_and_not_once_altered():
    secret = signing.new_secret()
    body = b'{"type":"job.succeeded","timestamp":"2026-01-01T00:00:00.000000Z","data":{"id":"x"}}'
    now = int(time.time())
    headers = signing.headers(secret, "msg_abc", now, body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert verify(secret, headers, body) == (True, "")
    assert verify(secret, headers, body + b" ")[0] is False
    assert verify(signing.new_secret(), headers, body)[0] is False
    assert verify(secret, {**headers, "webhook-id": "msg_other"}, body)[0] is False
    stale = signing.headers(secret, "msg_abc", now - 3600, body)
    assert verify(secret, stale, body) == (False, "timestamp out of tolerance")
