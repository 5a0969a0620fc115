"""Every method of both clients against real nodes: the happy path and one
refusal each. The blocking Client runs in a thread, the AsyncClient in the
reactor; both get the same scenarios.

Methods without input (overview, cache_stats, leases) have nothing a node
could refuse. Methods that ask one node (status, ready, set_log_level,
metrics, openapi) are also refused by an address where no node listens.

The issue-10 routes (pick, leases, reset, refresh, conditional add) too.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from conftest import TIMEOUT
from metacenter.client import AsyncClient, Client, MetacenterError, NodeUnavailable, prompt_hashes
from nodeproc import free_port

PROMPT = bytes((7 * i) % 256 for i in range(1200))
HASHES = [4269816323887316428, 4738464904102037223, 8673195530823563900]  # the gateway's known answer (docs/cache.md)


class Api:
    """``await api.call("load", "c")`` for either client."""

    def __init__(self, kind, client, nodes):
        self.kind = kind
        self.client = client
        self.nodes = nodes

    def call(self, name, *args, **kwargs):
        method = getattr(self.client, name)
        if self.kind == "async":
            return method(*args, **kwargs)
        return threads.deferToThread(method, *args, **kwargs)

    def cluster(self, name):
        """A cluster name of this scenario and client kind."""
        return f"methods-{self.kind}-{name}"

    async def refused(self, status, field, name, *args, **kwargs):
        with pytest.raises(MetacenterError) as caught:
            await self.call(name, *args, **kwargs)
        error = caught.value
        assert not isinstance(error, NodeUnavailable)
        assert (error.status, error.code) == (status, 40001000 + status), error
        assert field in error.reason, error.reason
        assert error.trace_id
        return error


@pytest_twisted.async_yield_fixture(params=["blocking", "async"])
async def api(request, healthy):
    if request.param == "async":
        client = AsyncClient(healthy.urls, reactor, timeout=TIMEOUT)
    else:
        client = Client(healthy.urls, timeout=TIMEOUT)
    yield Api(request.param, client, healthy)
    if request.param == "async":
        await client.close()
    else:
        client.close()


def nowhere():
    return f"http://127.0.0.1:{free_port()}"


async def rows(api, cluster):
    return {r["ip"]: (r["queued_req_num"], r["prompt_length"]) for r in await api.call("load", cluster)}


# -- load ------------------------------------------------------------------------------


async def add_request_happy(api):
    c = api.cluster("add")
    assert await api.call("add_request", c, c + "-r1", "10.7.0.1", prompt_length=1200) is None
    assert await api.call("add_request", c, c + "-r1", "10.7.0.1", prompt_length=1200) is None  # a retry
    assert await rows(api, c) == {"10.7.0.1": (1, 1200)}


async def add_request_refused(api):
    c = api.cluster("add-refused")
    await api.refused(400, "ip", "add_request", c, c + "-r1", "not-an-ip", prompt_length=10)
    await api.refused(400, "prompt_length", "add_request", c, c + "-r1", "10.7.0.1", prompt_length=-1)
    assert await rows(api, c) == {}


async def delete_prompt_happy(api):
    c = api.cluster("prompt")
    await api.call("add_request", c, c + "-r1", "10.7.0.2", prompt_length=500)
    assert await api.call("delete_prompt", c + "-r1") is None
    assert await rows(api, c) == {"10.7.0.2": (1, 0)}


async def delete_prompt_refused(api):
    await api.refused(400, "request_id", "delete_prompt", "")


async def delete_request_happy(api):
    c = api.cluster("delete")
    await api.call("add_request", c, c + "-r1", "10.7.0.3", prompt_length=500)
    assert await api.call("delete_request", c + "-r1") is None
    assert await rows(api, c) == {"10.7.0.3": (0, 0)}
    assert api.client.placement(c + "-r1") is None


async def delete_request_refused(api):
    await api.refused(400, "request_id", "delete_request", 17)


async def load_happy(api):
    c = api.cluster("load ?&=/")  # characters a query string must escape
    assert await api.call("load", c) == []
    await api.call("add_request", c, c + "-r1", "10.7.0.4", prompt_length=3)
    [row] = await api.call("load", c)
    assert (row["ip"], row["queued_req_num"], row["prompt_length"]) == ("10.7.0.4", 1, 3)
    assert isinstance(row["updated_time"], int) and row["updated_time"] > 1.6e18


async def load_refused(api):
    await api.refused(400, "cluster", "load", "")


async def overview_happy(api):
    c = api.cluster("overview")
    await api.call("add_request", c, c + "-r1", "10.7.0.5")
    overview = await api.call("overview", api.client.node_for(c))  # the node that took the add
    assert isinstance(overview["time"], int)
    [entry] = [e for e in overview["clusters"] if e["cluster"] == c]
    assert [e["ip"] for e in entry["engines"]] == ["10.7.0.5"]


# -- cache and score ------------------------------------------------------------------


async def cache_save_happy(api):
    c = api.cluster("cache-save")
    assert prompt_hashes(PROMPT) == HASHES
    assert await api.call("cache_save", c, HASHES, "10.7.1.1") is None
    assert await api.call("cache_query", c, HASHES[:2]) == [{"ip": "10.7.1.1", "length": 2}]


async def cache_save_refused(api):
    await api.refused(400, "prompt_hash", "cache_save", api.cluster("cache-save-refused"), [], "10.7.1.1")


async def cache_query_happy(api):
    c = api.cluster("cache-query")
    await api.call("cache_save", c, HASHES, "10.7.1.2")
    await api.call("cache_save", c, HASHES[:1], "10.7.1.3")
    assert await api.call("cache_query", c, HASHES + [1, 2]) == [
        {"ip": "10.7.1.2", "length": 3}, {"ip": "10.7.1.3", "length": 1}]
    assert await api.call("cache_query", c, HASHES, topk=1) == [{"ip": "10.7.1.2", "length": 3}]


async def cache_query_refused(api):
    await api.refused(400, "topk", "cache_query", api.cluster("cache-query"), HASHES, topk=0)


async def cache_stats_happy(api):
    c = api.cluster("cache-stats")
    await api.call("cache_save", c, HASHES, "10.7.1.4")
    stats = await api.call("cache_stats", api.client.node_for(c))
    assert {"cluster": c, "blocks": 3, "engines": 1} in stats["clusters"]


async def route_score_happy(api):
    c = api.cluster("score")
    await api.call("cache_save", c, HASHES, "10.7.2.1")
    await api.call("add_request", c, c + "-r1", "10.7.2.2", prompt_length=2048)
    ranked = await api.call("route_score", c, HASHES)
    assert [r["ip"] for r in ranked] == ["10.7.2.1", "10.7.2.2"]
    assert ranked[0]["cache_length"] == 3 and ranked[0]["score"] > ranked[1]["score"]
    only = await api.call("route_score", c, HASHES, ips=["10.7.2.9"])
    assert [r["ip"] for r in only] == ["10.7.2.9"]


async def route_score_refused(api):
    await api.refused(400, "ips", "route_score", api.cluster("score"), HASHES, ips=["not-an-ip"])


# -- one node ----------------------------------------------------------------------------


async def status_happy(api):
    url = api.nodes.urls[1]
    status = await api.call("status", url)
    assert status["ready"] is True and isinstance(status["requests"], int)
    assert isinstance(await api.call("status"), dict)


async def one_node_refused(api, name, *args):
    with pytest.raises(NodeUnavailable) as caught:
        await api.call(name, *args, node=nowhere())
    assert len(caught.value.attempts) == 1 and caught.value.attempts[0][1] == "connection refused"


async def status_refused(api):
    await one_node_refused(api, "status")


async def ready_happy(api):
    assert await api.call("ready", api.nodes.urls[2]) is True


async def ready_refused(api):
    await one_node_refused(api, "ready")


async def set_log_level_happy(api):
    url = api.nodes.urls[0]
    assert await api.call("set_log_level", "INFO", url) == "log level updated successfully"


async def set_log_level_refused(api):
    error = await api.refused(400, "LevelParam", "set_log_level", "LOUD", api.nodes.urls[0])
    assert error.node == api.nodes.urls[0]


async def metrics_happy(api):
    text = await api.call("metrics", api.nodes.urls[0])
    assert "metacenter_node_alive 1.0" in text


async def metrics_refused(api):
    await one_node_refused(api, "metrics")


async def openapi_happy(api):
    document = await api.call("openapi", api.nodes.urls[0])
    assert "/v1/load/stats" in document["paths"]


async def openapi_refused(api):
    await one_node_refused(api, "openapi")


# -- issue 10: pick, leases, reset, refresh, conditional add -----------------------------


async def pick_happy(api):
    c = api.cluster("pick")
    picked = await api.call("pick", c, c + "-p1", prompt_length=100, ips=["10.7.3.1", "10.7.3.2"])
    assert picked["ip"] in ("10.7.3.1", "10.7.3.2")
    assert {"ip", "score", "cache_length", "queued_req_num"} <= set(picked)
    assert api.client.placement(c + "-p1") is not None
    again = await api.call("pick", c, c + "-p1", prompt_length=100, ips=["10.7.3.1", "10.7.3.2"])
    assert again["ip"] == picked["ip"]  # a retry books nothing
    assert await rows(api, c) == {picked["ip"]: (1, 100)}


async def pick_refused(api):
    c = api.cluster("pick-nothing")
    error = await api.refused(404, "ips", "pick", c, c + "-p1")
    assert error.code == 40001404


async def add_request_conflict(api):
    """The conditional add of issue 10: 409 with the engine's current row."""
    c = api.cluster("cas")
    await api.call("add_request", c, c + "-r1", "10.7.4.1", if_updated_time=0)
    [row] = await api.call("load", c)
    with pytest.raises(MetacenterError) as caught:
        await api.call("add_request", c, c + "-r2", "10.7.4.1", if_updated_time=row["updated_time"] - 1)
    assert (caught.value.status, caught.value.code) == (409, 40001409)
    assert caught.value.data["ip"] == "10.7.4.1" and caught.value.data["updated_time"] == row["updated_time"]
    await api.call("add_request", c, c + "-r2", "10.7.4.1", if_updated_time=row["updated_time"])
    assert (await rows(api, c))["10.7.4.1"][0] == 2


