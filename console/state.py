"""Everything the console knows, in one place the screens read from: the last
poll of every node, which node's view is shown, how healthy each node is,
whether the nodes agree, and the recent history behind the sparklines.

Only the UI thread touches it; workers hand it finished ``NodeSnapshot``s.
"""

import hashlib
from collections import deque
from dataclasses import dataclass

from console.format import plural
from console.history import History
from console.nodeclient import target_label

# A poll slower than this marks the node "slow" (gateways call a node slow
# above ~10 ms; the console is more lenient, it polls several endpoints).
SLOW_SECONDS = 0.5

UP, SLOW, NOT_READY, DOWN, WAITING = "up", "slow", "not ready", "down", "waiting"


@dataclass(frozen=True)
class NodeHealth:
    target: str
    state: str
    detail: str
    data_age: float | None  # seconds since the last successful poll


@dataclass(frozen=True)
class KnownLevel:
    """A node's log level as far as the console knows it."""

    level: str | None  # None: unknown
    origin: str  # "node" (its /v1/node/status), "console" (set from here), "" when unknown


@dataclass(frozen=True)
class Agreement:
    nodes: tuple  # targets that were compared
    basis: str  # "digest", "totals", or "" when there is nothing to compare
    agree: bool | None
    differences: tuple  # human-readable lines, at most a few


def state_fingerprint(status):
    """A short hash of a node's replicated state; equal on nodes that agree.
    Clusters with no live request count as absent: an empty cluster may be
    kept by one node and already collected by another."""
    if status is None:
        return None
    if status.digest is None:
        return f"{status.requests}req/{status.engines}eng"
    items = sorted((name, live, digest) for name, (live, digest) in status.digest.items() if live > 0)
    return hashlib.sha1(repr(items).encode()).hexdigest()[:8]


def _compare(statuses):
    """statuses: {target: NodeStatus} of reachable nodes -> Agreement."""
    targets = tuple(statuses)
    if len(targets) < 2:
        return Agreement(targets, "", None, ())
    if all(s.digest is not None for s in statuses.values()):
        clusters = sorted({name for s in statuses.values() for name in s.digest})
        differences = []
        for name in clusters:
            values = {}
            for target, status in statuses.items():
                live, digest = status.digest.get(name, (0, ""))
                values[target] = (live, digest if live > 0 else "")
            if len(set(values.values())) > 1:
                parts = ", ".join(f"{target_label(t)} live {v[0]}" for t, v in values.items())
                differences.append(f"{name}: {parts}")
        return Agreement(targets, "digest", not differences, tuple(differences))
    totals = {t: (s.requests, s.engines) for t, s in statuses.items()}
    if len(set(totals.values())) == 1:
        return Agreement(targets, "totals", True, ())
    parts = ", ".join(f"{target_label(t)} {plural(r, 'request')}/{plural(e, 'engine')}" for t, (r, e) in totals.items())
    return Agreement(targets, "totals", False, (f"totals differ: {parts}",))


