"""Property-based fuzzing of a real node with schemathesis, driven by
metacenter/openapi.json as the node serves it.

For every operation of the document, schemathesis generates requests in two
modes and sends them to a `twistd metacenter` subprocess (tests/nodeproc.py):

- positive (valid per the document): the node must accept them with 2xx,
  wherever the document describes validity exactly (everywhere but the
  single replicated event, whose body depends on the Event-Type header);
- negative (invalid per the document; only for operations that have a body
  or a required parameter): the node must reject them with a 4xx (or, for
  the peer routes that check items one by one, report a rejected item).

The peer-to-peer routes (/v1/replica/*) are fuzzed like the others: the node
has no peers and no cluster secret, so their traffic only merges into its
own state. Every response must conform to the document (status code, content
type, headers, body schema), none may be a 5xx, and every JSON response must
be the envelope, with a trace id equal to the X-Trace-ID header (and to the
request's TraceId header when one was sent) and an error code that matches
the HTTP status; the NDJSON streams (snapshot, records) must be complete, every
line a SnapshotLine.

Requests go through schemathesis' synchronous call path (requests, no
reactor) and the node runs in its own process, so nothing here touches
pytest-twisted's reactor.

Examples: 100 per operation and mode, so 200 requests per operation that
takes input (body or required parameter), and 50 for the GET routes without
input, whose only variable is the TraceId header. METACENTER_FUZZ_EXAMPLES
changes the 100 (and the 50 with it) for a longer run. Generation is derandomized:
every run sends the same requests.
"""

import json
import os
import socket
import time
import uuid

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from tests.nodeproc import NodeProcess

from openapi_document import DOCUMENT, REPO
from openapi_document import resolve as _resolve

HTTP_METHODS = ("get", "post", "put", "delete", "patch")
MAX_EXAMPLES = int(os.environ.get("METACENTER_FUZZ_EXAMPLES", "100"))
MAX_EXAMPLES_NO_INPUT = max(1, MAX_EXAMPLES // 2)

# Not JSON envelopes when they succeed: Prometheus text and the document itself.
NON_ENVELOPE = {("GET", "/metrics"), ("GET", "/openapi.json")}
# Newline-delimited JSON streams when they succeed (the envelope otherwise):
# every line a SnapshotLine, checked by check_ndjson.
NDJSON = {("GET", "/v1/replica/snapshot"), ("POST", "/v1/replica/records")}
# Peer routes that check each item of a well-formed body on its own: an
# invalid item is skipped and reported in the 200 answer, not refused with a
# 400. For these a generated invalid body counts as rejected when it got a
# 4xx or when the answer reports a rejected item, and a valid one must have
# none reported. (All replica routes are fuzzed: the fuzzed node has no peers,
# so nothing it adopts travels further, and no run depends on another's
# traffic beyond idempotent merges.)
ITEMS_REJECTED = {
    ("POST", "/v1/replica/batch"): lambda data: len(data["rejected"]),
    ("POST", "/v1/replica/repair"): lambda data: data["rejected"],
}
# Operations whose valid-per-document inputs are not all valid: a replicated
# load.stats.set needs a LoadAdd body, the delete types a LoadDelete, and the
# document can only say "either" (the choice depends on a header).
POSITIVE_NOT_EXACT = {("POST", "/v1/replica/event")}
# Valid inputs whose answer also depends on the state (issue 10): a
# conditional add whose engine changed is a 409 (with the row); a pick with
# no candidate a 404, of a request that already finished a 409. Any other
# answer to a valid input is still a failure.
STATE_DEPENDENT = {("POST", "/v1/load/stats"): {409}, ("POST", "/v1/route/pick"): {404, 409}}

ERROR_STATUS = {e["code"]: e["status"] for e in DOCUMENT["x-error-codes"]}


SCHEMA_CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
]




def _operation(method, path):
    return DOCUMENT["paths"][path][method.lower()]


