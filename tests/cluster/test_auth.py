import json

import pytest
import pytest_twisted
import treq
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.web import resource, server

from metacenter.api.envelope import CODE_UNAUTHORIZED, error_for
from metacenter.cluster.auth import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    PeerAuthenticator,
    Unauthorized,
    sign,
    verify,
)

SECRET = "s3cret-of-the-cluster"
NOW = 1_700_000_000.0
PATH = "/v1/replica/event"
BODY = b'{"cluster":"c","request_id":"r1","ip":"10.0.0.1","timestamp":1700000000000000000}'


def refusal(**overrides):
    """The reason of the ``Unauthorized`` raised by verify for a request
    signed at NOW and changed by ``overrides`` (answered 401, 40101001)."""
    request = dict(secret=SECRET, method="POST", path=PATH, body=BODY,
                   headers=sign(SECRET, "POST", PATH, BODY, NOW), now=NOW)
    request.update(overrides)
    with pytest.raises(Unauthorized) as raised:
        verify(**request)
    error = error_for(raised.value)
    assert (error.status, error.code) == (401, CODE_UNAUTHORIZED)
    return error.reason


def test_a_signed_request_passes():
    headers = sign(SECRET, "POST", PATH, BODY, NOW)
    assert set(headers) == {TIMESTAMP_HEADER, SIGNATURE_HEADER}
    verify(SECRET, "POST", PATH, BODY, headers, NOW)
    # bytes or str, any header case, twisted's list-valued form: all the same request
    as_bytes = {k.lower().encode(): [v.encode()] for k, v in headers.items()}
    verify(SECRET.encode(), b"post", PATH.encode(), BODY, as_bytes, NOW + 29)


def test_an_unsigned_request_is_refused():
    assert "missing X-Metacenter-Signature" in refusal(headers={})
    only_signature = {SIGNATURE_HEADER: sign(SECRET, "POST", PATH, BODY, NOW)[SIGNATURE_HEADER]}
    assert "missing X-Metacenter-Timestamp" in refusal(headers=only_signature)


def test_a_wrong_secret_or_forged_signature_is_refused():
    assert "bad signature" in refusal(secret="another-secret")
    forged = dict(sign(SECRET, "POST", PATH, BODY, NOW), **{SIGNATURE_HEADER: "ab" * 32})
    assert "bad signature" in refusal(headers=forged)
    garbage = dict(sign(SECRET, "POST", PATH, BODY, NOW), **{SIGNATURE_HEADER: "not-hex"})
    assert "malformed X-Metacenter-Signature" in refusal(headers=garbage)


def test_a_tampered_body_method_or_path_is_refused():
    assert "bad signature" in refusal(body=BODY.replace(b"10.0.0.1", b"10.0.0.2"))
    assert "bad signature" in refusal(method="DELETE")
    assert "bad signature" in refusal(path="/v1/snapshot")
    assert "bad signature" in refusal(path=PATH + "?x=1")


def test_a_changed_timestamp_is_refused():
    headers = sign(SECRET, "POST", PATH, BODY, NOW)
    later = dict(headers, **{TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 1)})
    assert "bad signature" in refusal(headers=later)


@pytest.mark.parametrize("timestamp", ["", "abc", "-1700000000000", "1.7e12", "1" * 17])
def test_a_malformed_timestamp_is_refused(timestamp):
    headers = dict(sign(SECRET, "POST", PATH, BODY, NOW), **{TIMESTAMP_HEADER: timestamp})
    assert "malformed X-Metacenter-Timestamp" in refusal(headers=headers)


def test_expired_and_future_timestamps_are_refused():
    assert "31.0 s old" in refusal(now=NOW + 31)
    assert "31.0 s in the future" in refusal(now=NOW - 31)
    assert "s old" in refusal(now=NOW + 10, window=5)
    verify(SECRET, "POST", PATH, BODY, sign(SECRET, "POST", PATH, BODY, NOW), NOW - 30)


def test_duplicated_headers_are_refused():
    headers = sign(SECRET, "POST", PATH, BODY, NOW)
    doubled = {k: [v, v] for k, v in headers.items()}
    assert "more than one" in refusal(headers=doubled)


def test_an_empty_secret_cannot_sign_or_verify():
    with pytest.raises(ValueError):
        sign("", "POST", PATH, BODY, NOW)
    with pytest.raises(ValueError):
        verify("", "POST", PATH, BODY, {}, NOW)


@given(body=st.binary(max_size=200), position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_changed_byte_of_the_body_is_refused(body, position, flip):
    body = body or b"x"
    i = position % len(body)
    changed = body[:i] + bytes([body[i] ^ flip]) + body[i + 1:]
    headers = sign(SECRET, "POST", PATH, body, NOW)
    verify(SECRET, "POST", PATH, body, headers, NOW)
    with pytest.raises(Unauthorized):
        verify(SECRET, "POST", PATH, changed, headers, NOW)


class CheckingResource(resource.Resource):
    """A peer endpoint: 200 for an authentic request, the refusal's reason with 401."""

    isLeaf = True

    def __init__(self, authenticator):
        super().__init__()
        self.authenticator = authenticator

    def render(self, request):
        body = request.content.read()
        try:
            self.authenticator.check(request, body)
        except Unauthorized as e:
            request.setResponseCode(401)
            return json.dumps({"reason": e.reason}).encode()
        return b"{}"


@pytest_twisted.inlineCallbacks
def test_signed_requests_pass_over_http_and_replays_after_the_window_do_not():
    clock = task.Clock()
    clock.advance(NOW)
    authenticator = PeerAuthenticator(SECRET, clock=clock)
    port = reactor.listenTCP(0, server.Site(CheckingResource(authenticator)), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        for method, path, body in [("POST", PATH, BODY), ("GET", "/v1/snapshot?cluster=a&page=2", b"")]:
            headers = authenticator.headers(method, path, body)
            response = yield treq.request(method, base + path, data=body or None, headers=headers)
            assert response.code == 200, (yield response.text())

            tampered = yield treq.request(method, base + path + "&x=1" if "?" in path else base + path + "?x=1",
                                          data=body or None, headers=headers)
            assert tampered.code == 401
            assert "bad signature" in json.loads((yield tampered.content()))["reason"]

        unsigned = yield treq.post(base + PATH, data=BODY)
        assert unsigned.code == 401

        replay_headers = authenticator.headers("POST", PATH, BODY)
        clock.advance(31)
        replayed = yield treq.post(base + PATH, data=BODY, headers=replay_headers)
        assert replayed.code == 401
        assert "s old" in json.loads((yield replayed.content()))["reason"]
    finally:
        yield port.stopListening()


def test_without_a_secret_the_authenticator_does_nothing():
    authenticator = PeerAuthenticator("")
    assert not authenticator.enabled
    assert authenticator.headers("POST", PATH, BODY) == {}
    authenticator.check(object(), BODY)  # no request attribute is even looked at

