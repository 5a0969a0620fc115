"""The interactive console: polls every node in Textual thread workers and
hands finished snapshots to ``ConsoleState`` on the UI thread.

A node is polled by one worker at a time, each poll bounded by the source's
timeout, so a dead or slow node shows up as such while the rest keep
refreshing and the UI never waits on the network.
"""

import time
from functools import partial

from textual.app import App
from textual.binding import Binding
from textual.worker import WorkerState

from console.dialogs import ConfirmDialog, HelpScreen, LogLevelDialog
from console.model import NodeSnapshot
from console.nodeclient import target_label
from console.screens import ClusterScreen, DataScreen, NodesScreen, OverviewScreen
from console.state import ConsoleState

# Inline rather than a .tcss file: an installed console then needs no package data.
STYLE = """
Screen {
    layout: vertical;
}

#status {
    height: auto;
    background: $panel;
    padding: 0 1;
}

#summary {
    height: auto;
    padding: 0 1;
}

#filter {
    margin: 0 1;
    width: 1fr;
}

#table {
    height: 1fr;
}

NodesScreen #table {
    height: auto;
    max-height: 50%;
}

#problems, #agreement, #peers-title, #actions {
    height: auto;
    padding: 0 1;
}

#problems {
    margin-top: 1;
}

#peers {
    height: 1fr;
}

HelpScreen, LogLevelDialog {
    align: center middle;
}

#help-box {
    width: 80;
    max-width: 100%;
    height: auto;
    max-height: 100%;
    border: thick $accent;
    background: $surface;
    padding: 0 1;
}

#help-keys {
    height: auto;
}

#help-more {
    dock: bottom;
    height: 1;
}

#log-level-box {
    width: 40;
    height: auto;
    border: thick $accent;
    background: $surface;
    padding: 1 2;
}

#confirm-box {
    width: 60;
    height: auto;
    border: thick $error;
    background: $surface;
    padding: 1 2;
}

#levels {
    height: auto;
    margin: 1 0;
}
"""

# DNS is asked again this often, so nodes that come and go are followed.
DISCOVER_EVERY = 10.0
POLL, DISCOVER, LOG_LEVEL, RESET = "poll", "discover", "log-level", "reset"


