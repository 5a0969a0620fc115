"""Start-up errors through real `twistd metacenter` processes: one line on
stderr naming the option and the value (or the address), a hint, no usage
dump, no traceback, and a non-zero exit status."""

import os
import socket
import subprocess

import pytest

from metacenter.runtime.config import SETTINGS
from tests.nodeproc import REPO, TWISTD

HINT = "(see: twistd metacenter --help)"


def run_twistd(*args, env=None, cwd=None):
    environ = {k: v for k, v in os.environ.items() if not any(k in s.env for s in SETTINGS)}
    environ["PYTHONPATH"] = REPO + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(env or {})
    return subprocess.run([TWISTD, "--nodaemon", "--pidfile=", *args], capture_output=True, text=True,
                          env=environ, cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    "args, env, toml, expected",
    [
        (["--request-expire", "soon"], {}, None, "--request-expire (command line): expected a duration"),
        (["--log-format", "xml"], {}, None, "--log-format (command line): expected one of text json, got 'xml'"),
        (["--listen", "carrier-pigeon:8080"], {}, None, "--listen (command line): not a usable endpoint"),
        ([], {"METACENTER_MAX_BODY": "0"}, None, "--max-body (environment METACENTER_MAX_BODY): "),
        ([], {"METACENTER_LOG_FORMAT": "yaml"}, None, "--log-format (environment METACENTER_LOG_FORMAT): "),
        ([], {}, "peer-port = 70000\n", "--peer-port (config file): expected a port number 1-65535, got 70000"),
        ([], {}, "request_expiry = \"1m\"\n", "unknown setting 'request_expiry'"),
        (["--bogus"], {}, None, "option --bogus not recognized"),
        (["--listen"], {}, None, "option --listen requires argument"),
        (["tcp:8080"], {}, None, "unexpected argument 'tcp:8080'"),
    ],
)
def test_a_bad_setting_prints_one_line_and_exits_2(tmp_path, args, env, toml, expected):
    if toml is not None:
        path = tmp_path / "metacenter.toml"
        path.write_text(toml)
        args = ["--config", str(path), *args]
    result = run_twistd("metacenter", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("twistd metacenter: ")
    assert expected in lines[0]
    assert lines[0].endswith(HINT)


def test_the_line_names_the_value_given(tmp_path):
    result = run_twistd("metacenter", "--tombstone-ttl", "-3s", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("twistd metacenter: --tombstone-ttl (command line): must be a positive duration, "
                             f"got '-3s' {HINT}\n")


def test_json_logs_and_a_twistd_log_observer_are_refused_together(tmp_path):
    result = run_twistd("--syslog", "metacenter", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"twistd metacenter: --log-format json: twistd's --syslog also chooses the log format; give one or the "
        f"other {HINT}"]


def test_help_still_prints_the_usage(tmp_path):
    result = run_twistd("metacenter", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--listen=" in result.stdout and "--log-format=" in result.stdout


def test_a_port_in_use_prints_one_line_without_a_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd("metacenter", "--listen", f"tcp:{port}:interface=127.0.0.1", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"cannot listen on 127.0.0.1:{port}: address already in use (set --listen)"]
    assert "Traceback" not in result.stdout and "CannotListenError" not in result.stdout
    # The log itself carries only twistd's start-up lines, not the failure again.
    assert "address already in use" not in result.stdout
