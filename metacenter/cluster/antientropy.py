"""Anti-entropy: every interval, a node compares the digests of its clusters
(live request count and XOR of request fingerprints, kept by the state in O(1)
per mutation) with every peer, and repairs the clusters that differ, both ways:

1. GET  /v1/replica/digest    -> the peer's {cluster: [live, digest]}
2. POST /v1/replica/buckets   -> for the clusters that differ, the same split
   into ``BUCKETS`` buckets by request id; both sides scan their requests for
   it, a chunk per reactor turn
3. POST /v1/replica/records   -> the peer streams its live requests of the
   differing buckets only; this node reconciles each one (below)
4. POST /v1/replica/repair    -> this node sends its live requests the peer did
   not list and the deletes the peer missed; the peer reconciles them the same
   way and answers with the deletes *this* node missed.

Under load the digests of busy clusters always differ by the few events in
flight; the buckets keep what is exchanged to those few (and a hash per
request to compute), instead of every live request of the cluster. Every
action is one of the state's order-insensitive merges, so a repair that races
with replication is harmless.

Tombstones versus repair. A node can tell "the peer has a request I never
heard of" from "the peer has a request I deleted" only while it still holds
the delete's tombstone (``tombstone_ttl``, 60 s by default). A request is
therefore adopted from a peer only if it was born within the *repair horizon*
(``HORIZON_FRACTION`` of the tombstone TTL, leaving the rest as margin for
clock skew between nodes): any delete of such a request is younger than the
request, so it is still remembered here if it ever arrived. An older request
that only the peer knows is left alone: it may have been deleted while its
tombstone is gone, and a deleted request is never resurrected. Such
"unresolved" requests are counted; they end with their real delete or expiry.
Differences younger than the horizon (dropped batches, a short partition, a
paused node) are repaired exactly; size ``tombstone_ttl`` above the longest
partition that must heal exactly. A node that was down re-joins by warm start
(a full snapshot), not by repair; one that knows it was away for longer than
``isolation_threshold`` (``on_isolation`` here, or warmstart.StallWatch)
resyncs from a peer (warmstart.WarmStart.resync).
"""

import itertools
import json
import zlib
from collections import Counter as Tally
from time import perf_counter

from prometheus_client import Counter, Gauge, Histogram
from twisted.application.service import Service
from twisted.internet import defer, task

from metacenter.core.errors import InvalidInput
from metacenter.cluster.discovery import format_peer
from metacenter.runtime.logs import logger
from metacenter.runtime.turns import chunk_per_turn
from metacenter.cluster.snapshot import decode_line, parse_record, record_entry
from metacenter.core.load import TOMB_DELETED, TOMB_PROMPT, request_fingerprint

log = logger("metacenter.cluster.antientropy")

DIGEST_PATH = "/v1/replica/digest"
BUCKETS_PATH = "/v1/replica/buckets"
RECORDS_PATH = "/v1/replica/records"
REPAIR_PATH = "/v1/replica/repair"

HORIZON_FRACTION = 0.75
SCAN_CHUNK = 2000  # local requests looked at per reactor turn
BUCKETS = 256  # a power of two
FAILURE_LOG_INTERVAL = 60.0
BULK_TIMEOUT = 30.0  # seconds for streaming records and sending repairs

# What reconciling one of a peer's live requests did here, and what the peer
# should do.
SAME = "same"
ADOPTED = "adopted"  # added here (we had never seen it, or only its prompt delete)
MERGED = "merged"  # its prompt delete applied here
PEER_DELETE = "peer_delete"  # deleted here: the peer must delete it
PEER_PROMPT = "peer_prompt"  # prompt deleted here: the peer must drop its prompt
UNRESOLVED = "unresolved"  # unknown here and older than the horizon: left alone


def repair_horizon(tombstone_ttl):
    return tombstone_ttl * HORIZON_FRACTION


