"""Every setting of a node, in one table, with one precedence:
command line > environment > config file (TOML) > default.

Each setting is declared once in ``SETTINGS``; ``tap.Options`` is generated from
it, and ``resolve`` turns options, environment and file into a ``Config``. A bad
value anywhere raises ``ConfigError`` naming the option, so a node never starts
with a silently ignored setting.
"""

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field


class ConfigError(ValueError):
    pass


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_BARE_SECONDS = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text):
    """Go duration syntax ("60s", "11m", "1h30m", "500ms") to seconds; a bare
    number is taken as seconds. Never NaN or infinite."""
    error = ValueError(f"expected a duration such as 60s, 11m or 500ms, got {text!r}")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise error
        return float(text)
    if not isinstance(text, str):
        raise error
    s = text.strip()
    if _BARE_SECONDS.fullmatch(s):
        return float(s)
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise error
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise error
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not math.isfinite(total):
        raise error
    return sign * total


def positive_duration(text):
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be a positive duration, got {text!r}")
    return value


def ack_delay(text):
    """A replication ack delay: [0, 1 s]; a sender drops a peer that
    acknowledges nothing for 10 s, so a delay must stay far below that."""
    value = parse_duration(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a duration from 0s to 1s, got {text!r}")
    return value


def duration_or_off(text):
    """A duration, or 0 for off."""
    value = parse_duration(text)
    if value < 0:
        raise ValueError(f"must be a duration (0: off), got {text!r}")
    return value


def lease_duration(text):
    """A lease TTL: a duration in [1 s, 300 s] (a keepalive's ttl_ms range)."""
    value = parse_duration(text)
    if not 1.0 <= value <= 300.0:
        raise ValueError(f"must be a duration from 1s to 300s, got {text!r}")
    return value


def positive_int(text):
    # int(1.5) would be 1: a float from the file is refused, not truncated.
    if isinstance(text, (bool, float)):
        raise ValueError(f"expected a positive integer, got {text!r}")
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def port_number(text):
    value = positive_int(text)
    if value > 65535:
        raise ValueError(f"expected a port number 1-65535, got {text!r}")
    return value


def byte_size(text):
    """1048576, "64KiB", "1MiB", "64k"."""
    if isinstance(text, int) and not isinstance(text, bool):
        return positive_int(text)
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"expected a size such as 65536, 64KiB or 1MiB, got {text!r}")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return positive_int(int(m.group(1)) * factor)


def boolean(text):
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")


def log_level(text):
    level = str(text).strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {' '.join(LOG_LEVELS)}, got {text!r}")
    return level


LOG_FORMATS = ("text", "json")


def log_format(text):
    value = str(text).strip().lower() if isinstance(text, str) else text
    if value not in LOG_FORMATS:
        raise ValueError(f"expected one of {' '.join(LOG_FORMATS)}, got {text!r}")
    return value


def ip_address(text):
    try:
        return str(ipaddress.ip_address(str(text).strip()))
    except ValueError:
        raise ValueError(f"expected an IP address, got {text!r}") from None


def host_port(text):
    """HOST:PORT or [V6]:PORT."""
    s = str(text).strip()
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", s)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    return host, port_number(m.group(2) or m.group(4))


def endpoint_description(text):
    """A Twisted server endpoint description (tcp:8080, ssl:8443:privateKey=...),
    checked now so that a typo stops the node with the option's name."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected an endpoint such as tcp:8080, got {text!r}")
    try:
        # Parsing only: the endpoint is built on a reactor that never listens.
        serverFromString(MemoryReactor(), text)
    except Exception as e:
        raise ValueError(f"not a usable endpoint description ({e}): {text!r}") from None
    return text


def replication_endpoint(text):
    """``auto`` (the interface of --listen, a port the system picks), ``none``
    (no stream: HTTP replication only, as before) or a server endpoint."""
    if isinstance(text, str) and text.strip().lower() in ("auto", "none"):
        return text.strip().lower()
    return endpoint_description(text)


def text_value(text):
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {text!r}")
    return text


def secret_list(text):
    """Cluster secrets, comma separated in one value (the environment) or
    given several times / as a TOML list; the first signs, any verifies. A
    secret cannot contain a comma; spaces around one are dropped."""
    items = text if isinstance(text, (list, tuple)) else [text]
    secrets = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected a string or a list of strings, got {item!r}")
        for number, part in enumerate(item.split(","), 1):
            part = part.strip()
            if not part:
                raise ValueError(f"secret {number} of {item.count(',') + 1} in this value is empty")
            if part not in secrets:
                secrets.append(part)
    return tuple(secrets)


def ip_list(text):
    """One or more IP addresses, comma separated (POD_IP, --advertise)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [p for p in str(text).split(",") if p.strip()]
    return tuple(ip_address(p) for p in items)


