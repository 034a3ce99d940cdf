#!/usr/bin/env python3
"""Summarizes benches/proxy_compare.sh results (JSON lines) as markdown: a headline table of the
issue's figures (one row per figure, one column per proxy: the median over the repetitions, min-max
in brackets, ×ratio of the peer's median to sockman's), then one table per point with more detail.

usage: proxy_summarize.py results.jsonl [meta.json]"""
import json
import os
import statistics
import sys
from collections import OrderedDict, defaultdict

ORDER = ["sockman", "haproxy", "haproxy_splice", "nginx", "tokio", "direct"]
LABEL = {
    "sockman": "sockman",
    "haproxy": "HAProxy",
    "haproxy_splice": "HAProxy splice-auto",
    "nginx": "nginx stream",
    "tokio": "tokio proxy",
    "direct": "direct (no proxy)¹",
}


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def ok(r):
    return not r.get("failed")


# --- per-run figures -------------------------------------------------------------------------
def cpu_per_op(r):
    return r.get("server_cpu_us_per_op")


def cpu_per_mb(r):
    cpu, b = r.get("server_cpu_us"), r.get("bytes") or 0
    return None if cpu is None or not b else cpu / (b / 1e6)


def rate(r):
    return r.get("connects_per_sec") if r.get("mode") == "churn" else r.get("ops_per_sec")


def rss_per_session(r):
    return r.get("server_rss_per_held_connection_bytes")


def sysc(r, *names):
    s = r.get("syscalls") or {}
    if not s:
        return None
    return sum(s.get(n, 0.0) for n in names)


def per_op(r, v):
    ops = r.get("ops") or 0
    return None if v is None or not ops else v / ops


def per_mb(r, v):
    b = r.get("bytes") or 0
    return None if v is None or not b else v / (b / 1e6)


def lat(q):
    return lambda r: (r.get("latency_us") or {}).get(q)


def kib(v):
    return None if v is None else v / 1024


# headline rows: (label, point, getter, digits)
HEADLINE = [
    ("proxy CPU µs per 64 B echo, 1 conn", "pp64_1", cpu_per_op, 2),
    ("proxy CPU µs per 64 B echo, 50 conns", "pp64_50", cpu_per_op, 2),
    ("proxy CPU µs per 64 B echo, 5 000 conns", "pp64_5000", cpu_per_op, 2),
    ("echoes/s, 50 conns", "pp64_50", rate, 0),
    ("stream 1 KiB writes, MB/s, 1 conn", "stream1k_1", lambda r: r.get("mb_per_sec"), 0),
    ("stream 1 KiB writes, MB/s, 50 conns", "stream1k_50", lambda r: r.get("mb_per_sec"), 0),
    ("proxy CPU µs per MB streamed, 1 conn", "stream1k_1", cpu_per_mb, 0),
    ("proxy CPU µs per MB streamed, 50 conns", "stream1k_50", cpu_per_mb, 0),
    ("churn sessions/s", "churn", rate, 0),
    ("proxy CPU µs per session (churn)", "churn", cpu_per_op, 1),
    ("proxy RSS B per idle session, 9 000 sessions", "idle_9000", rss_per_session, 0),
]

# detail columns by mode: (label, getter, digits)
DETAIL = {
    "pingpong": [
        ("echoes/s", rate, 0),
        ("p50 µs", lat("p50"), 0),
        ("p99 µs", lat("p99"), 0),
        ("proxy CPU µs/echo", cpu_per_op, 2),
        ("syscalls/echo", lambda r: per_op(r, sysc(r, "raw_syscalls:sys_enter", "sys_enter")), 2),
        ("epoll_wait/echo", lambda r: per_op(r, sysc(r, "epoll_wait", "epoll_pwait")), 2),
    ],
    "stream": [
        ("MB/s", lambda r: r.get("mb_per_sec"), 0),
        ("proxy CPU µs/MB", cpu_per_mb, 0),
        ("syscalls/MB", lambda r: per_mb(r, sysc(r, "raw_syscalls:sys_enter", "sys_enter")), 0),
        ("splice/MB", lambda r: per_mb(r, sysc(r, "splice")), 0),
    ],
    "churn": [
        ("sessions/s", rate, 0),
        ("p50 µs", lat("p50"), 0),
        ("p99 µs", lat("p99"), 0),
        ("proxy CPU µs/session", cpu_per_op, 1),
        ("syscalls/session", lambda r: per_op(r, sysc(r, "raw_syscalls:sys_enter", "sys_enter")), 1),
    ],
    "idle": [
        ("held", lambda r: r.get("connections_held"), 0),
        ("RSS at start KiB", lambda r: kib(r.get("server_rss_start_bytes")), 0),
        ("RSS with sessions KiB", lambda r: kib(r.get("server_rss_bytes")), 0),
        ("RSS B/session", rss_per_session, 0),
    ],
}


def fmt(v, digits):
    return "–" if v is None else f"{v:,.{digits}f}"


def stats(rows, get):
    vals = [v for v in (get(r) for r in rows if ok(r)) if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals), len(vals)


def cell(st, digits, base=None, show_ratio=True):
    if st is None:
        return "–"
    med, lo, hi, _ = st
    c = fmt(med, digits) if lo == hi else f"{fmt(med, digits)} ({fmt(lo, digits)}–{fmt(hi, digits)})"
    if show_ratio and base:
        c += f" ×{med / base:.2f}"
    return c