def reconcile(node, record, now):
    """Merge one of a peer's live requests into ``node``; returns the outcome."""
    request_id, _, _, _, prompt_deleted, created_s = record
    here = node.state.request_state(request_id)
    if here is None:
        if created_s is not None and created_s > now - repair_horizon(node.state.tombstone_ttl):
            node.merge_record(*record)
            return ADOPTED
        return UNRESOLVED
    if here == "deleted":
        return PEER_DELETE
    if here == "prompt-tombstone":
        node.merge_record(*record)
        return ADOPTED
    if here == "live":
        if prompt_deleted:
            node.merge_record(*record)
            return MERGED
        return SAME
    return SAME if prompt_deleted else PEER_PROMPT  # live, prompt deleted here


def isolation_threshold(tombstone_ttl, interval):
    """How long a node may miss the cluster and still be repaired exactly by
    anti-entropy: what it missed must still be inside the repair horizon when
    the next rounds run. Longer, and it resyncs (warmstart)."""
    horizon = repair_horizon(tombstone_ttl)
    return max(1.0, min(horizon / 2, horizon - 2 * interval))


def digests(state):
    return {name: [c.live, format(c.digest, "016x")] for name, c in state.clusters.items()}


def bucket_of(request_id):
    """The bucket of a request: the low bits of its fingerprint, which depend
    on the id only (not on the prompt flag)."""
    return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) & (BUCKETS - 1)


def scan_buckets(state, clusters, out):
    """A generator for a Cooperator: fills ``out`` with {cluster: {bucket:
    [live, digest]}} for the given clusters, ``SCAN_CHUNK`` requests a step."""
    for cluster in clusters:
        out[cluster] = {}
    looked = 0
    for request_id, cluster, _, _, prompt_deleted, _ in state.iter_requests():
        looked += 1
        buckets = out.get(cluster)
        if buckets is not None:
            fingerprint = request_fingerprint(request_id, prompt_deleted)
            bucket = buckets.get(fingerprint & (BUCKETS - 1))
            if bucket is None:
                buckets[fingerprint & (BUCKETS - 1)] = [1, fingerprint]
            else:
                bucket[0] += 1
                bucket[1] ^= fingerprint
        if looked % SCAN_CHUNK == 0:
            yield None


def bucket_digests(state, clusters, cooperate):
    """Deferred {cluster: {bucket: [live, digest]}}, computed cooperatively."""
    out = {}
    return cooperate(scan_buckets(state, clusters, out)).whenDone().addCallback(lambda _: out)


def encode_buckets(buckets):
    """The wire form: {cluster: {"bucket": [live, "hex digest"]}}."""
    return {cluster: {str(b): [live, format(digest, "016x")] for b, (live, digest) in found.items()}
            for cluster, found in buckets.items()}


def differing_buckets(local, remote):
    """{cluster: set of buckets that differ}, both in wire form; clusters
    whose buckets all agree (they changed between the two scans) are left out."""
    empty = [0, "0" * 16]
    result = {}
    for cluster in set(local) | set(remote):
        mine, theirs = local.get(cluster, {}), remote.get(cluster, {})
        differing = {int(b) for b in set(mine) | set(theirs) if mine.get(b, empty) != list(theirs.get(b, empty))}
        if differing:
            result[cluster] = differing
    return result


def differing_clusters(local, remote):
    empty = [0, "0" * 16]
    return sorted(name for name in set(local) | set(remote)
                  if local.get(name, empty) != remote.get(name, empty))


class ExchangeFailed(Exception):
    pass


class AntiEntropyMetrics:
    def __init__(self, registry):
        r = registry
        self.exchanges = Counter("metacenter_antientropy_exchanges",
                                 "Digest comparisons with a peer, by result (in_sync, repaired, failed).",
                                 ["peer", "result"], registry=r)
        self.repairs = Counter(
            "metacenter_antientropy_repairs",
            "Repairs by anti-entropy: adopted/deleted/prompt_deleted here, or sent to the peer "
            "(sent_requests, sent_deletes, sent_prompt_deletes).", ["kind"], registry=r)
        self.unresolved = Gauge(
            "metacenter_antientropy_unresolved_requests",
            "Requests older than the repair horizon that only one side knows, in the last exchange with a peer.",
            ["peer"], registry=r)
        self.duration = Histogram("metacenter_antientropy_exchange_duration_seconds",
                                  "Wall time of one exchange with a peer, repairs included.", ["peer"],
                                  buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30), registry=r)

    def forget(self, peer_name):
        for metric, labels in ((self.unresolved, (peer_name,)), (self.duration, (peer_name,))):
            try:
                metric.remove(*labels)
            except KeyError:
                pass
        for result in ("in_sync", "repaired", "failed"):
            try:
                self.exchanges.remove(peer_name, result)
            except KeyError:
                pass


