"""The requests of the benchmark, as raw HTTP/1.1 bytes, for our own load
generator (bench.http_load). They mirror wrk_scripts/metacenter.lua exactly:
same request ids (UUID-shaped, 36 characters), same engines, same bodies.
"""

import json
import random

LOAD_PATH = "/v1/load/stats"
PROMPT_PATH = "/v1/load/prompt"


def request_id(nonce, tid, n):
    return f"{nonce}-{tid:04x}-4000-8000-{n:012x}"


def engine_ip(index):
    return f"10.{100 + index // 65536}.{(index // 256) % 256}.{index % 256}"


def engine_of(tid, n, engines):
    return engine_ip((tid * 7 + n) % engines)


def new_nonce(rng=random):
    return f"{rng.getrandbits(32):08x}"


class Requests:
    """Builds request bytes for one server (Host header)."""

    def __init__(self, host, port):
        self.host = f"{host}:{port}".encode()

    def raw(self, method, path, body=None, content_type=b"application/json"):
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode(), self.host)
        if body is None:
            return head + b"\r\n"
        if content_type:
            head += b"Content-Type: " + content_type + b"\r\n"
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def add(self, cluster, nonce, tid, n, engines):
        body = ('{"cluster":"%s","request_id":"%s","prompt_length":%d,"ip":"%s"}'
                % (cluster, request_id(nonce, tid, n), 1000 + (n * 37) % 4000, engine_of(tid, n, engines)))
        return self.raw("POST", LOAD_PATH, body.encode())

    def add_engine(self, cluster, rid, ip, prompt_length=0):
        body = json.dumps({"cluster": cluster, "request_id": rid, "prompt_length": prompt_length, "ip": ip})
        return self.raw("POST", LOAD_PATH, body.encode())

    def delete(self, path, rid):
        # The gateway serialises its whole request struct, with no Content-Type.
        body = '{"request_id":"%s","cluster":"","ip":""}' % rid
        return self.raw("DELETE", path, body.encode(), content_type=None)

    def query(self, cluster):
        return self.raw("GET", f"{LOAD_PATH}?cluster={cluster}")

    def gateway_sequence(self, cluster, nonce, tid, n, engines):
        """The six requests of one routed request, in the gateway's order."""
        rid = request_id(nonce, tid, n)
        q = self.query(cluster)
        return [self.add(cluster, nonce, tid, n, engines), q, self.delete(PROMPT_PATH, rid), q,
                self.delete(LOAD_PATH, rid), q]

    def gateway_stream(self, cluster, nonce, tid, engines):
        n = 0
        while True:
            yield from self.gateway_sequence(cluster, nonce, tid, n, engines)
            n += 1

    def add_stream(self, cluster, nonce, tid, engines, start=0):
        n = start
        while True:
            yield self.add(cluster, nonce, tid, n, engines)
            n += 1

    def cache_save(self, cluster, ip, hashes):
        body = '{"cluster":"%s","ip":"%s","prompt_hash":[%s]}' % (cluster, ip, ",".join(map(str, hashes)))
        return self.raw("POST", "/v1/cache/save", body.encode())


def cache_query_body(cluster, hashes, topk=10):
    return '{"cluster":"%s","prompt_hash":[%s],"topk":%d}' % (cluster, ",".join(map(str, hashes)), topk)


def _cycle(items, start):
    n = start
    while True:
        yield items[n % len(items)]
        n += 1


def streams(reqs, mode, connections, cluster, nonce, engines, per_thread=None, lines=None, tail=0, salt=0):
    """One iterator of request bytes per connection, the Python twin of the
    Lua script's modes (used when wrk is unavailable)."""
    out = []
    for tid in range(connections):
        if mode == "gateway":
            out.append(reqs.gateway_stream(cluster, nonce, tid, engines))
        elif mode == "add":
            out.append(reqs.add_stream(cluster, nonce, tid, engines))
        elif mode in ("prompt", "delete"):
            path = PROMPT_PATH if mode == "prompt" else LOAD_PATH
            limit = max(1, per_thread[tid] if per_thread and tid < len(per_thread) else 1)
            out.append(_deletes(reqs, path, nonce, tid, limit))
        elif mode == "query":
            out.append(_cycle([reqs.query(cluster)], 0))
        elif mode == "cache_query":
            bodies = [reqs.raw("POST", "/v1/cache/query", line.encode()) for line in lines]
            out.append(_cycle(bodies, tid * 7919))
        elif mode == "cache_save":
            out.append(_cache_saves(reqs, cluster, lines, tid, tail, salt))
        else:
            raise ValueError(f"unknown mode {mode}")
    return out


def _deletes(reqs, path, nonce, tid, limit):
    n = 0
    while True:
        yield reqs.delete(path, request_id(nonce, tid, n % limit))
        n += 1


def _cache_saves(reqs, cluster, lines, tid, tail, salt):
    parsed = [line.split("\t", 1) for line in lines]
    n = tid * 7919
    while True:
        ip, prefix = parsed[n % len(parsed)]
        base = (salt * 64 + tid) * 4294967296 + n * 1024
        hashes = prefix + ("," + ",".join(str(base + i) for i in range(tail)) if tail else "")
        body = '{"cluster":"%s","ip":"%s","prompt_hash":[%s]}' % (cluster, ip, hashes)
        yield reqs.raw("POST", "/v1/cache/save", body.encode())
        n += 1
