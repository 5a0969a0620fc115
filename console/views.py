"""The tables the console shows, defined once: which columns, how a cell
reads, how a column sorts. The interactive screens put these cells in
Textual DataTables; ``--once`` puts the same cells in rich Tables."""

from dataclasses import dataclass
from typing import Any, Callable

from rich.text import Text

from console.format import NO_VALUE, bar, human_age, human_bytes, human_lag, plural, sparkline
from console.nodeclient import target_label
from console.state import DOWN, NOT_READY, SLOW, UP, WAITING, state_fingerprint

STATE_STYLES = {UP: "bold green", SLOW: "bold yellow", NOT_READY: "bold yellow", DOWN: "bold red", WAITING: "dim"}
HOT, IDLE = "hot", "idle"
MARK_STYLES = {HOT: "bold red", IDLE: "cyan", "": "green"}
LOAD_BAR_WIDTH = 12
TREND_CELLS = 20


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    cell: Callable[[Any], Any]  # row -> str or rich Text
    sort_key: Callable[[Any], Any] | None = None
    numeric: bool = False  # right-aligned, sorts largest first by default
    largest_first: bool | None = None  # first sort direction when not the numeric default

    @property
    def sorts_descending_first(self):
        return self.numeric if self.largest_first is None else self.largest_first

    def render(self, row):
        value = self.cell(row)
        text = value if isinstance(value, Text) else Text(str(value))
        if self.numeric:
            text.justify = "right"
        return text


def sort_rows(rows, column, descending, tie_break):
    """Sorted by ``column``, rows without a value last, ``tie_break`` keeps
    the order stable across refreshes."""
    rows = sorted(rows, key=tie_break)
    if column.sort_key is None:
        return rows
    present = [r for r in rows if column.sort_key(r) is not None]
    absent = [r for r in rows if column.sort_key(r) is None]
    return sorted(present, key=column.sort_key, reverse=descending) + absent


def matches(text, needle):
    return needle.casefold() in text.casefold()


# -- overview: one row per cluster -------------------------------------------


@dataclass(frozen=True)
class ClusterRow:
    cluster: Any  # model.Cluster
    cache: Any  # model.CacheFigures or None
    trend: list  # sparkline slices
    age: float | None = None  # seconds since any engine of the cluster last changed


def _engine_with_load(engine):
    if engine is None:
        return NO_VALUE
    return f"{engine.ip} ({engine.queued})"


def _spread_cell(row):
    cluster = row.cluster
    style = "bold red" if cluster.spread >= max(2.0, cluster.mean_queued) and cluster.spread > 0 else ""
    return Text(str(cluster.spread), style=style)


def _trend_cell(values):
    return Text(sparkline(values), style="cyan")


def overview_columns(with_cache, with_trend):
    columns = [
        Column("cluster", "Cluster", lambda r: Text(r.cluster.name, style="bold"), lambda r: r.cluster.name),
        Column("engines", "Engines", lambda r: len(r.cluster.engines), lambda r: len(r.cluster.engines), True),
        Column("in_flight", "In flight", lambda r: r.cluster.in_flight, lambda r: r.cluster.in_flight, True),
        Column("prompt", "Prefill", lambda r: human_bytes(r.cluster.prompt_bytes), lambda r: r.cluster.prompt_bytes,
               True),
        Column("busiest", "Busiest", lambda r: _engine_with_load(r.cluster.busiest),
               lambda r: r.cluster.busiest.queued if r.cluster.engines else None, largest_first=True),
        Column("idlest", "Idlest", lambda r: _engine_with_load(r.cluster.idlest),
               lambda r: r.cluster.idlest.queued if r.cluster.engines else None, largest_first=True),
        Column("spread", "Spread", _spread_cell, lambda r: r.cluster.spread, True),
    ]
    if with_cache:
        columns.append(Column("kv_blocks", "KV blocks", lambda r: NO_VALUE if r.cache is None else r.cache.blocks,
                              lambda r: None if r.cache is None else r.cache.blocks, True))
    if with_trend:
        columns.append(Column("trend", "In flight, recent", lambda r: _trend_cell(r.trend)))
    return columns


