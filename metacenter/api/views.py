"""Bodies that cover the whole state (``/metrics``, ``/v1/load/overview``,
``/v1/node/status``, the peers' ``/v1/replica/digest``), produced in slices of bounded reactor time.

Prometheus scrapes every 15-30 s and the console polls the overview and the
status every second; at 20,000 clusters a walk over everything in one go
blocked the reactor for most of a second, while gateways wait 100 ms at most.
Here each body is built by a generator that does at most ``TURN_BUDGET`` of
work per step: the first step runs inside the request (a small state is
answered at once, in the same turn), the others one per reactor turn through
the node's cooperator, so gateway requests are served between them.

What does not change between two polls is not redone: a cluster's engine list
is the ``LoadResponseCache`` that ``GET /v1/load/stats`` reads (rebuilt from
per-engine fragments, only the changed ones serialised again), and a
cluster's metric lines are cached by ``Cluster.version``. A request that
arrives while the same body is being built shares that build.

The state may change between two steps: each cluster is read whole within one
step (or, for a cluster with many engines, from a copy of its engine list),
so every cluster in a body is consistent, and a cluster removed meanwhile is
left out.

A finished body is a list of pieces (``endpoint.Pieces``), written to the
connection one after the other under its back-pressure: at 20,000 clusters
the metrics are ~9 MB, and joining them, copying them into the envelope, or
handing them to the transport at once each blocked the reactor for several
ms.
"""

from json.encoder import encode_basestring
from time import perf_counter

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from metacenter.api import envelope
from metacenter.api.endpoint import Pieces, Raw

# Work per step (one reactor turn): far below the 5 ms a pause may last.
TURN_BUDGET = 0.00025
# Items between two looks at the clock (perf_counter costs ~50 ns; items ~1 µs).
_CHECK_EVERY = 32

_METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST.encode("ascii")


class _Clock:
    """Tells a step when its budget is spent, looking at the clock every
    ``_CHECK_EVERY`` items."""

    __slots__ = ("deadline", "count", "budget")

    def __init__(self, budget):
        self.budget = budget
        self.count = 0
        self.deadline = perf_counter() + budget

    def spent(self):
        self.count += 1
        if self.count % _CHECK_EVERY:
            return False
        return perf_counter() >= self.deadline

    def restart(self):
        self.deadline = perf_counter() + self.budget

    def over(self):
        """Whether the budget is spent, looking at the clock now (for items
        that cost ~100 µs each, such as a registry's metric families)."""
        return perf_counter() >= self.deadline


class _Pieces:
    """Parts of a body joined step by step: each ``seal()`` (before a step
    yields) joins the parts added since the last one (a step's worth, tens
    of KB), so the body is a few hundred pieces, not one per cluster or
    engine, and is never joined whole (``endpoint.Pieces``)."""

    __slots__ = ("sep", "parts", "sealed")

    def __init__(self, sep=b""):
        self.sep = sep
        self.parts = []
        self.sealed = []

    def seal(self):
        if self.parts:
            self.sealed.append(self.sep.join(self.parts))
            self.parts = []

    def items(self, before=b"", after=b""):
        """``before``, the parts with ``sep`` between them, ``after``: a list
        of bytes whose concatenation is the body (nothing joined here)."""
        self.seal()
        items = [before]
        for piece in self.sealed:
            items.append(piece)
            items.append(self.sep)
        if self.sealed:
            items.pop()
        items.append(after)
        return items

    def pieces(self):
        """The sealed groups (no separator between them)."""
        self.seal()
        return self.sealed


class Render:
    """One kind of body, built by ``steps()`` (a generator that yields when
    ``self.clock.spent()``, and returns the finished result), shared by every
    request that arrives while it is being built."""

    def __init__(self, cooperate, budget=TURN_BUDGET):
        self._cooperate = cooperate
        self._budget = budget
        self._waiting = None  # Deferreds of the requests sharing the build in progress
        self._result = None
        self.clock = None
        self.builds = 0  # how many builds ran (tests)

    def get(self):
        """The result at once (a small state: one step was enough), or a
        Deferred that fires with it."""
        if self._waiting is not None:
            d = Deferred()
            self._waiting.append(d)
            return d
        self.builds += 1
        self.clock = _Clock(self._budget)
        gen = self.steps()
        try:
            next(gen)
        except StopIteration as done:
            return done.value
        self._waiting = []
        self._result = None
        d = Deferred()
        self._waiting.append(d)
        self._cooperate(self._drive(gen)).whenDone().addBoth(self._finished)
        return d

    def _drive(self, gen):
        while True:
            self.clock.restart()
            try:
                next(gen)
            except StopIteration as done:
                self._result = done.value
                return
            yield None

    def _finished(self, outcome):
        waiting, self._waiting = self._waiting, None
        result, self._result = self._result, None
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(result)
        return None

    def steps(self):
        raise NotImplementedError


