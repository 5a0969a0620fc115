"""The core's one error type.

The core never speaks HTTP: it raises ``InvalidInput`` with a reason that
names the field and what was expected, and the API layer maps it to a 400 in
the envelope (``metacenter.api.envelope``), the cluster layer to a refused
peer record.
"""


class InvalidInput(ValueError):
    """A value the core cannot accept.

    ``reason`` is the whole human-readable sentence, e.g.
    ``"field 'prompt_length' must be an integer in [0, 2147483647], got boolean"``.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
