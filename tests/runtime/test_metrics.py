"""The plain-int metric families expose what prometheus-client would."""

from prometheus_client import CollectorRegistry

from metacenter.runtime.metrics import CountsFamily, HistogramFamily


def test_histogram_buckets_are_cumulative_and_inclusive():
    registry = CollectorRegistry()
    histogram = HistogramFamily("latency_us", "test", ["url"], (50, 100))
    registry.register(histogram)
    for value in (10, 50, 51, 100, 5000):
        histogram.observe(("/a",), value)
    sample = lambda name, **labels: registry.get_sample_value(name, {"url": "/a", **labels})  # noqa: E731
    assert sample("latency_us_bucket", le="50.0") == 2  # a value on a bound counts in it
    assert sample("latency_us_bucket", le="100.0") == 4
    assert sample("latency_us_bucket", le="+Inf") == 5
    assert sample("latency_us_count") == 5
    assert sample("latency_us_sum") == 10 + 50 + 51 + 100 + 5000


def test_unlabelled_histogram_is_exposed_before_any_observation():
    registry = CollectorRegistry()
    registry.register(HistogramFamily("lag_ms", "test", [], (1, 2)))
    assert registry.get_sample_value("lag_ms_count") == 0
    assert registry.get_sample_value("lag_ms_bucket", {"le": "+Inf"}) == 0


def test_counts_family_is_a_counter():
    registry = CollectorRegistry()
    counts = CountsFamily("events", "test", ["kind"])
    registry.register(counts)
    counts.inc(("a",))
    counts.inc(("a",), 2)
    counts.inc(("b",))
    assert registry.get_sample_value("events_total", {"kind": "a"}) == 3
    assert registry.get_sample_value("events_total", {"kind": "b"}) == 1


def test_node_series_for_the_reactor_and_connections_exist_from_the_start():
    from twisted.internet.task import Clock

    from metacenter.core.load import LoadState
    from metacenter.runtime.metrics import Metrics

    metrics = Metrics(LoadState(Clock()))
    sample = metrics.registry.get_sample_value
    assert sample("metacenter_reactor_lag_seconds_count") == 0
    assert sample("metacenter_http_connections") == 0
    assert sample("metacenter_http_connections_refused_total") == 0
    assert sample("metacenter_http_connections_dropped_total", {"reason": "slow_request"}) == 0
    metrics.reactor_lag.observe((), 0.004)
    metrics.http_connections_open = 3
    assert sample("metacenter_reactor_lag_seconds_bucket", {"le": "0.003"}) == 0
    assert sample("metacenter_reactor_lag_seconds_bucket", {"le": "0.005"}) == 1
    assert sample("metacenter_http_connections") == 3


def test_the_registry_holds_no_series_per_cluster_or_engine():
    """Those grow with the state: api/views.py renders them in slices."""
    from twisted.internet.task import Clock

    from metacenter.core.load import LoadState
    from metacenter.runtime.metrics import Metrics

    state = LoadState(Clock())
    metrics = Metrics(state)
    for i in range(50):
        state.add(f"m{i}", f"r{i}", "10.0.0.1")
    names = {s.name for family in metrics.registry.collect() for s in family.samples}
    assert not names & {"queued_num", "prompt_length", "model_engine_count"}
    assert metrics.registry.get_sample_value("metacenter_clusters") == 50