def host_port_list(text):
    """HOST:PORT items, comma separated in one value or given as a list."""
    items = text if isinstance(text, (list, tuple)) else [text]
    return tuple(host_port(p) for item in items for p in str(item).split(",") if p.strip())


@dataclass(frozen=True)
class Setting:
    name: str  # command line option, also the config file key (dashes or underscores)
    parse: object
    default: object
    help: str
    env: tuple = ()
    flag: bool = False  # a command line switch without a value
    repeatable: bool = False  # may be given several times (a list)


SETTINGS = (
    # -- the node ---------------------------------------------------------------
    Setting("listen", endpoint_description, "tcp:8080", "Twisted endpoint to serve the API on (e.g. tcp:8080, ssl:8443:...)."),
    Setting("request-expire", positive_duration, 660.0,
            "A request older than this is removed as if deleted; engines and clusters idle this long go too.",
            env=("METADATA_CENTER_LOAD_REQ_EXPIRE",)),
    Setting("gc-interval", positive_duration, 60.0, "How often expired requests, tombstones and engines are swept.",
            env=("METADATA_CENTER_LOAD_GC_INTERVAL",)),
    Setting("tombstone-ttl", positive_duration, 60.0,
            "How long a delete is remembered, so that a late or repeated add changes nothing.",
            env=("METACENTER_TOMBSTONE_TTL",)),
    Setting("lease-ttl", lease_duration, 10.0,
            "Default TTL of a gateway lease (a keepalive or an add that names a lease without ttl_ms); "
            "from 1s to 300s.", env=("METACENTER_LEASE_TTL",)),
    Setting("max-body", byte_size, 65536, "Largest accepted request body in bytes; larger ones get 413.",
            env=("METACENTER_MAX_BODY",)),
    Setting("log-level", log_level, "INFO", "Initial log level (TRACE DEBUG INFO WARN ERROR FATAL).",
            env=("METACENTER_LOG_LEVEL",)),
    Setting("log-format", log_format, "text",
            "text: twistd's lines; json: one JSON object per line (time, level, namespace, message, fields).",
            env=("METACENTER_LOG_FORMAT",)),
    Setting("access-log", boolean, False, "Log every HTTP request (off by default: the hot path).",
            env=("METACENTER_ACCESS_LOG",), flag=True),
    # -- slow clients and the reactor (docs/performance.md) -------------------------
    Setting("request-deadline", positive_duration, 30.0,
            "A request whose headers and body have not all arrived this long after its first byte is dropped.",
            env=("METACENTER_REQUEST_DEADLINE",)),
    Setting("idle-timeout", positive_duration, 360.0,
            "An idle keep-alive connection is closed after this (longer than the Go gateway's 5-minute idle pool).",
            env=("METACENTER_IDLE_TIMEOUT",)),
    Setting("max-connections", positive_int, 10000,
            "Open HTTP connections at most; one more is answered 503 and closed.",
            env=("METACENTER_MAX_CONNECTIONS",)),
    Setting("gc-freeze-interval", duration_or_off, 60.0,
            "How often the long-lived objects are frozen out of the garbage collector's full walks (after a young "
            "collection), and sooner once the state holds 1,000 more clusters, engines and leases than at the last "
            "freeze (checked every second); 0: only at start and after the warm start.",
            env=("METACENTER_GC_FREEZE_INTERVAL",)),
    Setting("reactor-lag-interval", positive_duration, 0.05,
            "How often the reactor lag probe ticks (metacenter_reactor_lag_seconds).",
            env=("METACENTER_REACTOR_LAG_INTERVAL",)),
    # -- bounds (docs/deployment.md, Memory sizing) ---------------------------------
    Setting("max-request-id-length", positive_int, 256,
            "Longest request_id in characters; longer ones get 400 (clients, peers and snapshots alike).",
            env=("METACENTER_MAX_REQUEST_ID_LENGTH",)),
    Setting("max-cluster-length", positive_int, 256,
            "Longest cluster name in characters; longer ones get 400. The longest URL accepted follows from it, "
            "so every cluster written can be read with GET.",
            env=("METACENTER_MAX_CLUSTER_LENGTH",)),
    Setting("max-ip-length", positive_int, 64,
            "Longest engine ip text in characters (before it is parsed); longer ones get 400.",
            env=("METACENTER_MAX_IP_LENGTH",)),
    Setting("max-lease-length", positive_int, 128, "Longest gateway lease name in characters; longer ones get 400.",
            env=("METACENTER_MAX_LEASE_LENGTH",)),
    Setting("max-clusters", positive_int, 50000,
            "Clusters at most; a client's add that would create one more gets 429 (peers' events are applied).",
            env=("METACENTER_MAX_CLUSTERS",)),
    Setting("max-engines-per-cluster", positive_int, 10000,
            "Engines of one cluster at most; a client's add that would create one more gets 429.",
            env=("METACENTER_MAX_ENGINES_PER_CLUSTER",)),
    Setting("max-engines", positive_int, 100000,
            "Engines over all clusters at most; a client's add that would create one more gets 429.",
            env=("METACENTER_MAX_ENGINES",)),
    Setting("max-requests", positive_int, 2000000,
            "In-flight requests of the node at most; a client's add of one more gets 429.",
            env=("METACENTER_MAX_REQUESTS",)),
    Setting("max-leases", positive_int, 10000,
            "Gateway leases at most (one per gateway instance); a client's keepalive, add or pick that would start "
            "one more gets 429 (renewals always pass).", env=("METACENTER_MAX_LEASES",)),
    # -- the KV-cache index (docs/cache.md) ---------------------------------------
    Setting("cache-engine-blocks", positive_int, 16384,
            "KV-cache blocks (512 prompt bytes each) remembered per engine; the least recently used go first.",
            env=("METACENTER_CACHE_ENGINE_BLOCKS",)),
    Setting("cache-ttl", positive_duration, 1800.0, "A cached block not saved again for this long is forgotten.",
            env=("METACENTER_CACHE_TTL",)),
    Setting("cache-max-blocks", positive_int, 2000000,
            "KV-cache blocks remembered over all engines (~210 bytes each); the least recently saved engine yields.",
            env=("METACENTER_CACHE_MAX_BLOCKS",)),
    # -- the cluster ------------------------------------------------------------
    Setting("peers-dns", text_value, "", "DNS name whose A/AAAA records are the peers (a headless Service).",
            env=("META_DATA_CENTER_SVC_DISC_HOST",)),
    Setting("dns-interval", positive_duration, 5.0, "How often the peers' DNS name is resolved.",
            env=("REPLICA_DNS_LOOKUP_INTERVAL",)),
    Setting("dns-server", host_port, None, "Resolve peers with this DNS server (HOST:PORT) instead of the system's.",
            env=("METACENTER_DNS_SERVER",)),
    Setting("peer", host_port_list, (), "A static peer HOST:PORT (repeatable).", env=("METACENTER_PEERS",),
            repeatable=True),
    Setting("peer-port", port_number, 80, "Port of the peers found through DNS.", env=("REPLICA_CLIENT_TARGET_PORT",)),
    Setting("advertise", ip_list, (), "This node's own address(es), excluded from the peers.", env=("POD_IP",)),
    Setting("cluster-secret", secret_list, (),
            "Shared secret authenticating replication between nodes (repeatable, or comma separated: the first "
            "signs, any verifies; see Secret rotation in docs/deployment.md).",
            env=("METACENTER_CLUSTER_SECRET",), repeatable=True),
    Setting("replica-dial-timeout", positive_duration, 0.5, "Connect timeout towards a peer.",
            env=("REPLICA_CLIENT_DIAL_TIMEOUT",)),
    Setting("replica-request-timeout", positive_duration, 1.0, "Timeout of one replication request.",
            env=("REPLICA_CLIENT_REQUEST_TIMEOUT",)),
    Setting("replica-max-idle-conns", positive_int, 100, "Persistent connections kept per peer.",
            env=("REPLICA_CLIENT_MAX_IDLE_CONNS",)),
    Setting("replica-idle-conn-timeout", positive_duration, 90.0, "Idle persistent connections close after this.",
            env=("REPLICA_CLIENT_IDLE_CONN_TIMEOUT",)),
    Setting("replica-keepalive-period", positive_duration, 30.0, "TCP keepalive period of peer connections.",
            env=("REPLICA_CLIENT_KEEPALIVE_PERIOD",)),
    Setting("replica-batch-size", positive_int, 128,
            "A batch to a peer goes as soon as it holds this many events (or --replica-batch-interval passed).",
            env=("METACENTER_REPLICA_BATCH_SIZE",)),
    Setting("replica-batch-interval", positive_duration, 0.005,
            "Batches to a peer leave at most this often (unless full); an event never waits longer.",
            env=("METACENTER_REPLICA_BATCH_INTERVAL",)),
    Setting("replica-queue-size", positive_int, 100000,
            "Events queued per peer at most; older ones beyond it are dropped (anti-entropy repairs them).",
            env=("METACENTER_REPLICA_QUEUE_SIZE",)),
    Setting("replica-probe-interval", positive_duration, 60.0,
            "How often a peer without the batch endpoint (a reference node) is asked again for batches.",
            env=("METACENTER_REPLICA_PROBE_INTERVAL",)),
    Setting("replication-listen", replication_endpoint, "auto",
            "Twisted endpoint of the replication stream listener (e.g. tcp:7070, ssl:7070:...); 'auto': the "
            "interface of --listen on a port the system picks (peers learn it from /v1/node/status); 'none': no "
            "stream, HTTP replication only (as before).", env=("METACENTER_REPLICATION_LISTEN",)),
    Setting("replication-port", port_number, None,
            "Port of the peers' replication listeners (when a Service or firewall maps it); default: the port "
            "each peer reports on /v1/node/status.", env=("METACENTER_REPLICATION_PORT",)),
    Setting("replication-window", positive_int, 64,
            "Replication frames sent to a peer and not yet acknowledged, at most (the peer is asked to "
            "acknowledge at half of it).",
            env=("METACENTER_REPLICATION_WINDOW",)),
    Setting("replication-ack-delay", ack_delay, 0.02,
            "How long this node may hold back the acknowledgement of a peer's replication frames, to cover "
            "more of them with one (at most 1s); 0: one per network read.",
            env=("METACENTER_REPLICATION_ACK_DELAY",)),
    Setting("replication-log-capacity", positive_int, 200000,
            "Events the replication log holds; a peer further behind needs a repair (anti-entropy).",
            env=("METACENTER_REPLICATION_LOG_CAPACITY",)),
    Setting("anti-entropy-interval", positive_duration, 10.0,
            "How often a node compares its state digests with every peer and repairs differences.",
            env=("METACENTER_ANTI_ENTROPY_INTERVAL",)),
    Setting("warm-start-timeout", positive_duration, 30.0,
            "A starting node waits at most this long for a peer's snapshot before it reports ready anyway.",
            env=("METACENTER_WARM_START_TIMEOUT",)),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def attribute_name(name):
    return name.replace("-", "_")


@dataclass(frozen=True)
class Config:
    values: dict = field(default_factory=dict)

    def __getattr__(self, item):
        if item == "values":  # not set yet (copy, pickle): no recursion
            raise AttributeError(item)
        try:
            return self.values[item]
        except KeyError:
            raise AttributeError(item) from None


def _parse(setting, raw, where):
    try:
        return setting.parse(raw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--{setting.name} ({where}): {e}") from None


def load_file(path):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    # Accept both a flat file and one with a [metacenter] table, not a mix:
    # keys beside the table would be silently ignored.
    if isinstance(data.get("metacenter"), dict):
        outside = sorted(k for k in data if k != "metacenter")
        if outside:
            raise ConfigError(f"--config: {path}: {', '.join(map(repr, outside))} outside the [metacenter] table")
        data = data["metacenter"]
    out = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name not in SETTINGS_BY_NAME:
            raise ConfigError(f"--config: {path}: unknown setting {key!r}")
        if name in out:
            raise ConfigError(f"--config: {path}: setting {name!r} given twice")
        out[name] = value
    return out


def resolve(command_line, environ, config_path=None):
    """command_line: {name: raw or None (not given)}; environ: a mapping."""
    from_file = load_file(config_path) if config_path else {}
    values = {}
    for setting in SETTINGS:
        raw = command_line.get(setting.name)
        # Not given: None; twistd gives an unset flag as 0 and an unused
        # repeatable option as [].
        if (setting.flag and not raw) or (setting.repeatable and raw == []):
            raw = None
        if raw is not None:
            values[attribute_name(setting.name)] = _parse(setting, raw, "command line")
            continue
        env_name = next((e for e in setting.env if environ.get(e, "") != ""), None)
        if env_name is not None:
            values[attribute_name(setting.name)] = _parse(setting, environ[env_name], f"environment {env_name}")
            continue
        if setting.name in from_file:
            values[attribute_name(setting.name)] = _parse(setting, from_file[setting.name], "config file")
            continue
        values[attribute_name(setting.name)] = setting.default
    return Config(values)
