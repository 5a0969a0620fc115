"""metacenter/openapi.json: a valid OpenAPI 3.1 document, in step with the
routes the Klein app registers, with the error codes of envelope.py, with the
request validation of validation.py (and cache.py), and with docs/api.md.

No node and no reactor: everything here runs in-process.
"""

import importlib
import json
import math
import os
import sys

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openapi_document import DOCUMENT, OPENAPI_PATH, REPO, resolve  # noqa: E402

DOCS_PATH = os.path.join(REPO, "docs", "api.md")
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# Answered with newline-delimited JSON (one SnapshotLine per line), not the
# envelope, when they succeed.
NDJSON_ROUTES = {("GET", "/v1/replica/snapshot"), ("POST", "/v1/replica/records")}
# Peer routes that read the state: 503 while the node is not ready
# (``endpoint(..., ready=True)``).
READINESS_CHECKED = {"/v1/replica/snapshot", "/v1/replica/digest", "/v1/replica/buckets", "/v1/replica/records",
                     "/v1/replica/repair"}




def operations():
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield method.upper(), path, op


def validator(schema):
    """A 2020-12 validator for a schema of the document (its $refs resolve
    against the whole document), formats checked."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": DOCUMENT["components"]},
                                              validate_formats=True)


def component(name):
    return DOCUMENT["components"]["schemas"][name]


# -- the document itself ----------------------------------------------------------


def test_document_is_valid_openapi_3_1():
    assert DOCUMENT["openapi"].startswith("3.1.")
    schema = schemathesis.openapi.from_path(OPENAPI_PATH)
    schema.validate()  # against the OpenAPI 3.1 meta-schema; raises if invalid
    loaded = []
    for result in schema.get_all_operations():
        operation = result.ok()  # raises for an operation schemathesis cannot use
        loaded.append((operation.method.upper(), operation.path))
    assert sorted(loaded) == sorted((m, p) for m, p, _ in operations())


def test_every_reference_resolves_and_every_schema_compiles():
    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in set(refs(DOCUMENT)):
        assert ref.startswith("#/"), ref
        resolve({"$ref": ref})  # KeyError if dangling
    for name, schema in DOCUMENT["components"]["schemas"].items():
        validator(schema)  # raises on an invalid schema
    for method, path, op in operations():
        for status, response in op["responses"].items():
            for media in resolve(response).get("content", {}).values():
                validator(media["schema"])


def test_operations_are_complete():
    operation_ids = [op["operationId"] for _, _, op in operations()]
    assert len(operation_ids) == len(set(operation_ids))
    tags = {t["name"] for t in DOCUMENT["tags"]}
    for method, path, op in operations():
        where = f"{method} {path}"
        assert op.get("summary") and op.get("description"), where
        assert len(op["tags"]) == 1 and op["tags"][0] in tags, where
        assert "200" in op["responses"], where
        parameters = [resolve(p) for p in op.get("parameters", [])]
        assert any(p["name"] == "TraceId" and p["in"] == "header" for p in parameters), where
        if "requestBody" in op:
            assert {"400", "413"} <= set(op["responses"]), where
            media = op["requestBody"]["content"]["application/json"]
            assert "example" in media, where
        if any(p.get("required") for p in parameters):
            assert "400" in op["responses"], where
        for status, response in op["responses"].items():
            response = resolve(response)
            content = response["content"]
            envelope = path not in ("/metrics", "/openapi.json")
            if (method, path) in NDJSON_ROUTES and status == "200":
                # A stream of snapshot lines, not the envelope; still traced.
                assert list(content) == ["application/x-ndjson"], where
                assert content["application/x-ndjson"]["schema"] == {"$ref": "#/components/schemas/SnapshotLine"}
                assert resolve(response["headers"]["X-Trace-ID"])["required"] is True, where
                continue
            if envelope:
                assert list(content) == ["application/json"], where
                assert "X-Trace-ID" in response["headers"], (where, status)
                assert resolve(response["headers"]["X-Trace-ID"])["required"] is True
                parts = content["application/json"]["schema"]["allOf"]
                expected = "#/components/schemas/OkEnvelope" if status.startswith("2") else \
                    "#/components/schemas/ErrorEnvelope"
                assert parts[0] == {"$ref": expected}, (where, status)
    assert ("application/json" in DOCUMENT["paths"]["/openapi.json"]["get"]["responses"]["200"]["content"])
    assert "text/plain" in DOCUMENT["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "503" in DOCUMENT["paths"]["/readyz"]["get"]["responses"]
    assert "401" in DOCUMENT["paths"]["/v1/replica/event"]["post"]["responses"]
    # Every peer route: 401 and the optional signature (only with a cluster
    # secret); the ones that read the state: 503 while the node is not ready.
    for method, path, op in operations():
        if op["tags"] == ["replication"]:
            assert "401" in op["responses"], (method, path)
            assert op["security"] == [{}, {"peerSignature": [], "peerTimestamp": []}], (method, path)
            assert ("503" in op["responses"]) == (path in READINESS_CHECKED), (method, path)
    event_type = [resolve(p) for p in DOCUMENT["paths"]["/v1/replica/event"]["post"]["parameters"]]
    assert any(p["name"] == "Event-Type" and p["in"] == "header" and p["required"] for p in event_type)


def test_error_codes_match_envelope_py():
    from metacenter.api import envelope

    documented = {e["code"]: e for e in DOCUMENT["x-error-codes"]}
    constants = {value for name, value in vars(envelope).items() if name.startswith("CODE_")}
    assert set(documented) == constants
    assert set(component("Error")["properties"]["code"]["enum"]) == constants
    errors = {
        envelope.CODE_INVALID: envelope.invalid("x"),
        envelope.CODE_NOT_FOUND: envelope.not_found("x"),
        envelope.CODE_CONFLICT: envelope.conflict("x", {"ip": "10.0.0.1"}),
        envelope.CODE_METHOD: envelope.method_not_allowed(["GET"]),
        envelope.CODE_TOO_LARGE: envelope.too_large(1),
        envelope.CODE_LIMIT: envelope.limit_reached("x"),
        envelope.CODE_UNAUTHORIZED: envelope.unauthorized("x"),
        envelope.CODE_UNAVAILABLE: envelope.unavailable("x"),
        envelope.CODE_INTERNAL: envelope.internal(),
    }
    assert set(errors) == constants
    for code, error in errors.items():
        assert documented[code]["status"] == error.status, code
        assert documented[code]["message"] == error.message, code
    # Each shared error response: its code, its status, its example is a
    # real error body of that kind.
    for name, response in DOCUMENT["components"]["responses"].items():
        media = response["content"]["application/json"]
        code = media["schema"]["allOf"][1]["properties"]["error"]["properties"]["code"]["const"]
        example = media["example"]
        assert example["error"]["code"] == code and example["error"]["message"] == errors[code].message, name
        assert validator(media["schema"]).is_valid(example), name
        if code == envelope.CODE_METHOD:
            assert "Allow" in response["headers"], name


def test_examples_conform_to_their_schemas():
    count = 0
    for method, path, op in operations():
        if "requestBody" in op:
            media = op["requestBody"]["content"]["application/json"]
            validator(media["schema"]).validate(media["example"])
            count += 1
        for status, response in op["responses"].items():
            for media_type, media in resolve(response).get("content", {}).items():
                if media_type == "application/x-ndjson":
                    # The schema is that of one line.
                    lines = media["example"].split("\n")
                    assert lines[-1] == "" and len(lines) >= 3, (method, path)
                    for line in lines[:-1]:
                        validator(media["schema"]).validate(json.loads(line))
                    assert set(json.loads(lines[0])) == {"snapshot", "node", "time"}
                    assert json.loads(lines[-2])["end"] is True
                    count += 1
                elif "example" in media and "schema" in media:
                    validator(media["schema"]).validate(media["example"])
                    count += 1
    assert count > 30


def test_document_constants_match_the_code():
    from metacenter.api import bodies
    from metacenter.core import events, fields
    from metacenter.core import load as state
    from metacenter.runtime import config

    load_add = component("LoadAdd")["properties"]
    assert load_add["prompt_length"]["maximum"] == state.PROMPT_MAX == 2**31 - 1
    assert load_add["prompt_length"]["minimum"] == 0 and load_add["prompt_length"]["default"] == 0
    assert component("Timestamp")["maximum"] == fields.INT64_MAX
    assert component("LogLevel")["properties"]["LevelParam"]["enum"] == list(config.LOG_LEVELS)
    event_type = DOCUMENT["components"]["parameters"]["EventType"]["schema"]["enum"]
    assert event_type == list(events.LOAD_EVENT_TYPES)
    assert f"[{' '.join(config.LOG_LEVELS)}]" in bodies.LOG_LEVEL_REASON
    try:
        cache = importlib.import_module("metacenter.core.cache")
    except ImportError:
        cache = None
    if cache is not None:
        assert component("BlockHash")["maximum"] == fields.UINT64_MAX == 2**64 - 1
        for name in ("CacheSave", "CacheQuery", "RouteScoreRequest"):
            assert component(name)["properties"]["prompt_hash"]["maxItems"] == cache.PROMPT_HASH_MAX_ITEMS
        topk = component("CacheQuery")["properties"]["topk"]
        assert (topk["minimum"], topk["maximum"], topk["default"]) == (1, cache.TOPK_MAX, cache.TOPK_DEFAULT)
        assert component("RouteScoreRequest")["properties"]["ips"]["maxItems"] == cache.IPS_MAX_ITEMS
    try:
        auth = importlib.import_module("metacenter.cluster.auth")
    except ImportError:
        auth = None
    if auth is not None:
        schemes = DOCUMENT["components"]["securitySchemes"]
        assert schemes["peerSignature"]["name"] == auth.SIGNATURE_HEADER
        assert schemes["peerTimestamp"]["name"] == auth.TIMESTAMP_HEADER


# -- the document and the routes ------------------------------------------------------


def registered_routes():
    from metacenter.api.server import MetacenterAPI

    app = MetacenterAPI.app

    routes = set()
    for rule in app.url_map.iter_rules():
        for method in rule.methods or ():
            if method != "HEAD":
                routes.add((method, rule.rule))
    return routes


def test_every_registered_route_is_documented_and_vice_versa():
    registered = registered_routes()
    documented = {(m, p) for m, p, _ in operations()}
    cache_paths = {(m, p) for m, p, op in operations() if "cache" in op["tags"]}
    missing_from_document = registered - documented
    assert not missing_from_document, f"routes the document lacks: {sorted(missing_from_document)}"
    # KV-cache routes are documented ahead of their implementation; every
    # other documented route must exist, and a cache route must exist with
    # exactly its documented methods once its path is served at all.
    not_served = documented - registered
    registered_paths = {p for _, p in registered}
    unexplained = {(m, p) for m, p in not_served if (m, p) not in cache_paths or p in registered_paths}
    assert not unexplained, f"documented routes the app does not serve: {sorted(unexplained)}"
    # Every peer route is under /v1/replica/ and tagged replication, and
    # nothing else is.
    replica = {(m, p) for m, p, op in operations() if op["tags"] == ["replication"]}
    assert replica == {(m, p) for m, p in registered if p.startswith("/v1/replica/")}


def test_openapi_route_serves_this_file():
    from metacenter.api import server as api

    assert os.path.samefile(api.OPENAPI_PATH, OPENAPI_PATH)


# -- the schemas and the validation code: same verdict on any body ------------------


def _accepts(fn, obj):
    from metacenter.api.envelope import ApiError
    from metacenter.core.errors import InvalidInput

    try:
        fn(obj)
    except InvalidInput:
        return False
    except ApiError as e:
        assert e.status == 400, e.reason
        return False
    return True


def _has_integral_float(value):
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    if isinstance(value, list):
        return any(_has_integral_float(v) for v in value)
    if isinstance(value, dict):
        return any(_has_integral_float(v) for v in value.values())
    return False


_VALID_IPS = ["10.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "FE80::1", "2001:db8::8a2e:370:7334",
              "::ffff:1.2.3.4", "1:2:3:4:5:6:7::"]
_INVALID_IPS = ["256.0.0.1", "010.0.0.1", "1.2.3", "1::2::3", " 10.0.0.1", "10.0.0.1\n", "1.2.3.4/32",
                "localhost", "", "::1%", "\u0661.0.0.1", "fe80::1%eth0"]
_noise = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4),
              st.floats(allow_nan=False).filter(lambda f: not f.is_integer())),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4)


def _near(schema):
    """Values for a field of ``schema``: mostly valid, often just beyond a
    boundary, sometimes anything at all."""
    s = resolve(schema)
    types = s.get("type", [])
    types = set(types) if isinstance(types, list) else {types}
    if "enum" in s:
        valid, edge = st.sampled_from(s["enum"]), st.sampled_from(["info", "WARNING", "", " INFO"])
    elif "integer" in types:
        low, high = s.get("minimum", -(2**70)), s.get("maximum", 2**70)
        valid = st.integers(low, high) | st.sampled_from([low, high])
        edge = st.sampled_from([low - 1, high + 1, -1, 0, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64])
    elif "array" in types and "prefixItems" not in s and "anyOf" not in s:
        valid = st.lists(_near(s["items"]), min_size=s.get("minItems", 0), max_size=4)
        edge = st.lists(_near(s["items"]), max_size=1) | st.lists(_noise, max_size=2)
    elif "string" in types:
        # Any string field may be an IP address field: both kinds, whatever the schema says.
        valid = st.text(min_size=s.get("minLength", 0), max_size=5) | st.sampled_from(_VALID_IPS)
        edge = st.sampled_from(_INVALID_IPS + [""])
    elif "const" in s:
        valid, edge = st.just(s["const"]), _noise
    elif "array" in types and ("prefixItems" in s or "anyOf" in s):
        # Tuples (the peer routes' records and tombstones): each alternative
        # element by element, sometimes one element short or one too many.
        shapes = [{**s, **a} for a in s.get("anyOf", [{}])]
        valid = st.one_of([st.tuples(*[_near(p) for p in shape["prefixItems"]]).map(list) for shape in shapes])
        edge = valid.flatmap(lambda items: st.sampled_from([items[:-1], items + [0], items[1:]]))
    elif "object" in types and ("properties" in s or "anyOf" in s):
        # An object in an array (a batch's events): each alternative's fields
        # generated like a request body's.
        shapes = [{**s, "properties": {**s.get("properties", {}), **resolve(a).get("properties", {})}}
                  for a in s.get("anyOf", [{}])]
        valid = st.one_of([_object_fields(shape) for shape in shapes])
        edge = _noise
    elif "object" in types and isinstance(s.get("additionalProperties"), dict):
        valid = st.dictionaries(st.text(max_size=3), _near(s["additionalProperties"]), max_size=2)
        edge = _noise
    else:
        valid = edge = _noise
    if "null" in types:
        valid = valid | st.none()
    return _weighted((10, valid), (1, edge), (1, st.none()), (1, _noise))


def _weighted(*choices):
    """One of the strategies, chosen with the given weights (st.one_of
    picks its branches about evenly)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