def overview_rows(snapshot, history, now, trend_cells=TREND_CELLS, needle=""):
    if snapshot is None or snapshot.overview is None:
        return []
    rows = []
    for cluster in snapshot.overview.clusters:
        if needle and not matches(cluster.name, needle):
            continue
        cache = (snapshot.cache or {}).get(cluster.name)
        trend = history.slices(("cluster", cluster.name), now, trend_cells) if history else []
        newest = max(cluster.engines, key=lambda e: e.updated_ns, default=None)
        age = None if newest is None else snapshot.engine_age(newest, now)
        rows.append(ClusterRow(cluster, cache, trend, age))
    return rows


def wide_overview_columns(with_cache):
    """``--once --output wide``: the overview's columns and what only fits a wide page."""
    columns = overview_columns(with_cache=with_cache, with_trend=False)
    columns.insert(3, Column("mean", "Mean/engine", lambda r: f"{r.cluster.mean_queued:.1f}",
                             lambda r: r.cluster.mean_queued, True))
    if with_cache:
        columns.append(Column("kv_engines", "KV engines",
                              lambda r: NO_VALUE if r.cache is None else r.cache.engines,
                              lambda r: None if r.cache is None else r.cache.engines, True))
    columns.append(Column("updated", "Updated", lambda r: human_age(r.age), lambda r: r.age, True))
    return columns


def cluster_tie_break(row):
    return row.cluster.name


# Why the clusters table is empty (also the JSON output's ``clusters_empty_reason``).
NO_NODE_ANSWERED, NO_CLUSTERS_YET = "no_node_answered", "no_clusters_yet"


def empty_reason(state):
    """None when there are clusters to show, else NO_NODE_ANSWERED (no data
    from any node) or NO_CLUSTERS_YET (a node answered and holds none)."""
    snapshot, _ = state.view_snapshot()
    if snapshot is None or snapshot.overview is None:
        return NO_NODE_ANSWERED
    if not snapshot.overview.clusters:
        return NO_CLUSTERS_YET
    return None


def empty_overview_text(state):
    """The sentence that replaces an empty clusters table; None when not empty."""
    reason = empty_reason(state)
    if reason is None:
        return None
    if reason == NO_NODE_ANSWERED:
        if not state.targets:
            return Text("No clusters to show: there is no node to ask.", style="bold red")
        if not any(t in state.latest for t in state.targets):
            return Text("No clusters to show yet: waiting for the first answer of a node.", style="bold yellow")
        total = len(state.targets)
        who = "the node has not" if total == 1 else f"none of the {total} nodes has"
        return Text(f"No clusters to show: {who} answered (the nodes screen, n, says why).", style="bold red")
    snapshot, _ = state.view_snapshot()
    return Text(f"No clusters yet: {target_label(snapshot.target)} answers but holds no load; no gateway has "
                "reported any (POST /v1/load/stats).", style="bold yellow")


# -- cluster screen: one row per engine --------------------------------------


def engine_mark(engine, cluster):
    """``hot`` well above the cluster's mean load, ``idle`` well below it,
    nothing when the load is even or the cluster has nothing in flight."""
    if cluster.in_flight == 0 or len(cluster.engines) < 2:
        return ""
    mean = cluster.mean_queued
    if engine.queued >= max(mean * 1.5, mean + 2):
        return HOT
    if engine.queued <= mean * 0.5:
        return IDLE
    return ""


@dataclass(frozen=True)
class EngineRow:
    engine: Any  # model.Engine
    cluster: Any  # model.Cluster it belongs to
    age: float | None
    trend: list

    @property
    def mark(self):
        return engine_mark(self.engine, self.cluster)

    @property
    def share(self):
        total = self.cluster.in_flight
        return self.engine.queued / total if total else 0.0


def _load_bar(row):
    top = max((e.queued for e in row.cluster.engines), default=0)
    fraction = row.engine.queued / top if top else 0.0
    return Text(bar(fraction, LOAD_BAR_WIDTH), style=MARK_STYLES[row.mark])


def _mark_cell(row):
    mark = row.mark
    label = {HOT: "▲ hot", IDLE: "▽ idle"}.get(mark, "")
    return Text(label, style=MARK_STYLES[mark])