class OverviewRender(Render):
    """``GET /v1/load/overview``: ``{"time": ns, "clusters": [{"cluster":
    name, "engines": [engine, ...]}, ...]}``, engines as in
    ``GET /v1/load/stats``."""

    def __init__(self, node, bodies, cooperate, budget=TURN_BUDGET):
        super().__init__(cooperate, budget)
        self._node = node
        self._bodies = bodies

    def steps(self):
        clock = self.clock
        state = self._node.state
        now_ns = int(self._node.clock.seconds() * 1e9)
        pieces = _Pieces(b",")
        for name in list(state.clusters):
            cluster = state.clusters.get(name)
            if cluster is None:
                continue
            if len(cluster.engines) < 64 or self._bodies.is_fresh(cluster):
                engines = self._bodies.body(cluster)
            else:
                pieces.seal()
                engines = yield from self._engines_in_steps(cluster)
            pieces.parts.append(b'{"cluster":' + envelope.dumps(name) + b',"engines":' + engines + b"}")
            if clock.spent():
                pieces.seal()
                yield
        # Never joined: the endpoint writes the pieces one after the other.
        return Pieces(pieces.items(b'{"time":%d,"clusters":[' % now_ns, b"]}"))

    def _engines_in_steps(self, cluster):
        """A big cluster whose cached list is stale: its engines' fragments
        over several steps, from a copy of its engine list."""
        version = cluster.version
        pieces = _Pieces(b",")
        fragment = self._bodies.fragment
        for engine in list(cluster.engines.values()):
            pieces.parts.append(fragment(engine))
            if self.clock.spent():
                pieces.seal()
                yield
        # Joined once (GET /v1/load/stats serves it too): ~1 MB at 5,000 engines.
        body = Raw(b"".join(pieces.items(b"[", b"]")))
        self._bodies.store(cluster, version, body)
        return body


class StatusRender(Render):
    """``GET /v1/node/status``: ``Node.status_head()`` (version, counts,
    readiness, peers, log level), then each cluster's digest ``{"live": int,
    "digest": 16 hex digits}`` built in slices."""

    def __init__(self, node, cooperate, budget=TURN_BUDGET):
        super().__init__(cooperate, budget)
        self._node = node

    def steps(self):
        clock = self.clock
        node, state = self._node, self._node.state
        head = node.status_head()
        pieces = _Pieces(b",")
        for name in list(state.clusters):
            cluster = state.clusters.get(name)
            if cluster is None:
                continue
            pieces.parts.append(envelope.dumps(name) + b':{"live":%d,"digest":"%016x"}' % (cluster.live, cluster.digest))
            if clock.spent():
                pieces.seal()
                yield
        return Pieces(pieces.items(envelope.dumps(head)[:-1] + b',"digest":{', b"}}"))


class _OneFamily:
    """One metric family as ``generate_latest`` takes a registry."""

    __slots__ = ("family",)

    def __init__(self, family):
        self.family = family

    def collect(self):
        return (self.family,)


