"""Prometheus metrics: the reference's series under their exact names, plus
``metacenter_`` ones.

Per-engine gauges are not updated on the hot path: they are read from the
state at scrape time (``metacenter.api.views.MetricsRender``, in slices of
bounded reactor time, after this registry), so a mutation costs no label
lookup and the series of an expired engine or cluster simply stop existing.
Everything in the registry itself has a bounded number of series. Each node
has its own ``CollectorRegistry`` (several nodes can live in one test
process).
"""

import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from metacenter import __version__

# The reference exposes no *_created series; dashboards don't want them.
disable_created_metrics()

# Young collections take ~10-100 µs; a full one over a big unfrozen state tens of ms.
GC_PAUSE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
HTTP_DURATION_BUCKETS_US = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000)
REPLICATION_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# Fine around the 5 ms a reactor pause may last, coarse beyond.
REACTOR_LAG_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                         2.5, 5.0, 10.0)


class LoadCollector:
    """The load table's sizes, read from the state when scraped. The
    per-cluster and per-engine series (``model_engine_count``, ``queued_num``,
    ``prompt_length``) are not here: ``metacenter.api.views`` renders them
    over several reactor turns, since they grow with the state."""

    def __init__(self, state):
        self._state = state

    def collect(self):
        state = self._state
        for name, help_text, value in (
            ("metacenter_inflight_requests", "Requests recorded and not yet deleted or expired.", state.request_count),
            ("metacenter_tombstones", "Remembered deletes (and early prompt deletes).", state.tombstone_count),
            ("metacenter_engines", "Engines in the load table.", state.engine_count),
            ("metacenter_clusters", "Clusters in the load table.", len(state.clusters)),
        ):
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], value)
            yield g
        yield GaugeMetricFamily("metacenter_leases", "Gateway leases alive.", value=state.lease_count)
        stats = state.stats
        for name, help_text, key in (
            ("metacenter_lease_expiries", "Gateway leases that went a TTL without a keepalive.", "expired_leases"),
            ("metacenter_lease_revokes", "Gateway leases revoked by DELETE /v1/load/lease.", "revoked_leases"),
            ("metacenter_engine_resets", "Engine resets applied (DELETE /v1/load/engine, or a peer's).",
             "reset_engines"),
            ("metacenter_refreshed_requests", "Requests whose expiry clock a refresh restarted.",
             "refreshed_requests"),
        ):
            yield CounterMetricFamily(name, help_text, value=stats[key])
        released = CounterMetricFamily("metacenter_released_requests",
                                       "In-flight requests released at once, by cause: the end of their gateway's "
                                       "lease, or the reset of their engine.", labels=["reason"])
        released.add_metric(["lease"], stats["lease_released_requests"])
        released.add_metric(["reset"], stats["reset_requests"])
        yield released


class ValueGauge:
    """A gauge whose value is read from ``read()`` when scraped."""

    def __init__(self, name, documentation, read):
        self.name = name
        self.documentation = documentation
        self.read = read

    def collect(self):
        yield GaugeMetricFamily(self.name, self.documentation, value=self.read())


class CacheCollector:
    """KV-cache index series, read from the index when scraped."""

    def __init__(self, index):
        self._index = index

    def collect(self):
        index = self._index
        blocks = GaugeMetricFamily("metacenter_cache_blocks", "Stored (engine, block) pairs per cluster.",
                                   labels=["cluster"])
        for name, count in index.blocks_by_cluster().items():
            blocks.add_metric([name], count)
        yield blocks
        distinct = GaugeMetricFamily("metacenter_cache_distinct_blocks",
                                     "Distinct prompt blocks held by any engine, per cluster.", labels=["cluster"])
        for name, count in index.distinct_blocks_by_cluster().items():
            distinct.add_metric([name], count)
        yield distinct
        engines = GaugeMetricFamily("metacenter_cache_engines", "Engines with cached blocks, per cluster.",
                                    labels=["cluster"])
        for name, count in index.engines_by_cluster().items():
            engines.add_metric([name], count)
        yield engines
        evictions = CounterMetricFamily("metacenter_cache_evictions", "Blocks evicted, by reason.", labels=["reason"])
        for reason, count in index.evictions.items():
            evictions.add_metric([reason], count)
        yield evictions
        queries = index.queries
        yield CounterMetricFamily("metacenter_cache_queries", "Cache queries answered.", value=queries)
        yield CounterMetricFamily("metacenter_cache_queries_with_location",
                                  "Cache queries that found at least one engine.", value=index.queries_with_location)
        yield GaugeMetricFamily("metacenter_cache_hit_ratio", "Queries with any location / all queries.",
                                value=index.queries_with_location / queries if queries else 0.0)
        yield GaugeMetricFamily("metacenter_cache_matched_fraction_mean",
                                "Mean over queries of the best match length / prompt blocks.",
                                value=index.matched_fraction_sum / queries if queries else 0.0)
        yield GaugeMetricFamily("metacenter_cache_memory_bytes", "Estimated memory held by the index.",
                                value=index.approx_bytes())


