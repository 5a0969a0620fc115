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

The pure parts (digests, buckets, ``reconcile``, the horizon) are in
``metacenter.core.digests``; this module is the exchange over HTTP.
"""

import itertools
import json
from time import perf_counter

from prometheus_client import Counter, Gauge, Histogram
from twisted.application.service import MultiService
from twisted.internet import defer

from metacenter.api.views import TURN_BUDGET
from metacenter.cluster.discovery import format_peer
from metacenter.cluster.snapshot import decode_line, parse_record, record_entry
from metacenter.core import digests as core
from metacenter.core.digests import (ADOPTED, BUCKETS, HORIZON_FRACTION, MERGED, PEER_DELETE,  # noqa: F401
                                     PEER_PROMPT, SAME, UNRESOLVED, bucket_of, differing_buckets,
                                     encode_buckets, isolation_threshold,
                                     repair_horizon)
from metacenter.core.errors import InvalidInput
from metacenter.jsonsteps import Budget, Reader, parse, steps
from metacenter.runtime.logs import ThrottledLog, logger
from metacenter.runtime.periodic import Periodic
from metacenter.runtime.turns import in_chunks, run, scan

log = logger("metacenter.cluster.antientropy")

DIGEST_PATH = "/v1/replica/digest"
BUCKETS_PATH = "/v1/replica/buckets"
RECORDS_PATH = "/v1/replica/records"
REPAIR_PATH = "/v1/replica/repair"

SCAN_CHUNK = 200  # local requests looked at per reactor turn (0.3-0.9 ms at 300,000 requests)
_COMPACT = (",", ":")  # JSON separators of the bodies sent: their size is what _groups counts
DIGEST_CHUNK = 150  # a peer's cluster digests read and compared per reactor turn (~1 ms)
STEP_BUDGET = TURN_BUDGET  # seconds of work per reactor turn for a peer's buckets answer
FAILURE_LOG_INTERVAL = 60.0
BULK_TIMEOUT = 30.0  # seconds for streaming records and sending repairs


def reconcile(node, record, now):
    """``core.digests.reconcile`` on ``node``'s state (the repair route's
    entry point): merges one of a peer's live requests, returns the outcome."""
    return core.reconcile(node.state, record, now, node.merge_record)


def bucket_digests(state, clusters, cooperate):
    """Deferred ``{cluster: {bucket: [live, digest]}}`` (ints) of ``state``'s
    live requests in ``clusters``, ``SCAN_CHUNK`` requests per ``cooperate``
    step (``Node.cooperate``)."""
    found = core.BucketDigests(clusters)
    return scan(cooperate, state.iter_requests(), SCAN_CHUNK, found.add).addCallback(lambda _: found.result)


def digest_entries(content):
    """The ``(name, value)`` members of ``data.clusters`` in a
    ``GET /v1/replica/digest`` answer (bytes), read lazily (a 20,000-cluster
    answer parsed in one go took ~10 ms of reactor time, and its dict of
    lists a full GC); ValueError (or UnicodeDecodeError) if it is not one."""
    reader = Reader(content.decode("utf-8"))
    found = False
    for key in reader.members():
        if key != "data":
            reader.value()
            continue
        for field in reader.members():
            if field != "clusters":
                reader.value()
                continue
            found = True
            for name in reader.members():
                yield name, reader.value()
    reader.end()
    if not found:
        raise ValueError("no data.clusters")


class ExchangeFailed(Exception):
    """An exchange step got no usable answer; the message says which and why."""


class AntiEntropyMetrics:
    """The ``metacenter_antientropy_*`` series; ``forget(peer)`` drops a
    peer's labelled series when it leaves."""

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


