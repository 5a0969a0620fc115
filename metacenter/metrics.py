"""Prometheus metrics: the reference's series under their exact names, plus
``metacenter_`` ones.

Per-engine gauges are not updated on the hot path: ``LoadCollector`` reads the
state at scrape time, so a mutation costs no label lookup and the series of an
expired engine or cluster simply stop existing. Each node has its own
``CollectorRegistry`` (several nodes can live in one test process).
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from metacenter import __version__

# The reference exposes no *_created series; dashboards don't want them.
disable_created_metrics()

HTTP_DURATION_BUCKETS_US = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000)
REPLICATION_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class LoadCollector:
    """Engine and cluster series, read from the state when scraped."""

    def __init__(self, state):
        self._state = state

    def collect(self):
        engines_per_cluster = GaugeMetricFamily("model_engine_count", "Engines per cluster (model).",
                                                labels=["model_name"])
        queued = GaugeMetricFamily("queued_num", "Requests in flight on an engine.",
                                   labels=["model_name", "engine_ip"])
        prompt = GaugeMetricFamily("prompt_length", "Prompt bytes still in prefill on an engine.",
                                   labels=["model_name", "engine_ip"])
        for name, cluster in list(self._state.clusters.items()):
            engines_per_cluster.add_metric([name], len(cluster.engines))
            for ip, engine in list(cluster.engines.items()):
                queued.add_metric([name, ip], engine.queued)
                prompt.add_metric([name, ip], engine.prompt)
        yield engines_per_cluster
        yield queued
        yield prompt
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


class Metrics:
    """All series of one node."""

    def __init__(self, state, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(LoadCollector(state))

        self.http_status = Counter("http_request_status_code", "HTTP responses by route, method and status.",
                                   ["url", "method", "status_code"], registry=r)
        self.http_duration = Histogram("http_request_duration_us", "HTTP request handling time in microseconds.",
                                       ["method", "url"], buckets=HTTP_DURATION_BUCKETS_US, registry=r)
        self.replication_latency = Histogram(
            "replication_latency_ms", "Now minus the event's timestamp, for events that carry one (ms).",
            buckets=REPLICATION_LATENCY_BUCKETS_MS, registry=r)
        Gauge("metacenter_node_alive", "1 while the node runs.", registry=r).set(1)
        Gauge("app_version_info", "The running version.", ["version"], registry=r).labels(__version__).set(1)
        self.node_start_time = Gauge("metacenter_node_start_time_seconds", "When the node started (unix time).",
                                     registry=r)
        self.node_start_time.set(time.time())
        self.gc_sweep_seconds = Histogram(
            "metacenter_gc_sweep_duration_seconds", "Wall time of one expiry sweep (all its chunks).",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10), registry=r)
        self.expired = Counter("metacenter_expired", "Entries removed by expiry.", ["kind"], registry=r)
        self.events = Counter("metacenter_load_events", "Load events applied, by type, origin and effect.",
                              ["event", "origin", "effect"], registry=r)
        self._http_children = {}
        self._event_children = {}

    def observe_http(self, url, method, status, seconds):
        """Hot path: label children are looked up once per (url, method, status)."""
        key = (url, method, status)
        children = self._http_children.get(key)
        if children is None:
            children = self._http_children[key] = (
                self.http_status.labels(url, method, str(status)),
                self.http_duration.labels(method, url),
            )
        children[0].inc()
        children[1].observe(seconds * 1e6)

    def observe_event(self, event_type, origin, changed):
        key = (event_type, origin, changed)
        child = self._event_children.get(key)
        if child is None:
            child = self._event_children[key] = self.events.labels(
                event_type, origin, "applied" if changed else "no_change")
        child.inc()

    def observe_event_timestamp(self, timestamp_ns, now):
        """replication_latency_ms as the reference defines it; clock skew can
        make it negative, and those are dropped."""
        if timestamp_ns is None:
            return
        latency_ms = (now * 1e9 - timestamp_ns) / 1e6
        if latency_ms >= 0:
            self.replication_latency.observe(latency_ms)
