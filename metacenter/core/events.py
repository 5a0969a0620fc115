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

# Who sent an event: a gateway (replicated onwards) or a peer (never forwarded).
ORIGIN_CLIENT = "client"
ORIGIN_PEER = "peer"


class LoadAdd(tuple):
    """``(cluster, request_id, ip, prompt_length, timestamp)``.

    ``ip`` is canonical, ``prompt_length`` in bytes in [0, 2^31-1],
    ``timestamp`` the sender's ns since the epoch or None.
    """

    __slots__ = ()
    cluster = property(lambda self: self[0])
    request_id = property(lambda self: self[1])
    ip = property(lambda self: self[2])
    prompt_length = property(lambda self: self[3])
    timestamp = property(lambda self: self[4])


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
