#!/usr/bin/env bash
# Measures sockman side by side with its peers (../shared/anchors): each point runs REPS times,
# servers interleaved (A B C D A B C D ...), server pinned to one core and `sockman load` to the
# other, all on loopback. Prints a markdown table of medians (min–max) and ratios to sockman.
#
#   benches/compare.sh                 # every point
#   benches/compare.sh pp64_50 churn   # only these points (names: see POINTS below)
#
# Environment: REPS (3), DURATION_S (3), WARMUP_S (1) in seconds, SERVERS ("sockman tokio epoll epoll_short";
# also sockman_base: an older build given as SOCKMAN_BASE=path, for before/after figures; and
# sockman_w2: `--workers 2`, pinned to SERVER_CPU like the others unless SERVER_CPU lists two;
# sockman_pp2: `--proxy-protocol v2`, for the churn_pp2 point, whose clients send the header to
# sockman_pp2 only: `SERVERS="sockman sockman_pp2" benches/compare.sh churn_pp2` is the header's cost;
# sockman_alog: `--access-log $OUT/access.log`, a line per connection, for its cost;
# sockman_at_LABEL: the binary at $SOCKMAN_AT_LABEL, e.g. SOCKMAN_AT_v1=/path/to/old/sockman and
# SERVERS="sockman_at_v1 sockman": several builds measured side by side in one run),
# SERVER_CPU (0), CLIENT_CPU (1), OUT (benches/results/DATE), ANCHORS (../shared/anchors),
# NOPERF=1 to skip the syscall counts (they need `perf` from Debian's linux-perf).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
anchors=${ANCHORS:-$repo/../shared/anchors}
REPS=${REPS:-3}
DURATION_S=${DURATION_S:-3}
WARMUP_S=${WARMUP_S:-1}
SERVERS=${SERVERS:-"sockman tokio epoll epoll_short"}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
OUT=${OUT:-$repo/benches/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

# name|load arguments
POINTS=(
  "pp64_1|--mode pingpong --size 64 --connections 1"
  "pp64_50|--mode pingpong --size 64 --connections 50"
  "pp64_500|--mode pingpong --size 64 --connections 500"
  "pp64_5000|--mode pingpong --size 64 --connections 5000"
  "pp1k_1|--mode pingpong --size 1024 --connections 1"
  "pp1k_50|--mode pingpong --size 1024 --connections 50"
  "pp1k_500|--mode pingpong --size 1024 --connections 500"
  "pp1k_5000|--mode pingpong --size 1024 --connections 5000"
  "pipe16_50|--mode pipeline --depth 16 --size 64 --connections 50"
  "stream_1|--mode stream --size 65536 --connections 1"
  "stream_50|--mode stream --size 65536 --connections 50"
  "churn|--mode churn --size 64 --connections 50 --source-addrs 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9"
  "churn_pp2|--mode churn --size 64 --connections 50 --send-proxy v2 --source-addrs 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9"
  "idle_1000|--mode idle --connections 1000"
  "idle_10000|--mode idle --connections 10000 --source-addrs 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"
  "idle_19000|--mode idle --connections 19000 --source-addrs 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"
)
if [ $# -gt 0 ]; then
  wanted=" $* "
  selected=()
  for p in "${POINTS[@]}"; do [[ $wanted == *" ${p%%|*} "* ]] && selected+=("$p"); done
  POINTS=("${selected[@]}")
fi

echo "building sockman and the peers" >&2
(cd "$repo" && cargo build --release --quiet)
peers=$repo/target/anchors
[ -x "$peers/epoll_echo" ] && [ -x "$peers/tokio_echo" ] || "$anchors/build.sh" "$peers" >&2
sockman=$repo/target/release/sockman

PERF_EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_accept4,syscalls:sys_enter_close,syscalls:sys_enter_setsockopt
use_perf=1
if [ -n "${NOPERF:-}" ] || ! perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
  use_perf=0
  echo "perf tracepoints unavailable: no syscall counts (apt-get install linux-perf)" >&2
fi

server_pid=
start_server() { # name port
  local name=$1 port=$2
  case $name in
    sockman) RUST_LOG=warn taskset -c "$SERVER_CPU" "$sockman" serve --listen "127.0.0.1:$port" --stats-interval 0 --fd-check-interval 0 2>"$OUT/server.log" & ;;
    sockman_base)
      [ -x "${SOCKMAN_BASE:-}" ] || { echo "sockman_base needs SOCKMAN_BASE=path/to/an/older/sockman" >&2; exit 2; }
      RUST_LOG=warn taskset -c "$SERVER_CPU" "$SOCKMAN_BASE" serve --listen "127.0.0.1:$port" --stats-interval 0 --fd-check-interval 0 2>"$OUT/server.log" & ;;
    sockman_pp2) RUST_LOG=warn taskset -c "$SERVER_CPU" "$sockman" serve --proxy-protocol v2 --listen "127.0.0.1:$port" --stats-interval 0 --fd-check-interval 0 2>"$OUT/server.log" & ;;
    sockman_w2) RUST_LOG=warn taskset -c "$SERVER_CPU" "$sockman" serve --workers 2 --listen "127.0.0.1:$port" --stats-interval 0 --fd-check-interval 0 2>"$OUT/server.log" & ;;
    sockman_alog) RUST_LOG=warn taskset -c "$SERVER_CPU" "$sockman" serve --access-log "$OUT/access.log" --listen "127.0.0.1:$port" --stats-interval 0 --fd-check-interval 0 2>"$OUT/server.log" & ;;
    sockman_at_*)
      var=SOCKMAN_AT_${name#sockman_at_}
      bin=${!var:-}
      [ -x "$bin" ] || { echo "$name needs $var=path/to/a/sockman binary" >&2; exit 2; }
      RUST_LOG=warn taskset -c "$SERVER_CPU" "$bin" serve --listen "127.0.0.1:$port" --stats-interval 0 --fd-check-interval 0 2>"$OUT/server.log" & ;;
    tokio) taskset -c "$SERVER_CPU" "$peers/tokio_echo" "127.0.0.1:$port" 60000 1 2>"$OUT/server.log" & ;;
    epoll) taskset -c "$SERVER_CPU" "$peers/epoll_echo" "$port" 2>"$OUT/server.log" & ;;
    epoll_short) taskset -c "$SERVER_CPU" "$peers/epoll_echo" "$port" short 2>"$OUT/server.log" & ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  server_pid=$!
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "$name did not start on port $port" >&2
  cat "$OUT/server.log" >&2
  return 1
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}