class ConsoleApp(App):
    CSS = STYLE
    TITLE = "metacenter console"
    MODES = {"overview": OverviewScreen, "nodes": NodesScreen}
    DEFAULT_MODE = "overview"
    # ? and q are on every data screen (DataScreen.GLOBAL_BINDINGS), first in
    # the footer, so a narrow terminal cuts these rather than them.
    BINDINGS = [
        Binding("o", "show_overview", "Overview"),
        Binding("n", "show_nodes", "Nodes"),
        Binding("l", "log_level", "Log level"),
        Binding("R", "poll_now", "Poll now", key_display="R"),
    ]
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, source, *, interval=1.0, history_seconds=300.0, clock=time.time, open_cluster=None,
                 discover_every=DISCOVER_EVERY):
        """``interval`` None polls once at start and then only on ``R``
        (tests and screenshots use it with a fixed ``clock``)."""
        super().__init__()
        self.source = source
        self.interval = interval
        self.clock = clock
        self.open_cluster = open_cluster
        self.discover_every = discover_every
        self.state = ConsoleState(interval=interval, history_seconds=history_seconds)
        self._discovered_at = None  # monotonic time of the last finished lookup
        self._discovering = False
        self._log_level_requests = {}  # worker -> (target, level)
        self._resets = {}  # worker -> (target, cluster, ip)

    def on_mount(self):
        self.discover()
        if self.interval:
            self.set_interval(self.interval, self.poll_all)
        # Ages and "no answer for" counters move even when no data arrives.
        self.set_interval(1.0, self.rerender)
        if self.open_cluster:
            self.push_screen(ClusterScreen(self.open_cluster))

    # -- polling -------------------------------------------------------------

    def discover(self):
        if self._discovering:
            return
        self._discovering = True
        self.run_worker(self.source.discover, name=DISCOVER, group=DISCOVER, thread=True, exit_on_error=False)

    def poll_all(self, only_new=False):
        discovery_due = self._discovered_at is None or time.monotonic() - self._discovered_at >= self.discover_every
        if not only_new and discovery_due:
            self.discover()
        now = self.clock()
        for target in self.state.targets:
            if only_new and target in self.state.latest:
                continue
            if self.state.begin_poll(target, now):
                self.run_worker(partial(self.source.fetch, target), name=target, group=POLL, thread=True,
                                exit_on_error=False)
        self.rerender()

    def action_poll_now(self):
        self.poll_all()

    def on_worker_state_changed(self, event):
        worker = event.worker
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        failed = event.state == WorkerState.ERROR
        if worker.group == DISCOVER:
            self._discovering = False
            self._discovered_at = time.monotonic()
            if failed:
                # Like the nodes themselves: keep the last known list.
                self.state.discovery_error = str(worker.error)
            else:
                self.state.discovery_error = None
                self.state.set_targets(worker.result)
                self.poll_all(only_new=True)  # new nodes show up without waiting a tick
        elif worker.group == POLL:
            if failed:  # a source that raised instead of reporting: show it, keep going
                snapshot = NodeSnapshot(worker.name, self.clock(), 0.0, error=f"poll failed: {worker.error}")
            else:
                snapshot = worker.result
            self.state.absorb(snapshot)
        elif worker.group == LOG_LEVEL:
            self._log_level_done(worker, failed)
        elif worker.group == RESET:
            self._reset_done(worker, failed)
            self.poll_all()  # the reset engine leaves the view at once
        else:
            return
        self.rerender()

    def rerender(self):
        for screen in self.screen_stack:
            if isinstance(screen, DataScreen):
                screen.refresh_view()

    # -- navigation ----------------------------------------------------------

    def action_show_overview(self):
        self.switch_mode("overview")

    def action_show_nodes(self):
        self.switch_mode("nodes")

    @classmethod
    def help_sections(cls):
        """Every key, read from the bindings themselves so the help (and the
        docs test that checks it) cannot drift from what the keys do."""
        sections = [
            ("Everywhere", [*DataScreen.GLOBAL_BINDINGS, *cls.BINDINGS], ()),
            ("Every table screen", DataScreen.TABLE_BINDINGS, DataScreen.TABLE_KEYS),
        ]
        for title, screen_class in (("Clusters overview", OverviewScreen), ("Cluster", ClusterScreen),
                                    ("Nodes", NodesScreen)):
            own = screen_class.__dict__.get("BINDINGS", [])
            sections.append((title, own, screen_class.EXTRA_KEYS))
        sections.append(("Log level dialog", LogLevelDialog.BINDINGS, LogLevelDialog.EXTRA_KEYS))
        sections.append(("Confirmation", ConfirmDialog.BINDINGS, ConfirmDialog.EXTRA_KEYS))
        sections.append(("This help", HelpScreen.BINDINGS, HelpScreen.SCROLL_KEYS))
        return sections

    def action_help(self):
        self.push_screen(HelpScreen(self.help_sections()))

    # -- actions -------------------------------------------------------------

    def action_log_level(self):
        screen = self.screen
        target = screen.log_level_target() if isinstance(screen, NodesScreen) else self.state.view_target()
        if target is None:
            self.notify("No node answers: there is no node to set the log level of", severity="error")
            return
        self.push_screen(LogLevelDialog(target, self.state.log_level(target)),
                         callback=partial(self._set_log_level, target))

    def _set_log_level(self, target, level):
        if level is None:
            return
        worker = self.run_worker(partial(self.source.set_log_level, target, level), name=f"{level} {target}",
                                 group=LOG_LEVEL, thread=True, exit_on_error=False)
        self._log_level_requests[worker] = (target, level)

    def confirm_reset(self, target, cluster, ip):
        """Ask, then reset engine ``ip`` of ``cluster`` on ``target``."""
        question = f"Reset engine {ip} of {cluster}?"
        detail = (f"Its in-flight requests are released and its KV-cache blocks dropped, on "
                  f"{target_label(target)} and, by replication, every node. For an engine that restarted.")
        self.push_screen(ConfirmDialog(question, detail), callback=partial(self._reset, target, cluster, ip))

    def _reset(self, target, cluster, ip, confirmed):
        if not confirmed:
            return
        worker = self.run_worker(partial(self.source.reset_engine, target, cluster, ip), name=f"{cluster} {ip}",
                                 group=RESET, thread=True, exit_on_error=False)
        self._resets[worker] = (target, cluster, ip)

    def _reset_done(self, worker, failed):
        target, cluster, ip = self._resets.pop(worker, (worker.name, "?", "?"))
        what = f"reset of {ip} in {cluster} on {target_label(target)}"
        if failed:
            text = f"{what} failed: {worker.error}"
            self.notify(text, severity="error")
        else:
            text = f"{what}: {worker.result}"
            self.notify(text)
        self.state.record_action(self.clock(), text)

    def _log_level_done(self, worker, failed):
        target, level = self._log_level_requests.pop(worker, (worker.name, "?"))
        if failed:
            text = f"log level {level} on {target_label(target)} failed: {worker.error}"
            self.notify(text, severity="error")
        else:
            text = f"log level {level} on {target_label(target)}: {worker.result}"
            self.state.record_level_set(target, level, self.clock())
            self.notify(text)
        self.state.record_action(self.clock(), text)
