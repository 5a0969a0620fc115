"""Every call of the API, described once (method, path, body, how it is
routed, what it returns) and decoded once; ``Client`` and ``AsyncClient``
differ only in how the bytes travel.

Routing keys: calls about a cluster are routed by the cluster name (the Go
gateway's rule); lease calls by the lease name, so one gateway's keepalives
keep landing on one node; calls about nothing in particular by ``""``.
Every call is safe to repeat on another node (adds and picks are idempotent
by request id, deletes by nature, saves and keepalives overwrite), which is
what makes failover safe.
"""

import json
from urllib.parse import quote

from metacenter.client.errors import MetacenterError, NodeUnavailable

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
GET_HEADERS = {"Accept": "application/json"}


class Call:
    """One API call: ``method``, ``path``, JSON ``body`` (bytes or None),
    ``key`` (ring key), ``node`` (an explicit node: no ring, no breaker),
    ``follow`` (a request id whose add's node is tried first), ``place``
    ((request_id, cluster) to remember on success), ``forget`` (request id to
    drop on success), ``result`` (data -> return value), ``kind`` ("json",
    "text" for /metrics, "document" for /openapi.json, "ready" for /readyz)."""

    __slots__ = ("method", "path", "body", "key", "node", "follow", "place", "forget", "result", "kind")

    def __init__(self, method, path, body=None, *, key="", node=None, follow=None, place=None, forget=None,
                 result=None, kind="json"):
        self.method = method
        self.path = path
        self.body = None if body is None else _encode(body).encode("utf-8")
        self.key = key if isinstance(key, str) else ""
        self.node = node
        self.follow = follow
        self.place = place
        self.forget = forget
        self.result = result
        self.kind = kind

    @property
    def headers(self):
        return JSON_HEADERS if self.body is not None else GET_HEADERS