# The label values of metacenter_limit_refusals_total: a fixed set.
LENGTH_LIMIT_NAMES = ("request_id_length", "cluster_length", "ip_length", "lease_length", "url_length")
COUNT_LIMIT_NAMES = ("clusters", "engines_per_cluster", "engines", "requests", "leases")
LIMIT_NAMES = LENGTH_LIMIT_NAMES + COUNT_LIMIT_NAMES


class CountsFamily:
    """A counter family kept as plain ints and exposed when scraped.

    prometheus-client's children take a lock and a few calls per increment;
    everything here runs on the reactor thread, so a dict of ints does, at a
    fraction of the cost, on paths taken for every request and every
    replicated event."""

    def __init__(self, name, documentation, labelnames):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.values = {}  # label values tuple -> count

    def inc(self, labels, amount=1):
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        yield family


class HistogramFamily:
    """A histogram family kept as plain lists, exposed when scraped (see
    ``CountsFamily`` for why)."""

    def __init__(self, name, documentation, labelnames, buckets):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = tuple(float(b) for b in buckets)
        self._labels = tuple(floatToGoString(b) for b in self.bounds) + ("+Inf",)
        self.series = {}  # label values tuple -> [per-bucket counts (last: above all bounds), sum]
        if not labelnames:  # an unlabelled histogram is exposed from the start, as prometheus-client does
            self.series[()] = [[0] * (len(self.bounds) + 1), 0.0]

    def observe(self, labels, value):
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [[0] * (len(self.bounds) + 1), 0.0]
        # Bucket "le" counts values <= its bound: the first bound >= value.
        series[0][bisect_left(self.bounds, value)] += 1
        series[1] += value

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (counts, total) in list(self.series.items()):
            cumulative, running = [], 0
            for le, count in zip(self._labels, counts):
                running += count
                cumulative.append((le, running))
            family.add_metric(labels, cumulative, total)
        yield family


STREAM_LAG_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
                        0.5, 1, 2.5, 5, 10, 30)


