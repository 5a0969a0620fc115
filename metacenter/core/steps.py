"""Work done a step at a time, for the core's stepped variants
(``LoadState.refresh_some``, ``CacheIndex.save_steps`` and ``match_steps``,
``scoring.score_engines_steps``): a generator yields (None) whenever the
caller's ``spent()`` says a step's time is up, and returns its result. The
API drives them one step per reactor turn; the one-go functions run them to
the end with ``never`` as ``spent``. Pure: no clock of its own."""

from typing import Generator, TypeVar

T = TypeVar("T")


def never() -> bool:
    """A ``spent`` for work done in one go: a step's time is never up."""
    return False


def to_end(steps: Generator[None, None, T]) -> T:
    """Runs the generator ``steps`` to its end; -> its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