async def lease_keepalive_happy(api):
    lease = api.cluster("lease-keepalive")
    assert await api.call("lease_keepalive", lease, ttl_ms=5000) == {"lease": lease, "ttl_ms": 5000, "requests": 0}


async def lease_keepalive_refused(api):
    await api.refused(400, "ttl_ms", "lease_keepalive", api.cluster("lease-keepalive"), ttl_ms=10)


async def lease_revoke_happy(api):
    c, lease = api.cluster("lease-revoke"), api.cluster("gateway-pod-1")
    await api.call("add_request", c, c + "-r1", "10.7.5.1", prompt_length=10, lease=lease)
    assert (await rows(api, c))["10.7.5.1"] == (1, 10)
    await api.call("lease_revoke", lease)
    # The client sends lease calls by lease and loads by cluster: the revoke
    # may land on another node and reach the cluster's by replication.
    deadline = reactor.seconds() + TIMEOUT * 5
    while (await rows(api, c)).get("10.7.5.1", (0, 0)) != (0, 0):
        assert reactor.seconds() < deadline, await rows(api, c)
        await deferLater(reactor, 0.05, lambda: None)


async def lease_revoke_refused(api):
    await api.refused(400, "lease", "lease_revoke", "")


async def leases_happy(api):
    lease = api.cluster("leases")
    await api.call("lease_keepalive", lease, ttl_ms=60000)
    [entry] = [e for e in await api.call("leases") if e["lease"] == lease]
    assert entry["ttl_ms"] == 60000 and 0 < entry["expires_in_ms"] <= 60000 and entry["requests"] == 0


