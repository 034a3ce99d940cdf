#!/usr/bin/env bash
# Measures `sockman proxy` side by side with other L4 TCP proxies (../shared/anchors/proxy), all in
# front of the same upstream echo (epoll_echo, SIGPIPE ignored): HAProxy (mode tcp, nbthread 1,
# with and without `option splice-auto`), nginx stream (one process, no master), the tokio
# copy_bidirectional proxy, and the upstream reached directly (no proxy: the floor for rates and
# latency; its CPU and RSS are the echo server's own, not a proxy's).
# Each point runs REPS times, proxies interleaved (A B C ... A B C ...), the proxy pinned to
# PROXY_CPU and the upstream echo and `sockman load` to CLIENT_CPU, all on 127.0.0.1 (and 127.0.0.x
# source addresses). Proxy CPU and RSS come from `sockman load --server-pid <proxy pid>`.
# Writes raw JSON per run, a markdown summary of medians (min–max) with ratios to sockman, and an
# SVG plot (CPU per echo against connections; memory per idle session).
#
#   benches/proxy_compare.sh                  # every point
#   benches/proxy_compare.sh pp64_50 churn    # only these points (names: see POINTS below)
#
# Environment:
#   SOCKMAN      sockman binary for `sockman proxy` ($repo/target/release/sockman); when
#                `$SOCKMAN proxy --help` fails, sockman is skipped (and said so)
#   LOADGEN      sockman binary for `sockman load` ($SOCKMAN)
#   PROXIES      "sockman haproxy haproxy_splice nginx tokio direct"
#   REPS (3), DURATION_S (5), WARMUP_S (1) in seconds; in idle mode DURATION_S is the hold time
#   PROXY_CPU (0), CLIENT_CPU (1): the upstream echo runs beside the load generator
#   OUT          benches/results/proxy-DATE
#   ANCHORS      ../shared/anchors
#   PORT_BASE    24000 (ports are taken upwards from here, skipping ones already listening)
#   NOPERF=1     skip the syscall counts (they need `perf` from Debian's linux-perf)
#   NOINSTALL=1  do not apt-get install missing peers (they are skipped instead)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
anchors=${ANCHORS:-$repo/../shared/anchors}
SOCKMAN=${SOCKMAN:-$repo/target/release/sockman}
LOADGEN=${LOADGEN:-$SOCKMAN}
PROXIES=${PROXIES:-"sockman haproxy haproxy_splice nginx tokio direct"}
REPS=${REPS:-3}
DURATION_S=${DURATION_S:-5}
WARMUP_S=${WARMUP_S:-1}
PROXY_CPU=${PROXY_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT_BASE=${PORT_BASE:-24000}
OUT=${OUT:-$repo/benches/results/proxy-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
say() { echo "proxy_compare: $*" >&2; }

# name|load arguments
POINTS=(
  "pp64_1|--mode pingpong --size 64 --connections 1"
  "pp64_50|--mode pingpong --size 64 --connections 50"
  "pp64_5000|--mode pingpong --size 64 --connections 5000"
  "stream1k_1|--mode stream --size 1024 --connections 1"
  "stream1k_50|--mode stream --size 1024 --connections 50"
  "churn|--mode churn --size 64 --connections 50 --source-addrs 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9"
  # two fds per session in the proxy: 9 000 sessions stay under a 20 000-fd hard limit
  "idle_9000|--mode idle --connections 9000 --source-addrs 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"
)
if [ $# -gt 0 ]; then
  wanted=" $* "
  selected=()
  for p in "${POINTS[@]}"; do [[ $wanted == *" ${p%%|*} "* ]] && selected+=("$p"); done
  [ ${#selected[@]} -gt 0 ] || { say "no such point: $*"; exit 2; }
  POINTS=("${selected[@]}")
fi

# ---- processes: everything started here is tracked by pid and stopped on exit -------------
started=()
stop_pid() { # pid: TERM, then KILL after 5 s; only our own children
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}
forget() { # pid: no longer ours to stop (it has been waited for)
  local keep=() p
  for p in "${started[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  started=("${keep[@]}")
}
cleanup() {
  local p
  for p in "${started[@]}"; do stop_pid "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the load generator, the upstream, the peers ---------------------------------------------
[ -x "$LOADGEN" ] || { say "no load generator at $LOADGEN (set LOADGEN= or SOCKMAN=)"; exit 2; }
"$LOADGEN" load --help >/dev/null 2>&1 || { say "$LOADGEN has no 'load' subcommand"; exit 2; }

declare -A skip_reason
peers=$repo/target/anchors
mkdir -p "$peers"
if [ ! -x "$peers/epoll_echo" ] || [ "$anchors/c_epoll_echo/echo.c" -nt "$peers/epoll_echo" ]; then
  gcc -O2 -Wall -o "$peers/epoll_echo" "$anchors/c_epoll_echo/echo.c"
fi

want() { [[ " $PROXIES " == *" $1 "* ]]; }

apt_updated=0
apt_install() { # packages...; returns non-zero if apt fails (the caller skips the peer)
  [ -z "${NOINSTALL:-}" ] || return 1
  command -v apt-get >/dev/null || return 1
  local policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  # the packages' postinst would start system services (nginx on port 80): forbid that
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made_policy=1; fi
  if [ $apt_updated = 0 ]; then
    say "apt-get update"
    apt-get update -qq >"$OUT/logs/apt.log" 2>&1 || rc=$?
    apt_updated=1
  fi
  if [ $rc = 0 ]; then
    say "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$OUT/logs/apt.log" 2>&1 || rc=$?
  fi
  [ $made_policy = 0 ] || rm -f "$policy"
  [ $rc = 0 ] || say "apt-get failed (see $OUT/logs/apt.log)"
  return $rc
}

if want haproxy || want haproxy_splice; then
  command -v haproxy >/dev/null || apt_install haproxy || true
  if ! command -v haproxy >/dev/null; then
    for p in haproxy haproxy_splice; do
      want $p && skip_reason[$p]="haproxy is not installed (Debian package haproxy)"
    done
  fi
fi

nginx_module=
find_stream_module() {
  nginx_module=
  local m
  for m in /usr/lib/nginx/modules/ngx_stream_module.so \
      $(dpkg -L libnginx-mod-stream 2>/dev/null | grep '/ngx_stream_module\.so$' || true); do
    [ -f "$m" ] && { nginx_module=$m; return 0; }
  done
  return 1
}
if want nginx; then
  if ! command -v nginx >/dev/null || ! find_stream_module; then
    apt_install nginx-light libnginx-mod-stream || true
  fi
  if ! command -v nginx >/dev/null; then
    skip_reason[nginx]="nginx is not installed (Debian packages nginx-light libnginx-mod-stream)"
  elif ! find_stream_module; then
    skip_reason[nginx]="nginx has no stream module (Debian package libnginx-mod-stream)"
  fi
fi

tokio_proxy=$peers/tokio_proxy
if want tokio; then
  if [ ! -x "$tokio_proxy" ] || [ "$anchors/proxy/tokio_proxy/src/main.rs" -nt "$tokio_proxy" ]; then
    say "building the tokio proxy (cargo, target dir $peers/tokio_proxy-target)"
    if CARGO_TARGET_DIR=$peers/tokio_proxy-target cargo build --release --quiet --locked \
        --manifest-path "$anchors/proxy/tokio_proxy/Cargo.toml" >"$OUT/logs/tokio_build.log" 2>&1; then
      cp "$peers/tokio_proxy-target/release/tokio_proxy" "$tokio_proxy"
    else
      say "tokio proxy build failed (see $OUT/logs/tokio_build.log)"
    fi
  fi
  [ -x "$tokio_proxy" ] || skip_reason[tokio]="the tokio proxy did not build (cargo; see logs/tokio_build.log)"
fi

if want sockman; then
  if [ ! -x "$SOCKMAN" ]; then
    skip_reason[sockman]="no sockman binary at $SOCKMAN"
  elif ! "$SOCKMAN" proxy --help >/dev/null 2>&1; then
    skip_reason[sockman]="\`$SOCKMAN proxy --help\` fails: this binary has no proxy subcommand yet"
  fi
fi

run_proxies=()
for p in $PROXIES; do
  case $p in sockman|haproxy|haproxy_splice|nginx|tokio|direct) ;; *) say "unknown proxy $p"; exit 2 ;; esac
  if [ -n "${skip_reason[$p]:-}" ]; then say "SKIPPING $p: ${skip_reason[$p]}"; else run_proxies+=("$p"); fi
done
[ ${#run_proxies[@]} -gt 0 ] || { say "nothing to run"; exit 1; }
say "proxies: ${run_proxies[*]}; points: $(for p in "${POINTS[@]}"; do printf '%s ' "${p%%|*}"; done)"

use_perf=1
PERF_EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_readv,syscalls:sys_enter_writev,syscalls:sys_enter_splice,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_accept4,syscalls:sys_enter_connect,syscalls:sys_enter_close,syscalls:sys_enter_shutdown,syscalls:sys_enter_setsockopt
if [ -n "${NOPERF:-}" ] || ! perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
  use_perf=0
  say "perf tracepoints unavailable or NOPERF set: no syscall counts (apt-get install linux-perf)"
fi

# ---- meta data for the summary --------------------------------------------------------------
versions() {
  local p
  for p in "${run_proxies[@]}"; do
    case $p in
      sockman) echo "sockman: $("$SOCKMAN" --version 2>&1 | head -n1) ($SOCKMAN)" ;;
      haproxy) echo "haproxy: $(haproxy -v 2>&1 | head -n1)" ;;
      nginx) echo "nginx: $(nginx -v 2>&1 | head -n1), module $nginx_module" ;;
      tokio) echo "tokio: tokio_proxy from $anchors/proxy/tokio_proxy (current_thread, copy_bidirectional)" ;;
    esac
  done
  echo "upstream: epoll_echo from $anchors/c_epoll_echo (SIGPIPE ignored)"
  echo "load: $("$LOADGEN" --version 2>&1 | head -n1) ($LOADGEN)"
}
skipped_lines() { local p; for p in "${!skip_reason[@]}"; do echo "$p: ${skip_reason[$p]}"; done; }
python3 - "$OUT/meta.json" <<PY
import json, sys, platform, os
cpu = ""
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
meta = {
    "date": "$(date -Is)",
    "kernel": platform.release(),
    "cpus": os.cpu_count(),
    "cpu_model": cpu,
    "reps": int("$REPS"), "duration_s": float("$DURATION_S"), "warmup_s": float("$WARMUP_S"),
    "proxy_cpu": "$PROXY_CPU", "client_cpu": "$CLIENT_CPU",
    "proxies": "${run_proxies[*]}".split(),
    "skipped": dict(l.split(": ", 1) for l in """$(skipped_lines)""".splitlines() if l),
    "versions": [l for l in """$(versions)""".splitlines() if l],
    "fd_limit": "$(ulimit -Hn)",
    "perf": bool($use_perf),
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PY

# ---- one run ---------------------------------------------------------------------------------
port=$PORT_BASE
next_port() { # sets port to the next one nobody listens on
  while :; do
    port=$((port + 1))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || return 0
  done
}
wait_port() { # port pid name log
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || break
    sleep 0.05
  done
  say "$3 did not start on port $1"
  cat "$4" >&2 || true
  return 1
}

rss_of() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo null; }

up_pid=
proxy_pid=
start_upstream() { # port log
  (trap '' PIPE; exec taskset -c "$CLIENT_CPU" "$peers/epoll_echo" "$1") 2>"$2" &
  up_pid=$!
  started+=("$up_pid")
  wait_port "$1" "$up_pid" upstream "$2"
}
start_proxy() { # name port upstream-port log; sets proxy_pid (the upstream itself for direct)
  local name=$1 lport=$2 uport=$3 log=$4 cfg
  case $name in
    direct) proxy_pid=$up_pid; return 0 ;;
    sockman)
      RUST_LOG=warn taskset -c "$PROXY_CPU" "$SOCKMAN" proxy --listen "127.0.0.1:$lport" \
        --upstream "127.0.0.1:$uport" --stats-interval 0 2>"$log" & ;;
    haproxy|haproxy_splice)
      cfg=${log%.proxy.log}.haproxy.cfg
      [ $name = haproxy ] && src=$anchors/proxy/haproxy.cfg || src=$anchors/proxy/haproxy_splice.cfg
      sed -e "s/{port}/$lport/g" -e "s/{upstream}/$uport/g" "$src" >"$cfg"
      taskset -c "$PROXY_CPU" haproxy -db -f "$cfg" 2>"$log" & ;;
    nginx)
      local tmp=$OUT/nginx
      mkdir -p "$tmp"
      cfg=${log%.proxy.log}.nginx.conf
      sed -e "s/{port}/$lport/g" -e "s/{upstream}/$uport/g" -e "s#{tmp}#$tmp#g" \
        -e "s#/usr/lib/nginx/modules/ngx_stream_module.so#$nginx_module#" "$anchors/proxy/nginx.conf" >"$cfg"
      taskset -c "$PROXY_CPU" nginx -e stderr -p "$tmp" -c "$cfg" 2>"$log" & ;;
    tokio)
      taskset -c "$PROXY_CPU" "$tokio_proxy" "127.0.0.1:$lport" "127.0.0.1:$uport" 2>"$log" & ;;
  esac
  proxy_pid=$!
  started+=("$proxy_pid")
  wait_port "$lport" "$proxy_pid" "$name" "$log"
}

