"""The three data screens: clusters overview, one cluster's engines, nodes.

Screens only read ``app.state`` and render it; polling and actions live in
the app. Each screen's ``refresh_view`` is called on the UI thread whenever
new data arrives and once a second so ages keep counting.
"""

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from console.format import human_age, human_bytes, plural
from console.nodeclient import target_label
from console.state import UP
from console.tables import fill_table, highlighted_key
from console.views import (
    STATE_STYLES,
    agreement_text,
    cluster_tie_break,
    data_line,
    empty_overview_text,
    engine_columns,
    engine_rows,
    engine_tie_break,
    node_columns,
    node_rows,
    overview_columns,
    overview_rows,
    peer_columns,
    sort_rows,
    stream_summary,
)


class DataScreen(Screen):
    """A status line, a summary, a filter box and one sortable table."""

    # The app's own keys, but bound here so the footer lists them first.
    GLOBAL_BINDINGS = [
        Binding("question_mark", "app.help", "Help", key_display="?"),
        Binding("q", "app.quit", "Quit"),
    ]
    TABLE_BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort_next", "Sort"),
        Binding("r", "sort_reverse", "Reverse"),
        Binding("escape", "escape", "Leave the filter box, then clear the filter, then go back", show=False),
    ]
    BINDINGS = GLOBAL_BINDINGS + TABLE_BINDINGS
    # Keys the table widget handles itself, listed on the help screen.
    TABLE_KEYS = (("↑ ↓ PgUp PgDn Home End", "move the highlight"),
                  ("← →", "scroll sideways when the table is wider than the screen; the first column stays"),
                  ("click a header", "sort by that column"))
    # Keys only this screen has that are not bindings (help screen).
    EXTRA_KEYS = ()
    HEADING = ""
    DEFAULT_SORT = None  # column key
    FILTER_HINT = "filter"

    def __init__(self):
        super().__init__()
        self.sorted_by = self.DEFAULT_SORT
        self.descending = True
        self.needle = ""
        self.ready = False  # True once on_mount ran: the widgets exist

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Static(id="summary")
        yield Input(placeholder=f"/ {self.FILTER_HINT}", id="filter", compact=True)
        # fixed_columns: the name column stays in view while ← → scroll sideways
        yield DataTable(id="table", cursor_type="row", zebra_stripes=True, fixed_columns=1)
        yield from self.compose_extra()
        yield Footer()

    def compose_extra(self) -> ComposeResult:
        return ()

    def on_unmount(self):
        self.ready = False

    def on_mount(self):
        self.ready = True
        self.query_one("#table", DataTable).focus()
        self.refresh_view()

    def on_screen_resume(self):
        self.refresh_view()

    # -- what each screen defines ------------------------------------------

    def columns(self):
        raise NotImplementedError

    def rows(self, now):
        raise NotImplementedError

    def row_key(self, row):
        raise NotImplementedError

    def tie_break(self, row):
        raise NotImplementedError

    def summary(self, now, shown):
        return Text()

    # -- rendering -----------------------------------------------------------

    def refresh_view(self):
        # New data can arrive while the screen is still being built or, at
        # exit, already taken apart (a slow poll finishing late).
        if not self.ready or not self.is_attached:
            return
        try:
            self._render_view()
        except NoMatches:
            return

    def _render_view(self):
        app = self.app
        now = app.clock()
        status = Text(f"metacenter console · {self.HEADING}", style="bold")
        status.append("\n")
        status.append(data_line(app.state, now, app.source.describe()))
        self.query_one("#status", Static).update(status)
        columns = self.columns()
        by_key = {c.key: c for c in columns}
        if self.sorted_by not in by_key or by_key[self.sorted_by].sort_key is None:
            self.sorted_by = None
        rows = self.rows(now)
        if self.sorted_by is not None:
            rows = sort_rows(rows, by_key[self.sorted_by], self.descending, self.tie_break)
        else:
            rows = sorted(rows, key=self.tie_break)
        fill_table(self.query_one("#table", DataTable), columns, rows, self.row_key, self.sorted_by, self.descending)
        self.query_one("#summary", Static).update(self.summary(now, len(rows)))
        self.refresh_extra(now)

    def refresh_extra(self, now):
        pass

    def filter_note(self, shown, total):
        if not self.needle:
            return Text()
        return Text(f" · filter “{self.needle}”: {shown} of {total} shown", style="bold magenta")

    # -- sorting and filtering -----------------------------------------------

    def sort_by(self, key):
        column = next((c for c in self.columns() if c.key == key), None)
        if column is None or column.sort_key is None:
            return
        if self.sorted_by == key:
            self.descending = not self.descending
        else:
            self.sorted_by = key
            self.descending = column.sorts_descending_first
        self.refresh_view()

    def action_sort_next(self):
        sortable = [c for c in self.columns() if c.sort_key is not None]
        keys = [c.key for c in sortable]
        index = (keys.index(self.sorted_by) + 1) % len(keys) if self.sorted_by in keys else 0
        self.sorted_by = keys[index]
        self.descending = sortable[index].sorts_descending_first
        self.refresh_view()

    def action_sort_reverse(self):
        self.descending = not self.descending
        self.refresh_view()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected):
        event.stop()
        self.sort_by(event.column_key.value)

    def action_filter(self):
        self.query_one("#filter", Input).focus()

    def on_input_changed(self, event: Input.Changed):
        if event.input.id == "filter":
            self.needle = event.value.strip()
            self.refresh_view()

    def on_input_submitted(self, event: Input.Submitted):
        self.query_one("#table", DataTable).focus()

    def action_escape(self):
        filter_box = self.query_one("#filter", Input)
        if filter_box.has_focus:
            self.query_one("#table", DataTable).focus()
        elif self.needle:
            filter_box.value = ""
        else:
            self.leave()

    def leave(self):
        pass


