"""Replication stream peers in the nodes screen's model and summary line."""

import dataclasses

import pytest

from console.app import ConsoleApp
from console.model import Peer
from console.views import stream_summary
from fixed_data import NOW, TARGETS, FixedSource, node_snapshots
from helpers import static_text
from screenshots import SIZE

STREAM = {"peer": "10.0.0.6:8080", "mode": "stream", "connected": True, "lag_events": 12, "lag_ms": 3.5,
          "window": 2, "frames_sent": 1500, "events_sent": 24000, "bytes_sent": 3 * 2**20, "reconnects": 3,
          "resumes": 2, "fresh_starts": 1, "repairs": 1, "failures": 0, "rejected": 4, "last_error": None}


def test_a_stream_peer_maps_onto_the_tables_columns_and_keeps_its_own_figures():
    peer = Peer.parse(STREAM)
    assert peer.streaming
    assert (peer.queue_depth, peer.sent, peer.failed, peer.dropped, peer.lag_ms) == (12, 24000, 4, 0, 3.5)
    assert (peer.window, peer.reconnects, peer.resumes, peer.repairs, peer.frames_sent, peer.bytes_sent) == (
        2, 3, 2, 1, 1500, 3 * 2**20)


def test_an_http_peer_has_no_stream_figures():
    peer = Peer.parse({"peer": "10.0.0.7:8080", "mode": "batch", "queue_depth": 5, "sent": 9, "failed": 1,
                       "dropped": 2, "lag_ms": None, "window": 7})
    assert not peer.streaming
    assert (peer.queue_depth, peer.sent, peer.failed, peer.dropped) == (5, 9, 1, 2)
    assert (peer.window, peer.reconnects, peer.frames_sent) == (0, 0, 0)


def test_the_summary_line_adds_up_the_streams_and_names_each_peer():
    other = dict(STREAM, peer="10.0.0.7:8080", window=1, reconnects=0, resumes=0, repairs=0, frames_sent=500,
                 bytes_sent=2**20, lag_events=0, lag_ms=0.0)
    line = stream_summary([Peer.parse(STREAM), Peer.parse(other)])
    assert line.startswith("3 frames in flight, 3 reconnects (2 resumed, 1 repairs), 2,000 frames / 4")
    assert "10.0.0.6:8080: lag 12 events" in line and "10.0.0.7:8080: lag 0 events" in line


@pytest.mark.asyncio
async def test_the_nodes_screen_shows_the_stream_figures_under_the_peers_title():
    a, b, c = node_snapshots()
    streaming = Peer.parse(STREAM)
    a = dataclasses.replace(a, status=dataclasses.replace(a.status, peers=(streaming,) + a.status.peers[1:]))
    app = ConsoleApp(FixedSource([a, b, c]), interval=None, clock=lambda: NOW)
    app.state.set_targets(TARGETS)
    for snapshot in (a, b, c):
        app.state.absorb(snapshot)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await pilot.pause()
        text = static_text(app.screen, "#peers-title")
    assert "Streams: 2 frames in flight, 3 reconnects (2 resumed, 1 repairs), 1,500 frames / 3" in text, text
    assert "10.0.0.6:8080: lag 12 events" in text