_ABSENT = object()


def _bodies(schema_name):
    """JSON objects for a request schema: each required field present 8
    times in 9, each optional one 3 times in 4, plus an unknown field."""
    return _object_fields(component(schema_name))


def _object_fields(schema):
    required = set(schema.get("required", []))
    fields = {name: _near(prop) for name, prop in schema.get("properties", {}).items()}
    fields["extra"] = _noise
    mapping = {name: _weighted((8 if name in required else 3, strategy), (1, st.just(_ABSENT)))
               for name, strategy in fields.items()}
    return st.fixed_dictionaries(mapping).map(lambda d: {k: v for k, v in d.items() if v is not _ABSENT})


def _cache_parser(name):
    return getattr(importlib.import_module("metacenter.api.bodies"), name)


def _validation(name):
    return getattr(importlib.import_module("metacenter.api.bodies"), name)


class _PeerNode:
    """What the peer routes ask of a node, doing nothing: enough to run a
    route's own validation in-process (every peer request looks new here)."""

    ready = True
    cache = object()

    class clock:
        @staticmethod
        def seconds():
            return 1.7e9

    class state:
        tombstone_ttl = 60.0

        @staticmethod
        def request_state(request_id):
            return None

    def apply(self, *args):
        return True

    def save_cache(self, *args):
        return True

    def merge_record(self, *args):
        return True

    def merge_tombstone(self, *args):
        return True