async def reset_engine_happy(api):
    c = api.cluster("reset")
    await api.call("add_request", c, c + "-r1", "10.7.6.1", prompt_length=10)
    await api.call("add_request", c, c + "-r2", "10.7.6.1", prompt_length=20)
    await api.call("cache_save", c, HASHES, "10.7.6.1")
    assert await api.call("reset_engine", c, "10.7.6.1") == {"released_requests": 2, "cache_blocks": 3}
    assert (await rows(api, c)).get("10.7.6.1", (0, 0)) == (0, 0)
    assert await api.call("reset_engine", c, "10.7.6.99") == {"released_requests": 0, "cache_blocks": 0}


async def reset_engine_refused(api):
    await api.refused(400, "ip", "reset_engine", api.cluster("reset"), "not-an-ip")


async def refresh_happy(api):
    c = api.cluster("refresh")
    await api.call("add_request", c, c + "-r1", "10.7.7.1")
    assert await api.call("refresh", [c + "-unknown", c + "-r1"]) == {"refreshed": 1}


async def refresh_refused(api):
    await api.refused(400, "request_ids", "refresh", [5])


SCENARIOS = {f.__name__: f for f in [
    add_request_happy, add_request_refused, delete_prompt_happy, delete_prompt_refused, delete_request_happy,
    delete_request_refused, load_happy, load_refused, overview_happy, cache_save_happy, cache_save_refused,
    cache_query_happy, cache_query_refused, cache_stats_happy, route_score_happy, route_score_refused,
    status_happy, status_refused, ready_happy, ready_refused, set_log_level_happy, set_log_level_refused,
    metrics_happy, metrics_refused, openapi_happy, openapi_refused, pick_happy, pick_refused,
    add_request_conflict, lease_keepalive_happy, lease_keepalive_refused, lease_revoke_happy,
    lease_revoke_refused, leases_happy, reset_engine_happy, reset_engine_refused, refresh_happy, refresh_refused,
]}


def test_every_public_method_has_a_scenario():
    public = {name for name in dir(Client) if not name.startswith("_") and callable(getattr(Client, name))}
    helpers = {"close", "refresh_nodes", "breakers", "node_for", "placement"}
    covered = {name.rsplit("_", 1)[0] for name in SCENARIOS}
    assert public - helpers <= covered, public - helpers - covered
    assert public == {name for name in dir(AsyncClient) if not name.startswith("_")
                      and callable(getattr(AsyncClient, name))}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest_twisted.ensureDeferred
async def test_method(api, scenario):
    await SCENARIOS[scenario](api)