results=$OUT/results.jsonl
: >"$results"
port=21000
for point in "${POINTS[@]}"; do
  name=${point%%|*}
  args=${point#*|}
  for rep in $(seq 1 "$REPS"); do
    for server in $SERVERS; do
      port=$((port + 1))
      # A *_pp2 point sends the PROXY header only to the server that expects it: run beside
      # plain sockman, it measures what the header costs, interleaved.
      run_args=$args
      [[ $name == *_pp2 && $server != sockman_pp2 ]] && run_args=${args/--send-proxy v2 /}
      start_server "$server" "$port"
      perf_out=$OUT/perf.txt
      : >"$perf_out"
      if [ $use_perf = 1 ]; then
        (sleep "$WARMUP_S"; perf stat -x, -e "$PERF_EVENTS" -p "$server_pid" -o "$perf_out" -- sleep "$DURATION_S") &
        perf_pid=$!
      fi
      # shellcheck disable=SC2086
      if ! json=$(taskset -c "$CLIENT_CPU" "$sockman" load --connect "127.0.0.1:$port" $run_args \
          --duration "${DURATION_S}s" --warmup "${WARMUP_S}s" --server-pid "$server_pid" --json 2>"$OUT/load.log"); then
        echo "load failed: $name $server" >&2; cat "$OUT/load.log" >&2; json='{}'
      fi
      [ $use_perf = 1 ] && wait "$perf_pid" 2>/dev/null || true
      stop_server
      python3 - "$name" "$server" "$rep" "$perf_out" "$json" >>"$results" <<'PY'
import json, sys
name, server, rep, perf_path, raw = sys.argv[1:6]
row = {"point": name, "server": server, "rep": int(rep)}
try:
    row.update(json.loads(raw))
except ValueError:
    pass
counts = {}
for line in open(perf_path):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0].replace(".", "").isdigit():
        counts[parts[2].split(":")[-1].replace("sys_enter_", "")] = float(parts[0])
row["syscalls"] = counts
print(json.dumps(row))
PY
      echo "$name $server rep $rep: $(tail -n1 "$results" | cut -c1-160)" >&2
    done
  done
done

python3 "$repo/benches/summarize.py" "$results" | tee "$OUT/summary.md"
