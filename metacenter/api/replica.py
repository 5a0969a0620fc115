"""Routes that peers call. Every event is validated exactly like a client
request, applied with ``ORIGIN_PEER`` and never forwarded again.

- POST /v1/replica/event    the reference's single event (``Event-Type`` header)
- POST /v1/replica/batch    our batches: {"events": [{"type", "body", "trace_id"}]}, load
                            events (ours too: engine reset, lease keepalive and revoke,
                            refresh) and KV-cache saves
- GET  /v1/replica/snapshot the whole state, streamed (warm start)
- GET  /v1/replica/digest   per-cluster live count and digest (anti-entropy)
- POST /v1/replica/buckets  the same per bucket of some clusters (anti-entropy)
- POST /v1/replica/records  live requests of some clusters, streamed (anti-entropy)
- POST /v1/replica/repair   requests and deletes a peer found we lack (anti-entropy)

Every one is ``endpoint(..., peer=True)``: with a cluster secret, a request
without a valid signature is refused with 401 before it is read. The ones
that read the state are ``ready=True`` (503 during the warm start).
"""

from metacenter.api import bodies, envelope
from metacenter.api.endpoint import endpoint, in_turns, joined_in_steps
from metacenter.api.envelope import ApiError
from metacenter.api.views import TURN_BUDGET
from metacenter.cluster.antientropy import (ADOPTED, BUCKETS, PEER_DELETE, PEER_PROMPT, UNRESOLVED, bucket_digests,
                                            bucket_of, reconcile)
from metacenter.cluster.snapshot import parse_record, parse_tombstone, state_chunks
from metacenter.core.errors import InvalidInput
from metacenter.core.events import EVENT_CACHE_SAVE, LOAD_EVENT_TYPES, ORIGIN_PEER
from metacenter.runtime.logs import logger
from metacenter.runtime.turns import in_chunks

log = logger("metacenter.replica")

MAX_BATCH_EVENTS = 10000
NAMES_PER_CHECK = 256  # cluster names checked per step (~1 µs each)


