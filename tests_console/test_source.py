"""HttpSource against HTTP servers that answer what a node of another
version, or something that is not a node at all, might answer."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from console.discovery import FixedTargets
from console.source import HttpSource


def envelope(data, status="OK", error=None):
    return {"status": status, "error": error, "data": data, "trace_id": "t"}


class ScriptedServer:
    """Answers GET path -> (HTTP status, body: dict encoded as JSON, or bytes)."""

    def __init__(self, answers):
        answers = dict(answers)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = answers.get(self.path.split("?")[0], (404, envelope(None, "ERROR", {
                    "code": 40001404, "message": "Resource not found", "reason": f"no route for {self.path}"})))
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


OVERVIEW = envelope({"time": 10**18, "clusters": [{"cluster": "c", "engines": [
    {"ip": "10.0.0.1", "queued_req_num": 2, "prompt_length": 5, "updated_time": 10**18}]}]})


def fetch(url):
    return HttpSource(FixedTargets([url]), timeout=2.0).fetch(url)


def test_a_node_without_status_and_cache_and_not_ready_still_shows_its_load():
    with ScriptedServer({
        "/v1/load/overview": (200, OVERVIEW),
        "/readyz": (503, envelope(None, "ERROR", {"code": 50301503, "message": "x", "reason": "warming up"})),
        "/v1/node/status": (404, envelope(None, "ERROR", {"code": 40001404, "message": "x", "reason": "no route"})),
        "/v1/cache/stats": (500, envelope(None, "ERROR", {"code": 50001000, "message": "x", "reason": "boom"})),
    }) as server:
        snapshot = fetch(server.url)
    assert snapshot.reachable and snapshot.ready is False
    assert snapshot.overview.cluster("c").in_flight == 2
    assert snapshot.status is None and snapshot.status_error == "node status: HTTP 404 on /v1/node/status: no route"
    assert snapshot.cache is None  # not offered...
    assert snapshot.notes == ("cache stats: HTTP 500 on /v1/cache/stats: boom",)  # ...and said why


def test_a_404_on_cache_stats_means_not_offered_and_is_not_a_problem():
    with ScriptedServer({"/v1/load/overview": (200, OVERVIEW), "/readyz": (200, envelope("ready"))}) as server:
        snapshot = fetch(server.url)
    assert snapshot.ready is True and snapshot.cache is None and snapshot.notes == ()


@pytest.mark.parametrize("answer, reason", [
    ((200, b"<html>not a node</html>"), "HTTP 200 without a JSON envelope on /v1/load/overview"),
    ((200, envelope({"clusters": [{"cluster": "c", "engines": [{"ip": "x", "queued_req_num": "2"}]}]})),
     "queued_req_num: expected an integer, got '2'"),
    ((200, envelope([1, 2])), "overview: expected an object, got list"),
    ((500, envelope(None, "ERROR", {"code": 50001000, "message": "Internal error", "reason": "oops"})),
     "HTTP 500 on /v1/load/overview: oops"),
])
def test_nonsense_makes_the_node_down_with_the_reason(answer, reason):
    with ScriptedServer({"/v1/load/overview": answer}) as server:
        snapshot = fetch(server.url)
    assert not snapshot.reachable
    assert snapshot.error == reason