def engine_columns(with_trend):
    columns = [
        Column("engine", "Engine", lambda r: r.engine.ip, lambda r: r.engine.ip),
        Column("queued", "Queued", lambda r: r.engine.queued, lambda r: r.engine.queued, True),
        Column("prompt", "Prefill", lambda r: human_bytes(r.engine.prompt_bytes), lambda r: r.engine.prompt_bytes,
               True),
        Column("load", "Load", _load_bar),
        Column("share", "Share", lambda r: f"{r.share:.0%}", lambda r: r.share, True),
        Column("mark", "", _mark_cell),
    ]
    if with_trend:
        columns.append(Column("trend", "Queued, recent", lambda r: _trend_cell(r.trend)))
    columns.append(Column("updated", "Updated", lambda r: human_age(r.age), lambda r: r.age, True))
    return columns


def engine_rows(snapshot, cluster, history, now, trend_cells=TREND_CELLS, needle=""):
    rows = []
    for engine in cluster.engines:
        if needle and not matches(engine.ip, needle):
            continue
        trend = history.slices(("engine", cluster.name, engine.ip), now, trend_cells) if history else []
        rows.append(EngineRow(engine, cluster, snapshot.engine_age(engine, now), trend))
    return rows


def engine_tie_break(row):
    return row.engine.ip


# -- nodes screen: one row per node, one per peer ----------------------------


@dataclass(frozen=True)
class NodeRow:
    target: str
    health: Any  # state.NodeHealth
    snapshot: Any  # last reachable NodeSnapshot or None
    now: float
    viewed: bool

    @property
    def status(self):
        return None if self.snapshot is None else self.snapshot.status


def _uptime(row):
    status = row.status
    if status is None or not status.started_at_ns or row.snapshot.overview is None:
        return NO_VALUE
    node_now = row.snapshot.overview.time_ns or 0
    return human_age((node_now - status.started_at_ns) / 1e9 + (row.now - row.snapshot.fetched_at))


def _status_number(attribute):
    def cell(row):
        status = row.status
        return NO_VALUE if status is None else getattr(status, attribute)

    def key(row):
        status = row.status
        return None if status is None else getattr(status, attribute)

    return cell, key


def _node_cell(row):
    text = Text(target_label(row.target), style="bold")
    if row.viewed:
        text.append(" ◉", style="bold magenta")
    return text


def _failed_cell(row):
    return NO_VALUE if row.status is None else _count_alarm(row.status.replication_failures)


def _fingerprint_cell(row):
    return state_fingerprint(row.status) or NO_VALUE


def node_columns():
    requests = _status_number("requests")
    engines = _status_number("engines")
    return [
        Column("node", "Node", _node_cell, lambda r: r.target),
        Column("state", "State", lambda r: Text(r.health.state, style=STATE_STYLES[r.health.state]),
               lambda r: r.health.state),
        Column("version", "Version", lambda r: NO_VALUE if r.status is None else r.status.version),
        Column("uptime", "Up for", _uptime),
        Column("requests", "Requests", requests[0], requests[1], True),
        Column("engines", "Engines", engines[0], engines[1], True),
        Column("peers", "Peers", lambda r: NO_VALUE if r.status is None else len(r.status.peers),
               lambda r: None if r.status is None else len(r.status.peers), True),
        Column("queue", "Repl. queue", lambda r: NO_VALUE if r.status is None else r.status.replication_queue,
               lambda r: None if r.status is None else r.status.replication_queue, True),
        Column("lag", "Max lag", lambda r: NO_VALUE if r.status is None else human_lag(r.status.max_lag_ms),
               lambda r: None if r.status is None else r.status.max_lag_ms, True),
        Column("failed", "Failed", _failed_cell,
               lambda r: None if r.status is None else r.status.replication_failures, True),
        Column("fingerprint", "State hash", _fingerprint_cell),
        Column("age", "Data age", lambda r: human_age(r.health.data_age), lambda r: r.health.data_age, True),
    ]


def _ready_cell(row):
    ready = None if row.snapshot is None else row.snapshot.ready
    return NO_VALUE if ready is None else ("yes" if ready else "no")


