"""JSON texts read a piece at a time, so that a big body is parsed over
several reactor turns instead of in one ``json.loads`` (a 1.9 MB batch of
10,000 events takes ~18 ms in one go; the reactor may pause 5 ms at most).

Pure (no Twisted): the callers drive the steps (``api.replica``,
``cluster.antientropy``). Every piece is still parsed by the standard
library's own C scanner (``raw_decode``, ``scanstring``); only the outer
levels are walked here.

- ``Reader`` walks an object member by member (anti-entropy's digest answer).
- ``parse`` is a generator that returns the same value as ``json.loads`` and
  raises the same errors (message and position), yielding whenever its
  ``spent`` callable says the step's time is up.
- ``Budget`` is such a callable over ``time.perf_counter``.
"""

import json
import re
from json.decoder import JSONDecodeError, scanstring
from time import perf_counter

_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as the stdlib's scanner skips it
_raw_decode = json.JSONDecoder().raw_decode

# Items (values parsed, events applied) between two looks at the clock:
# ~16 events applied take ~0.15 ms, well inside a step.
CHECK_EVERY = 16

# Levels walked here: the top value and the values in it. Deeper values (a
# batch's event, a repair's record) are parsed in one C call each.
DEPTH = 2


class Budget:
    """``spent()`` is True once ``seconds`` have passed since the last
    ``restart()`` (or creation): a step's time is up. The clock is read only
    at every ``check_every``-th call (items cost microseconds each), so a
    small job (fewer items than that) is always done in one step, however
    slow the machine: its answer does not depend on timing. A budget of 0
    makes every step ``check_every`` items (tests)."""

    __slots__ = ("seconds", "deadline", "check_every", "_calls")

    def __init__(self, seconds, check_every=CHECK_EVERY):
        self.seconds = seconds
        self.check_every = check_every
        self._calls = 0
        self.deadline = perf_counter() + seconds

    def restart(self):
        self._calls = 0
        self.deadline = perf_counter() + self.seconds

    def spent(self):
        self._calls += 1
        if self._calls < self.check_every:
            return False
        self._calls = 0
        return perf_counter() >= self.deadline


def steps(gen, budget, out):
    """The steps of the generator ``gen`` (for a cooperator: one ``next()``
    per reactor turn), ``budget`` (a ``Budget``) restarted before each;
    ``gen``'s return value is appended to the list ``out``."""
    while True:
        budget.restart()
        try:
            yielded = next(gen)
        except StopIteration as done:
            out.append(done.value)
            return
        yield yielded


class Reader:
    """Reads a JSON text member by member (the stdlib's own scanners, in C),
    so that a big object can be read a few members per reactor turn; any
    malformed text raises ValueError."""

    def __init__(self, text):
        self.text = text
        self.pos = 0

    def _skip(self):
        self.pos = _SPACE.match(self.text, self.pos).end()

    def _take(self, expected):
        self._skip()
        if not self.text.startswith(expected, self.pos):
            raise ValueError(f"expected {expected!r} at {self.pos}")
        self.pos += 1

    def value(self):
        self._skip()
        value, self.pos = _raw_decode(self.text, self.pos)
        return value

    def members(self):
        """The keys of the object here, one by one; the caller reads each
        key's value (``value()`` or ``members()``) before asking for the next."""
        self._take("{")
        self._skip()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return
        while True:
            self._take('"')
            key, self.pos = scanstring(self.text, self.pos)
            self._take(":")
            yield key
            self._skip()
            end = self.text[self.pos:self.pos + 1]
            self.pos += 1
            if end == "}":
                return
            if end != ",":
                raise ValueError(f"expected ',' or '}}' at {self.pos - 1}")

    def end(self):
        self._skip()
        if self.pos != len(self.text):
            raise ValueError("extra data after the JSON value")


def parse(text, spent, raw_decode=_raw_decode):
    """A generator over the steps of parsing ``text`` (a str): it yields
    (None) after a value when ``spent()`` is true, and returns what
    ``json.loads(text)`` returns. Errors are ``json.loads``'s, with the
    same messages and positions: ``JSONDecodeError``, ``ValueError`` (an
    integer over Python's digit limit), ``RecursionError``. ``raw_decode``
    is a ``JSONDecoder``'s (one with a ``parse_int`` hook, say).

    The top value and, if they are arrays or objects, its values are walked
    here, one member or item at a time; anything deeper is one
    ``raw_decode`` (a single huge event costs what it costs on the client's
    own route)."""
    state = _Parse(text, spent, raw_decode)
    value = yield from state.value(DEPTH)
    end = _SPACE.match(text, state.pos).end()
    if end != len(text):
        raise JSONDecodeError("Extra data", text, end)
    return value


class _Parse:
    """The scanner of ``parse``: the same checks, in the same order, as
    CPython's ``_json`` scanner (``_parse_object_unicode``,
    ``_parse_array_unicode``), so a malformed text gets the same error."""

    __slots__ = ("text", "pos", "spent", "raw_decode")

    def __init__(self, text, spent, raw_decode):
        self.text = text
        self.pos = _SPACE.match(text, 0).end()
        self.spent = spent
        self.raw_decode = raw_decode

    def _skip(self):
        self.pos = _SPACE.match(self.text, self.pos).end()

    def value(self, depth):
        # Whitespace before the value is already skipped (as the C scanner's callers do).
        if depth:
            first = self.text[self.pos:self.pos + 1]
            if first == "{":
                return (yield from self._object(depth - 1))
            if first == "[":
                return (yield from self._array(depth - 1))
        value, self.pos = self.raw_decode(self.text, self.pos)
        if self.spent():
            yield
        return value

    def _array(self, depth):
        text = self.text
        self.pos += 1
        self._skip()
        items = []
        if text.startswith("]", self.pos):
            self.pos += 1
            return items
        while True:
            items.append((yield from self.value(depth)))
            self._skip()
            pos = self.pos
            if text.startswith("]", pos):
                self.pos = pos + 1
                return items
            if not text.startswith(",", pos):
                raise JSONDecodeError("Expecting ',' delimiter", text, pos)
            self.pos = pos + 1
            self._skip()

    def _object(self, depth):
        text = self.text
        self.pos += 1
        self._skip()
        obj = {}
        if text.startswith("}", self.pos):
            self.pos += 1
            return obj
        while True:
            if not text.startswith('"', self.pos):
                raise JSONDecodeError("Expecting property name enclosed in double quotes", text, self.pos)
            key, self.pos = scanstring(text, self.pos + 1)
            self._skip()
            if not text.startswith(":", self.pos):
                raise JSONDecodeError("Expecting ':' delimiter", text, self.pos)
            self.pos += 1
            self._skip()
            obj[key] = yield from self.value(depth)
            self._skip()
            pos = self.pos
            if text.startswith("}", pos):
                self.pos = pos + 1
                return obj
            if not text.startswith(",", pos):
                raise JSONDecodeError("Expecting ',' delimiter", text, pos)
            self.pos = pos + 1
            self._skip()