class AntiEntropy(Service):
    """Runs ``round`` every ``interval`` once ``start_after`` (the warm start)
    has fired; ``peers`` returns the current peers."""

    name = "anti-entropy"

    def __init__(self, node, client, peers, clock, interval=10.0, max_body=65536, start_after=None,
                 registry=None, on_isolation=None):
        self.node = node
        self.client = client
        self._peers = peers
        self.clock = clock
        self.interval = interval
        self.max_body = max_body
        self._start_after = start_after
        self.metrics = AntiEntropyMetrics(registry if registry is not None else node.metrics.registry)
        self._loop = None
        self._known = set()
        self._failure_logged = {}  # peer -> (reason, when)
        self._cooperator = chunk_per_turn(clock)
        self.last = {}  # peer name -> outcome of the last exchange, for tests and the log
        # on_isolation(since, seconds): no peer answered for longer than
        # ``isolation_threshold``, and now one does (warmstart.WarmStart.resync).
        self.on_isolation = on_isolation
        self.isolation_threshold = isolation_threshold(node.state.tombstone_ttl, interval)
        self.last_contact = None

    def startService(self):
        super().startService()
        ready = self._start_after if self._start_after is not None else defer.succeed(None)
        ready.addBoth(self._start_loop)

    def _start_loop(self, _):
        if not self.running:
            return
        self.last_contact = self.clock.seconds()
        self._loop = task.LoopingCall(self.round)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("anti-entropy loop stopped", f))

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._cooperator.stop()
        return super().stopService()

    def round(self):
        """One exchange with every peer, one after the other; never fails
        (a failure would stop the LoopingCall for good)."""
        return self._round().addErrback(lambda f: log.failure("anti-entropy round failed", f))

    @defer.inlineCallbacks
    def _round(self):
        peers = sorted(self._peers())
        names = {format_peer(p) for p in peers}
        for gone in self._known - names:
            self.metrics.forget(gone)
            self.last.pop(gone, None)
        self._known = names
        started = self.clock.seconds()
        answered = not peers  # alone is not isolated
        for peer in peers:
            if not self.running:
                return
            try:
                outcome = yield self.exchange(peer)
                answered = answered or outcome["result"] != "failed"
            except Exception:
                log.failure("anti-entropy exchange with {peer} failed unexpectedly", peer=format_peer(peer))
        if answered:
            since = self.last_contact
            self.last_contact = self.clock.seconds()
            if peers and since is not None and started - since > self.isolation_threshold and self.on_isolation:
                self.on_isolation(since, started - since)

    @defer.inlineCallbacks
    def exchange(self, peer):
        """Compare and repair with one peer; returns a dict of what happened
        (also in ``last``). Errors are logged and counted, not raised."""
        name = format_peer(peer)
        started = perf_counter()
        try:
            outcome = yield self._exchange(peer)
        except Exception as e:
            reason = str(e) if isinstance(e, ExchangeFailed) else f"{type(e).__name__}: {e}"
            if isinstance(e, (defer.TimeoutError, defer.CancelledError)):
                reason = "timed out"
            self.metrics.exchanges.labels(name, "failed").inc()
            self._log_failure(name, reason)
            outcome = {"result": "failed", "reason": reason}
        else:
            self.metrics.exchanges.labels(name, outcome["result"]).inc()
            self.metrics.unresolved.labels(name).set(outcome.get(UNRESOLVED, 0))
            self._failure_logged.pop(name, None)
            if outcome["result"] == "repaired" and outcome.get("changed"):
                # Routine under load (events in flight look like differences):
                # the repairs counter is the signal, this is for debugging.
                log.debug("anti-entropy with {peer}: {clusters} clusters differed; {summary}", peer=name,
                         clusters=len(outcome["clusters"]), summary=_summary(outcome))
        self.metrics.duration.labels(name).observe(perf_counter() - started)
        self.last[name] = outcome
        return outcome

    def _log_failure(self, name, reason):
        now = self.clock.seconds()
        previous = self._failure_logged.get(name)
        if previous is None or previous[0] != reason or now - previous[1] >= FAILURE_LOG_INTERVAL:
            self._failure_logged[name] = (reason, now)
            log.warn("anti-entropy with {peer} failed: {reason}", peer=name, reason=reason)

    @defer.inlineCallbacks
    def _exchange(self, peer):
        node = self.node
        # A peer must answer within twice the request timeout (a dead or
        # paused one costs no more than that); the bulk may take longer.
        answer_timeout = 2 * self.client.request_timeout
        timeout = max(BULK_TIMEOUT, self.interval)
        status, content = yield self.client.request("GET", peer, DIGEST_PATH, timeout=answer_timeout)
        if status != 200:
            raise ExchangeFailed(f"digest: HTTP {status}{_reason(content)}")
        try:
            remote = json.loads(content)["data"]["clusters"]
            remote = {str(k): list(v) for k, v in remote.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ExchangeFailed("digest: not a digest answer") from None
        clusters = differing_clusters(digests(node.state), remote)
        if not clusters:
            return {"result": "in_sync", "clusters": []}

        body = json.dumps({"clusters": clusters}).encode("utf-8")
        status, content = yield self.client.request("POST", peer, BUCKETS_PATH, body, timeout=timeout)
        if status != 200:
            raise ExchangeFailed(f"buckets: HTTP {status}{_reason(content)}")
        try:
            remote_buckets = json.loads(content)["data"]
            if not isinstance(remote_buckets, dict) or not all(isinstance(v, dict) for v in remote_buckets.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ExchangeFailed("buckets: not a buckets answer") from None
        local_buckets = yield bucket_digests(node.state, clusters, self._cooperator.cooperate)
        buckets = differing_buckets(encode_buckets(local_buckets), remote_buckets)
        if not buckets:
            return {"result": "in_sync", "clusters": []}  # the differences were in flight
        clusters = sorted(buckets)

        tally = Tally()
        to_peer_tombstones = []
        listed = set()
        stream = {"complete": False}

        def on_line(raw):
            entry = decode_line(raw)
            if isinstance(entry, dict):
                stream["complete"] = stream["complete"] or entry.get("end") is True
                return
            try:
                record = parse_record(entry)
            except InvalidInput:
                tally["invalid"] += 1
                return
            listed.add(record[0])
            outcome = reconcile(node, record, node.clock.seconds())
            tally[outcome] += 1
            if outcome == PEER_DELETE:
                to_peer_tombstones.append([record[0], TOMB_DELETED])
            elif outcome == PEER_PROMPT:
                to_peer_tombstones.append([record[0], TOMB_PROMPT])

        body = json.dumps({"clusters": clusters, "buckets": {c: sorted(b) for c, b in buckets.items()}})
        status, content = yield self.client.stream("POST", peer, RECORDS_PATH, body.encode("utf-8"), on_line,
                                                   timeout=timeout,
                                                   answer_timeout=answer_timeout)
        if status != 200:
            raise ExchangeFailed(f"records: HTTP {status}{_reason(content)}")
        if not stream["complete"]:
            raise ExchangeFailed("records: the stream ended early")

        unlisted = yield self._unlisted_records(buckets, listed)
        for body in self._repair_bodies(unlisted, to_peer_tombstones):
            status, content = yield self.client.request("POST", peer, REPAIR_PATH, body, timeout=timeout)
            if status != 200:
                raise ExchangeFailed(f"repair: HTTP {status}{_reason(content)}")
            try:
                answer = json.loads(content)["data"]
                deletes, prompt_deletes = answer["deleted"], answer["prompt_deleted"]
            except (ValueError, KeyError, TypeError):
                raise ExchangeFailed("repair: not a repair answer") from None
            for request_id in deletes:
                if isinstance(request_id, str) and request_id:
                    node.merge_tombstone(request_id, TOMB_DELETED)
            for request_id in prompt_deletes:
                if isinstance(request_id, str) and request_id:
                    node.merge_tombstone(request_id, TOMB_PROMPT)
            tally["deleted"] += len(deletes)
            tally["prompt_deleted"] += len(prompt_deletes)
            tally["peer_adopted"] += answer.get("adopted", 0) if isinstance(answer.get("adopted"), int) else 0
            tally["peer_unresolved"] += answer.get("unresolved", 0) if isinstance(
                answer.get("unresolved"), int) else 0

        sent_deletes = sum(1 for _, kind in to_peer_tombstones if kind == TOMB_DELETED)
        for kind, count in (("adopted", tally[ADOPTED]), ("prompt_deleted", tally[MERGED] + tally["prompt_deleted"]),
                            ("deleted", tally["deleted"]), ("sent_requests", len(unlisted)),
                            ("sent_deletes", sent_deletes),
                            ("sent_prompt_deletes", len(to_peer_tombstones) - sent_deletes)):
            if count:
                self.metrics.repairs.labels(kind).inc(count)
        outcome = {
            "result": "repaired", "clusters": clusters, "listed": len(listed),
            ADOPTED: tally[ADOPTED], "prompt_deleted": tally[MERGED] + tally["prompt_deleted"],
            "deleted": tally["deleted"], "sent_requests": len(unlisted), "sent_deletes": sent_deletes,
            "sent_prompt_deletes": len(to_peer_tombstones) - sent_deletes, "peer_adopted": tally["peer_adopted"],
            UNRESOLVED: tally[UNRESOLVED] + tally["peer_unresolved"], "invalid": tally["invalid"],
        }
        outcome["changed"] = any(outcome[k] for k in (ADOPTED, "prompt_deleted", "deleted", "peer_adopted",
                                                       "sent_deletes", "sent_prompt_deletes"))
        return outcome

    def _unlisted_records(self, buckets, listed):
        """This node's live requests in ``buckets`` ({cluster: set}) the peer
        did not list, found a chunk per reactor turn."""
        found = []

        def scan():
            looked = 0
            for record in self.node.state.iter_requests():
                wanted = buckets.get(record[1])
                if wanted is not None and record[0] not in listed and bucket_of(record[0]) in wanted:
                    found.append(record)
                looked += 1
                if looked % SCAN_CHUNK == 0:
                    yield None

        d = self._cooperator.cooperate(scan()).whenDone()
        return d.addCallback(lambda _: found)

    def _repair_bodies(self, records, tombstones):
        """Repair requests no bigger than the peer's body limit."""
        budget = self.max_body - 64
        parts = {"records": [], "tombstones": []}
        size = 0
        # Encoded lazily: the caller sends each body before the next is
        # built, so one reactor turn never encodes more than a body's worth.
        entries = itertools.chain(
            (("records", json.dumps(record_entry(r)[1:], ensure_ascii=False)) for r in records),
            (("tombstones", json.dumps(t, ensure_ascii=False)) for t in tombstones))
        for key, text in entries:
            length = len(text.encode("utf-8")) + 1
            if size and size + length > budget:
                yield _repair_body(parts)
                parts = {"records": [], "tombstones": []}
                size = 0
            parts[key].append(text)
            size += length
        if size:
            yield _repair_body(parts)


def _repair_body(parts):
    return ('{"records":[' + ",".join(parts["records"]) + '],"tombstones":[' + ",".join(parts["tombstones"])
            + "]}").encode("utf-8")


def _reason(content):
    try:
        return ": " + json.loads(content)["error"]["reason"]
    except (ValueError, KeyError, TypeError):
        return ""


def _summary(outcome):
    return ", ".join(f"{key} {outcome[key]}" for key in (
        ADOPTED, "prompt_deleted", "deleted", "peer_adopted", "sent_deletes", "sent_prompt_deletes", UNRESOLVED)
        if outcome.get(key))

