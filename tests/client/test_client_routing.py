"""The pure node choice both clients share: FNV-32a, the ring, the breaker
(on a task.Clock), the request -> node map."""

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from metacenter.client import fnv32a
from metacenter.client.routing import CLOSED, HALF_OPEN, OPEN, Breaker, Router, parse_node
from nodeproc import REPO


def reference_fnv32a(data: bytes) -> int:
    """FNV-1a 32-bit, written from the spec: offset basis 2166136261, prime
    16777619, for each byte xor then multiply, modulo 2**32."""
    h = 2166136261
    for b in data:
        h ^= b
        h = (h * 16777619) % 2**32
    return h


def test_fnv32a_known_answers():
    # The FNV authors' test vectors for FNV-1a 32.
    assert fnv32a("") == 0x811C9DC5
    assert fnv32a("a") == 0xE40C292C
    assert fnv32a("foobar") == 0xBF9CF968


@given(st.text())
def test_fnv32a_matches_the_reference_on_utf8(text):
    assert fnv32a(text) == reference_fnv32a(text.encode("utf-8"))


@pytest.mark.parametrize("text, url, key", [
    ("http://127.0.0.2:8080", "http://127.0.0.2:8080", "127.0.0.2:8080"),
    ("127.0.0.2:8080", "http://127.0.0.2:8080", "127.0.0.2:8080"),
    ("  10.0.0.5:80 ", "http://10.0.0.5:80", "10.0.0.5:80"),
    ("[::1]:8080", "http://[::1]:8080", "[::1]:8080"),
    ("http://[0:0::1]:9", "http://[::1]:9", "[::1]:9"),
    ("https://metacenter.example:443/", "https://metacenter.example:443", "metacenter.example:443"),
    ("metacenter-0", "http://metacenter-0:80", "metacenter-0:80"),
])
def test_node_spellings(text, url, key):
    node = parse_node(text)
    assert (node.url, node.key) == (url, key)


@pytest.mark.parametrize("text, says", [
    ("", "non-empty"),
    (None, "non-empty"),
    ("ftp://10.0.0.5:21", "scheme"),
    ("10.0.0.5:99999", "port"),
    ("10.0.0.5:http", "port"),
    ("http://10.0.0.5:80/v1", "only scheme, host and port"),
    ("http://:80", "no host"),
])
def test_bad_node_spellings_are_refused_naming_the_problem(text, says):
    with pytest.raises(ValueError, match=says):
        parse_node(text)


def make_router(count=3, **kwargs):
    clock = Clock()
    router = Router(clock, **kwargs)
    router.set_nodes([parse_node(f"10.0.0.{i}:8080") for i in range(count, 0, -1)])
    return router, clock


def test_ring_order_starts_at_the_cluster_hash_over_sorted_nodes():
    router, _ = make_router(3)
    keys = sorted(f"10.0.0.{i}:8080" for i in (1, 2, 3))
    for cluster in ["llama3-70b", "mistral-7b", "", "qwen", "日本語"]:
        start = reference_fnv32a(cluster.encode()) % 3
        assert [n.key for n in router.order(cluster)] == keys[start:] + keys[:start]


def test_an_open_breaker_takes_its_node_out_of_the_ring():
    router, clock = make_router(3, failure_threshold=2, cooldown=5)
    cluster = "llama3-70b"
    owner = router.order(cluster)[0]
    for _ in range(2):
        router.record(owner, router.acquire(owner), False)
    assert router.breaker(owner).state == OPEN
    healthy = sorted(n.key for n in router.nodes if n is not owner)
    start = reference_fnv32a(cluster.encode()) % 2
    assert [n.key for n in router.order(cluster)] == healthy[start:] + healthy[:start]
    clock.advance(5)  # cooled down: back in the ring, for one trial
    assert router.order(cluster)[0] is owner


def test_breaker_opens_after_n_consecutive_failures_and_a_success_resets_the_count():
    clock = Clock()
    breaker = Breaker(clock, threshold=3, cooldown=10)
    for _ in range(2):
        assert breaker.record(breaker.acquire(), False) is None
    breaker.record(breaker.acquire(), True)
    for _ in range(2):
        breaker.record(breaker.acquire(), False)
    assert breaker.state == CLOSED
    assert breaker.record(breaker.acquire(), False) == OPEN
    assert breaker.acquire() is None and not breaker.available()


