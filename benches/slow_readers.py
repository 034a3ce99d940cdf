#!/usr/bin/env python3
"""Kernel TCP memory held by slow readers: N connections that each send SIZE bytes to an echo
server and never read (or read READ bytes every EVERY seconds), held HOLD seconds.

Reads the host's TCP memory from /proc/net/sockstat (`TCP: ... mem P`, in pages) before the
connections open and once they have all stalled, and prints the growth per connection. On
loopback that growth counts both ends: the bytes a server does not hold sit in the clients'
sockets on the same host instead. So it also reads the server's own sockets (`ss -tm`, local
port = the server's): the memory charged to them (`r` + `w` + `f` of `skmem`: received, queued
to send, reserved) and their buffer sizes (`rb`, `tb`), which is what a server's host holds when
its slow readers are elsewhere. Traffic is loopback only; every loop is bounded in count and
time.

  benches/slow_readers.py --connect 127.0.0.1:7000 --connections 2000 --size 524288 --hold 10
"""
import argparse
import json
import os
import re
import selectors
import socket
import statistics
import subprocess
import time


def tcp_mem_pages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    raise RuntimeError("no TCP line in /proc/net/sockstat")


def server_sockets(port):
    """skmem of every established socket whose local port is the server's."""
    out = subprocess.run(
        ["ss", "-tmnH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    socks = []
    for m in re.finditer(r"skmem:\(([^)]*)\)", out):
        fields = dict(re.match(r"([a-z]+)(\d+)", f).groups() for f in m.group(1).split(","))
        socks.append({k: int(v) for k, v in fields.items()})
    return socks


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--connect", default="127.0.0.1:7000")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--size", type=int, default=512 * 1024)
    p.add_argument("--hold", type=float, default=10.0, help="seconds to hold after setup")
    p.add_argument("--read", type=int, default=0, help="bytes to read every --every seconds")
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    host, port = a.connect.rsplit(":", 1)
    if not host.startswith("127."):
        raise SystemExit("loopback targets only")
    page = os.sysconf("SC_PAGE_SIZE")
    before = tcp_mem_pages()
    sel = selectors.DefaultSelector()
    socks = []
    chunk = b"x" * 65536
    sent = {}
    for i in range(a.connections):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.setblocking(False)
        socks.append(s)
        sent[s] = 0
        sel.register(s, selectors.EVENT_WRITE)
    # Send until every connection has sent SIZE or cannot send more (both directions stalled:
    # the server stopped reading because its echo output is pending). Bounded by time.
    setup_deadline = time.monotonic() + 60
    last_progress = time.monotonic()
    while sel.get_map() and time.monotonic() < setup_deadline:
        events = sel.select(timeout=0.2)
        if not events and time.monotonic() - last_progress > 2.0:
            break  # nothing writable for 2 s: every remaining connection is stalled
        for key, _ in events:
            s = key.fileobj
            try:
                n = s.send(chunk[: min(len(chunk), a.size - sent[s])])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                sel.unregister(s)
                continue
            sent[s] += n
            last_progress = time.monotonic()
            if sent[s] >= a.size:
                sel.unregister(s)
    stalled = tcp_mem_pages()
    # Hold, reading a little now and then if asked (bounded by --hold).
    hold_end = time.monotonic() + a.hold
    closed = 0
    while time.monotonic() < hold_end:
        time.sleep(min(a.every, max(0.0, hold_end - time.monotonic())))
        if a.read:
            for s in socks:
                try:
                    if s.recv(a.read) == b"":
                        closed += 1
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    closed += 1
    held = tcp_mem_pages()
    server = server_sockets(int(port))
    for s in socks:
        s.close()
    total_sent = sum(sent.values())
    out = {
        "connections": a.connections,
        "size": a.size,
        "sent_bytes": total_sent,
        "tcp_mem_pages_before": before,
        "tcp_mem_pages_stalled": stalled,
        "tcp_mem_pages_held": held,
        "kernel_bytes_per_connection": (held - before) * page / a.connections,
        "closed_by_server_seen": closed,
        "server_sockets": len(server),
        "server_kernel_bytes_per_connection": sum(x["r"] + x["w"] + x["f"] for x in server)
        / max(1, len(server)),
        "server_rcvbuf_median": statistics.median(x["rb"] for x in server) if server else 0,
        "server_sndbuf_median": statistics.median(x["tb"] for x in server) if server else 0,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"{a.connections} slow readers, {total_sent / a.connections / 1024:.0f} KiB sent each: "
            f"TCP mem {before} -> {stalled} (stalled) -> {held} (after {a.hold:.0f} s) pages; "
            f"{out['kernel_bytes_per_connection'] / 1024:.1f} KiB of kernel memory per connection "
            f"(both ends); the server's {len(server)} sockets: "
            f"{out['server_kernel_bytes_per_connection'] / 1024:.1f} KiB each "
            f"(rcvbuf {out['server_rcvbuf_median'] / 1024:.0f} KiB, "
            f"sndbuf {out['server_sndbuf_median'] / 1024:.0f} KiB, medians)"
        )


if __name__ == "__main__":
    main()