class StreamCollector:
    """The replication stream's series, read at scrape time from the plain
    counters of the sender's links (per peer), the receiver and the log."""

    _PEER_COUNTERS = (
        ("frames_sent", "metacenter_stream_frames_sent", "Frames sent to a peer."),
        ("events_sent", "metacenter_stream_events_sent", "Events sent to a peer (in frames)."),
        ("bytes_sent", "metacenter_stream_sent_bytes", "Bytes sent to a peer on its stream."),
        ("reconnects", "metacenter_stream_reconnects", "Stream connections to a peer after its first."),
        ("resumes", "metacenter_stream_resumes", "Reconnections that resumed at the peer's acknowledged offset."),
        ("fresh_starts", "metacenter_stream_fresh_starts",
         "Connections to a peer that did not know this log (it or this node restarted)."),
        ("repairs", "metacenter_stream_repairs",
         "Times a peer fell behind the log: entries it lacked were gone, anti-entropy repairs it."),
        ("rejected", "metacenter_stream_rejected_events", "Events a peer refused as invalid."),
    )
    _RECEIVER_COUNTERS = (
        ("frames", "metacenter_stream_received_frames", "Frames received from peers."),
        ("events", "metacenter_stream_received_events", "Valid events received from peers (applied)."),
        ("rejected", "metacenter_stream_received_rejected_events", "Events from peers refused as invalid."),
        ("bytes", "metacenter_stream_received_bytes", "Bytes received on replication streams."),
        ("gaps", "metacenter_stream_received_gaps", "Gaps announced by senders (this node needed a repair)."),
        ("skipped", "metacenter_stream_received_skipped_events", "Events lost in announced gaps."),
        ("handshake_failures", "metacenter_stream_handshake_failures",
         "Incoming stream connections refused during the handshake (bad secret, replay, protocol)."),
        ("apply_errors", "metacenter_stream_apply_errors", "Frames whose application failed (a bug)."),
    )

    def __init__(self, streams, replicator):
        self.streams = streams
        self.replicator = replicator

    def collect(self):
        sender, receiver, log = self.streams.sender, self.streams.receiver, self.streams.log
        links = list(sender.links.values())
        gauges = (
            (GaugeMetricFamily("metacenter_stream_lag_events", "Events appended and not yet acknowledged by a peer.",
                               labels=["peer"]), lambda link: link.lag_events()),
            (GaugeMetricFamily("metacenter_stream_lag_seconds",
                               "Age of the oldest event a peer has not acknowledged (0 when none).",
                               labels=["peer"]), lambda link: link.lag_seconds()),
            (GaugeMetricFamily("metacenter_stream_window_frames", "Frames sent to a peer and not yet acknowledged.",
                               labels=["peer"]), lambda link: link.window_in_use()),
            (GaugeMetricFamily("metacenter_stream_connected", "1 while the stream to a peer is established.",
                               labels=["peer"]), lambda link: 1 if link.connected else 0),
        )
        for family, read in gauges:
            for link in links:
                family.add_metric([link.name], read(link))
            yield family
        for attribute, name, help_text in self._PEER_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["peer"])
            for link in links:
                family.add_metric([link.name], getattr(link, attribute))
            yield family
        if receiver is not None:
            for attribute, name, help_text in self._RECEIVER_COUNTERS:
                yield CounterMetricFamily(name, help_text, value=getattr(receiver, attribute))
            yield GaugeMetricFamily("metacenter_stream_incoming", "Peers streaming to this node now.",
                                    value=len(receiver.streams))
        yield GaugeMetricFamily("metacenter_stream_log_entries", "Entries held in the replication log.",
                                value=len(log))
        yield GaugeMetricFamily("metacenter_stream_log_bytes", "Encoded bytes held in the replication log.",
                                value=log.bytes)
        yield CounterMetricFamily("metacenter_stream_log_evicted", "Entries dropped off the log's tail.",
                                  value=log.evicted)
        yield CounterMetricFamily("metacenter_stream_http_fallbacks",
                                  "Times a streaming peer went back to HTTP replication (no stream any more).",
                                  value=self.replicator.fallbacks)


