"""Anti-entropy's pure parts: digests, buckets, reconciliation, the repair
horizon. The exchange itself (HTTP, reactor turns) is
``metacenter.cluster.antientropy``; the reasoning behind the horizon is in
its docstring.

A cluster's digest is (live request count, XOR of ``request_fingerprint``
over its live requests), kept by ``LoadState`` in O(1) per mutation. A
cluster whose digests differ is split into ``BUCKETS`` buckets by request id
(the low bits of the fingerprint, which depend on the id only), so two nodes
exchange only the requests of the buckets that differ.

Wire forms (JSON, from ``/v1/replica/digest`` and ``/v1/replica/buckets``):
digests are ``{cluster: [live, "16 hex digits"]}``, bucket digests
``{cluster: {"bucket": [live, "16 hex digits"]}}``.
"""

import zlib
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from metacenter.core.load import TOMB_DELETED, TOMB_PROMPT, request_fingerprint

HORIZON_FRACTION = 0.75  # of the tombstone TTL; the rest is margin for clock skew
BUCKETS = 256  # a power of two

# What reconciling one of a peer's live requests did here, and what the peer
# should do.
SAME = "same"
ADOPTED = "adopted"  # added here (we had never seen it, or only its prompt delete)
MERGED = "merged"  # its prompt delete applied here
PEER_DELETE = "peer_delete"  # deleted here: the peer must delete it
PEER_PROMPT = "peer_prompt"  # prompt deleted here: the peer must drop its prompt
UNRESOLVED = "unresolved"  # unknown here and older than the horizon: left alone

# (request_id, cluster, ip, prompt_length, prompt_deleted, created_s), as
# LoadState.iter_requests yields it; created_s in seconds (None: unknown).
Record = Tuple[str, str, str, int, bool, Optional[int]]

_EMPTY = [0, "0" * 16]


def repair_horizon(tombstone_ttl: float) -> float:
    """Seconds: a request only a peer knows is adopted only while it is
    younger than this (any delete of it would still be remembered here)."""
    return tombstone_ttl * HORIZON_FRACTION


def isolation_threshold(tombstone_ttl: float, interval: float) -> float:
    """Seconds a node may miss the cluster and still be repaired exactly by
    anti-entropy (running every ``interval`` s): what it missed must still be
    inside the repair horizon when the next rounds run. Longer, and it
    resyncs (warm start). At least 1 s."""
    horizon = repair_horizon(tombstone_ttl)
    return max(1.0, min(horizon / 2, horizon - 2 * interval))


def digests(state) -> Dict[str, list]:
    """``{cluster: [live, "hex digest"]}`` of a ``LoadState``, O(clusters)."""
    return {name: [c.live, format(c.digest, "016x")] for name, c in state.clusters.items()}


def bucket_of(request_id: str) -> int:
    """The bucket (0..BUCKETS-1) of a request: the low bits of its
    fingerprint, which depend on the id only (not on the prompt flag)."""
    return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) & (BUCKETS - 1)


class BucketDigests:
    """Accumulates ``{cluster: {bucket: (live, digest)}}`` (ints) for the
    given clusters over chunks of records (``add``), so a caller can spread
    the walk over reactor turns; ``result`` is the dict so far.

    Each bucket is a tuple of two ints, replaced on every change: the
    collector untracks such tuples at their first pass, where 100,000
    mutable lists (2,000 clusters of ~50 buckets) stayed tracked and made
    each full collection meanwhile tens of milliseconds longer."""

    def __init__(self, clusters: Iterable[str]):
        self.result: Dict[str, Dict[int, tuple]] = {cluster: {} for cluster in clusters}

    def add(self, records: Iterable[Record]) -> None:
        """Folds a chunk of records into ``result``; other clusters' are skipped."""
        out = self.result
        for request_id, cluster, _, _, prompt_deleted, _ in records:
            buckets = out.get(cluster)
            if buckets is None:
                continue
            fingerprint = request_fingerprint(request_id, prompt_deleted)
            index = fingerprint & (BUCKETS - 1)
            bucket = buckets.get(index)
            if bucket is None:
                buckets[index] = (1, fingerprint)
            else:
                buckets[index] = (bucket[0] + 1, bucket[1] ^ fingerprint)


