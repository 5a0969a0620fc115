"""Routes that peers call. Every event is validated exactly like a client
request, applied with ``ORIGIN_PEER`` and never forwarded again.

- POST /v1/replica/event    the reference's single event (``Event-Type`` header)
- POST /v1/replica/batch    our batches: {"events": [{"type", "body", "trace_id"}]}, load
                            events and KV-cache saves
- GET  /v1/replica/snapshot the whole state, streamed (warm start)
- GET  /v1/replica/digest   per-cluster live count and digest (anti-entropy)
- POST /v1/replica/buckets  the same per bucket of some clusters (anti-entropy)
- POST /v1/replica/records  live requests of some clusters, streamed (anti-entropy)
- POST /v1/replica/repair   requests and deletes a peer found we lack (anti-entropy)

With a cluster secret every one of them must carry a valid signature
(``authenticate``); anything else is refused with 401 before it is read.
"""

from time import perf_counter

from metacenter.api import envelope
from metacenter.api import bodies
from metacenter.core.errors import InvalidInput
from metacenter.cluster.antientropy import (ADOPTED, BUCKETS, PEER_DELETE, PEER_PROMPT, UNRESOLVED, bucket_digests,
                                    bucket_of, digests, encode_buckets, reconcile)
from metacenter.api.endpoint import app, endpoint, method_label, respond, trace_id_of
from metacenter.runtime.logs import logger
from metacenter.core.events import EVENT_ADD, EVENT_CACHE_SAVE, LOAD_EVENT_TYPES, ORIGIN_PEER
from metacenter.cluster.snapshot import ChunkProducer, parse_record, parse_tombstone, state_chunks

log = logger("metacenter.replica")

_PARSERS = {EVENT_ADD: bodies.load_add}
_NDJSON = b"application/x-ndjson"
MAX_BATCH_EVENTS = 10000
UNAUTHORIZED_LOG_INTERVAL = 60.0


def parse_event(event_type, obj):
    """A replicated load event of a known type -> the validated event."""
    return _PARSERS.get(event_type, bodies.load_delete)(obj)


