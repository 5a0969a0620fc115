"""Typed events and their origins: what the load table and the KV-cache
index are told, whoever told it (a gateway, a peer, a snapshot).

Event type names are the reference's replication ``Event-Type`` values
(``load.stats.set`` ...); ``cache.save`` is ours (reference nodes neither send
nor accept it).

The event classes are tuples with named properties: as cheap as a tuple to
build on the hot path (one per request), and not tracked by the cyclic GC
once their items are atomic.
"""

EVENT_ADD = "load.stats.set"
EVENT_DELETE = "load.stats.delete"
EVENT_PROMPT_DELETE = "load.prompt.delete"
LOAD_EVENT_TYPES = (EVENT_ADD, EVENT_DELETE, EVENT_PROMPT_DELETE)
EVENT_CACHE_SAVE = "cache.save"
# Ours too (reference nodes neither send nor accept them).
EVENT_ENGINE_RESET = "load.engine.reset"
EVENT_LEASE_KEEPALIVE = "load.lease.keepalive"
EVENT_LEASE_REVOKE = "load.lease.revoke"
EVENT_REFRESH = "load.refresh"
TRUTH_EVENT_TYPES = (EVENT_ENGINE_RESET, EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, EVENT_REFRESH)

# Who sent an event: a gateway (replicated onwards) or a peer (never forwarded).
ORIGIN_CLIENT = "client"
ORIGIN_PEER = "peer"


class LoadAdd(tuple):
    """``(cluster, request_id, ip, prompt_length, timestamp, prompt_tokens,
    lease, if_updated_time)``; the last three are optional, so a 5-tuple is
    still a valid add (their properties then give the defaults).

    ``ip`` is an IPv4/IPv6 address as the client spelled it (the core keys
    engines by its canonical form), ``prompt_length`` in bytes in
    [0, 2^31-1], ``timestamp`` the sender's ns since the epoch or None,
    ``prompt_tokens`` in [0, 2^31-1] (default 0), ``lease`` the gateway's
    lease name or None, ``if_updated_time`` the engine's ``updated_time`` (ns)
    the add is conditional on, or None. ``if_updated_time`` is a local
    condition: a node that replicates the add leaves it out.
    """

    __slots__ = ()
    cluster = property(lambda self: self[0])
    request_id = property(lambda self: self[1])
    ip = property(lambda self: self[2])
    prompt_length = property(lambda self: self[3])
    timestamp = property(lambda self: self[4])
    prompt_tokens = property(lambda self: self[5] if len(self) > 5 else 0)
    lease = property(lambda self: self[6] if len(self) > 6 else None)
    if_updated_time = property(lambda self: self[7] if len(self) > 7 else None)


class LoadDelete(tuple):
    """``(request_id, timestamp)``: a delete or a prompt delete."""

    __slots__ = ()
    request_id = property(lambda self: self[0])
    timestamp = property(lambda self: self[1])


class CacheSave(tuple):
    """``(cluster, hashes, ip)``: engine ``ip`` holds the KV cache of every
    prefix of ``hashes`` (uint64 block hashes, first block first)."""

    __slots__ = ()
    cluster = property(lambda self: self[0])
    hashes = property(lambda self: self[1])
    ip = property(lambda self: self[2])


class EngineReset(tuple):
    """``(cluster, ip)``: engine ``ip`` restarted; its in-flight requests
    and KV-cache blocks are gone (``DELETE /v1/load/engine``)."""

    __slots__ = ()
    cluster = property(lambda self: self[0])
    ip = property(lambda self: self[1])


class LeaseKeepalive(tuple):
    """``(lease, ttl_ms)``: create or renew a gateway's lease; ``ttl_ms`` in
    [1000, 300000] or None for the node's default (``--lease-ttl``)."""

    __slots__ = ()
    lease = property(lambda self: self[0])
    ttl_ms = property(lambda self: self[1])


class LeaseRevoke(tuple):
    """``(lease,)``: end a lease now, releasing every request added under it."""

    __slots__ = ()
    lease = property(lambda self: self[0])


class Refresh(tuple):
    """``(request_ids,)``: restart the expiry clock of each known request;
    ``request_ids`` a tuple of at most 10,000 strings."""

    __slots__ = ()
    request_ids = property(lambda self: self[0])
