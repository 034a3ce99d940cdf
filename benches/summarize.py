#!/usr/bin/env python3
"""Summarizes benches/compare.sh results (JSON lines) as markdown: per point and server, the
median and min-max over the repetitions, and the ratio of each peer's median to sockman's."""
import json
import statistics
import sys
from collections import OrderedDict, defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by_point = OrderedDict()
for r in rows:
    by_point.setdefault(r["point"], defaultdict(list))[r["server"]].append(r)


def sysc(r, *names):
    s = r.get("syscalls") or {}
    if not s:
        return None
    return sum(s.get(n, 0.0) for n in names)


def per_op(r, value):
    ops = r.get("ops") or 0
    return None if value is None or not ops else value / ops


METRICS = [
    ("ops/s", lambda r: r.get("connects_per_sec") if r.get("mode") == "churn" else r.get("ops_per_sec"), 0),
    ("MB/s", lambda r: r.get("mb_per_sec"), 1),
    ("p50 µs", lambda r: (r.get("latency_us") or {}).get("p50"), 0),
    ("p99 µs", lambda r: (r.get("latency_us") or {}).get("p99"), 0),
    ("server CPU µs/op", lambda r: r.get("server_cpu_us_per_op"), 2),
    ("syscalls/op", lambda r: per_op(r, sysc(r, "raw_syscalls:sys_enter", "sys_enter")), 3),
    ("read+write/op", lambda r: per_op(r, sysc(r, "read", "write", "recvfrom", "sendto")), 3),
    ("epoll_wait/op", lambda r: per_op(r, sysc(r, "epoll_wait", "epoll_pwait")), 3),
    ("other than epoll_wait/op", lambda r: per_op(r, None if sysc(r, "sys_enter") is None else sysc(r, "sys_enter") - sysc(r, "epoll_wait", "epoll_pwait")), 2),
    ("held", lambda r: r.get("connections_held"), 0),
    ("RSS B/conn", lambda r: r.get("server_rss_per_held_connection_bytes"), 0),
]


def fmt(v, digits):
    return "–" if v is None else f"{v:,.{digits}f}"


for point, servers in by_point.items():
    print(f"\n### {point}\n")
    mode = next(iter(servers.values()))[0].get("mode", "")
    cols = []
    for label, get, digits in METRICS:
        if any(get(r) is not None for rs in servers.values() for r in rs):
            cols.append((label, get, digits))
    print("| server | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    base = {}
    for label, get, _ in cols:
        vals = [get(r) for r in servers.get("sockman", []) if get(r) is not None]
        base[label] = statistics.median(vals) if vals else None
    for server, rs in servers.items():
        cells = []
        for label, get, digits in cols:
            vals = [get(r) for r in rs if get(r) is not None]
            if not vals:
                cells.append("–")
                continue
            med = statistics.median(vals)
            cell = f"{fmt(med, digits)} ({fmt(min(vals), digits)}–{fmt(max(vals), digits)})"
            if server != "sockman" and base.get(label):
                cell += f" ×{med / base[label]:.2f}"
            cells.append(cell)
        print(f"| {server} | " + " | ".join(cells) + " |")
    errors = defaultdict(int)
    for rs in servers.values():
        for r in rs:
            for k, v in (r.get("errors") or {}).items():
                errors[(r["server"], k)] += v
    if errors:
        print("\nerrors: " + ", ".join(f"{s} {k}={v}" for (s, k), v in sorted(errors.items())))
print("\n(×N = the peer's median divided by sockman's; medians of the repetitions, min–max in brackets)")