class ReplicaRoutes:
    # A metacenter.auth.PeerAuthenticator when the node has a cluster secret.
    peer_auth = None
    _unauthorized_logged_at = None

    def authenticate(self, request, body):
        """Raises 401 unless the request is signed with the cluster secret
        (a no-op without one)."""
        if self.peer_auth is None:
            return
        try:
            self.peer_auth.check(request, body)
        except (envelope.ApiError, InvalidInput) as e:
            now = self.node.clock.seconds()
            if self._unauthorized_logged_at is None or now - self._unauthorized_logged_at >= UNAUTHORIZED_LOG_INTERVAL:
                self._unauthorized_logged_at = now
                client = request.getClientAddress()
                log.warn("refused a peer request from {client} to {path}: {reason}",
                         client=getattr(client, "host", "?"), path=request.path.decode("utf-8", "replace"),
                         reason=e.reason)
            raise

    def _ensure_ready(self):
        # A node still warming up has a partial state: a starting peer asks
        # someone else, and anti-entropy waits.
        if not self.node.ready:
            raise envelope.unavailable(self.node.not_ready_reason or "warm start in progress")

    @endpoint("/v1/replica/event", ["POST"])
    def replica_event(self, request, trace_id):
        body = request.content.read()
        self.authenticate(request, body)
        values = request.requestHeaders.getRawHeaders(b"event-type")
        if not values or not values[0]:
            raise envelope.invalid("missing Event-Type header")
        event_type = values[0].decode("utf-8", "replace")
        if event_type not in LOAD_EVENT_TYPES:
            raise envelope.invalid("Unsupported event type")
        try:
            obj = bodies.parse_json_object(body)
        except (envelope.ApiError, InvalidInput):
            raise envelope.invalid("handler execute error") from None
        event = parse_event(event_type, obj)
        self.node.apply(event_type, event, trace_id, ORIGIN_PEER)
        return None

    @endpoint("/v1/replica/batch", ["POST"])
    def replica_batch(self, request, trace_id):
        """Each event is validated and applied on its own: one bad event is
        reported by index and does not cost the others."""
        body = request.content.read()
        self.authenticate(request, body)
        events = bodies.parse_json_object(body).get("events")
        if not isinstance(events, list):
            raise envelope.invalid("field 'events' must be an array")
        if len(events) > MAX_BATCH_EVENTS:
            raise envelope.invalid(f"field 'events' holds more than {MAX_BATCH_EVENTS} events")
        node = self.node
        apply = node.apply
        applied = unchanged = 0
        rejected = []
        for index, item in enumerate(events):
            try:
                if not isinstance(item, dict):
                    raise envelope.invalid("an event must be an object")
                event_type = item.get("type")
                cache_save = event_type == EVENT_CACHE_SAVE
                if event_type not in LOAD_EVENT_TYPES and not (cache_save and node.cache is not None):
                    raise envelope.invalid("Unsupported event type")
                payload = item.get("body")
                if not isinstance(payload, dict):
                    raise envelope.invalid("field 'body' must be an object")
                event = bodies.parse_cache_save(payload) if cache_save else parse_event(event_type, payload)
            except (envelope.ApiError, InvalidInput) as e:
                rejected.append({"index": index, "reason": e.reason})
                continue
            event_trace = item.get("trace_id")
            event_trace = event_trace if isinstance(event_trace, str) else trace_id
            if cache_save:
                changed = node.save_cache(event, event_trace, ORIGIN_PEER)
            else:
                changed = apply(event_type, event, event_trace, ORIGIN_PEER)
            if changed:
                applied += 1
            else:
                unchanged += 1
        if rejected:
            log.warn("rejected {count} of {total} replicated events, first: {first}", count=len(rejected),
                     total=len(events), first=rejected[0])
        return {"applied": applied, "unchanged": unchanged, "rejected": rejected}

    @endpoint("/v1/replica/digest", ["GET"])
    def replica_digest(self, request, trace_id):
        self.authenticate(request, b"")
        self._ensure_ready()
        return {"time": int(self.node.clock.seconds() * 1e9), "clusters": digests(self.node.state)}

    @endpoint("/v1/replica/buckets", ["POST"])
    def replica_buckets(self, request, trace_id):
        body = request.content.read()
        self.authenticate(request, body)
        self._ensure_ready()
        clusters = _cluster_list(bodies.parse_json_object(body))
        return bucket_digests(self.node.state, clusters, self.node.cooperate).addCallback(encode_buckets)

    @endpoint("/v1/replica/repair", ["POST"])
    def replica_repair(self, request, trace_id):
        """Requests a peer holds and we may lack, deletes we may have missed.
        Answers with the deletes the peer missed (see antientropy)."""
        body = request.content.read()
        self.authenticate(request, body)
        self._ensure_ready()
        obj = bodies.parse_json_object(body)
        records, tombstones = obj.get("records", []), obj.get("tombstones", [])
        if not isinstance(records, list) or not isinstance(tombstones, list):
            raise envelope.invalid("fields 'records' and 'tombstones' must be arrays")
        node = self.node
        rejected = 0
        for item in tombstones:
            try:
                node.merge_tombstone(*parse_tombstone(item))
            except (envelope.ApiError, InvalidInput):
                rejected += 1
        answer = {"deleted": [], "prompt_deleted": [], "adopted": 0, "unresolved": 0}
        now = node.clock.seconds()
        for item in records:
            try:
                record = parse_record(item)
            except (envelope.ApiError, InvalidInput):
                rejected += 1
                continue
            outcome = reconcile(node, record, now)
            if outcome == PEER_DELETE:
                answer["deleted"].append(record[0])
            elif outcome == PEER_PROMPT:
                answer["prompt_deleted"].append(record[0])
            elif outcome == ADOPTED:
                answer["adopted"] += 1
            elif outcome == UNRESOLVED:
                answer["unresolved"] += 1
        answer["rejected"] = rejected
        return answer

    @app.route("/v1/replica/snapshot", methods=["GET"])
    def replica_snapshot(self, request):
        return self._stream(request, "/v1/replica/snapshot", lambda: state_chunks(self.node))

    @app.route("/v1/replica/records", methods=["POST"])
    def replica_records(self, request):
        def chunks():
            obj = bodies.parse_json_object(request.content.read())
            clusters = set(_cluster_list(obj))
            buckets = obj.get("buckets")
            keep = None
            if buckets is not None:
                if not isinstance(buckets, dict) or not all(
                        isinstance(v, list) and all(type(b) is int and 0 <= b < BUCKETS for b in v)
                        for v in buckets.values()):
                    raise envelope.invalid(f"field 'buckets' must map clusters to arrays of integers "
                                           f"in [0, {BUCKETS - 1}]")
                wanted = {cluster: set(found) for cluster, found in buckets.items()}

                def keep(record):
                    return bucket_of(record[0]) in wanted.get(record[1], ())
            return state_chunks(self.node, clusters=clusters, tombstones=False, cache=False, keep=keep)

        return self._stream(request, "/v1/replica/records", chunks)

    def _stream(self, request, url, make_chunks):
        """A newline-delimited response written under back-pressure; errors
        before the first byte are ordinary envelope answers."""
        started = perf_counter()
        try:
            if getattr(request, "body_too_large", False):
                raise envelope.too_large(request.max_body)
            body = request.content.read()
            request.content.seek(0)
            self.authenticate(request, body)
            self._ensure_ready()
            chunks = make_chunks()
        except (envelope.ApiError, InvalidInput) as e:
            return respond(self, request, url, e, started)
        request.setHeader(b"Content-Type", _NDJSON)
        request.setHeader(b"X-Trace-ID", trace_id_of(request).encode("utf-8"))
        done = ChunkProducer(request, chunks, self.node.cooperate).start()

        # Everything is written: the Deferred's result is the (empty) rest of
        # the body, which the resource writes before it finishes the request.
        def finished(result):
            self.metrics.observe_http(url, method_label(request), 200, perf_counter() - started)
            return b""

        def failed(failure):
            log.failure("streaming {url} failed", failure, url=url)
            # The client sees a broken stream without its "end" line, never a
            # complete-looking partial one.
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
            return b""

        return done.addCallbacks(finished, failed)


def _cluster_list(obj):
    clusters = obj.get("clusters")
    if not isinstance(clusters, list):
        raise envelope.invalid("field 'clusters' must be an array of strings")
    # Each name is checked like a client's 'cluster' (non-empty, valid text).
    return [bodies.required_string({"cluster": c}, "cluster") for c in clusters]
