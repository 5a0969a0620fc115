"""Routes that peers call. The reference's single-event endpoint lives here;
every event is validated exactly like a client request and never forwarded."""

from metacenter import envelope, validation
from metacenter.http import endpoint
from metacenter.node import EVENT_ADD, LOAD_EVENT_TYPES, ORIGIN_PEER

_PARSERS = {EVENT_ADD: validation.load_add}


def parse_event(event_type, obj):
    """A replicated load event of a known type -> the validated event."""
    return _PARSERS.get(event_type, validation.load_delete)(obj)


class ReplicaRoutes:
    @endpoint("/v1/replica/event", ["POST"])
    def replica_event(self, request, trace_id):
        body = request.content.read()
        self.authenticate(request, body)
        values = request.requestHeaders.getRawHeaders(b"event-type")
        if not values or not values[0]:
            raise envelope.invalid("missing Event-Type header")
        event_type = values[0].decode("utf-8", "replace")
        if event_type not in LOAD_EVENT_TYPES:
            raise envelope.invalid("Unsupported event type")
        try:
            obj = validation.parse_json_object(body)
        except envelope.ApiError:
            raise envelope.invalid("handler execute error") from None
        event = parse_event(event_type, obj)
        self.node.apply(event_type, event, trace_id, ORIGIN_PEER)
        return None

    def authenticate(self, request, body):
        """Overridden when a cluster secret is set (see replication)."""
