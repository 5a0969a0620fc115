"""The processes a benchmark measures: a real ``twistd metacenter`` node run
from this source tree, and the bare ``twisted.web`` ceiling (bench.ceiling).

Both are pinned to the server core when ``taskset`` exists and the machine
has two cores or more; the harness and the load generators stay on the
other. CPU time and RSS are read from /proc.

The harness pins itself to the load generator's core, and a child process
inherits that one-core affinity; so the cores a bench may use are passed to
child processes in ``METACENTER_BENCH_CPUS`` (``Cores.pin_self`` sets it),
not read from the child's own affinity.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS_ENV = "METACENTER_BENCH_CPUS"  # comma-separated core ids the bench may use


# -- cores ---------------------------------------------------------------------


def usable_cpus():
    """The core ids the bench may use: those the harness was given
    (``CPUS_ENV``, set by the harness before it pinned itself), else this
    process's affinity."""
    text = os.environ.get(CPUS_ENV, "")
    try:
        given = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        given = set()
    return sorted(given) if given else sorted(os.sched_getaffinity(0))


class Cores:
    """Which core the server gets and which the load generator gets."""

    def __init__(self, pin=True, nice=0):
        self.nice = nice  # raise the servers' and load generator's priority by this much (root)
        cpus = usable_cpus()
        self.taskset = shutil.which("taskset")
        self.pinned = bool(pin and self.taskset and len(cpus) >= 2)
        if self.pinned:
            self.server, self.client = cpus[0], cpus[1]
        else:
            self.server = self.client = None
        self.available = cpus

    def describe(self):
        priority = f", priority raised by {self.nice} (nice -{self.nice})" if self.nice else ""
        if self.pinned:
            return (f"server on core {self.server}, load generator and harness on core {self.client} "
                    f"(taskset){priority}")
        why = "no taskset" if not self.taskset else "fewer than 2 cores" if len(self.available) < 2 else "--no-pin"
        return f"not pinned ({why}){priority}"

    def prioritise(self, pid=0):
        """Raise a process's priority by ``nice``. With scheduler autogroups
        (one per session) nice only ranks processes within their group, so
        the group's nice is raised too: the servers and wrk are started in
        sessions of their own for that (``new_session``)."""
        if not self.nice:
            return
        os.setpriority(os.PRIO_PROCESS, pid, -self.nice)
        try:
            with open(f"/proc/{pid or 'self'}/autogroup", "w") as f:
                f.write(str(-self.nice))
        except OSError:
            pass  # no autogroups (or not allowed): plain nice it is

    @property
    def new_session(self):
        return bool(self.nice)

    def server_prefix(self):
        return [self.taskset, "-c", str(self.server)] if self.pinned else []

    def client_prefix(self):
        return [self.taskset, "-c", str(self.client)] if self.pinned else []

    def pin_self(self):
        """Moves this process to the load generator's core. Its children
        inherit that affinity, so they learn the bench's cores from
        ``CPUS_ENV`` instead (else a child bench would see one core and
        not pin at all)."""
        os.environ[CPUS_ENV] = ",".join(map(str, self.available))
        if self.pinned:
            os.sched_setaffinity(0, {self.client})
        self.prioritise()


# -- /proc ---------------------------------------------------------------------


def steal_seconds(core=None):
    """Seconds the hypervisor gave core ``core``'s time to something else
    while it had work (``/proc/stat``'s steal column; all cores if None).
    Counted in USER_HZ ticks (10 ms), so it tells a host pause of tens of
    milliseconds from one of the node's own; 0.0 where no steal is
    reported."""
    name = "cpu" if core is None else f"cpu{core}"
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == name:
                    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid):
    """User + system CPU seconds the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- processes -----------------------------------------------------------------


def _die_with_parent():
    """preexec_fn: SIGTERM this child when the harness dies, even by SIGKILL
    (the servers live in sessions of their own, nothing else would stop them)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """A server process on 127.0.0.1:port."""

    name = "server"

    def __init__(self, cores, host="127.0.0.1", port=None):
        self.cores = cores
        self.host = host
        self.port = port or free_port(host)
        self.process = None
        self.log_path = None
        self._log = None

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self):
        return self.process.pid

    def command(self):
        raise NotImplementedError

    def start(self, timeout=30.0):
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        fd, self.log_path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(self.cores.server_prefix() + self.command(), stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir(),
                                        start_new_session=self.cores.new_session, preexec_fn=_die_with_parent)
        self.cores.prioritise(self.process.pid)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} at {self.url} not ready after {timeout}s:\n{self.log()}")

    ready_path = "/"

    def log(self):
        if not self.log_path:
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]

    def cpu_seconds(self):
        return cpu_seconds(self.pid)

    def rss_bytes(self):
        return rss_bytes(self.pid)

    def stop(self, timeout=10.0):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log:
            self._log.close()
            self._log = None
        if self.log_path and os.path.exists(self.log_path):
            os.unlink(self.log_path)
            self.log_path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Node(Server):
    """``twistd --nodaemon metacenter`` from this tree (the tree's plugin and
    package, whatever is installed), optionally under cProfile."""

    name = "node"
    ready_path = "/livez"

    def __init__(self, cores, *args, profile_to=None, **kwargs):
        super().__init__(cores, **kwargs)
        self.args = list(args)
        self.profile_to = profile_to

    def command(self):
        listen = f"tcp:{self.port}:interface={self.host}"
        args = ["--nodaemon", "--pidfile=", "metacenter", "--listen", listen, *self.args]
        if self.profile_to:
            return [sys.executable, "-m", "bench.profiled", self.profile_to, *args]
        return [TWISTD, *args]

    def call(self, method, path, body=None, timeout=10.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def status(self):
        code, body = self.call("GET", "/v1/node/status")
        return body.get("data") if code == 200 and isinstance(body, dict) else None


class Ceiling(Server):
    name = "ceiling"

    def command(self):
        return [sys.executable, "-m", "bench.ceiling", "--host", self.host, "--port", str(self.port)]


def run_child(module, quick, seconds, cores, log, timeout):
    """Runs ``python -m MODULE --json`` (a bench section whose reactor must
    run in a process of its own), relays its stderr lines to ``log`` and
    returns the JSON object it prints last. ``cores``: the harness's pinning
    (its child is not pinned when the harness is not)."""
    cmd = [sys.executable, "-m", module, "--json"] + (["--quick"] if quick else [])
    if cores is not None and not cores.pinned:
        cmd.append("--no-pin")
    if seconds:
        cmd += ["--seconds", str(seconds)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited with {proc.returncode}: {proc.stderr[-3000:]}")
    for line in proc.stderr.splitlines():
        log(line)
    return json.loads(proc.stdout.strip().splitlines()[-1])
