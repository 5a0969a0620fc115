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
