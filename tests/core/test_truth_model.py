"""Any interleaving of add, replicated add (snapshot record), prompt delete,
delete, engine reset, keepalive, lease expiry, revoke and refresh, on a fake
clock, against a small independent model of the rules of issue 10: the
counters end exact, none goes negative, and no released request comes back.

The model knows nothing of packing, shards, retired ids or chunked release:
a request is live, a prompt tombstone or finished; a lease is a generation
(a name alive again is a new lease) with a deadline.
"""

from functools import reduce
from operator import xor

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from metacenter.core.load import LoadState, request_fingerprint

T0 = 1_700_000_000
EXPIRE = 30  # requests expire within a run...
TOMB_TTL = 100_000  # ...tombstones never do, so "finished" is for good
LEASE_TTL_MS = 10_000

# Engines as canonical addresses, each with spellings the clients may use.
ENGINES = [
    ("c1", "10.0.0.1", ["10.0.0.1"]),
    ("c1", "2001:db8::1", ["2001:db8::1", "2001:DB8::1", "2001:db8:0::1"]),
    ("c1", "::ffff:a00:2", ["::ffff:10.0.0.2", "::FFFF:a00:2"]),
    ("c2", "10.0.0.1", ["10.0.0.1"]),
]
IDS = [f"r{i}" for i in range(12)]
LEASES = ["gw-a", "gw-b"]


class Model:
    def __init__(self):
        self.now = T0
        self.requests = {}  # id -> dict(state, engine, prompt, tokens, prompt_deleted, gen, created)
        self.leases = {}  # name -> [gen, deadline]: not ended
        self.ended = set()  # generations ended
        self.next_gen = 1

    def _lease_gen(self, name, ttl_ms=LEASE_TTL_MS, renew=False):
        lease = self.leases.get(name)
        if lease is not None and lease[1] <= self.now:
            self.ended.add(lease[0])
            lease = None
        if lease is None:
            lease = self.leases[name] = [self.next_gen, self.now + ttl_ms / 1000]
            self.next_gen += 1
        elif renew:
            lease[1] = self.now + ttl_ms / 1000
        return lease[0]

    def add(self, rid, engine, prompt, tokens, lease):
        r = self.requests.get(rid)
        if r is not None and r["state"] != "prompt":
            return
        gen = self._lease_gen(lease) if lease else None
        self.requests[rid] = dict(state="live", engine=engine, prompt=prompt, tokens=tokens,
                                  prompt_deleted=r is not None, gen=gen, created=self.now)

    def prompt(self, rid):
        r = self.requests.get(rid)
        if r is None:
            self.requests[rid] = dict(state="prompt")
        elif r["state"] == "live":
            r["prompt_deleted"] = True

    def finish(self, rid):
        self.requests[rid] = dict(state="finished")

    def reset(self, engine):
        for rid, r in list(self.requests.items()):
            if r["state"] == "live" and r["engine"] == engine:
                self.finish(rid)

    def keepalive(self, name, ttl_ms):
        self._lease_gen(name, ttl_ms, renew=True)

    def release_leases(self):
        for name, (gen, deadline) in list(self.leases.items()):
            if deadline <= self.now:
                self.ended.add(gen)
                del self.leases[name]
        for rid, r in list(self.requests.items()):
            if r["state"] == "live" and r["gen"] in self.ended:
                self.finish(rid)

    def revoke(self, name):
        lease = self.leases.pop(name, None)
        if lease is not None:
            self.ended.add(lease[0])
        self.release_leases()  # the runtime drives the release steps after a revoke

    def refresh(self, ids):
        for rid in ids:
            r = self.requests.get(rid)
            if r is not None and r["state"] == "live":
                r["created"] = self.now

    def sweep(self):
        self.release_leases()
        for rid, r in list(self.requests.items()):
            if r["state"] == "live" and r["created"] <= self.now - EXPIRE:
                self.finish(rid)

    def live(self):
        return {rid: r for rid, r in self.requests.items() if r["state"] == "live"}

    def counters(self):
        out = {}
        for r in self.live().values():
            cluster, address, _ = ENGINES[r["engine"]]
            q, p, pf, pft, qt = out.get((cluster, address), (0, 0, 0, 0, 0))
            pd = r["prompt_deleted"]
            out[(cluster, address)] = (q + 1, p + (0 if pd else r["prompt"]), pf + (0 if pd else 1),
                                       pft + (0 if pd else r["tokens"]), qt + r["tokens"])
        return out

    def digests(self):
        out = {}
        for rid, r in self.live().items():
            cluster = ENGINES[r["engine"]][0]
            live, digest = out.get(cluster, (0, 0))
            out[cluster] = (live + 1, digest ^ request_fingerprint(rid, r["prompt_deleted"]))
        return out

    def lease_names(self, rid):
        r = self.requests[rid]
        if r["gen"] is None or r["gen"] in self.ended:
            return None
        return next(name for name, (gen, _) in self.leases.items() if gen == r["gen"])