class Metrics:
    """All series of one node."""

    def __init__(self, state, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(LoadCollector(state))

        # Observed on every request or replicated event: plain-int families.
        self.http_status = CountsFamily("http_request_status_code", "HTTP responses by route, method and status.",
                                        ["url", "method", "status_code"])
        self.http_duration = HistogramFamily("http_request_duration_us",
                                             "HTTP request handling time in microseconds.",
                                             ["method", "url"], HTTP_DURATION_BUCKETS_US)
        self.replication_latency = HistogramFamily(
            "replication_latency_ms", "Now minus the event's timestamp, for events that carry one (ms).",
            [], REPLICATION_LATENCY_BUCKETS_MS)
        self.events = CountsFamily("metacenter_load_events", "Load events applied, by type, origin and effect.",
                                   ["event", "origin", "effect"])
        # The reactor's lateness (runtime.reactorlag) and the HTTP server's
        # connections (api.site): plain values too, updated on the reactor.
        self.reactor_lag = HistogramFamily(
            "metacenter_reactor_lag_seconds",
            "How late the reactor ran a timer due at a known time: how long it was busy with something else.",
            [], REACTOR_LAG_BUCKETS_S)
        self.http_connections_open = 0
        self.http_connections = ValueGauge("metacenter_http_connections", "Open HTTP connections (clients).",
                                           lambda: self.http_connections_open)
        self.http_refused = CountsFamily("metacenter_http_connections_refused",
                                         "HTTP connections refused at once: --max-connections were open.", [])
        self.http_refused.inc((), 0)
        self.http_dropped = CountsFamily(
            "metacenter_http_connections_dropped",
            "HTTP connections closed by the node, by reason: slow_request (a request's headers and body took longer "
            "than --request-deadline), idle (no request for --idle-timeout).", ["reason"])
        for reason in ("slow_request", "idle"):
            self.http_dropped.inc((reason,), 0)
        # Bounds (core.fields lengths, core.limits counts); label values are
        # the fixed limit names, so the series are few.
        self.limit_refusals = CountsFamily(
            "metacenter_limit_refusals",
            "Client requests refused by a bound, by limit: a field too long (request_id_length, cluster_length, "
            "ip_length, lease_length; also in replicated events and snapshots), a request line too long (url_length) "
            "or a count reached (clusters, "
            "engines_per_cluster, engines, requests, leases).", ["limit"])
        for limit in LIMIT_NAMES:
            self.limit_refusals.inc((limit,), 0)
        self.limit_overruns = CountsFamily(
            "metacenter_limit_overruns",
            "Peers' events applied although they took a count over this node's limit (peers are never refused, "
            "so replicas agree), by limit.", ["limit"])
        for limit in COUNT_LIMIT_NAMES:
            self.limit_overruns.inc((limit,), 0)
        # The collector's pauses and freezes (runtime.gcpolicy).
        self.gc_pause = HistogramFamily(
            "metacenter_gc_pause_seconds",
            "Duration of each collection of the cyclic garbage collector, by the oldest generation it walked "
            "(2: a full collection).", ["generation"], GC_PAUSE_BUCKETS_S)
        for generation in ("0", "1", "2"):
            self.gc_pause.series[(generation,)] = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1), 0.0]
        self.gc_freezes = CountsFamily(
            "metacenter_gc_freezes",
            "Times the long-lived objects were frozen out of the collector's walks (at start, after the warm "
            "start, every --gc-freeze-interval).", [])
        self.gc_freezes.inc((), 0)
        for family in (self.http_status, self.http_duration, self.replication_latency, self.events, self.reactor_lag,
                       self.http_connections, self.http_refused, self.http_dropped, self.limit_refusals,
                       self.limit_overruns, self.gc_pause, self.gc_freezes):
            r.register(family)

        Gauge("metacenter_node_alive", "1 while the node runs.", registry=r).set(1)
        Gauge("app_version_info", "The running version.", ["version"], registry=r).labels(__version__).set(1)
        self.node_start_time = Gauge("metacenter_node_start_time_seconds", "When the node started (unix time).",
                                     registry=r)
        self.node_start_time.set(time.time())
        self.gc_sweep_seconds = Histogram(
            "metacenter_gc_sweep_duration_seconds", "Wall time of one expiry sweep (all its chunks).",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10), registry=r)
        self.expired = Counter("metacenter_expired", "Entries removed by expiry.", ["kind"], registry=r)
        self._status_labels = {}

    def stream_metrics(self, streams, replicator):
        """Registers the replication stream's series (``StreamCollector``)
        and returns two histograms: the per-peer acknowledgement lag
        (``metacenter_stream_ack_lag_seconds``: per acknowledgement, the
        age of the oldest event it acknowledged; it includes the peer's
        acknowledgement delay), to observe ``((peer,), seconds)``, and the
        apply lag (``metacenter_stream_apply_lag_seconds``: per frame
        applied here, the seconds from its oldest event's append on the
        sender to its application; the two hosts' clock skew is included,
        negative values count as 0), to observe ``((), seconds)``."""
        self.registry.register(StreamCollector(streams, replicator))
        lag = HistogramFamily("metacenter_stream_ack_lag_seconds",
                              "Per stream acknowledgement, the age of the oldest event it acknowledged (includes "
                              "the peer's acknowledgement delay).", ["peer"], STREAM_LAG_BUCKETS_S)
        apply_lag = HistogramFamily(
            "metacenter_stream_apply_lag_seconds",
            "Per replication frame applied by this node, seconds from its oldest event's append on the sending node "
            "to its application here (wall clocks of two hosts: their skew is included; negative counts as 0).",
            [], STREAM_LAG_BUCKETS_S)
        self.registry.register(lag)
        self.registry.register(apply_lag)
        return lag, apply_lag

    def observe_http(self, url, method, status, seconds):
        key = (url, method, status)
        labels = self._status_labels.get(key)
        if labels is None:
            labels = self._status_labels[key] = ((url, method, str(status)), (method, url))
        self.http_status.inc(labels[0])
        self.http_duration.observe(labels[1], seconds * 1e6)

    def observe_event(self, event_type, origin, changed):
        self.events.inc((event_type, origin, "applied" if changed else "no_change"))

    def observe_event_timestamp(self, timestamp_ns, now):
        """replication_latency_ms as the reference defines it; clock skew can
        make it negative, and those are dropped."""
        if timestamp_ns is None:
            return
        latency_ms = (now * 1e9 - timestamp_ns) / 1e6
        if latency_ms >= 0:
            self.replication_latency.observe((), latency_ms)