def encode_buckets(buckets: Dict[str, Dict[int, tuple]]) -> Dict[str, Dict[str, list]]:
    """``BucketDigests.result`` -> the wire form {cluster: {"bucket": [live, "hex"]}}."""
    return {cluster: {str(b): [live, format(digest, "016x")] for b, (live, digest) in found.items()}
            for cluster, found in buckets.items()}


def differing_buckets(local: dict, remote: dict) -> Dict[str, Set[int]]:
    """``{cluster: set of buckets that differ}``, both sides in wire form;
    clusters whose buckets all agree (they changed between the two scans)
    are left out. A bucket absent on one side counts as empty."""
    result = {}
    for cluster in set(local) | set(remote):
        mine, theirs = local.get(cluster, {}), remote.get(cluster, {})
        differing = {int(b) for b in set(mine) | set(theirs) if mine.get(b, _EMPTY) != list(theirs.get(b, _EMPTY))}
        if differing:
            result[cluster] = differing
    return result


def differing_clusters(local: dict, remote: dict) -> List[str]:
    """The sorted names of the clusters whose digests (wire form) differ; a
    cluster absent on one side counts as empty."""
    return sorted(name for name in set(local) | set(remote) if local.get(name, _EMPTY) != remote.get(name, _EMPTY))


class DigestComparison:
    """``differing_clusters(digests(state), remote)`` over chunks, so a
    caller can spread it over reactor turns without building either side's
    dict: ``remote(pairs)`` takes chunks of the peer's ``(name, [live,
    "hex"])`` entries as they are read, ``local(names)`` then chunks of
    this node's cluster names, ``result`` is the sorted names that differ.
    An entry that is not ``[int, str]`` raises ValueError. A cluster absent
    on one side counts as empty (as in ``differing_clusters``)."""

    def __init__(self, state):
        self._clusters = state.clusters
        self._seen: Set[str] = set()
        self._differ: Set[str] = set()

    def remote(self, pairs: Iterable[Tuple[str, object]]) -> None:
        clusters, seen, differ = self._clusters, self._seen, self._differ
        for name, value in pairs:
            if type(value) is not list or len(value) != 2 or type(value[0]) is not int or \
                    type(value[1]) is not str:
                raise ValueError(f"the digest of cluster {name!r} is not [live, \"16 hex digits\"]")
            seen.add(name)
            cluster = clusters.get(name)
            live, digest = (0, 0) if cluster is None else (cluster.live, cluster.digest)
            if value[0] != live or value[1] != "%016x" % digest:
                differ.add(name)

    def local(self, names: Iterable[str]) -> None:
        clusters, seen, differ = self._clusters, self._seen, self._differ
        for name in names:
            if name not in seen:
                cluster = clusters.get(name)
                if cluster is not None and (cluster.live or cluster.digest):
                    differ.add(name)

    @property
    def result(self) -> List[str]:
        return sorted(self._differ)


def reconcile(state, record: Record, now: float, merge: Optional[Callable[..., object]] = None) -> str:
    """Merges one of a peer's live requests into ``state`` (a ``LoadState``;
    ``now`` in seconds) and returns the outcome: ``SAME``, ``ADOPTED``,
    ``MERGED``, ``PEER_DELETE``, ``PEER_PROMPT`` or ``UNRESOLVED``. A record
    is merged through ``merge(*record)`` (``state.apply_record`` by default;
    a node passes its ``merge_record``)."""
    if merge is None:
        merge = state.apply_record
    request_id, _, _, _, prompt_deleted, created_s = record
    here = state.request_state(request_id)
    if here is None:
        if created_s is not None and created_s > now - repair_horizon(state.tombstone_ttl):
            merge(*record)
            return ADOPTED
        return UNRESOLVED
    if here == "deleted":
        return PEER_DELETE
    if here == "prompt-tombstone":
        merge(*record)
        return ADOPTED
    if here == "live":
        if prompt_deleted:
            merge(*record)
            return MERGED
        return SAME
    return SAME if prompt_deleted else PEER_PROMPT  # live, prompt deleted here


