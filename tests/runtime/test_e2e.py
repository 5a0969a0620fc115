"""A real `twistd metacenter` process on a loopback port, driven over real HTTP
the way the gateway drives it."""

import http.client
import json
import os
import subprocess
import tempfile
import uuid

import pytest

from nodeproc import REPO, TWISTD, NodeProcess


@pytest.fixture(scope="module")
def node():
    n = NodeProcess("127.0.0.1", None, "--max-body", "4096").start()
    yield n
    n.stop()


def raw_request(node, method, path, body, headers):
    conn = http.client.HTTPConnection(node.host, node.port, timeout=5)
    try:
        conn.putrequest(method, path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        if isinstance(body, list):  # chunked
            for chunk in body:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        elif body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def loads(node, cluster):
    status, _, body = node.call("GET", f"/v1/load/stats?cluster={cluster}")
    assert status == 200
    return {e["ip"]: (e["queued_req_num"], e["prompt_length"]) for e in body["data"]}


def test_gateway_pattern_end_to_end(node):
    cluster = "e2e-" + uuid.uuid4().hex[:6]
    engines = [f"10.1.0.{i}" for i in range(1, 6)]
    requests = []
    for i in range(50):
        rid = str(uuid.uuid4())
        ip = engines[i % len(engines)]
        status, _, body = node.call("POST", "/v1/load/stats",
                                    {"cluster": cluster, "request_id": rid, "ip": ip, "prompt_length": 100 + i})
        assert status == 200 and body["status"] == "OK"
        requests.append((rid, ip, 100 + i))
    expected = {ip: (10, sum(p for _, i2, p in requests if i2 == ip)) for ip in engines}
    assert loads(node, cluster) == expected

    # First tokens: the gateway's delete bodies carry its whole struct and no Content-Type.
    for rid, _, _ in requests[:25]:
        status, _, _ = node.call("DELETE", "/v1/load/prompt",
                                 raw=json.dumps({"request_id": rid, "cluster": "", "ip": ""}).encode())
        assert status == 200
    expected = {ip: (10, sum(p for r, i2, p in requests[25:] if i2 == ip)) for ip in engines}
    assert loads(node, cluster) == expected

    for rid, _, _ in requests:
        status, _, _ = node.call("DELETE", "/v1/load/stats", raw=json.dumps({"request_id": rid}).encode())
        assert status == 200
    assert loads(node, cluster) == {ip: (0, 0) for ip in engines}


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_is_413_and_changes_nothing(node, chunked):
    before = node.call("GET", "/v1/node/status")[2]["data"]["requests"]
    big = json.dumps({"cluster": "big", "request_id": "big", "ip": "10.0.0.1", "pad": "x" * 10000}).encode()
    headers = {"Content-Type": "application/json"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        status, body = raw_request(node, "POST", "/v1/load/stats", [big[i:i + 1000] for i in range(0, len(big), 1000)],
                                   headers)
    else:
        headers["Content-Length"] = str(len(big))
        status, body = raw_request(node, "POST", "/v1/load/stats", big, headers)
    assert status == 413
    assert body["status"] == "ERROR" and body["error"]["code"] == 40001413
    assert "4096 bytes" in body["error"]["reason"]
    assert node.call("GET", "/v1/node/status")[2]["data"]["requests"] == before
    assert loads(node, "big") == {}


def test_body_at_the_limit_is_accepted(node):
    body = {"cluster": "edge", "request_id": "edge-1", "ip": "10.0.0.9", "pad": ""}
    body["pad"] = "x" * (4096 - len(json.dumps(body).encode()))
    raw = json.dumps(body).encode()
    assert len(raw) == 4096
    status, _, _ = node.call("POST", "/v1/load/stats", raw=raw)
    assert status == 200


def test_text_content_type_is_still_json(node):
    status, _, body = node.call("POST", "/v1/load/stats",
                                raw=b'{"cluster":"ct","request_id":"ct1","ip":"10.0.0.1"}',
                                headers={"Content-Type": "text/plain"})
    assert status == 200, body
    assert loads(node, "ct") == {"10.0.0.1": (1, 0)}


def test_sigterm_stops_the_node_within_two_seconds():
    n = NodeProcess("127.0.0.1").start()
    n.call("POST", "/v1/load/stats", {"cluster": "c", "request_id": "r", "ip": "10.0.0.1"})
    took = n.stop()
    # twistd shuts down cleanly, then re-raises the signal it was given.
    assert n.process.returncode in (0, -15), n.log()
    assert "Server Shut Down" in n.log()
    assert took < 2.0, took


def run_twistd(*args, env=None):
    full_env = dict(os.environ, PYTHONPATH=REPO)
    full_env.update(env or {})
    return subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "metacenter", *args], env=full_env,
                          cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args,env,named", [
    (["--request-expire", "soon"], {}, "--request-expire"),
    (["--gc-interval", "-5s"], {}, "--gc-interval"),
    (["--max-body", "lots"], {}, "--max-body"),
    (["--log-level", "LOUD"], {}, "--log-level"),
    (["--listen", "nonsense:1"], {}, "--listen"),
    (["--listen", "tcp:notaport"], {}, "--listen"),
    ([], {"METADATA_CENTER_LOAD_GC_INTERVAL": "1x"}, "METADATA_CENTER_LOAD_GC_INTERVAL"),
    ([], {"REPLICA_CLIENT_TARGET_PORT": "99999"}, "--peer-port"),
    ([], {"POD_IP": "not-an-ip"}, "--advertise"),
])
def test_bad_configuration_stops_the_node_naming_the_option(args, env, named):
    result = run_twistd("--listen", "tcp:0:interface=127.0.0.1", *args, env=env)
    assert result.returncode != 0
    assert named in result.stdout + result.stderr


def test_config_file_and_precedence(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('request-expire = "2m"\nmax_body = "1KiB"\n')
    n = NodeProcess("127.0.0.1", None, "--config", str(config), "--max-body", "2048",
                    env={"METADATA_CENTER_LOAD_REQ_EXPIRE": "5m"})
    n.start()
    try:
        # The command line (2048) beats the file (1 KiB).
        pad = "x" * 1500
        status, _, _ = n.call("POST", "/v1/load/stats", {"cluster": "c", "request_id": "r", "ip": "10.0.0.1",
                                                          "pad": pad})
        assert status == 200
        status, _, _ = n.call("POST", "/v1/load/stats", {"cluster": "c", "request_id": "r2", "ip": "10.0.0.1",
                                                          "pad": pad * 2})
        assert status == 413
    finally:
        n.stop()
    bad = tmp_path / "bad.toml"
    bad.write_text("no-such-setting = 1\n")
    result = run_twistd("--listen", "tcp:0:interface=127.0.0.1", "--config", str(bad))
    assert result.returncode != 0 and "no-such-setting" in result.stdout + result.stderr


@pytest.mark.parametrize("access_log", [False, True])
def test_access_log_is_off_unless_asked_for(access_log):
    n = NodeProcess("127.0.0.1", None, *(["--access-log"] if access_log else []))
    n.start()
    try:
        n.call("GET", "/v1/load/stats?cluster=access-log-probe")
    finally:
        n.stop()
    assert ('"GET /v1/load/stats?cluster=access-log-probe HTTP/1.1" 200' in n.log()) == access_log, n.log()