class ReplicaRoutes:
    """The peer routes; with ``MetacenterAPI`` (``node``, ``metrics``,
    ``peer_auth``, ``replica_batches``: a ``DeferredLock``).

    A peer's body may hold thousands of entries (``--max-body`` allows
    megabytes); parsing, validating and applying them in one go stalled
    every gateway for ~100 ms at 10,000 events. The batch, repair and
    buckets routes therefore work in steps of ``step_budget`` seconds, one
    per reactor turn (``_in_turns``), and gateway requests are served in
    between."""

    step_budget = TURN_BUDGET

    @endpoint("/v1/replica/event", ["POST"], peer=True)
    def replica_event(self, request, trace_id):
        """The reference's replication: one load event, its type in the
        ``Event-Type`` header (``load.stats.set``, ``load.stats.delete``,
        ``load.prompt.delete``), its body the client's. -> data null; 400
        with the reference's reasons."""
        values = request.requestHeaders.getRawHeaders(b"event-type")
        if not values or not values[0]:
            raise InvalidInput("missing Event-Type header")
        event_type = values[0].decode("utf-8", "replace")
        if event_type not in LOAD_EVENT_TYPES:
            raise InvalidInput("Unsupported event type")
        try:
            obj = bodies.parse_json_object(request.content.read())
        except ApiError:  # the reference's reason for any unreadable body
            raise InvalidInput("handler execute error") from None
        self.node.apply(event_type, bodies.load_event(event_type, obj), trace_id, ORIGIN_PEER)
        return None

    @endpoint("/v1/replica/batch", ["POST"], peer=True)
    def replica_batch(self, request, trace_id):
        """``{"events": [{"type", "body", "trace_id"?}]}`` (at most
        ``MAX_BATCH_EVENTS``; types: the load events, ours
        (``TRUTH_EVENT_TYPES``) and ``cache.save``) ->
        ``{"applied": n, "unchanged": n, "rejected": [{"index", "reason"}]}``.
        Each event is validated and applied on its own: one bad event is
        reported by index and does not cost the others. A body that is not
        such an object is a 400 before any event is applied.

        Parsed and applied in steps of ``step_budget`` (a Deferred when it
        takes more than one turn); batches are applied one after the other,
        in the order they arrived (``MetacenterAPI.replica_batches``), so a
        sender's next batch never overtakes the one before it."""
        body = request.content.read()
        return self._in_turns(lambda spent: self._batch_steps(body, trace_id, spent))

    def _batch_steps(self, body, trace_id, spent):
        lock = self.replica_batches
        acquired = lock.acquire()
        if not acquired.called:
            try:
                yield acquired  # the cooperator resumes this batch when the one before it is done
            except GeneratorExit:  # never resumed (the node stops): leave the queue
                acquired.cancel()
                raise
        try:
            events = yield from bodies.read_events(body, MAX_BATCH_EVENTS, spent)
            node = self.node
            apply = node.apply
            applied = unchanged = 0
            rejected = []
            for index, item in enumerate(events):
                # Each event is freed in its own step: freeing 10,000 parsed
                # events at the end took ~4 ms in one turn.
                events[index] = None
                if spent():
                    yield
                try:
                    event_type, event = bodies.batch_event(item)
                    cache_save = event_type == EVENT_CACHE_SAVE
                except InvalidInput as e:
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
        finally:
            lock.release()
        if rejected:
            log.warn("rejected {count} of {total} replicated events, first: {first}", count=len(rejected),
                     total=len(events), first=rejected[0])
        return {"applied": applied, "unchanged": unchanged, "rejected": rejected}

    @endpoint("/v1/replica/digest", ["GET"], peer=True, ready=True)
    def replica_digest(self, request, trace_id):
        """-> ``{"time": ns, "clusters": {name: [live, "16 hex digits"]}}``:
        per cluster the live request count and the XOR of their
        fingerprints (``core.load.request_fingerprint``). Built in slices
        over reactor turns (``views.DigestRender``; a Deferred when it takes more
        than one)."""
        return self.views.digest.get()

    @endpoint("/v1/replica/buckets", ["POST"], peer=True, ready=True)
    def replica_buckets(self, request, trace_id):
        """``{"clusters": [name]}`` -> the same digests per bucket of request
        ids (``antientropy.BUCKETS`` of them) for those clusters:
        ``{name: {"bucket": [live, "16 hex digits"]}}`` (buckets without
        requests left out). The body is read, the requests scanned and the
        answer written in steps over reactor turns (a Deferred)."""
        body = request.content.read()
        return self._in_turns(lambda spent: self._buckets_steps(body, spent))

    def _buckets_steps(self, body, spent):
        obj = yield from bodies.json_object_steps(body, spent)
        names = obj.get("clusters")
        if not isinstance(names, list):
            bodies.cluster_list(obj)  # raises its reason
        clusters = []
        # The same checks and reasons as bodies.cluster_list, a slice at a time.
        for chunk in in_chunks(names, NAMES_PER_CHECK):
            clusters.extend(bodies.cluster_list({"clusters": chunk}))
            if spent():
                yield
        found = []
        scanned = bucket_digests(self.node.state, clusters, self.node.cooperate).addCallback(found.append)
        yield scanned  # the cooperator resumes these steps once the scan (in steps of its own) is done
        # As envelope.dumps(encode_buckets(found)) would write it, in groups of
        # clusters (one per step), never joined.
        found = found[0]

        def cluster_part(cluster):
            buckets = found.pop(cluster)  # freed as it goes: 100,000 buckets freed at once took tens of ms
            return envelope.dumps(cluster) + b":{" + b",".join(
                [b'"%d":[%d,"%016x"]' % (bucket, live, digest) for bucket, (live, digest) in buckets.items()]) + b"}"

        return (yield from joined_in_steps(b"{", (cluster_part(cluster) for cluster in list(found)), b"}", spent))

    @endpoint("/v1/replica/repair", ["POST"], peer=True, ready=True)
    def replica_repair(self, request, trace_id):
        """``{"records": [record], "tombstones": [tombstone]}`` (the snapshot's
        entries without their tag): requests a peer holds and we may lack,
        deletes we may have missed. -> ``{"deleted": [id], "prompt_deleted":
        [id], "adopted": n, "unresolved": n, "rejected": n}``, the deletes the
        peer missed (see antientropy). Read, merged and reconciled in steps
        over reactor turns (a Deferred when it takes more than one); a body
        that is not such an object is a 400 before anything is merged."""
        body = request.content.read()
        return self._in_turns(lambda spent: self._repair_steps(body, spent))

    def _repair_steps(self, body, spent):
        obj = yield from bodies.json_object_steps(body, spent)
        records, tombstones = obj.get("records", []), obj.get("tombstones", [])
        if not isinstance(records, list) or not isinstance(tombstones, list):
            raise InvalidInput("fields 'records' and 'tombstones' must be arrays")
        node = self.node
        rejected = 0
        for index, item in enumerate(tombstones):
            tombstones[index] = None  # freed as it goes, not all at the end (as the batch's events)
            try:
                node.merge_tombstone(*parse_tombstone(item))
            except InvalidInput:
                rejected += 1
            if spent():
                yield
        answer = {"deleted": [], "prompt_deleted": [], "adopted": 0, "unresolved": 0}
        now = node.clock.seconds()
        for index, item in enumerate(records):
            records[index] = None
            if spent():
                yield
            try:
                record = parse_record(item)
            except InvalidInput:
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

    def _in_turns(self, work):
        """``endpoint.in_turns`` with the node (its cooperator) and ``step_budget``."""
        return in_turns(self.node, work, self.step_budget)

    @endpoint("/v1/replica/snapshot", ["GET"], peer=True, ready=True, stream=True)
    def replica_snapshot(self, request, trace_id):
        """The whole state as NDJSON (the format in ``cluster.snapshot``):
        header, live requests, tombstones, KV-cache engines, end line."""
        return state_chunks(self.node)

    @endpoint("/v1/replica/records", ["POST"], peer=True, ready=True, stream=True)
    def replica_records(self, request, trace_id):
        """``{"clusters": [name], "buckets"?: {name: [bucket]}}`` -> the live
        requests of those clusters (of those buckets only, when given) as
        NDJSON: header, records, end line."""
        obj = bodies.parse_json_object(request.content.read())
        clusters = set(bodies.cluster_list(obj))
        buckets = obj.get("buckets")
        keep = None
        if buckets is not None:
            if not isinstance(buckets, dict) or not all(
                    isinstance(v, list) and all(type(b) is int and 0 <= b < BUCKETS for b in v)
                    for v in buckets.values()):
                raise InvalidInput(f"field 'buckets' must map clusters to arrays of integers in [0, {BUCKETS - 1}]")
            wanted = {cluster: set(found) for cluster, found in buckets.items()}

            def keep(record):
                return bucket_of(record[0]) in wanted.get(record[1], ())
        return state_chunks(self.node, clusters=clusters, tombstones=False, cache=False, keep=keep)