results=$OUT/results.jsonl
: >"$results"
t0=$(date +%s)
for point in "${POINTS[@]}"; do
  name=${point%%|*}
  args=${point#*|}
  for rep in $(seq 1 "$REPS"); do
    for proxy in "${run_proxies[@]}"; do
      tag=$name-$proxy-$rep
      raw=$OUT/raw/$tag.json
      next_port; uport=$port
      start_upstream "$uport" "$OUT/logs/$tag.upstream.log" || { say "upstream failed: $tag"; exit 1; }
      lport=$uport
      if [ "$proxy" != direct ]; then next_port; lport=$port; fi
      if ! start_proxy "$proxy" "$lport" "$uport" "$OUT/logs/$tag.proxy.log"; then
        say "SKIPPING run $tag: $proxy did not start"
        [ "$proxy" = direct ] || stop_pid "$proxy_pid"
        stop_pid "$up_pid"
        echo "{\"point\":\"$name\",\"proxy\":\"$proxy\",\"rep\":$rep,\"failed\":\"did not start\"}" >>"$results"
        continue
      fi
      rss_before=$(rss_of "$proxy_pid")
      perf_out=$OUT/logs/$tag.perf.txt
      : >"$perf_out"
      perf_pid=
      if [ $use_perf = 1 ] && [[ $args != *"--mode idle"* ]]; then
        perf stat -x, -e "$PERF_EVENTS" --delay "$(awk "BEGIN{print int($WARMUP_S*1000)}")" \
          -p "$proxy_pid" -o "$perf_out" -- sleep "$(awk "BEGIN{print $WARMUP_S+$DURATION_S}")" 2>/dev/null &
        perf_pid=$!
        started+=("$perf_pid")
      fi
      # shellcheck disable=SC2086
      taskset -c "$CLIENT_CPU" timeout -k 5 "$(awk "BEGIN{print int($WARMUP_S+$DURATION_S+120)}")" \
        "$LOADGEN" load --connect "127.0.0.1:$lport" $args --duration "${DURATION_S}s" \
        --warmup "${WARMUP_S}s" --server-pid "$proxy_pid" --json >"$raw" 2>"$OUT/logs/$tag.load.log" &
      load_pid=$!
      started+=("$load_pid")
      load_rc=0
      wait "$load_pid" || load_rc=$?
      forget "$load_pid"
      if [ $load_rc != 0 ]; then
        say "load failed (rc $load_rc): $tag"; tail -n 5 "$OUT/logs/$tag.load.log" >&2 || true
      fi
      [ -z "$perf_pid" ] || { wait "$perf_pid" 2>/dev/null || true; forget "$perf_pid"; }
      alive=1; kill -0 "$proxy_pid" 2>/dev/null || alive=0
      [ "$proxy" = direct ] || stop_pid "$proxy_pid"
      stop_pid "$up_pid"
      python3 - "$name" "$proxy" "$rep" "$perf_out" "$raw" "$rss_before" "$alive" "$load_rc" >>"$results" <<'PY'
import json, sys
name, proxy, rep, perf_path, raw_path, rss_before, alive, load_rc = sys.argv[1:9]
row = {"point": name, "proxy": proxy, "rep": int(rep)}
try:
    row.update(json.loads(open(raw_path).read()))
except (ValueError, OSError):
    row["failed"] = f"load exit {load_rc}, no JSON"
row["proxy_rss_before_load_bytes"] = None if rss_before == "null" else int(float(rss_before))
row["proxy_alive_after"] = alive == "1"
counts = {}
for line in open(perf_path):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0].replace(".", "").isdigit():
        counts[parts[2].split(":")[-1].replace("sys_enter_", "")] = float(parts[0])