class OverviewScreen(DataScreen):
    HEADING = "Clusters"
    DEFAULT_SORT = "in_flight"
    FILTER_HINT = "filter clusters by name"
    EXTRA_KEYS = (("Enter", "open the highlighted cluster"),)

    def columns(self):
        snapshot, _ = self.app.state.view_snapshot()
        with_cache = snapshot is not None and snapshot.cache is not None
        return overview_columns(with_cache=with_cache, with_trend=True)

    def rows(self, now):
        snapshot, _ = self.app.state.view_snapshot()
        return overview_rows(snapshot, self.app.state.history, now, needle=self.needle)

    def row_key(self, row):
        return row.cluster.name

    def tie_break(self, row):
        return cluster_tie_break(row)

    def summary(self, now, shown):
        snapshot, _ = self.app.state.view_snapshot()
        clusters = () if snapshot is None or snapshot.overview is None else snapshot.overview.clusters
        engines = sum(len(c.engines) for c in clusters)
        in_flight = sum(c.in_flight for c in clusters)
        prompt = sum(c.prompt_bytes for c in clusters)
        text = Text(f"{plural(len(clusters), 'cluster')} · {plural(engines, 'engine')} · "
                    f"{plural(in_flight, 'request')} in flight · {human_bytes(prompt)} in prefill")
        text.append(self.filter_note(shown, len(clusters)))
        empty = empty_overview_text(self.app.state)
        if empty is not None:
            text.append("\n")
            text.append(empty)
        return text

    def on_data_table_row_selected(self, event: DataTable.RowSelected):
        event.stop()
        self.app.push_screen(ClusterScreen(event.row_key.value))


class ClusterScreen(DataScreen):
    BINDINGS = [Binding("backspace", "back", "Back"), Binding("x", "reset_engine", "Reset engine")]
    DEFAULT_SORT = "queued"
    FILTER_HINT = "filter engines by address"

    def __init__(self, cluster_name):
        super().__init__()
        self.cluster_name = cluster_name
        self.HEADING = f"Cluster {cluster_name}"

    def cluster(self):
        snapshot, _ = self.app.state.view_snapshot()
        if snapshot is None or snapshot.overview is None:
            return snapshot, None
        return snapshot, snapshot.overview.cluster(self.cluster_name)

    def columns(self):
        return engine_columns(with_trend=True)

    def rows(self, now):
        snapshot, cluster = self.cluster()
        if cluster is None:
            return []
        return engine_rows(snapshot, cluster, self.app.state.history, now, needle=self.needle)

    def row_key(self, row):
        return row.engine.ip

    def tie_break(self, row):
        return engine_tie_break(row)

    def summary(self, now, shown):
        snapshot, cluster = self.cluster()
        if cluster is None:
            where = "" if snapshot is None else f" on {target_label(snapshot.target)}"
            return Text(f"Cluster {self.cluster_name} has no engines{where} (idle clusters are collected)",
                        style="bold yellow")
        text = Text(f"{plural(len(cluster.engines), 'engine')} · {plural(cluster.in_flight, 'request')} in flight · "
                    f"{human_bytes(cluster.prompt_bytes)} in prefill · spread {cluster.spread}")
        if cluster.mean_queued:
            ratio = cluster.busiest.queued / cluster.mean_queued
            style = "bold red" if ratio >= 1.5 and cluster.spread >= 2 else "green"
            text.append(" · busiest/mean ")
            text.append(f"{ratio:.1f}×", style=style)
        figures = None if snapshot.cache is None else snapshot.cache.get(cluster.name)
        if snapshot.cache is not None:
            text.append("\nKV cache: ")
            if figures is None:
                text.append("no blocks recorded", style="dim")
            else:
                text.append(f"{plural(figures.blocks, 'block')} held by {plural(figures.engines, 'engine')}",
                            style="bold cyan")
        text.append(self.filter_note(shown, len(cluster.engines)))
        return text

    def action_back(self):
        self.leave()

    def action_reset_engine(self):
        """Engine reset of the highlighted engine, after a confirmation, on
        the node the view shows (which replicates it)."""
        ip = highlighted_key(self.query_one("#table", DataTable))
        target = self.app.state.view_target()
        if ip is None or target is None:
            self.notify("No engine highlighted, or no node answers: nothing to reset", severity="error")
            return
        self.app.confirm_reset(target, self.cluster_name, ip)

    def leave(self):
        self.app.pop_screen()


