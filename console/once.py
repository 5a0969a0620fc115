"""``metacenter-console --once``: poll every node once, print the result and
exit 0 when every node answered and 1 otherwise.

Three outputs (``--output``):

- ``table``: rich tables. In a terminal they fit its width; anywhere else
  (a pipe, a file) nothing is cut: a line is as long as its table needs, so
  ``grep`` finds every name and address whole.
- ``wide``: more columns (and every peer of every node), never cut.
- ``json``: one JSON document, see ``console.report``.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table
from rich.text import Text

from console.discovery import DiscoveryError
from console.format import human_bytes, plural
from console.nodeclient import target_label
from console.report import once_document
from console.state import ConsoleState
from console.views import (
    Column,
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
    wide_node_columns,
    wide_overview_columns,
)

EXIT_ALL_ANSWERED = 0
EXIT_NODE_UNREACHABLE = 1

TABLE, WIDE, JSON = "table", "wide", "json"
OUTPUTS = (TABLE, WIDE, JSON)

# Columns that need history or a live screen make no sense in a one-shot print.
ONCE_NODE_COLUMNS = ("node", "state", "version", "uptime", "requests", "engines", "peers", "queue", "lag", "failed",
                     "fingerprint")
# Wider than any table, so a console that is not a terminal never cuts a line.
UNLIMITED_WIDTH = 100_000


def rich_table(columns, rows):
    table = Table()
    cells = [[column.render(row) for column in columns] for row in rows]
    for index, column in enumerate(columns):
        # The row's name (cluster, engine, node) stays whole; in a narrow
        # terminal the other cells give way (… marks a cut).
        min_width = None
        if index == 0:
            min_width = max([len(column.label), *(row[0].cell_len for row in cells)])
        table.add_column(column.label, justify="right" if column.numeric else "left", no_wrap=True,
                         min_width=min_width)
    for row in cells:
        table.add_row(*row)
    return table


def print_table(console, title, columns, rows):
    # The title on its own line rather than rich's table title, which is
    # padded with blanks to the table's width.
    console.print(Text(title, style="bold"))
    console.print(rich_table(columns, rows))


def poll_all(source, targets):
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return list(pool.map(source.fetch, targets))


def output_console(output):
    """stdout as a rich Console: in a terminal ``table`` fits its width; a pipe
    or ``wide`` gets lines as long as they need."""
    console = Console()
    if output == WIDE or not console.is_terminal:
        console = Console(width=UNLIMITED_WIDTH)
    return console


def run_once(source, cluster_name=None, console=None, clock=time.time, output=TABLE):
    """Polls, prints, returns the exit status. ``console``: where to print
    (a rich Console; by default stdout, see ``output_console``)."""
    console = console or output_console(output)
    try:
        targets = source.discover()
        discovery_error = None
    except DiscoveryError as exc:
        targets, discovery_error = [], str(exc)
    state = ConsoleState(targets, interval=None)
    state.discovery_error = discovery_error
    for snapshot in poll_all(source, targets):
        state.absorb(snapshot)
    now = clock()

    if output == JSON:
        document = once_document(state, now, source.describe(), cluster_name, discovery_error)
        console.file.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        console.file.flush()
    elif discovery_error is not None:
        console.print(Text(f"✘ {discovery_error}", style="bold red"))
    else:
        print_tables(console, state, now, source.describe(), cluster_name, wide=output == WIDE)

    if discovery_error is not None:
        return EXIT_NODE_UNREACHABLE
    return EXIT_ALL_ANSWERED if state.reachable_count() == len(targets) else EXIT_NODE_UNREACHABLE


def print_tables(console, state, now, source_description, cluster_name, wide):
    console.print(data_line(state, now, source_description))
    snapshot, _ = state.view_snapshot()

    if cluster_name is None:
        with_cache = snapshot is not None and snapshot.cache is not None
        columns = wide_overview_columns(with_cache) if wide else overview_columns(with_cache, with_trend=False)
        by_in_flight = next(c for c in columns if c.key == "in_flight")
        rows = sort_rows(overview_rows(snapshot, None, now), by_in_flight, True, cluster_tie_break)
        print_table(console, "Clusters", columns, rows)
        empty = empty_overview_text(state)
        if empty is not None:
            console.print(empty)
    else:
        cluster = None if snapshot is None else snapshot.overview.cluster(cluster_name)
        if cluster is None:
            console.print(f"Cluster {cluster_name!r} has no engines on the answering node.", style="yellow")
        else:
            columns = engine_columns(with_trend=False)
            rows = sort_rows(engine_rows(snapshot, cluster, None, now), columns[1], True, engine_tie_break)
            title = (f"Cluster {cluster.name}: {plural(len(cluster.engines), 'engine')}, "
                     f"{cluster.in_flight} in flight, {human_bytes(cluster.prompt_bytes)} in prefill")
            blocks = (snapshot.cache or {}).get(cluster.name)
            if blocks is not None:
                title += (f", KV cache {plural(blocks.blocks, 'block')} on "
                          f"{plural(blocks.engines, 'engine')}")
            print_table(console, title, columns, rows)

    if wide:
        columns = wide_node_columns()
    else:
        columns = [c for c in node_columns() if c.key in ONCE_NODE_COLUMNS]
    print_table(console, "Nodes", columns, node_rows(state, now))
    if wide:
        print_peers(console, state)
    for target in state.targets:
        health = state.health(target, now)
        if health.state != "up":
            console.print(Text(f"{target_label(target)}: {health.state}: {health.detail}", style="red"))
        latest = state.latest.get(target)
        if latest is not None and latest.reachable:
            for note in filter(None, (latest.status_error, *latest.notes)):
                console.print(Text(f"{target_label(target)}: partly: {note}", style="yellow"))
    console.print(agreement_text(state.agreement(), None, now))


def print_peers(console, state):
    """One row per (node, peer) it replicates to."""
    rows = []
    for target in state.targets:
        snapshot = state.last_good.get(target)
        if snapshot is not None and snapshot.status is not None:
            rows.extend((target, peer) for peer in sorted(snapshot.status.peers, key=lambda p: p.peer))
    columns = [Column("node", "Node", lambda r: Text(target_label(r[0]), style="bold"))]
    for column in peer_columns():
        columns.append(Column(column.key, column.label, lambda r, cell=column.cell: cell(r[1]),
                              numeric=column.numeric))
    if rows:
        print_table(console, "Peers", columns, rows)
    else:
        console.print(Text("Peers: no node reports any", style="dim"))