def _has_inputs(method, path):
    """Whether a request can be invalid at all: a body or a required
    parameter (an optional header of any string has no invalid value)."""
    operation = _operation(method, path)
    return "requestBody" in operation or any(_resolve(p).get("required") for p in operation.get("parameters", []))


OPERATIONS = [(method.upper(), path) for path, item in DOCUMENT["paths"].items()
              for method in item if method in HTTP_METHODS]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if _has_inputs(m, p)]


@pytest.fixture(scope="module")
def node():
    n = NodeProcess().start(wait_ready=True)
    yield n
    n.stop()


@pytest.fixture(scope="module")
def schema(node):
    # The document as the node serves it: what clients get is what is tested.
    # A rejected invalid request gets one of the node's documented 4xx: a
    # too long array can also be a too large body (413).
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "401", "404", "405", "413"]}}})
    return schemathesis.openapi.from_url(node.url + "/openapi.json", config=config)


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def _header(response, name):
    """The one value of a response header (schemathesis' Response has
    lowercase keys and lists of values), as the UTF-8 the node wrote."""
    values = response.headers.get(name.lower(), [])
    assert len(values) <= 1, f"{name} sent {len(values)} times"
    if not values:
        return None
    # requests decodes header bytes as latin-1; the node writes UTF-8.
    try:
        return values[0].encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return values[0]


_LINE_VALIDATOR = jsonschema_rs.Draft202012Validator(
    {"$ref": "#/components/schemas/SnapshotLine", "components": DOCUMENT["components"]}, validate_formats=True)


def check_ndjson(method, path, response):
    """A complete snapshot stream: a header line, entries, an end line whose
    counts match; every line a SnapshotLine; only records from /records."""
    what = f"{method} {path} -> {response.status_code}"
    assert _header(response, "Content-Type") == "application/x-ndjson", what
    assert _header(response, "X-Trace-ID"), f"{what}: no X-Trace-ID"
    text = response.content.decode("utf-8")
    assert text.endswith("\n"), f"{what}: the stream does not end with a newline"
    lines = [json.loads(line) for line in text[:-1].split("\n")]
    for line in lines:
        errors = [e.message for e in _LINE_VALIDATOR.iter_errors(line)]
        assert not errors, f"{what}: line {line!r} is no SnapshotLine: {errors}"
    header, *entries, end = lines
    assert isinstance(header, dict) and header.get("snapshot") == 1, f"{what}: header {header!r}"
    assert isinstance(end, dict) and end.get("end") is True, f"{what}: end {end!r}"
    tags = [entry[0] for entry in entries]
    counts = {"requests": tags.count("r"), "tombstones": tags.count("t"), "cache_engines": tags.count("c")}
    leases = tags.count("l")  # gateway leases (issue 10): counted in the end line when there are some
    assert len(tags) == sum(counts.values()) + leases, f"{what}: a dict line between header and end"
    assert {k: end[k] for k in counts} == counts, f"{what}: end {end!r}, sent {counts}"
    assert end.get("leases", 0) == leases, f"{what}: end {end!r}, sent {leases} leases"
    if path == "/v1/replica/records":
        assert counts["tombstones"] == counts["cache_engines"] == 0, f"{what}: {counts}"
    return lines