LEASES_SHOWN = 8  # the rest is counted: one lease per gateway instance can be many


def leases_text(target, snapshot):
    """The gateway leases alive on the highlighted node (issue 10), fewest
    seconds left first: those are the gateways that went quiet."""
    name = target_label(target) if target else "—"
    if snapshot is None or snapshot.leases is None:
        return Text(f"Leases on {name}: not reported", style="dim")
    leases = sorted(snapshot.leases, key=lambda x: (x.get("expires_in_ms", 0), str(x.get("lease"))))
    text = Text(f"Leases on {name}: {len(leases)}", style="bold")
    for lease in leases[:LEASES_SHOWN]:
        left = lease.get("expires_in_ms", 0) / 1000
        text.append(f"\n  {lease.get('lease')}: {plural(lease.get('requests', 0), 'request')}, ", style="not bold")
        text.append(f"ends in {left:.1f} s", style="bold yellow" if left < 2 else "not bold")
        text.append(f" (ttl {lease.get('ttl_ms', 0) / 1000:g} s)", style="dim")
    if len(leases) > LEASES_SHOWN:
        text.append(f"\n  … {len(leases) - LEASES_SHOWN} more", style="dim")
    return text


class NodesScreen(DataScreen):
    HEADING = "Nodes"
    DEFAULT_SORT = None  # the order given on the command line / by DNS
    FILTER_HINT = "filter nodes by address"
    EXTRA_KEYS = (("Enter", "take the overview's data from the highlighted node (again: from any node)"),)

    def compose_extra(self) -> ComposeResult:
        yield Static(id="problems")
        yield Static(id="agreement")
        yield Static(id="peers-title")
        yield DataTable(id="peers", cursor_type="none", zebra_stripes=True)
        yield Static(id="leases")
        yield Static(id="actions")

    def columns(self):
        return node_columns()

    def rows(self, now):
        rows = node_rows(self.app.state, now)
        if self.needle:
            rows = [r for r in rows if self.needle.casefold() in r.target.casefold()]
        return rows

    def row_key(self, row):
        return row.target

    def tie_break(self, row):
        return self.app.state.targets.index(row.target)

    def summary(self, now, shown):
        state = self.app.state
        text = Text(f"{plural(len(state.targets), 'node')} · {state.reachable_count()} answering")
        if state.pinned:
            text.append(f" · overview pinned to {target_label(state.pinned)}", style="magenta")
        text.append(self.filter_note(shown, len(state.targets)))
        return text

    def highlighted_target(self):
        return highlighted_key(self.query_one("#table", DataTable))

    def refresh_extra(self, now):
        state = self.app.state
        problems = Text()

        def problem(target, label, style, detail):
            if problems:
                problems.append("\n")
            problems.append(f"{target_label(target)} {label}: ", style=style)
            problems.append(detail)

        for target in state.targets:
            health = state.health(target, now)
            if health.state != UP:
                problem(target, health.state, STATE_STYLES[health.state], health.detail)
            latest = state.latest.get(target)
            if latest is not None and latest.reachable:
                # answers, but part of what it answers is not usable
                for note in filter(None, (latest.status_error, *latest.notes)):
                    problem(target, "partly", "bold yellow", note)
        self.query_one("#problems", Static).update(problems)
        self.query_one("#agreement", Static).update(agreement_text(state.agreement(), state.disagree_since, now))
        self.refresh_peers()
        lines = Text()
        for when, line in state.actions:
            if lines:
                lines.append("\n")
            lines.append(f"{human_age(now - when)} ago: {line}", style="dim")
        self.query_one("#actions", Static).update(lines)

    def refresh_peers(self):
        target = self.highlighted_target()
        snapshot = self.app.state.last_good.get(target) if target else None
        self.query_one("#leases", Static).update(leases_text(target, snapshot))
        title = self.query_one("#peers-title", Static)
        table = self.query_one("#peers", DataTable)
        if snapshot is None or snapshot.status is None:
            title.update(Text(f"Peers of {target_label(target) if target else '—'}: no status", style="dim"))
            fill_table(table, peer_columns(), [], lambda p: p.peer)
            return
        peers = snapshot.status.peers
        heading = Text(f"Peers seen by {target_label(target)}: {len(peers)}", style="bold")
        streams = [p for p in peers if p.streaming]
        if streams:
            heading.append(f"\nStreams: {stream_summary(streams)}", style="not bold")
        title.update(heading)
        fill_table(table, peer_columns(), sorted(peers, key=lambda p: p.peer), lambda p: p.peer)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted):
        if event.data_table.id == "table":
            self.refresh_peers()

    def on_data_table_row_selected(self, event: DataTable.RowSelected):
        event.stop()
        state = self.app.state
        target = event.row_key.value
        state.pinned = None if state.pinned == target else target
        shown = state.view_target()
        self.notify(f"Overview shows data from {target_label(shown) if shown else 'no node'}")
        self.app.rerender()

    def log_level_target(self):
        return self.highlighted_target()
