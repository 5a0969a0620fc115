"""`make run` as a user runs it: ARGS start a node on another port, and the
SIGTERM that stops make stops the node (twistd is exec'd, not left behind)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from nodeproc import REPO, free_port

VENV = os.path.dirname(os.path.dirname(sys.executable))


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def wait_until(predicate, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_with_args_serves_and_stops_with_make():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # VENV: the interpreter running the tests; -o: never reinstall here (the
    # install is `make`'s business, the signals are this test's).
    make = subprocess.Popen(
        ["make", "--no-print-directory", f"VENV={VENV}", "-o", f"{VENV}/.installed", "run",
         f"ARGS=--listen tcp:{port}:interface=127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz") or make.poll() is not None,
                   "the node on the ARGS port")
        assert make.poll() is None, make.stdout.read().decode()
        (node_pid,) = children(make.pid)
        assert any(part.endswith(b"twistd") for part in cmdline(node_pid)), cmdline(node_pid)

        make.send_signal(signal.SIGTERM)
        make.wait(20)
        wait_until(lambda: not alive(node_pid), "the node to exit after make got SIGTERM")
        assert not answers(f"http://127.0.0.1:{port}/readyz")
    finally:
        # Whatever is left of this test's own session (make started it in a
        # new one), e.g. a node that the SIGTERM did not reach.
        try:
            os.killpg(make.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        make.wait()
        make.stdout.close()
