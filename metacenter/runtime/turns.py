"""Big jobs on the reactor thread, one chunk per reactor turn.

Twisted's default cooperator runs a job's steps for up to 10 ms before it
lets the reactor serve anything else; gateways wait on us with a 100 ms
timeout and log anything above ~10 ms as slow. Here each step (sized by its
job to a millisecond or two) gets its own turn, so requests interleave.

Every job over the whole state goes through here: the expiry sweep
(``run``), and the scans over the live requests (``scan``: anti-entropy's
bucket digests and unlisted records, a resync's drop of what finished while
the node was away). Snapshot streams cut the same walk with ``in_chunks``
but are paced by the connection's back-pressure instead.
"""

from itertools import islice

from twisted.internet import task


def _one_step():
    # The Cooperator asks its termination predicate after each step (not
    # before the first), so "done at once" means exactly one step per tick.
    return lambda: True


def chunk_per_turn(clock):
    """A ``task.Cooperator`` that runs one step of one job per reactor turn
    (``clock.callLater(0, ...)`` schedules each turn). Its ``cooperate`` is
    the node's cooperator (``Node.cooperate``)."""
    return task.Cooperator(scheduler=lambda work: clock.callLater(0, work), terminationPredicateFactory=_one_step)


def in_chunks(items, size):
    """Yields lists of up to ``size`` consecutive items of the iterable
    ``items`` until it is exhausted. Raises ValueError if ``size`` < 1."""
    if size < 1:
        raise ValueError("size must be at least 1")
    items = iter(items)
    while True:
        chunk = list(islice(items, size))
        if not chunk:
            return
        yield chunk


def run(cooperate, steps):
    """Runs the iterator ``steps`` through ``cooperate`` (``task.cooperate``'s
    signature: one ``next()`` per step). A Deferred firing with None when
    ``steps`` is exhausted, or failing with what a step raised (or
    ``task.SchedulerStopped`` if the cooperator was stopped)."""
    return cooperate(steps).whenDone().addCallback(lambda _: None)


def scan(cooperate, items, size, visit):
    """Calls ``visit(chunk)`` for every list of up to ``size`` consecutive
    ``items``, one chunk per cooperator step. ``items`` is consumed lazily,
    so it may be a generator over a changing state (``LoadState.iter_requests``
    copies its ids a shard at a time and skips what went meanwhile). A Deferred as ``run``."""
    return run(cooperate, (visit(chunk) for chunk in in_chunks(items, size)))