def test_half_open_lets_one_trial_through_and_its_answer_decides():
    clock = Clock()
    breaker = Breaker(clock, threshold=1, cooldown=10)
    breaker.record(breaker.acquire(), False)
    clock.advance(9.999)
    assert breaker.acquire() is None
    clock.advance(0.001)
    trial = breaker.acquire()
    assert trial is not None and breaker.state == HALF_OPEN
    assert breaker.acquire() is None  # one trial at a time
    assert breaker.record(trial, False) == OPEN  # failed: open for another cooldown
    clock.advance(5)
    assert breaker.acquire() is None
    clock.advance(5)
    trial = breaker.acquire()
    assert breaker.record(trial, True) == CLOSED
    assert breaker.acquire() is not None


def test_late_answers_from_before_a_state_change_count_for_nothing():
    clock = Clock()
    breaker = Breaker(clock, threshold=2, cooldown=1)
    early = [breaker.acquire() for _ in range(3)]  # three requests in flight
    breaker.record(early[0], False)
    breaker.record(early[1], False)
    assert breaker.state == OPEN
    breaker.record(early[2], True)  # answered after the breaker opened
    assert breaker.state == OPEN
    clock.advance(1)
    trial = breaker.acquire()
    breaker.record(early[2], False)  # not the trial's answer
    assert breaker.state == HALF_OPEN
    breaker.record(trial, True)
    assert breaker.state == CLOSED


@pytest.mark.parametrize("kwargs", [{"failure_threshold": 0}, {"cooldown": -1}, {"tracked_requests": -1}])
def test_bad_breaker_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Router(Clock(), **kwargs)


def test_a_request_follows_its_add_and_the_map_is_bounded():
    router, _ = make_router(3, tracked_requests=2)
    nodes = list(router.nodes)
    # Every node differs from where "" (a delete without cluster) would go.
    target = [n for n in nodes if n is not router.order("")[0]][0]
    router.placed("r1", target, "c1")
    assert router.order("", "r1")[0] is target
    assert len(router.order("", "r1")) == 3
    router.placed("r2", target, "c1")
    router.placed("r3", target, "c1")  # r1, the oldest, is dropped
    assert router.tracked == 2 and router.placement("r1") is None
    router.forget("r2")
    assert router.placement("r2") is None and router.placement("r3") == target.key


def test_a_request_whose_node_is_down_follows_its_cluster():
    router, _ = make_router(3, failure_threshold=1)
    cluster = "c-follow"
    owner = router.order(cluster)[0]
    router.placed("r1", owner, cluster)
    router.record(owner, router.acquire(owner), False)
    assert router.order("", "r1") == router.order(cluster)
    assert owner not in router.order("", "r1")


def test_a_node_that_stays_keeps_its_breaker_and_a_new_list_is_sorted():
    router, _ = make_router(3, failure_threshold=1)
    node = router.nodes[0]
    router.record(node, router.acquire(node), False)
    router.set_nodes([parse_node("10.0.0.9:8080"), parse_node(node.url), parse_node("10.0.0.9:8080")])
    assert [n.key for n in router.nodes] == [node.key, "10.0.0.9:8080"]
    assert router.states() == {node.key: OPEN, "10.0.0.9:8080": CLOSED}


def test_the_client_package_imports_nothing_of_the_node():
    code = ("import sys, metacenter.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['metacenter','api'],['metacenter','cluster'],['metacenter','runtime'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": REPO}).stdout
    assert out.strip() == "[]"


def test_an_abandoned_trial_lets_the_next_request_try():
    clock = Clock()
    breaker = Breaker(clock, threshold=1, cooldown=10)
    breaker.record(breaker.acquire(), False)
    clock.advance(10)
    trial = breaker.acquire()
    breaker.release(trial)  # cancelled by the caller, no answer
    assert breaker.state == OPEN and breaker.available()
    breaker.record(trial, True)  # a late answer to the abandoned trial counts for nothing
    assert breaker.state == OPEN
    assert breaker.record(breaker.acquire(), True) == CLOSED
    breaker.release(breaker.acquire())  # closed: nothing to give back
    assert breaker.state == CLOSED
