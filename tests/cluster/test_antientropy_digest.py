"""Anti-entropy's first step on the polling side: the peer's digest answer
is read and compared a few clusters per reactor turn (``digest_entries``,
``core.digests.DigestComparison``), with the same outcome as parsing it
whole and comparing the two dicts."""

import json
import random

import pytest
from twisted.internet.task import Clock

from metacenter.cluster.antientropy import digest_entries
from metacenter.core.digests import DigestComparison, differing_clusters, digests
from metacenter.core.load import LoadState


def state_with(rng, clusters):
    clock = Clock()
    clock.advance(1_700_000_000)
    state = LoadState(clock)
    for i in range(rng.randrange(0, 200)):
        state.add(rng.choice(clusters), f"r{i}", f"10.0.0.{rng.randrange(3)}", 1)
        if rng.random() < 0.3:
            state.delete(f"r{i}")
    return state


def compare_in_chunks(state, body, size):
    comparison = DigestComparison(state)
    chunk = []
    for pair in digest_entries(body):
        chunk.append(pair)
        if len(chunk) == size:
            comparison.remote(chunk)
            chunk = []
    comparison.remote(chunk)
    names = list(state.clusters)
    for i in range(0, len(names), size):
        comparison.local(names[i:i + size])
    return comparison.result


@pytest.mark.parametrize("seed", range(30))
def test_reading_in_chunks_finds_the_clusters_a_whole_parse_finds(seed):
    rng = random.Random(seed)
    clusters = [f"m{i}" for i in range(12)] + ['quote"d', "ünï模", "nl\n"]
    local, remote = state_with(rng, clusters), state_with(rng, clusters)
    data = {"time": 5, "clusters": digests(remote)}
    indent = rng.choice([None, 1, "\t"])
    # Another writer's spacing and member order read the same.
    envelope = {"trace_id": "t", "data": data, "status": "OK", "error": None}
    body = json.dumps(envelope, indent=indent, ensure_ascii=rng.random() < 0.5).encode("utf-8")
    expected = differing_clusters(digests(local), json.loads(body)["data"]["clusters"])
    assert compare_in_chunks(local, body, rng.randrange(1, 5)) == expected


@pytest.mark.parametrize("body", [
    b"", b"[]", b'{"data":{}}', b'{"data":{"clusters":[]}}', b'{"data":{"clusters":{"m":[1]}}}',
    b'{"data":{"clusters":{"m":[true,"0000000000000000"]}}}', b'{"data":{"clusters":{"m":[1,2]}}}',
    b'{"data":{"clusters":{"m":[1,"00"]}} x', b'{"data":{"clusters":{"m" [1,"00"]}}}',
    b'{"data":{"clusters":{"m":[1,"00"],}}}', b'\xff{"data":{"clusters":{}}}',
])
def test_what_is_not_a_digest_answer_is_refused(body):
    clock = Clock()
    with pytest.raises(ValueError):
        compare_in_chunks(LoadState(clock), body, 2)
