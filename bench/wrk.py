"""Running wrk (Debian's, 4.1) with wrk_scripts/metacenter.lua, installing it
with apt-get when it is missing."""

import json
import os
import resource
import shutil
import subprocess

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk_scripts", "metacenter.lua")


def find_or_install(log=print, install=True):
    """Path of wrk, or None. Installs the Debian package if allowed."""
    path = shutil.which("wrk")
    if path or not install:
        return path
    apt = shutil.which("apt-get")
    if not apt:
        log("wrk is missing and there is no apt-get: falling back to bench.http_load")
        return None
    log("wrk is missing: apt-get install -y wrk")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        log("not root and no sudo: falling back to bench.http_load")
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

    def apt_get(*words):
        return subprocess.run([*sudo, apt, *words], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=600).returncode == 0

    if not apt_get("install", "-y", "-q", "wrk"):
        apt_get("update", "-q") and apt_get("install", "-y", "-q", "wrk")
    path = shutil.which("wrk")
    if not path:
        log("apt-get could not install wrk: falling back to bench.http_load")
    return path


def version(path):
    if not path:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].split(" [")[0].strip() if text else None


def run(wrk_path, url, mode, args, connections, seconds, cores=None, timeout_s=5):
    """One wrk run; returns the script's summary plus rate and wrk's own CPU
    seconds. ``args``: the script arguments after MODE."""
    prefix = cores.client_prefix() if cores else []
    cmd = [*prefix, wrk_path, "-t", str(connections), "-c", str(connections), "-d", f"{int(seconds)}s",
           "--timeout", f"{timeout_s}s", "-s", SCRIPT, url, "--", mode, *map(str, args)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=bool(cores and cores.new_session))
    if cores:
        cores.prioritise(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(cmd)}\n{stdout}\n{stderr}")
    out = json.loads(line[len("BENCHJSON "):])
    out["seconds"] = out.pop("duration_us") / 1e6
    out["rate"] = out["requests"] / out["seconds"] if out["seconds"] else 0.0
    out["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out["client_cpu_util"] = out["client_cpu_s"] / out["seconds"] if out["seconds"] else 0.0
    out["non_2xx_or_errors"] = sum(out["errors"].values())
    return out
