"""The settings table: Go durations, one precedence (command line > environment
> config file > default), and errors that name the option."""

import math

import pytest

from metacenter.runtime import config
from metacenter.runtime.config import ConfigError, parse_duration, resolve
from metacenter.runtime.tap import Options


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("60s", 60.0),
        ("11m", 660.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("1h0m0.5s", 3600.5),
        (".5s", 0.5),
        ("2.s", 2.0),
        ("250us", 250e-6),
        ("250µs", 250e-6),  # U+00B5 MICRO SIGN
        ("250μs", 250e-6),  # U+03BC GREEK SMALL LETTER MU
        ("100ns", 100e-9),
        ("1m1ms", 60.001),
        ("-1m", -60.0),
        ("+2s", 2.0),
        ("0", 0.0),
        ("90", 90.0),  # a bare number is seconds
        ("2.5", 2.5),
        (" 60s ", 60.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_accepts_go_syntax_and_bare_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "-", "s", "1x", "1h 30m", "1.2.3s", "1e3s", "1e3", "1_000", "60 s", "1hh", "m1",
     "nan", "inf", "-inf", "infinity", math.nan, math.inf, True, None, [60], {"s": 1}],
)
def test_parse_duration_rejects_anything_else_with_a_value_error(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def write_toml(tmp_path, text):
    path = tmp_path / "metacenter.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# (setting, command line value, environment, file value, parsed values cl/env/file, default)
PRECEDENCE_CASES = [
    ("request-expire", "2m", ("METADATA_CENTER_LOAD_REQ_EXPIRE", "3m"), '"4m"', (120.0, 180.0, 240.0), 660.0),
    ("gc-interval", "5s", ("METADATA_CENTER_LOAD_GC_INTERVAL", "6s"), "7", (5.0, 6.0, 7.0), 60.0),
    ("peer-port", "81", ("REPLICA_CLIENT_TARGET_PORT", "82"), "83", (81, 82, 83), 80),
    ("log-level", "debug", ("METACENTER_LOG_LEVEL", "warn"), '"error"', ("DEBUG", "WARN", "ERROR"), "INFO"),
    ("advertise", "10.0.0.1", ("POD_IP", "10.0.0.2,fd00::2"), '["10.0.0.3"]',
     (("10.0.0.1",), ("10.0.0.2", "fd00::2"), ("10.0.0.3",)), ()),
    ("peer", ["a:1", "[::1]:2"], ("METACENTER_PEERS", "b:3,c:4"), '["d:5"]',
     ((("a", 1), ("::1", 2)), (("b", 3), ("c", 4)), (("d", 5),)), ()),
    ("max-body", "1MiB", ("METACENTER_MAX_BODY", "64KiB"), "4096", (1024**2, 64 * 1024, 4096), 65536),
]


@pytest.mark.parametrize("case", PRECEDENCE_CASES, ids=[c[0] for c in PRECEDENCE_CASES])
def test_command_line_beats_environment_beats_file_beats_default(tmp_path, case):
    name, cl_value, (env_name, env_value), file_value, (from_cl, from_env, from_file), default = case
    attribute = name.replace("-", "_")
    path = write_toml(tmp_path, f"{name} = {file_value}\n")
    environ = {env_name: env_value}
    assert getattr(resolve({name: cl_value}, environ, path), attribute) == from_cl
    assert getattr(resolve({}, environ, path), attribute) == from_env
    assert getattr(resolve({}, {}, path), attribute) == from_file
    assert getattr(resolve({}, {}, None), attribute) == default
    # An empty variable counts as unset.
    assert getattr(resolve({}, {env_name: ""}, path), attribute) == from_file


def test_every_setting_has_its_default_when_nothing_is_given():
    resolved = resolve({}, {})
    for setting in config.SETTINGS:
        assert getattr(resolved, config.attribute_name(setting.name)) == setting.default


def test_file_keys_may_use_underscores_and_a_metacenter_table(tmp_path):
    path = write_toml(tmp_path, '[metacenter]\nrequest_expire = "1m"\ntombstone-ttl = "90s"\n')
    resolved = resolve({}, {}, path)
    assert (resolved.request_expire, resolved.tombstone_ttl) == (60.0, 90.0)


def test_flag_not_given_leaves_the_environment_in_charge():
    """twistd's Options give an unset flag as 0, not None."""
    environ = {"METACENTER_ACCESS_LOG": "true"}
    assert resolve({"access-log": 0}, environ).access_log is True
    assert resolve({"access-log": 1}, {"METACENTER_ACCESS_LOG": "false"}).access_log is True
    assert resolve({"access-log": 0}, {}).access_log is False


def test_the_twistd_options_resolve_through_the_same_precedence(tmp_path, monkeypatch):
    path = write_toml(tmp_path, 'peer-port = 83\nrequest-expire = "4m"\naccess-log = true\n')
    monkeypatch.setenv("REPLICA_CLIENT_TARGET_PORT", "82")
    monkeypatch.delenv("METACENTER_ACCESS_LOG", raising=False)
    monkeypatch.delenv("METADATA_CENTER_LOAD_REQ_EXPIRE", raising=False)
    options = Options()
    options.parseOptions(["--config", path, "--peer", "a:1", "--peer", "b:2"])
    resolved = options.resolved
    assert resolved.peer_port == 82
    assert resolved.request_expire == 240.0
    assert resolved.access_log is True
    assert resolved.peer == (("a", 1), ("b", 2))


@pytest.mark.parametrize(
    "command_line, environ, where",
    [
        ({"request-expire": "soon"}, {}, "--request-expire (command line)"),
        ({"request-expire": "0s"}, {}, "--request-expire (command line)"),
        ({}, {"METADATA_CENTER_LOAD_REQ_EXPIRE": "-5m"}, "--request-expire (environment METADATA_CENTER_LOAD_REQ_EXPIRE)"),
        ({}, {"REPLICA_CLIENT_TARGET_PORT": "65536"}, "--peer-port (environment REPLICA_CLIENT_TARGET_PORT)"),
        ({}, {"POD_IP": "10.0.0.1,not-an-ip"}, "--advertise (environment POD_IP)"),
        ({"log-level": "loud"}, {}, "--log-level (command line)"),
        ({"peer": ["nohost"]}, {}, "--peer (command line)"),
        ({}, {"METACENTER_ACCESS_LOG": "maybe"}, "--access-log (environment METACENTER_ACCESS_LOG)"),
        ({}, {"METACENTER_MAX_BODY": "0"}, "--max-body (environment METACENTER_MAX_BODY)"),
        ({}, {"METACENTER_DNS_SERVER": "10.0.0.1"}, "--dns-server (environment METACENTER_DNS_SERVER)"),
    ],
)
def test_a_bad_value_names_the_option_and_where_it_came_from(command_line, environ, where):
    with pytest.raises(ConfigError) as raised:
        resolve(command_line, environ)
    assert str(raised.value).startswith(where + ":")


@pytest.mark.parametrize(
    "line, option",
    [
        ('request-expire = ""', "--request-expire"),
        ("request-expire = nan", "--request-expire"),
        ("gc-interval = inf", "--gc-interval"),
        ("replica-max-idle-conns = 1.5", "--replica-max-idle-conns"),
        ("peer-port = true", "--peer-port"),
        ("listen = [\"tcp:1\"]", "--listen"),
        ("cluster-secret = 42", "--cluster-secret"),
        ("access-log = \"sometimes\"", "--access-log"),
        ("max-body = 1.5", "--max-body"),
    ],
)
def test_a_bad_value_in_the_file_names_the_option(tmp_path, line, option):
    path = write_toml(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as raised:
        resolve({}, {}, path)
    assert str(raised.value).startswith(f"{option} (config file):")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("request-expiry = \"1m\"\n", "unknown setting 'request-expiry'"),
        ("[server]\nlisten = \"tcp:1\"\n", "unknown setting 'server'"),
        ("config = \"other.toml\"\n", "unknown setting 'config'"),
        ("listen = \"tcp:1\"\n[metacenter]\npeer-port = 81\n", "outside the [metacenter] table"),
        ("request_expire = \"1m\"\nrequest-expire = \"2m\"\n", "given twice"),
        ("listen = \n", "not valid TOML"),
    ],
)
def test_the_file_is_rejected_rather_than_partly_ignored(tmp_path, text, fragment):
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError, match="^--config: ") as raised:
        resolve({}, {}, path)
    assert fragment in str(raised.value)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        resolve({}, {}, str(tmp_path / "absent.toml"))


def test_values_are_read_only_attributes():
    resolved = resolve({}, {})
    assert resolved.listen == "tcp:8080"
    with pytest.raises(AttributeError):
        resolved.no_such_setting


def test_max_leases_from_the_command_line_the_environment_or_its_default():
    assert config.resolve({}, {}).max_leases == 10_000
    assert config.resolve({}, {"METACENTER_MAX_LEASES": "5"}).max_leases == 5
    assert config.resolve({"max-leases": "7"}, {"METACENTER_MAX_LEASES": "5"}).max_leases == 7
    with pytest.raises(config.ConfigError, match="--max-leases"):
        config.resolve({"max-leases": "0"}, {})


def test_gc_freeze_interval_may_be_zero_but_not_negative():
    assert config.resolve({}, {}).gc_freeze_interval == 60.0
    assert config.resolve({"gc-freeze-interval": "0"}, {}).gc_freeze_interval == 0.0
    assert config.resolve({}, {"METACENTER_GC_FREEZE_INTERVAL": "5m"}).gc_freeze_interval == 300.0
    with pytest.raises(config.ConfigError, match="--gc-freeze-interval"):
        config.resolve({"gc-freeze-interval": "-1s"}, {})