class Reconciliation:
    """The ledger of one exchange with a peer, on this node's ``state``:

    - ``peer_record(record, now)`` for each of the peer's live requests of
      the differing buckets (``reconcile``); ``invalid_record()`` for one
      that failed validation;
    - ``listed``: the ids the peer listed; ``to_peer``: ``[request_id,
      kind]`` tombstones the peer lacks (kind ``TOMB_DELETED`` or
      ``TOMB_PROMPT``);
    - ``sent(count)`` for this node's requests sent to the peer;
    - ``peer_answer(answer)`` applies a repair answer (``{"deleted": [id],
      "prompt_deleted": [id], "adopted": n, "unresolved": n}``); ValueError
      if it is not one;
    - ``outcome(clusters)`` and ``repairs()`` report it.
    """

    def __init__(self, state):
        self._state = state
        self.listed: Set[str] = set()
        self.to_peer: List[list] = []
        self.tally: Counter = Counter()

    def peer_record(self, record: Record, now: float) -> str:
        """Reconciles one of the peer's live requests (``now`` in seconds);
        returns the outcome (see ``reconcile``)."""
        self.listed.add(record[0])
        outcome = reconcile(self._state, record, now)
        self.tally[outcome] += 1
        if outcome == PEER_DELETE:
            self.to_peer.append([record[0], TOMB_DELETED])
        elif outcome == PEER_PROMPT:
            self.to_peer.append([record[0], TOMB_PROMPT])
        return outcome

    def invalid_record(self) -> None:
        """Counts a peer entry that failed validation."""
        self.tally["invalid"] += 1

    def sent(self, count: int) -> None:
        """Counts ``count`` of this node's requests sent to the peer."""
        self.tally["sent_requests"] += count

    def peer_answer(self, answer) -> None:
        """Applies a repair answer (the deletes this node missed); ValueError
        if ``answer`` is not one. Ids that are not non-empty strings are
        skipped."""
        try:
            deletes, prompt_deletes = answer["deleted"], answer["prompt_deleted"]
            if not isinstance(deletes, list) or not isinstance(prompt_deletes, list):
                raise TypeError
        except (KeyError, TypeError):
            raise ValueError("not a repair answer") from None
        state = self._state
        for ids, kind in ((deletes, TOMB_DELETED), (prompt_deletes, TOMB_PROMPT)):
            for request_id in ids:
                if isinstance(request_id, str) and request_id:
                    state.apply_tombstone(request_id, kind)
        tally = self.tally
        tally["deleted"] += len(deletes)
        tally["prompt_deleted"] += len(prompt_deletes)
        for key, field in (("peer_adopted", "adopted"), ("peer_unresolved", "unresolved")):
            value = answer.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                tally[key] += value

    def repairs(self) -> Dict[str, int]:
        """Counts by kind, for ``metacenter_antientropy_repairs_total``:
        adopted / prompt_deleted / deleted here, sent_requests /
        sent_deletes / sent_prompt_deletes to the peer."""
        tally = self.tally
        sent_deletes = sum(1 for _, kind in self.to_peer if kind == TOMB_DELETED)
        return {"adopted": tally[ADOPTED], "prompt_deleted": tally[MERGED] + tally["prompt_deleted"],
                "deleted": tally["deleted"], "sent_requests": tally["sent_requests"],
                "sent_deletes": sent_deletes, "sent_prompt_deletes": len(self.to_peer) - sent_deletes}

    def outcome(self, clusters: List[str]) -> dict:
        """The exchange's summary: ``result`` "repaired", the ``clusters``
        looked at, ``listed``, the ``repairs()`` counts, ``peer_adopted``,
        ``unresolved`` (both sides), ``invalid`` and ``changed`` (whether
        anything was repaired on either side)."""
        tally = self.tally
        outcome = {"result": "repaired", "clusters": clusters, "listed": len(self.listed)}
        outcome.update(self.repairs())
        outcome.update(peer_adopted=tally["peer_adopted"], unresolved=tally[UNRESOLVED] + tally["peer_unresolved"],
                       invalid=tally["invalid"])
        outcome["changed"] = any(outcome[k] for k in (ADOPTED, "prompt_deleted", "deleted", "peer_adopted",
                                                       "sent_deletes", "sent_prompt_deletes"))
        return outcome