class AntiEntropy(MultiService):
    """Runs ``round`` every ``interval`` seconds once ``start_after`` (a
    Deferred: the warm start) has fired; ``peers()`` returns the current
    peers ((host, port) tuples), ``client`` is a ``PeerClient``.

    ``on_isolation(since, seconds)`` is called when no peer answered for
    longer than ``isolation_threshold`` seconds and now one does
    (``warmstart.WarmStart.resync``). ``last`` maps a peer's name to the
    outcome dict of its last exchange.
    """

    name = "anti-entropy"

    def __init__(self, node, client, peers, clock, interval=10.0, max_body=65536, start_after=None,
                 registry=None, on_isolation=None):
        super().__init__()
        self.node = node
        self.client = client
        self._peers = peers
        self.clock = clock
        self.interval = interval
        self.max_body = max_body
        self._start_after = start_after
        self.metrics = AntiEntropyMetrics(registry if registry is not None else node.metrics.registry)
        self._known = set()
        self._failures = ThrottledLog(log, clock, FAILURE_LOG_INTERVAL)
        self.last = {}  # peer name -> outcome of the last exchange, for tests and the log
        self.on_isolation = on_isolation
        self.isolation_threshold = isolation_threshold(node.state.tombstone_ttl, interval)
        self.last_contact = None

    def startService(self):
        super().startService()
        ready = self._start_after if self._start_after is not None else defer.succeed(None)
        ready.addBoth(self._warm)

    def _warm(self, _):
        if not self.running or self.namedServices.get("rounds") is not None:
            return
        self.last_contact = self.clock.seconds()
        # Detached: a stopping node does not wait for an exchange in flight.
        rounds = Periodic(self.interval, self.round, what="anti-entropy round", clock=self.clock, now=False,
                          detached=True, log=log)
        rounds.setName("rounds")
        rounds.setServiceParent(self)

    def round(self):
        """One exchange with every peer, one after the other; a Deferred
        that never fails (errors are logged)."""
        return self._round().addErrback(lambda f: log.failure("anti-entropy round failed", f))

    @defer.inlineCallbacks
    def _round(self):
        peers = sorted(self._peers())
        names = {format_peer(p) for p in peers}
        for gone in self._known - names:
            self.metrics.forget(gone)
            self._failures.reset(gone)
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
        """Compare and repair with one peer; a Deferred of a dict of what
        happened (also in ``last``): ``result`` is "in_sync", "repaired" (see
        ``Reconciliation.outcome``) or "failed" (with ``reason``). Errors are
        logged (throttled per peer) and counted, not raised."""
        name = format_peer(peer)
        started = perf_counter()
        try:
            outcome = yield self._exchange(peer)
        except Exception as e:
            reason = str(e) if isinstance(e, ExchangeFailed) else f"{type(e).__name__}: {e}"
            if isinstance(e, (defer.TimeoutError, defer.CancelledError)):
                reason = "timed out"
            self.metrics.exchanges.labels(name, "failed").inc()
            self._failures.emit(name, reason, "warn", "anti-entropy with {peer} failed: {reason}", peer=name,
                                reason=reason)
            outcome = {"result": "failed", "reason": reason}
        else:
            self.metrics.exchanges.labels(name, outcome["result"]).inc()
            self.metrics.unresolved.labels(name).set(outcome.get(UNRESOLVED, 0))
            self._failures.reset(name)
            if outcome["result"] == "repaired" and outcome.get("changed"):
                # Routine under load (events in flight look like differences):
                # the repairs counter is the signal, this is for debugging.
                log.debug("anti-entropy with {peer}: {clusters} clusters differed; {summary}", peer=name,
                          clusters=len(outcome["clusters"]), summary=_summary(outcome))
        self.metrics.duration.labels(name).observe(perf_counter() - started)
        self.last[name] = outcome
        return outcome

    # -- the exchange, step by step (see the module docstring) ----------------

    def _answer_timeout(self):
        # A peer must answer within twice the request timeout (a dead or
        # paused one costs no more than that); the bulk may take longer.
        return 2 * self.client.request_timeout

    def _bulk_timeout(self):
        return max(BULK_TIMEOUT, self.interval)

    @defer.inlineCallbacks
    def _exchange(self, peer):
        clusters = yield self._differing_clusters(peer)
        if not clusters:
            return {"result": "in_sync", "clusters": []}
        buckets = yield self._differing_buckets(peer, clusters)
        if not buckets:
            return {"result": "in_sync", "clusters": []}  # the differences were in flight
        ledger = core.Reconciliation(self.node.state)
        yield self._pull_records(peer, buckets, ledger)
        yield self._push_repairs(peer, buckets, ledger)
        for kind, count in ledger.repairs().items():
            if count:
                self.metrics.repairs.labels(kind).inc(count)
        return ledger.outcome(sorted(buckets))

    @defer.inlineCallbacks
    def _differing_clusters(self, peer):
        """Step 1: the peer's cluster digests against ours; the sorted names
        of the clusters that differ. The answer is read and compared
        ``DIGEST_CHUNK`` clusters per reactor turn, then ours not in it."""
        status, content = yield self.client.request("GET", peer, DIGEST_PATH, timeout=self._answer_timeout())
        if status != 200:
            raise ExchangeFailed(f"digest: HTTP {status}{_reason(content)}")
        state = self.node.state
        comparison = core.DigestComparison(state)
        cooperate = self.node.cooperate
        try:
            yield run(cooperate, (comparison.remote(chunk) for chunk in in_chunks(digest_entries(content),
                                                                                  DIGEST_CHUNK)))
        except (ValueError, TypeError):
            raise ExchangeFailed("digest: not a digest answer") from None
        yield scan(cooperate, list(state.clusters), SCAN_CHUNK, comparison.local)
        return comparison.result

    @defer.inlineCallbacks
    def _differing_buckets(self, peer, clusters):
        """Step 2: both sides' bucket digests of ``clusters`` (ours scanned
        a chunk per reactor turn); ``{cluster: set of differing buckets}``."""
        local = yield bucket_digests(self.node.state, clusters, self.node.cooperate)
        found = {}
        # One request per group of clusters that fits the peer's body limit
        # (thousands of differing clusters would not fit one).
        for group in self._groups(clusters, lambda name: len(json.dumps(name)) + 1):
            body = json.dumps({"clusters": group}, separators=_COMPACT).encode("utf-8")
            status, content = yield self.client.request("POST", peer, BUCKETS_PATH, body,
                                                        timeout=self._bulk_timeout())
            if status != 200:
                raise ExchangeFailed(f"buckets: HTTP {status}{_reason(content)}")
            # Up to 256 buckets per cluster of thousands: read and compared in
            # steps (one json.loads of a 20,000-cluster answer took tens of ms).
            budget, out = Budget(STEP_BUDGET), []
            try:
                yield run(self.node.cooperate, steps(parse(content.decode("utf-8"), budget.spent), budget, out))
                remote = out[0]["data"]
                if not isinstance(remote, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ExchangeFailed("buckets: not a buckets answer") from None

            def compare(names, remote=remote):
                for cluster in names:
                    theirs = remote.get(cluster, {})
                    if not isinstance(theirs, dict):
                        raise TypeError
                    found.update(differing_buckets(encode_buckets({cluster: local.get(cluster, {})}),
                                                   {cluster: theirs}))

            try:
                yield scan(self.node.cooperate, group, DIGEST_CHUNK, compare)
            except TypeError:
                raise ExchangeFailed("buckets: not a buckets answer") from None
        return found

    def _groups(self, names, cost):
        """The sorted ``names`` in consecutive groups whose request body
        (``cost(name)`` bytes each, plus the envelope) stays within the
        peer's body limit; a name is never split."""
        budget = self.max_body - 64
        group, size = [], 0
        for name in names:
            length = cost(name)
            if group and size + length > budget:
                yield group
                group, size = [], 0
            group.append(name)
            size += length
        if group:
            yield group

    @defer.inlineCallbacks
    def _pull_records(self, peer, buckets, ledger):
        """Step 3: the peer streams its live requests of ``buckets``; each is
        reconciled here as it arrives (``ledger``)."""
        node = self.node
        complete = []

        def on_line(raw):
            entry = decode_line(raw)
            if isinstance(entry, dict):
                if entry.get("end") is True:
                    complete.append(True)
                return
            try:
                record = parse_record(entry)
            except InvalidInput:
                ledger.invalid_record()
                return
            ledger.peer_record(record, node.clock.seconds())

        wanted = {c: sorted(b) for c, b in buckets.items()}
        # A name appears twice (the list and the map) beside its buckets.
        for group in self._groups(sorted(wanted), lambda name: 2 * len(json.dumps(name)) + 3
                                  + len(json.dumps(wanted[name], separators=_COMPACT))):
            body = json.dumps({"clusters": group, "buckets": {c: wanted[c] for c in group}}, separators=_COMPACT)
            del complete[:]
            status, content = yield self.client.stream("POST", peer, RECORDS_PATH, body.encode("utf-8"), on_line,
                                                       timeout=self._bulk_timeout(),
                                                       answer_timeout=self._answer_timeout())
            if status != 200:
                raise ExchangeFailed(f"records: HTTP {status}{_reason(content)}")
            if not complete:
                raise ExchangeFailed("records: the stream ended early")

    @defer.inlineCallbacks
    def _push_repairs(self, peer, buckets, ledger):
        """Step 4: our live requests of ``buckets`` the peer did not list and
        the deletes it missed go to the peer, in bodies within its limit; its
        answers (the deletes we missed) are applied here."""
        unlisted = yield self._unlisted_records(buckets, ledger.listed)
        ledger.sent(len(unlisted))
        for body in self._repair_bodies(unlisted, ledger.to_peer):
            status, content = yield self.client.request("POST", peer, REPAIR_PATH, body,
                                                        timeout=self._bulk_timeout())
            if status != 200:
                raise ExchangeFailed(f"repair: HTTP {status}{_reason(content)}")
            try:
                ledger.peer_answer(json.loads(content)["data"])
            except (ValueError, KeyError, TypeError):
                raise ExchangeFailed("repair: not a repair answer") from None

    def _unlisted_records(self, buckets, listed):
        """This node's live requests in ``buckets`` ({cluster: set}) the peer
        did not list, found a chunk per reactor turn."""
        found = []

        def visit(records):
            for record in records:
                wanted = buckets.get(record[1])
                if wanted is not None and record[0] not in listed and bucket_of(record[0]) in wanted:
                    found.append(record)

        d = scan(self.node.cooperate, self.node.state.iter_requests(), SCAN_CHUNK, visit)
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
