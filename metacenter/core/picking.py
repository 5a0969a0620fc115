"""Pick-and-book: choose an engine for a request and book it there in one
step, and the engine reset that spans the load table and the KV-cache index.

Atomic on one node: the choice and the booking happen within one call on the
reactor thread, so no other request can read the same load in between; N
gateways that send their picks for a cluster to one node never herd. Across
nodes a pick is as fresh as replication: two nodes picking for one cluster
at the same instant each see their own bookings first (the gateway already
sends every call for a cluster to one node).
"""

import random

from metacenter.core.cache import IPS_MAX_ITEMS, CacheIndex
from metacenter.core.errors import Conflict, InvalidInput, NotFound
from metacenter.core.fields import json_type
from metacenter.core.load import LoadState, engine_address, wire_int
from metacenter.core.scoring import score_engines


def reset_engine(load: LoadState, cache: CacheIndex | None, cluster: str, ip: str) -> tuple[int, int]:
    """Engine (cluster, ip) restarted: release its in-flight requests and
    drop its KV-cache blocks. Returns ``(released_requests, cache_blocks)``;
    ``(0, 0)`` for an unknown engine. ``cache`` may be None.

    The cache goes first: the load table tells its engine observers (the
    cache among them) that the engine left, and the blocks would then be gone
    before they were counted."""
    engine_address(ip)  # refuse a bad ip before any change
    blocks = 0 if cache is None else cache.forget_engine(cluster, ip)
    return load.reset_engine(cluster, ip), blocks


def _candidates(load, cache, cluster, ips, hashes):
    """[(spelling, address)] in a stable order, one per address."""
    if ips is not None:
        if not isinstance(ips, (list, tuple)):
            raise InvalidInput(f"field 'ips' must be an array of IP addresses, got {json_type(ips)}")
        if len(ips) > IPS_MAX_ITEMS:
            raise InvalidInput(f"field 'ips' has {len(ips)} items; at most {IPS_MAX_ITEMS} are allowed")
        seen = {}
        for index, ip in enumerate(ips):
            if not isinstance(ip, str):
                raise InvalidInput(f"field 'ips' item {index} must be an IPv4 or IPv6 address, got {json_type(ip)}")
            try:
                address = engine_address(ip)
            except InvalidInput:
                raise InvalidInput(f"field 'ips' item {index} must be an IPv4 or IPv6 address, got {ip!r}") from None
            seen.setdefault(address, ip)  # the first spelling of an address wins
        return [(ip, address) for address, ip in seen.items()]
    c = load.clusters.get(cluster)
    known = {} if c is None else {address: engine.ip for address, engine in c.engines.items()}
    if hashes and cache is not None:
        # Engines that hold the prompt's cache but have no load here are
        # known too (idle).
        for address in cache.match_addresses(cluster, hashes):
            if address not in known:
                known[address] = cache.engine_ip(cluster, address) or address
    return [(ip, address) for address, ip in known.items()]


def pick(load: LoadState, cache: CacheIndex | None, cluster: str, request_id: str, rng: random.Random, *,
         prompt_length: int = 0, prompt_tokens: int = 0, prompt_hash: list[int] | None = None,
         ips: list[str] | None = None, lease: str | None = None, timestamp_ns: int | None = None) -> dict:
    """Choose the engine of ``cluster`` with the best score for this request
    and book ``request_id`` on it (an add) in the same step.

    Score: the gateway's formula (``scoring.score_engines``, docs/cache.md)
    on the candidates' exact counters, with the cache match of
    ``prompt_hash`` (uint64 block hashes) when given; equal best scores are
    broken with ``rng`` (a ``random.Random``). Candidates: ``ips`` (IP
    strings; one never seen counts as idle; the answer spells the ip as
    given there), else the cluster's known engines (the load table's, plus
    those holding the prompt's cache).

    Returns ``{"ip": str, "score": float, "cache_length": int (blocks),
    "queued_req_num": int (the engine's requests in flight after booking,
    saturated at 2^31-1), "booked": bool}``. A request_id already booked
    returns its engine and books nothing (``booked`` False), so a retry is
    safe. Raises ``NotFound`` when there is no candidate (the reason says to
    pass ``ips``), ``Conflict`` when the request already finished (deleted,
    expired or released), ``InvalidInput`` for a bad field (state
    unchanged)."""
    hashes = prompt_hash or []
    booked_on = load.engine_of(request_id)
    if booked_on is None and load.request_state(request_id) == "deleted":
        raise Conflict(f"request_id {request_id!r} already finished (deleted, expired or released); "
                       f"book it under a new request_id")
    candidates = _candidates(load, cache, cluster, ips, hashes)
    if booked_on is not None and booked_on.cluster == cluster:
        # A retry: answer with the engine it is on, scored among the others.
        if booked_on.address not in {address for _, address in candidates}:
            candidates.append((booked_on.ip, booked_on.address))
    elif booked_on is not None:
        raise Conflict(f"request_id {request_id!r} is booked in cluster {booked_on.cluster!r}, not {cluster!r}")
    if not candidates:
        raise NotFound(f"cluster {cluster!r} has no known engines; pass 'ips' with the candidate engines' addresses")

    c = load.clusters.get(cluster)
    rows = []
    for _, address in candidates:
        engine = None if c is None else c.engines.get(address)
        if engine is not None:
            rows.append({"ip": address, "queued_req_num": engine.queued, "prompt_length": engine.prompt})
    lengths = {} if not hashes or cache is None else cache.match_addresses(cluster, hashes)
    addresses = [address for _, address in candidates]
    ranked = score_engines(rows, lengths, len(hashes), ips=addresses)
    spelling = {address: ip for ip, address in candidates}

    if booked_on is not None:
        chosen = next(row for row in ranked if row["ip"] == booked_on.address)
        return {"ip": spelling[booked_on.address], "score": chosen["score"], "cache_length": chosen["cache_length"],
                "queued_req_num": wire_int(booked_on.queued), "booked": False}

    best = ranked[0]["score"]
    ties = [row for row in ranked if row["score"] == best]  # ranked keeps them in address order
    chosen = ties[0] if len(ties) == 1 else rng.choice(ties)
    ip = spelling[chosen["ip"]]
    booked = load.add(cluster, request_id, ip, prompt_length, timestamp_ns, prompt_tokens, lease)
    engine = load.engine(cluster, ip)
    return {"ip": ip, "score": chosen["score"], "cache_length": chosen["cache_length"],
            "queued_req_num": wire_int(engine.queued), "booked": booked}