def check_envelope(method, path, response, sent_trace_id=None):
    """The wire contract's envelope, whatever the status (NDJSON for the
    successful streams)."""
    what = f"{method} {path} -> {response.status_code}"
    assert response.status_code < 500, f"{what}: server error: {response.content[:500]!r}"
    if (method, path) in NON_ENVELOPE and response.status_code == 200:
        return
    if (method, path) in NDJSON and response.status_code == 200:
        return check_ndjson(method, path, response)
    content_type = _header(response, "Content-Type")
    assert content_type == "application/json; charset=utf-8", f"{what}: Content-Type {content_type!r}"
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"status", "error", "data", "trace_id"}, f"{what}: {body!r}"
    trace_id = body["trace_id"]
    assert isinstance(trace_id, str) and trace_id, f"{what}: trace_id {trace_id!r}"
    assert _header(response, "X-Trace-ID") == trace_id, f"{what}: X-Trace-ID differs from trace_id"
    if sent_trace_id is None:
        sent_trace_id = response.request.headers.get("TraceId")
    if isinstance(sent_trace_id, bytes):
        sent_trace_id = sent_trace_id.decode("latin-1")
    if isinstance(sent_trace_id, str) and sent_trace_id.strip():
        assert trace_id == sent_trace_id.strip(), f"{what}: TraceId {sent_trace_id!r} not echoed: {trace_id!r}"
    else:
        uuid.UUID(trace_id)  # a new one
    if 200 <= response.status_code < 300:
        assert body["status"] == "OK" and body["error"] is None, f"{what}: {body!r}"
    else:
        assert body["status"] == "ERROR", f"{what}: {body!r}"
        # Only a 409 carries data: the engine's current row (issue 10).
        assert body["data"] is None or (response.status_code == 409 and isinstance(body["data"], dict)), \
            f"{what}: {body!r}"
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"code", "message", "reason"}, f"{what}: {body!r}"
        assert ERROR_STATUS.get(error["code"]) == response.status_code, f"{what}: code {error['code']}"
        assert isinstance(error["message"], str) and error["message"], f"{what}: {body!r}"
        assert isinstance(error["reason"], str) and error["reason"], f"{what}: {body!r}"
    return body


def _served(node, method, path):
    """False when the node answers the path with the unknown-route 404 (a
    KV-cache route not registered yet)."""
    status, _, body = node.call(method, path, raw=None if method == "GET" else b"{}")
    return not (status == 404 and isinstance(body, dict) and (body.get("error") or {}).get("code") == 40001404)


def _skip_if_not_served(node, method, path):
    if "cache" in _operation(method, path).get("tags", []) and not _served(node, method, path):
        pytest.skip(f"{method} {path} (tag cache) is not served by this node yet")


