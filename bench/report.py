"""The result file (docs/bench-results.json) and the table in
docs/performance.md (between the two markers), from the same data."""

import json
import os

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"


def _ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def _num(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)


def _pair_row(name, what, pair):
    node, ceiling = pair["node"], pair.get("ceiling")
    lat = node["latency_us"]
    return (f"| {name} | {what} | {_num(node['rate'])} | {_num(ceiling['rate']) if ceiling else '-'} | "
            f"{_num(pair.get('cpu_ratio'), '{:.2f}')} | {_num(pair.get('ratio'), '{:.2f}')} | "
            f"{_num(node['server_cpu_us_per_request'], '{:.0f}')} | "
            f"{_ms(lat.get('p50'))} | {_ms(lat.get('p90'))} | {_ms(lat.get('p99'))} |")


ROWS = (
    ("gateway", None, "gateway mix", "add, query, prompt delete, query, delete, query"),
    ("endpoints", "add", "add", "POST /v1/load/stats, unique ids"),
    ("endpoints", "prompt", "prompt delete", "DELETE /v1/load/prompt of added ids"),
    ("endpoints", "delete", "delete", "DELETE /v1/load/stats of added ids"),
    ("endpoints", "query", "query", "GET /v1/load/stats, 50 engines"),
    ("cache", "query", "cache query", "POST /v1/cache/query, 1,000 hashes"),
    ("cache", "save", "cache save", "POST /v1/cache/save, 500 held + 500 new hashes"),
)