def core_counters(state):
    out = {}
    for name, c in state.clusters.items():
        for address, e in c.engines.items():
            values = (e.queued, e.prompt, e.prefill, e.prefill_tokens, e.queued_tokens)
            assert all(v >= 0 for v in values), values
            if e.queued == 0:
                assert values == (0, 0, 0, 0, 0) and e.digest == 0
            else:
                out[(name, address)] = values
    return out


def core_digests(state):
    out = {}
    for name, c in state.clusters.items():
        assert c.live >= 0
        assert c.digest == reduce(xor, (e.digest for e in c.engines.values()), 0)
        if c.live:
            out[name] = (c.live, c.digest)
        else:
            assert c.digest == 0
    return out


engine_index = st.integers(0, len(ENGINES) - 1)
request_id = st.sampled_from(IDS)
lease = st.one_of(st.none(), st.sampled_from(LEASES))
operations = st.lists(st.one_of(
    st.tuples(st.just("add"), request_id, engine_index, st.integers(0, 2), st.integers(0, 2**31 - 1),
              st.integers(0, 2**31 - 1), lease),
    st.tuples(st.just("record"), request_id, engine_index, st.integers(0, 2), st.integers(0, 5000),
              st.integers(0, 5000), lease, st.booleans()),
    st.tuples(st.just("prompt"), request_id),
    st.tuples(st.just("delete"), request_id),
    st.tuples(st.just("reset"), engine_index, st.integers(0, 2)),
    st.tuples(st.just("keepalive"), st.sampled_from(LEASES), st.sampled_from([1000, 5000, 20_000, None])),
    st.tuples(st.just("revoke"), st.sampled_from(LEASES)),
    st.tuples(st.just("refresh"), st.lists(request_id, max_size=4)),
    # Steps that land on lease deadlines (1, 5, 10 s) and across the expiry (30 s).
    st.tuples(st.just("advance"), st.sampled_from([0, 1, 1, 4, 5, 10, 20, 29, 31])),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("snapshot-read")),
    st.tuples(st.just("pump")),
), max_size=60)


