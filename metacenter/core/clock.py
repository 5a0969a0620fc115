"""The clock the core is given: whatever tells the time in seconds.

The reactor (``IReactorTime``) in a node, ``twisted.internet.task.Clock`` in
tests; the core only ever calls ``seconds()``, so it never imports Twisted.
"""

from typing import Protocol


class Clock(Protocol):
    """Anything with ``seconds() -> float``: seconds since the epoch."""

    def seconds(self) -> float:
        """The current time, seconds since the epoch."""
        ...
