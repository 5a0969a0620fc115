"""``metacenter-console --once``: poll every node once, print rich tables,
exit 0 when every node answered and 1 otherwise."""

import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table
from rich.text import Text

from console.discovery import DiscoveryError
from console.nodeclient import target_label
from console.state import ConsoleState
from console.views import (
    agreement_text,
    cluster_tie_break,
    data_line,
    engine_columns,
    engine_rows,
    engine_tie_break,
    node_columns,
    node_rows,
    overview_columns,
    overview_rows,
    sort_rows,
)

EXIT_ALL_ANSWERED = 0
EXIT_NODE_UNREACHABLE = 1

# Columns that need history or a live screen make no sense in a one-shot print.
ONCE_NODE_COLUMNS = ("node", "state", "version", "uptime", "requests", "engines", "peers", "queue", "lag", "failed",
                     "fingerprint")


def rich_table(title, columns, rows):
    table = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        table.add_column(column.label, justify="right" if column.numeric else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(column.render(row) for column in columns))
    return table


def poll_all(source, targets):
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return list(pool.map(source.fetch, targets))


def run_once(source, cluster_name=None, console=None, clock=time.time):
    console = console or Console()
    try:
        targets = source.discover()
    except DiscoveryError as exc:
        console.print(Text(f"✘ {exc}", style="bold red"))
        return EXIT_NODE_UNREACHABLE
    state = ConsoleState(targets, interval=None)
    for snapshot in poll_all(source, targets):
        state.absorb(snapshot)
    now = clock()
    console.print(data_line(state, now, source.describe()))
    snapshot, _ = state.view_snapshot()

    if cluster_name is None:
        columns = overview_columns(with_cache=snapshot is not None and snapshot.cache is not None, with_trend=False)
        rows = sort_rows(overview_rows(snapshot, None, now), columns[2], True, cluster_tie_break)
        console.print(rich_table("Clusters", columns, rows))
        if not rows:
            console.print("No cluster has reported load.", style="dim")
    else:
        cluster = None if snapshot is None else snapshot.overview.cluster(cluster_name)
        if cluster is None:
            console.print(f"Cluster {cluster_name!r} has no engines on the answering node.", style="yellow")
        else:
            columns = engine_columns(with_trend=False)
            rows = sort_rows(engine_rows(snapshot, cluster, None, now), columns[1], True, engine_tie_break)
            title = f"Cluster {cluster.name}: {len(cluster.engines)} engines, {cluster.in_flight} in flight"
            blocks = (snapshot.cache or {}).get(cluster.name)
            if blocks is not None:
                title += f", KV cache {blocks.blocks} blocks on {blocks.engines} engines"
            console.print(rich_table(title, columns, rows))

    columns = [c for c in node_columns() if c.key in ONCE_NODE_COLUMNS]
    console.print(rich_table("Nodes", columns, node_rows(state, now)))
    for target in state.targets:
        health = state.health(target, now)
        if health.state != "up":
            console.print(Text(f"{target_label(target)}: {health.state}: {health.detail}", style="red"))
    console.print(agreement_text(state.agreement(), None, now))
    return EXIT_ALL_ANSWERED if state.reachable_count() == len(targets) else EXIT_NODE_UNREACHABLE