def run(ops, check_every_step=True, drain_revokes=True):
    """Apply ``ops`` to a core and to the model. With ``drain_revokes``
    False a revoke releases one request and "pump" runs one release step of
    one request, so other events land on requests waiting to be released;
    only the end state is compared then."""
    clock = Clock()
    clock.advance(T0)
    state = LoadState(clock, request_expire=EXPIRE, tombstone_ttl=TOMB_TTL, lease_ttl=LEASE_TTL_MS / 1000)
    model = Model()
    ever_finished = set()
    for op in ops:
        kind = op[0]
        if kind == "add":
            _, rid, e, spelling, prompt, tokens, lease_ = op
            spellings = ENGINES[e][2]
            state.add(ENGINES[e][0], rid, spellings[spelling % len(spellings)], prompt, prompt_tokens=tokens,
                      lease=lease_)
            model.add(rid, e, prompt, tokens, lease_)
        elif kind == "record":
            _, rid, e, spelling, prompt, tokens, lease_, prompt_deleted = op
            spellings = ENGINES[e][2]
            state.apply_record(rid, ENGINES[e][0], spellings[spelling % len(spellings)], prompt, prompt_deleted,
                               None, prompt_tokens=tokens, lease=lease_)
            model.add(rid, e, prompt, tokens, lease_)
            if prompt_deleted:
                model.prompt(rid)
        elif kind == "prompt":
            state.delete_prompt(op[1])
            model.prompt(op[1])
        elif kind == "delete":
            state.delete(op[1])
            model.finish(op[1])
        elif kind == "reset":
            _, e, spelling = op
            spellings = ENGINES[e][2]
            released = state.reset_engine(ENGINES[e][0], spellings[spelling % len(spellings)])
            if drain_revokes:
                assert released == sum(1 for r in model.live().values() if r["engine"] == e)
            model.reset(e)
        elif kind == "keepalive":
            state.keepalive(op[1], op[2])
            model.keepalive(op[1], LEASE_TTL_MS if op[2] is None else op[2])
        elif kind == "revoke":
            state.revoke_lease(op[1], chunk=1)
            if drain_revokes:
                list(state.lease_steps(chunk=3))
            model.revoke(op[1])
        elif kind == "pump":
            if not drain_revokes:
                next(state.lease_steps(chunk=1), None)
        elif kind == "refresh":
            refreshed = state.refresh(op[1])
            if drain_revokes:
                assert refreshed == len({rid for rid in op[1] if rid in model.live()})
            model.refresh(op[1])
        elif kind == "advance":
            clock.advance(op[1])
            model.now += op[1]
        elif kind == "sweep":
            list(state.expire(chunk=2))
            model.sweep()
        elif kind == "snapshot-read" and drain_revokes:
            records = {r[0]: r[1:] for r in state.iter_requests(full=True)}
            assert set(records) == set(model.live())
            for rid, record in records.items():
                assert record[6] == model.lease_names(rid)
            tombstones = {r for r, _, _ in state.iter_tombstones()}
            assert tombstones == {rid for rid, r in model.requests.items() if r["state"] != "live"}
        ever_finished |= {rid for rid, r in model.requests.items() if r["state"] == "finished"}
        if check_every_step:
            assert core_counters(state) == model.counters()
            assert core_digests(state) == model.digests()
            assert state.request_count == len(model.live())
    return state, model, ever_finished


@settings(max_examples=600, deadline=None)
@given(operations)
def test_any_interleaving_matches_the_model_at_every_step(ops):
    state, model, ever_finished = run(ops)
    list(state.expire())
    model.sweep()
    assert core_counters(state) == model.counters()
    assert core_digests(state) == model.digests()
    for rid in ever_finished:
        assert state.request_state(rid) == "deleted"  # finished is for good (tombstones outlive the run)
    alive = {lease["lease"] for lease in state.leases()}
    assert alive == {name for name, (_, deadline) in model.leases.items() if deadline > model.now}


@settings(max_examples=400, deadline=None)
@given(operations)
def test_events_landing_on_requests_waiting_for_their_lease_release_end_exact(ops):
    state, model, ever_finished = run(ops, check_every_step=False, drain_revokes=False)
    list(state.lease_steps())
    model.release_leases()
    assert core_counters(state) == model.counters()
    assert core_digests(state) == model.digests()
    assert state.request_count == len(model.live()) and state.releasing == 0
    for rid in ever_finished:
        assert state.request_state(rid) == "deleted"


@settings(max_examples=200, deadline=None)
@given(operations, st.lists(st.tuples(st.sampled_from(IDS), engine_index, st.integers(0, 100), st.booleans()),
                            max_size=20))
def test_no_finished_request_comes_back_through_late_or_replicated_events(ops, late):
    state, model, ever_finished = run(ops, check_every_step=False)
    finished = {rid for rid, r in model.requests.items() if r["state"] == "finished"}
    before = core_counters(state)
    for rid, e, prompt, as_record in late:
        if rid not in finished:
            continue
        cluster, _, spellings = ENGINES[e]
        if as_record:
            assert state.apply_record(rid, cluster, spellings[0], prompt, False, None, lease="gw-a") is False
        else:
            assert state.add(cluster, rid, spellings[0], prompt, lease="gw-b") is False
        assert state.delete_prompt(rid) is False
        assert state.delete(rid) is False
    assert core_counters(state) == before
    assert state.request_count == len(model.live())