def _integral_floats_to_ints(value):
    """JSON Schema calls 1.0 an integer, the node (like the Go reference)
    does not; generated valid bodies get plain integers. That 1.0 is a 400 is
    checked in test_wire_details_json_schema_cannot_express."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_to_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_to_ints(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_generated_requests(node, schema, session, method, path, mode):
    _skip_if_not_served(node, method, path)
    operation = schema[path][method]
    has_inputs = _has_inputs(method, path)
    examples = MAX_EXAMPLES if has_inputs else MAX_EXAMPLES_NO_INPUT
    statuses = []
    checks = list(SCHEMA_CHECKS)
    items_rejected = ITEMS_REJECTED.get((method, path))
    if mode.is_negative and items_rejected is None:
        checks.append(st_checks.negative_data_rejection)
    must_accept = mode.is_positive and (method, path) not in POSITIVE_NOT_EXACT

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if mode.is_positive and isinstance(case.body, (dict, list)):
            case.body = _integral_floats_to_ints(case.body)
        response = case.call(base_url=node.url, session=session, timeout=10)
        statuses.append(response.status_code)
        case.validate_response(response, checks=checks)
        body = check_envelope(method, path, response)
        if must_accept and response.status_code not in STATE_DEPENDENT.get((method, path), ()):
            assert 200 <= response.status_code < 300, (
                f"valid request rejected: {case.as_curl_command(base_url=node.url)}\n-> {response.content!r}")
        if items_rejected is not None and response.status_code == 200:
            rejected = items_rejected(body["data"])
            if mode.is_positive:
                assert not rejected, f"valid items rejected: {case.body!r}\n-> {body['data']!r}"
            else:
                assert rejected, f"invalid request accepted: {case.body!r}\n-> {body['data']!r}"
        elif items_rejected is not None and mode.is_negative:
            assert 400 <= response.status_code < 500, f"invalid request not rejected: {response.status_code}"

    run()
    print(f"\n{method} {path} {mode}: {len(statuses)} requests, statuses {sorted(set(statuses))}")
    if has_inputs:
        assert len(statuses) >= examples, f"only {len(statuses)} requests generated"
    if mode.is_negative:
        assert any(400 <= s < 500 for s in statuses), "no generated request was rejected"


# -- what generation does not reach ---------------------------------------------


def _documented_methods(path):
    return {m.upper() for m in DOCUMENT["paths"][path] if m in HTTP_METHODS}


@pytest.mark.parametrize("path", list(DOCUMENT["paths"]))
def test_undocumented_methods_get_405_with_allow(node, path):
    documented = _documented_methods(path)
    _skip_if_not_served(node, sorted(documented)[0], path)
    expected_allow = documented | ({"HEAD"} if "GET" in documented else set())
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        if method in documented:
            continue
        status, headers, body = node.call(method, path, raw=b"{}", headers={"TraceId": "t-405"})
        assert status == 405, (method, path, status, body)
        assert body["error"]["code"] == 40001405 and body["trace_id"] == "t-405", body
        allow = {m.strip() for m in headers["Allow"].split(",")}
        assert allow == expected_allow, (method, path, headers["Allow"])
    if "GET" in documented:
        query = "&".join(f"{p['name']}={p['example']}" for p in map(_resolve, _operation("GET", path)["parameters"])
                         if p["in"] == "query" and p.get("required"))
        status, headers, body = node.call("HEAD", path + ("?" + query if query else ""))
        assert status == 200 and body == b"", (path, status, body)


# Klein would answer this itself (400 text/html); RoutingResource answers first.
NOT_UTF8_PATH = "/%ff"


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/load", "/v1/load/stats/x", "/v2/load/stats", "/V1/LOAD/STATS",
                                  "/metrics/", "/livez/", "/v1/replica", "/v1/load/stats%00", NOT_UTF8_PATH])
def test_unknown_paths_get_404_envelope(node, path):
    for method in ("GET", "POST", "DELETE"):
        with socket.create_connection((node.host, node.port), timeout=5) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nTraceId: t-404\r\nContent-Length: 2\r\n"
                      f"Connection: close\r\n\r\n{{}}".encode())
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404 "), (method, path, head)
        assert b"\r\nX-Trace-Id: t-404" in head or b"\r\nX-Trace-ID: t-404" in head, head
        if b"chunked" in head.lower():
            payload = _dechunk(payload)
        body = json.loads(payload)
        assert body["status"] == "ERROR" and body["error"]["code"] == 40001404, body


def _dechunk(data):
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def _body_operations():
    return [(m, p) for m, p in OPERATIONS if "requestBody" in _operation(m, p)]


def _request_example(method, path):
    operation = _operation(method, path)
    body = operation["requestBody"]["content"]["application/json"]["example"]
    headers = {}
    for parameter in map(_resolve, operation.get("parameters", [])):
        if parameter["in"] == "header" and parameter.get("required"):
            headers[parameter["name"]] = parameter["example"]
    return body, headers


@pytest.mark.parametrize("method,path", _body_operations(), ids=[f"{m} {p}" for m, p in _body_operations()])
def test_documented_request_examples_are_accepted(node, schema, session, method, path):
    """Every request example of the document works as documented, and the
    answer conforms to the document."""
    _skip_if_not_served(node, method, path)
    body, headers = _request_example(method, path)
    if (method, path) == ("POST", "/v1/route/pick"):
        # The example's request may have been booked and released by the
        # generated requests before (a reset of its engine): a pick of it
        # is then rightly a 409. A new id shows the example as documented.
        body = {**body, "request_id": str(uuid.uuid4())}
    case = schema[path][method].Case(body=body, headers=headers)
    response = case.call(base_url=node.url, session=session, timeout=10)
    case.validate_response(response, checks=SCHEMA_CHECKS)
    assert response.status_code == 200, response.content
    check_envelope(method, path, response)


@pytest.mark.parametrize("method,path", _body_operations(), ids=[f"{m} {p}" for m, p in _body_operations()])
def test_oversized_bodies_get_413(node, method, path):
    _skip_if_not_served(node, method, path)
    _, headers = _request_example(method, path)
    status, _, body = node.call(method, path, raw=b" " * 70000 + b"{}", headers=headers)
    assert status == 413 and body["error"]["code"] == 40001413, (status, body)


def _post(node, path, raw, headers=None):
    status, hdrs, body = node.call("POST", path, raw=raw, headers=headers)
    return status, body


def test_wire_details_json_schema_cannot_express(node):
    """What the document states in prose: JSON integers only (1.0 and true
    are not), lone UTF-16 surrogate escapes are no valid text, TraceId
    fallbacks. After all of it the node still answers every read route."""
    add = {"cluster": "wire", "request_id": "wire-1", "ip": "10.9.9.9"}
    for field, value in [("prompt_length", "1.0"), ("prompt_length", "true"), ("prompt_length", '"1"'),
                         ("prompt_length", "-1"), ("prompt_length", str(2**31)), ("timestamp", "5.0"),
                         ("timestamp", str(2**63)), ("timestamp", "-1")]:
        raw = json.dumps(add)[:-1] + f', "{field}": {value}}}'
        status, body = _post(node, "/v1/load/stats", raw.encode())
        assert status == 400 and field in body["error"]["reason"], (field, value, body)
    # Null is absent: the defaults apply.
    status, body = _post(node, "/v1/load/stats", json.dumps({**add, "prompt_length": None, "timestamp": None}).encode())
    assert status == 200, body
    # Lone surrogates (valid JSON escapes, not text) in a string that is stored.
    for field in ("cluster", "request_id"):
        raw = json.dumps({**add, "request_id": "wire-2"})
        raw = raw.replace(f'"{field}": "', f'"{field}": "\\ud800', 1).encode()
        status, body = _post(node, "/v1/load/stats", raw)
        assert status == 400 and field in body["error"]["reason"], (field, body)
    # The same for the KV-cache routes' integers.
    if _served(node, "POST", "/v1/cache/save"):
        for path, raw in [("/v1/cache/save", '{"cluster": "c", "ip": "10.0.0.1", "prompt_hash": [1.0]}'),
                          ("/v1/cache/save", '{"cluster": "c", "ip": "10.0.0.1", "prompt_hash": [true]}'),
                          ("/v1/cache/save", '{"cluster": "c", "ip": "10.0.0.1", "prompt_hash": [%d]}' % 2**64),
                          ("/v1/cache/query", '{"cluster": "c", "prompt_hash": [], "topk": 1.0}'),
                          ("/v1/route/score", '{"cluster": "\\ud800", "prompt_hash": []}')]:
            status, body = _post(node, path, raw.encode())
            assert status == 400 and body["error"]["code"] == 40001400, (path, raw, body)
        raw = b'{"cluster": "c", "ip": "10.0.0.1", "prompt_hash": [%d]}' % (2**64 - 1)
        status, body = _post(node, "/v1/cache/save", raw)
        assert status == 200, body
    # Not UTF-8, not an object, empty, deeply nested.
    for raw in (b'{"cluster": "\xff"}', b"[]", b"", b"[" * 20000 + b"]" * 20000, b"NaN", b'{"a": 1e999999}'):
        status, body = _post(node, "/v1/load/stats", raw)
        assert status in (400, 413) and body["status"] == "ERROR", (raw[:20], body)
    # A TraceId that is not UTF-8 or empty: a new UUID.
    for value in (b"\xff\xfe", b""):
        with socket.create_connection((node.host, node.port), timeout=5) as s:
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nTraceId: " + value + b"\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        body = json.loads(_dechunk(payload) if b"chunked" in head.lower() else payload)
        uuid.UUID(body["trace_id"])
    for path in ("/v1/load/overview", "/v1/node/status", "/metrics", "/v1/load/stats?cluster=wire"):
        status, _, body = node.call("GET", path)
        assert status == 200, (path, body)


def _peer_auth_wired():
    """Whether any node module other than auth.py itself uses metacenter.auth."""
    package = os.path.join(REPO, "metacenter")
    for name in os.listdir(package):
        if name.endswith(".py") and name != "auth.py":
            with open(os.path.join(package, name), encoding="utf-8") as f:
                text = f.read()
            if "metacenter.cluster.auth" in text or "import auth" in text or "PeerAuthenticator" in text:
                return True
    return False


def test_cluster_secret_makes_replica_events_require_a_signature():
    """401 in the envelope for an unsigned peer request when the node has a
    cluster secret (the document's Unauthorized response)."""
    secured = NodeProcess("127.0.0.1", None, "--cluster-secret", "fuzz-secret").start(wait_ready=True)
    try:
        event = {"cluster": "c", "request_id": "r-sec", "ip": "10.0.0.1", "timestamp": 1}
        status, headers, body = secured.call("POST", "/v1/replica/event", body=event,
                                             headers={"Event-Type": "load.stats.set", "TraceId": "t-401"})
        if status == 200:
            if not _peer_auth_wired():
                pytest.skip("peer authentication is not wired into /v1/replica/event yet")
        assert status == 401, (status, body)
        assert body["status"] == "ERROR" and body["error"]["code"] == 40101001 and body["trace_id"] == "t-401", body
        assert headers["X-Trace-ID"] == "t-401"
    finally:
        secured.stop()


def test_cluster_secret_guards_every_peer_route():
    """Every route tagged replication: 401 (40101001, in the envelope)
    unsigned or signed with another secret, the documented answer when signed
    as the Headers section says (X-Metacenter-Timestamp and
    X-Metacenter-Signature over method, target and body)."""
    from metacenter.cluster import auth

    peer_routes = [(m, p) for m, p in OPERATIONS if _operation(m, p)["tags"] == ["replication"]]
    assert len(peer_routes) == 7, peer_routes
    secured = NodeProcess("127.0.0.1", None, "--cluster-secret", "fuzz-secret").start(wait_ready=True)
    try:
        for method, path in peer_routes:
            operation = _operation(method, path)
            headers = {"TraceId": "t-peer"}
            raw = b""
            if "requestBody" in operation:
                body, required = _request_example(method, path)
                headers.update(required)
                raw = json.dumps(body).encode("utf-8")
            for signed_with in (None, "another-secret"):
                sent = dict(headers)
                if signed_with is not None:
                    sent.update(auth.sign(signed_with, method, path, raw, time.time()))
                status, _, answer = secured.call(method, path, raw=raw, headers=sent)
                assert status == 401, (method, path, signed_with, status, answer)
                assert answer["error"]["code"] == 40101001 and answer["trace_id"] == "t-peer", answer
            sent = {**headers, **auth.sign("fuzz-secret", method, path, raw, time.time())}
            status, response_headers, answer = secured.call(method, path, raw=raw, headers=sent)
            assert status == 200, (method, path, status, answer)
            assert response_headers["X-Trace-ID"] == "t-peer", (method, path)
            if (method, path) in NDJSON:
                assert response_headers["Content-Type"] == "application/x-ndjson", (method, path)
                assert answer.endswith(b"\n") and json.loads(answer.splitlines()[-1])["end"] is True, answer
            else:
                assert answer["status"] == "OK" and answer["trace_id"] == "t-peer", answer
    finally:
        secured.stop()
