#!/usr/bin/env python3
"""Clients for benches/resp_compare.sh, and its summary table.

  subscribe PORT N CHANNEL FRAME_LEN EXPECT  N subscribers on one socket each; prints "ready"
                                            once all are subscribed, then counts the bytes of
                                            messages until EXPECT messages each arrived (or 5 s
                                            without a byte); prints "messages=M seconds=S" (first
                                            to last byte)
  setbig PORT KEY MIB                       SET KEY to MIB MiB
  readers PORT N KEY SERVER_PID [KBPS]      N readers GET KEY at once (each reading at KBPS KiB/s
                                            if given); prints the server's VmRSS before and its
                                            peak while they read, in KiB
  idle PORT N SERVER_PID                    N connections that each ask one GET and then sit idle;
                                            prints the server's VmRSS growth per connection, in bytes
  summarize RAW.tsv                         the markdown tables of a run
"""
import os
import selectors
import socket
import statistics
import sys
import threading
import time


def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def command(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def recv_exactly(s, n):
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(min(n - len(buf), 1 << 20))
        if not d:
            raise SystemExit("EOF after %d of %d bytes" % (len(buf), n))
        buf += d
    return bytes(buf)


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS for %d" % pid)


def subscribe(port, n, channel, frame_len, expect):
    channel = channel.encode()
    confirm = b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel)
    socks = [connect(port) for _ in range(n)]
    for s in socks:
        s.sendall(command(b"SUBSCRIBE", channel))
    for s in socks:
        got = recv_exactly(s, len(confirm))
        if got != confirm:
            raise SystemExit("unexpected confirmation %r" % got)
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    total, want = 0, n * expect * frame_len
    first = last = None
    while total < want:
        events = sel.select(timeout=5)
        if not events:
            break
        for key, _ in events:
            try:
                d = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            if not d:
                raise SystemExit("a subscriber was closed")
            now = time.monotonic()
            first = first or now
            last = now
            total += len(d)
    seconds = (last - first) if first else 0
    print("messages=%d seconds=%.6f" % (total // frame_len, seconds), flush=True)


def setbig(port, key, mib):
    s = connect(port)
    value = bytes(range(256)) * (mib * 4096)
    s.sendall(command(b"SET", key, value))
    got = recv_exactly(s, 5)
    if got != b"+OK\r\n":
        raise SystemExit("SET answered %r" % got)


def readers(port, n, key, pid, kbps=0):
    idle = rss_kib(pid)
    peak = [idle]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.005)

    def read(s):
        head = b""
        while not head.endswith(b"\r\n"):
            head += s.recv(1)
        left = int(head[1:-2]) + 2
        while left:
            d = s.recv(min(left, 64 * 1024))
            if not d:
                raise SystemExit("EOF with %d bytes left" % left)
            left -= len(d)
            if kbps:
                time.sleep(len(d) / (kbps * 1024))

    sampler = threading.Thread(target=sample)
    sampler.start()
    socks = [connect(port) for _ in range(n)]
    for s in socks:
        s.sendall(command(b"GET", key))
    threads = [threading.Thread(target=read, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    print("idle_kib=%d peak_kib=%d" % (idle, peak[0]), flush=True)


def idle(port, n, pid):
    first = connect(port)
    first.sendall(command(b"GET", b"idle"))
    recv_exactly(first, 5)
    time.sleep(0.5)
    before = rss_kib(pid)
    socks = []
    for i in range(n):
        s = connect(port)
        s.sendall(command(b"GET", b"idle"))
        socks.append(s)
        if i % 500 == 499:  # bounded in flight
            for t in socks[-500:]:
                recv_exactly(t, 5)
    for t in socks[len(socks) // 500 * 500:]:
        recv_exactly(t, 5)
    time.sleep(1.0)
    after = rss_kib(pid)
    print("per_client_bytes=%.1f before_kib=%d after_kib=%d" % ((after - before) * 1024 / n, before, after), flush=True)
    for s in socks:
        s.close()


def summarize(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]
    servers = []
    for r in rows:
        if r[1] not in servers:
            servers.append(r[1])
    med = lambda xs: statistics.median(xs) if xs else None
    fmt = lambda v, f: "n/a" if v is None else f % v

    def by(kind, key):
        out = {}
        for r in rows:
            if r[0] == kind:
                out.setdefault((key(r), r[1]), []).append(r)
        return out

    print("### redis-benchmark -c CLIENTS -n N (median of the rounds)\n")
    print("| test | " + " | ".join("%s req/s | %s CPU µs/req" % (s, s) for s in servers) + " |")
    print("|---|" + "---|---|" * len(servers))
    bench = by("bench", lambda r: (r[2], r[3]))
    for case in sorted({k[0] for k in bench}, key=lambda c: (int(c[1][1:]), c[0])):
        cells = []
        for s in servers:
            rs = [r for r in bench.get((case, s), []) if r[5] != "n/a"]
            rps = med([float(r[5]) for r in rs])
            cpu = med([float(r[6]) / float(r[7]) * 1e6 for r in rs])
            cells += [fmt(rps, "%.0f"), fmt(cpu, "%.2f")]
        print("| %s %s | %s |" % (case[0], case[1], " | ".join(cells)))
    pubsub = by("pubsub", lambda r: r[2])
    if pubsub:
        print("\n### pub/sub fan-out: one publisher (-P 16), SUBS subscribers\n")
        print("| server | delivered msg/s | CPU ns/delivered | writes/delivered |")
        print("|---|---|---|---|")
        for s in servers:
            rs = pubsub.get(("fanout", s), [])
            rate = med([float(r[4]) / float(r[5]) for r in rs if float(r[5]) > 0])
            cpu = med([float(r[6]) / float(r[4]) * 1e9 for r in rs if float(r[4]) > 0])
            writes = med([float(r[7]) / float(r[4]) for r in rs if r[7] != "n/a" and float(r[4]) > 0])
            print("| %s | %s | %s | %s |" % (s, fmt(rate, "%.0f"), fmt(cpu, "%.1f"), fmt(writes, "%.4f")))
    big = by("bigget", lambda r: r[2])
    if big:
        print("\n### readers of one large value at once: server RSS (MiB)\n")
        print("| server | idle | peak | peak over idle |")
        print("|---|---|---|---|")
        for s in servers:
            rs = big.get(("readers", s), [])
            i = med([float(r[3]) / 1024 for r in rs])
            p = med([float(r[4]) / 1024 for r in rs])
            print("| %s | %s | %s | %s |" % (s, fmt(i, "%.1f"), fmt(p, "%.1f"), fmt(None if i is None else p - i, "%.1f")))
    idle_rows = by("idle", lambda r: r[2])
    if idle_rows:
        print("\n### idle clients: server RSS per idle client (bytes)\n")
        print("| server | bytes per idle client |")
        print("|---|---|")
        for s in servers:
            rs = idle_rows.get(("clients", s), [])
            print("| %s | %s |" % (s, fmt(med([float(r[3]) for r in rs]), "%.0f")))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "subscribe":
        subscribe(int(args[0]), int(args[1]), args[2], int(args[3]), int(args[4]))
    elif cmd == "setbig":
        setbig(int(args[0]), args[1].encode(), int(args[2]))
    elif cmd == "readers":
        readers(int(args[0]), int(args[1]), args[2].encode(), int(args[3]), float(args[4]) if len(args) > 4 else 0)
    elif cmd == "idle":
        idle(int(args[0]), int(args[1]), int(args[2]))
    elif cmd == "summarize":
        summarize(args[0])
    else:
        raise SystemExit(__doc__)
