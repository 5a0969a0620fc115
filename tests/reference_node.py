"""A stand-in for a node of the reference (Go) implementation, for
compatibility tests: it speaks only the reference's replication protocol.

- In: ``POST /v1/replica/event`` with an ``Event-Type`` header, applied without
  validation as the reference does; every other path is a bare
  ``404 page not found`` (Go's default mux), so it has no batch endpoint.
- Out: ``write(event_type, body)`` applies an event locally and sends it to
  every peer as the reference does: one POST per event, ``Event-Type``,
  ``TraceId`` and ``Content-Type: application/json``, body = the request JSON
  with its timestamp, 2 attempts, 1 s timeout.

Its load table is a deliberately simple model (no tombstones), independent of
metacenter.state, so agreement with it means something.
"""

import json
import time
import uuid

import treq
from twisted.internet import defer, reactor
from twisted.web import resource, server


class ReferenceNode(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.engines = {}  # (cluster, ip) -> [queued, prompt]
        self.requests = {}  # request_id -> [cluster, ip, prompt_length, prompt_deleted]
        self.received = []  # (path, headers dict, body) of every request
        self.peers = []  # (host, port)
        self.port = None

    # -- server ---------------------------------------------------------------

    def listen(self, interface="127.0.0.1"):
        self.port = reactor.listenTCP(0, server.Site(self), interface=interface)
        return interface, self.port.getHost().port

    def stop(self):
        return self.port.stopListening() if self.port is not None else defer.succeed(None)

    def render(self, request):
        body = request.content.read()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((request.path.decode(), request.method.decode(), headers, body))
        if request.path != b"/v1/replica/event" or request.method != b"POST":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"404 page not found\n"
        event_type = headers.get("event-type")
        try:
            self.apply(event_type, json.loads(body))
        except (ValueError, KeyError):
            request.setResponseCode(400)
            return b'{"status":"ERROR"}'
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"status": "OK", "error": None, "data": None, "trace_id": headers.get("traceid", "")}).encode()

    # -- the model --------------------------------------------------------------

    def apply(self, event_type, body):
        request_id = body["request_id"]
        if event_type == "load.stats.set":
            if request_id in self.requests:
                return
            key = (body["cluster"], body["ip"])
            prompt = body.get("prompt_length", 0)
            self.requests[request_id] = [body["cluster"], body["ip"], prompt, False]
            engine = self.engines.setdefault(key, [0, 0])
            engine[0] += 1
            engine[1] += prompt
        elif event_type == "load.prompt.delete":
            entry = self.requests.get(request_id)
            if entry is not None and not entry[3]:
                entry[3] = True
                self.engines[(entry[0], entry[1])][1] -= entry[2]
        elif event_type == "load.stats.delete":
            entry = self.requests.pop(request_id, None)
            if entry is not None:
                engine = self.engines[(entry[0], entry[1])]
                engine[0] -= 1
                if not entry[3]:
                    engine[1] -= entry[2]
        else:
            raise KeyError(event_type)

    def load(self, cluster):
        return {ip: tuple(v) for (c, ip), v in self.engines.items() if c == cluster}

    # -- client ---------------------------------------------------------------

    def write(self, event_type, body):
        """Apply locally, then replicate to every peer; fires when every peer
        answered or gave up."""
        body = dict(body, timestamp=time.time_ns())
        self.apply(event_type, body)
        return defer.gatherResults([self._send(peer, event_type, body) for peer in self.peers])

    @defer.inlineCallbacks
    def _send(self, peer, event_type, body):
        url = f"http://{peer[0]}:{peer[1]}/v1/replica/event"
        headers = {"Event-Type": [event_type], "TraceId": [str(uuid.uuid4())], "Content-Type": ["application/json"]}
        for _ in range(2):
            try:
                response = yield treq.post(url, data=json.dumps(body).encode(), headers=headers, timeout=1.0)
                yield treq.content(response)
                if response.code == 200:
                    return True
            except Exception:
                pass
        return False