class _Body:
    """A request as far as the peer routes read it."""

    def __init__(self, obj):
        import io

        self.content = io.BytesIO(json.dumps(obj).encode("utf-8"))


def _peer_route(name, items_rejected=None):
    """The validation of a peer route, which lives in the route itself: the
    route run against a _PeerNode, its ApiError raised, and for batch and
    repair a 400 too when an item was rejected (the route answers 200 and
    reports it; here, as in test_fuzz, the verdict is about the whole body)."""
    replica_api = importlib.import_module("metacenter.api.replica")
    from metacenter.api.envelope import invalid
    from twisted.internet.defer import DeferredLock

    class Routes(replica_api.ReplicaRoutes):
        node = _PeerNode()
        replica_batches = DeferredLock()  # as MetacenterAPI has
        step_budget = float("inf")  # the whole body in one step: the verdict at once

    route = getattr(Routes, name)
    route = getattr(route, "__wrapped__", route)  # endpoint's inner function

    def run(obj):
        args = (Routes(), _Body(obj)) + (("t",) if route is not getattr(Routes, name) else ())
        result = route(*args)
        if items_rejected is not None and items_rejected(result):
            raise invalid(f"an item was rejected: {result['rejected']}")

    return run


DIFFERENTIAL = [
    ("LoadAdd", lambda: _validation("load_add")),
    ("LoadDelete", lambda: _validation("load_delete")),
    ("LogLevel", lambda: _validation("log_level")),
    ("EngineReset", lambda: _validation("engine_reset")),
    ("LeaseKeepalive", lambda: _validation("lease_keepalive")),
    ("LeaseRevoke", lambda: _validation("lease_revoke")),
    ("Refresh", lambda: _validation("refresh")),
    ("RoutePick", lambda: _validation("route_pick")),
    ("CacheSave", lambda: _cache_parser("parse_cache_save")),
    ("CacheQuery", lambda: _cache_parser("parse_cache_query")),
    ("RouteScoreRequest", lambda: _cache_parser("parse_route_score")),
    # The peer routes validate inside the route: run against a stub node.
    ("ReplicaBatch", lambda: _peer_route("replica_batch", lambda r: bool(r["rejected"]))),
    ("ReplicaBucketsRequest", lambda: importlib.import_module("metacenter.api.bodies").cluster_list),
    ("ReplicaRecordsRequest", lambda: _peer_route("replica_records")),
    ("ReplicaRepairRequest", lambda: _peer_route("replica_repair", lambda r: r["rejected"] > 0)),
]


