"""Modal screens: the key help and the log-level picker."""

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from console.model import LOG_LEVELS
from console.nodeclient import target_label

# A node that does not report its level most likely runs at the default.
DEFAULT_LEVEL = "INFO"


def key_name(binding):
    names = {"question_mark": "?", "slash": "/", "escape": "Esc", "backspace": "Backspace", "enter": "Enter"}
    return binding.key_display or names.get(binding.key, binding.key)


def help_table(sections):
    """One table, a heading row per section, so keys line up throughout."""
    table = Table(show_header=False, box=None, padding=(0, 1), expand=True)
    table.add_column(style="bold cyan", no_wrap=True, min_width=12)
    table.add_column(ratio=1)
    for index, (title, bindings, extra_keys) in enumerate(sections):
        if index:
            table.add_row("", "")
        table.add_row(Text(title, style="bold underline"), "", style="default")
        for binding in bindings:
            table.add_row(key_name(binding), binding.description or binding.action)
        for keys, description in extra_keys:
            table.add_row(keys, description)
    return table


class HelpScreen(ModalScreen):
    """Every key of every screen, read from the bindings themselves. When the
    terminal is too short for all of it, the list scrolls and the last line
    says so and where more is."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close help", key_display="Esc ? q")]
    SCROLL_KEYS = (("↑ ↓ PgUp PgDn Home End", "scroll the help when it does not fit"),)

    def __init__(self, sections):
        super().__init__()
        self.sections = sections  # [(title, bindings, (keys, description) pairs)]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static(Text("Keys  (Esc or ? closes this help)", style="bold"))
            with VerticalScroll(id="help-keys"):
                yield Static(help_table(self.sections))
            yield Static(id="help-more")

    # border (2 lines), title and the "more" line
    CHROME_LINES = 4

    def on_resize(self, event):
        # Content height, but never taller than the terminal: then it scrolls.
        self.query_one("#help-keys", VerticalScroll).styles.max_height = max(3, event.size.height - self.CHROME_LINES)
        self.call_after_refresh(self._show_where_more_is)

    def on_mount(self):
        keys = self.query_one("#help-keys", VerticalScroll)
        keys.focus()
        # Again whenever it scrolls or its content or its size is laid out anew.
        self.watch(keys, "scroll_y", self._show_where_more_is, init=False)
        self.watch(keys, "virtual_size", self._show_where_more_is, init=False)
        self.call_after_refresh(self._show_where_more_is)

    def _show_where_more_is(self, _=None):
        keys = self.query_one("#help-keys", VerticalScroll)
        hint = self.query_one("#help-more", Static)
        below = keys.scroll_y < keys.max_scroll_y
        above = keys.scroll_y > 0
        if not (above or below):
            hint.update("")
            hint.display = False
            return
        where = "below" if below and not above else "above" if above and not below else "above and below"
        arrow = "▼" if below and not above else "▲" if above and not below else "▲▼"
        hint.update(Text(f"{arrow} more {where}: ↑ ↓ PgUp PgDn scroll", style="bold yellow"))
        hint.display = True


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question before an action that changes a node's state: y
    confirms, n or Esc cancels (the default: nothing is sent)."""

    BINDINGS = [Binding("y", "confirm", "Yes"), Binding("n", "cancel", "No"), Binding("escape", "cancel", "No")]
    EXTRA_KEYS = ()

    def __init__(self, question, detail=""):
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(Text(self.question, style="bold"), id="confirm-question")
            if self.detail:
                yield Static(Text(self.detail), id="confirm-detail")
            yield Static(Text("y confirms · n or Esc cancels", style="dim"))

    def action_confirm(self):
        self.dismiss(True)

    def action_cancel(self):
        self.dismiss(False)


class LogLevelDialog(ModalScreen[str | None]):
    """Opens on the node's current level when the console knows it
    (``state.KnownLevel``), else on INFO, the nodes' default, and says which."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    EXTRA_KEYS = (("↑ ↓", "choose a level (the node's current one is highlighted first)"),
                  ("Enter", "set it on the node named in the title"))

    def __init__(self, target, known=None):
        super().__init__()
        self.target = target
        self.known = known  # state.KnownLevel or None

    @property
    def initial_level(self):
        level = None if self.known is None else self.known.level
        return level if level in LOG_LEVELS else DEFAULT_LEVEL

    def current_text(self):
        known = self.known
        if known is None or known.level is None:
            return Text(f"Now: not reported by this node ({DEFAULT_LEVEL} is the default)", style="yellow")
        origin = "as the node reports" if known.origin == "node" else "as set from this console"
        return Text(f"Now: {known.level} ({origin})")

    def compose(self) -> ComposeResult:
        with Vertical(id="log-level-box"):
            yield Static(Text(f"Log level of {target_label(self.target)}", style="bold"))
            yield Static(self.current_text(), id="log-level-now")
            yield OptionList(*(Option(level, id=level) for level in LOG_LEVELS), id="levels")
            yield Static(Text("Enter sets it · Esc cancels", style="dim"))

    def on_mount(self):
        levels = self.query_one("#levels", OptionList)
        levels.highlighted = LOG_LEVELS.index(self.initial_level)
        levels.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected):
        self.dismiss(event.option.id)

    def action_dismiss_none(self):
        self.dismiss(None)