class ConsoleState:
    def __init__(self, targets=(), *, interval=1.0, history_seconds=300.0):
        self.targets = list(targets)
        self.interval = interval
        self.latest = {}  # target -> last NodeSnapshot, success or not
        self.last_good = {}  # target -> last reachable NodeSnapshot
        self.failing_since = {}  # target -> time of the first failure in a row
        self.polling_since = {}  # target -> when the poll now running started
        self.pinned = None  # target chosen by the operator as the view node
        self.discovery_error = None
        self.history = History(history_seconds)
        self.disagree_since = None
        self.actions = deque(maxlen=5)  # (time, text) of operator actions
        self.levels_set = {}  # target -> (time, level) this console set successfully

    # -- input -------------------------------------------------------------

    def set_targets(self, targets):
        self.targets = list(targets)
        for table in (self.latest, self.last_good, self.failing_since, self.polling_since, self.levels_set):
            for gone in set(table) - set(self.targets):
                del table[gone]
        if self.pinned not in self.targets:
            self.pinned = None

    def begin_poll(self, target, now):
        """False when a poll of ``target`` is still running: a slow node gets
        one poll at a time, never a pile of them."""
        if target in self.polling_since:
            return False
        self.polling_since[target] = now
        return True

    def absorb(self, snapshot):
        target = snapshot.target
        self.polling_since.pop(target, None)
        if target not in self.targets:
            return  # a node dropped from DNS while its poll was running
        self.latest[target] = snapshot
        if snapshot.reachable:
            self.last_good[target] = snapshot
            self.failing_since.pop(target, None)
        else:
            self.failing_since.setdefault(target, snapshot.fetched_at)
        if snapshot.reachable and target == self.view_target():
            self._record_history(snapshot)
        agreement = self.agreement()
        if agreement.agree is False:
            if self.disagree_since is None:
                self.disagree_since = snapshot.fetched_at
        else:
            self.disagree_since = None

    def _record_history(self, snapshot):
        when = snapshot.fetched_at
        for cluster in snapshot.overview.clusters:
            self.history.record(("cluster", cluster.name), when, cluster.in_flight)
            for engine in cluster.engines:
                self.history.record(("engine", cluster.name, engine.ip), when, engine.queued)
        self.history.prune(when)

    def record_action(self, when, text):
        self.actions.append((when, text))

    def record_level_set(self, target, level, when):
        self.levels_set[target] = (when, level)

    # -- derived views -----------------------------------------------------

    def view_target(self):
        """The node whose data the overview shows: the pinned one while it
        answers, else the first node that answers."""
        def answering(target):
            latest = self.latest.get(target)
            return latest is not None and latest.reachable

        if self.pinned and answering(self.pinned):
            return self.pinned
        return next((t for t in self.targets if answering(t)), None)

    def view_snapshot(self):
        """The data to show, and whether it is current. With no node
        answering, the freshest data any node gave, marked not current."""
        target = self.view_target()
        if target is not None:
            return self.last_good[target], True
        remembered = [self.last_good[t] for t in self.targets if t in self.last_good]
        # the freshest; among equally fresh ones the first listed, as above
        freshest = max(remembered, key=lambda s: s.fetched_at, default=None)
        return freshest, False

    def stale_after(self):
        return max(3.0 * (self.interval or 1.0), 3.0)

    def health(self, target, now):
        latest = self.latest.get(target)
        good = self.last_good.get(target)
        data_age = None if good is None else now - good.fetched_at
        polling = self.polling_since.get(target)
        waited = None if polling is None else now - polling
        hanging = waited is not None and waited > max(SLOW_SECONDS, self.interval or 0)
        if latest is None:
            if hanging:
                return NodeHealth(target, SLOW, f"no answer for {waited:.1f}s", None)
            return NodeHealth(target, WAITING, "first poll running" if polling is not None else "not polled yet", None)
        if not latest.reachable:
            since = now - self.failing_since.get(target, latest.fetched_at)
            return NodeHealth(target, DOWN, f"{latest.error} (for {since:.0f}s)", data_age)
        if hanging:
            return NodeHealth(target, SLOW, f"no answer for {waited:.1f}s", data_age)
        if latest.latency > SLOW_SECONDS:
            return NodeHealth(target, SLOW, f"answered in {latest.latency:.2f}s", data_age)
        if latest.ready is False:
            return NodeHealth(target, NOT_READY, "/readyz answers 503", data_age)
        return NodeHealth(target, UP, f"answered in {latest.latency * 1000:.0f}ms", data_age)

    def log_level(self, target):
        """The level the node reports in its last status, unless this console
        set one since (the node only reports it at the next poll); with a node
        that does not report its level, the one set from here, if any."""
        good = self.last_good.get(target)
        reported = None if good is None or good.status is None else good.status.log_level
        set_here = self.levels_set.get(target)
        if set_here is not None and (reported is None or set_here[0] >= good.fetched_at):
            return KnownLevel(set_here[1], "console")
        if reported is not None:
            return KnownLevel(reported, "node")
        return KnownLevel(None, "")

    def agreement(self):
        statuses = {
            t: self.latest[t].status
            for t in self.targets
            if t in self.latest and self.latest[t].reachable and self.latest[t].status is not None
        }
        return _compare(statuses)

    def reachable_count(self):
        return sum(1 for t in self.targets if t in self.latest and self.latest[t].reachable)