def main():
    rows = load(sys.argv[1])
    meta_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(sys.argv[1]), "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    by_point = OrderedDict()
    for r in rows:
        by_point.setdefault(r["point"], defaultdict(list))[r["proxy"]].append(r)
    present = [p for p in ORDER if any(p in s for s in by_point.values())]
    has_sockman = "sockman" in present

    out = []
    w = out.append
    w("# L4 proxy comparison: sockman proxy against HAProxy, nginx stream and a tokio proxy\n")
    if meta:
        w(f"- {meta.get('date', '')}; kernel {meta.get('kernel', '?')}, {meta.get('cpus', '?')} cpus"
          f" ({meta.get('cpu_model', '')}), fd hard limit {meta.get('fd_limit', '?')}")
        w(f"- {meta.get('reps')} repetition{'s' if meta.get('reps') != 1 else ''} × {meta.get('duration_s'):g} s after {meta.get('warmup_s'):g} s warm-up"
          f" (idle: {meta.get('duration_s'):g} s hold), proxies interleaved; all traffic on 127.0.0.0/8")
        w(f"- pinning (taskset): the proxy on cpu {meta.get('proxy_cpu')}; the load generator (`sockman load`)"
          f" and the upstream echo (epoll_echo) on cpu {meta.get('client_cpu')}. At 1 connection every hop"
          " therefore wakes the other core (an idle core's wake-up dominates the round trip): compare CPU per"
          " echo there, not rates.")
        w("- proxy CPU and RSS: `sockman load --server-pid <proxy pid>` (user + system time of the proxy over"
          " the measured window, /proc clock ticks; VmRSS before the first connect and with the sessions held)")
        if not meta.get("perf"):
            w("- no syscall counts (perf unavailable or NOPERF)")
        for v in meta.get("versions", []):
            w(f"- {v}")
        for p, why in sorted((meta.get("skipped") or {}).items()):
            w(f"- **skipped {p}**: {why}")
    if not has_sockman:
        w("- sockman did not run: no ratios to sockman in this run")
    w("")

    w("## Headline: medians (min–max)" + (", ×ratio = peer's median / sockman's" if has_sockman else "") + "\n")
    w("| figure | " + " | ".join(LABEL[p] for p in present) + " |")
    w("|---" * (len(present) + 1) + "|")
    for label, point, get, digits in HEADLINE:
        if point not in by_point:
            continue
        servers = by_point[point]
        sts = {p: stats(servers.get(p, []), get) for p in present}
        base = sts.get("sockman")
        base = base[0] if base else None
        cells = [cell(sts[p], digits, base, p not in ("sockman", "direct")) for p in present]
        w(f"| {label} | " + " | ".join(cells) + " |")
    w("")
    w("¹ direct: `sockman load` talks to the upstream echo itself. It is the floor for rates and latency;"
      " its CPU and RSS figures are the echo server's own (one socket per session, no upstream connect),"
      " not a proxy's cost, so it gets no ratio.")
    w("Stream: MB = 10⁶ echoed bytes received back by the client; each byte crosses the proxy twice"
      " (client → upstream and back). Churn: one session = connect, one 64 B echo, close, through the proxy"
      " to the upstream. Idle: (RSS with the sessions held − RSS before the first connect) / sessions held.\n")

    w("## Per point\n")
    for point, servers in by_point.items():
        any_row = next((r for rs in servers.values() for r in rs if ok(r)), None)
        mode = (any_row or {}).get("mode", "")
        cols = [c for c in DETAIL.get(mode, []) if any(c[1](r) is not None for rs in servers.values() for r in rs if ok(r))]
        w(f"### {point}" + (f" (`--mode {mode}`, {any_row.get('connections')} connection{'s' if any_row.get('connections') != 1 else ''}, {any_row.get('size')} B)" if any_row else "") + "\n")
        w("| proxy | runs | " + " | ".join(c[0] for c in cols) + " |")
        w("|---" * (len(cols) + 2) + "|")
        for p in [p for p in ORDER if p in servers]:
            rs = servers[p]
            good = [r for r in rs if ok(r)]
            cells = []
            for label, get, digits in cols:
                base = stats(servers.get("sockman", []), get)
                cells.append(cell(stats(rs, get), digits, base[0] if base else None, p not in ("sockman", "direct")))
            w(f"| {LABEL[p]} | {len(good)}/{len(rs)} | " + " | ".join(cells) + " |")
        notes = []
        errors = defaultdict(int)
        for p, rs in servers.items():
            for r in rs:
                if not ok(r):
                    notes.append(f"{p} rep {r.get('rep')} failed: {r.get('failed')}")
                    continue
                for k, v in (r.get("errors") or {}).items():
                    errors[(p, k)] += v
                if r.get("closed_by_server"):
                    errors[(p, "closed_by_proxy")] += r["closed_by_server"]
                if r.get("proxy_alive_after") is False:
                    notes.append(f"{p} rep {r.get('rep')}: the proxy had exited by the end of the run")
                if mode == "idle" and r.get("connections_held") is not None and r["connections_held"] < r.get("connections", 0):
                    notes.append(f"{p} rep {r.get('rep')}: held {r['connections_held']} of {r['connections']}")
        if mode == "stream" and "haproxy_splice" in servers:
            sp = stats(servers["haproxy_splice"], lambda r: per_mb(r, sysc(r, "splice")))
            if sp is not None and sp[0] < 1:
                notes.append(f"HAProxy splice-auto made {sp[0]:.2f} splice() calls per MB here: it did not splice,"
                             " so its data path was plain HAProxy's (recv/send through its buffers)")
        if errors:
            notes.append("errors (all reps): " + ", ".join(f"{s} {k}={v}" for (s, k), v in sorted(errors.items())))
        w("")
        for n in notes:
            w(f"- {n}")
        if notes:
            w("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
