#!/usr/bin/env python3
"""Plots benches/proxy_compare.sh results as one SVG, written by hand (no dependencies):
left, proxy CPU µs per 64 B echo against connections (1, 50, 5 000; log x axis), one line per proxy
(medians, min-max whiskers); right, proxy memory per idle session at 9 000 sessions as bars,
sockman beside each peer.

usage: proxy_plot.py results.jsonl out.svg [meta.json]"""
import json
import math
import os
import statistics
import sys
from xml.sax.saxutils import escape

ORDER = ["sockman", "haproxy", "haproxy_splice", "nginx", "tokio", "direct"]
LABEL = {
    "sockman": "sockman proxy",
    "haproxy": "HAProxy",
    "haproxy_splice": "HAProxy splice-auto",
    "nginx": "nginx stream",
    "tokio": "tokio proxy",
    "direct": "no proxy (the echo's own CPU)",
}
COLOR = {
    "sockman": "#d62728",
    "haproxy": "#1f77b4",
    "haproxy_splice": "#17becf",
    "nginx": "#2ca02c",
    "tokio": "#9467bd",
    "direct": "#7f7f7f",
}
PP_POINTS = [(1, "pp64_1"), (50, "pp64_50"), (5000, "pp64_5000")]
IDLE_POINT = "idle_9000"

W, H = 1120, 600
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


def stats(rows, key):
    vals = [r[key] for r in rows if not r.get("failed") and r.get(key) is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def nice_max(v):
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * e >= v:
            return m * e
    return 10 * e


def ticks(top):
    step = top / 5
    e = 10 ** math.floor(math.log10(step))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= step:
            step = m * e
            break
    n = int(top / step + 1e-9)
    return [i * step for i in range(n + 1)]


def num(v):
    if v == int(v) and v < 1e6:
        return f"{int(v):,}".replace(",", " ")
    if v >= 100:
        return f"{v:,.0f}".replace(",", " ")
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}".rstrip("0").rstrip(".") if v else "0"