@pytest.mark.parametrize("schema_name,parser", DIFFERENTIAL, ids=[d[0] for d in DIFFERENTIAL])
def test_request_schema_and_validation_agree(schema_name, parser):
    """For generated JSON objects, the document's request schema and the
    node's validation function give the same verdict. (JSON integers only:
    bodies with integral floats are left out, JSON Schema cannot tell 1.0
    from 1; see the info description.)"""
    fn = parser()
    if fn is None:
        pytest.skip(f"the validation of {schema_name} is not implemented yet")
    schema_validator = validator({"$ref": f"#/components/schemas/{schema_name}"})
    verdicts = {True: 0, False: 0}

    # A schema with many optional fields (LoadAdd, RoutePick) gets valid bodies
    # rarely: more examples, so both verdicts are reached often enough.
    examples = 200 if len(component(schema_name).get("properties", {})) <= 6 else 800

    def check_bodies(count):
        @settings(max_examples=count, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=_bodies(schema_name))
        def check(body):
            if _has_integral_float(body):
                return
            by_schema = schema_validator.is_valid(body)
            by_code = _accepts(fn, body)
            verdicts[by_code] += 1
            assert by_schema == by_code, f"{schema_name}: schema says {by_schema}, node says {by_code} for {body!r}"

        check()

    check_bodies(examples)
    if min(verdicts.values()) < 10:
        # Hypothesis's choices also depend on what ran before in the process:
        # rarely, too few bodies of one verdict; more examples then.
        check_bodies(examples * 4)
    # Also the documented example and some bodies that must be valid.
    example = next(op["requestBody"]["content"]["application/json"]["example"] for _, _, op in operations()
                   if op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
                   == {"$ref": f"#/components/schemas/{schema_name}"})
    assert schema_validator.is_valid(example) and _accepts(fn, example)
    # Both verdicts were reached often enough for the comparison to mean something.
    assert verdicts[True] >= 10 and verdicts[False] >= 10, verdicts