def table(results):
    sections = results.get("sections", {})
    lines = [
        "| run | requests | node req/s | ceiling req/s | ratio (CPU) | ratio (req/s) | node CPU µs/req "
        "| p50 ms | p90 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for section, key, name, what in ROWS:
        s = sections.get(section)
        if not s or s.get("skipped"):
            if s and s.get("skipped") and (key is None or key == "query"):
                lines.append(f"| {name} | {what} | skipped: {s['skipped']} | | | | | | | |")
            continue
        pair = s if key is None else s.get(key)
        if pair and "node" in pair:
            lines.append(_pair_row(name, what, pair))
    out = ["\n".join(lines), ""]
    extra = []
    g = sections.get("halfrate")
    if g and not g.get("skipped"):
        lat = g["latency_us"]
        sent, lag = g.get("service_latency_us", {}), g.get("send_lag_us", {})
        extra.append(f"- Gateway mix paced at half the maximum rate ({g['target_rate']:,.0f} req/s, "
                     f"achieved {g['rate']:,.0f}; node core {g['server_cpu_util']:.0%} busy): from when each "
                     f"request was due p50 {_ms(lat['p50'])} ms, p90 {_ms(lat['p90'])} ms, "
                     f"p99 {_ms(lat['p99'])} ms, p99.9 {_ms(lat['p999'])} ms, max {_ms(lat['max'])} ms; "
                     f"from when it was sent p50 {_ms(sent.get('p50'))} ms, p99 {_ms(sent.get('p99'))} ms "
                     f"(the load generator's own lateness: p50 {_ms(lag.get('p50'))} ms, "
                     f"p99 {_ms(lag.get('p99'))} ms)."
                     + (f" The ceiling on the same schedule: p50 {_ms(g['ceiling']['latency_us']['p50'])} ms, "
                        f"p99 {_ms(g['ceiling']['latency_us']['p99'])} ms from when due."
                        if g.get("ceiling") else ""))
    c = sections.get("cache")
    if c and not c.get("skipped") and c.get("query_latency"):
        lat = c["query_latency"]["latency_us"]
        extra.append(f"- Cache query alone on one connection ({c['fill']['blocks']:,} blocks, "
                     f"{c['fill']['engines']} engines, 1,000 hashes, topk 10): p50 {_ms(lat['p50'])} ms, "
                     f"p90 {_ms(lat['p90'])} ms, p99 {_ms(lat['p99'])} ms.")
    r = sections.get("rss")
    if r and not r.get("skipped"):
        extra.append(f"- RSS per in-flight request: {r['bytes_per_request']:,.0f} bytes "
                     f"({r['requests']:,} requests added over HTTP; VmRSS {r['rss_before'] / 2**20:,.1f} → "
                     f"{r['rss_after'] / 2**20:,.1f} MiB).")
    for name in ("replication", "memory_state", "cache_index", "cluster"):
        s = sections.get(name)
        if not s:
            continue
        if s.get("skipped"):
            extra.append(f"- {name}: not measured ({s['skipped']}).")
        elif s.get("summary"):
            extra.append(f"- {name}: {s['summary']}")
    st = sections.get("stall")
    if st and st.get("skipped"):
        extra.append(f"- stall: not measured ({st['skipped']}).")
    lc = sections.get("loadgen_check")
    if lc and not lc.get("skipped"):
        extra.append(f"- Load generator check on the ceiling: wrk {lc['wrk']['rate']:,.0f} req/s "
                     f"(its CPU {lc['wrk']['client_cpu_util']:.0%}), ours {lc['python']['rate']:,.0f} req/s "
                     f"(its CPU {lc['python']['client_cpu_util']:.0%}): {lc['verdict']}.")
    if extra:
        out += extra + [""]
    if st and not st.get("skipped") and st.get("states"):
        out += [stall_table(st), ""]
    targets = results.get("targets") or []
    if targets:
        out += ["| target | measured | |", "|---|---|---|"]
        for t in targets:
            out.append(f"| {t['target']} | {t['measured']} | {t['verdict']} |")
        out.append("")
    return "\n".join(out)


def _lag(lag):
    worst = lag.get("worst_le_s")
    return "-" if worst is None else f"≤ {worst * 1e3:g}"


def stall_table(st):
    """The stall section: one row per state (bench/stall.py)."""
    rows = ["Reactor pauses while a scraper polls /metrics and a console polls overview and status every second "
            "(bench/stall.py; lag from the node's metacenter_reactor_lag_seconds, ticking every 10 ms; probe: "
            "a GET every 10 ms, latency from when due; host steal: time the hypervisor took the node's core away "
            "during the phase, /proc/stat, 10 ms ticks):", "",
            "| state | worst lag ms | ticks > 5 ms | full GCs | probe p50 ms | probe p99 ms | probe max ms "
            "| scrape ms (bytes) | console poll ms | node core | host steal ms | with a peer's digest + snapshot: "
            "worst lag ms, probe p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in st["states"].values():
        lag, probe, scrape, peer = s["reactor_lag"], s["probe"], s["scrape"], s["peer_polls"]
        rows.append(f"| {s['state']} | {_lag(lag)} | {lag['ticks_above_5ms']} of {lag['ticks']} | "
                    f"{lag.get('full_gc_collections', '-')} | {probe.get('p50_ms', 0):.2f} | "
                    f"{probe.get('p99_ms', 0):.2f} | {probe.get('max_ms', 0):.1f} | "
                    f"{scrape.get('p50_ms', 0):.0f} ({scrape.get('bytes', 0):,}) | "
                    f"{s['console_poll'].get('p50_ms', 0):.0f} | {s['node_cpu_util']:.0%} | "
                    f"{s.get('host_steal_ms', '-')} | "
                    f"{_lag(peer['reactor_lag'])}, {peer['probe'].get('p99_ms', 0):.2f} |")
    return "\n".join(rows)


def header(results):
    m = results.get("machine", {})
    s = results.get("settings", {})
    return (f"Measured {results.get('generated', '?')} at commit {m.get('commit', '?')}"
            f"{' (with uncommitted changes)' if m.get('dirty') else ''} on {m.get('cpu', '?')}, "
            f"{m.get('cores', '?')} cores, Python {m.get('python', '?')}, Twisted {m.get('twisted', '?')}, "
            f"load generator {s.get('driver', '?')} ({m.get('wrk') or 'bench.http_load'}), "
            f"{s.get('connections', '?')} connections, {s.get('seconds', '?')} s per run, "
            f"{s.get('pinning', '?')}; load average {m.get('loadavg_start', '?')} at the start, "
            f"{m.get('loadavg_end', '?')} at the end. Command: `{s.get('command', 'make bench')}`.")


def write_json(path, results):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def update_markdown(path, results):
    block = f"{START}\n{header(results)}\n\n{table(results)}{END}"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = f"# Performance\n\n{START}\n{END}\n"
    if START in text and END in text:
        before = text[:text.index(START)]
        after = text[text.index(END) + len(END):]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