class Answer:
    """A node answered the call: ``value`` is what the method returns."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class NodeFailed:
    """The node failed (5xx, or an answer that is not ours): try the next one."""

    __slots__ = ("description", "error")

    def __init__(self, description, error=None):
        self.description = description
        self.error = error


def decode(call, node, status, body, trace_header=None):
    """-> ``Answer`` or ``NodeFailed``; raises ``MetacenterError`` when the
    node refused the call (any non-5xx error: the same call would be refused
    by every node)."""
    if status == 200 and call.kind == "text":
        return Answer(body.decode("utf-8", "replace"))
    if status == 200 and call.kind == "document":
        try:
            return Answer(json.loads(body))
        except ValueError:
            return NodeFailed("HTTP 200 with a document that is not JSON")
    try:
        envelope = json.loads(body)
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict) or envelope.get("status") not in ("OK", "ERROR"):
        text = body[:200].decode("utf-8", "replace")
        error = MetacenterError(f"HTTP {status} without a metacenter envelope: {text!r}", status=status,
                                trace_id=trace_header, node=node.url)
        if status >= 500:
            return NodeFailed(f"HTTP {status}", error)
        raise error
    trace_id = envelope.get("trace_id") or trace_header
    if status == 200 and envelope["status"] == "OK":
        data = envelope.get("data")
        if call.kind == "ready":
            return Answer(True)
        return Answer(call.result(data) if call.result else data)
    fields = envelope.get("error") if isinstance(envelope.get("error"), dict) else {}
    error = MetacenterError(
        fields.get("reason") or fields.get("message") or f"HTTP {status}", status=status, code=fields.get("code"),
        message=fields.get("message"), data=envelope.get("data"), trace_id=trace_id, node=node.url)
    if call.kind == "ready" and status == 503:
        return Answer(False)
    if status >= 500:
        return NodeFailed(f"HTTP {status}: {error.reason}", error)
    raise error


def exhausted(attempts, last_error):
    """The error once no node could answer; ``attempts``: (node url, what happened)."""
    if not attempts:
        return NodeUnavailable("no metacenter node is known (empty node list, or DNS gave none yet)")
    tried = "; ".join(f"{url}: {what}" for url, what in attempts)
    fields = {}
    if last_error is not None:
        fields = dict(status=last_error.status, code=last_error.code, message=last_error.message,
                      data=last_error.data, trace_id=last_error.trace_id, node=last_error.node)
    return NodeUnavailable(f"no metacenter node could answer ({tried})", attempts, **fields)


def _locations(data):
    return data["locations"] if isinstance(data, dict) else data


def _list(data):
    return data if data is not None else []


class Methods:
    """The API, one method per call. Subclasses provide ``_run(call)``: the
    blocking client returns the value, the async one a Deferred of it.

    Engine rows (``load``) are ``{"ip", "queued_req_num", "prompt_length",
    "updated_time"}`` (counts; prompt bytes; ns since the epoch), plus any
    fields the node adds. Prompt hashes are unsigned 64-bit ints
    (``prompt_hashes``).
    """

    # -- load (the gateway's four calls) ------------------------------------

    def add_request(self, cluster, request_id, ip, prompt_length=0, **fields):
        """POST /v1/load/stats: ``request_id`` was routed to engine ``ip`` of
        ``cluster`` with a prompt of ``prompt_length`` bytes. ``fields`` are
        sent as they are (``lease``, ``prompt_tokens``, ``if_updated_time``,
        ``timestamp`` in ns). Returns None. A duplicate add changes nothing.
        The node that took it is remembered for the deletes."""
        body = {"cluster": cluster, "request_id": request_id, "ip": ip, "prompt_length": prompt_length, **fields}
        return self._run(Call("POST", "/v1/load/stats", body, key=cluster, place=(request_id, cluster)))

    def delete_prompt(self, request_id, cluster=None):
        """DELETE /v1/load/prompt: prefill is over (first token). Goes to the
        node that took the add when this client sent it, else by ``cluster``
        (``""`` when not given). Returns None."""
        return self._run(Call("DELETE", "/v1/load/prompt", {"request_id": request_id},
                              key=cluster or "", follow=request_id))

    def delete_request(self, request_id, cluster=None):
        """DELETE /v1/load/stats: the request completed. Routed like
        ``delete_prompt``; the client then forgets the request. Returns None."""
        return self._run(Call("DELETE", "/v1/load/stats", {"request_id": request_id},
                              key=cluster or "", follow=request_id, forget=request_id))

    def load(self, cluster):
        """GET /v1/load/stats: the engine rows of ``cluster`` (``[]`` when
        unknown). A ``cluster`` that is not a str is a TypeError."""
        if not isinstance(cluster, str):
            # In a query string anything would read as a name: refuse here what a JSON body would.
            raise TypeError(f"cluster must be a str, got {type(cluster).__name__}")
        path = "/v1/load/stats?cluster=" + quote(cluster, safe="")
        return self._run(Call("GET", path, key=cluster, result=_list))

    def overview(self, node=None):
        """GET /v1/load/overview: ``{"time": ns, "clusters": [{"cluster", "engines": [row, ...]}]}``:
        every cluster as one node sees it (``node`` as for ``status``)."""
        return self._run(Call("GET", "/v1/load/overview", node=node))

    # -- KV cache and scoring -----------------------------------------------

    def cache_save(self, cluster, prompt_hash, ip):
        """POST /v1/cache/save: engine ``ip`` holds the KV cache of the prompt
        whose block hashes are ``prompt_hash`` (non-empty). Returns None."""
        body = {"cluster": cluster, "prompt_hash": list(prompt_hash), "ip": ip}
        return self._run(Call("POST", "/v1/cache/save", body, key=cluster))

    def cache_query(self, cluster, prompt_hash, topk=10):
        """POST /v1/cache/query: ``[{"ip", "length"}, ...]``, best first, at most
        ``topk``; ``length`` is the number of leading hashes the engine holds."""
        body = {"cluster": cluster, "prompt_hash": list(prompt_hash), "topk": topk}
        return self._run(Call("POST", "/v1/cache/query", body, key=cluster, result=_locations))

    def cache_stats(self, node=None):
        """GET /v1/cache/stats: ``{"blocks", "engines", "bytes_estimate", "clusters": [{"cluster",
        "blocks", "engines"}]}`` of one node's KV-cache index (``node`` as for ``status``)."""
        return self._run(Call("GET", "/v1/cache/stats", node=node))

    def route_score(self, cluster, prompt_hash=(), ips=None):
        """POST /v1/route/score: the gateway's score of each engine (of
        ``ips`` when given), best first: ``[{"ip", "score", "cache_length",
        "queued_req_num", "prompt_length", ...}, ...]``."""
        body = {"cluster": cluster, "prompt_hash": list(prompt_hash)}
        if ips is not None:
            body["ips"] = list(ips)
        return self._run(Call("POST", "/v1/route/score", body, key=cluster, result=_list))

    def pick(self, cluster, request_id, prompt_length=None, *, prompt_tokens=None, prompt_hash=None, ips=None,
             lease=None, **fields):
        """POST /v1/route/pick: the node picks the best engine (among ``ips``
        when given) and books the request on it in the same step. Returns
        ``{"ip", "score", "cache_length", "queued_req_num"}``. Picking a
        booked request id again returns the same ip and books nothing. No
        candidate: ``MetacenterError`` with status 404."""
        body = {"cluster": cluster, "request_id": request_id}
        for name, value in (("prompt_length", prompt_length), ("prompt_tokens", prompt_tokens),
                            ("prompt_hash", None if prompt_hash is None else list(prompt_hash)),
                            ("ips", None if ips is None else list(ips)), ("lease", lease)):
            if value is not None:
                body[name] = value
        body.update(fields)
        return self._run(Call("POST", "/v1/route/pick", body, key=cluster, place=(request_id, cluster)))

    # -- load truth: reset, leases, refresh ---------------------------------

    def reset_engine(self, cluster, ip):
        """DELETE /v1/load/engine: release every in-flight request of the
        engine and drop its KV-cache blocks. Returns
        ``{"released_requests": int, "cache_blocks": int}`` (zeros for an
        unknown engine)."""
        return self._run(Call("DELETE", "/v1/load/engine", {"cluster": cluster, "ip": ip}, key=cluster))

    def lease_keepalive(self, lease, ttl_ms=None):
        """POST /v1/load/lease/keepalive: create or renew the gateway lease
        ``lease`` (1 to 128 characters) for ``ttl_ms`` ms (the node's default
        when None; at most [1000, 300000]). Returns ``{"lease", "ttl_ms",
        "requests"}``."""
        body = {"lease": lease}
        if ttl_ms is not None:
            body["ttl_ms"] = ttl_ms
        return self._run(Call("POST", "/v1/load/lease/keepalive", body, key=lease))

    def lease_revoke(self, lease):
        """DELETE /v1/load/lease: release every request added under
        ``lease`` now (a clean gateway shutdown). Returns the node's data."""
        return self._run(Call("DELETE", "/v1/load/lease", {"lease": lease}, key=lease))

    def leases(self):
        """GET /v1/load/leases: ``[{"lease", "ttl_ms", "expires_in_ms", "requests"}, ...]``."""
        return self._run(Call("GET", "/v1/load/leases", result=_list))

    def refresh(self, request_ids, cluster=None):
        """POST /v1/load/refresh: restart the expiry clock of each known
        request (at most 10,000 ids). Returns ``{"refreshed": int}``."""
        return self._run(Call("POST", "/v1/load/refresh", {"request_ids": list(request_ids)}, key=cluster or ""))

    # -- one node -------------------------------------------------------------
    # ``node``: a node as in the node list ("http://10.0.0.5:8080"); asked
    # directly, without failover or breaker. None: the node calls without a
    # cluster go to (ring key ""), with failover.

    def status(self, node=None):
        """GET /v1/node/status: ``{"version", "node", "ready", "requests",
        "tombstones", "engines", "clusters", "peers", "digest", ...}``."""
        return self._run(Call("GET", "/v1/node/status", node=node))

    def ready(self, node=None):
        """GET /readyz: True when the node serves, False while it warms up
        (503). ``NodeUnavailable`` when it does not answer."""
        return self._run(Call("GET", "/readyz", node=node, kind="ready"))

    def set_log_level(self, level, node=None):
        """POST /log/level: TRACE, DEBUG, INFO, WARN, ERROR or FATAL, on one node."""
        return self._run(Call("POST", "/log/level", {"LevelParam": level}, node=node))

    def metrics(self, node=None):
        """GET /metrics: the Prometheus text of one node."""
        return self._run(Call("GET", "/metrics", node=node, kind="text"))

    def openapi(self, node=None):
        """GET /openapi.json: the API description the node serves (a dict)."""
        return self._run(Call("GET", "/openapi.json", node=node, kind="document"))