def test_records_refuses_boolean_buckets():
    body = {"clusters": ["c"], "buckets": {"c": [True]}}
    assert not validator({"$ref": "#/components/schemas/ReplicaRecordsRequest"}).is_valid(body)
    assert not _accepts(_peer_route("replica_records"), body)


_SCALAR_EDGES = [None, True, False, "", "x", "0", 1.5, -0.5, 1e300, [], {}, {"a": 1}, -(2**64), -1, 0, 1, 10, 1000,
                 1001, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, "INFO", "info", "TRACE", "FATAL",
                 *_VALID_IPS, *_INVALID_IPS]
_EDGES = _SCALAR_EDGES + [[v] for v in _SCALAR_EDGES] + [[0, 2**64 - 1], [1, -1], [5] * 3, ["10.0.0.1", "::1"],
                                                         ["10.0.0.1", "x"], [[1]], list(range(1001))]


@pytest.mark.parametrize("schema_name,parser", DIFFERENTIAL, ids=[d[0] for d in DIFFERENTIAL])
def test_request_schema_and_validation_agree_on_boundaries(schema_name, parser):
    """The documented example with one field replaced by each of many
    boundary values (or removed): same verdict from the schema and the node."""
    fn = parser()
    if fn is None:
        pytest.skip(f"the validation of {schema_name} is not implemented yet")
    schema_validator = validator({"$ref": f"#/components/schemas/{schema_name}"})
    example = next(op["requestBody"]["content"]["application/json"]["example"] for _, _, op in operations()
                   if op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
                   == {"$ref": f"#/components/schemas/{schema_name}"})
    disagreements = []
    checked = 0
    for name in list(component(schema_name).get("properties", {})) + ["extra"]:
        bodies = [{k: v for k, v in example.items() if k != name}]
        bodies += [{**example, name: value} for value in _EDGES]
        for body in bodies:
            checked += 1
            if schema_validator.is_valid(body) != _accepts(fn, body):
                disagreements.append((name, body.get(name, "<absent>"), schema_validator.is_valid(body)))
    assert checked > 100
    assert not disagreements, f"{schema_name}: (field, value, schema verdict): {disagreements}"


# -- docs/api.md ---------------------------------------------------------------------


def test_docs_api_md_is_generated_from_the_document():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        gen_api_docs = importlib.import_module("gen_api_docs")
    finally:
        sys.path.pop(0)
    expected = gen_api_docs.render(DOCUMENT)
    with open(DOCS_PATH, encoding="utf-8") as f:
        assert f.read() == expected, "docs/api.md is stale: run python tools/gen_api_docs.py"
    # The rendering covers what it must.
    for method, path, _ in operations():
        assert f"### {method} {path}" in expected
    for code in (40001400, 40001404, 40001405, 40001413, 40101001, 50301503, 50001000):
        assert f"`{code}`" in expected
