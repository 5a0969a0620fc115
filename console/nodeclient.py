"""Blocking HTTP calls to one node with the standard library, envelope decoded.

Called from worker threads only, so a slow node costs a thread, never the UI.
"""

import http.client
import json
import socket
import time
from urllib.parse import urlsplit


class NodeUnreachable(Exception):
    """No HTTP answer: refused, reset, timed out, name not resolved."""


class NodeApiError(Exception):
    """An HTTP answer that is not an OK envelope."""

    def __init__(self, http_status, message):
        super().__init__(message)
        self.http_status = http_status


def split_target(url):
    """``http://host:port`` -> (scheme, host, port); IPv6 hosts come without brackets."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port


def normalize_target(url):
    """The canonical spelling used as a node's identity in the console."""
    scheme, host, port = split_target(url)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


def target_label(target):
    """``http://10.0.0.1:8080`` -> ``10.0.0.1:8080`` for narrow table cells."""
    return target.split("://", 1)[-1]


class NodeClient:
    """One node; every call has its own deadline of ``timeout`` seconds."""

    def __init__(self, target, timeout=2.0):
        self.target = target
        self.scheme, self.host, self.port = split_target(target)
        self.timeout = timeout

    def _connection(self, timeout):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def request(self, method, path, body=None, deadline=None):
        """Returns (http status, decoded envelope or None when not JSON)."""
        timeout = self.timeout
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise NodeUnreachable(f"timed out after {self.timeout:g}s")
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection = self._connection(timeout)
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            status = response.status
        except (socket.timeout, TimeoutError):
            raise NodeUnreachable(f"timed out after {self.timeout:g}s") from None
        except ConnectionRefusedError:
            raise NodeUnreachable("connection refused") from None
        except (OSError, http.client.HTTPException) as exc:
            raise NodeUnreachable(str(exc) or type(exc).__name__) from None
        finally:
            connection.close()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    def data(self, method, path, body=None, deadline=None):
        """The envelope's ``data`` of an OK answer; anything else raises
        ``NodeApiError`` with the node's own reason when it gave one."""
        status, envelope = self.request(method, path, body, deadline)
        if not isinstance(envelope, dict) or "status" not in envelope:
            raise NodeApiError(status, f"HTTP {status} without a JSON envelope on {path}")
        if envelope.get("status") != "OK" or status >= 400:
            error = envelope.get("error") or {}
            reason = error.get("reason") or error.get("message") or "no reason given"
            raise NodeApiError(status, f"HTTP {status} on {path}: {reason}")
        return envelope.get("data")

    def get(self, path, deadline=None):
        return self.data("GET", path, deadline=deadline)

    def set_log_level(self, level):
        return self.data("POST", "/log/level", {"LevelParam": level})

    def reset_engine(self, cluster, ip):
        """DELETE /v1/load/engine: ``{"released_requests", "cache_blocks"}``."""
        return self.data("DELETE", "/v1/load/engine", {"cluster": cluster, "ip": ip})