def wide_node_columns():
    """``--once --output wide``: every column of the nodes screen and more."""
    clusters = _status_number("clusters")
    tombstones = _status_number("tombstones")
    return [
        *node_columns(),
        Column("ready", "Ready", _ready_cell),
        Column("clusters", "Clusters", clusters[0], clusters[1], True),
        Column("tombstones", "Tombstones", tombstones[0], tombstones[1], True),
        Column("log_level", "Log level", lambda r: NO_VALUE if r.status is None or r.status.log_level is None
               else r.status.log_level),
        Column("latency", "Poll", lambda r: NO_VALUE if r.snapshot is None else f"{r.snapshot.latency * 1000:.0f}ms",
               lambda r: None if r.snapshot is None else r.snapshot.latency, True),
    ]


def node_rows(state, now):
    view = state.view_target()
    return [
        NodeRow(t, state.health(t, now), state.last_good.get(t), now, t == view)
        for t in state.targets
    ]


def _count_alarm(count):
    return Text(str(count), style="bold red" if count else "")


def peer_columns():
    return [
        Column("peer", "Peer", lambda p: p.peer),
        Column("mode", "Mode", lambda p: p.mode or NO_VALUE),
        Column("queue", "Queue", lambda p: p.queue_depth, numeric=True),
        Column("sent", "Sent", lambda p: p.sent, numeric=True),
        Column("failed", "Failed", lambda p: _count_alarm(p.failed), numeric=True),
        Column("dropped", "Dropped", lambda p: _count_alarm(p.dropped), numeric=True),
        Column("lag", "Lag", lambda p: human_lag(p.lag_ms), numeric=True),
    ]


def stream_summary(peers):
    """One line of the replication stream figures of ``peers`` (stream ones)."""
    return (f"{sum(p.window for p in peers)} frames in flight, {sum(p.reconnects for p in peers)} reconnects "
            f"({sum(p.resumes for p in peers)} resumed, {sum(p.repairs for p in peers)} repairs), "
            f"{sum(p.frames_sent for p in peers):,} frames / {human_bytes(sum(p.bytes_sent for p in peers))} sent"
            + "".join(f"; {p.peer}: lag {p.queue_depth:,} events / {human_lag(p.lag_ms)}, {p.reconnects} "
                      f"reconnects, {p.resumes} resumed, {p.repairs} repairs" for p in peers[:4]))


def agreement_text(agreement, disagree_since, now):
    """One line (plus details) on whether the nodes hold the same state."""
    if agreement.agree is None:
        return Text(f"Agreement: nothing to compare ({plural(len(agreement.nodes), 'node')} with status)", style="dim")
    basis = "state digests" if agreement.basis == "digest" else "request and engine totals"
    if agreement.agree:
        return Text(f"✔ All {len(agreement.nodes)} nodes agree ({basis})", style="bold green")
    text = Text(f"✘ Nodes disagree ({basis})", style="bold red")
    if disagree_since is not None:
        text.append(f" for {human_age(now - disagree_since)}", style="red")
    for line in agreement.differences[:4]:
        text.append(f"\n  {line}")
    if len(agreement.differences) > 4:
        text.append(f"\n  … and {len(agreement.differences) - 4} more")
    return text


def data_line(state, now, source_description=""):
    """Where the shown data comes from and how old it is; loud when the data
    is stale or no node answers, so old numbers are never taken for live."""
    snapshot, current = state.view_snapshot()
    total = len(state.targets)
    reachable = state.reachable_count()
    text = Text()
    if snapshot is None:
        polled = any(t in state.latest for t in state.targets)
        if polled:
            text.append("⚠ No node answers and none has answered yet", style="bold white on red")
        else:
            text.append("Waiting for the first answer…", style="bold yellow")
    else:
        label = target_label(snapshot.target)
        age = now - snapshot.fetched_at
        if not current:
            text.append(f"⚠ NO NODE ANSWERS: data from {label} is {human_age(age)} old", style="bold white on red")
        elif age > state.stale_after():
            text.append(f"⚠ STALE: data from {label} is {human_age(age)} old", style="bold black on yellow")
        else:
            text.append(f"Data from {label}, {human_age(age)} old")
    style = "green" if total and reachable == total else "bold red"
    text.append(" · ")
    text.append(f"{reachable}/{plural(total, 'node')} answering", style=style)
    if source_description:
        text.append(f" · {source_description}", style="dim")
    if state.discovery_error:
        text.append(f" · {state.discovery_error}", style="bold red")
    return text
