"""Command line of ``metacenter-console``."""

import argparse
import sys

from console.discovery import DnsTargets, FixedTargets, parse_server
from console.nodeclient import normalize_target
from console.once import OUTPUTS, TABLE
from console.source import HttpSource

DEFAULT_URL = "http://127.0.0.1:8080"


def positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def port_number(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return value


def target_url(text):
    try:
        return normalize_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dns_server(text):
    try:
        return parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="metacenter-console",
        description="Watch metacenter nodes live: cluster load, engines, node health and replication.",
    )
    parser.add_argument("urls", nargs="*", metavar="URL", type=target_url,
                        help=f"node to watch, several allowed (default {DEFAULT_URL})")
    parser.add_argument("--dns", metavar="NAME",
                        help="watch every node behind this DNS name (A and AAAA records), re-resolved while running")
    parser.add_argument("--port", type=port_number, default=8080,
                        help="HTTP port of the nodes found with --dns (default 8080)")
    parser.add_argument("--dns-server", type=dns_server, metavar="HOST:PORT",
                        help="ask this DNS server instead of the system resolver (port 53 by default)")
    parser.add_argument("--interval", type=positive_seconds, default=1.0, metavar="SECONDS",
                        help="seconds between polls of each node (default 1)")
    parser.add_argument("--timeout", type=positive_seconds, default=2.0, metavar="SECONDS",
                        help="give up on a node's poll after this long and show it as down (default 2)")
    parser.add_argument("--history", type=positive_seconds, default=300.0, metavar="SECONDS",
                        help="time span of the sparklines (default 300)")
    parser.add_argument("--once", action="store_true",
                        help="print the overview and exit: 0 if every node answered, 1 otherwise")
    parser.add_argument("--output", "-o", choices=OUTPUTS, default=None,
                        help="with --once: table (default; cut to fit only in a terminal), wide (more columns, "
                             "never cut) or json (the schema is in docs/console.md)")
    parser.add_argument("--cluster", metavar="NAME",
                        help="with --once: print this cluster's engines; interactive: open on this cluster")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dns and args.urls:
        parser.error("give node URLs or --dns NAME, not both")
    if args.dns_server and not args.dns:
        parser.error("--dns-server needs --dns NAME")
    if args.output is not None and not args.once:
        parser.error(f"--output {args.output} needs --once (the interactive console has one look)")
    return args


def build_source(args):
    if args.dns:
        targets = DnsTargets(args.dns, args.port, args.dns_server, timeout=args.timeout)
    else:
        targets = FixedTargets(args.urls or [DEFAULT_URL])
    return HttpSource(targets, timeout=args.timeout)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    source = build_source(args)
    if args.once:
        from console.once import run_once

        return run_once(source, args.cluster, output=args.output or TABLE)
    from console.app import ConsoleApp

    app = ConsoleApp(source, interval=args.interval, history_seconds=args.history, open_cluster=args.cluster)
    app.run()
    return app.return_code or 0
