"""Start and stop real `twistd metacenter` processes for tests.

The node runs from this source tree (PYTHONPATH), through the twistd script of
the interpreter running the tests, so the tree's plugin and package are what is
tested, whatever is installed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host, port):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def shared_port(hosts):
    """A port free on every one of ``hosts`` (loopback addresses), so nodes
    on them can share one port, as a Kubernetes Service's pods do."""
    for _ in range(50):
        port = free_port(hosts[0])
        if all(port_is_free(host, port) for host in hosts):
            return port
    raise RuntimeError("no port free on every loopback address")


class NodeProcess:
    """One node: ``NodeProcess(host, port, *extra_args).start()``; ``.url``;
    ``.stop()`` sends SIGTERM and waits."""

    def __init__(self, host="127.0.0.1", port=None, *args, env=None):
        self.host = host
        self.port = port or free_port(host)
        self.args = list(args)
        self.env = env or {}
        self.process = None
        self.log_path = None

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def command(self):
        listen = f"tcp:{self.port}:interface={self.host.replace(':', chr(92) + ':')}"
        return [TWISTD, "--nodaemon", "--pidfile=", "metacenter", "--listen", listen, *self.args]

    def start(self, wait_ready=False, timeout=20.0):
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env)
        fd, self.log_path = tempfile.mkstemp(prefix="metacenter-node-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir()
        )
        self.wait_for("/readyz" if wait_ready else "/livez", timeout)
        return self

    def wait_for(self, path, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node {self.url} not answering {path} after {timeout}s:\n{self.log()}")

    def log(self):
        if not self.log_path:
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self, timeout=5.0):
        """SIGTERM, then wait; returns the seconds it took to exit."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._log.close()
        return time.monotonic() - started

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self._log.close()

    # -- blocking HTTP helpers (for set-up and assertions outside the reactor) --

    def call(self, method, path, body=None, headers=None, raw=None, timeout=5.0):
        """Returns (status, headers, parsed JSON or raw bytes)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, payload = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, payload = e.code, e.headers, e.read()
        try:
            return status, hdrs, json.loads(payload)
        except ValueError:
            return status, hdrs, payload