row["syscalls"] = counts
print(json.dumps(row))
f = lambda k, d=1: "-" if row.get(k) is None else f"{row[k]:,.{d}f}"
print(f"proxy_compare: {name}-{proxy}-{rep}: " + (row.get("failed") or
      f"ops/s {f('ops_per_sec', 0)}  MB/s {f('mb_per_sec')}  proxy cpu/op {f('server_cpu_us_per_op', 2)} µs"
      f"  held {row.get('connections_held')}  rss/conn {f('server_rss_per_held_connection_bytes', 0)} B"
      f"  errors {row.get('errors')}"), file=sys.stderr)
PY
    done
  done
done
say "measured in $(( $(date +%s) - t0 )) s"

python3 "$repo/benches/proxy_summarize.py" "$results" "$OUT/meta.json" >"$OUT/summary.md"
python3 "$repo/benches/proxy_plot.py" "$results" "$OUT/proxy.svg" "$OUT/meta.json"
cat "$OUT/summary.md"
if command -v rsvg-convert >/dev/null; then
  rsvg-convert -o "$OUT/proxy.png" "$OUT/proxy.svg" && say "png:     $OUT/proxy.png"
fi
say "summary: $OUT/summary.md"
say "plot:    $OUT/proxy.svg"
say "raw:     $OUT/raw/*.json (one per run), $OUT/results.jsonl (all runs), logs in $OUT/logs"