def _label_value(value):
    """As prometheus-client escapes a label value."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


_ENGINE_COUNT_HEAD = b"# HELP model_engine_count Engines per cluster (model).\n# TYPE model_engine_count gauge\n"
# The per-engine series: (name, help, the Engine attribute), exact values
# (the wire's rows saturate at 2^31-1, the metrics do not). The last three
# are issue 10's.
_ENGINE_SERIES = (
    ("queued_num", "Requests in flight on an engine.", "queued"),
    ("prompt_length", "Prompt bytes still in prefill on an engine.", "prompt"),
    ("metacenter_engine_prefill_requests", "Requests in flight on an engine whose prompt is not yet deleted.",
     "prefill"),
    ("metacenter_engine_prefill_tokens", "Prompt tokens of the requests in prefill on an engine.",
     "prefill_tokens"),
    ("metacenter_engine_queued_tokens", "Prompt tokens of the requests in flight on an engine.", "queued_tokens"),
)
_SERIES_HEADS = tuple(f"# HELP {name} {text}\n# TYPE {name} gauge\n".encode() for name, text, _ in _ENGINE_SERIES)


class MetricsRender(Render):
    """``GET /metrics``: the Prometheus text format of the node's registry
    (bounded series: process, HTTP, events, replication, ...), then the
    per-cluster and per-engine load series (``model_engine_count``,
    ``queued_num``, ``prompt_length``, and the prefill requests, prefill
    tokens and queued tokens of each engine) in slices, each cluster's lines
    cached by its version. Labels are the engine's ip and the cluster's name,
    as for the reference's series."""

    def __init__(self, node, registry, cooperate, budget=TURN_BUDGET):
        super().__init__(cooperate, budget)
        self._state = node.state
        self._registry = registry
        # name -> (version, engine count line, lines of each _ENGINE_SERIES)
        self._lines = {}

    def steps(self):
        clock = self.clock
        # The registry's series are bounded in number (no series per cluster
        # or engine) but rendering them all takes 1-3 ms: a family at a time.
        head = []
        for family in self._registry.collect():
            head.append(generate_latest(_OneFamily(family)))
            if clock.over():
                yield
        state = self._state
        cache, fresh = self._lines, {}
        counts = _Pieces()
        series = tuple(_Pieces() for _ in _ENGINE_SERIES)
        every = (counts, *series)
        for name in list(state.clusters):
            cluster = state.clusters.get(name)
            if cluster is None:
                continue
            lines = cache.get(name)
            if lines is None or lines[0] != cluster.version:
                if len(cluster.engines) >= 64:
                    for p in every:
                        p.seal()
                lines = yield from self._cluster_lines(cluster)
            fresh[name] = lines
            for p, part in zip(every, lines[1:]):
                p.parts.append(part)
            if clock.spent():
                for p in every:
                    p.seal()
                yield
        # Only clusters that still exist stay cached.
        self._lines = fresh
        body = [*head, _ENGINE_COUNT_HEAD, *counts.pieces()]
        for series_head, pieces in zip(_SERIES_HEADS, series):
            body += [series_head, *pieces.pieces()]
        return Pieces(body, _METRICS_CONTENT_TYPE)

    def _cluster_lines(self, cluster):
        """(version, engine count line, then the lines of each of
        ``_ENGINE_SERIES``) of one cluster; a big cluster's over several
        steps, from a copy of its engine list (cached only if it did not
        change meanwhile)."""
        version = cluster.version
        name = _label_value(cluster.name)
        lines = [[] for _ in _ENGINE_SERIES]
        engines = list(cluster.engines.values())
        for engine in engines:
            labels = f'{{engine_ip="{_label_value(engine.ip)}",model_name="{name}"}} '
            for out, (series, _, attribute) in zip(lines, _ENGINE_SERIES):
                out.append(f"{series}{labels}{floatToGoString(getattr(engine, attribute))}\n")
            if self.clock.spent():
                # Joined as it goes (see _Pieces): no long join at the end.
                lines = [["".join(out)] for out in lines]
                yield
        return (version if cluster.version == version else -1,
                f'model_engine_count{{model_name="{name}"}} {floatToGoString(len(engines))}\n'.encode("utf-8"),
                *("".join(out).encode("utf-8") for out in lines))


class DigestRender(Render):
    """``GET /v1/replica/digest``'s data, ``{"time": ns, "clusters": {name:
    [live, "16 hex digits"]}}`` (compact JSON, clusters in the state's
    order), built in slices of ``budget`` seconds like the bodies of
    ``api.views``: at 20,000 clusters the dict of lists built in one go took
    tens of milliseconds and left 20,000 GC-tracked lists behind. Each
    cluster is read whole within a step; one removed meanwhile is left out.
    Polls arriving during a build share it."""

    def __init__(self, node, cooperate, budget=TURN_BUDGET):
        super().__init__(cooperate, budget)
        self._node = node

    def steps(self):
        clock = self.clock
        state = self._node.state
        now_ns = int(self._node.clock.seconds() * 1e9)
        clusters = state.clusters
        pieces = _Pieces(b",")
        parts = pieces.parts
        for name in list(clusters):
            cluster = clusters.get(name)
            if cluster is None:
                continue
            # encode_basestring: the encoder's own text for a str (ensure_ascii off).
            parts.append(b'%s:[%d,"%016x"]' % (encode_basestring(name).encode("utf-8"), cluster.live,
                                                cluster.digest))
            if clock.spent():
                pieces.seal()
                yield
                parts = pieces.parts
        # Never joined whole: written piece by piece (``endpoint.Pieces``).
        return Pieces(pieces.items(b'{"time":%d,"clusters":{' % now_ns, b"}}"))


class Views:
    """The renders of one node (``api.server.MetacenterAPI`` holds one)."""

    def __init__(self, node, metrics, bodies, budget=TURN_BUDGET):
        cooperate = node.cooperate
        self.overview = OverviewRender(node, bodies, cooperate, budget)
        self.status = StatusRender(node, cooperate, budget)
        self.metrics = MetricsRender(node, metrics.registry, cooperate, budget)
        self.digest = DigestRender(node, cooperate, budget)