class Svg:
    def __init__(self):
        self.parts = []

    def add(self, s):
        self.parts.append(s)

    def text(self, x, y, s, size=12, anchor="start", weight="normal", color="#222", rotate=None, italic=False):
        tr = f" transform='rotate({rotate} {x:.1f} {y:.1f})'" if rotate is not None else ""
        st = " font-style='italic'" if italic else ""
        self.add(f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' "
                 f"font-weight='{weight}' fill='{color}'{st}{tr}>{escape(s)}</text>")

    def line(self, x1, y1, x2, y2, color="#000", width=1, dash=None):
        d = f" stroke-dasharray='{dash}'" if dash else ""
        self.add(f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{color}' stroke-width='{width}'{d}/>")

    def rect(self, x, y, w, h, fill, stroke="none", dash=None, opacity=1):
        d = f" stroke-dasharray='{dash}'" if dash else ""
        self.add(f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' fill='{fill}' "
                 f"stroke='{stroke}' fill-opacity='{opacity}'{d}/>")

    def finish(self):
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' {FONT}>\n"
                f"<rect width='{W}' height='{H}' fill='white'/>\n" + "\n".join(self.parts) + "\n</svg>\n")


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    out = sys.argv[2]
    meta_path = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(sys.argv[1]), "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    by = {}
    for r in rows:
        by.setdefault((r["point"], r["proxy"]), []).append(r)
    proxies = [p for p in ORDER if any(k[1] == p for k in by)]
    skipped = meta.get("skipped") or {}

    s = Svg()
    s.text(W / 2, 28, "L4 TCP proxies in front of the same upstream echo (loopback)", 18, "middle", "bold")
    sub = []
    if meta:
        sub.append(f"{meta.get('reps')} × {meta.get('duration_s'):g} s per point, medians with min–max whiskers; "
                   f"proxy on cpu {meta.get('proxy_cpu')}, load generator + upstream echo on cpu {meta.get('client_cpu')}")
    if "sockman" not in proxies:
        sub.append("sockman proxy not run" + (f": {skipped['sockman']}" if "sockman" in skipped else ""))
    for i, t in enumerate(sub):
        s.text(W / 2, 48 + 16 * i, t, 12, "middle", color="#555")

    # ---- left: CPU per echo against connections -------------------------------------------
    L, R, T, B = 80, 560, 112, 470
    s.text((L + R) / 2, T - 14, "proxy CPU µs per 64 B echo (ping-pong)", 14, "middle", "bold")
    series = {}
    ymax = 0
    for p in proxies:
        pts = []
        for n, point in PP_POINTS:
            st = stats(by.get((point, p), []), "server_cpu_us_per_op")
            if st:
                pts.append((n, st))
                ymax = max(ymax, st[2])
        if pts:
            series[p] = pts
    top = nice_max(ymax * 1.08) if ymax else 1
    lx0, lx1 = math.log10(0.7), math.log10(10000)
    X = lambda n: L + (math.log10(n) - lx0) / (lx1 - lx0) * (R - L)
    Y = lambda v: B - v / top * (B - T)
    for t in ticks(top):
        s.line(L, Y(t), R, Y(t), "#e5e5e5")
        s.text(L - 6, Y(t) + 4, num(t), 11, "end", color="#444")
    for d in (1, 10, 100, 1000, 10000):
        s.line(X(d), T, X(d), B, "#eeeeee")
    for n, _ in PP_POINTS:
        s.line(X(n), B, X(n), B + 5, "#444")
        s.text(X(n), B + 18, f"{n:,}".replace(",", " "), 11, "middle", color="#222")
    s.line(L, B, R, B, "#444")
    s.line(L, T, L, B, "#444")
    s.text((L + R) / 2, B + 38, "concurrent connections (log scale)", 12, "middle")
    s.text(L - 50, (T + B) / 2, "µs of proxy CPU per echo", 12, "middle", rotate=-90)
    if not series:
        s.text((L + R) / 2, (T + B) / 2, "no ping-pong results", 14, "middle", color="#999")
    for p, pts in series.items():
        c = COLOR[p]
        width = 3 if p == "sockman" else 2
        dash = "6 4" if p == "direct" else None
        for (n1, a), (n2, b) in zip(pts, pts[1:]):
            s.line(X(n1), Y(a[0]), X(n2), Y(b[0]), c, width, dash)
        for n, (med, lo, hi) in pts:
            s.line(X(n), Y(lo), X(n), Y(hi), c, 1.5)
            s.line(X(n) - 4, Y(lo), X(n) + 4, Y(lo), c, 1.5)
            s.line(X(n) - 4, Y(hi), X(n) + 4, Y(hi), c, 1.5)
            s.add(f"<circle cx='{X(n):.1f}' cy='{Y(med):.1f}' r='{4.5 if p == 'sockman' else 3.5}' fill='{c}'/>")
    # legend: two columns under the axis title
    entries = [(p, LABEL[p]) for p in series]
    if "sockman" not in series:
        entries.insert(0, (None, "sockman proxy: not run"))
    for i, (p, label) in enumerate(entries):
        lx, ly = L + 10 + (i % 2) * 240, B + 60 + (i // 2) * 17
        if p is None:
            s.text(lx, ly + 4, label, 11, color=COLOR["sockman"], italic=True)
            continue
        s.line(lx, ly, lx + 24, ly, COLOR[p], 3 if p == "sockman" else 2, "6 4" if p == "direct" else None)
        s.text(lx + 30, ly + 4, label, 11)

    # ---- right: memory per idle session ---------------------------------------------------
    L2, R2, T2, B2 = 660, 1090, 112, 470
    s.text((L2 + R2) / 2, T2 - 14, "proxy memory per idle session, 9 000 sessions", 14, "middle", "bold")
    peers = [p for p in proxies if p not in ("sockman", "direct") and by.get((IDLE_POINT, p))]
    mem = {p: stats(by.get((IDLE_POINT, p), []), "server_rss_per_held_connection_bytes") for p in proxies}
    sm = mem.get("sockman")
    vals = [v[2] for v in mem.values() if v] or [1]
    top2 = nice_max(max(vals) * 1.12)
    Y2 = lambda v: B2 - max(v, 0) / top2 * (B2 - T2)
    for t in ticks(top2):
        s.line(L2, Y2(t), R2, Y2(t), "#e5e5e5")
        s.text(L2 - 6, Y2(t) + 4, num(t), 11, "end", color="#444")
    s.line(L2, B2, R2, B2, "#444")
    s.line(L2, T2, L2, B2, "#444")
    s.text(L2 - 52, (T2 + B2) / 2, "bytes of proxy RSS per session", 12, "middle", rotate=-90)
    if not peers:
        s.text((L2 + R2) / 2, (T2 + B2) / 2, "no idle results", 14, "middle", color="#999")
    gw = (R2 - L2) / max(len(peers), 1)
    bw = min(46, gw * 0.34)

    def bar(x, st, color, label_color="#222"):
        med, lo, hi = st
        s.rect(x, Y2(med), bw, B2 - Y2(med), color, opacity=0.9)
        cx = x + bw / 2
        if hi > lo:
            s.line(cx, Y2(lo), cx, Y2(hi), "#333", 1.2)
            s.line(cx - 4, Y2(lo), cx + 4, Y2(lo), "#333", 1.2)
            s.line(cx - 4, Y2(hi), cx + 4, Y2(hi), "#333", 1.2)
        s.text(cx, min(Y2(med), Y2(hi)) - 5, num(med), 10, "middle", color=label_color)

    for i, p in enumerate(peers):
        gx = L2 + gw * i + gw / 2
        xs, xp = gx - bw - 2, gx + 2
        if sm:
            bar(xs, sm, COLOR["sockman"])
            if mem[p] and sm[0] > 0:
                s.text(gx, T2 + 14, f"×{mem[p][0] / sm[0]:.2f}", 11, "middle", color="#555")
        else:
            s.rect(xs, B2 - 40, bw, 40, "none", "#d62728", "4 3")
            s.text(xs + bw / 2, B2 - 46, "not run", 9, "middle", color=COLOR["sockman"], italic=True)
        if mem[p]:
            bar(xp, mem[p], COLOR[p])
        s.text(gx, B2 + 18, LABEL[p], 11, "middle")
        s.text(gx, B2 + 32, "sockman | peer", 9, "middle", color="#777")
    if sm and peers:
        s.text(R2, T2 + 28, "×N = peer / sockman", 10, "end", color="#777")
    if mem.get("direct"):
        s.text((L2 + R2) / 2, B2 + 52, f"no proxy (the echo server itself): {num(mem['direct'][0])} B per session", 10,
               "middle", color="#777")

    with open(out, "w") as f:
        f.write(s.finish())
    print(f"proxy_plot: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
