"""The core's error types.

The core never speaks HTTP: it raises ``InvalidInput`` with a reason that
names the field and what was expected, and the API layer maps it to a 400 in
the envelope (``metacenter.api.envelope``), the cluster layer to a refused
peer record. ``Conflict`` (409) and ``NotFound`` (404) carry a reason too;
neither is a ``ValueError``, so code that refuses bad input does not swallow
them.
"""


class InvalidInput(ValueError):
    """A value the core cannot accept.

    ``reason`` is the whole human-readable sentence, e.g.
    ``"field 'prompt_length' must be an integer in [0, 2147483647], got boolean"``.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Conflict(Exception):
    """A conditional change whose condition no longer holds (the API answers
    409, code 40001409).

    ``reason`` is the sentence for the envelope; ``data`` what the client
    needs to decide again (for a conditional add: the engine's current wire
    row, a dict), or None.
    """

    def __init__(self, reason: str, data: object = None):
        super().__init__(reason)
        self.reason = reason
        self.data = data


class NotFound(Exception):
    """Nothing to act on (the API answers 404); ``reason`` says what to send
    instead, e.g. a pick in a cluster with no known engine: pass ``ips``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
