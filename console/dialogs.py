"""Modal screens: the key help and the log-level picker."""

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from console.nodeclient import target_label
from console.source import LOG_LEVELS


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
    """Every key of every screen, read from the bindings themselves."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close help", key_display="Esc ? q")]

    def __init__(self, sections):
        super().__init__()
        self.sections = sections  # [(title, bindings, (keys, description) pairs)]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static(Text("Keys  (Esc or ? closes this help)", style="bold"))
            yield Static(help_table(self.sections))


class LogLevelDialog(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    EXTRA_KEYS = (("↑ ↓", "choose a level"), ("Enter", "set it on the node named in the title"))

    def __init__(self, target):
        super().__init__()
        self.target = target

    def compose(self) -> ComposeResult:
        with Vertical(id="log-level-box"):
            yield Static(Text(f"Log level of {target_label(self.target)}", style="bold"))
            yield OptionList(*(Option(level, id=level) for level in LOG_LEVELS), id="levels")
            yield Static(Text("Enter sets it · Esc cancels", style="dim"))

    def on_mount(self):
        levels = self.query_one("#levels", OptionList)
        levels.highlighted = LOG_LEVELS.index("INFO")
        levels.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected):
        self.dismiss(event.option.id)

    def action_dismiss_none(self):
        self.dismiss(None)
